//! Helpers shared by the end-to-end test files (each test binary uses a
//! subset). Serials are derived here independently of the product code, so
//! a wrong serial in Tessera cannot hide behind the same wrong helper.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use spiffe::{WorkloadApiClient, X509Source};
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_tests::{my_uid, RunningAgent};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long anything that should take milliseconds may take before a test fails.
pub const PROMPTLY: Duration = Duration::from_secs(30);

/// Runs `future`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The selector that matches this test process.
pub fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// A `spiffe` crate `X509Source` on the agent's socket, built once its
/// initial sync is done (it retries while the agent does not have the entry yet).
pub async fn x509_source(agent: &RunningAgent) -> X509Source {
    X509Source::builder()
        .endpoint(agent.endpoint())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .initial_sync_timeout(PROMPTLY)
        .build()
        .await
        .unwrap_or_else(|e| panic!("X509Source on {} did not sync: {e} ({e:?})", agent.endpoint()))
}

/// A `spiffe` crate Workload API client on the agent's socket.
pub async fn workload_client(agent: &RunningAgent) -> WorkloadApiClient {
    within(
        PROMPTLY,
        "connecting to the Workload API",
        WorkloadApiClient::connect_to(agent.endpoint()),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to {}: {e}", agent.endpoint()))
}

/// A generated Workload API client that adds no metadata by itself.
pub async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    let socket: PathBuf = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connects to the Workload API socket");
    SpiffeWorkloadApiClient::new(channel)
}

/// A certificate's serial as Tessera writes it: lowercase hex, no leading zero bytes.
pub fn serial_hex(cert_der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).expect("the certificate parses");
    trimmed_hex(cert.raw_serial())
}

/// The serials the server lists as revoked.
pub async fn revoked_serials(
    server: &tessera_tests::TestServer,
) -> std::collections::BTreeSet<String> {
    server
        .admin()
        .await
        .list_revocations(tessera_proto::admin::ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .revocations
        .into_iter()
        .map(|r| r.serial)
        .collect()
}

/// A certificate's NotAfter, Unix seconds.
pub fn not_after_unix(cert_der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).expect("the certificate parses");
    cert.validity().not_after.timestamp()
}

/// Lowercase hex of serial bytes, leading zero bytes removed (one kept).
pub fn trimmed_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// The `tessera-server` binary `cargo test --workspace` built (built here
/// when this test runs alone).
pub fn server_bin() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let bin = deps.parent().unwrap().parent().unwrap().join("tessera-server");
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "tessera-server", "--bin", "tessera-server"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "building tessera-server failed");
    }
    bin
}

/// Set to `1` to let a test whose claim needs root (running processes as
/// other uids) pass without root, skipping that part and saying so.
/// Without it such a test fails when not run as root: a skipped check must
/// never pass as a proven one.
pub const ALLOW_SKIP: &str = "TESSERA_TESTS_ALLOW_SKIP";

/// A part of a test that cannot run here (`why`): fails the test, unless
/// [`ALLOW_SKIP`]`=1`, when it prints SKIPPED and the caller skips it.
pub fn skip_or_fail(why: &str) {
    if std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED ({ALLOW_SKIP}=1): {why}");
        return;
    }
    panic!("{why}: this test cannot prove its claim here; run the tests as root, or set {ALLOW_SKIP}=1 to skip what needs root");
}

/// Whether this process is root; if not, [`skip_or_fail`] for `what`
/// (false only when skipping is allowed).
pub fn root_or_skip(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    skip_or_fail(&format!("{what} needs root (not root)"));
    false
}

/// The `tessera-agent` binary `cargo test --workspace` built (built here
/// when this test runs alone).
pub fn agent_bin() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let bin = deps.parent().unwrap().parent().unwrap().join("tessera-agent");
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "tessera-agent", "--bin", "tessera-agent"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "building tessera-agent failed");
    }
    bin
}

/// A small deterministic generator (xorshift64*) for the seeded random
/// sequences of the model and crash tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
