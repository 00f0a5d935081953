//! The operator's path with the real binaries: `tessera-server run`, a join
//! token, an entry, `tessera-agent run`, then `tessera-agent api fetch` as
//! the workload — every step through the documented CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

mod common;

use common::{free_port, ok, run, server_bin, wait_until, Process, AGENT};

fn fetch_json(socket: &str) -> serde_json::Value {
    serde_json::from_str(&ok(run(
        Path::new(AGENT),
        &["api", "fetch", "--json", "--socket", socket],
    )))
    .unwrap()
}

#[test]
fn server_and_agent_binaries_serve_a_workload_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_bin();
    let admin = dir.path().join("server/admin.sock").display().to_string();
    let address = format!("127.0.0.1:{}", free_port());
    let server_data = dir.path().join("server").display().to_string();
    let server_process = Process::spawn(Command::new(&server).args([
        "run",
        "--trust-domain",
        "example.org",
        "--data-dir",
        &server_data,
        "--bind",
        &address,
    ]));
    wait_until("the server", || {
        run(&server, &["healthcheck", "--socket", &admin]).status.success()
    });

    let token = ok(run(
        &server,
        &["token", "generate", "--spiffe-id", "spiffe://example.org/node/1", "--socket", &admin],
    ));
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ok(run(&server, &["bundle", "show", "--socket", &admin]))).unwrap();
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid().to_string();
    ok(run(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/cli-workload",
            "--parent-id",
            "spiffe://example.org/node/1",
            "--selector",
            &format!("unix:uid:{uid}"),
            "--jwt-svid-ttl",
            "120",
            "--jwt-audience",
            "db",
            "--jwt-audience",
            "queue",
            "--socket",
            &admin,
        ],
    ));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(run(&server, &["entry", "show", "--json", "--socket", &admin])))
            .unwrap();
    assert_eq!(shown[0]["jwt_svid_ttl"], 120);
    assert_eq!(shown[0]["jwt_audiences"], serde_json::json!(["db", "queue"]));
    let text = ok(run(&server, &["entry", "show", "--socket", &admin]));
    assert!(
        text.contains("JWT-SVID TTL     : 120") && text.contains("JWT audience     : queue"),
        "{text}"
    );

    let agent_data = dir.path().join("agent").display().to_string();
    let socket_path = dir.path().join("run/api.sock").display().to_string();
    let socket = format!("unix://{socket_path}");
    let bundle_arg = bundle.display().to_string();
    let agent_args =
        ["run", "--data-dir", &agent_data, "--server-address", &address, "--socket", &socket_path];
    // The join token comes from a file, not the ps-visible command line.
    let token_file = dir.path().join("join-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let token_file_arg = token_file.display().to_string();
    let agent_log = dir.path().join("agent.log");
    let agent = Process::spawn_logging(
        Command::new(AGENT).args(agent_args).args([
            "--join-token-file",
            &token_file_arg,
            "--trust-bundle",
            &bundle_arg,
        ]),
        &agent_log,
    );
    wait_until("the agent", || {
        run(Path::new(AGENT), &["healthcheck", "--socket", &socket]).status.success()
    });
    // The log names the socket, and has no colour codes (stderr is a file).
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(log.contains(&format!("socket={socket_path}")), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escape codes in a log file: {log:?}");

    // The workload fetches its SVID and writes it out.
    let out = dir.path().join("out");
    let fetched = fetch_json(&socket);
    assert_eq!(fetched[0]["spiffe_id"], "spiffe://example.org/cli-workload");
    // The JSON holds the certificates and the bundle, never the key.
    for field in ["x509_svid", "bundle"] {
        assert!(fetched[0][field].as_str().unwrap().contains("BEGIN CERTIFICATE"), "{fetched}");
    }
    assert!(!fetched.to_string().contains("PRIVATE KEY"), "{fetched}");
    let serial = fetched[0]["serial"].as_str().unwrap().to_string();
    ok(run(
        Path::new(AGENT),
        &["api", "fetch", "--socket", &socket, "--write", &out.display().to_string()],
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("svid.0.key")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.0.pem"))
        .arg(out.join("svid.0.pem"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let agents: serde_json::Value =
        serde_json::from_str(&ok(run(&server, &["agent", "list", "--json", "--socket", &admin])))
            .unwrap();
    assert_eq!(agents[0]["spiffe_id"], "spiffe://example.org/node/1");

    // Revoking the serial gets the workload a new SVID.
    ok(run(&server, &["svid", "revoke", "--serial", &serial, "--socket", &admin]));
    wait_until("the replacement SVID", || {
        fetch_json(&socket)[0]["serial"].as_str() != Some(serial.as_str())
    });

    // JWT-SVIDs: fetch, validate, bundles, the audience policy, revocation by jti.
    let agent_cli = |args: &[&str]| run(Path::new(AGENT), &[args, &["--socket", &socket]].concat());
    let fetched: serde_json::Value = serde_json::from_str(&ok(agent_cli(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "db",
        "--json",
    ])))
    .unwrap();
    assert_eq!(fetched[0]["spiffe_id"], "spiffe://example.org/cli-workload");
    let token = fetched[0]["svid"].as_str().unwrap().to_string();
    let claims = tessera_workload_api::jwt::UnverifiedJwt::decode(&token).unwrap();
    assert_eq!(
        claims.claims["exp"].as_i64().unwrap() - claims.claims["iat"].as_i64().unwrap(),
        120
    );
    let jti = claims.jti().unwrap().to_string();
    let refused = agent_cli(&["api", "fetch", "jwt", "--audience", "payments"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("\"payments\"") && why.lines().count() == 1, "{why}");
    let valid = ok(agent_cli(&["api", "validate", "jwt", "--audience", "db", &token]));
    assert!(
        valid.contains("SVID is valid") && valid.contains("spiffe://example.org/cli-workload"),
        "{valid}"
    );
    let jwt_bundle = ok(agent_cli(&["api", "fetch", "jwt-bundle"]));
    assert!(jwt_bundle.starts_with("bundle(spiffe://example.org):"), "{jwt_bundle}");
    let spiffe_bundle: serde_json::Value = serde_json::from_str(&ok(run(
        &server,
        &["bundle", "show", "--format", "spiffe", "--socket", &admin],
    )))
    .unwrap();
    let keys = spiffe_bundle["keys"].as_array().unwrap();
    let kid = tessera_workload_api::jwt::UnverifiedJwt::decode(&token).unwrap().kid.unwrap();
    assert!(
        keys.iter().any(|k| k["use"] == "jwt-svid" && k["kid"] == kid.as_str()),
        "{spiffe_bundle}"
    );
    assert!(
        keys.iter().any(|k| k["use"] == "x509-svid"
            && k["x5c"].as_array().is_some_and(|c| c.len() == 1)
            && k.get("kid").is_none()),
        "{spiffe_bundle}"
    );
    assert!(spiffe_bundle["spiffe_sequence"].as_u64().unwrap() >= 1);
    assert!(spiffe_bundle["spiffe_refresh_hint"].as_u64().unwrap() >= 1);
    ok(run(&server, &["svid", "revoke", "--jti", &jti, "--reason", "test", "--socket", &admin]));
    wait_until("the revoked token to be refused", || {
        !agent_cli(&["api", "validate", "jwt", "--audience", "db", &token]).status.success()
    });
    let refused = agent_cli(&["api", "validate", "jwt", "--audience", "db", &token]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("revoked"));
    let unknown = run(&server, &["svid", "revoke", "--jti", "no-such-token", "--socket", &admin]);
    assert!(!unknown.status.success());
    let neither = run(&server, &["svid", "revoke", "--socket", &admin]);
    assert!(!neither.status.success());

    // The agent restarts on its stored SVID, with no bootstrap bundle and
    // its join-token file gone (as a systemd unit keeps naming it); this
    // time its log is JSON, one object per line.
    agent.stop();
    std::fs::remove_file(&token_file).unwrap();
    let json_log = dir.path().join("agent.json.log");
    let agent = Process::spawn_logging(
        Command::new(AGENT).args(agent_args).args([
            "--log-format",
            "json",
            "--join-token-file",
            &token_file_arg,
        ]),
        &json_log,
    );
    wait_until("the restarted agent", || {
        run(Path::new(AGENT), &["healthcheck", "--socket", &socket]).status.success()
    });
    assert_eq!(fetch_json(&socket)[0]["spiffe_id"], "spiffe://example.org/cli-workload");
    agent.stop();
    let log = std::fs::read_to_string(&json_log).unwrap();
    for line in log.lines() {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(line["level"].is_string(), "{line}");
    }
    assert!(log.contains(&format!("\"socket\":\"{socket_path}\"")), "{log}");
    let bad = run(Path::new(AGENT), &["run", "--log-format", "xml"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("xml"));
    server_process.stop();
}
