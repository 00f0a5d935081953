//! The agent end to end with Tessera's own Workload API client: attestation,
//! reuse of the stored SVID, fetch, permission and header checks, sync resume.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tessera_agent::{connect_workload_api, fetch_x509};
use tessera_proto::workload as pb;
use tessera_tests::{my_uid, RunningAgent, TestServer};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_fetches_svid_and_new_entries_arrive_by_push() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let uid = my_uid();
    server
        .create_entry(
            "spiffe://example.org/web",
            &agent.id,
            &[&format!("unix:uid:{uid}")],
            Some(600),
        )
        .await;

    let svids = fetch_x509(&agent.endpoint()).await.unwrap();
    assert_eq!(svids.len(), 1);
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/web");

    // An entry whose selectors the caller lacks is not served to it.
    server.create_entry("spiffe://example.org/other", &agent.id, &["unix:uid:4242424"], None).await;
    // A second matching entry reaches the open stream without polling.
    let mut client = connect_workload_api(&agent.endpoint()).await.unwrap();
    let mut stream = client
        .fetch_x509svid(tessera_agent::cli_request(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    server
        .create_entry("spiffe://example.org/web2", &agent.id, &[&format!("unix:uid:{uid}")], None)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: Vec<_> = next.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/web", "spiffe://example.org/web2"]);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_caller_is_denied_and_header_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server
        .create_entry("spiffe://example.org/someone", &agent.id, &["unix:uid:4242424"], None)
        .await;
    let err = fetch_x509(&agent.endpoint()).await.err().unwrap();
    assert_eq!(err, "no identity issued");

    let mut client = connect_workload_api(&agent.endpoint()).await.unwrap();
    let err = client.fetch_x509svid(pb::X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    // A JWT-SVID request with no audience is refused as such; with one,
    // a caller no entry matches gets the same denial as for X509-SVIDs.
    let err = client
        .fetch_jwtsvid(tessera_agent::cli_request(pb::JwtsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "audience must be specified"));
    let request = pb::JwtsvidRequest { audience: vec!["api".into()], spiffe_id: String::new() };
    let err = client.fetch_jwtsvid(tessera_agent::cli_request(request)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, "no identity issued"));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_reuses_its_svid_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent_dir = dir.path().join("agent");
    let agent = RunningAgent::start(&server, &agent_dir).await;
    let id = agent.id.clone();
    agent.stop().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent_dir.join("agent_key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "agent key is private");

    let mut config = tessera_agent::AgentConfig::new(agent_dir.clone(), server.addr.to_string());
    config.socket_path = agent_dir.join("public/api.sock");
    let again = RunningAgent::start_with(config).await; // no token, no bootstrap bundle
    assert_eq!(again.id, id);
    server
        .create_entry("spiffe://example.org/w", &id, &[&format!("unix:uid:{}", my_uid())], None)
        .await;
    assert_eq!(fetch_x509(&again.endpoint()).await.unwrap()[0].spiffe_id, "spiffe://example.org/w");
    again.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_own_svid_at_half_life_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tessera_tests::test_config(&dir.path().join("server"));
    config.agent_svid_ttl = 4;
    let server =
        TestServer::start_with(config, std::sync::Arc::new(tessera_server::SystemClock)).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let mut admin = server.admin().await;
    let get = tessera_proto::admin::GetAgentRequest { spiffe_id: agent.id.clone() };
    let first = admin.get_agent(get.clone()).await.unwrap().into_inner().x509_svid_serial;
    // Renewal happens at about 2 s; wait for up to 30 s for the serial to change.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let serial = admin.get_agent(get.clone()).await.unwrap().into_inner().x509_svid_serial;
        if serial != first {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "agent SVID was not renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The renewed SVID is the one the agent now uses: a new entry still gets signed.
    server
        .create_entry(
            "spiffe://example.org/after-renewal",
            &agent.id,
            &[&format!("unix:uid:{}", my_uid())],
            None,
        )
        .await;
    // The agent reopens its sync stream with the renewed SVID; the entry
    // arrives over it and is signed with the renewed SVID.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let svids = loop {
        match fetch_x509(&agent.endpoint()).await {
            Ok(svids) => break svids,
            Err(e) => assert!(std::time::Instant::now() < deadline, "no SVID after renewal: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/after-renewal");
    agent.stop().await;
    server.stop().await;
}

/// A port on 127.0.0.1 where nothing listens.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `--server-address` given several times: from whichever address its
/// identity picks, the agent goes round the ring past dead servers to a
/// live one; with none alive, the error names every address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_goes_round_its_server_addresses_past_dead_ones() {
    use tessera_agent::{node_tls_config, Servers};
    use tessera_workload_api::{TrustAnchors, TrustDomain};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let live = server.addr.to_string();
    let (dead_1, dead_2) = (dead_address(), dead_address());
    let tls = node_tls_config(
        TrustAnchors::new(server.bundle().await),
        &TrustDomain::new("example.org").unwrap(),
        None,
    )
    .unwrap();
    // Over many identities every starting point is taken, dead ones included.
    for seed in 0..12 {
        let ring = vec![dead_1.clone(), live.clone(), dead_2.clone()];
        let servers = Servers::new(ring, &format!("spiffe://example.org/agent/{seed}"));
        let (_, label) = servers.connect(&tls).await.unwrap();
        assert_eq!(label, live, "seed {seed}");
        servers.fail_over();
        let (_, label) = servers.connect(&tls).await.unwrap();
        assert_eq!(label, live, "after a failure, round the ring to the live one again");
    }
    // A name that resolves: the label shows the address it resolved to.
    let by_name = format!("localhost:{}", server.addr.port());
    let servers = Servers::new(vec![dead_1.clone(), by_name.clone()], "x");
    let (_, label) = servers.connect(&tls).await.unwrap();
    assert!(label.starts_with(&by_name) && label.contains("127.0.0.1"), "{label}");

    let servers = Servers::new(vec![dead_1.clone(), dead_2.clone()], "x");
    let err = servers.connect(&tls).await.unwrap_err().to_string();
    assert!(err.contains(&dead_1) && err.contains(&dead_2), "{err}");
    let err = Servers::new(vec!["no-port".into()], "x").connect(&tls).await.unwrap_err();
    assert!(err.to_string().contains("want host:port"), "{err}");

    // A real agent told a dead address first attests and serves.
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.server_addresses = vec![dead_1.clone(), dead_2.clone(), live.clone()];
    })
    .await;
    server
        .create_entry(
            "spiffe://example.org/web",
            &agent.id,
            &[&format!("unix:uid:{}", my_uid())],
            None,
        )
        .await;
    let svids = fetch_x509(&agent.endpoint()).await.unwrap();
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/web");
    agent.stop().await;
    server.stop().await;
}
