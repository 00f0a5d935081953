//! Issue 20, the operator's first hour: an agent whose identity the server
//! ended (evicted, banned, revoked) recovers by itself with the join token
//! it was given, or stops and says why; its health says what a workload
//! would get; a socket in use is refused before a join token is spent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use tessera_proto::admin as admin_pb;
use tessera_proto::health::v1::{self as health_pb, health_client::HealthClient};
use tessera_tests::{http_get, to_pem, RunningAgent, TestAgent, TestServer};

mod common;
use common::{uid_selector, within, PROMPTLY};

const NODE_A: &str = "spiffe://example.org/node/a";
const NODE_B: &str = "spiffe://example.org/node/b";

/// Waits until the Workload API serves this process an SVID for `spiffe_id`.
async fn wait_for_svid(agent: &RunningAgent, spiffe_id: &str) {
    let endpoint = agent.endpoint();
    within(PROMPTLY, &format!("an SVID for {spiffe_id}"), async {
        loop {
            if let Ok(svids) = tessera_agent::fetch_x509(&endpoint).await {
                if svids.iter().any(|s| s.spiffe_id == spiffe_id) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// The serial of the agent SVID stored in `data_dir`.
fn stored_serial(data_dir: &Path) -> String {
    let pem = std::fs::read(data_dir.join("agent_svid.pem")).unwrap();
    let leaf = pem::parse_many(pem).unwrap().remove(0);
    tessera_workload_api::certificate_serial_hex(leaf.contents()).unwrap()
}

async fn evict(server: &TestServer, id: &str) {
    let request = admin_pb::EvictAgentRequest { spiffe_id: id.into(), unban: false };
    server.admin().await.evict_agent(request).await.unwrap();
}

async fn agent_ids(server: &TestServer) -> Vec<String> {
    let agents =
        server.admin().await.list_agents(admin_pb::ListAgentsRequest::default()).await.unwrap();
    agents.into_inner().agents.into_iter().map(|a| a.spiffe_id).collect()
}

/// Starts an agent on `data_dir` with `token` as its join token.
async fn agent_with_token(server: &TestServer, data_dir: &Path, token: String) -> RunningAgent {
    RunningAgent::start_configured(server, data_dir, |c| c.join_token = Some(token)).await
}

/// The user's report: after `agent evict`, a new token and a restart, the
/// agent reused its stored (revoked) SVID and looped on transport errors,
/// because the server refuses a revoked client certificate in the TLS
/// handshake. Now the `certificate_revoked` alert tells the agent its
/// identity is dead; it attests again with the token it was started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agent_restarted_with_a_new_token_attests_again_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data = dir.path().join("agent");
    let agent = agent_with_token(&server, &data, server.join_token(NODE_A, 0).await.token).await;
    server.create_entry("spiffe://example.org/web", NODE_A, &[&uid_selector()], None).await;
    wait_for_svid(&agent, "spiffe://example.org/web").await;
    agent.stop().await;
    let evicted_serial = stored_serial(&data);

    evict(&server, NODE_A).await;
    let token = server.join_token(NODE_A, 0).await.token;
    let agent = agent_with_token(&server, &data, token.clone()).await;
    assert_eq!(agent.id, NODE_A, "the stored SVID is reused at start");
    wait_for_svid(&agent, "spiffe://example.org/web").await;
    let serial = stored_serial(&data);
    assert_ne!(serial, evicted_serial, "the dead SVID was replaced");
    let record = server
        .admin()
        .await
        .get_agent(admin_pb::GetAgentRequest { spiffe_id: NODE_A.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.x509_svid_serial, serial, "attested again with the token given");
    assert!(TestAgent::attest(&server, &token).await.is_err(), "the token was spent");
    agent.stop().await;
    server.stop().await;
}

/// A token given while the stored SVID is valid is not spent at start; an
/// eviction while the agent runs spends it, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_evicted_while_running_attests_again_with_the_token_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data = dir.path().join("agent");
    let agent = agent_with_token(&server, &data, server.join_token(NODE_A, 0).await.token).await;
    agent.stop().await;
    let agent = agent_with_token(&server, &data, server.join_token(NODE_B, 0).await.token).await;
    assert_eq!(agent.id, NODE_A);
    server.create_entry("spiffe://example.org/web-a", NODE_A, &[&uid_selector()], None).await;
    server.create_entry("spiffe://example.org/web-b", NODE_B, &[&uid_selector()], None).await;
    wait_for_svid(&agent, "spiffe://example.org/web-a").await;
    assert_eq!(agent_ids(&server).await, vec![NODE_A.to_string()], "the token is unspent");

    evict(&server, NODE_A).await;
    wait_for_svid(&agent, "spiffe://example.org/web-b").await;
    assert_eq!(agent_ids(&server).await, vec![NODE_B.to_string()]);
    agent.stop().await;
    server.stop().await;
}

/// Without a token, an agent whose identity ends stops with the cause and
/// the fix, and deletes the dead SVID and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_token_stops_with_the_cause_when_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data = dir.path().join("agent");
    let agent = agent_with_token(&server, &data, server.join_token(NODE_A, 0).await.token).await;
    server.create_entry("spiffe://example.org/web", NODE_A, &[&uid_selector()], None).await;
    wait_for_svid(&agent, "spiffe://example.org/web").await;
    let socket = agent.socket.clone();

    evict(&server, NODE_A).await;
    let err = agent.stopped_within(PROMPTLY).await.unwrap_err().to_string();
    assert!(err.contains("evicted") && err.contains(NODE_A), "names the cause: {err}");
    assert!(err.contains("restart with a new join token"), "names the fix: {err}");
    assert!(err.contains("the join token given was spent when this agent attested"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!data.join("agent_svid.pem").exists() && !data.join("agent_key.pem").exists());
    let note = std::fs::read_to_string(format!("{}.stopped", socket.display())).unwrap();
    assert!(note.contains("evicted"), "{note}");
    server.stop().await;
}

/// Item 5: a second agent on a live socket is refused before it attests:
/// its join token still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_socket_in_use_is_refused_before_spending_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let first = RunningAgent::start(&server, &dir.path().join("first")).await;
    let token = server.join_token("", 0).await.token;
    let data = dir.path().join("second");
    std::fs::create_dir_all(&data).unwrap();
    let bundle = data.join("bootstrap-bundle.pem");
    std::fs::write(&bundle, to_pem(&server.bundle().await)).unwrap();
    let mut config = tessera_agent::AgentConfig::new(data.clone(), server.addr.to_string());
    config.socket_path = first.socket.clone();
    config.join_token = Some(token.clone());
    config.trust_bundle = Some(bundle);
    let err = tessera_agent::Agent::start(config).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!("socket {} is in use by another process (another agent?)", first.socket.display())
    );
    assert!(!data.join("agent_svid.pem").exists());
    assert_eq!(agent_ids(&server).await, vec![first.id.clone()], "no agent record was added");
    TestAgent::attest(&server, &token).await.expect("the token is unspent");
    first.stop().await;
    server.stop().await;
}

/// The agent's health over the standard gRPC health service on its
/// socket: the state and the reason.
async fn health(agent: &RunningAgent) -> (i32, String, String) {
    let channel = tessera_workload_api::unix_channel(&agent.socket, "socket").await.unwrap();
    let response = HealthClient::new(channel)
        .check(health_pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
    let text = |key| response.metadata().get(key).unwrap().to_str().unwrap().to_string();
    (response.get_ref().status, text("tessera-health"), text("tessera-health-reason"))
}

/// Item 2: with the server stopped the agent is degraded, not healthy: it
/// serves its cached SVIDs, says for how long the server has been away and
/// how long the SVIDs last; `/ready` agrees (ready: SVIDs are served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_the_server_is_away_and_how_long_the_cached_svids_last() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |c| {
        c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    server.create_entry("spiffe://example.org/web", &agent.id, &[&uid_selector()], None).await;
    wait_for_svid(&agent, "spiffe://example.org/web").await;
    let serving = health_pb::health_check_response::ServingStatus::Serving as i32;
    let (status, state, reason) = health(&agent).await;
    assert_eq!((status, state.as_str()), (serving, "healthy"), "{reason}");
    let metrics = agent.metrics_addr.unwrap();
    assert_eq!(http_get(metrics, "/ready").0, 200);

    server.stop().await;
    let (status, reason) = within(PROMPTLY, "the agent to notice the server is away", async {
        loop {
            let (status, state, reason) = health(&agent).await;
            if state == "degraded" {
                return (status, reason);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(status, serving, "cached SVIDs are still served");
    assert!(
        reason.starts_with("serving cached SVIDs, server unreachable for ")
            && reason.contains(" s; SVIDs valid for "),
        "{reason}"
    );
    let valid_for: i64 = reason
        .split("SVIDs valid for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(valid_for > 3_000 && valid_for <= 3_600, "an hour's SVID: {reason}");
    assert_eq!(http_get(metrics, "/ready").0, 200, "/ready agrees: SVIDs are served");
    wait_for_svid(&agent, "spiffe://example.org/web").await;
    agent.stop().await;
}

/// A peer that is not the server (a MITM, or whoever answers at the server's
/// address) sends a plaintext `certificate_revoked` alert in place of the
/// ServerHello: it is unauthenticated, so the agent must not take it as the
/// server's word. Its SVID stays on disk and its join token stays unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_certificate_revoked_alert_before_server_authentication_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let data = dir.path().join("agent");
    let agent = agent_with_token(&server, &data, server.join_token(NODE_A, 0).await.token).await;
    agent.stop().await;
    let serial = stored_serial(&data);

    // TLS record: alert (21), version 3.3, length 2, fatal (2), certificate_revoked (44).
    let forger = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forger_addr = forger.local_addr().unwrap();
    let forging = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut served = 0u32;
        loop {
            let Ok((mut tcp, _)) = forger.accept().await else { return served };
            let mut hello = [0u8; 512];
            let _ = tcp.read(&mut hello).await;
            let _ = tcp.write_all(&[21, 3, 3, 0, 2, 2, 44]).await;
            served += 1;
        }
    });
    let spare = server.join_token(NODE_B, 0).await.token;
    let agent = RunningAgent::start_configured(&server, &data, |c| {
        c.join_token = Some(spare.clone());
        c.server_addresses = vec![forger_addr.to_string()];
    })
    .await;
    assert_eq!(agent.id, NODE_A);
    tokio::time::sleep(Duration::from_secs(4)).await;
    forging.abort();
    assert!(data.join("agent_svid.pem").exists(), "a forged alert made the agent drop its SVID");
    assert_eq!(stored_serial(&data), serial);
    agent.stop().await;
    assert_eq!(agent_ids(&server).await, vec![NODE_A.to_string()]);
    TestAgent::attest(&server, &spare).await.expect("the spare token is unspent");
    server.stop().await;
}
