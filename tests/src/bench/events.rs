//! `events`: what the event stream costs. X509-SVIDs signed per second with
//! events off and on, FetchX509SVID latency with them off, on, and on in
//! the agent only, and the events per second the server stores from
//! agents' pushes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_proto::node as node_pb;
use tessera_proto::types::{Event, Workload};
use tessera_tests::{RunningAgent, TestServer};

use crate::children::{attest_simulated, server_and_admin};
use crate::signing::{node_api_throughput, Signing};
use crate::stats::{measure_rate, ratio_row, round, row, Figures};
use crate::workload::{fetch_latency, me};

pub async fn run(quick: bool) -> Figures {
    let mut out = Vec::new();
    let secs = if quick { 3 } else { 6 };
    // Alternating off/on, twice, so that drift of the machine hits both.
    let (mut off, mut on) = (0.0, 0.0);
    for _ in 0..2 {
        let d = Duration::from_secs(secs);
        off += node_api_throughput(d, Signing::X509, false, None).await.per_s / 2.0;
        on += node_api_throughput(d, Signing::X509, true, None).await.per_s / 2.0;
    }
    ratio_row("X509-SVIDs/s, events on; events off", on, off);
    out.push(("events_issue_on_per_s", json!(on.round())));
    out.push(("events_issue_off_per_s", json!(off.round())));
    out.push(("events_issue_ratio", json!(round(on / off))));
    let calls = if quick { 2_000 } else { 10_000 };
    let (off_p50, off_p99) = fetch_with_events(calls, false, false).await;
    row("FetchX509SVID, events off (ms)", off_p50, off_p99, calls);
    let (on_p50, on_p99) = fetch_with_events(calls, true, true).await;
    row("FetchX509SVID, events on (ms)", on_p50, on_p99, calls);
    // The agent's share: it records and pushes, the server does not store.
    let (a50, a99) = fetch_with_events(calls, true, false).await;
    row("FetchX509SVID, agent events only (ms)", a50, a99, calls);
    out.push(("events_fetch_agent_only_p99_ms", json!(round(a99))));
    out.push(("events_fetch_off_p99_ms", json!(round(off_p99))));
    out.push(("events_fetch_on_p99_ms", json!(round(on_p99))));
    out.push(("events_fetch_p99_ratio", json!(round(on_p99 / off_p99))));
    let rate = ingest_rate(Duration::from_secs(secs)).await;
    println!("{:<44} {:>12.0}", "events/s stored from agents' pushes", rate);
    out.push(("events_ingest_per_s", json!(rate.round())));
    out
}

/// FetchX509SVID first-response latency (as the `fetch` scenario measures
/// it) with the agent's events on or off and the server storing them or
/// not.
async fn fetch_with_events(calls: usize, events: bool, server_events: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tessera_tests::test_config(&dir.path().join("server"));
    config.events.enabled = server_events;
    let server = TestServer::start_with(config, Arc::new(tessera_server::SystemClock)).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |c| {
        c.events = events;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let result = fetch_latency(&agent, calls).await;
    agent.stop().await;
    server.stop().await;
    result
}

/// Events per second the server stores from agents' pushes: 8 simulated
/// agents, each pushing batches of 500 workload events (as the agent's
/// spool sends them) one after another, to a server in its own process.
async fn ingest_rate(duration: Duration) -> f64 {
    let (_dir, server, mut admin, addr, bundle) = server_and_admin(true, None).await;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..8 {
        let id = format!("spiffe://example.org/ingest/agent-{i}");
        let mut client = attest_simulated(&mut admin, addr, &bundle, &id).await.connect().await;
        let (done, stop) = (done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Event> = (0..500)
                    .map(|_| {
                        seq += 1;
                        Event {
                            kind: "workload.x509".into(),
                            decision: "allow".into(),
                            time_ms: 1,
                            agent_seq: seq,
                            spiffe_ids: vec!["spiffe://example.org/bench".into()],
                            entry_ids: vec!["0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()],
                            workload: Some(Workload {
                                pid: 4242,
                                uid: 1000,
                                gid: 1000,
                                path: "/usr/bin/bench".into(),
                                sha256: "ab".repeat(32),
                                selectors: vec!["unix:uid:1000".into(), "unix:gid:1000".into()],
                            }),
                            ..Default::default()
                        }
                    })
                    .collect();
                let acked = client
                    .push_events(node_pb::PushEventsRequest { spool_id: vec![i as u8; 16], events })
                    .await
                    .unwrap()
                    .into_inner()
                    .acked_seq;
                assert_eq!(acked, seq);
                done.fetch_add(500, Ordering::Relaxed);
            }
        }));
    }
    let rate = measure_rate(&done, &stop, workers, duration).await;
    server.stop();
    rate
}
