//! End-to-end tests of the server core over its real sockets: the admin API
//! on its Unix socket, the node API over TLS, the CA, the durable store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;

use tessera_proto::admin as admin_pb;
use tessera_proto::node as node_pb;
use tessera_server::{ManualClock, SystemClock};
use tessera_tests::{entry, key_and_csr, test_config, to_pem, TestAgent, TestServer, TRUST_DOMAIN};
use tonic::Code;

fn sign_item(entry_id: &str) -> (rcgen::KeyPair, node_pb::SignX509Item) {
    let (key, csr) = key_and_csr();
    (key, node_pb::SignX509Item { entry_id: entry_id.into(), csr })
}

#[tokio::test]
async fn signed_svid_passes_openssl_verify_and_the_profile_validator() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = server.join_token("", 0).await;
    let agent = TestAgent::attest(&server, &token.token).await.unwrap();
    assert_eq!(
        agent.id,
        format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{}", token.token)
    );
    let entry_id = server
        .create_entry("spiffe://example.org/billing/api", &agent.id, &["unix:uid:1000"], Some(600))
        .await;

    let (key, item) = sign_item(&entry_id);
    let mut client = agent.client(&server).await;
    let result = client
        .sign_x509(node_pb::SignX509Request { items: vec![item] })
        .await
        .unwrap()
        .into_inner();
    let result = &result.results[0];
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{:?}", result.status);

    // The profile validator accepts it, with the entry's SPIFFE ID (not the CSR's).
    let chain: Vec<u8> = result.x509_svid.concat();
    let svid = tessera_workload_api::X509Svid::from_der(&chain, &key.serialize_der()).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/billing/api");
    assert_eq!(svid.serial_hex(), result.serial);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        as i64;
    assert!((svid.not_after_unix() - now - 600).abs() <= 2, "TTL honoured");

    // openssl accepts the chain against the bundle.
    let bundle = server.bundle().await;
    let bundle_path = dir.path().join("bundle.pem");
    let svid_path = dir.path().join("svid.pem");
    std::fs::write(&bundle_path, to_pem(&bundle)).unwrap();
    std::fs::write(&svid_path, to_pem(&result.x509_svid)).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&bundle_path)
        .arg(&svid_path)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And refuses it against another CA.
    let other = tempfile::tempdir().unwrap();
    let other_server = TestServer::start(other.path()).await;
    std::fs::write(&bundle_path, to_pem(&other_server.bundle().await)).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&bundle_path)
        .arg(&svid_path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a foreign CA must not verify the SVID");
    other_server.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn ca_and_entries_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let bundle = server.bundle().await;
    let id = server
        .create_entry(
            "spiffe://example.org/db",
            "spiffe://example.org/node1",
            &["unix:uid:7"],
            None,
        )
        .await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert_eq!(server.bundle().await, bundle, "same CA after restart");
    let entry = server
        .admin()
        .await
        .get_entry(admin_pb::GetEntryRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.spiffe_id, "spiffe://example.org/db");
    assert_eq!(entry.x509_svid_ttl, Some(3600), "default TTL stored");
    server.stop().await;
}

