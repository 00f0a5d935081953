//! `ha`: several servers on PostgreSQL: the store's cost against sled, push
//! across servers, agent failover, and 1,000 agents over two servers.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_proto::admin as admin_pb;
use tessera_tests::{entry, RunningAgent, TestServer};

use crate::children::server_and_admin;
use crate::signing::{node_api_throughput, Signing};
use crate::stats::{percentiles, round, row, Figures};
use crate::workload::{me, open_stream, propagation, until_carries};

/// Several servers on PostgreSQL: the store's cost against sled, push
/// across servers, agent failover, and 1,000 agents over two servers. The
/// PostgreSQL cluster is private, local and durable (fsync on), like sled.
pub async fn run(quick: bool) -> Figures {
    use tessera_tests::pg_cluster::PgCluster;
    let mut out = Vec::new();
    let cluster = PgCluster::start_with(true).expect("a PostgreSQL cluster for the bench");

    // The store alone: entries and SVIDs per second, sled and PostgreSQL in the same run.
    let entries = if quick { 10_000 } else { 50_000 };
    let secs = if quick { 3 } else { 8 };
    let mut rates = Vec::new();
    for (name, url) in [("sled", None), ("postgres", Some(cluster.database()))] {
        let (_dir, server, mut admin, _, _) = server_and_admin(true, url.as_deref()).await;
        let start = Instant::now();
        for chunk in (0..entries).step_by(1000) {
            let batch = (chunk..chunk + 1000)
                .map(|i| {
                    entry(
                        &format!("spiffe://example.org/ha/{i}"),
                        &format!("spiffe://example.org/ha/agent-{}", i % 100),
                        &[&format!("unix:uid:{}", i / 100 + 1)],
                        None,
                    )
                })
                .collect();
            admin
                .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch })
                .await
                .unwrap();
        }
        let entries_per_s = entries as f64 / start.elapsed().as_secs_f64();
        server.stop();
        let svids_per_s =
            node_api_throughput(Duration::from_secs(secs), Signing::X509, true, url.as_deref())
                .await
                .per_s;
        rates.push((name, entries_per_s, svids_per_s));
    }
    for (name, entries_per_s, svids_per_s) in &rates {
        println!(
            "{:<44} {:>12.0} {:>12.0}",
            format!("{name}: entries/s, X509-SVIDs/s"),
            entries_per_s,
            svids_per_s
        );
    }
    out.push(("ha_sled_entries_per_s", json!(rates[0].1.round())));
    out.push(("ha_pg_entries_per_s", json!(rates[1].1.round())));
    out.push(("ha_sled_svids_per_s", json!(rates[0].2.round())));
    out.push(("ha_pg_svids_per_s", json!(rates[1].2.round())));

    // Two servers on one database, in this process, with metrics.
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let ha_server = |name: &str| {
        let mut config = tessera_tests::test_config(&dir.path().join(name));
        config.datastore = Some(url.clone());
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        config
    };
    let clock = || std::sync::Arc::new(tessera_server::SystemClock);
    let a = TestServer::start_with(ha_server("a"), clock()).await;
    let b = TestServer::start_with(ha_server("b"), clock()).await;
    while a.bundle().await.len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Created on B, served by a workload whose agent is on A.
    let rounds = if quick { 100 } else { 500 };
    let agent = RunningAgent::start_configured(&a, &dir.path().join("agent"), |config| {
        config.server_addresses = vec![a.addr.to_string()];
    })
    .await;
    let (p50, p99) = propagation(&b, &a, &agent, rounds).await;
    row("create on B -> workload on A (ms)", p50, p99, rounds);
    out.push(("ha_propagate_p50_ms", json!(round(p50))));
    out.push(("ha_propagate_p99_ms", json!(round(p99))));
    agent.stop().await;

    // Failover: the server holding the agent's Sync stream stops; time
    // until the stream is open on the other (its sync_streams gauge), and
    // until a change made then reaches the workload.
    let (mut a, mut b) = (Some(a), Some(b));
    let agent = RunningAgent::start_configured(
        a.as_ref().unwrap(),
        &dir.path().join("agent-failover"),
        |config| {
            config.server_addresses =
                vec![a.as_ref().unwrap().addr.to_string(), b.as_ref().unwrap().addr.to_string()]
        },
    )
    .await;
    let (_client, mut stream, _) = {
        let home = a.as_ref().unwrap();
        home.create_entry("spiffe://example.org/failover", &agent.id, &[&me()], None).await;
        open_stream(&agent).await
    };
    let mut resumed = Vec::new();
    let mut delivered = Vec::new();
    let failovers = if quick { 5 } else { 10 };
    for i in 0..failovers {
        // Which server holds the stream now?
        let on_a = a.as_ref().unwrap().sync_streams() >= 1;
        let (dying, survivor) = if on_a { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let victim = dying.take().unwrap();
        let restart_dir = victim.data_dir.clone();
        let restart_addr = victim.addr;
        let start = Instant::now();
        victim.stop().await;
        let live = survivor.as_ref().unwrap();
        while live.sync_streams() < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        resumed.push(start.elapsed());
        let id = format!("spiffe://example.org/failover/{i}");
        live.create_entry(&id, &agent.id, &[&me()], None).await;
        until_carries(&mut stream, &id).await;
        delivered.push(start.elapsed());
        // Bring the stopped server back on its address for the next round.
        let mut config = tessera_tests::test_config(&restart_dir);
        config.bind = restart_addr;
        config.datastore = Some(url.clone());
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        *dying = Some(TestServer::start_with(config, clock()).await);
    }
    let worst =
        |samples: &[Duration]| samples.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let (r50, _) = percentiles(resumed.clone());
    let (d50, _) = percentiles(delivered.clone());
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "failover: stop -> Sync on the other (ms)",
        r50,
        worst(&resumed),
        failovers
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "  ... -> a change delivered through it (ms)",
        d50,
        worst(&delivered),
        failovers
    );
    out.push(("ha_failover_resume_ms", json!(round(r50))));
    out.push(("ha_failover_resume_max_ms", json!(round(worst(&resumed)))));
    out.push(("ha_failover_change_ms", json!(round(d50))));
    out.push(("ha_failover_change_max_ms", json!(round(worst(&delivered)))));
    agent.stop().await;
    let (a, b) = (a.unwrap(), b.unwrap());

    // 1,000 agents, half on each server; then one batch of 1,000 entries
    // (one per agent) created on A: when each agent hears of its entry.
    let agents = 1_000;
    // For comparison: the same batch for agents that are not connected.
    let control: Vec<_> = (0..agents)
        .map(|i| {
            entry(
                &format!("spiffe://example.org/ha/control/{i}"),
                &format!("spiffe://example.org/ha/absent-{i}"),
                &[&me()],
                None,
            )
        })
        .collect();
    let start = Instant::now();
    a.admin()
        .await
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: control })
        .await
        .unwrap();
    let control_ms = start.elapsed().as_secs_f64() * 1000.0;
    let bundle = a.bundle().await;
    let start = Instant::now();
    let mut streams = Vec::with_capacity(agents);
    for i in 0..agents {
        let server = if i % 2 == 0 { &a } else { &b };
        let id = format!("spiffe://example.org/ha/sim-{i}");
        let token = server.join_token(&id, 0).await;
        let agent = tessera_tests::TestAgent::attest_to(server.addr, bundle.clone(), &token.token)
            .await
            .unwrap();
        let mut client = agent.connect().await;
        let stream = client
            .sync(tessera_proto::node::SyncRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
        streams.push((id, agent, client, stream));
    }
    let connect_s = start.elapsed().as_secs_f64();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for (id, agent, client, mut stream) in streams {
        let tx = tx.clone();
        held.push((agent, client));
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(tessera_proto::node::sync_message::Event::Change(_)) = message.event {
                    let _ = tx.send((id.clone(), Instant::now()));
                    break;
                }
            }
        });
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let batch = (0..agents)
        .map(|i| {
            entry(
                &format!("spiffe://example.org/ha/fan/{i}"),
                &format!("spiffe://example.org/ha/sim-{i}"),
                &[&me()],
                None,
            )
        })
        .collect();
    let start = Instant::now();
    let mut admin = a.admin().await;
    admin.batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch }).await.unwrap();
    let committed = start.elapsed().as_secs_f64() * 1000.0;
    // Agents with an even number are on A (where the entries were made),
    // odd ones on B.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    while on_a.len() + on_b.len() < agents {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some((id, at))) => {
                let n: usize = id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let side = if n.is_multiple_of(2) { &mut on_a } else { &mut on_b };
                side.push(at.duration_since(start));
            }
            _ => break,
        }
    }
    let heard = on_a.len() + on_b.len();
    let (p50, p99) = percentiles(on_a.iter().chain(&on_b).copied().collect());
    let (a50, a99) = percentiles(on_a);
    let (b50, b99) = percentiles(on_b);
    println!(
        "{:<44} {:>12.1} {:>12} {:>12}",
        "1,000 agents attested + synced, one by one (s)", connect_s, "", agents
    );
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "  ... 1,000 entries committed on A (ms; none connected)", committed, control_ms
    );
    row("  ... entries on A -> each agent (ms)", p50, p99, heard);
    row("      agents on A (ms)", a50, a99, agents / 2);
    row("      agents on B (ms)", b50, b99, agents / 2);
    out.push(("ha_1000_agents_connect_s", json!(round(connect_s))));
    out.push(("ha_1000_entries_commit_ms", json!(round(committed))));
    out.push(("ha_1000_entries_commit_unconnected_ms", json!(round(control_ms))));
    out.push(("ha_1000_agents_fanout_p50_ms", json!(round(p50))));
    out.push(("ha_1000_agents_fanout_p99_ms", json!(round(p99))));
    out.push(("ha_1000_agents_on_a_p99_ms", json!(round(a99))));
    out.push(("ha_1000_agents_on_b_p99_ms", json!(round(b99))));
    out.push(("ha_1000_agents_heard", json!(heard)));
    drop(held);
    a.stop().await;
    b.stop().await;
    out
}
