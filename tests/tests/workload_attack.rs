//! Attacks on the Workload API from another local uid (65534, through the
//! standard library's `setuid`/`setgid`/`setgroups` in the child, as
//! `setpriv --reuid 65534 --regid 65534 --clear-groups` does), against a
//! real agent on its real socket. Skipped (with a note) when the tests do
//! not run as root.
//!
//! - A program's identity is bound to the connection: a process that
//!   connects as one program and asks as another (exec after connect, by
//!   the connecting PID itself or by its parent while a child keeps the
//!   socket) is refused; the trusted program itself is served. A new
//!   connection of a process is attested as what the process runs then:
//!   it shares an open connection's attestation only while that still
//!   describes it.
//! - One uid cannot grow the agent's memory or flood the event stream:
//!   connections past its limit are closed at accept, large requests are
//!   refused from their length prefix, and its refusals are folded into a
//!   bounded number of events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{root_or_skip, uid_selector, within, PROMPTLY};
use tessera_proto::admin::ListEventsRequest;
use tessera_proto::types::Event;
use tessera_tests::{http_get, RunningAgent, TestServer};
use tessera_workload_api::{connect_workload_api, with_header};

const NOBODY: u32 = 65534;

/// The tests of this file run one at a time: some measure the memory of
/// the process the agent runs in.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// The "trusted" and the "untrusted" program: two copies of the probe,
/// different in content (the trusted one has trailing bytes) and path.
struct Programs {
    trusted: PathBuf,
    untrusted: PathBuf,
    trusted_sha256: String,
}

fn programs(dir: &Path) -> Programs {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = Path::new(env!("CARGO_BIN_EXE_tessera-exec-probe"));
    let trusted = bin.join("trusted-probe");
    let untrusted = bin.join("untrusted-probe");
    std::fs::copy(probe, &untrusted).unwrap();
    std::fs::copy(probe, &trusted).unwrap();
    std::fs::OpenOptions::new().append(true).open(&trusted).unwrap().write_all(b"trusted").unwrap();
    for p in [&trusted, &untrusted] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&trusted).unwrap());
    let trusted_sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Programs { trusted, untrusted, trusted_sha256 }
}

/// A server and an agent whose socket every uid can reach.
async fn setup(dir: &Path) -> (TestServer, RunningAgent) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = TestServer::start(&dir.join("server")).await;
    let socket = dir.join("public/api.sock");
    let agent = RunningAgent::start_configured(&server, &dir.join("agent"), |config| {
        config.socket_path = socket;
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    (server, agent)
}

/// An entry giving `id` to the trusted program run as uid 65534.
async fn trust(server: &TestServer, agent: &RunningAgent, programs: &Programs, id: &str) {
    let trusted = programs.trusted.to_str().unwrap();
    let selectors = [
        format!("unix:uid:{NOBODY}"),
        format!("unix:path:{trusted}"),
        format!("unix:sha256:{}", programs.trusted_sha256),
    ];
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
    server.create_entry(id, &agent.id, &selectors, None).await;
}

/// What the tests that run a workload as uid 65534 start from (`None`,
/// with a note, unless the tests run as root): this file's lock, a server,
/// an agent whose socket every uid can reach, and the two programs.
struct Scene {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    programs: Programs,
    server: TestServer,
    agent: RunningAgent,
    socket: String,
}

async fn scene() -> Option<Scene> {
    let _serial = SERIAL.lock().await;
    if !root_or_skip("running a workload as another uid") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let programs = programs(dir.path());
    let (server, agent) = setup(dir.path()).await;
    let socket = agent.socket.to_str().unwrap().to_string();
    Some(Scene { _serial, dir, programs, server, agent, socket })
}

/// Runs `program args` as uid/gid 65534 with no supplementary groups, its
/// standard output piped.
fn as_nobody(program: &Path, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The first line `child` prints.
async fn first_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    within(
        PROMPTLY,
        "the probe's answer",
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim().to_string()
        }),
    )
    .await
    .unwrap()
}

