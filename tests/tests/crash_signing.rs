//! What the node API signs survives a crash exactly as it was answered: the
//! real `tessera-server` binary is killed with SIGKILL at a random point
//! while two agents have X509-SVID and JWT-SVID batches signed (several
//! requests in flight at once, so records share commits and, on sled,
//! rows), restarted, and checked against what the agents were told, on
//! sled and on PostgreSQL:
//! - every SVID an agent received has exactly one issuance event, and no
//!   serial or JWT ID has two;
//! - the event chain verifies;
//! - deleting an entry revokes exactly the SVIDs whose issuance has an
//!   event (so every SVID an agent received, and nothing the store did not
//!   also log); after the last kill, banning an agent does the same for all
//!   of its entries.
//!
//! The seed is printed; `TESSERA_CRASH_SEED` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{server_bin, Rng};
use tessera_proto::admin::{self as pb, admin_client::AdminClient};
use tessera_proto::node::{self as node_pb, node_client::NodeClient};
use tessera_proto::types;
use tessera_tests::hostile::{events_of_kind, ServerProcess};
use tessera_tests::pg_cluster::PgCluster;
use tessera_tests::{entry, key_and_csr, TestAgent};
use tonic::transport::Channel;

const AGENTS: usize = 2;
const ENTRIES_PER_AGENT: usize = 12;
const X509_ISSUE: &str = "svid.x509.issue";
const JWT_ISSUE: &str = "svid.jwt.issue";

fn seed() -> u64 {
    match std::env::var("TESSERA_CRASH_SEED") {
        Ok(s) => s.parse().expect("TESSERA_CRASH_SEED is a number"),
        Err(_) => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
                | 1
        }
    }
}

/// What the agents were told: serial (X.509) or JWT ID → entry ID.
#[derive(Default, Debug)]
struct Model {
    x509: BTreeMap<String, String>,
    jwt: BTreeMap<String, String>,
    /// Requests answered with more than one SVID.
    multi: usize,
}

impl Model {
    fn merge(&mut self, other: Model) {
        self.x509.extend(other.x509);
        self.jwt.extend(other.jwt);
        self.multi += other.multi;
    }
}

/// One agent's signing loop: batches of its entries, X.509 or JWT, until a
/// call fails (the kill). Returns what was acknowledged.
async fn sign_loop(mut client: NodeClient<Channel>, entries: Vec<String>, seed: u64) -> Model {
    let mut rng = Rng(seed | 1);
    let mut model = Model::default();
    loop {
        let n = 1 + rng.below(entries.len() as u64) as usize;
        let start = rng.below(entries.len() as u64) as usize;
        let batch: Vec<String> =
            (0..n).map(|i| entries[(start + i) % entries.len()].clone()).collect();
        let acked = if rng.below(10) < 6 {
            let items = batch
                .iter()
                .map(|id| node_pb::SignX509Item { entry_id: id.clone(), csr: key_and_csr().1 })
                .collect();
            let Ok(response) = client.sign_x509(node_pb::SignX509Request { items }).await else {
                return model;
            };
            let mut acked = 0;
            for r in response.into_inner().results {
                if r.status.as_ref().is_some_and(|s| s.code == 0) {
                    assert!(!r.x509_svid.is_empty() && !r.serial.is_empty());
                    model.x509.insert(r.serial, r.entry_id);
                    acked += 1;
                }
            }
            acked
        } else {
            let items = batch
                .iter()
                .map(|id| node_pb::SignJwtItem {
                    entry_id: id.clone(),
                    audience: vec!["crash-test".into()],
                })
                .collect();
            let Ok(response) = client.sign_jwt(node_pb::SignJwtRequest { items }).await else {
                return model;
            };
            let mut acked = 0;
            for r in response.into_inner().results {
                if r.status.as_ref().is_some_and(|s| s.code == 0) {
                    assert!(!r.token.is_empty() && !r.jti.is_empty());
                    model.jwt.insert(r.jti, r.entry_id);
                    acked += 1;
                }
            }
            acked
        };
        if acked > 1 {
            model.multi += 1;
        }
    }
}