#[tokio::test]
async fn join_token_works_once_and_not_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let server = TestServer::start_with(test_config(dir.path()), Arc::new(clock.clone())).await;

    let token = server.join_token("spiffe://example.org/node/a", 60).await;
    let agent = TestAgent::attest(&server, &token.token).await.unwrap();
    assert_eq!(agent.id, "spiffe://example.org/node/a");
    let again = TestAgent::attest(&server, &token.token).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    assert!(again.message().contains("already been used"), "{}", again.message());

    let token = server.join_token("", 60).await;
    clock.advance(61);
    let late = TestAgent::attest(&server, &token.token).await.unwrap_err();
    assert_eq!(late.code(), Code::PermissionDenied);
    assert!(late.message().contains("expired"), "{}", late.message());

    let unknown = TestAgent::attest(&server, "no-such-token").await.unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn bad_csr_is_refused_without_spending_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = server.join_token("", 0).await;
    let mut client = tessera_tests::anonymous_client(&server).await;
    let (_, mut csr) = key_and_csr();
    csr.truncate(csr.len() / 2);
    let err = client
        .attest(node_pb::AttestRequest { join_token: token.token.clone(), csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    TestAgent::attest(&server, &token.token).await.expect("token still usable");
    server.stop().await;
}

#[tokio::test]
async fn agent_cannot_get_svids_for_another_agents_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let a = TestAgent::attest(
        &server,
        &server.join_token("spiffe://example.org/node/a", 0).await.token,
    )
    .await
    .unwrap();
    let b = TestAgent::attest(
        &server,
        &server.join_token("spiffe://example.org/node/b", 0).await.token,
    )
    .await
    .unwrap();
    let on_a = server.create_entry("spiffe://example.org/w/a", &a.id, &["unix:uid:1"], None).await;
    let on_b = server.create_entry("spiffe://example.org/w/b", &b.id, &["unix:uid:1"], None).await;

    let mut client = b.client(&server).await;
    let (_, first) = sign_item(&on_a);
    let (_, second) = sign_item(&on_b);
    let (_, third) = sign_item("no-such-entry");
    let mut bad_csr = sign_item(&on_b).1;
    bad_csr.csr = b"not a csr".to_vec();
    let response = client
        .sign_x509(node_pb::SignX509Request { items: vec![first, second, third, bad_csr] })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> =
        response.results.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(
        codes,
        [Code::PermissionDenied as i32, 0, Code::NotFound as i32, Code::InvalidArgument as i32],
        "one bad item does not fail the others"
    );
    assert!(response.results[0].x509_svid.is_empty());

    // Without a client certificate nothing is signed.
    let mut anonymous = tessera_tests::anonymous_client(&server).await;
    let (_, item) = sign_item(&on_b);
    let err =
        anonymous.sign_x509(node_pb::SignX509Request { items: vec![item] }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn agent_renewal_supersedes_the_old_svid() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut agent =
        TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let mut old_client = agent.client(&server).await;
    let (key, csr) = key_and_csr();
    let renewed =
        old_client.renew_agent(node_pb::RenewAgentRequest { csr }).await.unwrap().into_inner();
    let old_chain = agent.chain.clone();
    agent.set_svid(renewed.x509_svid.into_iter().map(Into::into).collect(), key.serialize_der());
    assert_ne!(agent.chain, old_chain);
    let entry_id =
        server.create_entry("spiffe://example.org/w", &agent.id, &["unix:uid:1"], None).await;

    let err = old_client
        .sign_x509(node_pb::SignX509Request { items: vec![sign_item(&entry_id).1] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "old SVID no longer accepted");
    let mut client = agent.client(&server).await;
    let ok = client
        .sign_x509(node_pb::SignX509Request { items: vec![sign_item(&entry_id).1] })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().results[0].status.as_ref().unwrap().code, 0);
    let agents = server
        .admin()
        .await
        .list_agents(admin_pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn one_second_ttl_is_accepted_and_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let agent = TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let entry_id =
        server.create_entry("spiffe://example.org/task", &agent.id, &["unix:uid:1"], Some(1)).await;
    let mut client = agent.client(&server).await;
    let (key, item) = sign_item(&entry_id);
    let result = client
        .sign_x509(node_pb::SignX509Request { items: vec![item] })
        .await
        .unwrap()
        .into_inner();
    let svid = tessera_workload_api::X509Svid::from_der(
        &result.results[0].x509_svid.concat(),
        &key.serialize_der(),
    )
    .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        as i64;
    assert!(svid.not_after_unix() - now <= 1);
    // Above the maximum is refused.
    let mut admin = server.admin().await;
    let too_long = entry("spiffe://example.org/long", &agent.id, &["unix:uid:2"], Some(u32::MAX));
    let response = admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![too_long] })
        .await
        .unwrap();
    assert_eq!(
        response.into_inner().results[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    server.stop().await;
}

/// A Sync stream whose SVID a renewal replaced ends with `superseded`
/// within the re-check interval (5 s), even while its agent's entries keep
/// changing: a busy stream is re-checked too (a per-stream timer that
/// each change restarted never fired for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sync_stream_of_a_renewed_svid_ends() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let agent = TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let request = node_pb::SyncRequest { revision: 0 };
    let mut stream = agent.connect().await.sync(request).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("the bundle");
    let (_, csr) = key_and_csr();
    agent.connect().await.renew_agent(node_pb::RenewAgentRequest { csr }).await.unwrap();
    let renewed = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(300));
    let mut created = 0;
    let ended = loop {
        assert!(renewed.elapsed().as_secs() < 20, "the stream outlived its SVID's renewal by 20 s");
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a refusal"),
                Err(status) => break status,
            },
            _ = tick.tick() => {
                created += 1;
                let id = format!("spiffe://example.org/busy/{created}");
                server.create_entry(&id, &agent.id, &["unix:uid:1"], None).await;
            }
        }
    };
    assert_eq!(tessera_proto::Refusal::of(&ended), Some(tessera_proto::Refusal::Superseded));
    server.stop().await;
}

