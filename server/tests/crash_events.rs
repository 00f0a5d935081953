//! Every committed change has exactly one event, across crashes: the real
//! server binary is killed with SIGKILL at a random point of a mixed write
//! loop (entry creates, updates and deletes, join tokens, JWT mints and
//! their revocations), restarted, and checked against what the client was
//! told, on sled and on PostgreSQL:
//! - no acknowledged write is missing;
//! - every entry in the store has exactly one create event, and its last
//!   create or update event carries its current revision (the last change
//!   has its event); no (entry, revision) has two events;
//! - every deleted entry has at most one delete event (exactly one when the
//!   delete was acknowledged) and is gone;
//! - every join token, mint and revocation acknowledged has exactly one
//!   event, and every stored revocation has exactly one;
//! - the event chain verifies.
//!
//! The seed is printed; `TESSERA_CRASH_SEED` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::RunningServer;
use tessera_proto::admin::{self as pb, admin_client::AdminClient};
use tessera_proto::types;
use tonic::transport::Channel;

/// A small deterministic generator (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the client was told, and what it cannot know (a call cut by the kill).
#[derive(Default, Debug)]
struct Model {
    /// Entries acknowledged as created and not (possibly) deleted since.
    live: BTreeMap<String, String>,
    /// Entries whose delete was acknowledged.
    deleted: BTreeSet<String>,
    /// Entries whose delete may or may not have committed.
    maybe_deleted: BTreeSet<String>,
    /// Agent IDs of acknowledged join tokens.
    tokens: BTreeSet<String>,
    /// Minted JWT-SVIDs acknowledged (jti).
    minted: BTreeSet<String>,
    /// Revocations acknowledged (jti).
    revoked: BTreeSet<String>,
    /// Counts of each kind of operation acknowledged, to show each ran.
    done: BTreeMap<&'static str, usize>,
}

async fn admin(socket: &Path) -> AdminClient<Channel> {
    tessera_server::connect_admin(socket).await.unwrap()
}

/// Entry `n`; every third one with 40 long DNS names (~6 KB), a record
/// larger than a sled row (its events, deflated, are not), so that kills
/// land on commits of values the store splits into rows
/// (`store/sled/chunks.rs`): each is read back whole after the restart.
fn entry(n: u64) -> types::Entry {
    let label = "a".repeat(60);
    let dns_names = if n.is_multiple_of(3) {
        (0..40).map(|i| format!("{label}.{label}.n{n}-{i}.example.org")).collect()
    } else {
        Vec::new()
    };
    types::Entry {
        spiffe_id: format!("spiffe://example.org/crash/w{n}"),
        parent_id: "spiffe://example.org/crash/agent".into(),
        selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{n}") }],
        x509_svid_ttl: Some(3600),
        dns_names,
        ..Default::default()
    }
}

