//! The commands a SPIRE operator reaches for, run as the real
//! `tessera-server` binary against a running server's admin socket:
//! `entry count`, `agent count`, `entry show --selector ... --match`,
//! `agent list --selector`, `agent purge --expired-for`, `x509 mint`,
//! `jwt mint`: what they print, what they record, and their refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;
use tessera_server::{ApprovalPolicy, ManualClock, SystemClock};
use tessera_tests::{test_config, TestAgent, TestServer};

use common::server_bin;

struct Cli {
    socket: String,
}

impl Cli {
    fn new(server: &TestServer) -> Self {
        Self { socket: server.admin_socket.to_str().unwrap().to_string() }
    }

    /// `tessera-server ARGS --socket S`, off the async workers.
    async fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(server_bin());
        command.args(args).args(["--socket", &self.socket]);
        tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
    }

    /// Runs a command that must succeed; its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; that line.
    async fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{args:?} must fail; printed {:?}", out.stdout);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    async fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args).await).unwrap()
    }

    /// The events of `kind`, as JSON.
    async fn events(&self, kind: &str) -> Vec<Value> {
        let out = self.ok(&["events", "--json", "--kind", kind]).await;
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        list.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

async fn entry(cli: &Cli, name: &str, selectors: &[&str]) -> String {
    let id = format!("spiffe://example.org/{name}");
    let mut args = vec!["entry", "create", "--spiffe-id", &id];
    args.extend(["--parent-id", "spiffe://example.org/node/1"]);
    for s in selectors {
        args.extend(["--selector", s]);
    }
    cli.ok(&args).await.trim().to_string()
}

async fn attest(server: &TestServer, cli: &Cli, name: &str) -> TestAgent {
    let id = format!("spiffe://example.org/node/{name}");
    let token = cli.ok(&["token", "generate", "--spiffe-id", &id]).await;
    TestAgent::attest(server, token.trim()).await.unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_selector_queries_and_purge_work_as_in_spire() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let mut config = test_config(dir.path());
    config.agent_svid_ttl = 10;
    let server = TestServer::start_with(config, Arc::new(clock.clone())).await;
    let cli = Cli::new(&server);

    let both = entry(&cli, "both", &["unix:uid:1000", "unix:gid:50"]).await;
    let uid = entry(&cli, "uid", &["unix:uid:1000"]).await;
    let other = entry(&cli, "other", &["unix:uid:2000"]).await;
    assert_eq!(cli.ok(&["entry", "count"]).await.trim(), "3 registration entries");

    let show = |selectors: &'static [&'static str], mode: Option<&'static str>| {
        let mut args = vec!["entry", "show", "--json"];
        for s in selectors {
            args.extend(["--selector", *s]);
        }
        if let Some(mode) = mode {
            args.extend(["--match", mode]);
        }
        args
    };
    // Default superset: entries holding every given selector.
    let found = cli.json(&show(&["unix:uid:1000"], None)).await;
    assert_eq!(ids(&found), sorted(vec![both.clone(), uid.clone()]));
    let found = cli.json(&show(&["unix:uid:1000"], Some("exact"))).await;
    assert_eq!(ids(&found), vec![uid.clone()]);
    let found =
        cli.json(&show(&["unix:uid:1000", "unix:gid:50", "unix:gid:7"], Some("subset"))).await;
    assert_eq!(ids(&found), sorted(vec![both.clone(), uid.clone()]));
    let found = cli.json(&show(&["unix:gid:50", "unix:uid:2000"], Some("any"))).await;
    assert_eq!(ids(&found), sorted(vec![both.clone(), other.clone()]));
    let found = cli.json(&show(&["unix:uid:1000", "unix:gid:50"], Some("superset"))).await;
    assert_eq!(ids(&found), vec![both.clone()]);
    // The text output says how many it found.
    let text = cli.ok(&["entry", "show", "--selector", "unix:uid:2000"]).await;
    assert!(text.starts_with("Found 1 entry"), "{text}");
    // Bad input: one line, nothing changed.
    let err = cli.refused(&["entry", "show", "--selector", "unixuid"]).await;
    assert!(err.contains("selector"), "{err}");
    let err = cli.refused(&["entry", "show", "--selector", "unix:uid:1", "--match", "most"]).await;
    assert!(err.contains("most") || err.contains("--match"), "{err}");
    assert_eq!(cli.ok(&["entry", "count"]).await.trim(), "3 registration entries");

    // Agents: two attested now, one later.
    let old_a = attest(&server, &cli, "a").await;
    let old_b = attest(&server, &cli, "b").await;
    assert_eq!(cli.ok(&["agent", "count"]).await.trim(), "2 attested agents");
    let listed = cli
        .json(&["agent", "list", "--json", "--selector", "tessera:attestation:join_token"])
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["selectors"][0], "tessera:attestation:join_token");
    let listed = cli.json(&["agent", "list", "--json", "--selector", "tpm:pub_hash:00"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 0);
    let listed = cli
        .json(&[
            "agent",
            "list",
            "--json",
            "--selector",
            "tpm:pub_hash:00",
            "--selector",
            "tessera:attestation:join_token",
            "--match",
            "any",
        ])
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    cli.refused(&["agent", "list", "--selector", "nocolon"]).await;

    // Both SVIDs (10 s) expire; a third agent attests 100 s later; one old
    // agent is banned (its record is the ban, never purged).
    clock.advance(100);
    let fresh = attest(&server, &cli, "c").await;
    cli.ok(&["agent", "ban", "--id", &old_a.id]).await;
    let dry = cli.json(&["agent", "purge", "--expired-for", "1m", "--dry-run", "--json"]).await;
    assert_eq!(dry["dry_run"], true);
    let would: Vec<&str> = dry["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(would, vec![old_b.id.as_str()]);
    assert_eq!(cli.ok(&["agent", "count"]).await.trim(), "3 attested agents", "dry run");
    // Expired 90 s ago: not for 2 minutes.
    let none = cli.json(&["agent", "purge", "--expired-for", "2m", "--json"]).await;
    assert_eq!(none["agents"].as_array().unwrap().len(), 0);
    let text = cli.ok(&["agent", "purge", "--expired-for", "60s"]).await;
    assert!(text.starts_with("Purged 1 agent "), "{text}");
    assert!(text.contains(&old_b.id), "{text}");
    assert_eq!(cli.ok(&["agent", "count"]).await.trim(), "2 attested agents");
    let listed = cli.json(&["agent", "list", "--json"]).await;
    let left: Vec<&str> =
        listed.as_array().unwrap().iter().map(|a| a["spiffe_id"].as_str().unwrap()).collect();
    assert_eq!(
        sorted(left.iter().map(|s| s.to_string()).collect()),
        sorted(vec![old_a.id.clone(), fresh.id.clone()])
    );
    // Recorded like an eviction, naming the purge.
    let evictions = cli.events("admin.agent.evict").await;
    let purge = evictions.iter().find(|e| e["agent_id"] == old_b.id.as_str()).unwrap();
    assert_eq!(purge["attrs"]["purge"], "true", "{purge}");
    assert_eq!(purge["operator"]["uid"], 0);
    // JSON times are RFC 3339, with an epoch twin.
    let shown = cli.json(&["agent", "show", "--id", &fresh.id, "--json"]).await;
    assert!(shown["x509_svid_expires_at"].as_str().unwrap().ends_with('Z'), "{shown}");
    assert!(shown["x509_svid_expires_at_unix"].is_i64(), "{shown}");
    for bad in ["tomorrow", "", "5x", "1h5"] {
        let err = cli.refused(&["agent", "purge", "--expired-for", bad]).await;
        assert!(err.contains("--expired-for") || err.contains("expired-for"), "{err}");
    }
    assert_eq!(cli.ok(&["agent", "count"]).await.trim(), "2 attested agents");
    server.stop().await;
}

fn leaf(pem_text: &str) -> Vec<u8> {
    pem::parse_many(pem_text).unwrap().remove(0).into_contents()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_svids_are_recorded_revocable_and_refused_for_protected_identities() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.approval = ApprovalPolicy {
        protected_path_prefixes: vec!["/prod".into()],
        protected_jwt_audiences: vec!["bank".into()],
        ..Default::default()
    };
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let cli = Cli::new(&server);
    let id = "spiffe://example.org/batch/job";

    // X.509: the CLI made the key; the certificate names the ID and the
    // DNS name, lives 10 minutes, and binds the printed key.
    let minted = cli
        .json(&[
            "x509",
            "mint",
            "--spiffe-id",
            id,
            "--ttl",
            "10m",
            "--dns-name",
            "job.internal",
            "--json",
        ])
        .await;
    let serial = minted["serial"].as_str().unwrap().to_string();
    let der = leaf(minted["x509_svid"].as_str().unwrap());
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    let names: Vec<String> = sans.iter().map(|n| n.to_string()).collect();
    assert!(names.contains(&format!("URI({id})")), "{names:?}");
    assert!(names.contains(&"DNSName(job.internal)".to_string()), "{names:?}");
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((600..=620).contains(&life), "{life}");
    assert_eq!(hex_of(cert.raw_serial()), serial.trim_start_matches('0'));
    let key = rcgen::KeyPair::from_pem(minted["private_key"].as_str().unwrap()).unwrap();
    assert_eq!(key.public_key_raw(), cert.public_key().subject_public_key.data.as_ref());
    assert!(minted["bundle"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert!(minted["expires_at"].as_str().unwrap().ends_with('Z'));

    // Recorded as an issuance by the operator's uid.
    let issued = cli.events("svid.x509.issue").await;
    let event = issued.iter().find(|e| e["serial"] == serial.as_str()).expect("issue event");
    assert_eq!(event["decision"], "allow");
    assert_eq!(event["operator"]["uid"], 0);
    assert_eq!(event["attrs"]["minted"], "true");
    assert_eq!(event["spiffe_ids"][0], id);

    // Revocable like any SVID: listed, and in the CRL the server pushes.
    let out = cli.ok(&["svid", "revoke", "--serial", &serial, "--reason", "test"]).await;
    assert!(out.contains(&serial), "{out}");
    let revoked = cli.json(&["svid", "revoked", "--json"]).await;
    assert!(revoked.as_array().unwrap().iter().any(|r| r["serial"] == serial.as_str()));
    let crls = cli.ok(&["bundle", "show", "--crl"]).await;
    let listed = pem::parse_many(&crls).unwrap().iter().any(|crl| {
        let (_, crl) = x509_parser::parse_x509_crl(crl.contents()).unwrap();
        let found = crl
            .iter_revoked_certificates()
            .any(|r| hex_of(r.raw_serial()) == serial.trim_start_matches('0'));
        found
    });
    assert!(listed, "the CRL lists the minted serial");

    // --write: the files, the key 0600, nothing secret on stdout.
    let out_dir = dir.path().join("minted");
    let out =
        cli.ok(&["x509", "mint", "--spiffe-id", id, "--write", out_dir.to_str().unwrap()]).await;
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(Path::new(&out_dir.join("svid.pem")).exists() && out_dir.join("bundle.pem").exists());

    // JWT: the token's claims; recorded with its jti; revocable.
    let jwt = cli
        .json(&["jwt", "mint", "--spiffe-id", id, "--audience", "reports", "--ttl", "2m", "--json"])
        .await;
    let token = jwt["token"].as_str().unwrap();
    let claims =
        tessera_workload_api::jwt::b64url_decode(token.split('.').nth(1).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&claims).unwrap();
    assert_eq!(claims["sub"], id);
    assert_eq!(claims["aud"][0], "reports");
    assert_eq!(claims["jti"], jwt["jti"]);
    assert!(
        (110..=120).contains(&(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap()))
    );
    let jti = jwt["jti"].as_str().unwrap().to_string();
    let issued = cli.events("svid.jwt.issue").await;
    let event = issued.iter().find(|e| e["jti"] == jti.as_str()).expect("jwt issue event");
    assert_eq!(event["operator"]["uid"], 0);
    assert_eq!(event["audience"][0], "reports");
    let out = cli.ok(&["svid", "revoke", "--jti", &jti]).await;
    assert!(out.contains(&jti), "{out}");
    // Text output: the token alone on stdout.
    let out = cli.ok(&["jwt", "mint", "--spiffe-id", id, "--audience", "reports"]).await;
    assert_eq!(out.trim().split('.').count(), 3, "{out}");

    // One operator cannot mint a protected identity or audience: refused,
    // naming the approval route, and nothing recorded as issued.
    let before = cli.events("svid.x509.issue").await.len();
    let err = cli.refused(&["x509", "mint", "--spiffe-id", "spiffe://example.org/prod/db"]).await;
    assert!(err.contains("second operator") && err.contains("entry approve"), "{err}");
    let err = cli.refused(&["jwt", "mint", "--spiffe-id", id, "--audience", "bank"]).await;
    assert!(err.contains("second operator") && err.contains("bank"), "{err}");
    let after = cli.events("svid.x509.issue").await;
    assert_eq!(after.len(), before + 1, "one deny event");
    assert_eq!(after.last().unwrap()["decision"], "deny");

    // An agent's ID, reserved IDs, other trust domains, bad flags.
    let token = cli.ok(&["token", "generate", "--spiffe-id", "spiffe://example.org/node/9"]).await;
    let agent = TestAgent::attest(&server, token.trim()).await.unwrap();
    let err = cli.refused(&["x509", "mint", "--spiffe-id", &agent.id]).await;
    assert!(err.contains("agent"), "{err}");
    for (args, says) in [
        (&["x509", "mint", "--spiffe-id", "spiffe://example.org/tessera/server"][..], "reserved"),
        (&["x509", "mint", "--spiffe-id", "spiffe://other.org/x"], "trust domain"),
        (&["x509", "mint", "--spiffe-id", "spiffe://example.org/a/../b"], "SPIFFE ID"),
        (&["x509", "mint", "--spiffe-id", id, "--ttl", "0"], "--ttl"),
        (&["x509", "mint", "--spiffe-id", id, "--ttl", "soon"], "--ttl"),
        (&["x509", "mint", "--spiffe-id", id, "--ttl", "365d"], "maximum"),
        (&["x509", "mint", "--spiffe-id", id, "--dns-name", "bad_name"], "DNS"),
        (&["jwt", "mint", "--spiffe-id", id], "--audience"),
        (&["jwt", "mint", "--spiffe-id", id, "--audience", ""], "audience"),
    ] {
        let err = cli.refused(args).await;
        assert!(err.contains(says), "{args:?}: {err}");
    }
    server.stop().await;
}

fn hex_of(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.trim_start_matches('0').to_string()
}

/// An entry waiting for a second operator is an identity the policy
/// protects: while it waits, its proposer (or any one operator) cannot mint
/// its SPIFFE ID directly and so skip the approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_an_entry_awaits_approval_for_cannot_be_minted_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.approval = ApprovalPolicy { root_selectors: true, ..Default::default() };
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let cli = Cli::new(&server);
    let root_job = "spiffe://example.org/payments/root-job";
    let held = "spiffe://example.org/payments/held";
    let parent = "spiffe://example.org/node/1";
    cli.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        root_job,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:0",
    ])
    .await;
    cli.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        held,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--require-approval",
    ])
    .await;
    let pending = cli.ok(&["entry", "show", "--pending"]).await;
    assert!(pending.contains(root_job) && pending.contains(held), "{pending}");
    for id in [root_job, held] {
        let err = cli.refused(&["x509", "mint", "--spiffe-id", id]).await;
        assert!(err.contains("second operator"), "{id}: {err}");
        let err = cli.refused(&["jwt", "mint", "--spiffe-id", id, "--audience", "a"]).await;
        assert!(err.contains("second operator"), "{id}: {err}");
    }
    // Nothing was issued for them.
    let issued = cli.events("svid.x509.issue").await;
    assert!(issued.iter().all(|e| e["decision"] == "deny"), "{issued:?}");
    // An identity nothing protects is still minted by one operator.
    cli.ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/payments/free"]).await;
    server.stop().await;
}

/// `agent purge --expired-for` refuses durations that mean nothing (0
/// would purge agents the moment their SVID expires; 99999999999d is a
/// typo), in one line, and purges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_refuses_durations_that_mean_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let cli = Cli::new(&server);
    for d in ["0", "0s", "99999999999d", "", "-1", "--expired-for=-1"] {
        let args: Vec<&str> = if d.starts_with("--") {
            vec!["agent", "purge", d]
        } else {
            vec!["agent", "purge", "--expired-for", d]
        };
        let err = cli.refused(&args).await;
        assert!(err.contains("expired-for") || err.contains("-1"), "{d:?}: {err}");
    }
    cli.ok(&["agent", "purge", "--expired-for", "7d", "--dry-run"]).await;
    server.stop().await;
}
