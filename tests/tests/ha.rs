//! Several servers on one PostgreSQL database (a private cluster the tests
//! start), end to end with real agents and the `spiffe` crate as the
//! workload: a change made on one server reaches agents on the other,
//! agents fail over when their server dies, join tokens work once across
//! servers, and everything survives restarting every server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context, X509Svid};
use tessera_proto::admin as admin_pb;
use tessera_server::SystemClock;
use tessera_tests::pg_cluster::PgCluster;
use tessera_tests::{http_get, test_config, RunningAgent, TestAgent, TestServer};
use tokio_stream::{Stream, StreamExt as _};

mod common;
use common::{serial_hex, server_bin, uid_selector, within, PROMPTLY};

/// A server of the shared datastore `url`, with its own data dir (its own
/// CA key) and metrics (to see which server holds an agent's Sync stream).
async fn server(dir: &Path, url: &str) -> TestServer {
    server_at(dir, url, "127.0.0.1:0".parse().unwrap()).await
}

/// [`server`] on the node API address `bind`.
async fn server_at(dir: &Path, url: &str, bind: SocketAddr) -> TestServer {
    server_configured(dir, url, bind, |_| {}).await
}

/// [`server_at`], with `configure` applied to its config.
async fn server_configured(
    dir: &Path,
    url: &str,
    bind: SocketAddr,
    configure: impl FnOnce(&mut tessera_server::Config),
) -> TestServer {
    // TESSERA_TEST_LOG=info shows what the servers and agents log.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("TESSERA_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let mut config = test_config(dir);
    config.datastore = Some(url.to_string());
    config.bind = bind;
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    configure(&mut config);
    TestServer::start_with(config, Arc::new(SystemClock)).await
}

/// Two servers on one fresh database, each with the other's CA in its bundle.
async fn two_servers(dir: &Path) -> (String, TestServer, TestServer) {
    let url = PgCluster::shared().database();
    let a = server(&dir.join("server-a"), &url).await;
    let b = server(&dir.join("server-b"), &url).await;
    each_trusts_the_other(&a, &b).await;
    (url, a, b)
}