/// Runs mixed writes until the server dies under them; records what was
/// acknowledged. Returns when a call fails (the kill).
async fn write_loop(
    mut client: AdminClient<Channel>,
    rng: &mut Rng,
    model: &mut Model,
    n: &mut u64,
) {
    loop {
        *n += 1;
        let roll = rng.below(100);
        let outcome: Result<(), tonic::Status> = async {
            if roll < 40 || model.live.is_empty() {
                let req = pb::BatchCreateEntryRequest { entries: vec![entry(*n)] };
                let res = client.batch_create_entry(req).await?.into_inner();
                let created = res.results[0].entry.clone().expect("created");
                model.live.insert(created.id, created.spiffe_id);
                *model.done.entry("create").or_default() += 1;
            } else if roll < 60 {
                let pick = rng.below(model.live.len() as u64) as usize;
                let id = model.live.keys().nth(pick).cloned().unwrap_or_default();
                let mut e = entry(*n);
                e.id = id;
                e.x509_svid_ttl = Some(600 + (*n % 1000) as u32);
                let req = pb::BatchUpdateEntryRequest { entries: vec![e] };
                client.batch_update_entry(req).await?;
                *model.done.entry("update").or_default() += 1;
            } else if roll < 75 {
                let pick = rng.below(model.live.len() as u64) as usize;
                let id = model.live.keys().nth(pick).cloned().unwrap_or_default();
                model.live.remove(&id);
                model.maybe_deleted.insert(id.clone());
                let req = pb::BatchDeleteEntryRequest { ids: vec![id.clone()] };
                client.batch_delete_entry(req).await?;
                model.maybe_deleted.remove(&id);
                model.deleted.insert(id);
                *model.done.entry("delete").or_default() += 1;
            } else if roll < 85 {
                let spiffe_id = format!("spiffe://example.org/crash/node{n}");
                let req = pb::CreateJoinTokenRequest { ttl: 600, spiffe_id: spiffe_id.clone() };
                client.create_join_token(req).await?;
                model.tokens.insert(spiffe_id);
                *model.done.entry("join_token").or_default() += 1;
            } else if roll < 95 || model.minted.len() <= model.revoked.len() {
                let req = pb::MintJwtSvidRequest {
                    spiffe_id: format!("spiffe://example.org/crash/minted{n}"),
                    audience: vec!["crash-test".into()],
                    ttl: 600,
                };
                let jti = client.mint_jwt_svid(req).await?.into_inner().jti;
                model.minted.insert(jti);
                *model.done.entry("mint").or_default() += 1;
            } else {
                let jti = model.minted.difference(&model.revoked).next().cloned().unwrap();
                let req = pb::RevokeSvidRequest { jti: jti.clone(), ..Default::default() };
                client.revoke_svid(req).await?;
                model.revoked.insert(jti);
                *model.done.entry("revoke").or_default() += 1;
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            return;
        }
    }
}

async fn all_entries(client: &mut AdminClient<Channel>) -> HashMap<String, types::Entry> {
    let mut out = HashMap::new();
    let mut page_token = String::new();
    loop {
        let req = pb::ListEntriesRequest { page_token: page_token.clone(), ..Default::default() };
        let res = client.list_entries(req).await.unwrap().into_inner();
        for e in res.entries.into_iter().filter(|e| e.pending.is_none()) {
            out.insert(e.id.clone(), e);
        }
        if res.next_page_token.is_empty() {
            return out;
        }
        page_token = res.next_page_token;
    }
}

async fn all_events(client: &mut AdminClient<Channel>) -> Vec<types::Event> {
    let mut stream =
        client.list_events(pb::ListEventsRequest::default()).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
    }
    out
}

fn revision_of(json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["revision"].as_u64().unwrap()
}

