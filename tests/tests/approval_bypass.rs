//! Issue 19, items 1-5: the controls an operator relies on cannot be walked
//! around. Each test runs the real `tessera-server` CLI under other uids
//! against a real server (and, for join tokens, real attestation over TLS);
//! they need root to switch uids, and fail without it (unless
//! TESSERA_TESTS_ALLOW_SKIP=1, when they say SKIPPED).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod operators;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{root_or_skip, skip_or_fail, uid_selector, within, PROMPTLY};
use operators::{field, governed_server, open_tempdir, proposal_hash, Cli, OPERATOR_A, OPERATOR_B};
use serde_json::Value;
use tessera_server::ApprovalPolicy;
use tessera_tests::{RunningAgent, TestAgent};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Item 1: a join token never mints an identity it should not: not a live
/// or banned agent's, not an entry's, and one under a protected path only
/// once a second operator approved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_cannot_mint_a_taken_or_protected_identity() {
    if !root_or_skip("approval by a second operator (two uids)") {
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.approval =
            ApprovalPolicy { protected_path_prefixes: vec!["/prod".into()], ..Default::default() };
    })
    .await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let cli = Cli::new(&server);
    let exe = std::env::current_exe().unwrap().display().to_string();
    cli.ok(
        Some(OPERATOR_A),
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/svc",
            "--parent-id",
            &agent.id,
            "--selector",
            &uid_selector(),
            "--selector",
            &format!("unix:path:{exe}"),
        ],
    );
    let token = |id: &str| cli.run(Some(OPERATOR_A), &["token", "generate", "--spiffe-id", id]);

    // The ID of a live agent: refused, naming the fix.
    let out = token(&agent.id);
    assert!(!out.status.success(), "a token re-registers a live agent");
    assert!(stderr(&out).contains("already attested") && stderr(&out).contains("agent evict"));
    // An entry's SPIFFE ID.
    let out = token("spiffe://example.org/svc");
    assert!(!out.status.success(), "a token mints an entry's identity");
    assert!(stderr(&out).contains("SPIFFE ID of a registration entry"), "{}", stderr(&out));

    // Under a protected path: held; the token does not work until approved.
    let out = token("spiffe://example.org/prod/payments");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("held for approval"), "{}", stderr(&out));
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let refused = TestAgent::attest(&server, &secret).await.expect_err("a held token attested");
    // Said as such (not "does not exist"), with its typed code.
    let code = refused.metadata().get(tessera_proto::REFUSAL_METADATA);
    assert_eq!(code.and_then(|v| v.to_str().ok()), Some("approval-required"), "{refused:?}");
    assert!(refused.message().contains("waiting for a second operator"), "{refused:?}");
    let shown = cli.ok(None, &["entry", "show", "--pending", "--json"]);
    let pending: Value = serde_json::from_str(&shown).unwrap();
    let proposal = pending.as_array().unwrap()[0]["pending"]["proposal_id"].as_str().unwrap();
    let hash = proposal_hash(&cli, proposal);
    let own = cli.run(Some(OPERATOR_A), &["entry", "approve", "--id", proposal, "--hash", &hash]);
    assert!(stderr(&own).contains("another operator must approve it"), "{}", stderr(&own));
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", proposal, "--hash", &hash]);
    let attested = TestAgent::attest(&server, &secret).await.unwrap();
    assert_eq!(attested.id, "spiffe://example.org/prod/payments");

    // The parent of an entry the policy matches: whoever attests with the
    // token serves that entry, so the token is held too (even once the
    // entry was approved).
    let out = cli.run(
        Some(OPERATOR_A),
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/prod/ledger",
            "--parent-id",
            "spiffe://example.org/node/9",
            "--selector",
            &uid_selector(),
            "--selector",
            &format!("unix:path:{exe}"),
        ],
    );
    let ledger = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hash = proposal_hash(&cli, &ledger);
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", &ledger, "--hash", &hash]);
    let out = token("spiffe://example.org/node/9");
    assert!(stderr(&out).contains("held for approval"), "{}", stderr(&out));
    assert!(stderr(&out).contains("parent of 1 entry"), "{}", stderr(&out));
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(TestAgent::attest(&server, &secret).await.is_err(), "the node was taken alone");

    // The other order: one operator's token made first (nothing protected
    // under node/10 yet), then a protected entry under node/10 approved:
    // the token no longer attests.
    let early = token("spiffe://example.org/node/10");
    assert!(!stderr(&early).contains("held"), "{}", stderr(&early));
    let early = String::from_utf8_lossy(&early.stdout).trim().to_string();
    let out = cli.run(
        Some(OPERATOR_A),
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/prod/t10",
            "--parent-id",
            "spiffe://example.org/node/10",
            "--selector",
            &uid_selector(),
            "--selector",
            &format!("unix:path:{exe}"),
        ],
    );
    let t10 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hash = proposal_hash(&cli, &t10);
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", &t10, "--hash", &hash]);
    let refused = TestAgent::attest(&server, &early).await.expect_err("an unapproved token");
    let code = refused.metadata().get(tessera_proto::REFUSAL_METADATA);
    assert_eq!(code.and_then(|v| v.to_str().ok()), Some("approval-required"), "{refused:?}");

    // A banned agent's ID stays refused (re-attesting is `agent evict` first).
    cli.ok(None, &["agent", "ban", "--id", &agent.id]);
    let out = token(&agent.id);
    assert!(!out.status.success(), "a token re-registers a banned agent");
    cli.ok(None, &["agent", "evict", "--id", &agent.id, "--unban"]);
    let out = token(&agent.id);
    assert!(out.status.success(), "after evict the ID is free: {}", stderr(&out));
    agent.stop().await;
    server.stop().await;
}