/// Allowed issuance events: serial or JWT ID → their entries, every time.
async fn issued_events(admin: &mut AdminClient<Channel>, kind: &str) -> Vec<(String, String)> {
    events_of_kind(admin, kind)
        .await
        .into_iter()
        .filter(|e| e.decision != "deny")
        .map(|e| {
            let key = if kind == X509_ISSUE { e.serial.clone() } else { e.jti.clone() };
            (key, e.entry_ids.first().cloned().unwrap_or_default())
        })
        .collect()
}

async fn revocations(admin: &mut AdminClient<Channel>) -> Vec<types::Revocation> {
    admin.list_revocations(pb::ListRevocationsRequest {}).await.unwrap().into_inner().revocations
}

/// Every acknowledged SVID has exactly one issuance event; none has two;
/// the chain verifies.
async fn check_events(admin: &mut AdminClient<Channel>, model: &Model, ctx: &str) {
    let report = admin.verify_events(pb::VerifyEventsRequest::default()).await.unwrap();
    let report = report.into_inner();
    assert!(report.ok, "{ctx}: the chain breaks at {}: {}", report.broken_at, report.problem);
    for (kind, acked) in [(X509_ISSUE, &model.x509), (JWT_ISSUE, &model.jwt)] {
        let events = issued_events(admin, kind).await;
        let mut seen = BTreeMap::new();
        for (key, entry) in &events {
            assert!(
                seen.insert(key.clone(), entry.clone()).is_none(),
                "{ctx}: {kind} {key} has two events"
            );
        }
        for (key, entry) in acked {
            assert_eq!(seen.get(key), Some(entry), "{ctx}: acknowledged {kind} {key} has no event");
        }
    }
}

/// After `entries` were revoked (deleted, or their agent banned): the
/// revocations of each are exactly the SVIDs its issuance events name,
/// which include every one acknowledged.
async fn check_revoked(
    admin: &mut AdminClient<Channel>,
    model: &Model,
    entries: &BTreeSet<String>,
    ctx: &str,
) {
    let revoked = revocations(admin).await;
    for (kind, acked) in [(X509_ISSUE, &model.x509), (JWT_ISSUE, &model.jwt)] {
        let logged: BTreeSet<String> = issued_events(admin, kind)
            .await
            .into_iter()
            .filter(|(_, entry)| entries.contains(entry))
            .map(|(key, _)| key)
            .collect();
        let stored: BTreeSet<String> = revoked
            .iter()
            .filter(|r| entries.contains(&r.entry_id))
            .filter(|r| (kind == X509_ISSUE) == r.jti.is_empty())
            .map(|r| if kind == X509_ISSUE { r.serial.clone() } else { r.jti.clone() })
            .collect();
        let missing: Vec<_> = logged.difference(&stored).collect();
        let unlogged: Vec<_> = stored.difference(&logged).collect();
        assert!(missing.is_empty(), "{ctx}: {kind} issued (logged) but not revoked: {missing:?}");
        if !unlogged.is_empty() {
            let all = events_of_kind(admin, kind).await;
            let about: Vec<_> = all
                .iter()
                .filter(|e| unlogged.iter().any(|k| **k == e.serial || **k == e.jti))
                .collect();
            let acked: Vec<_> = unlogged.iter().map(|k| acked.contains_key(*k)).collect();
            let revs: Vec<_> = revoked
                .iter()
                .filter(|r| unlogged.iter().any(|k| **k == r.serial || **k == r.jti))
                .collect();
            panic!("{ctx}: {kind} revoked but its issuance not logged: {unlogged:?}; acked {acked:?}; events {about:?}; revocations {revs:?}");
        }
        for (key, entry) in acked.iter().filter(|(_, e)| entries.contains(*e)) {
            assert!(
                stored.contains(key),
                "{ctx}: acknowledged {kind} {key} of {entry} not revoked"
            );
        }
    }
}