/// Checks the store and the event log against the model.
/// Checks the restarted server against the model; returns how many of its
/// entries were large (split into rows on sled).
async fn check(socket: &Path, model: &Model, seed: u64, round: usize) -> usize {
    let ctx = format!("seed {seed}, after kill {round}");
    let mut client = admin(socket).await;
    let entries = all_entries(&mut client).await;
    let events = all_events(&mut client).await;
    let report = client.verify_events(pb::VerifyEventsRequest::default()).await.unwrap();
    let report = report.into_inner();
    assert!(report.ok, "{ctx}: the chain breaks at {}: {}", report.broken_at, report.problem);
    assert_eq!(report.checked as usize, events.len(), "{ctx}: every event is in the chain");

    for (id, spiffe) in &model.live {
        let stored = entries.get(id);
        assert!(stored.is_some(), "{ctx}: acknowledged entry {id} ({spiffe}) is missing");
    }
    let allow = |e: &&types::Event| e.decision != "deny";
    let by_kind =
        |kind: &str| events.iter().filter(|e| e.kind == kind).filter(allow).collect::<Vec<_>>();
    let (creates, updates, deletes) = (
        by_kind("admin.entry.create"),
        by_kind("admin.entry.update"),
        by_kind("admin.entry.delete"),
    );
    let mut seen_revisions = BTreeSet::new();
    for e in creates.iter().chain(&updates) {
        let id = e.entry_ids[0].clone();
        let revision = revision_of(&e.after);
        assert!(
            seen_revisions.insert((id.clone(), revision)),
            "{ctx}: two events for {id} at revision {revision}"
        );
    }
    for (id, stored) in &entries {
        // Whole as written, the large ones (split into rows) too.
        let n: u64 = stored.spiffe_id.rsplit("/w").next().and_then(|n| n.parse().ok()).unwrap();
        assert_eq!(stored.dns_names, entry(n).dns_names, "{ctx}: entry {id} is not as written");
        let created = creates.iter().filter(|e| e.entry_ids.contains(id)).count();
        assert_eq!(created, 1, "{ctx}: entry {id} in the store has {created} create events");
        let last = creates
            .iter()
            .chain(&updates)
            .filter(|e| e.entry_ids.contains(id))
            .max_by_key(|e| e.seq)
            .unwrap();
        assert_eq!(
            revision_of(&last.after),
            stored.revision,
            "{ctx}: the last change of entry {id} has no event"
        );
    }
    for id in model.deleted.iter().chain(&model.maybe_deleted) {
        let n = deletes.iter().filter(|e| e.entry_ids.contains(id)).count();
        let acked = model.deleted.contains(id);
        assert!(n <= 1, "{ctx}: entry {id} has {n} delete events");
        if acked {
            assert_eq!(n, 1, "{ctx}: acknowledged delete of {id} has no event");
            assert!(!entries.contains_key(id), "{ctx}: deleted entry {id} is back");
        } else {
            assert_eq!(
                n == 1,
                !entries.contains_key(id),
                "{ctx}: entry {id} gone without its event, or the reverse"
            );
        }
    }
    let tokens = by_kind("admin.join_token.create");
    let mut per_agent: HashMap<&str, usize> = HashMap::new();
    for e in &tokens {
        *per_agent.entry(e.agent_id.as_str()).or_default() += 1;
    }
    assert!(per_agent.values().all(|n| *n == 1), "{ctx}: a join token with two events");
    for id in &model.tokens {
        assert_eq!(per_agent.get(id.as_str()), Some(&1), "{ctx}: token for {id} has no event");
    }
    let mints = by_kind("svid.jwt.issue");
    for jti in &model.minted {
        let n = mints.iter().filter(|e| e.jti == *jti).count();
        assert_eq!(n, 1, "{ctx}: minted {jti} has {n} events");
    }
    let revocations = client.list_revocations(pb::ListRevocationsRequest {}).await.unwrap();
    let stored: BTreeSet<String> =
        revocations.into_inner().revocations.into_iter().map(|r| r.jti).collect();
    let revoke_events: Vec<_> = events.iter().filter(|e| e.kind == "svid.revoke").collect();
    for jti in &stored {
        let n = revoke_events.iter().filter(|e| e.jti == *jti).count();
        assert_eq!(n, 1, "{ctx}: stored revocation of {jti} has {n} events");
    }
    for jti in &model.revoked {
        assert!(stored.contains(jti), "{ctx}: acknowledged revocation of {jti} is missing");
    }
    entries.values().filter(|e| !e.dns_names.is_empty()).count()
}

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

async fn crash_loop(data: &Path, extra: &[&str], kills: usize) {
    let seed = seed();
    println!("crash test seed {seed} (TESSERA_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let (mut n, mut large) = (0u64, 0);
    for round in 1..=kills {
        let server = RunningServer::start(data, extra);
        let socket = server.socket.clone();
        let client = admin(&socket).await;
        let delay = Duration::from_millis(150 + rng.below(600));
        let writer = {
            let mut rng = Rng(rng.next() | 1);
            let mut model_taken = std::mem::take(&mut model);
            let mut n_taken = n;
            tokio::spawn(async move {
                write_loop(client, &mut rng, &mut model_taken, &mut n_taken).await;
                (model_taken, n_taken)
            })
        };
        tokio::time::sleep(delay).await;
        // SIGKILL, mid-write.
        drop(server);
        (model, n) = writer.await.unwrap();
        let server = RunningServer::start(data, extra);
        large += check(&server.socket, &model, seed, round).await;
        server.stop();
    }
    for kind in ["create", "update", "delete", "join_token", "mint"] {
        assert!(
            model.done.get(kind).copied().unwrap_or(0) > 0,
            "seed {seed}: no {kind} ran: {:?}",
            model.done
        );
    }
    assert!(large > 0, "seed {seed}: no large entry was checked after a kill");
    println!("seed {seed}: {:?} acknowledged over {kills} kills", model.done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_every_committed_change_has_exactly_one_event_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    crash_loop(&dir.path().join("data"), &[], 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_committed_change_has_exactly_one_event_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let url = tessera_common::pg_cluster::PgCluster::shared().database();
    crash_loop(&dir.path().join("data"), &["--datastore", &url], 5).await;
}
