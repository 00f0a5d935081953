//! `tessera-bench`: measures Tessera on this machine with real server and
//! agent code on loopback and temp data dirs. Prints a table and, as its last
//! line, one JSON object of results. Scenarios: `fetch`, `propagate`, `all`.
//!
//! ```sh
//! cargo run --release -p tessera-tests --bin tessera-bench -- all
//! ```
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;
use tessera_tests::{entry, my_uid, RunningAgent, TestServer};

const SCENARIOS: &[&str] = &["fetch", "propagate", "all"];

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    let quick = args.iter().any(|a| a == "--quick");
    if !SCENARIOS.contains(&scenario) {
        eprintln!("error: unknown scenario {scenario:?}; choose one of {}", SCENARIOS.join(", "));
        return ExitCode::from(2);
    }
    tessera_server::cli::init_logging("error");
    let mut results: BTreeMap<&str, Value> = BTreeMap::new();
    for key in [
        "issue_svids_per_s",
        "issue_limit_ratio",
        "entries_per_s",
        "restart_100k_s",
        "server_rss_mb",
        "agent_20k_rss_mb",
        "fetch_p99_ms",
        "streams_1000_p99_ms",
        "propagate_p99_ms",
        "revoke_p99_ms",
    ] {
        results.insert(key, Value::Null);
    }
    println!(
        "tessera-bench {scenario} on {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<44} {:>12} {:>12} {:>12}", "measure", "p50", "p99", "n");
    if matches!(scenario, "fetch" | "all") {
        let calls = if quick || scenario == "all" { 2_000 } else { 10_000 };
        let (p50, p99) = bench_fetch(calls).await;
        row("FetchX509SVID first response (ms)", p50, p99, calls);
        results.insert("fetch_p50_ms", json!(round(p50)));
        results.insert("fetch_p99_ms", json!(round(p99)));
    }
    if matches!(scenario, "propagate" | "all") {
        let rounds = if quick || scenario == "all" { 100 } else { 500 };
        let (p50, p99) = bench_propagate(rounds).await;
        row("entry create -> workload stream (ms)", p50, p99, rounds);
        results.insert("propagate_p50_ms", json!(round(p50)));
        results.insert("propagate_p99_ms", json!(round(p99)));
    }
    println!("{}", serde_json::to_string(&results).unwrap_or_default());
    ExitCode::SUCCESS
}

fn row(name: &str, p50: f64, p99: f64, n: usize) {
    println!("{name:<44} {p50:>12.3} {p99:>12.3} {n:>12}");
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// p50 and p99 of durations, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i =
            ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1);
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

async fn setup() -> (tempfile::TempDir, TestServer, RunningAgent) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    (dir, server, agent)
}

/// First-response latency of FetchX509SVID on a warm agent: each call opens a
/// stream on one connection (as SPIFFE clients do), is attested, and gets
/// the cached SVID.
async fn bench_fetch(calls: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server
        .create_entry(
            "spiffe://example.org/bench",
            &agent.id,
            &[&format!("unix:uid:{}", my_uid())],
            None,
        )
        .await;
    fetch_x509(&agent.endpoint()).await.expect("warm-up fetch");
    let mut client = connect_workload_api(&agent.endpoint()).await.unwrap();
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let mut stream =
            client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        samples.push(start.elapsed());
        assert_eq!(first.svids.len(), 1);
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}

/// From the admin `entry create` call to the workload's open stream
/// receiving the new SVID (entry pushed to the agent, signed, streamed).
async fn bench_propagate(rounds: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    let uid = my_uid();
    server
        .create_entry("spiffe://example.org/base", &agent.id, &[&format!("unix:uid:{uid}")], None)
        .await;
    let mut client = connect_workload_api(&agent.endpoint()).await.unwrap();
    let mut stream =
        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let mut admin = server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let id = format!("spiffe://example.org/propagate/{i}");
        let new = entry(&id, &agent.id, &[&format!("unix:uid:{uid}")], None);
        let start = Instant::now();
        let created = admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![new] })
            .await
            .unwrap();
        let entry_id = created.into_inner().results[0].entry.as_ref().unwrap().id.clone();
        loop {
            let update = stream.message().await.unwrap().unwrap();
            if update.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
        samples.push(start.elapsed());
        admin
            .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![entry_id] })
            .await
            .unwrap();
        loop {
            let update = stream.message().await.unwrap().unwrap();
            if !update.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}
