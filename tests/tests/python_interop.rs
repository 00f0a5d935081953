//! Interop with Python clients, each with default settings, against a real
//! server and agent: py-spiffe's `WorkloadApiClient` and `X509Source`, and a
//! plain `grpcio` stub. gRPC C-core sends the socket path as `:authority`;
//! these tests are what proves the agent serves it.
//!
//! They need a Python with py-spiffe and grpcio: `scripts/test.sh` creates
//! one in `target/py-venv` (or set `TESSERA_PYTHON`). Without it they fail
//! and say so, unless `TESSERA_SKIP_PYTHON=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use common::{uid_selector, within, PROMPTLY};
use serde_json::Value;
use tessera_agent::fetch_x509;
use tessera_proto::admin::RevokeSvidRequest;
use tessera_tests::{RunningAgent, TestServer};

/// The Python to run the scripts with, or `None` when the tests are to be
/// skipped (`TESSERA_SKIP_PYTHON=1`). Panics, loudly, when it is missing.
fn python() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let python = std::env::var_os("TESSERA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/py-venv/bin/python"));
    let usable = Command::new(&python)
        .args(["-c", "import spiffe, grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return Some(python);
    }
    if std::env::var("TESSERA_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: no Python with py-spiffe and grpcio at {}", python.display());
        return None;
    }
    panic!(
        "no Python with py-spiffe and grpcio at {}: run scripts/test.sh (it creates \
         target/py-venv), set TESSERA_PYTHON, or set TESSERA_SKIP_PYTHON=1 to skip the \
         Python interop tests",
        python.display()
    );
}

/// A running script; killed if the test ends first.
struct Script {
    child: Child,
    lines: Option<BufReader<ChildStdout>>,
}

impl Script {
    fn start(python: &Path, script: &str, agent: &RunningAgent) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let mut child = Command::new(python)
            .arg(dir.join(script))
            .current_dir(&dir)
            .env("SPIFFE_ENDPOINT_SOCKET", agent.endpoint())
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        let lines = child.stdout.take().map(BufReader::new);
        Self { child, lines }
    }

    /// The script's next JSON line.
    async fn next_json(&mut self, what: &str) -> Value {
        let mut lines = self.lines.take().unwrap();
        let (lines, line) = within(
            PROMPTLY * 2,
            what,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                let read = lines.read_line(&mut line);
                (lines, read.map(|_| line))
            }),
        )
        .await
        .unwrap();
        self.lines = Some(lines);
        let line = line.unwrap();
        if line.is_empty() {
            let status = self.child.wait().unwrap();
            panic!("the script ended ({status}) before {what}; see its stderr above");
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line:?}"))
    }

    async fn succeeds(mut self) {
        let status = within(PROMPTLY, "the script to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(status.success(), "the script failed: {status}");
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn server_and_agent(dir: &Path) -> (TestServer, RunningAgent) {
    let server = TestServer::start(&dir.join("server")).await;
    let agent = RunningAgent::start(&server, &dir.join("agent")).await;
    server.create_entry("spiffe://example.org/python", &agent.id, &[&uid_selector()], None).await;
    (server, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetch_x509_context() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = server_and_agent(dir.path()).await;
    let served = fetch_x509(&agent.endpoint()).await.unwrap();

    let mut script = Script::start(&python, "fetch_x509_context.py", &agent);
    let context = script.next_json("py-spiffe's X509 context").await;
    script.succeeds().await;
    assert_eq!(context["spiffe_id"], "spiffe://example.org/python");
    assert_eq!(context["serial"], served[0].serial.as_str(), "the agent's cached SVID");
    assert_eq!(context["svids"], 1);
    assert_eq!(context["bundle_trust_domains"], serde_json::json!(["example.org"]));
    assert!(context["bundle_authorities"].as_u64().unwrap() >= 1, "{context}");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_x509_source_sees_rotation() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = server_and_agent(dir.path()).await;

    let mut script = Script::start(&python, "x509_source_rotation.py", &agent);
    let initial = script.next_json("X509Source's first SVID").await;
    assert_eq!(initial["spiffe_id"], "spiffe://example.org/python");
    let first = initial["serial"].as_str().unwrap().to_string();
    // Revoking the served SVID makes the agent re-issue it: a rotation.
    server
        .admin()
        .await
        .revoke_svid(RevokeSvidRequest {
            serial: first.clone(),
            reason: "interop test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rotated = script.next_json("X509Source to see the rotation").await;
    script.succeeds().await;
    assert_eq!(rotated["event"], "rotated");
    assert_eq!(rotated["spiffe_id"], "spiffe://example.org/python");
    assert_ne!(rotated["serial"], first.as_str());
    let served = fetch_x509(&agent.endpoint()).await.unwrap();
    assert_eq!(rotated["serial"], served[0].serial.as_str(), "the source holds the new SVID");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_default_stub_fetches_x509_svid() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = server_and_agent(dir.path()).await;

    let mut script = Script::start(&python, "grpcio_stub.py", &agent);
    let result = script.next_json("the grpcio stub's FetchX509SVID").await;
    script.succeeds().await;
    assert_eq!(result["spiffe_ids"], serde_json::json!(["spiffe://example.org/python"]));
    assert!(result["chain_bytes"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["without_header"], "INVALID_ARGUMENT");
    agent.stop().await;
    server.stop().await;
}

/// py-spiffe's JWT calls against a real agent: `fetch_jwt_svid` (twice: the
/// agent's cached token both times), `fetch_jwt_bundles`,
/// `validate_jwt_svid` through the agent and `JwtSvid.parse_and_validate`
/// offline with the fetched bundle; both validations refuse the token for
/// another audience, and asking for an identity the caller does not have
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_jwt_svid_calls() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = server_and_agent(dir.path()).await;

    let mut script = Script::start(&python, "jwt_svid.py", &agent);
    let result = script.next_json("py-spiffe's JWT-SVID calls").await;
    script.succeeds().await;
    assert_eq!(result["spiffe_id"], "spiffe://example.org/python");
    assert_eq!(result["audience"], serde_json::json!(["api"]));
    assert_eq!(result["same_token_again"], true, "the second fetch is served from the cache");
    assert_eq!(result["bundle_trust_domains"], serde_json::json!(["example.org"]));
    assert!(result["bundle_keys"].as_u64().unwrap() >= 1, "{result}");
    assert_eq!(result["parsed_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(result["validated_spiffe_id"], "spiffe://example.org/python");
    assert_eq!(result["wrong_audience_validate"], "ValidateJwtSvidError", "{result}");
    assert!(result["wrong_audience_parse"].is_string(), "{result}");
    assert_eq!(result["no_identity_subject"], "FetchJwtSvidError", "{result}");
    agent.stop().await;
    server.stop().await;
}
