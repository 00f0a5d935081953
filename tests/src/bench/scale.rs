//! `scale`: registration at scale (100,000 entries), restart, 1,000
//! connected agents, an agent with 20,000 entries, and 1,000 concurrent
//! Workload API streams on it; the server and that agent each in a process
//! of its own, so their memory can be read.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_agent::fetch_x509;
use tessera_proto::admin as admin_pb;
use tessera_tests::entry;

use crate::children::{
    admin_at, attest_simulated, bundle_of, join_token, open_sync, AdminClient, Child,
};
use crate::stats::{round, row, Figures};
use crate::workload::{concurrent_first_responses, me};

pub async fn run() -> Figures {
    scale(100_000, 1_000, 20_000, 1_000).await
}

async fn health(admin: &mut AdminClient) -> admin_pb::HealthResponse {
    admin.health(admin_pb::HealthRequest {}).await.unwrap().into_inner()
}

/// Registration at scale, restart, 1,000 connected agents, an agent with
/// 20,000 entries, and 1,000 concurrent Workload API streams on it.
async fn scale(entries: usize, agents: usize, big_agent: usize, streams: usize) -> Figures {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server = Child::server(&server_dir, &[]);
    let mut admin = admin_at(&server_dir).await;

    // Registration: `entries` entries spread over `agents` parents, batches of 1,000.
    let per_agent = entries / agents;
    let start = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..entries {
        let parent = format!("spiffe://example.org/sim/agent-{}", i % agents);
        batch.push(entry(
            &format!("spiffe://example.org/scale/{i}"),
            &parent,
            &[&format!("unix:uid:{}", i / agents + 1)],
            None,
        ));
        if batch.len() == 1000 || i + 1 == entries {
            let response = admin
                .batch_create_entry(admin_pb::BatchCreateEntryRequest {
                    entries: std::mem::take(&mut batch),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(response
                .results
                .iter()
                .all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let entries_per_s = entries as f64 / elapsed;
    println!(
        "{:<44} {:>12.0} {:>12.1} {:>12}",
        "entries created/s (durable), seconds", entries_per_s, elapsed, entries
    );
    out.push(("entries_per_s", json!(entries_per_s.round())));

    // Restart with everything in the store: from process start to serving.
    server.stop();
    let start = Instant::now();
    let server = Child::server(&server_dir, &[]);
    let mut admin = admin_at(&server_dir).await;
    let h = health(&mut admin).await;
    let restart = start.elapsed().as_secs_f64();
    assert_eq!(h.entries as usize, entries);
    println!("{:<44} {:>12.2} {:>12} {:>12}", "restart to serving (s)", restart, "", h.entries);
    out.push(("restart_100k_s", json!(round(restart))));

    // 1,000 agents attest and hold their Sync streams (each gets its snapshot).
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle = bundle_of(&mut admin).await;
    let start = Instant::now();
    let mut held = Vec::new();
    let mut simulated = Vec::new();
    for i in 0..agents {
        let id = format!("spiffe://example.org/sim/agent-{i}");
        let agent = attest_simulated(&mut admin, addr, &bundle, &id).await;
        let (client, mut stream) = open_sync(&agent).await;
        let mut got = 0;
        while got < per_agent {
            if let Some(tessera_proto::node::sync_message::Event::Snapshot(chunk)) =
                stream.message().await.unwrap().unwrap().event
            {
                got += chunk.entries.len();
            }
        }
        held.push(stream);
        simulated.push((agent, client));
    }
    let connect_s = start.elapsed().as_secs_f64();
    // Give the server a moment to settle, then read its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_rss = server.rss_mb();
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "server RSS MB; 1,000 agents connected in (s)", server_rss, connect_s, agents
    );
    out.push(("server_rss_mb", json!(round(server_rss))));
    out.push(("agents_connect_s", json!(round(connect_s))));

    // One agent parenting `big_agent` entries (one of them for this process).
    let big_id = "spiffe://example.org/big-agent";
    let before = health(&mut admin).await.issued_svids;
    for chunk_start in (0..big_agent).step_by(1000) {
        let batch = (chunk_start..(chunk_start + 1000).min(big_agent))
            .map(|j| {
                let selector = if j == 0 { me() } else { format!("unix:uid:{}", 200_000 + j) };
                entry(&format!("spiffe://example.org/big/{j}"), big_id, &[&selector], None)
            })
            .collect();
        admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch })
            .await
            .unwrap();
    }
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, tessera_tests::to_pem(&bundle)).unwrap();
    // The same agent with no entries, for the memory one cached SVID costs.
    let idle_token = join_token(&mut admin, "spiffe://example.org/idle-agent").await;
    let idle =
        Child::agent(&dir.path().join("idle"), &server.ready, &idle_token, &bundle_path, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = idle.rss_mb();
    idle.stop();
    let token = join_token(&mut admin, big_id).await;
    let start = Instant::now();
    let agent = Child::agent(&dir.path().join("agent"), &server.ready, &token, &bundle_path, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let issued = health(&mut admin).await.issued_svids;
        // Its own agent SVID plus one per entry.
        if issued > before + big_agent as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not get all its SVIDs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sync_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent_rss = agent.rss_mb();
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "agent RSS MB with 20k SVIDs; all signed in (s)", agent_rss, sync_s, big_agent
    );
    let per_svid = (agent_rss - idle_rss) * 1024.0 * 1024.0 / big_agent as f64;
    println!(
        "{:<44} {:>12.0} {:>12.1} {:>12}",
        "  ... bytes per cached SVID; idle agent RSS MB", per_svid, idle_rss, big_agent
    );
    out.push(("agent_20k_rss_mb", json!(round(agent_rss))));
    out.push(("agent_idle_rss_mb", json!(round(idle_rss))));
    out.push(("agent_bytes_per_svid", json!(per_svid.round())));
    out.push(("agent_20k_sync_s", json!(round(sync_s))));

    // `streams` workloads open FetchX509SVID at once (one connection each).
    let endpoint = format!("unix://{}", agent.ready);
    fetch_x509(&endpoint).await.expect("warm-up fetch");
    let ((p50, p99), open) = concurrent_first_responses(&endpoint, streams).await;
    let streams_rss = agent.rss_mb();
    row("1,000 concurrent FetchX509SVID first resp (ms)", p50, p99, streams);
    println!(
        "{:<44} {:>12.1} {:>12} {:>12}",
        "agent RSS MB with 20k SVIDs + 1,000 streams", streams_rss, "", streams
    );
    out.push(("streams_1000_p50_ms", json!(round(p50))));
    out.push(("streams_1000_p99_ms", json!(round(p99))));
    out.push(("agent_streams_rss_mb", json!(round(streams_rss))));
    drop(open);
    drop(held);
    drop(simulated);
    agent.stop();
    server.stop();
    out
}