/// Items 2-4: equivalent selectors are judged alike; an approved entry
/// cannot be changed by one operator; an approval names the proposal it
/// approves, and a second proposal cannot replace the one under review.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_holds_for_every_spelling_every_change_and_only_what_was_seen() {
    if !root_or_skip("approval by a second operator (two uids)") {
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.approval = ApprovalPolicy {
            uid_gid_only_selectors: true,
            root_selectors: true,
            protected_path_prefixes: vec!["/prod".into()],
            ..Default::default()
        };
    })
    .await;
    let cli = Cli::new(&server);
    let path = format!("unix:path:{}", std::env::current_exe().unwrap().display());
    let parent = "spiffe://example.org/node";
    let create = |name: &str, selectors: &[&str]| {
        let id = format!("spiffe://example.org/{name}");
        let mut args = vec!["entry", "create", "--spiffe-id", &id, "--parent-id", parent];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        let out = cli.run(Some(OPERATOR_A), &args);
        assert!(out.status.success(), "{}", stderr(&out));
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), stderr(&out))
    };

    // Item 3: every spelling of root, and users or groups without a program.
    for (name, selectors) in [
        ("a", vec!["unix:user:root", path.as_str()]),
        ("b", vec!["unix:group:root", path.as_str()]),
        ("c", vec!["unix:supplementary_gid:0", path.as_str()]),
        ("d", vec!["unix:user:nobody"]),
        ("e", vec!["unix:group:staff"]),
    ] {
        let (_, said) = create(name, &selectors);
        assert!(said.contains("pending approval"), "{selectors:?} skipped the policy: {said}");
    }
    let (_, said) = create("plain", &["unix:uid:1000", &path]);
    assert!(!said.contains("pending"), "{said}");

    // Item 2: an approved entry's every change needs approval again.
    let (id, _) = create("prod/trusted", &["unix:uid:1000", &path]);
    let first = proposal_hash(&cli, &id);
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", &id, "--hash", &first]);
    let update = |extra: &[&str]| {
        let mut args = vec!["entry", "update", "--id", id.as_str()];
        args.extend(extra);
        cli.run(Some(OPERATOR_A), &args)
    };
    let out = update(&["--selector", "unix:user:nobody"]);
    assert!(stderr(&out).contains("pending approval"), "{}", stderr(&out));
    let shown = cli.ok(None, &["entry", "show", "--id", &id, "--json"]);
    assert!(!shown.contains("nobody"), "one operator changed an approved entry: {shown}");

    // Item 4: a second proposal cannot replace the one under review ...
    let reviewed = proposal_hash(&cli, &id);
    let out = update(&["--selector", "unix:user:root"]);
    assert!(!out.status.success(), "a second proposal replaced the first");
    assert!(stderr(&out).contains("already has proposal"), "{}", stderr(&out));
    // ... an approval must name the hash, and a stale one is refused ...
    let out = cli.run(Some(OPERATOR_B), &["entry", "approve", "--id", &id, "--hash", &first]);
    assert!(stderr(&out).contains("not what you reviewed"), "{}", stderr(&out));
    let out = cli.run(Some(OPERATOR_B), &["entry", "approve", "--id", &id]);
    assert!(!out.status.success(), "an approval without a hash");
    // ... and after a reject and a new proposal, the old hash approves nothing.
    cli.ok(Some(OPERATOR_B), &["entry", "reject", "--id", &id]);
    let out = update(&["--selector", "unix:user:nobody"]);
    assert!(stderr(&out).contains("pending approval"), "{}", stderr(&out));
    let out = cli.run(Some(OPERATOR_B), &["entry", "approve", "--id", &id, "--hash", &reviewed]);
    assert!(stderr(&out).contains("not what you reviewed"), "{}", stderr(&out));
    let current = proposal_hash(&cli, &id);
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", &id, "--hash", &current]);
    let shown = cli.ok(None, &["entry", "show", "--id", &id, "--json"]);
    assert!(shown.contains("unix:user:nobody"), "{shown}");
    let approvals: Vec<Value> = cli
        .events()
        .into_iter()
        .filter(|e| field(e, "kind") == "admin.entry.approve" && field(e, "decision") == "allow")
        .collect();
    assert!(approvals.iter().any(|e| e["attrs"]["content_hash"] == current.as_str()));
    server.stop().await;
}

