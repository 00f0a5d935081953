//! The real `tessera-server` and `tessera-agent` processes for the agent
//! binary's tests: spawn, wait, stop (killed if a test fails first).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_tessera-agent");

/// `tessera-server` is built next to `tessera-agent` by `cargo test --workspace`.
pub fn server_bin() -> PathBuf {
    let path = Path::new(AGENT).with_file_name("tessera-server");
    assert!(path.exists(), "{} is missing: run `cargo test --workspace`", path.display());
    path
}

/// A child process, killed when dropped.
pub struct Process(pub Child);

impl Process {
    /// Spawns with output discarded.
    pub fn spawn(command: &mut Command) -> Self {
        Self(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    }

    /// Spawns with stderr (the log) written to `log`.
    pub fn spawn_logging(command: &mut Command, log: &Path) -> Self {
        let file = std::fs::File::create(log).unwrap();
        Self(command.stdout(Stdio::null()).stderr(file).spawn().unwrap())
    }

    /// SIGTERM, and waits for the exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }

    /// SIGKILL, and waits.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits for the process to exit by itself; whether it succeeded.
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "the process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `bin` with `args` (not inheriting `SPIFFE_ENDPOINT_SOCKET`).
pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).env_remove("SPIFFE_ENDPOINT_SOCKET").output().unwrap()
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `check` until it holds (30 s at most).
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
