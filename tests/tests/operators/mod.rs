//! The operator CLI under several uids, for tests of operators and
//! approval: a server whose admin socket other uids can reach, and
//! `tessera-server` run as a given uid.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tessera_server::SystemClock;
use tessera_tests::{test_config, TestServer};

use crate::common::{server_bin, within, PROMPTLY};

/// Operator uids the tests name in `admin_uids`, and one that is not an operator.
pub const OPERATOR_A: u32 = 4242;
pub const OPERATOR_B: u32 = 4343;
pub const STRANGER: u32 = 5555;

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A temp dir every uid can traverse (the admin socket's directory is in it).
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A server whose admin socket other operator uids can reach.
pub async fn governed_server(
    dir: &Path,
    configure: impl FnOnce(&mut tessera_server::Config),
) -> TestServer {
    let mut config = test_config(&dir.join("server"));
    config.admin_socket = dir.join("admin/admin.sock");
    config.admin_uids = vec![OPERATOR_A, OPERATOR_B];
    configure(&mut config);
    TestServer::start_with(config, Arc::new(SystemClock)).await
}

/// The operator CLI on a server's admin socket.
pub struct Cli {
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl Cli {
    pub fn new(server: &TestServer) -> Self {
        Self { bin: server_bin(), socket: server.admin_socket.clone() }
    }

    /// Runs `tessera-server ARGS --socket S`, as `uid` when given.
    pub fn run(&self, uid: Option<u32>, args: &[&str]) -> Output {
        let mut command = Command::new(&self.bin);
        command.args(args).arg("--socket").arg(&self.socket);
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        command.output().unwrap()
    }

    pub fn ok(&self, uid: Option<u32>, args: &[&str]) -> String {
        let out = self.run(uid, args);
        assert!(
            out.status.success(),
            "tessera-server {args:?} as {uid:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every stored event, as `events --json` prints it.
    pub fn events(&self) -> Vec<Value> {
        self.ok(None, &["events", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
            .collect()
    }

    /// The first event `matches` accepts, waiting for it (agents push theirs).
    pub async fn wait_event(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        within(PROMPTLY, what, async {
            loop {
                if let Some(e) = self.events().into_iter().find(|e| matches(e)) {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }
}

pub fn field<'a>(e: &'a Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or("")
}

pub fn names(e: &Value, key: &str, wanted: &str) -> bool {
    e[key].as_array().is_some_and(|a| a.iter().any(|v| v == wanted))
}

/// The content hash of the proposal waiting for entry (or proposal) `id`,
/// as `entry show --pending --json` shows it to an approver.
pub fn proposal_hash(cli: &Cli, id: &str) -> String {
    let shown = cli.ok(None, &["entry", "show", "--pending", "--json"]);
    let all: Value = serde_json::from_str(&shown).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let list = all.as_array().cloned().unwrap_or_else(|| vec![all.clone()]);
    list.iter()
        .find(|e| e["id"] == id || e["pending"]["proposal_id"] == id)
        .and_then(|e| e["pending"]["content_hash"].as_str())
        .unwrap_or_else(|| panic!("no proposal {id} in {shown}"))
        .to_string()
}