#[tokio::test]
async fn sync_streams_snapshot_then_pushes_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let agent = TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let first =
        server.create_entry("spiffe://example.org/one", &agent.id, &["unix:uid:1"], None).await;
    server
        .create_entry(
            "spiffe://example.org/other",
            "spiffe://example.org/someone-else",
            &["unix:uid:1"],
            None,
        )
        .await;

    let mut client = agent.client(&server).await;
    let mut stream = client.sync(node_pb::SyncRequest { revision: 0 }).await.unwrap().into_inner();
    use node_pb::sync_message::Event;
    let mut snapshot = Vec::new();
    loop {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Bundle(bundle) => assert!(!bundle.authorities.is_empty()),
            Event::Snapshot(chunk) => {
                snapshot.extend(chunk.entries.into_iter().map(|e| e.id));
                if chunk.complete {
                    break;
                }
            }
            Event::Change(change) => panic!("change before snapshot: {change:?}"),
            Event::Revocation(revocation) => {
                assert!(!revocation.crls.is_empty(), "current CRLs come first")
            }
            Event::Banned(_) => panic!("not banned"),
            Event::Checkpoint(_) => panic!("checkpoint before snapshot"),
        }
    }
    assert_eq!(snapshot, std::slice::from_ref(&first), "only the agent's own entries");

    let second =
        server.create_entry("spiffe://example.org/two", &agent.id, &["unix:uid:2"], None).await;
    // Each batch of changes ends with a checkpoint of the log's revision.
    let mut next_event = async || loop {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Checkpoint(_) => continue,
            event => break event,
        }
    };
    let change = match next_event().await {
        Event::Change(change) => change,
        other => panic!("expected a change, got {other:?}"),
    };
    match change.change.unwrap() {
        node_pb::entry_change::Change::Upserted(entry) => assert_eq!(entry.id, second),
        other => panic!("expected upsert, got {other:?}"),
    }
    server
        .admin()
        .await
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![first.clone()] })
        .await
        .unwrap();
    match next_event().await {
        Event::Change(node_pb::EntryChange {
            change: Some(node_pb::entry_change::Change::RemovedEntryId(id)),
            ..
        }) => {
            assert_eq!(id, first)
        }
        other => panic!("expected removal, got {other:?}"),
    }
    // Another agent's change wakes only that agent's streams; this one still
    // moves past it and checkpoints (at most once a second), sending nothing
    // else for it.
    let covered = loop {
        if let Event::Checkpoint(c) = stream.message().await.unwrap().unwrap().event.unwrap() {
            break c.revision;
        }
    };
    server
        .create_entry(
            "spiffe://example.org/elsewhere",
            "spiffe://example.org/spire/agent/join_token/another",
            &["unix:uid:3"],
            None,
        )
        .await;
    let past = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match stream.message().await.unwrap().unwrap().event.unwrap() {
                Event::Checkpoint(c) if c.revision > covered => break c.revision,
                Event::Checkpoint(_) | Event::Revocation(_) => continue,
                other => panic!("another agent's change reached this stream: {other:?}"),
            }
        }
    })
    .await
    .expect("a checkpoint past another agent's change");
    assert!(past > covered);
    server.stop().await;
}

#[tokio::test]
async fn admin_batch_answers_per_item_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(dir.path()), Arc::new(SystemClock)).await;
    let mut admin = server.admin().await;
    let good = entry("spiffe://example.org/a", "spiffe://example.org/n", &["unix:uid:1"], None);
    let bad_id =
        entry("spiffe://example.org/a/../b", "spiffe://example.org/n", &["unix:uid:1"], None);
    let response = admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest {
            entries: vec![good.clone(), bad_id, good],
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> =
        response.results.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, [0, Code::InvalidArgument as i32, Code::AlreadyExists as i32]);
    let listed =
        admin.list_entries(admin_pb::ListEntriesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.admin_socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket is owner-only");
    server.stop().await;
}