/// Waits until each server's bundle holds both CAs: an agent attested on
/// one before then does not yet trust the other's serving certificate.
async fn each_trusts_the_other(a: &TestServer, b: &TestServer) {
    for s in [a, b] {
        within(PROMPTLY, "each server's bundle holds both CAs", async {
            while s.bundle().await.len() < 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

/// An agent attested through `first` that knows every server in `servers`.
async fn agent(first: &TestServer, servers: &[&TestServer], dir: &Path) -> RunningAgent {
    let addresses: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    RunningAgent::start_configured(first, dir, |config| config.server_addresses = addresses).await
}

async fn create_entry(server: &TestServer, spiffe_id: &str, parent: &str) -> String {
    server.create_entry(spiffe_id, parent, &[&uid_selector()], None).await
}

/// The workload's X.509 context stream (the `spiffe` crate: every SVID it
/// has), after its first SVID; with that SVID.
async fn open_stream(
    agent: &RunningAgent,
) -> (impl Stream<Item = Result<X509Context, WorkloadApiError>> + Unpin, Arc<X509Svid>) {
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    within(PROMPTLY, "the first SVID", async {
        loop {
            // Until the agent has synced, the stream opens with Unavailable.
            let Ok(stream) = client.stream_x509_contexts().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut stream = Box::pin(stream);
            match stream.next().await {
                Some(Ok(context)) if !context.svids().is_empty() => {
                    let svid = context.svids()[0].clone();
                    return (stream, svid);
                }
                Some(Ok(_)) | Some(Err(WorkloadApiError::NoIdentityIssued)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("unexpected first message: {other:?}"),
            }
        }
    })
    .await
}

/// Reads the stream until it holds an SVID for `spiffe_id` other than `except`.
async fn next_svid(
    stream: &mut (impl Stream<Item = Result<X509Context, WorkloadApiError>> + Unpin),
    spiffe_id: &str,
    except: Option<&str>,
    why: &str,
) -> Arc<X509Svid> {
    within(PROMPTLY, why, async {
        loop {
            match stream.next().await {
                Some(Ok(context)) => {
                    let found = context.svids().iter().find(|svid| {
                        svid.spiffe_id().to_string() == spiffe_id
                            && Some(serial_hex(svid.leaf().as_ref()).as_str()) != except
                    });
                    if let Some(svid) = found {
                        return svid.clone();
                    }
                }
                Some(Err(WorkloadApiError::NoIdentityIssued)) => {}
                other => panic!("{why}: unexpected {other:?}"),
            }
        }
    })
    .await
}

/// One fetch of every SVID the workload has (the `spiffe` crate): SPIFFE
/// ID to serial.
async fn fetch_serials(agent: &RunningAgent) -> BTreeMap<String, String> {
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    context
        .svids()
        .iter()
        .map(|s| (s.spiffe_id().to_string(), serial_hex(s.leaf().as_ref())))
        .collect()
}

/// Which of `a` and `b` holds the agent's Sync stream: (that one, the other).
fn by_stream(a: TestServer, b: TestServer) -> (TestServer, TestServer) {
    if a.sync_streams() == 1 {
        (a, b)
    } else {
        assert_eq!(b.sync_streams(), 1, "the agent's Sync stream is on A or B");
        (b, a)
    }
}

/// Waits until `server` holds the agent's Sync stream.
async fn stream_moves_to(server: &TestServer, why: &str) {
    within(PROMPTLY, why, async {
        while server.sync_streams() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// One fetch of every SVID the workload has (the `spiffe` crate).
async fn fetch_ids(agent: &RunningAgent) -> Vec<String> {
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let mut ids: Vec<String> = context.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_created_on_b_reaches_a_workload_whose_agent_is_on_a() {
    let dir = tempfile::tempdir().unwrap();
    let (_url, a, b) = two_servers(dir.path()).await;
    let agent = agent(&a, &[&a], &dir.path().join("agent")).await;
    create_entry(&b, "spiffe://example.org/web", &agent.id).await;
    let (_stream, svid) = open_stream(&agent).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    // The workload's bundle holds both servers' CAs.
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let context = client.fetch_x509_context().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = context.bundle_set().get(&td).expect("the trust domain's bundle");
    assert_eq!(bundle.authorities().len(), 2, "the bundle is the union of both servers' CAs");
    // A revocation made on B reaches the workload through A: a new SVID.
    let serial = serial_hex(svid.leaf().as_ref());
    let (mut stream, _) = open_stream(&agent).await;
    b.admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: serial.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let renewed =
        next_svid(&mut stream, "spiffe://example.org/web", Some(&serial), "a replacement").await;
    assert_ne!(serial_hex(renewed.leaf().as_ref()), serial);
    agent.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_server_dies_the_agent_moves_to_the_other_and_workloads_keep_their_svids() {
    let dir = tempfile::tempdir().unwrap();
    let (_url, a, b) = two_servers(dir.path()).await;
    let agent = agent(&a, &[&a, &b], &dir.path().join("agent")).await;
    create_entry(&b, "spiffe://example.org/web", &agent.id).await;
    let (mut stream, first) = open_stream(&agent).await;
    let first_serial = serial_hex(first.leaf().as_ref());

    // Whichever server the agent picked, that one dies.
    let (a, b) = by_stream(a, b);
    a.stop().await;
    stream_moves_to(&b, "the agent's Sync stream resumes on B").await;
    // The workload kept its SVID (the same one) while the agent moved.
    let kept = fetch_serials(&agent).await;
    assert_eq!(kept, BTreeMap::from([("spiffe://example.org/web".into(), first_serial.clone())]));
    // A change made on B after A died reaches the workload: the agent's
    // Sync stream resumed on B.
    create_entry(&b, "spiffe://example.org/api", &agent.id).await;
    next_svid(&mut stream, "spiffe://example.org/api", None, "an SVID for the new entry").await;
    let ids = fetch_ids(&agent).await;
    assert_eq!(ids, ["spiffe://example.org/api", "spiffe://example.org/web"]);
    // A revocation on B replaces the old SVID: it is signed through B.
    b.admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: first_serial.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let renewed =
        next_svid(&mut stream, "spiffe://example.org/web", Some(&first_serial), "a new SVID").await;
    assert_ne!(serial_hex(renewed.leaf().as_ref()), first_serial);
    agent.stop().await;
    b.stop().await;
}

/// Failover and failback: the agent's server dies, the agent moves to the
/// other; the first comes back and the other dies: the agent is back on
/// the first, its workload keeps the same SVID throughout, and changes
/// made on the first reach it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_failover_and_failback_the_agent_is_served_by_its_first_server_again() {
    let dir = tempfile::tempdir().unwrap();
    let (url, a, b) = two_servers(dir.path()).await;
    let agent = agent(&a, &[&a, &b], &dir.path().join("agent")).await;
    create_entry(&a, "spiffe://example.org/web", &agent.id).await;
    let (mut stream, first) = open_stream(&agent).await;
    let web = |serial: &str| BTreeMap::from([("spiffe://example.org/web".into(), serial.into())]);
    let first_serial = serial_hex(first.leaf().as_ref());

    // The agent's server (call it the first) dies: the agent moves over.
    let (first_server, other) = by_stream(a, b);
    let (first_dir, first_addr) = (first_server.data_dir.clone(), first_server.addr);
    first_server.stop().await;
    stream_moves_to(&other, "the agent's Sync stream moves to the other server").await;
    assert_eq!(fetch_serials(&agent).await, web(&first_serial), "the SVID kept on failover");

    // The first comes back on its address, then the other dies.
    let first_server = server_at(&first_dir, &url, first_addr).await;
    other.stop().await;
    stream_moves_to(&first_server, "the agent's Sync stream back on the first server").await;
    assert_eq!(fetch_serials(&agent).await, web(&first_serial), "the SVID kept on failback");

    // Still served by the first: a new entry made there reaches the
    // workload, and a revocation there is replaced with an SVID it signs.
    create_entry(&first_server, "spiffe://example.org/api", &agent.id).await;
    next_svid(&mut stream, "spiffe://example.org/api", None, "an SVID after failback").await;
    first_server
        .admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: first_serial.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let renewed =
        next_svid(&mut stream, "spiffe://example.org/web", Some(&first_serial), "a new SVID").await;
    assert_ne!(serial_hex(renewed.leaf().as_ref()), first_serial);
    assert_eq!(first_server.sync_streams(), 1, "the agent stayed on the first server");
    agent.stop().await;
    first_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_from_a_works_on_b_once_and_never_twice_and_a_trusts_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let (_url, a, b) = two_servers(dir.path()).await;
    let token = a.join_token("", 0).await;
    let agent = TestAgent::attest(&b, &token.token).await;
    assert!(agent.is_ok(), "the token from A works on B: {:?}", agent.err());
    // The SVID B's CA signed opens a Sync stream on A (A trusts B's CA, and
    // tells the CAs and their CRLs apart).
    let mut on_a = agent.unwrap().at(a.addr).connect().await;
    let mut sync = on_a
        .sync(tessera_proto::node::SyncRequest { revision: 0 })
        .await
        .expect("A accepts an agent SVID signed by B")
        .into_inner();
    assert!(sync.message().await.expect("A serves the Sync stream").is_some());
    for server in [&a, &b] {
        let again = TestAgent::attest(server, &token.token).await;
        let status = again.expect_err("a used token is refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_b_ends_an_agent_connected_to_a() {
    let dir = tempfile::tempdir().unwrap();
    let (_url, a, b) = two_servers(dir.path()).await;
    let agent = agent(&a, &[&a], &dir.path().join("agent")).await;
    create_entry(&a, "spiffe://example.org/web", &agent.id).await;
    let (mut stream, _) = open_stream(&agent).await;
    b.admin()
        .await
        .ban_agent(admin_pb::BanAgentRequest { spiffe_id: agent.id.clone(), reason: "test".into() })
        .await
        .unwrap();
    // The workload's identity is withdrawn (or the agent is gone) ...
    within(PROMPTLY, "the workload's identity ends", async {
        loop {
            match stream.next().await {
                Some(Err(WorkloadApiError::NoIdentityIssued)) | None => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("unexpected {e:?}"),
            }
        }
    })
    .await;
    // ... because the agent was told it is banned: it stops, saying so
    // (its token is spent, it cannot attest again).
    let id = agent.id.clone();
    let stopped = agent.stopped_within(PROMPTLY).await;
    match &stopped {
        Err(tessera_agent::AgentError::IdentityDead(cause)) => {
            assert!(cause.contains(&format!("this agent ({id}) is banned")), "{cause}");
        }
        other => panic!("the banned agent did not stop for its ban: {other:?}"),
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_restarting_every_server() {
    let dir = tempfile::tempdir().unwrap();
    let (url, a, b) = two_servers(dir.path()).await;
    let agent = agent(&a, &[&a, &b], &dir.path().join("agent")).await;
    create_entry(&b, "spiffe://example.org/web", &agent.id).await;
    let (_stream, before) = open_stream(&agent).await;
    let bundle_before = a.bundle().await;

    // Every server down at once, then every server back on its address.
    let (a_dir, a_addr, b_dir, b_addr) = (a.data_dir.clone(), a.addr, b.data_dir.clone(), b.addr);
    a.stop().await;
    b.stop().await;
    let a = server_at(&a_dir, &url, a_addr).await;
    let b = server_at(&b_dir, &url, b_addr).await;
    let sorted = |certs: Vec<rustls_pki_types::CertificateDer<'static>>| {
        let mut ders: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
        ders.sort();
        ders
    };
    let (bundle_after, expected) = (sorted(a.bundle().await), sorted(bundle_before));
    assert_eq!(bundle_after, expected, "the same CAs after the restart");
    // The entry is still there, served by either server, and the workload
    // still has its SVID and gets one for a new entry.
    for server in [&a, &b] {
        let entries = server
            .admin()
            .await
            .list_entries(admin_pb::ListEntriesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(entries.len(), 1);
    }
    assert_eq!(fetch_ids(&agent).await, ["spiffe://example.org/web"]);
    let (mut stream, _) = open_stream(&agent).await;
    create_entry(&a, "spiffe://example.org/api", &agent.id).await;
    next_svid(&mut stream, "spiffe://example.org/api", None, "an SVID after the restart").await;
    assert_eq!(before.spiffe_id().to_string(), "spiffe://example.org/web");
    agent.stop().await;
    a.stop().await;
    b.stop().await;
}

/// `tessera-server healthcheck` against a server; its exit status and output.
fn healthcheck(server: &TestServer) -> (bool, String) {
    let out = std::process::Command::new(server_bin())
        .arg("healthcheck")
        .arg("--socket")
        .arg(&server.admin_socket)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_loses_its_database_says_so_keeps_serving_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // A cluster of its own, to stop and start.
    let cluster = PgCluster::start().unwrap();
    let url = cluster.database();
    let a = server(&dir.path().join("server-a"), &url).await;
    let agent = agent(&a, &[&a], &dir.path().join("agent")).await;
    create_entry(&a, "spiffe://example.org/web", &agent.id).await;
    let (_stream, _) = open_stream(&agent).await;
    let (ok, text) = healthcheck(&a);
    assert!(ok, "{text}");
    assert!(text.contains("Datastore: postgresql"), "{text}");

    cluster.pause().unwrap();
    let (ok, text) = healthcheck(&a);
    assert!(!ok, "a server without its database is not healthy");
    assert!(text.contains("datastore") && text.contains("fails"), "{text}");
    // Callers learn that the datastore is unavailable (retry), not where it is.
    let refused = a
        .admin()
        .await
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .expect_err("no bundle without the datastore");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(!refused.message().contains("postgres"), "{refused:?}");
    // A load balancer's probe sees it too.
    let metrics = a.metrics_addr.unwrap();
    within(PROMPTLY, "/ready reports the datastore", async {
        loop {
            let (status, body) = http_get(metrics, "/ready");
            if status == 503 && body.contains("datastore fails") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Workloads keep the SVIDs their agent holds, also once the server has
    // ended the agent's stream (it cannot check the agent) and the agent
    // keeps retrying.
    assert_eq!(fetch_ids(&agent).await, ["spiffe://example.org/web"]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(fetch_ids(&agent).await, ["spiffe://example.org/web"]);

    cluster.resume().unwrap();
    within(PROMPTLY, "the server recovers by itself", async {
        while !healthcheck(&a).0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    within(PROMPTLY, "/ready again", async {
        while http_get(metrics, "/ready").0 != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (mut stream, _) = open_stream(&agent).await;
    create_entry(&a, "spiffe://example.org/api", &agent.id).await;
    next_svid(&mut stream, "spiffe://example.org/api", None, "an SVID after the recovery").await;
    agent.stop().await;
    a.stop().await;
}

/// `tessera-server SUBCOMMAND... --socket` of `server`; its stdout, which must succeed.
fn cli(server: &TestServer, args: &[&str]) -> String {
    let out = std::process::Command::new(server_bin())
        .args(args)
        .arg("--socket")
        .arg(&server.admin_socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_writing_events_at_once_keep_one_intact_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (_url, a, b) = two_servers(dir.path()).await;
    // Join tokens made on both servers at once: each is an event.
    async fn tokens(server: &TestServer) {
        for _ in 0..15 {
            server.join_token("", 60).await;
        }
    }
    tokio::join!(tokens(&a), tokens(&b));
    for server in [&a, &b] {
        let verified = cli(server, &["events", "verify"]);
        assert!(verified.contains("Event chain is intact"), "{verified}");
    }
    let listed = |server: &TestServer| -> Vec<String> {
        cli(server, &["events", "--json", "--kind", "admin.join_token.create"])
            .lines()
            .map(str::to_string)
            .collect()
    };
    let (on_a, on_b) = (listed(&a), listed(&b));
    assert_eq!(on_a.len(), 30, "every server's events, on A");
    assert_eq!(on_a, on_b, "one stream, the same on both servers");
    a.stop().await;
    b.stop().await;
}

/// An agent's signing budget (`sign_rate`, `sign_burst`) is one across the
/// servers: what it spent on A is not there to spend again on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_signing_limit_holds_across_servers() {
    use tessera_proto::node::{SignX509Item, SignX509Request};
    let dir = tempfile::tempdir().unwrap();
    let url = PgCluster::shared().database();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let limited = |c: &mut tessera_server::Config| {
        c.sign_rate = 1;
        c.sign_burst = 1000;
    };
    let a = server_configured(&dir.path().join("server-a"), &url, any, limited).await;
    let b = server_configured(&dir.path().join("server-b"), &url, any, limited).await;
    each_trusts_the_other(&a, &b).await;
    let token = a.join_token("", 0).await;
    let agent = TestAgent::attest(&a, &token.token).await.unwrap();
    // The budget is taken per CSR asked for, before anything is looked up.
    let batch = |n: usize| SignX509Request {
        items: (0..n)
            .map(|i| SignX509Item { entry_id: format!("no-such-entry-{i}"), csr: vec![] })
            .collect(),
    };
    let mut on_a = agent.clone().connect().await;
    on_a.sign_x509(batch(900)).await.expect("within the burst on A");
    let mut on_b = agent.at(b.addr).connect().await;
    let refused = on_b.sign_x509(batch(200)).await.expect_err("over the shared budget on B");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    on_b.sign_x509(batch(50)).await.expect("what is left of the budget, on B");
    a.stop().await;
    b.stop().await;
}

/// A server that cannot reach its database fails attestation (it cannot
/// take the token); the agent passes to the next server instead of giving
/// up. Server A here has a database of its own, stopped; B has the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_passes_over_a_server_that_fails_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let lost = PgCluster::start().unwrap();
    let a = server(&dir.path().join("server-a"), &lost.database()).await;
    let b = server(&dir.path().join("server-b"), &PgCluster::shared().database()).await;
    let a_bundle = a.bundle().await;
    lost.pause().unwrap();
    // The agent trusts both servers, and is told A first: a token whose
    // ring starts at A.
    let addresses = vec![a.addr.to_string(), b.addr.to_string()];
    let token = loop {
        let token = b.join_token("", 0).await.token;
        if tessera_agent::Servers::new(addresses.clone(), &token).starts_at(2) == 0 {
            break token;
        }
    };
    // A answers an attestation with Unavailable (retry elsewhere), not
    // where its database is.
    let refused = TestAgent::attest_to(a.addr, a_bundle.clone(), &token)
        .await
        .expect_err("A attested without its database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(!refused.message().contains("postgres"), "{refused:?}");
    let bundle = dir.path().join("both.pem");
    let both: Vec<_> = a_bundle.into_iter().chain(b.bundle().await).collect();
    std::fs::write(&bundle, tessera_tests::to_pem(&both)).unwrap();
    let agent = RunningAgent::start_configured(&b, &dir.path().join("agent"), |config| {
        config.server_addresses = addresses;
        config.join_token = Some(token);
        config.trust_bundle = Some(bundle);
    })
    .await;
    create_entry(&b, "spiffe://example.org/web", &agent.id).await;
    let (_stream, svid) = open_stream(&agent).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    agent.stop().await;
    a.stop().await;
    b.stop().await;
}
