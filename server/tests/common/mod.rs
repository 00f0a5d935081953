//! A `tessera-server run` process for the binary's tests: started on an
//! ephemeral port and a data dir, waited for until `healthcheck` passes,
//! driven through the CLI over its admin socket, stopped with SIGTERM (and
//! killed if a test fails first).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");

pub struct RunningServer {
    child: Child,
    pub socket: PathBuf,
}

impl RunningServer {
    /// `run` on `data_dir` with `extra` arguments, output discarded.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::launch(Command::new(BIN), data_dir, extra, None)
    }

    /// As [`Self::start`], its output written to `log`.
    pub fn start_logged(data_dir: &Path, extra: &[&str], log: &Path) -> Self {
        Self::launch(Command::new(BIN), data_dir, extra, Some(log))
    }

    /// As [`Self::start`] under umask 022, as a service manager or a shell
    /// would start it.
    pub fn start_with_umask_022(data_dir: &Path) -> Self {
        let mut sh = Command::new("sh");
        sh.args(["-c", "umask 022 && exec \"$0\" \"$@\"", BIN]);
        Self::launch(sh, data_dir, &[], None)
    }

    /// As [`Self::start_logged`] with the admin socket at `socket`.
    pub fn start_at(data_dir: &Path, socket: &Path, extra: &[&str], log: &Path) -> Self {
        let mut args = vec!["--admin-socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut server = Self::launch(Command::new(BIN), data_dir, &args, Some(log));
        server.socket = socket.to_owned();
        server
    }

    fn launch(mut command: Command, data_dir: &Path, extra: &[&str], log: Option<&Path>) -> Self {
        let (out, err) = match log {
            Some(log) => {
                let file = std::fs::File::create(log).unwrap();
                (Stdio::from(file.try_clone().unwrap()), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = command
            .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        let socket = match extra.iter().position(|a| *a == "--admin-socket") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => data_dir.join("admin.sock"),
        };
        let server = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.cli(&["healthcheck"]).status.success() {
            assert!(Instant::now() < deadline, "server did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `tessera-server ARGS --socket <its admin socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let socket = self.socket.to_str().unwrap();
        Command::new(BIN).args(args).args(["--socket", socket]).output().unwrap()
    }

    /// SIGTERM, and wait for the server to exit (it closes its store).
    pub fn stop(mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
