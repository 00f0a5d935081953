//! Issue 20, the operator's first hour, with the real binaries: an agent
//! restarted after `agent evict` with a new token attests again by itself;
//! `healthcheck` tells degraded (server away) from healthy, and names a
//! ban; a banned agent without a token stops with the cause; `api fetch
//! --write` writes every SVID and says which file holds which ID; JSON
//! times are RFC 3339; errors say the server once; `--help` one default.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

mod common;

use common::{free_port, ok, run, server_bin, wait_until, Process, AGENT};

const NODE: &str = "spiffe://example.org/node/1";

struct Setup {
    dir: tempfile::TempDir,
    address: String,
    admin: String,
    socket: String,
    bundle: String,
}

impl Setup {
    fn server(&self) -> Process {
        let data = self.dir.path().join("server").display().to_string();
        let log = self.dir.path().join("server.log");
        let server = Process::spawn_logging(
            Command::new(server_bin()).args([
                "run",
                "--trust-domain",
                "example.org",
                "--data-dir",
                &data,
                "--bind",
                &self.address,
            ]),
            &log,
        );
        wait_until("the server", || {
            run(&server_bin(), &["healthcheck", "--socket", &self.admin]).status.success()
        });
        server
    }

    fn server_cli(&self, args: &[&str]) -> String {
        ok(run(&server_bin(), &[args, &["--socket", &self.admin]].concat()))
    }

    fn agent_cli(&self, args: &[&str]) -> Output {
        run(Path::new(AGENT), &[args, &["--socket", &self.socket]].concat())
    }

