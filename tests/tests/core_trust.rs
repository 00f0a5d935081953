//! The core's trust guarantees under failure sequences (issue 9): resuming
//! after an update, a revoked agent SVID, bans / evictions / deletes racing
//! renewals and signing, and CRL changes that are not revocations. Each test
//! drives the real server through its node and admin APIs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{serial_hex, within, PROMPTLY};
use rustls_pki_types::CertificateDer;
use tessera_proto::admin as admin_pb;
use tessera_proto::node::{self as node_pb, entry_change::Change, sync_message::Event};
use tessera_server::SystemClock;
use tessera_tests::{key_and_csr, test_config, TestAgent, TestServer};
use tonic::Code;

type SyncStream = tonic::Streaming<node_pb::SyncMessage>;

async fn attest(server: &TestServer, id: &str) -> TestAgent {
    let token = server.join_token(id, 0).await;
    TestAgent::attest(server, &token.token).await.unwrap()
}

/// Reads events up to and including the next checkpoint.
async fn until_checkpoint(stream: &mut SyncStream) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let message = within(PROMPTLY, "a sync message", stream.message()).await;
        let event = message.unwrap().expect("stream open").event.unwrap();
        let done = matches!(event, Event::Checkpoint(_));
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Opens a Sync stream and reads up to the complete snapshot; returns its revision.
async fn open_sync(agent: &TestAgent, revision: u64) -> (SyncStream, u64) {
    let mut stream =
        agent.connect().await.sync(node_pb::SyncRequest { revision }).await.unwrap().into_inner();
    if revision > 0 {
        return (stream, revision);
    }
    loop {
        let message = within(PROMPTLY, "the snapshot", stream.message()).await;
        if let Some(Event::Snapshot(chunk)) = message.unwrap().unwrap().event {
            if chunk.complete {
                return (stream, chunk.revision);
            }
        }
    }
}

/// Renews the agent's SVID through the node API; keeps the new one.
async fn renew(agent: &mut TestAgent) -> Result<(), tonic::Status> {
    let (key, csr) = key_and_csr();
    let response = agent.connect().await.renew_agent(node_pb::RenewAgentRequest { csr }).await?;
    let chain = response.into_inner().x509_svid.into_iter().map(CertificateDer::from).collect();
    agent.set_svid(chain, key.serialize_der());
    Ok(())
}

fn refusal(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(tessera_server::REFUSAL_METADATA).and_then(|v| v.to_str().ok())
}

/// Every serial the server lists as revoked, and every serial its CRLs list.
async fn revoked_and_listed(server: &TestServer) -> (BTreeSet<String>, BTreeSet<String>) {
    let revoked = common::revoked_serials(server).await;
    let bundle =
        server.admin().await.get_bundle(admin_pb::GetBundleRequest {}).await.unwrap().into_inner();
    let mut listed = BTreeSet::new();
    for crl in &bundle.crls {
        let (_, crl) = x509_parser::parse_x509_crl(crl).unwrap();
        for cert in crl.iter_revoked_certificates() {
            listed.insert(common::trimmed_hex(cert.raw_serial()));
        }
    }
    (revoked, listed)
}

/// Item 2: an update logged a removal and an upsert at one revision and the
/// resume kept the removal: the entry vanished from the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_updated_while_the_agent_is_away_is_kept_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = attest(&server, "spiffe://example.org/node/away").await;
    let entry_id =
        server.create_entry("spiffe://example.org/web", &agent.id, &["unix:uid:1000"], None).await;
    let (stream, revision) = open_sync(&agent, 0).await;
    drop(stream);

    let server = server.restart().await;
    let mut admin = server.admin().await;
    let mut entry = admin
        .get_entry(admin_pb::GetEntryRequest { id: entry_id.clone() })
        .await
        .unwrap()
        .into_inner();
    entry.x509_svid_ttl = Some(900);
    let updated = admin
        .batch_update_entry(admin_pb::BatchUpdateEntryRequest { entries: vec![entry] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.results[0].status.as_ref().unwrap().code, 0);

    let (mut stream, _) = open_sync(&agent, revision).await;
    let mut upserted = None;
    for event in until_checkpoint(&mut stream).await {
        match event {
            Event::Change(change) => match change.change.unwrap() {
                Change::Upserted(e) => upserted = Some(e),
                Change::RemovedEntryId(id) => {
                    panic!("the updated entry {id} was removed on resume")
                }
            },
            Event::Snapshot(_) => panic!("a resume must not resend a snapshot"),
            _ => {}
        }
    }
    let upserted = upserted.expect("the update reaches the resuming agent");
    assert_eq!((upserted.id.as_str(), upserted.x509_svid_ttl), (entry_id.as_str(), Some(900)));
    server.stop().await;
}

