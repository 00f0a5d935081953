//! `fairness`: a new caller's first response (connect, FetchX509SVID, first
//! message, as a freshly started workload does; its executable already
//! known to the agent), alone and then while 8 other callers, each a
//! distinct 8 GiB executable, wait for their executables to be hashed.

use std::time::Instant;

use serde_json::json;
use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::workload as pb;
use tessera_tests::{RunningAgent, TestServer};

use crate::stats::{percentiles, round, row, Figures};
use crate::workload::me;

pub async fn run(quick: bool) -> Figures {
    let calls = if quick { 300 } else { 1_000 };
    let (alone, busy) = fairness(8, calls).await;
    row("new caller's first response, alone (ms)", alone.0, alone.1, calls);
    row("  ... while 8 x 8 GiB executables hash (ms)", busy.0, busy.1, calls);
    vec![
        ("fairness_alone_p99_ms", json!(round(alone.1))),
        ("fairness_p50_ms", json!(round(busy.0))),
        ("fairness_p99_ms", json!(round(busy.1))),
    ]
}

/// A new caller's first response (connect, FetchX509SVID, first message,
/// as a freshly started workload does; its executable already known to the
/// agent), alone and then while `huge` other callers, each a distinct 8 GiB
/// executable (a copy of the system Python with a sparse tail), wait for
/// their executables to be hashed. The hashing limit is raised above 8 GiB
/// so those hashes really run (by default such executables are not hashed).
async fn fairness(huge: usize, calls: usize) -> ((f64, f64), (f64, f64)) {
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
