//! An entry's labels reach the token broker's policy as the workload's
//! tags, through the exchange path: a real agent issues the JWT-SVIDs (so
//! the server records which entry each was issued for), and the example
//! policy `finance-read-payments` permits `read` on
//! `https://payments.example` only to principals tagged `team=finance`.
//! A workload without the label is denied; an operator's label change (which
//! revokes nothing) lets the same, still valid, JWT-SVID through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{raw_client, uid_selector, within, PROMPTLY};
use serde_json::Value;
use tessera_proto::admin as admin_pb;
use tessera_proto::workload::JwtsvidRequest;
use tessera_server::SystemClock;
use tessera_tests::broker::{broker_config, free_port, Https};
use tessera_tests::{entry, test_config, RunningAgent, TestServer};
use tessera_workload_api::with_header;
use tonic::Code;

const FINANCE_BOT: &str = "spiffe://example.org/agents/finance-bot";
const OTHER_BOT: &str = "spiffe://example.org/agents/other-bot";
const PAYMENTS: &str = "https://payments.example";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// Creates an entry for this test process on `agent` with `labels`.
async fn create(
    server: &TestServer,
    agent: &str,
    spiffe_id: &str,
    labels: &[(&str, &str)],
) -> String {
    let mut e = entry(spiffe_id, agent, &[&uid_selector()], None);
    e.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let result = server
        .admin()
        .await
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{:?}", result.status);
    result.entry.unwrap().id
}

/// A JWT-SVID of `spiffe_id` for `audience` from the agent's Workload API
/// (retrying until the agent has synced the entry).
async fn jwt_svid(agent: &RunningAgent, spiffe_id: &str, audience: &str) -> String {
    let mut client = raw_client(&agent.socket).await;
    within(PROMPTLY, "a JWT-SVID", async {
        loop {
            let request = JwtsvidRequest {
                audience: vec![audience.to_string()],
                spiffe_id: spiffe_id.to_string(),
            };
            match client.fetch_jwtsvid(with_header(request)).await {
                Ok(response) => return response.into_inner().svids.remove(0).svid,
                Err(status) if status.code() == Code::PermissionDenied => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("FetchJWTSVID failed: {status:?}"),
            }
        }
    })
    .await
}

async fn start_task(server: &TestServer, spiffe_id: &str) -> String {
    let request = admin_pb::StartTaskRequest { spiffe_id: spiffe_id.into(), ..Default::default() };
    let task = server.admin().await.start_task(request).await.unwrap().into_inner();
    let task: Value = serde_json::from_str(&task.json).unwrap();
    task["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_labels_are_the_workloads_tags_in_broker_policy() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = test_config(dir.path());
    config.broker = Some(broker_config(dir.path(), port).resolve().unwrap());
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    create(&server, &agent.id, FINANCE_BOT, &[("team", "finance"), ("env", "test")]).await;
    let other = create(&server, &agent.id, OTHER_BOT, &[("team", "sales")]).await;

    let issuer = format!("https://127.0.0.1:{port}");
    let mut https = Https::connect(server.broker_addr.unwrap(), &dir.path().join("ca.pem")).await;
    let mut exchange = async |svid: &str, task: &str| -> (u16, Value) {
        let form = [
            ("grant_type", GRANT),
            ("subject_token_type", JWT_TYPE),
            ("subject_token", svid),
            ("audience", PAYMENTS),
            ("scope", "read"),
            ("task", task),
        ];
        https.post_form("/token", &form, None).await
    };

    let finance_svid = jwt_svid(&agent, FINANCE_BOT, &issuer).await;
    let finance_task = start_task(&server, FINANCE_BOT).await;
    let (status, body) = exchange(&finance_svid, &finance_task).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()), "{body}");

    let other_svid = jwt_svid(&agent, OTHER_BOT, &issuer).await;
    let other_task = start_task(&server, OTHER_BOT).await;
    let (status, body) = exchange(&other_svid, &other_task).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("access_denied")), "{body}");
    let reason = body["error_description"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{body}");

    // Relabel the other entry: a label change revokes nothing, and policy
    // sees the entry as it stands now, so the same JWT-SVID gets through.
    let mut admin = server.admin().await;
    let mut relabelled = admin
        .get_entry(admin_pb::GetEntryRequest { id: other.clone() })
        .await
        .unwrap()
        .into_inner();
    relabelled.labels.insert("team".into(), "finance".into());
    let results = admin
        .batch_update_entry(admin_pb::BatchUpdateEntryRequest { entries: vec![relabelled] })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].status.as_ref().unwrap().code, 0, "{:?}", results[0].status);
    let revocations = admin
        .list_revocations(admin_pb::ListRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(revocations.revocations.is_empty(), "a label change revoked {revocations:?}");
    let (status, body) = exchange(&other_svid, &other_task).await;
    assert_eq!(status, 200, "{body}");

    agent.stop().await;
    server.stop().await;
}
