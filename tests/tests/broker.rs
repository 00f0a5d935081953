//! The token broker end to end, with independent clients: a server with a
//! `[broker]` (operator TLS certificate, the example policies of
//! `examples/broker/`), an agent, and `tests/python/broker_flow.py` — a
//! Python AI agent (py-spiffe for its SVIDs, `requests` for the exchange)
//! and a Python tool (PyJWT with the JWKS found through discovery, and
//! introspection with its own JWT-SVID). An operator approves a held
//! request with the CLI as a second uid; the workload's own uid cannot.
//! Then the event stream is checked for every decision.
//!
//! Needs root (the approver runs as another uid) and the Python of
//! `scripts/test.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod operators;

use std::process::Command;

use common::{server_bin, uid_selector, within, PROMPTLY};
use operators::{governed_server, is_root, open_tempdir, Cli, OPERATOR_B};
use serde_json::Value;
use tessera_tests::broker::{broker_config, free_port, python, workspace};
use tessera_tests::RunningAgent;

const AGENT: &str = "spiffe://example.org/agents/reporter";
const TOOL: &str = "spiffe://example.org/tools/crm";

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_is_denied_waits_for_approval_and_loses_its_tokens_with_its_task() {
    if !is_root() {
        eprintln!("SKIPPED: the approver runs as a second uid, which needs root");
        return;
    }
    let Some(python) = python() else { return };
    let dir = open_tempdir();
    let port = free_port();
    let broker = broker_config(dir.path(), port);
    let server = governed_server(dir.path(), |c| c.broker = Some(broker.resolve().unwrap())).await;
    assert_eq!(server.broker_addr.map(|a| a.port()), Some(port));
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(AGENT, &agent.id, &[&uid_selector()], None).await;
    server.create_entry(TOOL, &agent.id, &[&uid_selector()], None).await;

    let script = workspace().join("tests/python/broker_flow.py");
    let ca = dir.path().join("ca.pem");
    let admin_socket = server.admin_socket.clone();
    let endpoint = agent.endpoint();
    let run = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .current_dir(workspace().join("tests/python"))
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            .env("BROKER_ISSUER", format!("https://127.0.0.1:{port}"))
            .env("BROKER_CA", &ca)
            .env("TESSERA_CLI", server_bin())
            .env("TESSERA_ADMIN_SOCKET", admin_socket)
            .env("TESSERA_APPROVER_UID", OPERATOR_B.to_string());
        command.output().unwrap()
    });
    let output = within(PROMPTLY * 12, "the Python agent and tool", run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "broker_flow.py failed:\n{stderr}\n--- its steps:\n{stdout}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    eprintln!("{stdout}");

    // Every bad input got its OAuth error and status.
    let bad = &step(&lines, "bad_input")["results"];
    let expect = [
        ("oversized", 413, "invalid_request"),
        ("json_body", 400, "invalid_request"),
        ("unknown_grant", 400, "unsupported_grant_type"),
        ("no_credential", 401, "invalid_client"),
        ("bad_details", 400, "invalid_authorization_details"),
        ("unknown_details_type", 400, "invalid_authorization_details"),
        ("wrong_audience", 400, "invalid_grant"),
        ("two_tools", 400, "invalid_target"),
        ("other_workloads_task", 400, "invalid_grant"),
        ("foreign", 400, "invalid_grant"),
        ("revoked", 400, "invalid_grant"),
        ("expired", 400, "invalid_grant"),
        ("introspect_anonymous", 401, "invalid_client"),
    ];
    for (name, status, error) in expect {
        assert_eq!(bad[name][0], status, "{name}: {}", bad[name]);
        assert_eq!(bad[name][1], error, "{name}: {}", bad[name]);
    }
    assert!(bad["revoked"][2].as_str().unwrap().contains("revoked"), "{}", bad["revoked"]);
    assert!(bad["expired"][2].as_str().unwrap().contains("expired"), "{}", bad["expired"]);

    // The event stream names every decision, with the workload, tool,
    // actions, task, score and deciding policies.
    let cli = Cli::new(&server);
    let events = cli.events();
    let of = |kind: &str, decision: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["kind"] == kind && (decision.is_empty() || e["decision"] == decision))
            .collect()
    };
    let task = step(&lines, "task")["task"].as_str().unwrap().to_string();
    let allowed = of("broker.token", "allow");
    assert!(allowed.len() >= 3, "{allowed:?}");
    let read = allowed[0];
    let text = read.to_string();
    for needle in
        [AGENT, "https://tools.example/crm", "reporter-read-crm", task.as_str(), "blast_radius"]
    {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let denied = of("broker.token", "deny");
    assert!(denied.iter().any(|e| e.to_string().contains("no-crm-delete")), "{denied:?}");
    assert_eq!(of("broker.request.pending", "").len(), 1);
    let approved = of("broker.request.approve", "allow");
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert!(approved[0].to_string().contains("OPS-1 bulk update"));
    assert!(approved[0].to_string().contains("reporter-write-crm-broad"));
    // The workload's own uid tried and was refused, on the record.
    let refused = of("broker.request.approve", "deny");
    assert!(refused.len() == 1 && refused[0].to_string().contains("own uid"), "{refused:?}");
    assert!(!of("broker.task.start", "").is_empty());
    // The task and the sub-task it ended in the same commit.
    let sub_task = step(&lines, "sub_task")["task"].as_str().unwrap().to_string();
    let ended = of("broker.task.end", "");
    assert_eq!(ended.len(), 2, "{ended:?}");
    for id in [&task, &sub_task] {
        assert!(
            ended.iter().any(|e| e.to_string().contains(id.as_str())),
            "{id} not ended: {ended:?}"
        );
    }
    assert!(of("broker.task.start", "allow")
        .iter()
        .any(|e| e.to_string().contains("agents-start-sub-tasks")));
    assert_eq!(of("broker.token.revoke", "").len(), 1);
    assert!(!of("anomaly.broker_first_tool", "").is_empty());
    let verified = cli.ok(None, &["events", "verify"]);
    assert!(verified.contains("chain is intact"), "{verified}");

    agent.stop().await;
    server.stop().await;
}
