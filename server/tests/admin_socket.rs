//! Reaching the admin socket, as an operator meets it with the real binary:
//! the startup warning when configured operators cannot reach it, the
//! CLI's "permission denied" (not "does not exist") for a caller a
//! directory shuts out, `TESSERA_ADMIN_SOCKET`, the offline store check on
//! a running server, and what the refusal event and startup log say.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{RunningServer, BIN};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `tessera-server ARGS` as uid/gid 4242 with no supplementary groups.
fn as_uid_4242(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", "4242", "--regid", "4242", "--clear-groups", BIN])
        .args(args)
        .output()
        .unwrap()
}

fn config(dir: &Path, body: &str) -> String {
    let path = dir.join("server.toml");
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

/// The README's own layout: `admin_uids = [4242]` with the socket inside
/// the 0700 data dir. The server says at startup that uid 4242 cannot
/// reach it, and uid 4242's CLI says "permission denied", not that the
/// server is not running.
#[test]
fn an_operator_shut_out_by_the_data_dir_is_warned_about_and_told_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let socket = data.join("admin.sock");
    let log = dir.path().join("server.log");
    let config = config(dir.path(), "admin_uids = [4242]\n");
    let server = RunningServer::start_at(&data, &socket, &["--config", &config], &log);
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("operator uid 4242 cannot reach the admin socket"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line for uid 4242:\n{text}");
    assert!(warnings[0].contains(data.to_str().unwrap()), "names the closed dir: {}", warnings[0]);

    let out = as_uid_4242(&["entry", "show", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("does not exist"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Root still reaches it; a socket that really is missing says so.
    assert!(server.cli(&["healthcheck"]).status.success());
    let missing = dir.path().join("nothing.sock");
    let out = Command::new(BIN)
        .args(["healthcheck", "--socket", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    server.stop();
}

/// With the socket in a directory everyone can search, no warning; a
/// non-operator is refused, and the refusal event names the gRPC method.
#[test]
fn a_reachable_socket_draws_no_warning_and_a_refusal_names_its_method() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("run").join("admin.sock");
    let log = dir.path().join("server.log");
    let config = config(dir.path(), "admin_uids = [4243]\n");
    let server = RunningServer::start_at(&data, &socket, &["--config", &config], &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("cannot reach the admin socket"), "{text}");
    // The startup line prints the node API's address, not a Rust Option.
    let ready = text.lines().find(|l| l.contains("tessera-server ready")).unwrap();
    assert!(ready.contains("node_api=127.0.0.1:"), "{ready}");
    assert!(!ready.contains("Some("), "{ready}");

    let out = as_uid_4242(&["entry", "show", "--socket", socket.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not an operator") || stderr(&out).contains("uid 4242"));

    let out = server.cli(&["events", "--json", "--kind", "admin.refused"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let event: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().expect("a refusal event")).unwrap();
    assert_eq!(
        event["attrs"]["method"], "/tessera.admin.v1.Admin/ListEntries",
        "the refused method is named: {event}"
    );
    server.stop();
}

/// `TESSERA_ADMIN_SOCKET` stands for `--socket` in every admin command.
#[test]
fn the_admin_socket_comes_from_tessera_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("elsewhere.sock");
    let log = dir.path().join("server.log");
    let server = RunningServer::start_at(&data, &socket, &[], &log);
    let run = |args: &[&str], env: &Path| {
        Command::new(BIN)
            .current_dir(dir.path())
            .env("TESSERA_ADMIN_SOCKET", env)
            .args(args)
            .output()
            .unwrap()
    };
    for args in [&["healthcheck"][..], &["entry", "count"], &["agent", "list"], &["store", "check"]]
    {
        let out = run(args, &socket);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let wrong = dir.path().join("wrong.sock");
    let out = run(&["entry", "show"], &wrong);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(wrong.to_str().unwrap()), "{}", stderr(&out));
    // The flag still wins over the variable.
    let out = Command::new(BIN)
        .env("TESSERA_ADMIN_SOCKET", &wrong)
        .args(["healthcheck", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    server.stop();
}

/// `store check --data-dir` on a running server says, in one line, that the
/// store is in use and which command checks it online; exit non-zero.
#[test]
fn an_offline_store_check_of_a_running_server_names_the_online_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(dir.path(), &[]);
    let out = Command::new(BIN)
        .args(["store", "check", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("in use by a running server"), "{err}");
    let online = format!("tessera-server store check --socket {}", server.socket.display());
    assert!(err.contains(&online), "{err}");
    assert!(!err.contains("WouldBlock"), "{err}");
    // The command it names works.
    assert!(server.cli(&["store", "check"]).status.success());
    server.stop();
}

/// Starts `run` with the admin socket at `socket` and operators configured;
/// expects it to refuse within 30 s; its stderr.
fn refused_start(dir: &Path, socket: &Path) -> String {
    let config = config(dir, "admin_uids = [4242]\n");
    let mut child = Command::new(BIN)
        .args(["run", "--trust-domain", "example.org", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--config", &config, "--admin-socket", socket.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the server started on {}", socket.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    stderr(&out)
}

/// A local user who creates the admin socket's directory first (e.g.
/// `<data_dir>-admin` beside a data dir in a shared parent), or puts a
/// symlink of theirs in its place, or a directory others may write, would
/// own the socket the operators talk to (replace it, or have the server
/// chmod through it). The server refuses to bind there and says why.
#[test]
fn an_admin_socket_dir_another_user_controls_is_refused() {
    use std::os::unix::fs::{chown, symlink};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let theirs = dir.path().join("data-admin");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, Some(4242), Some(4242)).unwrap();
    let err = refused_start(dir.path(), &theirs.join("admin.sock"));
    assert!(err.contains("owned by uid 4242"), "{err}");
    assert!(!theirs.join("admin.sock").exists());

    let target = dir.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    let link = dir.path().join("link-admin");
    symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(4242), Some(4242)).unwrap();
    let err = refused_start(dir.path(), &link.join("admin.sock"));
    assert!(err.contains("symlink owned by uid 4242"), "{err}");
    assert!(!target.join("admin.sock").exists());

    let open = dir.path().join("open-admin");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused_start(dir.path(), &open.join("admin.sock"));
    assert!(err.contains("writable by other users"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A directory the server creates itself is fine, and 0755 for operators.
    let data = dir.path().join("data");
    let mine = dir.path().join("mine-admin").join("admin.sock");
    let log = dir.path().join("server.log");
    let config = config(dir.path(), "admin_uids = [4242]\n");
    let server = RunningServer::start_at(&data, &mine, &["--config", &config], &log);
    let mode = std::fs::metadata(mine.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);
    server.stop();
}