#[tokio::test]
async fn sync_resumes_from_a_revision_with_only_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let agent = TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let kept =
        server.create_entry("spiffe://example.org/kept", &agent.id, &["unix:uid:1"], None).await;
    let gone =
        server.create_entry("spiffe://example.org/gone", &agent.id, &["unix:uid:2"], None).await;
    let health =
        server.admin().await.health(admin_pb::HealthRequest {}).await.unwrap().into_inner();
    let resume_at = health.revision;
    // While the agent is away: one deletion, one new entry, one elsewhere.
    server
        .admin()
        .await
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![gone.clone()] })
        .await
        .unwrap();
    let added =
        server.create_entry("spiffe://example.org/added", &agent.id, &["unix:uid:3"], None).await;
    server
        .create_entry(
            "spiffe://example.org/elsewhere",
            "spiffe://example.org/n2",
            &["unix:uid:3"],
            None,
        )
        .await;

    let mut client = agent.client(&server).await;
    let mut stream =
        client.sync(node_pb::SyncRequest { revision: resume_at }).await.unwrap().into_inner();
    use node_pb::entry_change::Change;
    use node_pb::sync_message::Event;
    let mut changes = Vec::new();
    while changes.len() < 2 {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Bundle(_) => {}
            Event::Snapshot(_) => panic!("resume must not resend a snapshot"),
            Event::Change(change) => changes.push(change.change.unwrap()),
            Event::Revocation(_) | Event::Checkpoint(_) => {}
            Event::Banned(_) => panic!("not banned"),
        }
    }
    assert!(changes.contains(&Change::RemovedEntryId(gone)));
    assert!(changes.iter().any(|c| matches!(c, Change::Upserted(e) if e.id == added)));
    assert!(
        !changes.iter().any(|c| matches!(c, Change::Upserted(e) if e.id == kept)),
        "unchanged entries are not resent"
    );
    drop(stream);
    server.stop().await;
}

/// The change log keeps its newest `change_log_keep` changes. An agent
/// away for more than that resumes with a snapshot of its entries as they
/// are (never with a log that has a hole); a stream that kept up got
/// every change.
#[tokio::test]
async fn an_agent_behind_the_trimmed_change_log_gets_a_snapshot() {
    use node_pb::entry_change::Change;
    use node_pb::sync_message::Event;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.change_log_keep = 5;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = TestAgent::attest(&server, &server.join_token("", 0).await.token).await.unwrap();
    let kept =
        server.create_entry("spiffe://example.org/kept", &agent.id, &["unix:uid:1"], None).await;
    let health = || async {
        server.admin().await.health(admin_pb::HealthRequest {}).await.unwrap().into_inner()
    };
    let mut client = agent.client(&server).await;
    let signed = tessera_tests::sign(&mut client, std::slice::from_ref(&kept)).await;
    let away_at = health().await.revision;
    let mut live =
        client.sync(node_pb::SyncRequest { revision: away_at }).await.unwrap().into_inner();
    // While the agent is away: its SVID of an unchanged entry is revoked.
    server
        .admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: signed[0].1.clone(),
            reason: "key compromise (test)".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut added = Vec::new();
    for i in 0..20 {
        let id = format!("spiffe://example.org/added/{i}");
        added.push(
            server.create_entry(&id, &agent.id, &[&format!("unix:uid:{}", i + 10)], None).await,
        );
    }
    server
        .admin()
        .await
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![added.remove(0)] })
        .await
        .unwrap();

    // The live stream hears every change, in order.
    let mut upserted = Vec::new();
    while upserted.len() < 20 {
        match live.message().await.unwrap().unwrap().event.unwrap() {
            Event::Change(change) => {
                if let Change::Upserted(e) = change.change.unwrap() {
                    upserted.push(e.id);
                }
            }
            Event::Snapshot(_) => panic!("a stream that keeps up is not resent a snapshot"),
            _ => {}
        }
    }

    // The returning agent: a snapshot once the log no longer holds what
    // follows its revision (the server trims within a second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let snapshot = loop {
        let mut stream =
            client.sync(node_pb::SyncRequest { revision: away_at }).await.unwrap().into_inner();
        let mut revoked = Vec::new();
        let first = loop {
            match stream.message().await.unwrap().unwrap().event.unwrap() {
                Event::Snapshot(s) => break Some(s),
                Event::Change(_) => break None,
                Event::Revocation(r) => revoked.extend(r.serials),
                _ => {}
            }
        };
        if let Some(snapshot) = first {
            // The snapshot keeps the unchanged entry: the revocation in
            // force comes before it, or the agent would keep the SVID.
            assert!(revoked.contains(&signed[0].1), "{revoked:?}");
            break snapshot;
        }
        assert!(std::time::Instant::now() < deadline, "the log was never trimmed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(snapshot.complete);
    let mut ids: Vec<String> = snapshot.entries.into_iter().map(|e| e.id).collect();
    ids.sort();
    let mut want: Vec<String> = added.iter().cloned().chain([kept]).collect();
    want.sort();
    assert_eq!(ids, want, "the entries as they are now: the deleted one gone");
    // An agent only a little behind still resumes with the changes alone.
    let recent = health().await.revision - 2;
    let mut stream =
        client.sync(node_pb::SyncRequest { revision: recent }).await.unwrap().into_inner();
    loop {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            Event::Snapshot(_) => panic!("a revision the log still holds resumes"),
            Event::Change(change) => break assert!(change.revision > recent),
            _ => {}
        }
    }
    drop(live);
    server.stop().await;
}
