//! One local user cannot stall the Workload API for others: executable
//! hashing happens off the shared attestation path (bounded, once per
//! executable version), and each uid's connections and streams are limited
//! (streams refused with `ResourceExhausted`, connections closed at accept).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{raw_client, uid_selector, within, PROMPTLY};
use tessera_agent::{cli_request, fetch_x509};
use tessera_proto::workload as pb;
use tessera_tests::{RunningAgent, TestServer};
use tonic::Code;

/// Processes killed when the test ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A copy of the system Python at `path` made 8 GiB long (a sparse tail
/// after the ELF contents: it still runs).
fn huge_python(path: &Path) {
    let python = std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3 is needed");
    std::fs::copy(&python, path).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(8 << 30).unwrap();
}

fn raw_h2_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/raw_h2_fetch.py")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_caller_is_served_while_huge_executables_are_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // A limit above the huge files' size, so they really are hashed (the
    // default limit, 256 MiB, would skip them; see the attestor's tests).
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.hashing.max_bytes = 16 << 30;
    })
    .await;
    server.create_entry("spiffe://example.org/normal", &agent.id, &[&uid_selector()], None).await;
    // The normal caller has been seen before: its executable's hash is known.
    fetch_x509(&agent.endpoint()).await.unwrap();

    // Eight callers, each a distinct 8 GiB executable; hashing them all
    // takes tens of seconds on two hashing threads.
    let mut huge = Children(Vec::new());
    let mut outputs = Vec::new();
    for i in 0..8 {
        let exe = dir.path().join(format!("huge-python-{i}"));
        huge_python(&exe);
        let mut child = Command::new(&exe)
            .arg(raw_h2_script())
            .arg(&agent.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        outputs.push(BufReader::new(child.stdout.take().unwrap()));
        huge.0.push(child);
    }
    let outputs = within(
        PROMPTLY,
        "the huge callers to send their requests",
        tokio::task::spawn_blocking(move || {
            for output in &mut outputs {
                let mut line = String::new();
                output.read_line(&mut line).unwrap();
                assert_eq!(line.trim(), "sent");
            }
            outputs
        }),
    )
    .await
    .unwrap();

    // A new connection of the normal caller is served now, while all the
    // huge callers are still waiting for their executables' hashes.
    let svids =
        within(PROMPTLY, "the normal caller's SVID", fetch_x509(&agent.endpoint())).await.unwrap();
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/normal");
    for (i, child) in huge.0.iter_mut().enumerate() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "huge caller {i} was answered before the normal caller: its hash did not take long \
             enough for this test to show anything"
        );
    }
    drop(outputs);
    drop(huge);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_uid_limit_get_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.streams_per_uid = 3;
    })
    .await;
    server.create_entry("spiffe://example.org/w", &agent.id, &[&uid_selector()], None).await;

    // Three open streams, across two connections and both streaming methods.
    let mut first = raw_client(&agent.socket).await;
    let mut second = raw_client(&agent.socket).await;
    let mut open = Vec::new();
    for use_first in [true, false, true] {
        let client = if use_first { &mut first } else { &mut second };
        let mut stream =
            client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        open.push(stream);
    }
    let refused = second.fetch_x509_bundles(cli_request(pb::X509BundlesRequest {})).await;
    let Err(status) = refused else { panic!("a fourth stream must be refused") };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many Workload API streams for uid"), "{status:?}");
    assert!(status.message().contains("limit 3"), "{status:?}");

    // Closing one stream makes room again.
    drop(open.pop());
    within(PROMPTLY, "a stream to be accepted after one closed", async {
        loop {
            match second.fetch_x509_bundles(cli_request(pb::X509BundlesRequest {})).await {
                Ok(response) => return response,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

/// Connections past the limit are closed at accept (nothing of them is
/// read or decoded): the client sees its connection fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_uid_limit_are_closed_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.connections_per_uid = 2;
    })
    .await;
    server.create_entry("spiffe://example.org/w", &agent.id, &[&uid_selector()], None).await;

    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut client = raw_client(&agent.socket).await;
        let mut stream =
            client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        kept.push((client, stream));
    }
    // The connection is accepted by the kernel, then closed by the agent.
    let third = fetch_x509(&agent.endpoint()).await;
    assert!(third.is_err(), "a third connection must be closed");
    // The two kept connections are still served.
    for (client, _) in &mut kept {
        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap();
    }
    agent.stop().await;
    server.stop().await;
}

/// A workload that keeps asking for JWT-SVIDs for new audiences is held to
/// its uid's signing budget (`ResourceExhausted`, naming the limit), so it
/// cannot use up the agent's budget at the server; tokens already cached
/// are still served, and the budget refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_signings_past_the_uid_budget_get_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.jwt_signings_per_uid = 2;
        config.workload_limits.jwt_signing_burst = 3;
    })
    .await;
    server.create_entry("spiffe://example.org/w", &agent.id, &[&uid_selector()], None).await;
    let mut client = raw_client(&agent.socket).await;
    let fetch = |audience: &str| {
        cli_request(pb::JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        })
    };
    // The agent may not have the entry at the very first call.
    let first = within(PROMPTLY, "the first JWT-SVID", async {
        loop {
            match client.fetch_jwtsvid(fetch("a")).await {
                Ok(response) => return response.into_inner(),
                Err(status) if status.code() == Code::PermissionDenied => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    client.fetch_jwtsvid(fetch("b")).await.unwrap();
    client.fetch_jwtsvid(fetch("c")).await.unwrap();
    let status = client.fetch_jwtsvid(fetch("d")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit 2/s, burst 3"), "{status:?}");
    // A cached token costs nothing.
    let again = client.fetch_jwtsvid(fetch("a")).await.unwrap().into_inner();
    assert_eq!(again.svids[0].svid, first.svids[0].svid);
    // The budget refills (2 per second).
    within(PROMPTLY, "the budget to refill", async {
        while client.fetch_jwtsvid(fetch("d")).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    agent.stop().await;
    server.stop().await;
}
