//! `tessera-bench`: measures Tessera on this machine with real server and
//! agent code on loopback and temp data dirs. Prints a table and, as its last
//! line, one JSON object of results. Scenarios: see `SCENARIOS` (`all` runs each).
//!
//! ```sh
//! cargo run --release -p tessera-tests --bin tessera-bench -- all
//! ```
#![forbid(unsafe_code)]
// A benchmark: a failed step must abort the run rather than report figures
// for work that did not happen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;
use tessera_tests::{entry, my_uid, RunningAgent, TestServer};

const SCENARIOS: &[&str] = &[
    "issue",
    "scale",
    "fetch",
    "propagate",
    "revoke",
    "handshake",
    "fairness",
    "streams",
    "jwt",
    "events",
    "ha",
    "hostile",
    "all",
];

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__server") => return child_server(&args[1..]).await,
        Some("__agent") => return child_agent(&args[1..]).await,
        Some("__workload_flood") => return child_workload_flood(&args[1..]).await,
        Some("__node_attack") => return child_node_attack(&args[1..]).await,
        _ => {}
    }
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    let quick = args.iter().any(|a| a == "--quick");
    if !SCENARIOS.contains(&scenario) {
        eprintln!("error: unknown scenario {scenario:?}; choose one of {}", SCENARIOS.join(", "));
        return ExitCode::from(2);
    }
    tessera_server::cli::init_logging("error", tessera_server::cli::LogFormat::Text);
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
        "jwt_issue_ratio",
        "jwt_fetch_p99_ms",
        "jwt_validate_ratio",
        "jwt_revoke_p99_ms",
        "events_issue_ratio",
        "events_fetch_p99_ratio",
        "events_ingest_per_s",
        "ha_propagate_p99_ms",
        "ha_failover_resume_ms",
    ] {
        results.insert(key, Value::Null);
    }
    println!(
        "tessera-bench {scenario} on {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<44} {:>12} {:>12} {:>12}", "measure", "p50", "p99", "n");
    if matches!(scenario, "issue" | "all") {
        let secs = if quick || scenario == "all" { 5 } else { 15 };
        let (rate, limit) = bench_issue(Duration::from_secs(secs)).await;
        ratio_row("SVIDs/s signed via node API; ring limit; ratio", rate, limit);
        results.insert("issue_svids_per_s", json!(rate.round()));
        results.insert("issue_limit_per_s", json!(limit.round()));
        results.insert("issue_limit_ratio", json!(round(rate / limit)));
    }
    if matches!(scenario, "scale" | "all") {
        let scale = bench_scale(100_000, 1_000, 20_000, 1_000).await;
        for (key, value) in scale {
            results.insert(key, value);
        }
    }
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
    if matches!(scenario, "revoke" | "all") {
        let rounds = if quick || scenario == "all" { 100 } else { 300 };
        let (p50, p99) = bench_revoke_one_agent(rounds).await;
        row("revoke -> replacement on stream, 1 agent (ms)", p50, p99, rounds);
        let (p50_many, p99_many, p50_workload, p99_workload) =
            bench_revoke_many_agents(100, 10, rounds).await;
        row("revoke -> replacement, 100 agents x 10 (ms)", p50_many, p99_many, rounds);
        row("  ... the real agent's workload stream (ms)", p50_workload, p99_workload, rounds / 4);
        results.insert("revoke_p50_ms", json!(round(p50)));
        results.insert("revoke_p99_ms", json!(round(p99.max(p99_many).max(p99_workload))));
        results.insert("revoke_1_agent_p99_ms", json!(round(p99)));
        results.insert("revoke_100_agents_p99_ms", json!(round(p99_many)));
        results.insert("revoke_100_agents_workload_p99_ms", json!(round(p99_workload)));
    }
    if matches!(scenario, "handshake" | "all") {
        let secs = if quick || scenario == "all" { 3 } else { 8 };
        let (live, fixed) = bench_handshakes(Duration::from_secs(secs)).await;
        ratio_row("mTLS handshakes/s on 1 core: source, static", live, fixed);
        results.insert("handshakes_per_s", json!(live.round()));
        results.insert("handshakes_static_per_s", json!(fixed.round()));
        results.insert("handshake_ratio", json!(round(live / fixed)));
    }
    if matches!(scenario, "fairness" | "all") {
        let calls = if quick || scenario == "all" { 300 } else { 1_000 };
        let (alone, busy) = bench_fairness(8, calls).await;
        row("new caller's first response, alone (ms)", alone.0, alone.1, calls);
        row("  ... while 8 x 8 GiB executables hash (ms)", busy.0, busy.1, calls);
        results.insert("fairness_alone_p99_ms", json!(round(alone.1)));
        results.insert("fairness_p50_ms", json!(round(busy.0)));
        results.insert("fairness_p99_ms", json!(round(busy.1)));
    }
    if matches!(scenario, "streams" | "all") {
        let (agent, plain) = bench_streams(1_000).await;
        row("1,000 concurrent streams, agent (ms)", agent.0, agent.1, 1_000);
        row("  ... same tonic server, no attestation (ms)", plain.0, plain.1, 1_000);
        println!(
            "{:<44} {:>12.2} {:>12.2}",
            "  ... ratio agent / plain",
            agent.0 / plain.0,
            agent.1 / plain.1
        );
        results.insert("streams_agent_p50_ms", json!(round(agent.0)));
        results.insert("streams_agent_p99_ms", json!(round(agent.1)));
        results.insert("streams_plain_p50_ms", json!(round(plain.0)));
        results.insert("streams_plain_p99_ms", json!(round(plain.1)));
        results.insert("streams_p99_ratio", json!(round(agent.1 / plain.1)));
    }
    if matches!(scenario, "jwt" | "all") {
        let secs = if quick || scenario == "all" { 5 } else { 10 };
        let (rate, limit) = bench_jwt_issue(Duration::from_secs(secs)).await;
        ratio_row("JWT-SVIDs/s signed via node API; ES256 limit", rate, limit);
        results.insert("jwt_issue_per_s", json!(rate.round()));
        results.insert("jwt_issue_limit_per_s", json!(limit.round()));
        results.insert("jwt_issue_ratio", json!(round(rate / limit)));
        let calls = if quick || scenario == "all" { 2_000 } else { 10_000 };
        let (p50, p99) = bench_jwt_fetch(calls).await;
        row("FetchJWTSVID from the cache (ms)", p50, p99, calls);
        results.insert("jwt_fetch_p50_ms", json!(round(p50)));
        results.insert("jwt_fetch_p99_ms", json!(round(p99)));
        let (rate, limit) = bench_jwt_validate(Duration::from_secs(secs)).await;
        ratio_row("ValidateJWTSVID/s; ES256 verify limit", rate, limit);
        results.insert("jwt_validate_per_s", json!(rate.round()));
        results.insert("jwt_verify_limit_per_s", json!(limit.round()));
        results.insert("jwt_validate_ratio", json!(round(rate / limit)));
        let rounds = if quick || scenario == "all" { 100 } else { 300 };
        let (p50, p99) = bench_jwt_revoke(rounds).await;
        row("JWT revoke -> refused by agent (ms)", p50, p99, rounds);
        results.insert("jwt_revoke_p50_ms", json!(round(p50)));
        results.insert("jwt_revoke_p99_ms", json!(round(p99)));
    }
    if matches!(scenario, "events" | "all") {
        let secs = if quick || scenario == "all" { 3 } else { 6 };
        // Alternating off/on, twice, so that drift of the machine hits both.
        let (mut off, mut on) = (0.0, 0.0);
        for _ in 0..2 {
            let d = Duration::from_secs(secs);
            off += node_api_throughput(d, Signing::X509, false, None).await / 2.0;
            on += node_api_throughput(d, Signing::X509, true, None).await / 2.0;
        }
        ratio_row("X509-SVIDs/s, events on; events off", on, off);
        results.insert("events_issue_on_per_s", json!(on.round()));
        results.insert("events_issue_off_per_s", json!(off.round()));
        results.insert("events_issue_ratio", json!(round(on / off)));
        let calls = if quick || scenario == "all" { 2_000 } else { 10_000 };
        let (off_p50, off_p99) = bench_fetch_events(calls, false).await;
        row("FetchX509SVID, events off (ms)", off_p50, off_p99, calls);
        let (on_p50, on_p99) = bench_fetch_events(calls, true).await;
        row("FetchX509SVID, events on (ms)", on_p50, on_p99, calls);
        // The agent's share: it records and pushes, the server does not store.
        let (a50, a99) = bench_fetch_events_split(calls, true, false).await;
        row("FetchX509SVID, agent events only (ms)", a50, a99, calls);
        results.insert("events_fetch_agent_only_p99_ms", json!(round(a99)));
        results.insert("events_fetch_off_p99_ms", json!(round(off_p99)));
        results.insert("events_fetch_on_p99_ms", json!(round(on_p99)));
        results.insert("events_fetch_p99_ratio", json!(round(on_p99 / off_p99)));
        let rate = bench_event_ingest(Duration::from_secs(secs)).await;
        println!("{:<44} {:>12.0}", "events/s stored from agents' pushes", rate);
        results.insert("events_ingest_per_s", json!(rate.round()));
    }
    if matches!(scenario, "ha" | "all") {
        let quick = quick || scenario == "all";
        for (key, value) in bench_ha(quick).await {
            results.insert(key, value);
        }
    }
    if matches!(scenario, "hostile" | "all") {
        let quick = quick || scenario == "all";
        for (key, value) in bench_hostile(quick).await {
            results.insert(key, value);
        }
    }
    println!("{}", serde_json::to_string(&results).unwrap_or_default());
    ExitCode::SUCCESS
}