    /// A token for the agent's ID, in a file.
    fn token_file(&self) -> String {
        let token = self.server_cli(&["token", "generate", "--spiffe-id", NODE]);
        let file = self.dir.path().join("join-token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        file.display().to_string()
    }

    fn agent(&self, token_file: Option<&str>, log: &str) -> Process {
        let data = self.dir.path().join("agent").display().to_string();
        let path = self.socket.trim_start_matches("unix://").to_string();
        let mut command = Command::new(AGENT);
        command.args([
            "run",
            "--data-dir",
            &data,
            "--server-address",
            &self.address,
            "--socket",
            &path,
            "--trust-bundle",
            &self.bundle,
        ]);
        if let Some(file) = token_file {
            command.args(["--join-token-file", file]);
        }
        Process::spawn_logging(&mut command, &self.dir.path().join(log))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    fn healthcheck(&self) -> Output {
        self.agent_cli(&["healthcheck"])
    }

    fn wait_healthy(&self) {
        wait_until("a healthy agent", || {
            let out = self.healthcheck();
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is healthy")
        });
    }
}

#[test]
fn the_operators_first_hour_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}", dir.path().join("run/api.sock").display());
    let setup = Setup {
        address: format!("127.0.0.1:{}", free_port()),
        admin: dir.path().join("server/admin.sock").display().to_string(),
        bundle: dir.path().join("bundle.pem").display().to_string(),
        socket,
        dir,
    };
    let server = setup.server();
    std::fs::write(&setup.bundle, setup.server_cli(&["bundle", "show"])).unwrap();
    use std::os::unix::fs::MetadataExt;
    let uid = format!("unix:uid:{}", std::fs::metadata("/proc/self").unwrap().uid());
    for name in ["web", "db"] {
        let id = format!("spiffe://example.org/{name}");
        setup.server_cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            NODE,
            "--selector",
            &uid,
        ]);
    }

    // `run --help` shows one default for --data-dir.
    let help = ok(run(Path::new(AGENT), &["run", "--help"]));
    let data_dir_help: String =
        help.split("--data-dir").nth(1).unwrap().split("--server-address").next().unwrap().into();
    assert_eq!(data_dir_help.matches("default").count(), 1, "{data_dir_help}");

    // A server nobody answers at is named once in the error.
    let dead = format!("127.0.0.1:{}", free_port());
    let lonely = setup.dir.path().join("lonely").display().to_string();
    let out = run(
        Path::new(AGENT),
        &[
            "run",
            "--data-dir",
            &lonely,
            "--server-address",
            &dead,
            "--join-token",
            "t",
            "--trust-bundle",
            &setup.bundle,
            "--socket",
            &setup.dir.path().join("lonely.sock").display().to_string(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot connect to server").count(), 1, "{err}");
    assert_eq!(err.matches(&dead).count(), 1, "{err}");

    // The agent attests and serves both identities.
    let agent = setup.agent(Some(&setup.token_file()), "agent.log");
    setup.wait_healthy();
    let out_dir = setup.dir.path().join("out");
    let out_arg = out_dir.display().to_string();
    let written = ok(setup.agent_cli(&["api", "fetch", "x509", "--write", &out_arg]));
    for i in 0..2 {
        for file in [format!("svid.{i}.pem"), format!("svid.{i}.key"), format!("bundle.{i}.pem")] {
            assert!(out_dir.join(&file).exists(), "{file}: {written}");
        }
    }
    for name in ["web", "db"] {
        let said = (0..2).any(|i| {
            let line = format!("Wrote {out_arg}/svid.{i}.pem: spiffe://example.org/{name}");
            written.lines().any(|l| l == line)
        });
        assert!(said, "which file holds {name}: {written}");
    }
    let fetched: serde_json::Value =
        serde_json::from_str(&ok(setup.agent_cli(&["api", "fetch", "--json"]))).unwrap();
    let first = &fetched[0];
    let text = first["expires_at"].as_str().expect("expires_at is RFC 3339 text");
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(parsed.unix_timestamp(), first["expires_at_unix"].as_i64().unwrap());
    let jwt_dir = setup.dir.path().join("jwt");
    let jwt_arg = jwt_dir.display().to_string();
    let written =
        ok(setup.agent_cli(&["api", "fetch", "jwt", "--audience", "db", "--write", &jwt_arg]));
    for (i, _) in ["web", "db"].iter().enumerate() {
        let token = std::fs::read_to_string(jwt_dir.join(format!("jwt_svid.{i}.token"))).unwrap();
        let jwt = tessera_workload_api::jwt::UnverifiedJwt::decode(token.trim()).unwrap();
        let sub = jwt.claims["sub"].as_str().unwrap().to_string();
        assert!(written.contains(&format!("jwt_svid.{i}.token: {sub}")), "{written}");
    }

    // Server away: degraded, still serving, says for how long and how long
    // the SVIDs last.
    server.kill();
    wait_until("a degraded agent", || {
        let out = setup.healthcheck();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("degraded")
    });
    let said = ok(setup.healthcheck());
    assert!(
        said.contains("serving cached SVIDs, server unreachable for ")
            && said.contains("SVIDs valid for "),
        "{said}"
    );
    let server = setup.server();
    setup.wait_healthy();

    // The user's report: evict, a new token, a restart. The agent reuses
    // its stored SVID, learns from the handshake it is revoked, says so
    // once, and attests again with the token.
    agent.kill();
    setup.server_cli(&["agent", "evict", "--id", NODE]);
    let agent = setup.agent(Some(&setup.token_file()), "agent2.log");
    setup.wait_healthy();
    let fetched: serde_json::Value =
        serde_json::from_str(&ok(setup.agent_cli(&["api", "fetch", "--json"]))).unwrap();
    assert_eq!(fetched.as_array().unwrap().len(), 2);
    let log = setup.log("agent2.log");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("was revoked")).collect();
    assert_eq!(said.len(), 1, "one line names the cause: {log}");
    assert!(said[0].contains("attesting again with the join token given"), "{log}");
    drop(agent);

    // Banned, no token: the agent stops with the cause and the fix;
    // healthcheck names the ban.
    std::fs::remove_file(setup.dir.path().join("join-token")).unwrap();
    let mut agent = setup.agent(None, "agent3.log");
    setup.wait_healthy();
    setup.server_cli(&["agent", "ban", "--id", NODE, "--reason", "test"]);
    assert!(!agent.exits_within(Duration::from_secs(30)), "a banned agent exits non-zero");
    let log = setup.log("agent3.log");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("is banned") && last.contains("--unban"), "{log}");
    let out = setup.healthcheck();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unhealthy") && err.contains("banned"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Unbanned, a new token, a restart: back.
    setup.server_cli(&["agent", "evict", "--id", NODE, "--unban"]);
    let _agent = setup.agent(Some(&setup.token_file()), "agent4.log");
    setup.wait_healthy();
    drop(server);
}
