//! `tessera-server broker policy check` and `broker decide` as an operator
//! runs them: the real binary on the example policies and on broken copies.
//! Nothing is contacted; an error is one line on stderr and exit code 1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/broker")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A copy of the example policies, for breaking.
fn copy_of_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn check_of_the_examples_says_ok() {
    let dir = examples();
    let out = run(&[
        "broker",
        "policy",
        "check",
        dir.join("policies").to_str().unwrap(),
        "--resources",
        dir.join("resources.toml").to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("ok: 9 policies"), "{stdout}");
    assert!(stdout.contains("5 resources, schema schema.cedarschema"), "{stdout}");
}

#[test]
fn a_syntax_error_is_one_line_with_file_and_line() {
    let dir = copy_of_examples();
    let file = dir.path().join("tools.cedar");
    let mut policies = std::fs::read_to_string(&file).unwrap();
    let line = policies.lines().count() + 3; // a blank line, the @id, the broken line
    policies.push_str("\n@id(\"broken\")\npermit (principal, action resource);\n");
    std::fs::write(&file, policies).unwrap();
    let out = run(&["broker", "policy", "check", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(&format!("{}:{line}: ", file.display())), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_validation_error_names_the_policy() {
    let dir = copy_of_examples();
    std::fs::write(
        dir.path().join("extra.cedar"),
        "@id(\"typo\")\npermit (principal, action, resource)\n  when { resource.sensitivty > 3 };\n",
    )
    .unwrap();
    let out = run(&["broker", "policy", "check", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains("extra.cedar:3: policy typo does not validate"), "{stderr}");
}

fn decide(extra: &[&str]) -> Output {
    let dir = examples();
    let (policies, resources) = (dir.join("policies"), dir.join("resources.toml"));
    let mut args = vec![
        "broker",
        "decide",
        "--policy-dir",
        policies.to_str().unwrap(),
        "--resources",
        resources.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn decide_prints_decision_blast_radius_and_policies() {
    let reporter = ["--spiffe-id", "spiffe://example.org/agents/reporter"];
    let crm = ["--tool", "https://tools.example/crm"];
    let out = decide(&[&reporter[..], &crm, &["--action", "read"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("decision:     Allow"), "{stdout}");
    assert!(stdout.contains("blast radius: 3"), "{stdout}");
    assert!(stdout.contains("policies:     reporter-read-crm"), "{stdout}");

    let out = decide(&[&reporter[..], &crm, &["--action", "read", "--action", "delete"]].concat());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("decision:     Deny"), "{stdout}");
    assert!(stdout.contains("policies:     no-crm-delete"), "{stdout}");
    assert!(stdout.contains(
        "reason:       forbidden by no-crm-delete (delete on https://tools.example/crm)"
    ));

    let targets = [
        "--target",
        "https://tools.example/crm/accounts",
        "--target",
        "https://tools.example/crm/contracts",
        "--task-age",
        "30",
        "--json",
    ];
    let out = decide(&[&reporter[..], &crm, &["--action", "write"], &targets].concat());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outcome"], "approval");
    assert_eq!(json["blast_radius"], 24);
    assert_eq!(json["policies"], serde_json::json!(["reporter-write-crm-broad"]));
    assert_eq!(json["approval"], "a broad CRM write (blast radius above 20)");

    let billing = ["--spiffe-id", "spiffe://example.org/agents/billing", "--task", "task-1"];
    let pay = ["--tool", "https://payments.example", "--action", "transfer", "--json"];
    let out = decide(&[&billing[..], &pay, &["--amount", "5000"]].concat());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outcome"], "approval");
    assert_eq!(json["policies"], serde_json::json!(["billing-transfer-large"]));
    let out = decide(
        &[&billing[..], &pay, &["--amount", "50", "--anomaly", "anomaly.broker_denial_burst"]]
            .concat(),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outcome"], "deny");
    assert_eq!(json["policies"], serde_json::json!(["no-transfer-when-anomalous"]));
}

#[test]
fn decide_refuses_a_bad_spiffe_id_in_one_line() {
    let out = decide(&["--spiffe-id", "reporter", "--action", "read", "--tool", "x"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--spiffe-id reporter"), "{stderr}");
}

/// A server whose `[broker]` names a policy directory with an error does
/// not start: one line naming the file and line, a non-zero exit.
#[test]
fn a_server_with_a_bad_policy_does_not_start() {
    let policies = copy_of_examples();
    std::fs::write(policies.path().join("broken.cedar"), "permit (principal, action, resource)\n")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind = \"127.0.0.1:0\"\n\n[broker]\nbind = \"127.0.0.1:0\"\nissuer = \"https://127.0.0.1:8443\"\npolicy_dir = \"{}\"\n",
            dir.path().join("data").display(),
            policies.path().display()
        ),
    )
    .unwrap();
    let out =
        Command::new(BIN).args(["run", "--config", config.to_str().unwrap()]).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.contains("broken.cedar:1"), "{stderr}");
}