/// Item 3: a revoked agent SVID kept working at the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_svid_is_refused_by_every_node_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut agent = attest(&server, "spiffe://example.org/node/revoked").await;
    let entry_id =
        server.create_entry("spiffe://example.org/web", &agent.id, &["unix:uid:1000"], None).await;
    let (mut stream, _) = open_sync(&agent, 0).await;

    let serial = serial_hex(agent.chain[0].as_ref());
    server
        .admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial,
            reason: "key leaked".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The open stream is closed with a typed refusal.
    let closed = loop {
        match within(PROMPTLY, "the stream to close", stream.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(closed.code(), Code::PermissionDenied, "{closed:?}");
    assert_eq!(refusal(&closed), Some("revoked"), "{closed:?}");

    // New calls are refused: at the TLS handshake (the node API's verifier
    // has the CRL) or at authentication.
    let signed = agent
        .connect()
        .await
        .sign_x509(node_pb::SignX509Request {
            items: vec![node_pb::SignX509Item { entry_id, csr: key_and_csr().1 }],
        })
        .await;
    assert!(signed.is_err(), "a revoked agent SVID got an SVID signed: {signed:?}");
    let renewed = renew(&mut agent).await;
    assert!(renewed.is_err(), "a revoked agent SVID was renewed");
    server.stop().await;
}

/// Item 4: a ban racing renewals was lost (the renewal wrote `banned:
/// false` back), and an eviction racing one re-created the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_and_evictions_racing_renewals_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut admin = server.admin().await;
    for trial in 0..16u64 {
        let id = format!("spiffe://example.org/node/race-{trial}");
        let mut agent = attest(&server, &id).await;
        let renewals = tokio::spawn(async move {
            for _ in 0..8 {
                if renew(&mut agent).await.is_err() {
                    break;
                }
            }
            agent
        });
        tokio::time::sleep(Duration::from_millis(trial % 6)).await;
        let evict = trial % 2 == 1;
        if evict {
            admin
                .evict_agent(admin_pb::EvictAgentRequest { spiffe_id: id.clone(), unban: false })
                .await
                .unwrap();
        } else {
            admin
                .ban_agent(admin_pb::BanAgentRequest {
                    spiffe_id: id.clone(),
                    reason: "race".into(),
                })
                .await
                .unwrap();
        }
        let mut agent = renewals.await.unwrap();
        let record = admin.get_agent(admin_pb::GetAgentRequest { spiffe_id: id.clone() }).await;
        if evict {
            let err = record.expect_err("an evicted agent was re-created by a racing renewal");
            assert_eq!(err.code(), Code::NotFound);
        } else {
            assert!(record.unwrap().into_inner().banned, "trial {trial}: the ban was lost");
        }
        assert!(renew(&mut agent).await.is_err(), "trial {trial}: the agent still renews");
    }
    server.stop().await;
}

/// Item 4: SVIDs signed in a batch racing an entry delete or an agent ban
/// were recorded after the revocation read the records, and stayed valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_signed_while_the_entry_is_deleted_or_the_agent_banned_are_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut admin = server.admin().await;
    let mut handed_out = BTreeSet::new();
    for trial in 0..12u64 {
        let id = format!("spiffe://example.org/node/signer-{trial}");
        let agent = attest(&server, &id).await;
        let entry_id = server
            .create_entry(&format!("spiffe://example.org/w/{trial}"), &id, &["unix:uid:1"], None)
            .await;
        let items: Vec<_> = (0..200)
            .map(|_| node_pb::SignX509Item { entry_id: entry_id.clone(), csr: key_and_csr().1 })
            .collect();
        let mut client = agent.connect().await;
        let signing =
            tokio::spawn(async move { client.sign_x509(node_pb::SignX509Request { items }).await });
        tokio::time::sleep(Duration::from_millis(trial % 4 * 5)).await;
        if trial % 2 == 0 {
            admin
                .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![entry_id] })
                .await
                .unwrap();
        } else {
            admin
                .ban_agent(admin_pb::BanAgentRequest { spiffe_id: id, reason: "race".into() })
                .await
                .unwrap();
        }
        if let Ok(response) = signing.await.unwrap() {
            for result in response.into_inner().results {
                if result.status.as_ref().is_some_and(|s| s.code == 0) {
                    handed_out.insert(result.serial);
                }
            }
        }
    }
    let (revoked, listed) = revoked_and_listed(&server).await;
    let escaped: Vec<_> = handed_out.iter().filter(|s| !revoked.contains(*s)).collect();
    assert!(escaped.is_empty(), "{} SVIDs escaped revocation: {escaped:?}", escaped.len());
    let unlisted: Vec<_> = handed_out.iter().filter(|s| !listed.contains(*s)).collect();
    assert!(unlisted.is_empty(), "{} revoked SVIDs are in no CRL", unlisted.len());
    server.stop().await;
}