/// The uid of a process that connects to the admin socket and passes its
/// connection on before it exits, and of the process that then takes its
/// PID (a member of the operators' group).
const IMPOSTOR_UID: u32 = 65533;
const GROUP_MEMBER_UID: u32 = 65532;
const ADMIN_GID: u32 = 4545;

/// Connects to the admin socket, forks, and exits (printing its PID); the
/// child keeps the connection and, when told on stdin, sends one
/// CreateJoinToken call on it (raw HTTP/2, stdlib only).
const FORK_AND_WAIT: &str = r#"
import os, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if os.fork():
    print(os.getpid(), flush=True)
    os._exit(0)
sys.stdin.readline()
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def header(name, value):
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
headers = b"".join(header(n, v) for n, v in [
    (":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
    (":path", "/tessera.admin.v1.Admin/CreateJoinToken"),
    ("content-type", "application/grpc"), ("te", "trailers")])
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
          + frame(1, 4, 1, headers) + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
s.settimeout(0.5)
acked, deadline = False, time.time() + 3
while time.time() < deadline:
    try:
        if not s.recv(65536):
            break
        if not acked:
            s.sendall(frame(4, 1, 0, b""))
            acked = True
    except socket.timeout:
        pass
print("done", flush=True)
"#;

/// Item 5: a non-operator whose connecting process exits, and whose PID is
/// then reused by a member of `admin_gids`, is still a non-operator: the
/// caller is pinned at accept, never looked up by PID later. PID reuse is
/// forced through `/proc/sys/kernel/ns_last_pid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_authorization_survives_pid_reuse() {
    if !root_or_skip("forcing PID reuse") {
        return;
    }
    if std::fs::metadata("/proc/sys/kernel/ns_last_pid").is_err() {
        skip_or_fail("forcing PID reuse needs /proc/sys/kernel/ns_last_pid (absent)");
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| config.admin_gids = vec![ADMIN_GID]).await;
    let cli = Cli::new(&server);
    let socket = server.admin_socket.display().to_string();

    // Control: a member of the group is an operator.
    let member = Command::new("setpriv")
        .args(["--reuid", &GROUP_MEMBER_UID.to_string(), "--regid", &GROUP_MEMBER_UID.to_string()])
        .args(["--groups", &ADMIN_GID.to_string()])
        .arg(operators_cli_path())
        .args(["token", "generate", "--socket", &socket])
        .output()
        .unwrap();
    assert!(member.status.success(), "a group member is refused: {}", stderr(&member));

    let mut impostor = Command::new("setpriv")
        .args(["--reuid", &IMPOSTOR_UID.to_string(), "--regid", &IMPOSTOR_UID.to_string()])
        .args(["--clear-groups", "/usr/bin/python3", "-c", FORK_AND_WAIT, &socket])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = impostor.stdin.take().unwrap();
    let mut lines = BufReader::new(impostor.stdout.take().unwrap()).lines();
    let pid: i32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    assert!(impostor.wait().unwrap().success());
    // The connecting process is gone and reaped: give its PID to a member
    // of the operators' group.
    let mut reused = None;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut candidate = Command::new("setpriv")
            .args(["--reuid", &GROUP_MEMBER_UID.to_string()])
            .args(["--regid", &GROUP_MEMBER_UID.to_string()])
            .args(["--groups", &ADMIN_GID.to_string(), "sleep", "30"])
            .spawn()
            .unwrap();
        if candidate.id() as i32 == pid {
            reused = Some(candidate);
            break;
        }
        let _ = candidate.kill();
        let _ = candidate.wait();
    }
    let Some(mut holder) = reused else {
        panic!("could not make PID {pid} reused in 200 tries");
    };
    // Wait until it runs as the group member (after setpriv's exec).
    let member_now = format!("Groups:\t{ADMIN_GID}");
    within(PROMPTLY, "the PID's new owner", async {
        while !std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| s.contains(&member_now) && s.contains("Name:\tsleep"))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The impostor's child now asks on the inherited connection.
    writeln!(stdin, "go").unwrap();
    within(PROMPTLY, "the impostor's call", async {
        tokio::task::spawn_blocking(move || lines.next()).await.unwrap()
    })
    .await;
    let _ = holder.kill();
    let _ = holder.wait();
    let events = cli.events();
    let by_impostor =
        |e: &&Value| e["operator"]["uid"] == IMPOSTOR_UID && field(e, "kind") != "admin.refused";
    assert!(
        !events.iter().any(|e| by_impostor(&e)),
        "uid {IMPOSTOR_UID} acted as an operator through a reused PID"
    );
    assert!(
        events
            .iter()
            .any(|e| field(e, "kind") == "admin.refused" && e["operator"]["uid"] == IMPOSTOR_UID),
        "the impostor's call was not refused (did it reach the server?)"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.stop().await;
}

fn operators_cli_path() -> String {
    common::server_bin().display().to_string()
}

/// Item 10 (the admin socket's side): a local uid that is refused over and
/// over cannot flood the event stream: its first refusal of each interval
/// is an event, the rest one event with a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_operator_hammering_the_admin_socket_is_folded_into_few_events() {
    if !root_or_skip("calling as another uid") {
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |_| {}).await;
    let cli = Cli::new(&server);
    const CALLS: usize = 100;
    for _ in 0..CALLS {
        let out = cli.run(Some(operators::STRANGER), &["entry", "show"]);
        assert!(stderr(&out).contains("not an operator"), "{}", stderr(&out));
    }
    let refused = |events: &[Value]| -> Vec<u64> {
        events
            .iter()
            .filter(|e| {
                field(e, "kind") == "admin.refused" && e["operator"]["uid"] == operators::STRANGER
            })
            .map(|e| e["attrs"]["count"].as_str().and_then(|c| c.parse().ok()).unwrap_or(1))
            .collect()
    };
    // Folded refusals are recorded at the end of their interval (10 s).
    let counts = within(PROMPTLY, "the folded refusals", async {
        loop {
            let counts = refused(&cli.events());
            if counts.iter().sum::<u64>() == CALLS as u64 {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(counts.len() <= 4, "{CALLS} refusals made {} events: {counts:?}", counts.len());
    server.stop().await;
}
