//! The Workload API socket is reachable by every local uid: the agent
//! creates the directories it needs with mode 0755 (and leaves the mode of
//! any it did not create alone), the socket is 0777, and the default lies
//! outside the agent's private 0700 data dir. Tests that need another uid
//! fail when not run as root (unless TESSERA_TESTS_ALLOW_SKIP=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use tessera_agent::{AgentConfig, DEFAULT_SOCKET_PATH};
use tessera_tests::{to_pem, RunningAgent, TestServer};

mod common;
use common::root_or_skip;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Whether a process running as uid/gid 65534 can connect to `socket`.
/// `None` when this test cannot change uid (not root, and skipping allowed).
fn nobody_can_connect(socket: &Path) -> Option<bool> {
    use std::os::unix::process::CommandExt;
    if !root_or_skip("connecting to the socket as another uid") {
        return None;
    }
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n",
        ])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || err.contains("PermissionError"), "unexpected failure: {err}");
    Some(out.status.success())
}

#[test]
fn the_default_socket_is_outside_the_data_dir() {
    let config = AgentConfig::new("/var/lib/tessera/agent".into(), "127.0.0.1:8081".into());
    assert_eq!(config.socket_path, Path::new(DEFAULT_SOCKET_PATH));
    assert!(!config.socket_path.starts_with(&config.data_dir));
}

/// A process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The default socket itself: `tessera-agent run` without `--socket`
/// binds `/tmp/tessera-agent/public/api.sock`, creating what it needs. The
/// agent runs in a mount namespace of its own whose `/tmp` is a fresh
/// tmpfs made like `/tmp` (1777), so the path is the real default without
/// touching the machine's `/tmp` (where another agent or test run may
/// be). Another uid, in that namespace, connects to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_can_connect_to_the_socket_the_agent_creates() {
    use std::os::unix::process::CommandExt;
    if !root_or_skip("a private /tmp (a mount namespace) and connecting as another uid") {
        return;
    }
    // Outside /tmp, which the agent's namespace hides.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data_dir = dir.path().join("agent");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, to_pem(&server.bundle().await)).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, server.join_token("", 0).await.token).unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = Killed(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=1777 tessera-test-tmp /tmp && exec \"$@\"")
            .arg("sh")
            .arg(common::agent_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--server-address")
            .arg(server.addr.to_string())
            .arg("--join-token-file")
            .arg(&token)
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--log-level")
            .arg("warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    // unshare and sh exec: the agent keeps the child's PID. Its /tmp, seen
    // from here:
    let pid = agent.0.id();
    let tmp = std::path::PathBuf::from(format!("/proc/{pid}/root/tmp"));
    let socket = tmp.join(Path::new(DEFAULT_SOCKET_PATH).strip_prefix("/tmp").unwrap());
    common::within(common::PROMPTLY, "the agent's default socket", async {
        while !socket.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let said = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert_eq!(mode(&socket), 0o777, "the socket; agent log: {}", said());
    for created in ["tessera-agent", "tessera-agent/public"] {
        assert_eq!(mode(&tmp.join(created)), 0o755, "/tmp/{created}, created by the agent");
    }
    assert_eq!(mode(&tmp), 0o1777, "/tmp keeps its mode");
    assert_eq!(mode(&data_dir), 0o700, "the data dir stays private");

    // uid 65534, in the agent's mount namespace, connects to the default path.
    let out = Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["--", "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c"])
        .arg("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n")
        .arg(DEFAULT_SOCKET_PATH)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uid 65534 cannot connect to {DEFAULT_SOCKET_PATH}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(agent);
    server.stop().await;
}

/// The default socket's layout re-rooted under a temp dir (a `tmp` made
/// like `/tmp`, 1777, under which the agent creates `tessera-agent/public`
/// and the socket), in process: the agent's config is the default one with
/// only the socket path re-rooted. Here the test also sees that a
/// directory the agent did not create keeps its mode, and what the old
/// default (a socket inside the data dir) did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_can_connect_to_a_socket_the_agent_creates_at_the_default_path_under_a_temp_root(
) {
    let dir = tempfile::tempdir().unwrap();
    // A tempdir is 0700; make this one like /tmp's children are reachable.
    // 0711: searchable, not listable; the agent must leave it as it is.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data_dir = dir.path().join("agent");
    let default = Path::new(DEFAULT_SOCKET_PATH);
    let root_tmp = dir.path().join("tmp");
    std::fs::create_dir(&root_tmp).unwrap();
    std::fs::set_permissions(&root_tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = dir.path().join(default.strip_prefix("/").unwrap());
    assert_eq!(
        default.parent().unwrap().parent().unwrap().parent().unwrap(),
        Path::new("/tmp"),
        "the default socket's layout changed: {DEFAULT_SOCKET_PATH}"
    );

    std::fs::create_dir_all(&data_dir).unwrap();
    let bundle = data_dir.join("bootstrap-bundle.pem");
    std::fs::write(&bundle, to_pem(&server.bundle().await)).unwrap();
    let mut config = AgentConfig::new(data_dir.clone(), server.addr.to_string());
    assert_eq!(config.socket_path, default, "the agent's default socket path");
    config.join_token = Some(server.join_token("", 0).await.token);
    config.trust_bundle = Some(bundle);
    config.socket_path = socket.clone();
    let agent = RunningAgent::start_with(config).await;
    assert_eq!(agent.socket, socket, "the agent serves on the re-rooted default path");

    assert_eq!(mode(&socket), 0o777, "the socket");
    for created in ["tmp/tessera-agent", "tmp/tessera-agent/public"] {
        assert_eq!(mode(&dir.path().join(created)), 0o755, "{created}, created by the agent");
    }
    assert_eq!(mode(&root_tmp), 0o1777, "a directory the agent did not create keeps its mode");
    assert_eq!(mode(dir.path()), 0o711, "a directory the agent did not create keeps its mode");
    assert_eq!(mode(&data_dir), 0o700, "the data dir stays private");
    if let Some(connected) = nobody_can_connect(&socket) {
        assert!(connected, "uid 65534 cannot connect to {}", socket.display());
    }
    agent.stop().await;

    // What the old default did: a socket inside the 0700 data dir is out
    // of other users' reach (and the test can tell).
    let private = data_dir.join("public/api.sock");
    std::fs::create_dir_all(private.parent().unwrap()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o777)).unwrap();
    if let Some(connected) = nobody_can_connect(&private) {
        assert!(!connected, "a socket under a 0700 directory must be out of reach");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_owned_by_another_user_is_refused() {
    if !root_or_skip("creating a directory owned by another uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let public = dir.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::os::unix::fs::chown(&public, Some(65534), Some(65534)).unwrap();
    let data_dir = dir.path().join("agent");
    std::fs::create_dir_all(&data_dir).unwrap();
    let bundle = data_dir.join("bootstrap-bundle.pem");
    std::fs::write(&bundle, to_pem(&server.bundle().await)).unwrap();
    let mut config = AgentConfig::new(data_dir, server.addr.to_string());
    config.join_token = Some(server.join_token("", 0).await.token);
    config.trust_bundle = Some(bundle);
    config.socket_path = public.join("api.sock");
    let err = tessera_agent::Agent::start(config).await.unwrap_err().to_string();
    assert!(err.contains("owned by uid 65534"), "{err}");
    server.stop().await;
}