/// A renewal whose reply was lost: the agent still holds the SVID before it
/// and must not be locked out; the SVID it never received is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_reply_was_lost_does_not_lock_the_agent_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut agent = attest(&server, "spiffe://example.org/node/lossy").await;
    // A renewal the agent never hears the answer to.
    let lost = agent
        .connect()
        .await
        .renew_agent(node_pb::RenewAgentRequest { csr: key_and_csr().1 })
        .await
        .unwrap()
        .into_inner();
    let lost_serial = serial_hex(&lost.x509_svid[0]);
    let mut before = agent.clone();
    renew(&mut agent).await.expect("the agent renews with the SVID it still has");
    let (revoked, _) = revoked_and_listed(&server).await;
    assert!(revoked.contains(&lost_serial), "the SVID whose reply was lost is revoked");
    // Once the agent uses its new SVID, the one before may not renew again.
    let (_stream, _) = open_sync(&agent, 0).await;
    assert!(
        renew(&mut before).await.is_err(),
        "a superseded SVID renewed after the new one was used"
    );
    renew(&mut agent).await.expect("and the agent keeps renewing normally");
    server.stop().await;
}

/// Evicting a banned agent keeps it banned unless the operator says --unban.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_a_banned_agent_keeps_it_banned_unless_unbanned() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let id = "spiffe://example.org/node/banned";
    attest(&server, id).await;
    let mut admin = server.admin().await;
    admin
        .ban_agent(admin_pb::BanAgentRequest { spiffe_id: id.into(), reason: String::new() })
        .await
        .unwrap();
    admin
        .evict_agent(admin_pb::EvictAgentRequest { spiffe_id: id.into(), unban: false })
        .await
        .unwrap();
    // Still banned: no token is even made for its ID.
    let err = admin
        .create_join_token(admin_pb::CreateJoinTokenRequest { ttl: 0, spiffe_id: id.into() })
        .await
        .expect_err("still banned");
    assert_eq!(err.code(), Code::FailedPrecondition);
    admin
        .evict_agent(admin_pb::EvictAgentRequest { spiffe_id: id.into(), unban: true })
        .await
        .unwrap();
    let token = server.join_token(id, 0).await;
    TestAgent::attest(&server, &token.token).await.expect("attests after --unban");
    server.stop().await;
}

/// Item 5: CRLs re-signed for a new CA (not for a revocation) never reached
/// agents: the stream read them once when it opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_ca_brings_its_own_crl_to_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.ca_ttl = 16; // the next CA is prepared after 8 s
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = attest(&server, "spiffe://example.org/node/crls").await;
    let (mut stream, _) = open_sync(&agent, 0).await;
    let crls = within(Duration::from_secs(30), "one CRL per CA in the bundle", async {
        loop {
            let message = stream.message().await.unwrap().expect("stream open");
            if let Some(Event::Revocation(revocation)) = message.event {
                if revocation.crls.len() >= 2 {
                    break revocation.crls;
                }
            }
        }
    })
    .await;
    let issuers: BTreeSet<Vec<u8>> = crls
        .iter()
        .map(|der| x509_parser::parse_x509_crl(der).unwrap().1.issuer().as_raw().to_vec())
        .collect();
    assert_eq!(issuers.len(), crls.len(), "one CRL per CA, each from a different issuer");
    server.stop().await;
}

/// A compromised agent cannot grow the issued-SVID records without bound:
/// past its signing budget it gets `ResourceExhausted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_signing_budget_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.sign_rate = 1;
    config.sign_burst = 1000;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = attest(&server, "spiffe://example.org/node/greedy").await;
    let entry_id =
        server.create_entry("spiffe://example.org/w", &agent.id, &["unix:uid:1"], None).await;
    let batch = |n: usize| node_pb::SignX509Request {
        items: (0..n)
            .map(|_| node_pb::SignX509Item { entry_id: entry_id.clone(), csr: key_and_csr().1 })
            .collect(),
    };
    let mut client = agent.connect().await;
    let first = client.sign_x509(batch(1000)).await.expect("within the burst");
    assert!(first.into_inner().results.iter().all(|r| r.status.as_ref().unwrap().code == 0));
    let err = client.sign_x509(batch(100)).await.expect_err("over the budget");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("signing limit"), "{err:?}");
    server.stop().await;
}
