//! Runtime governance end to end: the event stream (`tessera-server events`,
//! `events verify`) with decisions from the server and from agents,
//! operators authorized by their uid, approval by a second operator, and
//! the metrics and health endpoints. The operator commands run as the real
//! `tessera-server` binary under other uids (the tests run as root; without
//! root they fail, unless TESSERA_TESTS_ALLOW_SKIP=1 lets the uid-switching
//! steps be skipped, saying so).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod operators;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{root_or_skip, serial_hex, uid_selector, within, workload_client, PROMPTLY};
use operators::{
    field, governed_server, names, open_tempdir, proposal_hash, Cli, OPERATOR_A, OPERATOR_B,
    STRANGER,
};
use serde_json::Value;
use tessera_agent::AgentConfig;
use tessera_server::{ApprovalPolicy, SystemClock};
use tessera_tests::{http_get, my_uid, test_config, RunningAgent, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_appear_in_the_event_stream_with_agent_workload_and_decision() {
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |_| {}).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let cli = Cli::new(&server);
    let client = workload_client(&agent).await;
    let spiffe_id = "spiffe://example.org/governed";

    // A fetch with no entry for the caller: refused.
    let refused = within(PROMPTLY, "a refused fetch", client.fetch_x509_svid()).await;
    assert!(refused.is_err(), "no entry yet, yet a fetch succeeded");

    // An operator (not root) creates the entry.
    let switch_uids = root_or_skip("creating the entry as an operator uid, refusing a stranger");
    let creator = switch_uids.then_some(OPERATOR_A);
    cli.ok(
        creator,
        &[
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &agent.id,
            "--selector",
            &uid_selector(),
            "--jwt-audience",
            "allowed-api",
        ],
    );
    let svid = within(PROMPTLY, "the SVID once the entry exists", async {
        loop {
            if let Ok(svid) = client.fetch_x509_svid().await {
                return svid;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let serial = serial_hex(svid.leaf().as_bytes());

    // A JWT-SVID for an audience the entry does not allow: refused.
    let jwt = client.fetch_jwt_svid(["not-allowed"], None).await;
    assert!(jwt.is_err(), "a JWT-SVID for a disallowed audience was issued");

    // A revocation by an operator.
    cli.ok(None, &["svid", "revoke", "--serial", &serial, "--reason", "governance test"]);

    let me = std::process::id() as i64;
    let exe = std::env::current_exe().unwrap().display().to_string();
    let denied = cli
        .wait_event("the refused fetch's event", |e| {
            field(e, "kind") == "workload.x509" && field(e, "decision") == "deny"
        })
        .await;
    assert_eq!(field(&denied, "agent_id"), agent.id);
    assert_eq!(field(&denied, "source"), "agent");
    assert!(field(&denied, "reason").contains("no identity"), "{denied}");
    assert_eq!(denied["workload"]["uid"], my_uid());
    assert_eq!(denied["workload"]["pid"], me);
    assert_eq!(field(&denied["workload"], "path"), exe);

    let served = cli
        .wait_event("the served fetch's event", |e| {
            field(e, "kind") == "workload.x509" && field(e, "decision") == "allow"
        })
        .await;
    assert_eq!(field(&served, "agent_id"), agent.id);
    assert!(names(&served, "spiffe_ids", spiffe_id), "{served}");
    assert_eq!(served["workload"]["pid"], me);
    assert_eq!(field(&served["workload"], "sha256").len(), 64, "{served}");
    assert!(names(&served["workload"], "selectors", &uid_selector()), "{served}");

    let audience = cli
        .wait_event("the refused JWT-SVID's event", |e| {
            field(e, "kind") == "workload.jwt" && field(e, "decision") == "deny"
        })
        .await;
    assert_eq!(field(&audience, "agent_id"), agent.id);
    assert!(field(&audience, "reason").contains("audience not allowed"), "{audience}");
    assert!(names(&audience, "audience", "not-allowed"), "{audience}");
    assert_eq!(audience["workload"]["uid"], my_uid());

    let created =
        cli.wait_event("the entry create", |e| field(e, "kind") == "admin.entry.create").await;
    assert_eq!(field(&created, "decision"), "allow");
    assert_eq!(created["operator"]["uid"], creator.unwrap_or(0));
    assert_eq!(field(&created["after"], "spiffe_id"), spiffe_id);
    assert_eq!(field(&created, "agent_id"), agent.id);

    let revoked = cli
        .wait_event("the revocation", |e| {
            field(e, "kind") == "svid.revoke" && field(e, "serial") == serial
        })
        .await;
    assert_eq!(field(&revoked, "decision"), "deny");
    assert_eq!(field(&revoked, "agent_id"), agent.id);
    assert!(names(&revoked, "spiffe_ids", spiffe_id), "{revoked}");
    assert_eq!(field(&revoked, "reason"), "governance test");
    assert_eq!(revoked["operator"]["uid"], 0);

    // Filters: by SPIFFE ID and decision, by kind prefix, by agent.
    let only_denied =
        cli.ok(None, &["events", "--json", "--decision", "deny", "--spiffe-id", spiffe_id]);
    assert!(!only_denied.is_empty());
    for line in only_denied.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        assert_eq!(field(&e, "decision"), "deny", "{e}");
        assert!(names(&e, "spiffe_ids", spiffe_id), "{e}");
    }
    let workload = cli.ok(None, &["events", "--json", "--kind", "workload", "--agent", &agent.id]);
    assert!(workload.lines().count() >= 3);
    assert!(workload.lines().all(|l| l.contains("\"kind\":\"workload.")));
    assert_eq!(cli.ok(None, &["events", "--json", "--limit", "2"]).lines().count(), 2);
    assert_eq!(cli.ok(None, &["events", "--since", "2999-01-01T00:00:00Z"]), "");
    let bad = cli.run(None, &["events", "--since", "yesterday"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    let human = cli.ok(None, &["events", "--kind", "svid.revoke"]);
    assert!(human.contains("svid.revoke deny") && human.contains(&serial), "{human}");

    // A user who is no operator is refused, and the refusal is an event.
    if switch_uids {
        let out = cli.run(Some(STRANGER), &["entry", "show"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("uid 5555 is not an operator"), "{stderr}");
        let refusal =
            cli.wait_event("the stranger's refusal", |e| field(e, "kind") == "admin.refused").await;
        assert_eq!(refusal["operator"]["uid"], STRANGER);
        assert_eq!(field(&refusal, "decision"), "deny");
    }

    // `--follow` prints events stored after it started.
    let mut follow = Command::new(&cli.bin)
        .args(["events", "--json", "--follow", "--kind", "admin.join_token"])
        .arg("--socket")
        .arg(&cli.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.join_token("", 60).await;
    let line = within(
        PROMPTLY,
        "a followed event",
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap();
            line
        }),
    )
    .await
    .unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(field(&followed, "kind"), "admin.join_token.create");

    assert!(cli.ok(None, &["events", "verify"]).contains("Event chain is intact"));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_survive_restarts_and_are_spooled_while_the_server_is_down() {
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |_| {}).await;
    let agent_dir = dir.path().join("agent");
    let agent = RunningAgent::start(&server, &agent_dir).await;
    let cli = Cli::new(&server);
    server.create_entry("spiffe://example.org/spooled", &agent.id, &[&uid_selector()], None).await;
    let client = workload_client(&agent).await;
    within(PROMPTLY, "the first SVID", async {
        while client.fetch_x509_svid().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    cli.wait_event("the first fetch", |e| field(e, "kind") == "workload.x509").await;
    let before = cli.events().len();

    // The server goes away; the agent keeps serving, and spools the events.
    let (addr, server_dir, socket) =
        (server.addr, server.data_dir.clone(), server.admin_socket.clone());
    server.stop().await;
    for _ in 0..3 {
        within(PROMPTLY, "a fetch while the server is down", client.fetch_x509_svid())
            .await
            .unwrap();
    }
    let marker =
        within(PROMPTLY, "a refused JWT-SVID", client.fetch_jwt_svid(["while-down"], None)).await;
    assert!(marker.is_err(), "the server is down: no new JWT-SVID can be signed");
    // The agent restarts too, before the server is back: the spool is on disk.
    agent.stop().await;
    let spool = std::fs::metadata(agent_dir.join("events.spool")).unwrap().len();
    assert!(spool > 24, "the events wait in the spool ({spool} bytes)");

    let mut config = test_config(&server_dir);
    config.bind = addr;
    config.admin_socket = socket;
    config.admin_uids = vec![OPERATOR_A, OPERATOR_B];
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let mut agent_config = AgentConfig::new(agent_dir.clone(), addr.to_string());
    agent_config.socket_path = agent_dir.join("public/api.sock");
    let agent = RunningAgent::start_with(agent_config).await;

    let spooled = cli
        .wait_event("the events spooled while the server was down", |e| {
            field(e, "kind") == "workload.jwt" && names(e, "audience", "while-down")
        })
        .await;
    assert_eq!(field(&spooled, "agent_id"), agent.id);
    let events = cli.events();
    // Repeats of one answer are folded: an event with `folded=N` stands
    // for N calls, and the agent records what it folded as it stops.
    let fetched_while_down: u64 = events
        .iter()
        .filter(|e| {
            field(e, "kind") == "workload.x509"
                && field(e, "decision") == "allow"
                && e["seq"].as_u64().unwrap() > before as u64
        })
        .map(|e| e["attrs"]["folded"].as_str().and_then(|n| n.parse().ok()).unwrap_or(1))
        .sum();
    assert!(fetched_while_down >= 3, "the fetches made while the server was down were delivered");
    // Nothing before the restart was lost, and each agent event arrived
    // once: no (agent, spool position) stored twice, wherever the twin is.
    assert!(events.len() > before);
    let mut seen = std::collections::BTreeMap::new();
    for e in &events {
        let Some(agent_seq) = e["agent_seq"].as_u64() else { continue };
        let key = (field(e, "agent_id").to_string(), agent_seq);
        if let Some(first) = seen.insert(key, e["seq"].as_u64()) {
            panic!("agent event {agent_seq} stored twice (seq {first:?} and {}): {e}", e["seq"]);
        }
    }
    assert!(seen.len() >= 3, "the agent's events were stored: {}", seen.len());
    assert!(cli.ok(None, &["events", "verify"]).contains("Event chain is intact"));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampering_with_stored_events_is_reported_by_verify() {
    use prost::Message;
    use tessera_proto::types::Event;
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |_| {}).await;
    for _ in 0..5 {
        server.join_token("", 60).await;
    }
    let cli = Cli::new(&server);
    assert_eq!(cli.events().len(), 5);
    assert!(cli.ok(None, &["events", "verify"]).contains("5 events"));
    let (addr, data_dir, socket) =
        (server.addr, server.data_dir.clone(), server.admin_socket.clone());
    server.stop().await;

    let restart = || {
        let mut config = test_config(&data_dir);
        config.bind = addr;
        config.admin_socket = socket.clone();
        TestServer::start_with(config, Arc::new(SystemClock))
    };
    let edit = |f: &dyn Fn(&sled::Tree)| {
        let db = sled::open(data_dir.join("store")).unwrap();
        let tree = db.open_tree("events").unwrap();
        f(&tree);
        db.flush().unwrap();
    };
    let key = |seq: u64| seq.to_be_bytes();
    let original = {
        let db = sled::open(data_dir.join("store")).unwrap();
        let value = db.open_tree("events").unwrap().get(key(2)).unwrap().unwrap();
        value.to_vec()
    };

    // An edited event: its hash no longer matches.
    edit(&|tree| {
        let mut e = Event::decode(original.as_slice()).unwrap();
        e.reason = "nothing happened here".into();
        tree.insert(key(2), e.encode_to_vec()).unwrap();
    });
    let server = restart().await;
    let out = cli.run(None, &["events", "verify"]);
    assert!(!out.status.success(), "verify passed an edited event");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken at event 2") && stderr.contains("altered"), "{stderr}");
    server.stop().await;

    // A removed event: the sequence has a gap and the chain a missing link.
    edit(&|tree| {
        tree.insert(key(2), original.clone()).unwrap();
        tree.remove(key(4)).unwrap();
    });
    let server = restart().await;
    let out = cli.run(None, &["events", "verify", "--json"]);
    assert!(!out.status.success(), "verify passed a removed event");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["broken_at"], 4, "{report}");
    assert!(field(&report, "problem").contains("missing"), "{report}");
    server.stop().await;

    // Rewriting an event with a hash that matches its new content still
    // breaks the link to the next one.
    edit(&|tree| {
        tree.insert(key(4), vec![]).unwrap();
        tree.remove(key(4)).unwrap();
        let mut e = Event::decode(original.as_slice()).unwrap();
        e.reason = "rewritten".into();
        e.hash = tessera_server::event_schema::chain_hash(&e.prev_hash, &e);
        tree.insert(key(2), e.encode_to_vec()).unwrap();
    });
    let server = restart().await;
    let out = cli.run(None, &["events", "verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken at event 3") && stderr.contains("does not follow"), "{stderr}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_above_the_threshold_wait_for_a_second_operator() {
    if !root_or_skip("approval by a second operator (two uids)") {
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.approval = ApprovalPolicy { uid_gid_only_selectors: true, ..Default::default() };
    })
    .await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let cli = Cli::new(&server);
    let exe = std::env::current_exe().unwrap().display().to_string();
    let path_selector = format!("unix:path:{exe}");

    // Matched by the policy (only a uid selector) and asked for explicitly.
    let create = |id: &str, selectors: &[&str], extra: &[&str]| {
        let mut args = vec!["entry", "create", "--spiffe-id", id, "--parent-id", &agent.id];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        args.extend(extra);
        let out = cli.run(Some(OPERATOR_A), &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), stderr)
    };
    let (by_policy, said) = create("spiffe://example.org/by-policy", &[&uid_selector()], &[]);
    assert!(said.contains("pending approval") && said.contains("only users or groups"), "{said}");
    let (by_flag, said) = create(
        "spiffe://example.org/by-flag",
        &[&uid_selector(), &path_selector],
        &["--require-approval"],
    );
    assert!(said.contains("--require-approval"), "{said}");
    let (ordinary, said) =
        create("spiffe://example.org/ordinary", &[&uid_selector(), &path_selector], &[]);
    assert!(!said.contains("pending"), "{said}");

    // Visible as pending, never signed or served.
    let shown = cli.ok(None, &["entry", "show", "--id", &by_policy]);
    assert!(
        shown.contains("pending approval")
            && shown.contains(&format!("Requested by uid : {OPERATOR_A}")),
        "{shown}"
    );
    let client = workload_client(&agent).await;
    let ids = within(PROMPTLY, "the ordinary entry's SVID", async {
        loop {
            if let Ok(svids) = client.fetch_all_x509_svids().await {
                return svids.iter().map(|s| s.spiffe_id().to_string()).collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        ids,
        vec!["spiffe://example.org/ordinary".to_string()],
        "pending entries are served"
    );
    let _ = ordinary;

    // The proposer cannot approve; nor can someone who is no operator.
    let hash = proposal_hash(&cli, &by_policy);
    let out = cli.run(Some(OPERATOR_A), &["entry", "approve", "--id", &by_policy, "--hash", &hash]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another operator must approve it"));
    let out = cli.run(Some(STRANGER), &["entry", "approve", "--id", &by_policy, "--hash", &hash]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an operator"));
    let events = cli.events();
    assert!(
        !events.iter().any(|e| field(e, "kind") == "svid.x509.issue"
            && (names(e, "entry_ids", &by_policy) || names(e, "entry_ids", &by_flag))),
        "a pending entry was signed"
    );

    // A second operator approves both: the workload gets them.
    for id in [&by_policy, &by_flag] {
        let hash = proposal_hash(&cli, id);
        let approve = ["entry", "approve", "--id", id, "--hash", &hash];
        assert!(cli.ok(Some(OPERATOR_B), &approve).contains("Approved"));
    }
    within(PROMPTLY, "the approved identities", async {
        loop {
            if client.fetch_all_x509_svids().await.is_ok_and(|s| s.len() == 3) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let approval = cli
        .wait_event("the approval", |e| {
            field(e, "kind") == "admin.entry.approve"
                && field(e, "decision") == "allow"
                && names(e, "entry_ids", &by_policy)
        })
        .await;
    assert_eq!(approval["operator"]["uid"], OPERATOR_B);
    assert_eq!(approval["attrs"]["requested_by_uid"], OPERATOR_A.to_string());
    let refused = cli
        .wait_event("the proposer's refused approval", |e| {
            field(e, "kind") == "admin.entry.approve" && field(e, "decision") == "deny"
        })
        .await;
    assert_eq!(refused["operator"]["uid"], OPERATOR_A);
    assert!(cli
        .events()
        .iter()
        .any(|e| field(e, "kind") == "admin.entry.pending" && names(e, "entry_ids", &by_flag)));

    // Every change to a --require-approval entry is held again; a rejected
    // change leaves the entry as it was.
    let out =
        cli.run(Some(OPERATOR_A), &["entry", "update", "--id", &by_flag, "--hint", "changed"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("pending approval"));
    let shown = cli.ok(None, &["entry", "show", "--id", &by_flag, "--json"]);
    assert!(!shown.contains("changed"), "the held update was applied: {shown}");
    let hash = proposal_hash(&cli, &by_flag);
    cli.ok(Some(OPERATOR_B), &["entry", "reject", "--id", &by_flag, "--reason", "no"]);
    cli.wait_event("the rejection", |e| field(e, "kind") == "admin.entry.reject").await;
    let out = cli.run(Some(OPERATOR_B), &["entry", "approve", "--id", &by_flag, "--hash", &hash]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no proposal"),
        "a rejected proposal was approved"
    );
    agent.stop().await;
    server.stop().await;
}

/// Parses `/metrics` with the Prometheus Python client's OpenMetrics parser
/// (the venv `scripts/test.sh` makes); `None` when skipped.
fn parse_metrics(text: &str) -> Option<serde_json::Map<String, Value>> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let python = std::env::var_os("TESSERA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/py-venv/bin/python"));
    let usable = Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        if std::env::var("TESSERA_SKIP_PYTHON").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED: parsing /metrics with prometheus_client (no Python)");
            return None;
        }
        panic!("no Python with prometheus_client at {}: run scripts/test.sh", python.display());
    }
    use std::io::Write;
    let mut child = Command::new(&python)
        .arg(workspace.join("tests/python/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "/metrics does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn sample(samples: &serde_json::Map<String, Value>, key: &str) -> f64 {
    samples.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_traffic_and_ready_means_serving() {
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let server_metrics = server.metrics_addr.unwrap();
    let agent_dir = dir.path().join("agent");
    let agent = RunningAgent::start_configured(&server, &agent_dir, |c| {
        c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let agent_metrics = agent.metrics_addr.unwrap();
    assert_eq!(http_get(server_metrics, "/live").0, 200);
    assert_eq!(http_get(server_metrics, "/ready"), (200, "ready\n".into()));
    assert_eq!(http_get(server_metrics, "/nope").0, 404);
    within(PROMPTLY, "the agent ready", async {
        while http_get(agent_metrics, "/ready").0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let (_, before_server) = http_get(server_metrics, "/metrics");
    let (_, before_agent) = http_get(agent_metrics, "/metrics");
    server.create_entry("spiffe://example.org/measured", &agent.id, &[&uid_selector()], None).await;
    let client = workload_client(&agent).await;
    within(PROMPTLY, "an SVID", async {
        while client.fetch_x509_svid().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(client.fetch_jwt_svid(["metrics-api"], None).await.is_ok());
    let (_, after_server) = http_get(server_metrics, "/metrics");
    let (_, after_agent) = http_get(agent_metrics, "/metrics");
    for text in [&after_server, &after_agent] {
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
    }
    if let (Some(s0), Some(s1), Some(a0), Some(a1)) = (
        parse_metrics(&before_server),
        parse_metrics(&after_server),
        parse_metrics(&before_agent),
        parse_metrics(&after_agent),
    ) {
        let moved = |before: &serde_json::Map<String, Value>,
                     after: &serde_json::Map<String, Value>,
                     key: &str| {
            let (b, a) = (sample(before, key), sample(after, key));
            assert!(a > b, "{key} did not move: {b} -> {a}\n{after:?}");
        };
        moved(&s0, &s1, "tessera_server_svids_issued_total{type=x509}");
        moved(&s0, &s1, "tessera_server_svids_issued_total{type=jwt}");
        moved(&s0, &s1, "tessera_server_svid_issue_seconds_count{type=x509}");
        moved(&s0, &s1, "tessera_server_events_stored_total{}");
        moved(&s0, &s1, "tessera_server_entry_push_delay_seconds_count{}");
        moved(
            &a0,
            &a1,
            "tessera_agent_workload_api_requests_total{method=FetchX509SVID,outcome=ok}",
        );
        moved(
            &a0,
            &a1,
            "tessera_agent_workload_api_requests_total{method=FetchJWTSVID,outcome=ok}",
        );
        moved(&a0, &a1, "tessera_agent_workload_attestation_seconds_count{}");
        assert_eq!(sample(&s1, "tessera_server_sync_streams{}"), 1.0);
        assert!(sample(&s1, "tessera_server_ca_expiry_seconds{}") > 3600.0);
        assert_eq!(sample(&a1, "tessera_agent_synced{}"), 1.0);
        assert_eq!(sample(&a1, "tessera_agent_x509_svids{}"), 1.0);
        // The allocator's figures are exported (their values: `heap::tests`).
        for (samples, prefix) in [(&s1, "tessera_server"), (&a1, "tessera_agent")] {
            for what in ["allocated", "resident"] {
                let key = format!("{prefix}_heap_{what}_bytes{{}}");
                assert!(samples.contains_key(&key), "{key} missing: {samples:?}");
            }
        }
        // A refusal is counted by kind and reason.
        assert!(client.fetch_jwt_svid(["a b"], None).await.is_err());
        let (_, text) = http_get(agent_metrics, "/metrics");
        let a2 = parse_metrics(&text).unwrap();
        assert!(
            a2.keys().any(|k| k.starts_with(
                "tessera_agent_refusals_total{kind=workload.jwt,reason=invalid-argument"
            )),
            "{a2:?}"
        );
        // An operator's words never become a label: revoked "key leaked",
        // the refusal is counted as the operator's, and every refusal
        // label is a code (no spaces, no serial).
        let svid = client.fetch_x509_svid().await.unwrap();
        let serial = serial_hex(svid.leaf().as_bytes());
        server
            .admin()
            .await
            .revoke_svid(tessera_proto::admin::RevokeSvidRequest {
                serial: serial.clone(),
                reason: "key leaked on build host 7".into(),
                jti: String::new(),
            })
            .await
            .unwrap();
        let (_, text) = http_get(server_metrics, "/metrics");
        let s2 = parse_metrics(&text).unwrap();
        assert!(
            s2.contains_key("tessera_server_refusals_total{kind=svid.revoke,reason=operator}"),
            "{s2:?}"
        );
        for text in [&text, &http_get(agent_metrics, "/metrics").1] {
            assert!(!text.contains("key leaked") && !text.contains(&serial), "{text}");
            for line in text.lines().filter(|l| l.contains("_refusals_total{")) {
                let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
                let reason = labels.split(',').find_map(|l| l.strip_prefix("reason=")).unwrap();
                let code = reason.trim_matches('"');
                assert!(
                    code.bytes().all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'_'),
                    "a refusal label that is not a code: {line}"
                );
            }
        }
    }

    // An agent whose server is away is live but not ready until it syncs.
    let (addr, server_dir, socket) =
        (server.addr, server.data_dir.clone(), server.admin_socket.clone());
    agent.stop().await;
    server.stop().await;
    let mut config = AgentConfig::new(agent_dir.clone(), addr.to_string());
    config.socket_path = agent_dir.join("public/api.sock");
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let agent = RunningAgent::start_with(config).await;
    let agent_metrics = agent.metrics_addr.unwrap();
    assert_eq!(http_get(agent_metrics, "/live").0, 200);
    let (status, body) = http_get(agent_metrics, "/ready");
    assert_eq!(status, 503, "ready without a server: {body}");
    assert!(body.contains("not synced"), "{body}");
    let mut config = test_config(&server_dir);
    config.bind = addr;
    config.admin_socket = socket;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    within(PROMPTLY, "the agent ready once it synced", async {
        while http_get(agent_metrics, "/ready").0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proposal_nobody_approves_expires() {
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.approval = ApprovalPolicy { pending_ttl: Some(1), ..Default::default() };
    })
    .await;
    let cli = Cli::new(&server);
    let id = cli
        .ok(
            None,
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/forgotten",
                "--parent-id",
                "spiffe://example.org/node",
                "--selector",
                "unix:uid:1",
                "--require-approval",
            ],
        )
        .trim()
        .to_string();
    assert!(cli.ok(None, &["entry", "show"]).contains("pending approval"));
    let hash = proposal_hash(&cli, &id);
    let expired =
        cli.wait_event("the proposal's expiry", |e| field(e, "kind") == "admin.entry.reject").await;
    assert_eq!(field(&expired, "decision"), "deny");
    assert!(names(&expired, "entry_ids", &id));
    assert!(field(&expired, "reason").contains("in time"), "{expired}");
    assert!(cli.ok(None, &["entry", "show"]).contains("Found 0 entries"));
    let approve = ["entry", "approve", "--id", &id, "--hash", &hash];
    // By a second operator, so that only the expiry can refuse it.
    let approver = root_or_skip("approving as a second operator").then_some(OPERATOR_B);
    let out = cli.run(approver, &approve);
    assert!(!out.status.success(), "an expired proposal was approved");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        approver.is_none() || said.contains("no proposal") || said.contains("expired"),
        "refused for another reason than its expiry: {said}"
    );
    server.stop().await;
}