async fn crash_loop(dir: &Path, extra: &str, kills: usize) {
    let seed = seed();
    println!("crash test seed {seed} (TESSERA_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    // No signing budget in the way: the test is about what is recorded.
    let extra = format!("sign_rate = 1000000\nsign_burst = 1000000\n{extra}");
    let bin = server_bin();
    let mut server = ServerProcess::start(&bin, dir, &extra).await;
    let bundle = server.bundle().await;
    let mut admin = server.admin().await;
    let mut agents = Vec::new();
    let mut entries: Vec<Vec<String>> = Vec::new();
    for a in 0..AGENTS {
        let token = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl: 600,
                spiffe_id: format!("spiffe://example.org/crash/agent{a}"),
            })
            .await
            .unwrap()
            .into_inner();
        let agent = TestAgent::attest_to(server.addr, bundle.clone(), &token.token).await.unwrap();
        let batch = (0..ENTRIES_PER_AGENT)
            .map(|i| {
                entry(
                    &format!("spiffe://example.org/crash/a{a}/w{i}"),
                    &agent.id,
                    &[&format!("unix:uid:{}", 1000 + i)],
                    Some(3600),
                )
            })
            .collect();
        let created = admin
            .batch_create_entry(pb::BatchCreateEntryRequest { entries: batch })
            .await
            .unwrap()
            .into_inner();
        entries.push(created.results.into_iter().map(|r| r.entry.unwrap().id).collect());
        agents.push(agent);
    }
    let mut model = Model::default();
    let mut deleted = BTreeSet::new();
    for round in 1..=kills {
        let ctx = format!("seed {seed}, kill {round}");
        let mut signers = Vec::new();
        for (a, agent) in agents.iter().enumerate() {
            let live: Vec<String> =
                entries[a].iter().filter(|e| !deleted.contains(*e)).cloned().collect();
            for _ in 0..2 {
                let client = agent.connect().await;
                signers.push(tokio::spawn(sign_loop(client, live.clone(), rng.next())));
            }
        }
        tokio::time::sleep(Duration::from_millis(200 + rng.below(700))).await;
        // SIGKILL, mid-batch.
        drop(server);
        for signer in signers {
            model.merge(signer.await.unwrap());
        }
        server = ServerProcess::start(&bin, dir, &extra).await;
        agents = agents.into_iter().map(|a| a.at(server.addr)).collect();
        admin = server.admin().await;
        check_events(&mut admin, &model, &ctx).await;
        // One entry of each agent deleted: what was issued for it is revoked.
        let mut gone = BTreeSet::new();
        for list in &entries {
            let live: Vec<&String> = list.iter().filter(|e| !deleted.contains(*e)).collect();
            gone.insert(live[rng.below(live.len() as u64) as usize].clone());
        }
        let ids = gone.iter().cloned().collect();
        let res = admin.batch_delete_entry(pb::BatchDeleteEntryRequest { ids }).await.unwrap();
        assert!(res
            .into_inner()
            .results
            .iter()
            .all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
        check_revoked(&mut admin, &model, &gone, &ctx).await;
        deleted.extend(gone);
    }
    // The last agent banned: what was issued through it is revoked.
    let banned = agents.last().unwrap().id.clone();
    admin
        .ban_agent(pb::BanAgentRequest { spiffe_id: banned.clone(), reason: "crash test".into() })
        .await
        .unwrap();
    let its: BTreeSet<String> =
        entries.last().unwrap().iter().filter(|e| !deleted.contains(*e)).cloned().collect();
    check_revoked(&mut admin, &model, &its, &format!("seed {seed}, after banning {banned}")).await;
    assert!(!model.x509.is_empty() && !model.jwt.is_empty(), "seed {seed}: {model:?}");
    assert!(model.multi > 0, "seed {seed}: no request was answered with several SVIDs");
    println!(
        "seed {seed}: {} X509-SVIDs and {} JWT-SVIDs acknowledged ({} requests of several) over {kills} kills",
        model.x509.len(),
        model.jwt.len(),
        model.multi
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_what_was_signed_is_logged_and_revocable_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    crash_loop(dir.path(), "", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_what_was_signed_is_logged_and_revocable_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let url = PgCluster::shared().database();
    crash_loop(dir.path(), &format!("datastore = \"{url}\""), 4).await;
}
