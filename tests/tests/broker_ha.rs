//! The token broker on two servers sharing PostgreSQL, behind one issuer
//! name: a token issued by one server is active when the other is asked
//! (it learns the first server's signing key from the store), a task
//! ended through either server makes the token inactive on both at once,
//! and each server's JWKS holds both servers' keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{within, PROMPTLY};
use serde_json::Value;
use tessera_proto::admin as admin_pb;
use tessera_server::SystemClock;
use tessera_tests::broker::{broker_config_for, free_port, Https};
use tessera_tests::pg_cluster::PgCluster;
use tessera_tests::{test_config, TestServer};

const ISSUER: &str = "https://broker.example.org";
const AGENT: &str = "spiffe://example.org/agents/reporter";
const TOOL: &str = "spiffe://example.org/tools/crm";

async fn server(dir: &Path, url: &str) -> TestServer {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = test_config(&dir.join("data"));
    config.datastore = Some(url.to_string());
    config.broker = Some(broker_config_for(dir, free_port(), ISSUER).resolve().unwrap());
    TestServer::start_with(config, Arc::new(SystemClock)).await
}

async fn mint(server: &TestServer, id: &str) -> String {
    let request = admin_pb::MintJwtSvidRequest {
        spiffe_id: id.into(),
        audience: vec![ISSUER.into()],
        ttl: 600,
    };
    server.admin().await.mint_jwt_svid(request).await.unwrap().into_inner().token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_issued_on_one_server_is_introspected_and_revoked_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let url = PgCluster::shared().database();
    let a = server(&dir.path().join("a"), &url).await;
    let b = server(&dir.path().join("b"), &url).await;
    // Each server trusts the other's JWT authority once both CAs are shared.
    for s in [&a, &b] {
        within(PROMPTLY, "each server's bundle holds both CAs", async {
            while s.bundle().await.len() < 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let task = a
        .admin()
        .await
        .start_task(admin_pb::StartTaskRequest {
            spiffe_id: AGENT.into(),
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let task: Value = serde_json::from_str(&task.json).unwrap();
    let task = task["id"].as_str().unwrap().to_string();

    // A JWT-SVID minted by server A, exchanged at server B.
    let subject = mint(&a, AGENT).await;
    let mut at_b = Https::connect(b.broker_addr.unwrap(), &dir.path().join("b/ca.pem")).await;
    let fields = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", subject.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "https://tools.example/crm"),
        ("scope", "read"),
        ("task", task.as_str()),
    ];
    let (status, body) = at_b.post_form("/token", &fields, None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_string();

    // Introspected at server A, by the tool with a JWT-SVID server B minted.
    let tool = mint(&b, TOOL).await;
    let mut at_a = Https::connect(a.broker_addr.unwrap(), &dir.path().join("a/ca.pem")).await;
    let (status, seen) = at_a.post_form("/introspect", &[("token", &token)], Some(&tool)).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["active"], true, "{seen}");
    assert_eq!(seen["sub"], AGENT);
    assert_eq!(seen["iss"], ISSUER);

    // Both JWKS hold the key that signed it.
    let kid = {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap();
        serde_json::from_slice::<Value>(&header).unwrap()["kid"].as_str().unwrap().to_string()
    };
    for (name, s) in [("a", &a), ("b", &b)] {
        let mut https =
            Https::connect(s.broker_addr.unwrap(), &dir.path().join(name).join("ca.pem")).await;
        let (status, jwks) = https.get("/jwks").await;
        assert_eq!(status, 200);
        assert!(
            jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid.as_str()),
            "{name}: {jwks}"
        );
    }

    // The task ends through server A: the token is inactive at B at once.
    a.admin()
        .await
        .end_task(admin_pb::EndTaskRequest { id: task.clone(), reason: "done".into() })
        .await
        .unwrap();
    let (_, seen) = at_b.post_form("/introspect", &[("token", &token)], Some(&tool)).await;
    assert_eq!(seen, serde_json::json!({ "active": false }));
    let (status, body) = at_b.post_form("/token", &fields, None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")), "{body}");

    a.stop().await;
    b.stop().await;
}
