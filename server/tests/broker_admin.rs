//! The token broker's operator commands on a running server: a task's
//! life (start, list, show, end, refused a second end) with its events,
//! and the refusals of `request` commands (unknown IDs, bad input), each
//! one line on stderr and exit code 1. Held requests themselves are made
//! by the broker's HTTP side; their decisions are tested in the store's
//! conformance suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Output;

use common::RunningServer;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Runs a command that must succeed; its stdout.
fn ok(server: &RunningServer, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// Runs a command that must be refused: exit 1, one line on stderr
/// (returned), nothing on stdout.
fn refused(server: &RunningServer, args: &[&str]) -> String {
    let out = server.cli(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    err
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The stored events of kinds starting with `kind`.
fn events(server: &RunningServer, kind: &str) -> Vec<serde_json::Value> {
    ok(server, &["events", "--json", "--kind", kind]).lines().map(json).collect()
}

fn attr<'a>(event: &'a serde_json::Value, key: &str) -> &'a str {
    event["attrs"][key].as_str().unwrap_or("")
}

#[test]
fn a_task_is_started_listed_shown_and_ended_once_with_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);
    let workload = "spiffe://example.org/agents/billing";

    let id = ok(
        &server,
        &["task", "start", "--spiffe-id", workload, "--ttl", "30m", "--label", "ticket=T-42"],
    );
    assert!(id.starts_with("task-") && !id.contains(char::is_whitespace), "prints the ID: {id}");

    let list = json(&ok(&server, &["task", "list", "--json"]));
    let tasks = list.as_array().unwrap();
    assert_eq!(tasks.len(), 1);
    let task = &tasks[0];
    assert_eq!((task["id"].as_str(), task["state"].as_str()), (Some(id.as_str()), Some("live")));
    assert_eq!(task["spiffe_id"], workload);
    assert_eq!(task["labels"]["ticket"], "T-42");
    let lasts =
        task["expires_at_unix"].as_i64().unwrap() - task["created_at_unix"].as_i64().unwrap();
    assert_eq!(lasts, 1800, "--ttl 30m");
    assert!(task["started_by"].as_str().unwrap().starts_with("uid:"));

    let shown = ok(&server, &["task", "show", "--id", &id]);
    assert!(shown.contains(&id) && shown.contains(workload) && shown.contains("live"), "{shown}");
    assert!(shown.contains("ticket=T-42"), "{shown}");

    // The default lifetime is an hour; a second task shows in the list.
    let second = json(&ok(&server, &["task", "start", "--spiffe-id", workload, "--json"]));
    let lasts =
        second["expires_at_unix"].as_i64().unwrap() - second["created_at_unix"].as_i64().unwrap();
    assert_eq!(lasts, 3600);
    assert!(ok(&server, &["task", "list"]).contains("Found 2 tasks"));

    // Ended by ID given as an argument, then refused a second time.
    let ended = ok(&server, &["task", "end", &id, "--reason", "work done"]);
    assert!(ended.contains(&id), "{ended}");
    let shown = json(&ok(&server, &["task", "show", "--id", &id, "--json"]));
    assert_eq!(shown["state"], "ended");
    assert!(shown["ended_by"].as_str().unwrap().ends_with(": work done"), "{shown}");
    let err = refused(&server, &["task", "end", "--id", &id]);
    assert!(err.contains(&id) && err.contains("has ended"), "{err}");
    // --id works too.
    ok(&server, &["task", "end", "--id", second["id"].as_str().unwrap()]);

    let started = events(&server, "broker.task.start");
    assert_eq!(started.len(), 2, "{started:?}");
    let first = started.iter().find(|e| attr(e, "task") == id).unwrap();
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["spiffe_ids"][0], workload);
    assert!(first["operator"]["uid"].is_number(), "names the operator: {first}");
    assert_eq!(attr(first, "labels"), "ticket=T-42");
    let ends = events(&server, "broker.task.end");
    let end = ends.iter().find(|e| attr(e, "task") == id && e["decision"] == "allow").unwrap();
    assert_eq!(end["reason"], "work done");
    assert_eq!(end["spiffe_ids"][0], workload);
    assert!(end["operator"]["uid"].is_number());
    let refusal = ends.iter().find(|e| attr(e, "task") == id && e["decision"] == "deny");
    assert!(refusal.is_some(), "the refused second end is an event too: {ends:?}");
}

#[test]
fn bad_task_input_and_unknown_ids_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);

    let err = refused(&server, &["task", "end", "--id", "task-nope"]);
    assert!(err.contains("task-nope") && err.contains("does not exist"), "{err}");
    let err = refused(&server, &["task", "show", "--id", "task-nope"]);
    assert!(err.contains("does not exist"), "{err}");
    let err =
        refused(&server, &["task", "start", "--spiffe-id", "spiffe://other.org/w", "--ttl", "60"]);
    assert!(err.contains("not in trust domain"), "{err}");
    let err = refused(&server, &["task", "start", "--spiffe-id", "not-an-id"]);
    assert!(err.contains("invalid task SPIFFE ID"), "{err}");
    let err = refused(
        &server,
        &["task", "start", "--spiffe-id", "spiffe://example.org/w", "--ttl", "2d"],
    );
    assert!(err.contains("at most 86400s"), "{err}");
    let err = refused(
        &server,
        &["task", "start", "--spiffe-id", "spiffe://example.org/w", "--label", "no-equals"],
    );
    assert!(err.contains("key=value"), "{err}");
    assert_eq!(json(&ok(&server, &["task", "list", "--json"])), serde_json::json!([]));
}

#[test]
fn decisions_on_unknown_requests_and_bad_input_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);

    assert_eq!(json(&ok(&server, &["request", "list", "--json"])), serde_json::json!([]));
    assert!(ok(&server, &["request", "list"]).contains("Found 0 requests"));
    for args in [
        &["request", "show", "--id", "req-nope"][..],
        &["request", "approve", "--id", "req-nope"],
        &["request", "approve", "--id", "req-nope", "--hash", "abc"],
        &["request", "deny", "--id", "req-nope", "--reason", "no"],
        &["request", "deny", "--id", "req-nope", "--reason", "no", "--hash", "abc"],
    ] {
        let err = refused(&server, args);
        assert!(err.contains("req-nope") && err.contains("does not exist"), "{args:?}: {err}");
    }
    // Refused before the store is asked: a denial without a reason.
    let err =
        refused(&server, &["request", "deny", "--id", "req-nope", "--reason", " ", "--hash", "h"]);
    assert!(err.contains("reason"), "{err}");
    // The refused decisions are events.
    let denied = events(&server, "broker.request");
    assert!(
        denied.iter().any(|e| e["kind"] == "broker.request.approve"
            && e["decision"] == "deny"
            && attr(e, "request") == "req-nope"),
        "{denied:?}"
    );
    assert!(denied.iter().any(|e| e["kind"] == "broker.request.deny" && e["decision"] == "deny"));
}
