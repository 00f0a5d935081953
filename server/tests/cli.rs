//! The `tessera-server` binary as an operator uses it: `run` on an empty data
//! dir, then entry, token, agent and bundle commands over the admin socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{RunningServer, BIN};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn entry_count(server: &RunningServer) -> usize {
    let out = server.cli(&["entry", "show", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array().unwrap().len()
}

#[test]
fn operator_workflow_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);

    let token = server.cli(&["token", "generate", "--spiffe-id", "spiffe://example.org/node/1"]);
    assert!(token.status.success(), "{}", stderr(&token));
    assert_eq!(stdout(&token).len(), 36, "prints the token");

    let create = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/node/1",
        "--selector",
        "unix:uid:1000",
        "--x509-svid-ttl",
        "60",
        "--dns-name",
        "web.internal",
    ];
    let out = server.cli(&create);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out);
    assert_eq!(id.len(), 36, "prints the entry id: {id}");
    assert_eq!(entry_count(&server), 1);

    let bad: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/../b",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:1",
            ],
            "dot segment",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "k8s:ns:default",
            ],
            "selector",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unixuid",
            ],
            "selector",
        ),
        (&["--spiffe-id", "spiffe://example.org/x", "--selector", "unix:uid:1"], "--parent-id"),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:1",
                "--x509-svid-ttl",
                "0",
            ],
            "TTL",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/n",
                "--selector",
                "unix:uid:1",
                "--expires-at",
                "tomorrow",
            ],
            "expires-at",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                "spiffe://example.org/node/1",
                "--selector",
                "unix:uid:1000",
            ],
            "already exists",
        ),
        (&["--spiffe-id", "spiffe://example.org/x", "--bogus-flag"], "--bogus-flag"),
    ];
    for (args, expected) in bad {
        let mut full = vec!["entry", "create"];
        full.extend_from_slice(args);
        let out = server.cli(&full);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(err.lines().count(), 1, "one-line error for {args:?}: {err}");
        assert!(err.to_lowercase().contains(&expected.to_lowercase()), "{args:?}: {err}");
    }
    assert_eq!(entry_count(&server), 1, "refused requests change nothing");

    // Update keeps unspecified fields; delete removes.
    let out = server.cli(&["entry", "update", "--id", &id, "--x509-svid-ttl", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["entry", "show", "--id", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown[0]["x509_svid_ttl"], 120);
    assert_eq!(shown[0]["dns_names"][0], "web.internal");
    let out = server.cli(&["entry", "show"]);
    assert!(stdout(&out).contains("Selector         : unix:uid:1000"));

    let out = server.cli(&["bundle", "show"]);
    assert!(stdout(&out).starts_with("-----BEGIN CERTIFICATE-----"));
    let out = server.cli(&["agent", "list", "--json"]);
    assert_eq!(stdout(&out), "[]");
    let out = server.cli(&["agent", "show", "--id", "spiffe://example.org/node/1"]);
    assert!(!out.status.success() && stderr(&out).contains("not found"));

    let out = server.cli(&["entry", "delete", "--id", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["entry", "delete", "--id", &id]);
    assert!(!out.status.success() && stderr(&out).contains("not found"));
    assert_eq!(entry_count(&server), 0);

    // Entries survive a restart of the process.
    let out = server.cli(&create);
    assert!(out.status.success());
    server.stop();
    let server = RunningServer::start(dir.path(), &[]);
    assert_eq!(entry_count(&server), 1);
    server.stop();
}

/// Labels: set on create, shown as text and JSON, replaced by `update
/// --label`, kept by an update without one, removed by `--clear-labels`,
/// in the update event's before and after; a bad label is one line.
#[test]
fn entry_labels_are_set_shown_replaced_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);
    let base = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/agents/finance-bot",
        "--parent-id",
        "spiffe://example.org/node/1",
        "--selector",
        "unix:uid:1000",
    ];
    let labels = |id: &str| {
        let out = server.cli(&["entry", "show", "--id", id, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        shown[0]["labels"].clone()
    };

    let mut create = base.to_vec();
    create.extend(["--label", "team=finance", "--label", "app.example/tier=gold plated"]);
    let out = server.cli(&create);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out);
    assert_eq!(
        labels(&id),
        serde_json::json!({"team": "finance", "app.example/tier": "gold plated"})
    );
    let text = stdout(&server.cli(&["entry", "show", "--id", &id]));
    assert!(text.contains("Label            : team=finance"), "{text}");
    assert!(text.contains("Label            : app.example/tier=gold plated"), "{text}");

    // --label replaces the set; an update without it keeps it.
    let out = server.cli(&["entry", "update", "--id", &id, "--label", "team=sales"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(labels(&id), serde_json::json!({"team": "sales"}));
    let out = server.cli(&["entry", "update", "--id", &id, "--x509-svid-ttl", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(labels(&id), serde_json::json!({"team": "sales"}));
    let out = server.cli(&["events", "--json", "--kind", "admin.entry.update"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(first["before"]["labels"]["team"], "finance", "{first}");
    assert_eq!(first["after"]["labels"], serde_json::json!({"team": "sales"}), "{first}");
    let out = server.cli(&["entry", "update", "--id", &id, "--clear-labels"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(labels(&id), serde_json::json!({}));
    let out = server.cli(&["entry", "update", "--id", &id, "--clear-labels", "--label", "a=b"]);
    assert!(!out.status.success(), "--clear-labels with --label is refused");

    let long_value = format!("team={}", "v".repeat(257));
    let bad: &[(&str, &[&str])] = &[
        ("bad key=v", &["invalid label key", "bad key"]),
        ("=v", &["invalid label key"]),
        ("team=line\nbreak", &["invalid value for label", "team"]),
        (&long_value, &["invalid value for label", "team"]),
        ("novalue", &["--label", "key=value"]),
    ];
    for (label, expected) in bad {
        let mut args = base.to_vec();
        args[3] = "spiffe://example.org/agents/other";
        args.extend(["--label", label]);
        let out = server.cli(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{label:?} must fail");
        assert_eq!(err.lines().count(), 1, "one-line error for {label:?}: {err}");
        for want in *expected {
            assert!(err.contains(want), "{label:?}: {err}");
        }
    }
    let out = server.cli(&["entry", "update", "--id", &id, "--label", "k\tey=v"]);
    assert!(!out.status.success() && stderr(&out).lines().count() == 1, "{}", stderr(&out));
    assert_eq!(entry_count(&server), 1, "refused requests change nothing");
    server.stop();
}

#[test]
fn bad_config_and_flags_exit_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "trust_domain = \"example.org\"\nunknown_key = 1\n").unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec!["run".into(), "--config".into(), config.display().to_string()],
        vec!["run".into(), "--data-dir".into(), dir.path().display().to_string()],
        vec!["run".into(), "--trust-domain".into(), "Not A Domain".into()],
        vec!["run".into(), "--no-such-flag".into()],
        vec![
            "run".into(),
            "--trust-domain".into(),
            "example.org".into(),
            "--log-format".into(),
            "xml".into(),
        ],
        vec![
            "healthcheck".into(),
            "--socket".into(),
            dir.path().join("none.sock").display().to_string(),
        ],
    ];
    for args in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// `log_format = "json"`: every log line the server writes is one JSON
/// object with its level, target and fields; audit records included.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "log_format = \"json\"\n").unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let socket = data.join("admin.sock");
    let cli = |args: &[&str]| {
        Command::new(BIN).args(args).args(["--socket", socket.to_str().unwrap()]).output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli(&["healthcheck"]).status.success() {
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    // An audited refusal: revoking a serial the server never issued.
    assert!(!cli(&["svid", "revoke", "--serial", "0badc0de"]).status.success());
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["target"].is_string()), "{text}");
    // The audit record carries the event's fields.
    assert!(
        lines.iter().any(|l| l["target"] == "tessera::audit"
            && l["kind"] == "svid.revoke"
            && l["decision"] == "deny"
            && l["operator_uid"].is_number()
            && l["reason"].as_str().is_some_and(|r| r.contains("0badc0de"))),
        "{text}"
    );
}

#[test]
fn revocation_commands_and_crl_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);

    let out = server.cli(&["bundle", "show", "--crl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("-----BEGIN X509 CRL-----"));
    let crl = dir.path().join("crl.pem");
    std::fs::write(&crl, &out.stdout).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, server.cli(&["bundle", "show"]).stdout).unwrap();
    let check = Command::new("openssl")
        .args(["crl", "-noout", "-CAfile"])
        .arg(&bundle)
        .arg("-in")
        .arg(&crl)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success() && said.contains("verify OK"), "openssl crl: {said}");

    for (args, expected) in [
        (vec!["svid", "revoke", "--serial", "not-hex"], "invalid serial"),
        (vec!["svid", "revoke", "--serial", "4f:3a:99"], "no unexpired SVID with serial 4f3a99"),
        (vec!["agent", "ban", "--id", "spiffe://example.org/nobody"], "not found"),
        (vec!["agent", "evict", "--id", "spiffe://example.org/nobody"], "not found"),
        (vec!["agent", "ban", "--id", "not a spiffe id"], "invalid agent SPIFFE ID"),
    ] {
        let out = server.cli(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let out = server.cli(&["svid", "revoked", "--json"]);
    assert_eq!(stdout(&out), "[]");
    server.stop();
}

fn create_entries(server: &RunningServer, n: usize) {
    for i in 0..n {
        let spiffe_id = format!("spiffe://example.org/w{i}");
        let uid = format!("unix:uid:{i}");
        let out = server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &spiffe_id,
            "--parent-id",
            "spiffe://example.org/node/1",
            "--selector",
            &uid,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// `tessera-server run` on `data_dir`, expecting it to refuse to start.
fn refused_start(data_dir: &Path) -> Output {
    let mut child = Command::new(BIN)
        .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline || data_dir.join("admin.sock").exists() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the server started on a damaged store: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else if item.file_type().unwrap().is_file() {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

/// Item 7: one flipped bit in the store made the server start on an empty
/// registry (sled's recovery drops what follows a bad checksum), and every
/// agent then withdrew every identity. Now the server refuses to start with
/// one line naming the damage, wherever the bit is.
#[test]
fn a_store_with_a_flipped_bit_is_refused_never_served_smaller() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = RunningServer::start(&data, &[]);
    create_entries(&server, 3);
    server.stop();
    let db = std::fs::read(data.join("store/db")).unwrap();
    for percent in [10, 30, 50, 70, 90] {
        let copy = dir.path().join(format!("copy-{percent}"));
        copy_dir(&data, &copy);
        let mut bytes = db.clone();
        bytes[db.len() * percent / 100] ^= 0x10;
        std::fs::write(copy.join("store/db"), &bytes).unwrap();
        let out = refused_start(&copy);
        assert!(!out.status.success());
        let err = stderr(&out);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: store") && last.contains("damaged"), "{percent}%: {err}");
    }
    // The undamaged store still starts with all three entries.
    let server = RunningServer::start(&data, &[]);
    assert_eq!(entry_count(&server), 3);
    let check = server.cli(&["store", "check"]);
    assert!(stdout(&check).starts_with("Store is whole"), "{}", stderr(&check));
}

#[test]
fn store_backup_of_a_running_server_restores_into_a_new_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(&dir.path().join("server"), &[]);
    create_entries(&server, 4);
    let backup = dir.path().join("backup.tsb");
    let out = server.cli(&["store", "backup", "--out", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777, 0o600);
    server.stop();

    let restored = dir.path().join("restored");
    let out = Command::new(BIN)
        .args(["store", "restore", "--in", backup.to_str().unwrap(), "--data-dir"])
        .arg(&restored)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("4 entries"), "{}", stdout(&out));
    // The CA keys are not in the store: an operator copies them too.
    for key in std::fs::read_dir(dir.path().join("server")).unwrap() {
        let key = key.unwrap();
        if key.file_type().unwrap().is_file() && key.file_name() != "admin.sock" {
            std::fs::copy(key.path(), restored.join(key.file_name())).unwrap();
        }
    }
    let server = RunningServer::start(&restored, &[]);
    assert_eq!(entry_count(&server), 4);
    server.stop();

    // Restoring over a store, or from a damaged file: one line, nothing changed.
    let out = Command::new(BIN)
        .args(["store", "restore", "--in", backup.to_str().unwrap(), "--data-dir"])
        .arg(&restored)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already holds a store"), "{}", stderr(&out));
    let mut bytes = std::fs::read(&backup).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    std::fs::write(&backup, bytes).unwrap();
    let out = Command::new(BIN)
        .args(["store", "restore", "--in", backup.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("checksum"), "{}", stderr(&out));
}

#[test]
fn the_sample_deploy_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let file = tessera_server::FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let config = tessera_server::Config::resolve(file, tessera_server::FileConfig::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.trust_domain.as_str(), "example.org");
    assert!(config.approval.uid_gid_only_selectors && config.approval.root_selectors);
    assert_eq!(config.approval.protected_path_prefixes, vec!["/prod".to_string()]);
    assert!(config.metrics_addr.is_some());
    assert_eq!(config.admin_socket, std::path::PathBuf::from("/run/tessera-server/admin.sock"));
}