/// FetchX509SVID first-response latency with the event stream on or off
/// (server and agent), as [`bench_fetch`] measures it.
async fn bench_fetch_events(calls: usize, events: bool) -> (f64, f64) {
    bench_fetch_events_split(calls, events, events).await
}

/// FetchX509SVID first-response latency with the agent's events on or off
/// and the server storing them or not.
async fn bench_fetch_events_split(calls: usize, events: bool, server_events: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tessera_tests::test_config(&dir.path().join("server"));
    config.events.enabled = server_events;
    let server =
        TestServer::start_with(config, std::sync::Arc::new(tessera_server::SystemClock)).await;
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
async fn bench_event_ingest(duration: Duration) -> f64 {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use tessera_proto::node as node_pb;
    use tessera_proto::types::{Event, Workload};

    let (_dir, server, mut admin, addr, bundle) = child_server_and_admin(true, None).await;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..8 {
        let id = format!("spiffe://example.org/ingest/agent-{i}");
        let token = admin
            .create_join_token(admin_pb::CreateJoinTokenRequest { ttl: 600, spiffe_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let agent =
            tessera_tests::TestAgent::attest_to(addr, bundle.clone(), &token.token).await.unwrap();
        let mut client = agent.connect().await;
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

/// JWT-SVIDs per second through the node API (8 simulated agents, batches
/// of 500, audience "bench"), and the raw ES256 signing rate of ring on
/// every core, measured in the same run.
async fn bench_jwt_issue(duration: Duration) -> (f64, f64) {
    let rate = node_api_throughput(duration, Signing::Jwt, true, None).await;
    (rate, ecdsa_limit(Duration::from_secs(2), Ecdsa::Es256Sign))
}

/// A JWT-SVID request for `audience`, any identity.
fn jwt_request(audience: &str) -> tonic::Request<pb::JwtsvidRequest> {
    cli_request(pb::JwtsvidRequest { audience: vec![audience.into()], spiffe_id: String::new() })
}

/// FetchJWTSVID latency on a warm agent: the token for the audience is
/// cached, so each call is attestation plus a cache read.
async fn bench_jwt_fetch(calls: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let first = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner();
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let response = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner();
        samples.push(start.elapsed());
        assert_eq!(response.svids[0].svid, first.svids[0].svid, "served from the cache");
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}

/// ValidateJWTSVID calls per second on one agent (16 concurrent callers on
/// 4 connections), against ring's ES256 verify rate on every core. The
/// agent, its server and the callers share this machine's cores.
async fn bench_jwt_validate(duration: Duration) -> (f64, f64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let token = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner().svids[0]
        .svid
        .clone();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = connect_workload_api(&agent.endpoint()).await.unwrap();
        for _ in 0..4 {
            let (mut client, done, stop, token) =
                (client.clone(), done.clone(), stop.clone(), token.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = pb::ValidateJwtsvidRequest {
                        audience: "bench".into(),
                        svid: token.clone(),
                    };
                    client.validate_jwtsvid(cli_request(request)).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let (first, start) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(duration).await;
    let rate = (done.load(Ordering::Relaxed) - first) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    agent.stop().await;
    server.stop().await;
    (rate, ecdsa_limit(Duration::from_secs(2), Ecdsa::Es256Verify))
}

/// From the start of `svid revoke --jti` to the workload's agent refusing
/// the token in ValidateJWTSVID (polled back to back). Each round revokes
/// a fresh token (a new audience, so not from the cache).
async fn bench_jwt_revoke(rounds: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // Every round asks for a new audience: more than a uid's default budget.
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.jwt_signings_per_uid = 100_000;
        config.workload_limits.jwt_signing_burst = 100_000;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let mut admin = server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let audience = format!("revoke-{i}");
        let token = client.fetch_jwtsvid(jwt_request(&audience)).await.unwrap().into_inner().svids
            [0]
        .svid
        .clone();
        let claims = tessera_workload_api::jwt::UnverifiedJwt::decode(&token).unwrap();
        let jti = claims.jti().unwrap().to_string();
        let validate =
            || pb::ValidateJwtsvidRequest { audience: audience.clone(), svid: token.clone() };
        client.validate_jwtsvid(cli_request(validate())).await.unwrap();
        let start = Instant::now();
        admin.revoke_svid(admin_pb::RevokeSvidRequest { jti, ..Default::default() }).await.unwrap();
        while client.validate_jwtsvid(cli_request(validate())).await.is_ok() {}
        samples.push(start.elapsed());
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}

/// A new caller's first response (connect, FetchX509SVID, first message,
/// as a freshly started workload does; its executable already known to the
/// agent), alone and then while `huge` other callers, each a distinct 8 GiB
/// executable (a copy of the system Python with a sparse tail), wait for
/// their executables to be hashed. The hashing limit is raised above 8 GiB
/// so those hashes really run (by default such executables are not hashed).
async fn bench_fairness(huge: usize, calls: usize) -> ((f64, f64), (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.hashing.max_bytes = 16 << 30;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    fetch_x509(&agent.endpoint()).await.expect("warm-up fetch");
    let endpoint = agent.endpoint();
    let sample = |calls: usize| {
        let endpoint = endpoint.clone();
        async move {
            let mut samples = Vec::with_capacity(calls);
            for _ in 0..calls {
                let start = Instant::now();
                let mut client = connect_workload_api(&endpoint).await.unwrap();
                let mut stream = client
                    .fetch_x509svid(cli_request(pb::X509svidRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                stream.message().await.unwrap().unwrap();
                samples.push(start.elapsed());
            }
            percentiles(samples)
        }
    };
    let alone = sample(calls).await;

    let python = std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3 is needed");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/raw_h2_fetch.py");
    let mut children = Vec::new();
    for i in 0..huge {
        let exe = dir.path().join(format!("huge-python-{i}"));
        std::fs::copy(&python, &exe).unwrap();
        std::fs::OpenOptions::new().write(true).open(&exe).unwrap().set_len(8 << 30).unwrap();
        let mut child = std::process::Command::new(&exe)
            .arg(&script)
            .arg(&agent.socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "sent");
        children.push(child);
    }
    let busy = sample(calls).await;
    for child in &mut children {
        assert!(child.try_wait().unwrap().is_none(), "a huge caller finished during the run");
        let _ = child.kill();
        let _ = child.wait();
    }
    agent.stop().await;
    server.stop().await;
    (alone, busy)
}

/// 1,000 workloads (one connection each) open FetchX509SVID at once: first
/// response p50/p99 from the real agent, then from the same tonic server type
/// on the same kind of Unix socket serving a response of the same size with
/// no attestation, no `:authority` rewriting and no cache.
async fn bench_streams(streams: usize) -> ((f64, f64), (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.connections_per_uid = 100_000;
        config.workload_limits.streams_per_uid = 100_000;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let (_client, _stream, response) = open_stream(&agent).await;
    let (agent_figures, open) = concurrent_first_responses(&agent.endpoint(), streams).await;
    drop(open);
    agent.stop().await;
    server.stop().await;

    let socket = dir.path().join("plain.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = stop.clone();
    let plain = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                    PlainService(std::sync::Arc::new(response)),
                ),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                serving.cancelled(),
            )
            .await
    });
    let plain_figures =
        concurrent_first_responses(&format!("unix://{}", socket.display()), streams).await.0;
    stop.cancel();
    let _ = plain.await;
    (agent_figures, plain_figures)
}

/// Streams kept open while a figure (RSS) is read.
type OpenStreams = Vec<Box<dyn std::any::Any + Send>>;

/// p50/p99 of the first response of `streams` FetchX509SVID streams opened
/// at once, one connection each (all connected before the clock starts),
/// and the streams, still open.
async fn concurrent_first_responses(endpoint: &str, streams: usize) -> ((f64, f64), OpenStreams) {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(streams));
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let endpoint = endpoint.to_string();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect_workload_api(&endpoint).await.unwrap();
            barrier.wait().await;
            let start = Instant::now();
            let mut stream = client
                .fetch_x509svid(cli_request(pb::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            assert_eq!(first.svids.len(), 1);
            (start.elapsed(), client, stream)
        }));
    }
    let mut samples = Vec::new();
    let mut open = Vec::new();
    for task in tasks {
        let (elapsed, client, stream) = task.await.unwrap();
        samples.push(elapsed);
        open.push(Box::new((client, stream)) as Box<dyn std::any::Any + Send>);
    }
    (percentiles(samples), open)
}

/// The Workload API with nothing behind it: every FetchX509SVID stream gets
/// one fixed response, then stays open until the client leaves.
#[derive(Debug)]
struct PlainService(std::sync::Arc<pb::X509svidResponse>);

type PlainStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi for PlainService {
    type FetchX509SVIDStream = PlainStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        _request: tonic::Request<pb::X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let response = self.0.as_ref().clone();
        tokio::spawn(async move {
            if tx.send(Ok(response)).await.is_ok() {
                tx.closed().await;
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type FetchX509BundlesStream = PlainStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        _request: tonic::Request<pb::X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: tonic::Request<pb::JwtsvidRequest>,
    ) -> Result<tonic::Response<pb::JwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    type FetchJWTBundlesStream = PlainStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _request: tonic::Request<pb::JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: tonic::Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<pb::ValidateJwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }
}

fn row(name: &str, p50: f64, p99: f64, n: usize) {
    println!("{name:<44} {p50:>12.3} {p99:>12.3} {n:>12}");
}

/// A row of two rates and their ratio.
fn ratio_row(name: &str, measured: f64, reference: f64) {
    println!("{name:<44} {measured:>12.0} {reference:>12.0} {:>12.3}", measured / reference);
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

/// The selector that matches this process.
fn me() -> String {
    format!("unix:uid:{}", my_uid())
}

/// A Workload API client on an agent that has already served this process
/// once (its SVIDs are signed and cached).
async fn warm_client(
    agent: &RunningAgent,
) -> tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    fetch_x509(&agent.endpoint()).await.expect("warm-up fetch");
    connect_workload_api(&agent.endpoint()).await.unwrap()
}

/// A warm client, its open FetchX509SVID stream, and the stream's first response.
async fn open_stream(
    agent: &RunningAgent,
) -> (
    tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    >,
    tonic::Streaming<pb::X509svidResponse>,
    pb::X509svidResponse,
) {
    let mut client = warm_client(agent).await;
    let mut stream =
        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    (client, stream, first)
}

/// First-response latency of FetchX509SVID on a warm agent: each call opens a
/// stream on one connection (as SPIFFE clients do), is attested, and gets
/// the cached SVID.
async fn bench_fetch(calls: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let result = fetch_latency(&agent, calls).await;
    agent.stop().await;
    server.stop().await;
    result
}

/// p50 and p99 of `calls` FetchX509SVID first responses on a warm client.
async fn fetch_latency(agent: &RunningAgent, calls: usize) -> (f64, f64) {
    let mut client = warm_client(agent).await;
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let mut stream =
            client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        samples.push(start.elapsed());
        assert_eq!(first.svids.len(), 1);
    }
    percentiles(samples)
}

/// From the admin `entry create` call to the workload's open stream
/// receiving the new SVID (entry pushed to the agent, signed, streamed).
async fn bench_propagate(rounds: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    let result = propagation(&server, &server, &agent, rounds).await;
    agent.stop().await;
    server.stop().await;
    result
}

/// Entry created through `creator` → the new SVID on the open stream of a
/// workload of `agent` (attested to `home`): p50 and p99 over `rounds`.
async fn propagation(
    creator: &TestServer,
    home: &TestServer,
    agent: &RunningAgent,
    rounds: usize,
) -> (f64, f64) {
    home.create_entry("spiffe://example.org/base", &agent.id, &[&me()], None).await;
    let (_client, mut stream, _) = open_stream(agent).await;
    let mut admin = creator.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let id = format!("spiffe://example.org/propagate/{i}");
        let new = entry(&id, &agent.id, &[&me()], None);
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
    percentiles(samples)
}

/// The serial of the first SVID in a Workload API response.
fn first_serial(response: &pb::X509svidResponse) -> String {
    let svid = &response.svids[0];
    tessera_workload_api::X509Svid::from_der(&svid.x509_svid, &svid.x509_svid_key)
        .unwrap()
        .serial_hex()
}

/// From `svid revoke` returning to the workload's stream carrying the
/// replacement SVID (and the CRL naming the old one).
async fn bench_revoke_one_agent(rounds: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/revoked", &agent.id, &[&me()], None).await;
    let (_client, mut stream, first) = open_stream(&agent).await;
    let mut serial = first_serial(&first);
    let mut admin = server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        admin
            .revoke_svid(admin_pb::RevokeSvidRequest {
                serial: serial.clone(),
                reason: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let update = stream.message().await.unwrap().unwrap();
            let next = first_serial(&update);
            if next != serial {
                samples.push(start.elapsed());
                serial = next;
                break;
            }
        }
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}

/// 100 agents with 10 SVIDs each (one real agent with a workload, the rest
/// simulated node API clients that re-issue what is revoked). Every
/// revocation is pushed to all of them; measured at the owning agent (and,
/// for the real one, at its workload's stream).
async fn bench_revoke_many_agents(
    agents: usize,
    per_agent: usize,
    rounds: usize,
) -> (f64, f64, f64, f64) {
    let (_dir, server, agent) = setup().await;
    for j in 0..per_agent {
        let selector = if j == 0 { me() } else { format!("unix:uid:{}", 100_000 + j) };
        server
            .create_entry(&format!("spiffe://example.org/real/w{j}"), &agent.id, &[&selector], None)
            .await;
    }
    let (_client, mut stream, first) = open_stream(&agent).await;
    let mut workload_serial = first_serial(&first);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut simulated = Vec::new();
    for i in 0..agents - 1 {
        simulated
            .push(tessera_tests::SimulatedAgent::start(&server, i, per_agent, tx.clone()).await);
    }
    let mut admin = server.admin().await;
    let (mut many, mut workload) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 4 == 0 {
            let serial = workload_serial.clone();
            admin
                .revoke_svid(admin_pb::RevokeSvidRequest {
                    serial: serial.clone(),
                    reason: "bench".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let start = Instant::now();
            loop {
                let next = first_serial(&stream.message().await.unwrap().unwrap());
                if next != serial {
                    workload.push(start.elapsed());
                    workload_serial = next;
                    break;
                }
            }
            continue;
        }
        let sim = &simulated[round % simulated.len()];
        let serial = {
            let held = sim.serials.lock().unwrap();
            held.values().nth(round % per_agent).cloned().unwrap()
        };
        admin
            .revoke_svid(admin_pb::RevokeSvidRequest {
                serial: serial.clone(),
                reason: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let (old, at) = rx.recv().await.unwrap();
            if old == serial {
                many.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    for sim in simulated {
        sim.stop();
    }
    agent.stop().await;
    server.stop().await;
    let (p50, p99) = percentiles(many);
    let (wp50, wp99) = percentiles(workload);
    (p50, p99, wp50, wp99)
}

/// Full mTLS handshakes per second against a server pinned to one thread
/// (one core), first with the `X509Source`-fed config (live rotation, CRL
/// checks, SPIFFE ID authorization), then with a static rustls config built
/// from the same certificate. Clients run on the other core.
async fn bench_handshakes(duration: Duration) -> (f64, f64) {
    use std::sync::Arc;
    use tessera_workload_api::{client_config, server_config, Authorize, X509Source};

    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/hs-server", &agent.id, &[&me()], None).await;
    server.create_entry("spiffe://example.org/hs-client", &agent.id, &[&me()], None).await;
    let id = |s: &str| s.parse::<tessera_workload_api::SpiffeId>().unwrap();
    let server_source =
        X509Source::connect_as(&agent.endpoint(), Some(id("spiffe://example.org/hs-server")))
            .await
            .unwrap();
    let client_source =
        X509Source::connect_as(&agent.endpoint(), Some(id("spiffe://example.org/hs-client")))
            .await
            .unwrap();
    let client_tls = Arc::new(
        client_config(&client_source, Authorize::exact(id("spiffe://example.org/hs-server")))
            .unwrap(),
    );

    let live =
        server_config(&server_source, Authorize::exact(id("spiffe://example.org/hs-client")))
            .unwrap();
    let svid = server_source.svid().unwrap();
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for ca in server_source.context().unwrap().bundle.iter() {
            roots.add(ca.clone()).unwrap();
        }
        Arc::new(roots)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
    let mut fixed = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            svid.chain().to_vec(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key_pkcs8().to_vec().into()),
        )
        .unwrap();
    fixed.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    fixed.send_tls13_tickets = 0;

    // Alternate the two configs and keep each one's best run, so neither
    // gains from running first or last.
    let (mut live_rate, mut fixed_rate) = (0.0f64, 0.0f64);
    for _ in 0..2 {
        live_rate =
            live_rate.max(handshake_rate(live.clone(), client_tls.clone(), duration / 2).await);
        fixed_rate =
            fixed_rate.max(handshake_rate(fixed.clone(), client_tls.clone(), duration / 2).await);
    }
    drop((server_source, client_source));
    agent.stop().await;
    server.stop().await;
    (live_rate, fixed_rate)
}

async fn handshake_rate(
    config: rustls::ServerConfig,
    client: std::sync::Arc<rustls::ClientConfig>,
    duration: Duration,
) -> f64 {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (server_done, server_stop) = (done.clone(), stop.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // The server: one thread, one current-thread runtime.
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            while !server_stop.load(Ordering::Relaxed) {
                let Ok(Ok((tcp, _))) =
                    tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let done = server_done.clone();
                tokio::spawn(async move {
                    if acceptor.accept(tcp).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let connector = connector.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A full accept backlog can reset a connection: just retry.
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let name = rustls_pki_types::ServerName::try_from("bench").unwrap();
                let _ = connector.connect(name, tcp).await;
            }
        }));
    }
    tokio::time::sleep(duration).await;
    let count = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let _ = thread.join();
    count as f64 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Child processes: a server or an agent alone in its process, so its memory
// can be measured. They run until their stdin closes.

async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

async fn child_server(args: &[String]) -> ExitCode {
    let dir = std::path::PathBuf::from(&args[0]);
    let mut config = tessera_tests::test_config(&dir);
    // The per-agent signing budget protects the server from one agent; it
    // must not cap a throughput measurement.
    config.sign_rate = 10_000_000;
    config.sign_burst = 10_000_000;
    config.events.enabled = !args.iter().any(|a| a == "--no-events");
    config.datastore = args.iter().find_map(|a| a.strip_prefix("--datastore=")).map(str::to_string);
    let server =
        tessera_server::Server::bind(config, std::sync::Arc::new(tessera_server::SystemClock))
            .await
            .expect("server binds");
    println!("READY {}", server.node_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        until_stdin_closes().await;
        stop.cancel();
    });
    server.run(shutdown).await.expect("server runs");
    ExitCode::SUCCESS
}

async fn child_agent(args: &[String]) -> ExitCode {
    let mut config = tessera_agent::AgentConfig::new(args[0].clone().into(), args[1].clone());
    config.socket_path = match args.iter().find_map(|a| a.strip_prefix("--socket=")) {
        Some(path) => path.into(),
        None => std::path::Path::new(&args[0]).join("public/api.sock"),
    };
    if !args.iter().any(|a| a == "--default-limits") {
        // One uid stands in for 1,000 workloads here: lift the per-uid limits.
        config.workload_limits.connections_per_uid = 100_000;
        config.workload_limits.streams_per_uid = 100_000;
    }
    config.join_token = Some(args[2].clone());
    config.trust_bundle = Some(args[3].clone().into());
    let agent = tessera_agent::Agent::start(config).await.expect("agent starts");
    println!("READY {}", agent.socket_path().display());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        until_stdin_closes().await;
        stop.cancel();
    });
    agent.run(shutdown).await.expect("agent runs");
    ExitCode::SUCCESS
}

/// An attacker on the Workload API, run as another uid: `N` connections
/// each holding a FetchX509SVID stream (reopened a second after any
/// refusal or end) until stdin closes.
async fn child_workload_flood(args: &[String]) -> ExitCode {
    let endpoint = args[0].clone();
    let n: usize = args[1].parse().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..n {
        let (endpoint, stop) = (endpoint.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut client) = connect_workload_api(&endpoint).await {
                    if let Ok(response) =
                        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await
                    {
                        let mut stream = response.into_inner();
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = async { while let Ok(Some(_)) = stream.message().await {} } => {}
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    println!("READY {n}");
    until_stdin_closes().await;
    stop.cancel();
    ExitCode::SUCCESS
}

/// An attacker on the node API at `addr` (`hostile` scenario (a), (b) or
/// (c)), until stdin closes; then writes how much it did (connections
/// opened, bytes sent, bogus attestations) to the file named last.
async fn child_node_attack(args: &[String]) -> ExitCode {
    use tessera_tests::hostile::{self, loopback};
    let (kind, addr) = (args[0].as_str(), args[1].parse::<std::net::SocketAddr>().unwrap());
    let bundle: Vec<rustls_pki_types::CertificateDer<'static>> =
        pem::parse_many(std::fs::read(&args[2]).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents().into())
            .collect();
    let sources =
        |net: u8, n: u8| -> Vec<std::net::IpAddr> { (1..=n).map(|h| loopback(net, h)).collect() };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks: Vec<tokio::task::JoinHandle<u64>> = Vec::new();
    match kind {
        "a" => tasks.push(hostile::hold_idle_sockets(addr, sources(10, 32), 1_000, stop.clone())),
        "b" => {
            for source in sources(11, 4).into_iter().cycle().take(64) {
                let (bundle, stop) = (bundle.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut bytes = 0;
                    while !stop.is_cancelled() {
                        let report =
                            hostile::large_frames(addr, &bundle, source, 4 << 20, 32, stop.clone())
                                .await;
                        bytes += report.bytes;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    bytes
                }));
            }
        }
        _ => {
            for source in sources(12, 8) {
                for _ in 0..4 {
                    let (bundle, stop) = (bundle.clone(), stop.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut sent = 0u64;
                        let Ok(mut client) =
                            hostile::certless_client_from(addr, &bundle, source).await
                        else {
                            return 0;
                        };
                        while !stop.is_cancelled() {
                            hostile::bogus_attest(&mut client, sent as usize).await;
                            sent += 1;
                        }
                        sent
                    }));
                }
            }
        }
    }
    println!("READY {kind}");
    until_stdin_closes().await;
    stop.cancel();
    let mut work = 0u64;
    for task in tasks {
        work += task.await.unwrap_or(0);
    }
    let _ = std::fs::write(&args[3], work.to_string());
    ExitCode::SUCCESS
}

/// A child process started in one of the modes above.
struct Child {
    process: std::process::Child,
    ready: String,
}

impl Child {
    fn start(args: &[&str]) -> Self {
        Self::start_as(None, args)
    }

    /// Starts a child as `uid` (and gid) when given.
    fn start_as(uid: Option<u32>, args: &[&str]) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let mut process = command
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("child said {line:?}"))
            .to_string();
        Self { process, ready }
    }

    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    fn stop(mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

async fn admin_at(
    dir: &std::path::Path,
) -> tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel> {
    tessera_server::connect_admin(&dir.join("admin.sock")).await.unwrap()
}

async fn health(
    admin: &mut tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
) -> admin_pb::HealthResponse {
    admin.health(admin_pb::HealthRequest {}).await.unwrap().into_inner()
}

/// Registration at scale, restart, 1,000 connected agents, an agent with
/// 20,000 entries, and 1,000 concurrent Workload API streams on it.
async fn bench_scale(
    entries: usize,
    agents: usize,
    big_agent: usize,
    streams: usize,
) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server_dir_arg = server_dir.display().to_string();
    let server = Child::start(&["__server", &server_dir_arg]);
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
    let server = Child::start(&["__server", &server_dir_arg]);
    let mut admin = admin_at(&server_dir).await;
    let h = health(&mut admin).await;
    let restart = start.elapsed().as_secs_f64();
    assert_eq!(h.entries as usize, entries);
    println!("{:<44} {:>12.2} {:>12} {:>12}", "restart to serving (s)", restart, "", h.entries);
    out.push(("restart_100k_s", json!(round(restart))));

    // 1,000 agents attest and hold their Sync streams (each gets its snapshot).
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle: Vec<rustls_pki_types::CertificateDer<'static>> = admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .map(Into::into)
        .collect();
    let start = Instant::now();
    let mut held = Vec::new();
    let mut simulated = Vec::new();
    for i in 0..agents {
        let token = admin
            .create_join_token(admin_pb::CreateJoinTokenRequest {
                ttl: 600,
                spiffe_id: format!("spiffe://example.org/sim/agent-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        let agent =
            tessera_tests::TestAgent::attest_to(addr, bundle.clone(), &token.token).await.unwrap();
        let mut client = agent.connect().await;
        let mut stream = client
            .sync(tessera_proto::node::SyncRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
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
                let selector = if j == 0 {
                    format!("unix:uid:{}", my_uid())
                } else {
                    format!("unix:uid:{}", 200_000 + j)
                };
                entry(&format!("spiffe://example.org/big/{j}"), big_id, &[&selector], None)
            })
            .collect();
        admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch })
            .await
            .unwrap();
    }
    let token = admin
        .create_join_token(admin_pb::CreateJoinTokenRequest { ttl: 600, spiffe_id: big_id.into() })
        .await
        .unwrap()
        .into_inner();
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, tessera_tests::to_pem(&bundle)).unwrap();
    let agent_dir = dir.path().join("agent").display().to_string();
    let start = Instant::now();
    let agent = Child::start(&[
        "__agent",
        &agent_dir,
        &server.ready,
        &token.token,
        &bundle_path.display().to_string(),
    ]);
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
    out.push(("agent_20k_rss_mb", json!(round(agent_rss))));
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

/// SVIDs signed per second through the node API by 8 concurrent agents
/// (batches of 500, as agents send them; CSRs made in advance), against the machine's raw limit:
/// one ECDSA P-256 signature plus one verification per SVID, with ring, on
/// every core.
async fn bench_issue(duration: Duration) -> (f64, f64) {
    let rate = node_api_throughput(duration, Signing::X509, true, None).await;
    (rate, ecdsa_limit(Duration::from_secs(2), Ecdsa::SignAndVerify))
}

/// A server in its own process (events on or off), an admin client on it,
/// its node API address and its bundle.
async fn child_server_and_admin(
    events: bool,
    datastore: Option<&str>,
) -> (
    tempfile::TempDir,
    Child,
    tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    std::net::SocketAddr,
    Vec<rustls_pki_types::CertificateDer<'static>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let dir_arg = server_dir.display().to_string();
    let mut args = vec!["__server", dir_arg.as_str()];
    if !events {
        args.push("--no-events");
    }
    let datastore_arg = datastore.map(|url| format!("--datastore={url}"));
    args.extend(datastore_arg.as_deref());
    let server = Child::start(&args);
    let mut admin = admin_at(&server_dir).await;
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle = admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .map(Into::into)
        .collect();
    (dir, server, admin, addr, bundle)
}

/// The rate at which `done` grows over `duration` after a 0.5 s warm-up;
/// then stops the workers.
async fn measure_rate(
    done: &std::sync::atomic::AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
    workers: Vec<tokio::task::JoinHandle<()>>,
    duration: Duration,
) -> f64 {
    use std::sync::atomic::Ordering;
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let (first, start) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(duration).await;
    let rate = (done.load(Ordering::Relaxed) - first) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    rate
}

/// What the simulated agents of [`node_api_throughput`] have signed.
#[derive(Debug, Clone, Copy)]
enum Signing {
    X509,
    Jwt,
}

/// The requests one simulated agent sends over and over.
#[derive(Clone)]
enum Batch {
    X509(tessera_proto::node::SignX509Request),
    Jwt(tessera_proto::node::SignJwtRequest),
}

/// SVIDs signed per second by 8 simulated agents (each attested through
/// the real node API, with 500 entries, sending one batch of 500 after
/// another) against a server in its own process, after a 0.5 s warm-up.
async fn node_api_throughput(
    duration: Duration,
    signing: Signing,
    events: bool,
    datastore: Option<&str>,
) -> f64 {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use tessera_proto::node as node_pb;

    let (_dir, server, mut admin, addr, bundle) = child_server_and_admin(events, datastore).await;
    let (agents, batch) = (8, 500);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..agents {
        let id = format!("spiffe://example.org/issue/agent-{i}");
        let token = admin
            .create_join_token(admin_pb::CreateJoinTokenRequest { ttl: 600, spiffe_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let entries = (0..batch)
            .map(|j| {
                entry(
                    &format!("spiffe://example.org/issue/{i}/{j}"),
                    &id,
                    &[&format!("unix:uid:{}", j + 1)],
                    None,
                )
            })
            .collect();
        let created = admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries })
            .await
            .unwrap()
            .into_inner();
        let ids = created.results.into_iter().map(|r| r.entry.unwrap().id);
        let request = match signing {
            Signing::X509 => Batch::X509(node_pb::SignX509Request {
                items: ids
                    .map(|entry_id| node_pb::SignX509Item {
                        entry_id,
                        csr: tessera_tests::key_and_csr().1,
                    })
                    .collect(),
            }),
            Signing::Jwt => Batch::Jwt(node_pb::SignJwtRequest {
                items: ids
                    .map(|entry_id| node_pb::SignJwtItem {
                        entry_id,
                        audience: vec!["bench".into()],
                    })
                    .collect(),
            }),
        };
        let agent =
            tessera_tests::TestAgent::attest_to(addr, bundle.clone(), &token.token).await.unwrap();
        let mut client = agent.connect().await;
        let (done, stop) = (done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let ok =
                |status: Option<&tessera_proto::types::Status>| status.is_some_and(|s| s.code == 0);
            while !stop.load(Ordering::Relaxed) {
                let signed = match request.clone() {
                    Batch::X509(request) => {
                        let results = client.sign_x509(request).await.unwrap().into_inner().results;
                        results.iter().filter(|r| ok(r.status.as_ref())).count()
                    }
                    Batch::Jwt(request) => {
                        let results = client.sign_jwt(request).await.unwrap().into_inner().results;
                        results.iter().filter(|r| ok(r.status.as_ref())).count()
                    }
                };
                done.fetch_add(signed as u64, Ordering::Relaxed);
            }
        }));
    }
    let rate = measure_rate(&done, &stop, workers, duration).await;
    server.stop();
    rate
}

/// What [`ecdsa_limit`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ecdsa {
    /// A P-256 signature plus its verification over a TBSCertificate-sized
    /// message (DER signatures): what issuing an X509-SVID costs at least.
    SignAndVerify,
    /// ES256 signatures (fixed-length) over a JWT-sized signing input.
    Es256Sign,
    /// ES256 verifications.
    Es256Verify,
}

/// Operations per second with ring on every core.
fn ecdsa_limit(duration: Duration, op: Ecdsa) -> f64 {
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    let (signing, verifying, size) = match op {
        Ecdsa::SignAndVerify => (&ECDSA_P256_SHA256_ASN1_SIGNING, &ECDSA_P256_SHA256_ASN1, 600),
        Ecdsa::Es256Sign | Ecdsa::Es256Verify => {
            (&ECDSA_P256_SHA256_FIXED_SIGNING, &ECDSA_P256_SHA256_FIXED, 250)
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let rng = SystemRandom::new();
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
                let key = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
                let public = UnparsedPublicKey::new(verifying, key.public_key().as_ref().to_vec());
                let message = vec![7u8; size];
                let signature = key.sign(&rng, &message).unwrap();
                let (start, mut ops) = (Instant::now(), 0u64);
                while start.elapsed() < duration {
                    match op {
                        Ecdsa::SignAndVerify => {
                            let signature = key.sign(&rng, &message).unwrap();
                            public.verify(&message, signature.as_ref()).unwrap();
                        }
                        Ecdsa::Es256Sign => drop(key.sign(&rng, &message).unwrap()),
                        Ecdsa::Es256Verify => public.verify(&message, signature.as_ref()).unwrap(),
                    }
                    ops += 1;
                }
                ops as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// Several servers on PostgreSQL: the store's cost against sled, push
/// across servers, agent failover, and 1,000 agents over two servers. The
/// PostgreSQL cluster is private, local and durable (fsync on), like sled.
async fn bench_ha(quick: bool) -> Vec<(&'static str, Value)> {
    use tessera_tests::pg_cluster::PgCluster;
    let mut out = Vec::new();
    let cluster = PgCluster::start_with(true).expect("a PostgreSQL cluster for the bench");

    // The store alone: entries and SVIDs per second, sled and PostgreSQL in the same run.
    let entries = if quick { 10_000 } else { 50_000 };
    let secs = if quick { 3 } else { 8 };
    let mut rates = Vec::new();
    for (name, url) in [("sled", None), ("postgres", Some(cluster.database()))] {
        let (_dir, server, mut admin, _, _) = child_server_and_admin(true, url.as_deref()).await;
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
                .await;
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
        loop {
            let update = stream.message().await.unwrap().unwrap();
            if update.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
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

/// The `hostile` scenario: a server and an agent in their own processes,
/// and, one after another, four attackers without credentials; beside each,
/// the same figures with no attacker: a normal agent's attestation time
/// (connect, TLS, Attest), a normal workload's FetchX509SVID p99, the
/// server's RSS. Attackers use loopback addresses other than 127.0.0.1
/// (other machines); the normal agent and workload use 127.0.0.1 and this
/// process's uid.
async fn bench_hostile(quick: bool) -> Vec<(&'static str, Value)> {
    use tessera_tests::hostile;
    let mut out = Vec::new();
    let calls = if quick { 300 } else { 2_000 };
    let dir = tempfile::tempdir().unwrap();
    // uid 65534 must reach the agent's public socket directory.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let server_dir = dir.path().join("server");
    let server = Child::start(&["__server", &server_dir.display().to_string()]);
    let mut admin = admin_at(&server_dir).await;
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle: Vec<rustls_pki_types::CertificateDer<'static>> = admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .map(Into::into)
        .collect();
    let agent_id = "spiffe://example.org/hostile/agent";
    let token = admin
        .create_join_token(admin_pb::CreateJoinTokenRequest {
            ttl: 600,
            spiffe_id: agent_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, tessera_tests::to_pem(&bundle)).unwrap();
    let socket = dir.path().join("public/api.sock");
    let agent = Child::start(&[
        "__agent",
        &dir.path().join("agent").display().to_string(),
        &server.ready,
        &token.token,
        &bundle_path.display().to_string(),
        &format!("--socket={}", socket.display()),
        "--default-limits",
    ]);
    admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest {
            entries: vec![entry("spiffe://example.org/hostile/workload", agent_id, &[&me()], None)],
        })
        .await
        .unwrap();
    let endpoint = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetch_x509(&endpoint).await.is_err() {
        assert!(Instant::now() < deadline, "the workload never got its SVID");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A normal agent attesting: `rounds` times, each with a fresh token.
    async fn attestations(
        admin: &mut tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
        addr: std::net::SocketAddr,
        bundle: &[rustls_pki_types::CertificateDer<'static>],
        rounds: usize,
    ) -> (f64, usize) {
        let mut worst = Duration::ZERO;
        let mut failed = 0;
        for _ in 0..rounds {
            let token = admin
                .create_join_token(admin_pb::CreateJoinTokenRequest {
                    ttl: 600,
                    spiffe_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            let start = Instant::now();
            let attested = tokio::time::timeout(
                Duration::from_secs(10),
                tessera_tests::TestAgent::attest_to(addr, bundle.to_vec(), &token.token),
            )
            .await;
            worst = worst.max(start.elapsed());
            if !matches!(attested, Ok(Ok(_))) {
                failed += 1;
            }
        }
        (worst.as_secs_f64() * 1000.0, failed)
    }
    async fn fetch_p99(endpoint: &str, calls: usize) -> f64 {
        let mut client = connect_workload_api(endpoint).await.unwrap();
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let first = async {
                let mut stream =
                    client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await?.into_inner();
                stream.message().await
            };
            match tokio::time::timeout(Duration::from_secs(10), first).await {
                Ok(Ok(Some(_))) => samples.push(start.elapsed()),
                _ => samples.push(Duration::from_secs(10)),
            }
        }
        percentiles(samples).1
    }
    // Refused attestations are `node.attest` events (the workload's
    // fetches add `workload.x509` events of their own).
    let attest_events =
        |admin: &mut tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel>| {
            let mut admin = admin.clone();
            async move { hostile::events_of_kind(&mut admin, "node.attest").await.len() as u64 }
        };
    let store_bytes = |dir: &std::path::Path| -> u64 {
        fn walk(path: &std::path::Path) -> u64 {
            std::fs::read_dir(path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| match e.metadata() {
                            Ok(m) if m.is_dir() => walk(&e.path()),
                            Ok(m) => m.len(),
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&dir.join("store"))
    };

    let rounds = 5;
    // What the normal attestations commit (token, its use, the agent) and
    // record, to tell the bogus ones' share apart under attack (c).
    let (writes, recorded) = (hostile::write_seq(&server_dir), attest_events(&mut admin).await);
    let (attest_calm, failed_calm) = attestations(&mut admin, addr, &bundle, rounds).await;
    let normal_writes = hostile::write_seq(&server_dir) - writes;
    let normal_events = attest_events(&mut admin).await - recorded;
    let fetch_calm = fetch_p99(&endpoint, calls).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_calm = server.rss_mb();
    let agent_rss_calm = agent.rss_mb();
    row("hostile: calm attestation, worst of 5 (ms)", attest_calm, attest_calm, rounds);
    row("hostile: calm FetchX509SVID p99 (ms)", fetch_calm, fetch_calm, calls);
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "hostile: calm RSS MB, server; agent", rss_calm, agent_rss_calm
    );
    out.push(("hostile_attest_calm_ms", json!(round(attest_calm))));
    out.push(("hostile_fetch_p99_calm_ms", json!(round(fetch_calm))));
    out.push(("hostile_server_rss_calm_mb", json!(round(rss_calm))));
    let mut warnings = Vec::new();
    if failed_calm > 0 {
        warnings.push(format!("{failed_calm} of {rounds} attestations failed with no attacker"));
    }

    for attack in ["a", "b", "c", "d"] {
        let mut flood = None;
        let work_file = dir.path().join(format!("attack-{attack}.count"));
        let (label, before) = match attack {
            "a" => ("(a) 1,000 idle TCP sockets", None),
            "b" => ("(b) 64 certless TLS conns, large frames", None),
            "c" => {
                let before = (
                    hostile::write_seq(&server_dir),
                    attest_events(&mut admin).await,
                    store_bytes(&server_dir),
                );
                ("(c) bogus Attest flood, 8 addresses", Some(before))
            }
            _ => {
                flood =
                    Some(Child::start_as(Some(65534), &["__workload_flood", &endpoint, "1000"]));
                ("(d) uid 65534: 1,000 Workload API conns", None)
            }
        };
        // The attacker is a process of its own, as it would be.
        let attacker = (attack != "d").then(|| {
            Child::start(&[
                "__node_attack",
                attack,
                &server.ready,
                &bundle_path.display().to_string(),
                &work_file.display().to_string(),
            ])
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sampling = tokio_util::sync::CancellationToken::new();
        let pid = server.process.id();
        let agent_pid = agent.process.id();
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let (mut peak, mut agent_peak) = (0.0f64, 0.0f64);
                while !sampling.is_cancelled() {
                    peak = peak.max(hostile::rss_mb(pid));
                    agent_peak = agent_peak.max(hostile::rss_mb(agent_pid));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (peak, agent_peak)
            })
        };
        let (attest, failed) = attestations(&mut admin, addr, &bundle, rounds).await;
        let fetch = fetch_p99(&endpoint, calls).await;
        sampling.cancel();
        let (rss, agent_rss) = sampler.await.unwrap();
        if let Some(flood) = flood {
            flood.stop();
        }
        let work: u64 = match attacker {
            Some(attacker) => {
                attacker.stop();
                std::fs::read_to_string(&work_file).ok().and_then(|w| w.parse().ok()).unwrap_or(0)
            }
            None => 0,
        };
        println!("{label}");
        row("  attestation under attack, worst of 5 (ms)", attest, attest, rounds);
        row("  FetchX509SVID p99 under attack (ms)", fetch, fetch, calls);
        println!(
            "{:<44} {:>12.1} {:>12.1} {:>12.2}",
            "  RSS MB, server; agent; server / calm",
            rss,
            agent_rss,
            rss / rss_calm
        );
        let key = |what: &str| -> &'static str {
            Box::leak(format!("hostile_{attack}_{what}").into_boxed_str())
        };
        out.push((key("attest_ms"), json!(round(attest))));
        out.push((key("fetch_p99_ms"), json!(round(fetch))));
        out.push((key("fetch_p99_ratio"), json!(round(fetch / fetch_calm))));
        out.push((key("server_rss_mb"), json!(round(rss))));
        out.push((key("server_rss_ratio"), json!(round(rss / rss_calm))));
        out.push((key("agent_rss_mb"), json!(round(agent_rss))));
        if failed > 0 || attest >= 2_000.0 {
            warnings.push(format!(
                "{label}: attestation {attest:.0} ms, {failed} of {rounds} failed (target < 2 s)"
            ));
        }
        if fetch >= 3.0 * fetch_calm {
            warnings.push(format!(
                "{label}: fetch p99 {fetch:.2} ms is {:.1}x calm (target < 3x)",
                fetch / fetch_calm
            ));
        }
        if rss >= 2.0 * rss_calm {
            warnings.push(format!(
                "{label}: server RSS {rss:.0} MB is {:.1}x calm (target < 2x)",
                rss / rss_calm
            ));
        }
        if let Some((writes, events_before, bytes_before)) = before {
            // Refusals are folded into one event per address per interval.
            tokio::time::sleep(REFUSAL_FOLD_INTERVAL + Duration::from_secs(1)).await;
            let writes_added =
                (hostile::write_seq(&server_dir) - writes).saturating_sub(normal_writes);
            let events_added =
                (attest_events(&mut admin).await - events_before).saturating_sub(normal_events);
            let bytes_after = store_bytes(&server_dir);
            println!(
                "{:<44} {:>12} {:>12} {:>12}",
                "  bogus Attests; their commits; their events", work, writes_added, events_added
            );
            // The database file also holds the event log, which the normal
            // workload's fetches add to meanwhile.
            println!(
                "{:<44} {:>12} {:>12}",
                "  store dir bytes before; after (all events)", bytes_before, bytes_after
            );
            out.push(("hostile_bogus_attests", json!(work)));
            out.push(("hostile_bogus_store_commits", json!(writes_added)));
            out.push(("hostile_bogus_events_added", json!(events_added)));
            out.push(("hostile_store_bytes_before", json!(bytes_before)));
            out.push(("hostile_store_bytes_after", json!(bytes_after)));
            if writes_added > 0 {
                warnings.push(format!(
                    "{label}: the store took {writes_added} commits for {work} bogus Attests (target: none)"
                ));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "hostile targets", "attest < 2s", "p99 < 3x", "RSS < 2x"
    );
    for warning in &warnings {
        println!("WARNING hostile: {warning}");
    }
    out.push(("hostile_warnings", json!(warnings.len())));
    agent.stop();
    server.stop();
    out
}

/// How long the server folds refused attestations into one event (its
/// `node::ATTEST_REFUSAL_INTERVAL`).
const REFUSAL_FOLD_INTERVAL: Duration = Duration::from_secs(10);
