//! Revocation end to end, with the `spiffe` crate as the workload: deleting
//! an entry, a task-scoped (JIT) entry expiring, and banning or evicting an
//! agent all end the workload's identity at once, with no polling interval.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use spiffe::{WorkloadApiClient, WorkloadApiError, X509Svid};
use tessera_proto::admin as admin_pb;
use tessera_tests::{entry, my_uid, RunningAgent, TestAgent, TestServer};
use tokio_stream::{Stream, StreamExt as _};

mod common;
use common::{not_after_unix, now_unix, revoked_serials, serial_hex, within, PROMPTLY};
use tonic::Code;

/// A leaf's serial, as Tessera writes it.
fn serial_of(svid: &X509Svid) -> String {
    serial_hex(svid.leaf().as_ref())
}

/// A spiffe-crate stream of this process's SVID, after its first SVID.
async fn open_stream(
    agent: &RunningAgent,
) -> (impl Stream<Item = Result<X509Svid, WorkloadApiError>> + Unpin, X509Svid) {
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    within(PROMPTLY, "the first SVID", async {
        loop {
            let mut stream = Box::pin(client.stream_x509_svids().await.unwrap());
            match stream.next().await {
                Some(Ok(svid)) => return (stream, svid),
                Some(Err(WorkloadApiError::NoIdentityIssued)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("unexpected first message: {other:?}"),
            }
        }
    })
    .await
}

/// A server, an agent with one entry for this process, the process's open
/// stream and SVID, and the agent's own SVID serial.
async fn served_workload(
    dir: &std::path::Path,
) -> (
    TestServer,
    RunningAgent,
    impl Stream<Item = Result<X509Svid, WorkloadApiError>> + Unpin,
    X509Svid,
    String,
) {
    let server = TestServer::start(&dir.join("server")).await;
    let agent = RunningAgent::start(&server, &dir.join("agent")).await;
    let me = format!("unix:uid:{}", my_uid());
    server.create_entry("spiffe://example.org/web", &agent.id, &[&me], None).await;
    let (stream, svid) = open_stream(&agent).await;
    let get = admin_pb::GetAgentRequest { spiffe_id: agent.id.clone() };
    let agent_serial =
        server.admin().await.get_agent(get).await.unwrap().into_inner().x509_svid_serial;
    (server, agent, stream, svid, agent_serial)
}

/// Reads the stream until it reports that the identity was withdrawn.
async fn expect_withdrawn(
    stream: &mut (impl Stream<Item = Result<X509Svid, WorkloadApiError>> + Unpin),
    why: &str,
) {
    within(PROMPTLY, why, async {
        loop {
            match stream.next().await {
                Some(Err(WorkloadApiError::NoIdentityIssued)) => return,
                Some(Ok(_)) => continue,
                other => panic!("{why}: expected NoIdentityIssued, got {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_entry_ends_the_identity_and_revokes_its_svids() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let id = server
        .create_entry(
            "spiffe://example.org/web",
            &agent.id,
            &[&format!("unix:uid:{}", my_uid())],
            None,
        )
        .await;
    let (mut stream, svid) = open_stream(&agent).await;
    let serial = serial_of(&svid);

    server
        .admin()
        .await
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![id] })
        .await
        .unwrap();
    expect_withdrawn(&mut stream, "withdrawal after entry delete").await;
    assert!(
        revoked_serials(&server).await.contains(&serial),
        "the deleted entry's SVID is revoked"
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jit_entry_ends_the_identity_with_no_operator_action() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let mut task = entry(
        "spiffe://example.org/task/42",
        &agent.id,
        &[&format!("unix:uid:{}", my_uid())],
        Some(600),
    );
    task.expires_at = now_unix() + 3;
    let task_expires_at = task.expires_at;
    let created = server
        .admin()
        .await
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![task] })
        .await
        .unwrap();
    let entry_id = created.into_inner().results[0].entry.as_ref().unwrap().id.clone();
    let (mut stream, svid) = open_stream(&agent).await;
    assert!(svid.spiffe_id().to_string().ends_with("/task/42"));

    assert!(
        not_after_unix(svid.leaf().as_ref()) <= task_expires_at,
        "no credential outlives its task-scoped entry"
    );
    expect_withdrawn(&mut stream, "withdrawal at the entry's expires_at").await;
    // The agent withdraws at the SVID's NotAfter, which is the entry's
    // expiry; the server's expiry pass runs every 250 ms.
    let mut admin = server.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = admin.get_entry(admin_pb::GetEntryRequest { id: entry_id.clone() }).await;
        match got {
            Err(err) if err.code() == Code::NotFound => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "the server deleted the expired entry itself"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked_serials(&server).await.contains(&serial_of(&svid)));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_loses_every_identity_and_cannot_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, mut stream, svid, agent_serial) = served_workload(dir.path()).await;

    let banned = server
        .admin()
        .await
        .ban_agent(admin_pb::BanAgentRequest {
            spiffe_id: agent.id.clone(),
            reason: "node compromised".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(banned.revoked_serials.contains(&agent_serial), "the agent's own SVID is revoked");
    assert!(banned.revoked_serials.contains(&serial_of(&svid)), "its workloads' SVIDs are revoked");
    expect_withdrawn(&mut stream, "withdrawal after the agent's ban").await;

    // No token is made for the banned agent's ID: it cannot come back.
    let err = server
        .admin()
        .await
        .create_join_token(admin_pb::CreateJoinTokenRequest { ttl: 0, spiffe_id: agent.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("banned"), "{}", err.message());
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_agent_must_attest_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let token = server.join_token("spiffe://example.org/node/evictee", 0).await;
    let agent = TestAgent::attest(&server, &token.token).await.unwrap();
    let mut admin = server.admin().await;
    admin
        .evict_agent(admin_pb::EvictAgentRequest { spiffe_id: agent.id.clone(), unban: false })
        .await
        .unwrap();
    assert!(admin
        .list_agents(admin_pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .is_empty());
    let mut client = agent.client(&server).await;
    let err = client
        .renew_agent(tessera_proto::node::RenewAgentRequest { csr: tessera_tests::key_and_csr().1 })
        .await
        .unwrap_err();
    // Eviction revokes the agent's SVID: the node API refuses it at the TLS
    // handshake (CRL; the client sees the connection fail or closed) or,
    // failing that, at authentication.
    assert!(
        matches!(
            err.code(),
            Code::PermissionDenied | Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "an evicted agent's SVID no longer authenticates: {err:?}"
    );
    let token = server.join_token("spiffe://example.org/node/evictee", 0).await;
    TestAgent::attest(&server, &token.token).await.expect("re-attestation with a new token works");
    let err = admin
        .evict_agent(admin_pb::EvictAgentRequest {
            spiffe_id: agent.id.clone() + "x",
            unban: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

/// An agent whose own SVID is revoked (and that has no unspent join token
/// to attest again) stops; its workloads are told their identity is
/// withdrawn before their streams end, not left with a closed stream that
/// clients read as the agent restarting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_for_a_dead_identity_withdraws_its_workloads_first() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, mut stream, _svid, agent_serial) = served_workload(dir.path()).await;
    server
        .admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: agent_serial,
            reason: "node key leaked".into(),
            jti: String::new(),
        })
        .await
        .unwrap();
    expect_withdrawn(&mut stream, "withdrawal when the agent's own SVID is revoked").await;
    agent.stop().await;
    server.stop().await;
}
