//! The `tessera-agent` binary refuses bad input with one line and a
//! non-zero exit, before touching anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-agent");

#[test]
fn bad_input_gets_one_line_and_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let data_arg = data.display().to_string();
    let garbage_arg = garbage.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--data-dir", &data_arg], "no trust bundle"),
        (
            vec![
                "run",
                "--data-dir",
                &data_arg,
                "--trust-bundle",
                &garbage_arg,
                "--join-token",
                "t",
            ],
            "no CERTIFICATE",
        ),
        (vec!["run", "--no-such-flag"], "--no-such-flag"),
        (
            vec!["run", "--data-dir", &data_arg, "--server-address", "127.0.0.1:8081,no-port"],
            "invalid server address \"no-port\": want host:port",
        ),
        (vec!["run", "--data-dir", &data_arg, "--trust-domain", "Bad Domain"], "trust"),
        (vec!["api", "fetch", "--socket", "unix:///nonexistent/api.sock"], "does not exist"),
        (vec!["api", "fetch", "--socket", "tcp://127.0.0.1:1"], "invalid Workload API address"),
        (vec!["healthcheck", "--socket", "unix:///nonexistent/api.sock"], "unhealthy"),
    ];
    for (args, expected) in cases {
        let out =
            Command::new(BIN).args(&args).env_remove("SPIFFE_ENDPOINT_SOCKET").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert!(!data.join("agent_key.pem").exists(), "nothing was written for refused runs");
}

/// A socket behind a directory the caller may not search is reported as
/// "permission denied", not as missing. As root the CLI runs as uid 65534
/// (root may search anything); otherwise the directory is made unsearchable.
#[test]
fn unreachable_socket_says_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let socket = private.join("api.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let root = rustix::process::geteuid().is_root();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        &private,
        std::fs::Permissions::from_mode(if root { 0o700 } else { 0 }),
    )
    .unwrap();
    let address = format!("unix://{}", socket.display());
    for args in
        [vec!["api", "fetch", "--socket", &address], vec!["healthcheck", "--socket", &address]]
    {
        let mut command = Command::new(BIN);
        command.args(&args).env_remove("SPIFFE_ENDPOINT_SOCKET");
        if root {
            command.uid(65534).gid(65534);
        }
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains("permission denied"), "{args:?}: {err}");
        assert!(!err.contains("does not exist"), "{args:?}: {err}");
    }
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
}
