//! The token broker example runs as its README says: `examples/broker/run.sh`
//! with the binaries this test build made, and what it prints is what the
//! README promises: a token granted and accepted by the tool, a denial by
//! policy, a request held for an operator that the workload's own uid may
//! not approve, approved by a second operator (as root) or left without a
//! token when the task ends (not root), and the tool refusing the old token
//! once the task has ended. Everything stopped and removed afterwards.
//!
//! Needs the Python of `scripts/test.sh` (fails without it unless
//! `TESSERA_SKIP_PYTHON=1`), `openssl`, and as root `setpriv`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, server_bin};
use tessera_tests::broker::{free_port, python, workspace};

/// The whole example takes seconds; this is for a machine under load.
const LIMIT: Duration = Duration::from_secs(240);

/// Runs `run.sh`, killing it (it stops what it started) past [`LIMIT`].
fn run_example(python: &Path, port: u16) -> (bool, String, String) {
    let bin_dir = server_bin().parent().unwrap().to_owned();
    assert_eq!(agent_bin().parent().unwrap(), bin_dir, "tessera-agent next to tessera-server");
    let mut child = Command::new(workspace().join("examples/broker/run.sh"))
        .env("TESSERA_BIN_DIR", &bin_dir)
        .env("TESSERA_PYTHON", python)
        .env("EXAMPLE_BROKER_PORT", port.to_string())
        .env_remove("TESSERA_ADMIN_SOCKET")
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("EXAMPLE_KEEP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    eprintln!("run.sh took {:.1} s\n{stdout}{stderr}", started.elapsed().as_secs_f64());
    assert!(status.is_some(), "run.sh did not finish within {LIMIT:?}:\n{stdout}\n{stderr}");
    (status.unwrap().success(), stdout, stderr)
}

/// The index of the first line containing every one of `needles`.
fn line_with(lines: &[&str], needles: &[&str]) -> usize {
    lines
        .iter()
        .position(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no line with {needles:?} in:\n{}", lines.join("\n")))
}

#[test]
fn the_broker_example_runs_as_its_readme_says() {
    let Some(python) = python() else { return };
    let root = rustix::process::geteuid().is_root();
    let port = free_port();
    let (ok, stdout, stderr) = run_example(&python, port);
    assert!(ok, "run.sh failed:\n{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();

    // Allowed: a token to read one account, and the tool accepts it.
    let granted = line_with(
        &lines,
        &["agent: GRANTED a token to read https://tools.example/crm/accounts/acme"],
    );
    let accepted = line_with(
        &lines,
        &["tool: GET /accounts/acme: ACCEPTED read for spiffe://example.org/agents/reporter"],
    );
    line_with(&lines, &["agent: the CRM tool ACCEPTED the read token", "Acme Corp"]);
    // Denied by policy.
    let denied =
        line_with(&lines, &["agent: DENIED a token to delete", "access_denied", "no-crm-delete"]);
    // Held for an operator; the workload's own uid may not decide it.
    let pending = line_with(
        &lines,
        &[
            "agent: PENDING a token to write https://tools.example/crm/accounts/*",
            "holds request req-",
        ],
    );
    line_with(&lines, &["Blast radius  : 90"]);
    line_with(&lines, &["Policies      : reporter-write-crm-broad"]);
    let refused_self =
        line_with(&lines, &["operator: my approval as uid", "is REFUSED", "own uid"]);
    let outcome = if root {
        let approved = line_with(&lines, &["operator: APPROVED by the second operator, uid 4242"]);
        line_with(&lines, &["agent: APPROVED: request req-", "token to write"]);
        line_with(
            &lines,
            &["tool: PUT /accounts/*: ACCEPTED write for spiffe://example.org/agents/reporter"],
        );
        let wrote = line_with(
            &lines,
            &["agent: the CRM tool ACCEPTED the write token: updated 2 accounts"],
        );
        line_with(
            &lines,
            &["broker.request.approve allow by uid 4242", "reporter-write-crm-broad"],
        );
        assert!(refused_self < approved && approved < wrote, "{stdout}");
        wrote
    } else {
        eprintln!("not root: checking the path without a second operator");
        line_with(&lines, &["agent: NO TOKEN for request req-", "invalid_grant", "has ended"])
    };
    // The task ends: the tool refuses the token it accepted before, at once.
    let ended = line_with(&lines, &["operator: ended task task-"]);
    let refused = line_with(&lines, &["tool: GET /accounts/acme: REFUSED", "no longer active"]);
    line_with(
        &lines,
        &["agent: after the task ended, the CRM tool REFUSED my old read token: 401"],
    );
    line_with(
        &lines,
        &["agent: and the broker gives no new token for the ended task: invalid_grant"],
    );
    // One event stream, intact.
    line_with(&lines, &["broker.token deny", "no-crm-delete"]);
    line_with(&lines, &["broker.request.pending", "blast_radius=90"]);
    line_with(&lines, &["broker.task.end allow"]);
    line_with(&lines, &["operator: Event chain is intact"]);
    line_with(&lines, &["done: stopping"]);
    let order = [granted, accepted, denied, pending, refused_self, ended, refused];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "steps out of order {order:?}:\n{stdout}");
    // As root the approved write happens within the task; otherwise the
    // held request ends with the task.
    assert!(if root { outcome < ended } else { ended < outcome }, "{stdout}");

    // Everything stopped and removed: the broker's port is free, the temp dir gone.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the broker still listens on {port}"
    );
    let ca = lines[line_with(&lines, &["setup: made a CA ("])];
    let work = ca.split('(').nth(1).unwrap().split("/tls/").next().unwrap();
    assert!(!Path::new(work).exists(), "{work} was left behind");
}
