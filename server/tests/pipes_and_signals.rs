//! A closed stdout ends a listing quietly, and shutdown never waits for a
//! log reader: `tessera-server … | head -1`, and a server whose stderr is
//! a pipe nobody reads (or nobody holds) still stops on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RunningServer, BIN};

/// Waits for `child` until `deadline`; kills it when it is still running.
fn wait_until(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_listing_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(&dir.path().join("server"), &[]);
    for listing in [&["bundle", "show"][..], &["entry", "show"], &["events"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // `| head -1` that has already gone
        let output = Command::new(BIN)
            .args(listing)
            .args(["--socket", server.socket.to_str().unwrap()])
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{listing:?}: {:?} {stderr}", output.status);
        assert!(!stderr.contains("panicked"), "{listing:?}: {stderr}");
    }
    server.stop();
}

/// A server started with `RUST_LOG=trace` writing to `stderr`, and its
/// admin socket once it answers.
fn start_logging_to(data_dir: &Path, stderr: Stdio) -> (Child, std::path::PathBuf) {
    let child = Command::new(BIN)
        .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    (child, data_dir.join("admin.sock"))
}

/// Admin calls that each make the server log many trace lines; a call
/// that hangs (a server stuck on its log) is killed after a while.
fn make_it_log(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..40 {
        let mut call = Command::new(BIN)
            .args(["bundle", "show", "--socket", socket.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if wait_until(&mut call, Duration::from_secs(5)).is_none() {
            break; // the server no longer answers; SIGTERM must still end it
        }
    }
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

#[test]
fn sigterm_ends_a_server_whose_log_nobody_reads() {
    let dir = tempfile::tempdir().unwrap();
    // The pipe is held open and never read: it fills after 64 KiB.
    let (reader, writer) = std::io::pipe().unwrap();
    let (mut child, socket) = start_logging_to(&dir.path().join("server"), writer.into());
    make_it_log(&socket);
    sigterm(&child);
    let status = wait_until(&mut child, Duration::from_secs(20));
    drop(reader);
    let status = status.expect("the server ignored SIGTERM while its log pipe was full");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_ends_a_server_whose_log_reader_has_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    let (mut child, socket) = start_logging_to(&dir.path().join("server"), writer.into());
    drop(reader);
    make_it_log(&socket);
    assert!(child.try_wait().unwrap().is_none(), "a closed log pipe ended the server");
    sigterm(&child);
    let status = wait_until(&mut child, Duration::from_secs(20))
        .expect("the server ignored SIGTERM after its log pipe closed");
    assert!(status.success(), "{status:?}");
}