/// Events of `kind` the server has stored.
async fn stored_events(server: &TestServer, kind: &str) -> Vec<Event> {
    let mut stream = server
        .admin()
        .await
        .list_events(ListEventsRequest { kind: kind.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        events.push(e);
    }
    events
}

fn attr<'a>(e: &'a Event, key: &str) -> Option<&'a str> {
    e.attrs.iter().find(|a| a.key == key).map(|a| a.value.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_keeps_the_program_that_opened_it() {
    let Some(Scene { _serial, dir: _dir, programs, server, agent, socket }) = scene().await else {
        return;
    };
    let trusted = programs.trusted.to_str().unwrap();
    trust(&server, &agent, &programs, "spiffe://example.org/trusted").await;

    // Control: the trusted program itself, on its own connection, is served
    // (retried until the agent has the entry and its SVID).
    within(PROMPTLY, "the trusted program's SVID", async {
        loop {
            let mut child = as_nobody(&programs.trusted, &["fetch", "--socket", &socket]);
            let line = first_line(&mut child).await;
            let _ = child.wait();
            if line == "svid spiffe://example.org/trusted" {
                return;
            }
            assert!(line.starts_with("refused"), "{line}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;

    // 1. The reported attack: untrusted code connects, starts a child that
    //    keeps the socket, and execs the trusted program (same PID); the
    //    child asks.
    let mut children = Children(vec![as_nobody(
        &programs.untrusted,
        &["hand-over", "--socket", &socket, "--", trusted, "sleep", "30"],
    )]);
    let handed_over = first_line(&mut children.0[0]).await;
    drop(children);
    // 2. Untrusted code connects, then execs the trusted program, which asks
    //    on the inherited connection.
    let mut child = as_nobody(
        &programs.untrusted,
        &["exec-into", "--socket", &socket, "--", trusted, "fetch", "--stdin"],
    );
    let exec_into_trusted = first_line(&mut child).await;
    let _ = child.wait();
    // 3. The other way round: the trusted program connects and execs
    //    untrusted code, which asks.
    let mut child = as_nobody(
        &programs.trusted,
        &[
            "exec-into",
            "--socket",
            &socket,
            "--",
            programs.untrusted.to_str().unwrap(),
            "fetch",
            "--stdin",
        ],
    );
    let exec_into_untrusted = first_line(&mut child).await;
    let _ = child.wait();

    for (what, line) in [
        ("a child of a process that exec'd the trusted program", &handed_over),
        ("the trusted program exec'd by untrusted code after it connected", &exec_into_trusted),
        ("untrusted code exec'd by the trusted program after it connected", &exec_into_untrusted),
    ] {
        assert!(line.starts_with("refused Unavailable"), "{what} was not refused: {line}");
        assert!(!line.contains("svid "), "{what}: {line}");
    }

    // Each refusal is an event saying why, recorded against the program the
    // connection was attested as at accept.
    let refusals = within(PROMPTLY, "three executable_changed refusals at the server", async {
        loop {
            let events: Vec<Event> = stored_events(&server, "workload.refused")
                .await
                .into_iter()
                .filter(|e| attr(e, "refusal") == Some("executable_changed"))
                .collect();
            if events.len() >= 3 {
                return events;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let paths: Vec<&str> =
        refusals.iter().map(|e| e.workload.as_ref().unwrap().path.as_str()).collect();
    let untrusted = programs.untrusted.to_str().unwrap();
    assert_eq!(paths.iter().filter(|p| **p == untrusted).count(), 2, "{paths:?}");
    assert_eq!(paths.iter().filter(|p| **p == trusted).count(), 1, "{paths:?}");
    assert!(refusals.iter().all(|e| e.workload.as_ref().unwrap().uid == NOBODY));
    agent.stop().await;
    server.stop().await;
}

/// How many Workload API connections the agent attested `how` (`full`,
/// `shared`).
fn attestations(agent: &RunningAgent, how: &str) -> u64 {
    let (_, body) = http_get(agent.metrics_addr.unwrap(), "/metrics");
    let name = format!("tessera_agent_workload_attestations_total{{how=\"{how}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse().ok()).unwrap_or(0)
}

/// A process's second connection takes the attestation of its first (no
/// `/proc` read), but only while it describes the process: a process that
/// exec'd another program since its first connection (kept open) is
/// attested afresh on its next one, in both directions. Untrusted code
/// exec'd by the trusted program gets nothing; the trusted program exec'd
/// by untrusted code gets its SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_after_an_exec_is_attested_as_what_runs_then() {
    let Some(Scene { _serial, dir: _dir, programs, server, agent, socket }) = scene().await else {
        return;
    };
    let (trusted, untrusted) =
        (programs.trusted.to_str().unwrap(), programs.untrusted.to_str().unwrap());
    trust(&server, &agent, &programs, "spiffe://example.org/trusted").await;
    let exec_into = |first: &Path, then: &str| {
        as_nobody(
            first,
            &["exec-into", "--socket", &socket, "--", then, "fetch", "--socket", &socket],
        )
    };

    // The trusted program connects (and keeps that connection open as the
    // standard input of what it execs), then execs untrusted code, which
    // connects again and asks; and the other way round. Retried until the
    // trusted program exec'd by untrusted code is served (the agent has
    // the SVID then).
    let mut tries = 0;
    let what = "the SVID for the trusted program exec'd by untrusted code";
    let (as_untrusted, as_trusted) = within(PROMPTLY, what, async {
        loop {
            tries += 1;
            let mut child = exec_into(&programs.trusted, untrusted);
            let as_untrusted = first_line(&mut child).await;
            let _ = child.wait();
            let mut child = exec_into(&programs.untrusted, trusted);
            let as_trusted = first_line(&mut child).await;
            let _ = child.wait();
            if as_trusted.starts_with("svid ") {
                return (as_untrusted, as_trusted);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    // Attested as itself (no entry for it), not refused for running
    // something else than a shared attestation says.
    assert!(as_untrusted.starts_with("refused PermissionDenied"), "{as_untrusted}");
    assert_eq!(as_trusted, "svid spiffe://example.org/trusted");
    // Every connection of those processes was attested in full: each new
    // one came after an exec.
    assert_eq!(attestations(&agent, "shared"), 0);
    assert_eq!(attestations(&agent, "full"), 4 * tries);

    // Control: a process that does not exec, connecting twice, is attested
    // once; its second connection shares the first's attestation. Each
    // connection is asked something (any answer: it was accepted, so
    // attested) before the next step.
    let address = format!("unix://{socket}");
    let mut first = connect_workload_api(&address).await.unwrap();
    let _ = first.fetch_jwt_bundles(with_header(Default::default())).await;
    let mut second = connect_workload_api(&address).await.unwrap();
    let _ = second.fetch_jwt_bundles(with_header(Default::default())).await;
    assert_eq!(attestations(&agent, "shared"), 1);
    assert_eq!(attestations(&agent, "full"), 4 * tries + 1);
    agent.stop().await;
    server.stop().await;
}

/// An open FetchX509SVID stream sends no further SVID once the process on
/// its end has exec'd another program: the trusted program opens the stream,
/// gets its SVID and execs untrusted code that reads the raw socket; a new
/// identity for the trusted program then appears, and the untrusted code
/// must not see it go by (before the fix, the update carried it, key
/// included). The connection is closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_sends_nothing_more_after_its_process_execs() {
    let Some(Scene { _serial, dir: _dir, programs, server, agent, socket }) = scene().await else {
        return;
    };
    trust(&server, &agent, &programs, "spiffe://example.org/trusted").await;
    // Wait until the agent serves it.
    within(PROMPTLY, "the trusted program's SVID", async {
        loop {
            let mut child = as_nobody(&programs.trusted, &["fetch", "--socket", &socket]);
            let line = first_line(&mut child).await;
            let _ = child.wait();
            if line == "svid spiffe://example.org/trusted" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;

    let mut children = Children(vec![as_nobody(
        &programs.trusted,
        &[
            "watch-exec",
            "--socket",
            &socket,
            "--",
            programs.untrusted.to_str().unwrap(),
            "raw-read",
            "--stdin",
            "--look-for",
            "spiffe://example.org/second",
        ],
    )]);
    let stdout = children.0[0].stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut read = Vec::new();
    for _ in 0..3 {
        if read.len() == 2 {
            assert_eq!(read[0], "streaming spiffe://example.org/trusted");
            assert_eq!(read[1], "ready", "the untrusted code runs");
            trust(&server, &agent, &programs, "spiffe://example.org/second").await;
        }
        read.push(within(PROMPTLY, "the probe's next line", lines.recv()).await.unwrap());
    }
    assert_eq!(read[2], "not-seen closed", "what the exec'd program read");
    drop(children);
    // The agent did serve the new identity (to the trusted program on a
    // connection of its own).
    within(PROMPTLY, "the second identity", async {
        loop {
            let mut child = as_nobody(&programs.trusted, &["fetch", "--socket", &socket]);
            let line = first_line(&mut child).await;
            let _ = child.wait();
            if line.starts_with("svid ") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

/// A Python attacker, as uid 65534: opens `count` connections, on each
/// sends the HTTP/2 preface and a FetchJWTSVID whose gRPC message claims
/// `size` bytes, then keeps sending all of that message but its last byte
/// (so a server that buffers it holds it) on every connection while the
/// agent takes it (until each is sent, closed, or nothing moved for a
/// second), and keeps them all open until its standard input closes.
const FLOOD: &str = r#"
import socket, struct, sys, time
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def literal(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
headers = b"".join(literal(n, v) for n, v in [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID"),
    (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
    (b"te", b"trailers"), (b"workload.spiffe.io", b"true")])
message = b"\x00" + struct.pack(">I", size) + b"\x0a" * (size - 1)
data = b"".join(frame(0, 0, 1, message[i:i + 16384]) for i in range(0, len(message), 16384))
hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, headers)
kept, pending = [], []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    kept.append(s)
    pending.append([s, memoryview(hello + data)])
idle_since = time.monotonic()
while pending and time.monotonic() - idle_since < 1.0:
    moved = False
    for item in list(pending):
        s, rest = item
        try:
            n = s.send(rest)
        except BlockingIOError:
            continue
        except OSError:
            pending.remove(item)
            continue
        item[1] = rest[n:]
        moved = moved or n > 0
        if not len(item[1]):
            pending.remove(item)
    if moved:
        idle_since = time.monotonic()
    else:
        time.sleep(0.02)
print("sent", flush=True)
sys.stdin.read()
"#;

fn flood(socket: &Path, count: usize, size: usize) -> Child {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(FLOOD)
        .arg(socket)
        .arg(count.to_string())
        .arg(size.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// This process's resident memory (the agent runs in it), KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Samples [`rss_kib`] every 20 ms until the returned sender is dropped;
/// the task's result is the highest sample.
fn watch_rss() -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<u64>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = rss_kib();
        loop {
            tokio::select! {
                _ = &mut stopped => return peak.max(rss_kib()),
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                    peak = peak.max(rss_kib());
                }
            }
        }
    });
    (stop, task)
}

/// 1,000 connections of one uid, each sending a request that claims 1 MiB
/// (and all of it but the last byte, as far as the agent takes it), do not
/// take the agent's memory far up, and a workload of another uid is still
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_of_one_uid_do_not_grow_the_agent() {
    let _serial = SERIAL.lock().await;
    if !root_or_skip("running an attacker as another uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = setup(dir.path()).await;
    server.create_entry("spiffe://example.org/normal", &agent.id, &[&uid_selector()], None).await;
    tessera_agent::fetch_x509(&agent.endpoint()).await.unwrap();
    let before = rss_kib();
    let (stop, peak) = watch_rss();

    let mut attacker = Children(vec![flood(&agent.socket, 1000, 1 << 20)]);
    assert_eq!(first_line(&mut attacker.0[0]).await, "sent");
    // A normal workload of another uid is served meanwhile.
    let svids = within(PROMPTLY, "the normal workload's SVID", async {
        loop {
            match tessera_agent::fetch_x509(&agent.endpoint()).await {
                Ok(svids) => return svids,
                Err(e) => {
                    eprintln!("normal fetch failed (retrying): {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/normal");
    // The attacker stopped when the agent took no more of its bytes.
    drop(stop);
    let grown_mib = peak.await.unwrap().saturating_sub(before) / 1024;
    println!("RSS grew by at most {grown_mib} MiB under 1,000 connections of one uid");
    assert!(grown_mib < 128, "the agent's peak RSS grew by {grown_mib} MiB");
    drop(attacker);
    agent.stop().await;
    server.stop().await;
}

/// A 1 MiB request is refused (from its length prefix), and the agent's
/// memory does not grow by its size per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_is_refused_without_being_buffered() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = setup(dir.path()).await;
    server.create_entry("spiffe://example.org/w", &agent.id, &[&uid_selector()], None).await;
    let mut client = common::raw_client(&agent.socket).await;
    let before = rss_kib();
    let (stop, peak) = watch_rss();
    let mut refused = Vec::new();
    for _ in 0..16 {
        let request = tessera_proto::workload::JwtsvidRequest {
            audience: vec!["a".repeat(1 << 20)],
            spiffe_id: String::new(),
        };
        refused.push(client.fetch_jwtsvid(tessera_agent::cli_request(request)).await.unwrap_err());
    }
    drop(stop);
    let grown_mib = peak.await.unwrap().saturating_sub(before) / 1024;
    println!("RSS grew by at most {grown_mib} MiB for 16 requests of 1 MiB");
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("message length too large"), "{status:?}");
    }
    // A normal request on the same connection is still served.
    let request = tessera_proto::workload::JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    };
    within(PROMPTLY, "a normal JWT-SVID after the large requests", async {
        while client.fetch_jwtsvid(tessera_agent::cli_request(request.clone())).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(grown_mib < 32, "the agent's peak RSS grew by {grown_mib} MiB");
    agent.stop().await;
    server.stop().await;
}

/// 5,000 refused requests from one uid become a bounded number of stored
/// events: the first few of each kind in an interval as they are, the rest
/// folded into one event with their count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_refusals_of_one_uid_are_folded_into_few_events() {
    let _serial = SERIAL.lock().await;
    if !root_or_skip("running an attacker as another uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = setup(dir.path()).await;
    // 200 connections x 25 requests without the security header, each
    // answered before the next connection.
    let script = r#"
import socket, struct, sys
path = sys.argv[1]
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def literal(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
headers = b"".join(literal(n, v) for n, v in [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
    (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
def read_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise SystemExit("the agent closed the connection")
        out += chunk
    return out
for _ in range(200):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
    for i in range(25):
        s.sendall(frame(1, 4, 2 * i + 1, headers) + frame(0, 1, 2 * i + 1, b"\x00\x00\x00\x00\x00"))
    answered = 0
    while answered < 25:
        head = read_exact(s, 9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        read_exact(s, length)
        if kind == 1 and flags & 1:
            answered += 1
    s.close()
print("done", flush=True)
"#;
    let mut attacker = Children(vec![Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&agent.socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()]);
    assert_eq!(first_line(&mut attacker.0[0]).await, "done");
    drop(attacker);
    // Everything is stored once the folded counts add up to 5,000.
    let events = within(PROMPTLY, "the refusals to reach the server", async {
        loop {
            let events: Vec<Event> = stored_events(&server, "workload.refused")
                .await
                .into_iter()
                .filter(|e| e.workload.as_ref().is_some_and(|w| w.uid == NOBODY))
                .collect();
            let counted: u64 = events
                .iter()
                .map(|e| attr(e, "folded").map_or(1, |n| n.parse::<u64>().unwrap()))
                .sum();
            if counted >= 5000 {
                return events;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    println!("5,000 refusals of one uid stored as {} events", events.len());
    assert!(events.len() <= 100, "{} events stored for 5,000 refusals", events.len());
    agent.stop().await;
    server.stop().await;
}
