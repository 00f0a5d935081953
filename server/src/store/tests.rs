//! The store's unit tests: a conformance suite every test of which runs
//! on sled and on PostgreSQL, tests of sled alone, and of several servers
//! sharing one PostgreSQL database.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::entry::EntryRules;
use crate::policy::approval;
use tessera_workload_api::TrustDomain;

fn entry(id: &str, spiffe: &str, parent: &str, uid: u32) -> Entry {
    let rules = EntryRules {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        default_ttl: 60,
        max_ttl: 600,
        default_jwt_ttl: 300,
        max_jwt_ttl: 600,
    };
    let mut e = rules
        .validate(
            &pb::Entry {
                spiffe_id: format!("spiffe://example.org/{spiffe}"),
                parent_id: format!("spiffe://example.org/{parent}"),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                ..Default::default()
            },
            1,
        )
        .unwrap();
    e.id = id.into();
    e
}

fn issued(serial: &str, entry: &Entry) -> pb::IssuedSvid {
    pb::IssuedSvid {
        serial: serial.into(),
        spiffe_id: entry.spiffe_id.to_string(),
        entry_id: entry.id.clone(),
        agent_id: entry.parent_id.to_string(),
        expires_at: i64::MAX,
        ca_seq: 1,
        jti: String::new(),
    }
}

fn agent(id: &str, serial: &str) -> pb::Agent {
    pb::Agent {
        spiffe_id: format!("spiffe://example.org/{id}"),
        x509_svid_serial: serial.into(),
        x509_svid_expires_at: i64::MAX,
        ..Default::default()
    }
}

fn agent_svid(id: &str, serial: &str) -> pb::IssuedSvid {
    pb::IssuedSvid {
        serial: serial.into(),
        agent_id: format!("spiffe://example.org/{id}"),
        expires_at: i64::MAX,
        ..Default::default()
    }
}

/// Pages of every size, after every position, with each filter, give
/// exactly the matching entries in ID order.
fn entries_list_in_pages_with_and_without_filters(place: Place) {
    let store = place.open();
    let made: Vec<Entry> = (0..23)
        .map(|i| {
            let parent = if i % 3 == 0 { "agent-a" } else { "agent-b" };
            let spiffe = if i % 4 == 0 { "shared".to_string() } else { format!("w{i}") };
            entry(&format!("e{i:02}"), &spiffe, parent, i)
        })
        .collect();
    assert!(store.create_entries(&made, &Audit::quiet()).unwrap().iter().all(Result::is_ok));
    let id = |s: &str| SpiffeId::parse(&format!("spiffe://example.org/{s}")).unwrap();
    let filters = [
        EntryFilter::default(),
        EntryFilter { parent_id: Some(id("agent-a")), spiffe_id: None },
        EntryFilter { parent_id: Some(id("agent-b")), spiffe_id: Some(id("shared")) },
        EntryFilter { parent_id: None, spiffe_id: Some(id("shared")) },
        EntryFilter { parent_id: Some(id("nobody")), spiffe_id: None },
    ];
    for filter in &filters {
        let mut want: Vec<String> = made
            .iter()
            .filter(|e| filter.parent_id.as_ref().is_none_or(|p| &e.parent_id == p))
            .filter(|e| filter.spiffe_id.as_ref().is_none_or(|s| &e.spiffe_id == s))
            .map(|e| e.id.clone())
            .collect();
        want.sort();
        for page in [1, 2, 5, 100] {
            let (mut got, mut after) = (Vec::new(), None::<String>);
            loop {
                let listed = store.list_entries(filter, after.as_deref(), page).unwrap();
                assert!(listed.len() <= page);
                got.extend(listed.iter().map(|e| e.id.clone()));
                if listed.len() < page {
                    break;
                }
                after = listed.last().map(|e| e.id.clone());
            }
            assert_eq!(got, want, "{filter:?}, pages of {page}");
        }
    }
}

/// A multi-get answers each ID asked, in order, repeats and absent ones included.
fn entries_are_read_at_once_in_the_order_asked(place: Place) {
    let store = place.open();
    let made = [entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 2)];
    assert!(store.create_entries(&made, &Audit::quiet()).unwrap().iter().all(Result::is_ok));
    let ids: Vec<String> = ["b", "zz", "a", "b"].iter().map(|s| s.to_string()).collect();
    let got: Vec<Option<String>> =
        store.entries(&ids).unwrap().into_iter().map(|e| e.map(|e| e.id)).collect();
    let want = [Some("b"), None, Some("a"), Some("b")].map(|s| s.map(str::to_string));
    assert_eq!(got, want);
    assert!(store.entries(&[]).unwrap().is_empty());
}

fn entries_are_indexed_by_parent_and_survive_reopen(place: Place) {
    {
        let store = place.open();
        let results = store
            .create_entries(
                &[
                    entry("a", "w1", "agent1", 1),
                    entry("b", "w2", "agent2", 1),
                    entry("c", "w3", "agent1", 2),
                ],
                &Audit::quiet(),
            )
            .unwrap();
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(store.revision().unwrap(), 3);
    }
    let store = place.open();
    let parent = SpiffeId::parse("spiffe://example.org/agent1").unwrap();
    let ids: Vec<_> = store.entries_by_parent(&parent).unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(store.entry_count(), 3);
}

fn duplicates_are_refused_per_item_and_store_unchanged(place: Place) {
    let store = place.open();
    store.create_entries(&[entry("a", "w", "agent", 1)], &Audit::quiet()).unwrap();
    let results = store
        .create_entries(
            &[
                entry("b", "w", "agent", 1),
                entry("c", "w", "agent", 2),
                entry("d", "w", "agent", 2),
            ],
            &Audit::quiet(),
        )
        .unwrap();
    assert_eq!(results[0], Err(EntryError::Duplicate("a".into())));
    assert!(results[1].is_ok());
    assert_eq!(results[2], Err(EntryError::Duplicate("c".into())));
    assert_eq!(store.entry_count(), 2);
    assert_eq!(store.revision().unwrap(), 2);
}

/// One change per revision: an update that moves an entry names both
/// parents in one record, so a resume decides from the entry as it is.
fn an_update_is_one_change_naming_old_and_new_parent(place: Place) {
    let store = place.open();
    store.create_entries(&[entry("a", "w", "agent1", 1)], &Audit::quiet()).unwrap();
    let write =
        store.update_entries(&[entry("a", "w", "agent2", 1)], 0, "moved", &Audit::quiet()).unwrap();
    assert_eq!(write.results[0].as_ref().unwrap().revision, 2);
    let changes = store.changes_since(1, 100).unwrap();
    assert_eq!(
        changes,
        [Change {
            revision: 2,
            kind: ChangeKind::Entry {
                entry_id: "a".into(),
                parents: vec![
                    "spiffe://example.org/agent1".into(),
                    "spiffe://example.org/agent2".into()
                ]
            }
        }]
    );
    let revisions: Vec<u64> =
        store.changes_since(0, 100).unwrap().iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [1, 2], "revisions are commit order, without gaps");
}

/// Item 4: a delete and the revocation of its SVIDs are one commit;
/// what is reopened after it has both or neither.
fn a_delete_and_its_revocations_are_one_commit(place: Place) {
    {
        let store = place.open();
        let e = entry("a", "w", "agent", 1);
        store.create_entries(std::slice::from_ref(&e), &Audit::quiet()).unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        let signed =
            [Signed { svid: issued("01", &e), entry: e.clone(), event: Default::default() }];
        assert_eq!(
            store.record_issued(&e.parent_id.to_string(), "s0", &signed, 5).unwrap(),
            [Ok(())]
        );
        let commits_before = store.check().unwrap().write_seq;
        let write =
            store.delete_entries(&["a".into()], 7, "entry deleted", &Audit::quiet()).unwrap();
        assert_eq!(write.revoked.len(), 1);
        // One commit: the write sequence moved by exactly one.
        assert_eq!(store.check().unwrap().write_seq, commits_before + 1);
        let kinds: Vec<_> =
            store.changes_since(1, 100).unwrap().into_iter().map(|c| c.kind).collect();
        assert!(
            matches!(kinds.as_slice(), [ChangeKind::Entry { .. }, ChangeKind::Revoked { serials, .. }] if serials == &["01"])
        );
    }
    let store = place.open();
    assert!(store.entry("a").unwrap().is_none());
    assert_eq!(store.revocation("01").unwrap().map(|r| r.revoked_at), Some(7));
    let retry = store.delete_entries(&["a".into()], 8, "again", &Audit::quiet()).unwrap();
    assert_eq!(retry.results[0], Err(EntryError::NotFound("a".into())));
}

/// Item 4: an SVID whose signing raced a delete, a change or a ban is
/// recorded and revoked in the same commit, never handed out valid.
fn svids_recorded_after_their_entry_changed_are_revoked(place: Place) {
    let store = place.open();
    let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 1));
    store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    store.delete_entries(&["a".into()], 1, "deleted", &Audit::quiet()).unwrap();
    let mut renamed = b.clone();
    renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/other").unwrap();
    store.update_entries(&[renamed], 1, "renamed", &Audit::quiet()).unwrap();
    let signed = [
        Signed { svid: issued("0a", &a), entry: a.clone(), event: Default::default() },
        Signed { svid: issued("0b", &b), entry: b.clone(), event: Default::default() },
    ];
    let results = store.record_issued("spiffe://example.org/agent", "s0", &signed, 2).unwrap();
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(store.revocation("0a").unwrap().is_some() && store.revocation("0b").unwrap().is_some());

    // Signed with an agent SVID a renewal replaced meanwhile: refused
    // with the typed code the agent acts on (sign again at once).
    let d = entry("d", "w4", "agent", 1);
    store.create_entries(std::slice::from_ref(&d), &Audit::quiet()).unwrap();
    let signed = [Signed { svid: issued("0d", &d), entry: d, event: Default::default() }];
    let results = store.record_issued("spiffe://example.org/agent", "s-old", &signed, 3).unwrap();
    assert_eq!(
        results[0].as_ref().err().map(|r| r.refusal),
        Some(Refusal::AgentSvidChanged),
        "{results:?}"
    );

    let c = entry("c", "w3", "agent", 1);
    store.create_entries(std::slice::from_ref(&c), &Audit::quiet()).unwrap();
    store.ban_agent("spiffe://example.org/agent", "test", 3, &Audit::quiet()).unwrap().unwrap();
    let signed = [Signed { svid: issued("0c", &c), entry: c, event: Default::default() }];
    let results = store.record_issued("spiffe://example.org/agent", "s0", &signed, 4).unwrap();
    assert_eq!(results[0].as_ref().err().map(|r| r.refusal), Some(Refusal::Banned));
    assert!(store.revocation("0c").unwrap().is_some());
}

/// JWT-SVIDs are recorded under `jwt:<jti>` and revoked with their entry
/// (renamed) or agent (banned) like X509-SVIDs; their revocations are
/// logged with their expiry and kept out of the CRL signing set, and
/// survive a reopen.
fn jwt_svids_are_revoked_with_their_entry_and_agent(place: Place) {
    let jwt = |jti: &str, entry: &Entry| pb::IssuedSvid {
        serial: String::new(),
        jti: jti.into(),
        expires_at: 1000,
        ..issued("", entry)
    };
    {
        let store = place.open();
        let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 1));
        store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        let signed = [
            Signed { svid: jwt("j1", &a), entry: a.clone(), event: Default::default() },
            Signed { svid: jwt("j2", &b), entry: b.clone(), event: Default::default() },
            Signed { svid: issued("0b", &b), entry: b.clone(), event: Default::default() },
        ];
        let results = store.record_issued("spiffe://example.org/agent", "s0", &signed, 1).unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert!(store.issued("jwt:j1").unwrap().is_some());
        let mut renamed = a.clone();
        renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/renamed").unwrap();
        let write = store.update_entries(&[renamed], 2, "renamed", &Audit::quiet()).unwrap();
        assert_eq!(write.revoked.iter().map(|r| r.jti.as_str()).collect::<Vec<_>>(), ["j1"]);
        let revoked = store
            .ban_agent("spiffe://example.org/agent", "test", 3, &Audit::quiet())
            .unwrap()
            .unwrap();
        let mut jtis: Vec<&str> =
            revoked.iter().filter(|r| !r.jti.is_empty()).map(|r| r.jti.as_str()).collect();
        jtis.sort_unstable();
        assert_eq!(jtis, ["j2"]);
        let logged: Vec<RevokedJwt> = store
            .changes_since(0, 100)
            .unwrap()
            .into_iter()
            .flat_map(|c| match c.kind {
                ChangeKind::Revoked { jwts, .. } => jwts,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            logged,
            [
                RevokedJwt { jti: "j1".into(), expires_at: 1000 },
                RevokedJwt { jti: "j2".into(), expires_at: 1000 }
            ]
        );
        assert!(store.lock().revocations.iter().all(|r| r.jti.is_empty()));
    }
    let store = place.open();
    assert_eq!(store.revocation("jwt:j2").unwrap().unwrap().jti, "j2");
    assert!(store.lock().revocations.iter().all(|r| r.jti.is_empty()), "CRLs list serials only");
    assert_eq!(store.prune_expired(1000).unwrap(), 4, "records and revocations go at expiry");
    assert!(store.revocation("jwt:j1").unwrap().is_none());
}

/// The server revokes exactly on the changes for which the agent
/// re-issues because the old SVID no longer states what the entry
/// authorizes: a new DNS name revokes; a new TTL alone does not.
fn a_dns_name_change_revokes_and_a_ttl_change_does_not(place: Place) {
    let store = place.open();
    let e = entry("a", "w", "agent", 1);
    store.create_entries(std::slice::from_ref(&e), &Audit::quiet()).unwrap();
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    let signed = [Signed { svid: issued("0a", &e), entry: e.clone(), event: Default::default() }];
    store.record_issued("spiffe://example.org/agent", "s0", &signed, 1).unwrap();
    let mut longer = e.clone();
    longer.x509_svid_ttl = 600;
    assert!(store
        .update_entries(&[longer.clone()], 2, "ttl", &Audit::quiet())
        .unwrap()
        .revoked
        .is_empty());
    let mut named = longer;
    named.dns_names = vec!["web.internal".into()];
    let revoked = store.update_entries(&[named], 3, "dns", &Audit::quiet()).unwrap().revoked;
    assert_eq!(revoked.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(), ["0a"]);
}

/// Item 4: a renewal cannot undo a ban, and is refused once banned.
fn a_renewal_never_undoes_a_ban(place: Place) {
    let store = place.open();
    let id = "spiffe://example.org/agent";
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    store.ban_agent(id, "test", 1, &Audit::quiet()).unwrap().unwrap();
    let refused =
        store.renew_agent(id, "s0", &agent_svid("agent", "s1"), 2, &Audit::quiet()).unwrap();
    assert_eq!(refused.err(), Some(AgentRefusal::Banned(id.into())));
    assert!(store.agent(id).unwrap().unwrap().banned);
    assert_eq!(store.check_agent(id, "s0").unwrap(), Err(AgentRefusal::Banned(id.into())));
}

/// A ban and a renewal started together (a barrier), over many trials:
/// whichever commits first, the agent ends banned, the renewed SVID (if
/// the renewal won) is revoked, and neither SVID passes `check_agent`. The
/// calls are shown to overlap (both under way at once) in some trial.
fn a_ban_racing_a_renewal_is_never_undone(place: Place) {
    let store = Arc::new(place.open());
    let (mut overlapped, mut renewals_won) = (0, 0);
    for trial in 0..30 {
        let id = format!("spiffe://example.org/racer{trial}");
        let name = format!("racer{trial}");
        let (old, new) = (format!("{trial:02x}00"), format!("{trial:02x}01"));
        store
            .register_agent(&agent(&name, &old), &agent_svid(&name, &old), &Audit::quiet())
            .unwrap()
            .unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let timed = |f: Box<dyn FnOnce() -> bool + Send>, barrier: Arc<std::sync::Barrier>| {
            std::thread::spawn(move || {
                barrier.wait();
                let start = std::time::Instant::now();
                let ok = f();
                (start, std::time::Instant::now(), ok)
            })
        };
        let (s, i) = (store.clone(), id.clone());
        let ban = timed(
            Box::new(move || s.ban_agent(&i, "race", 1, &Audit::quiet()).unwrap().is_ok()),
            barrier.clone(),
        );
        let (s, i, n, o, w) = (store.clone(), id.clone(), name.clone(), old.clone(), new.clone());
        let renew = timed(
            Box::new(move || {
                let svid = agent_svid(&n, &w);
                s.renew_agent(&i, &o, &svid, 1, &Audit::quiet()).unwrap().is_ok()
            }),
            barrier,
        );
        let (ban, renew) = (ban.join().unwrap(), renew.join().unwrap());
        assert!(ban.2, "the ban of {id} commits");
        if ban.0 < renew.1 && renew.0 < ban.1 {
            overlapped += 1;
        }
        let stored = store.agent(&id).unwrap().unwrap();
        assert!(stored.banned, "trial {trial}: the renewal undid the ban");
        if renew.2 {
            renewals_won += 1;
            assert!(store.revocation(&new).unwrap().is_some(), "trial {trial}: {new} not revoked");
        }
        for serial in [&old, &new] {
            assert!(store.check_agent(&id, serial).unwrap().is_err(), "{serial} still passes");
        }
    }
    assert!(overlapped > 0, "the ban and the renewal never overlapped in 30 trials");
    println!("ban vs renewal: {overlapped} of 30 overlapped, the renewal committed first {renewals_won} times");
}

/// Item 7: a store behind its watermark (data lost, or an old copy put
/// back) is refused, never served as what is left.
/// Where a conformance test's store lives: each `open` is a new handle
/// on the same records (a restart).
enum Place {
    Sled(tempfile::TempDir),
    Postgres(String),
}

impl Place {
    fn sled() -> Self {
        Place::Sled(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Self {
        Place::Postgres(crate::pg_cluster::PgCluster::shared().database())
    }

    fn open(&self) -> KvStore {
        self.open_as("server-a")
    }

    /// Another server's handle (on sled: the same store).
    fn open_as(&self, server_id: &str) -> KvStore {
        match self {
            Place::Sled(dir) => KvStore::open(dir.path()).unwrap(),
            Place::Postgres(url) => KvStore::open_postgres(url, server_id).unwrap(),
        }
    }
}

/// The conformance suite: every test runs against sled and against
/// PostgreSQL (a private cluster, a database per test).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled_store {
            $( #[test] fn $name() { super::$name(super::Place::sled()) } )*
        }
        mod postgres_store {
            $( #[test] fn $name() { super::$name(super::Place::postgres()) } )*
        }
    };
}

conformance!(
    entries_are_indexed_by_parent_and_survive_reopen,
    entries_are_read_at_once_in_the_order_asked,
    entries_list_in_pages_with_and_without_filters,
    duplicates_are_refused_per_item_and_store_unchanged,
    an_update_is_one_change_naming_old_and_new_parent,
    a_delete_and_its_revocations_are_one_commit,
    svids_recorded_after_their_entry_changed_are_revoked,
    jwt_svids_are_revoked_with_their_entry_and_agent,
    a_dns_name_change_revokes_and_a_ttl_change_does_not,
    a_renewal_never_undoes_a_ban,
    a_ban_racing_a_renewal_is_never_undone,
    backup_restores_every_record_and_a_damaged_backup_is_refused,
    join_token_can_be_taken_once,
    join_tokens_are_hashed_and_never_name_an_agent_or_entry,
    an_approval_writes_exactly_the_proposal_it_names,
    an_update_decided_against_a_revision_replaces_only_that_revision,
    join_token_exists_reads_without_writing,
    a_ca_record_set_per_server_makes_one_bundle,
);

/// One server on its embedded store keeps signing budgets in memory.
#[test]
fn an_embedded_store_leaves_signing_budgets_to_the_server() {
    let store = Place::sled().open();
    assert_eq!(store.take_shared_budget("agent", 1, 1, 1000, 0).unwrap(), None);
}

/// A stand-in CA record of `server`, generation `seq`.
fn ca_record(server: &str, seq: u32) -> pb::CaRecord {
    pb::CaRecord {
        server_id: server.into(),
        seq,
        cert_der: vec![seq as u8],
        jwt: None,
        not_after: 99,
    }
}

fn a_ca_record_set_per_server_makes_one_bundle(place: Place) {
    let store = place.open();
    let record = ca_record;
    assert!(store.publish_cas("a", &[record("a", 1)]).unwrap());
    assert!(store.publish_cas("b", &[record("b", 1), record("b", 2)]).unwrap());
    assert!(!store.publish_cas("a", &[record("a", 1)]).unwrap(), "unchanged: no change logged");
    assert!(store.publish_cas("a", &[record("a", 2)]).unwrap());
    let mut held: Vec<(String, u32)> =
        store.cas().unwrap().into_iter().map(|r| (r.server_id, r.seq)).collect();
    held.sort();
    assert_eq!(held, [("a".into(), 2), ("b".into(), 1), ("b".into(), 2)]);
    let bundles = store
        .changes_since(0, 100)
        .unwrap()
        .into_iter()
        .filter(|c| c.kind == ChangeKind::Bundle)
        .count();
    assert_eq!(bundles, 3);
}

#[test]
fn a_store_behind_its_watermark_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    {
        let store = KvStore::open(dir.path()).unwrap();
        store.create_entries(&[entry("a", "w1", "agent", 1)], &Audit::quiet()).unwrap();
    }
    copy_dir(dir.path(), old.path());
    {
        let store = KvStore::open(dir.path()).unwrap();
        store.create_entries(&[entry("b", "w2", "agent", 1)], &Audit::quiet()).unwrap();
    }
    // Put the old database back, keeping the newer watermark.
    std::fs::copy(dir.path().join("tessera.watermark"), old.path().join("tessera.watermark"))
        .unwrap();
    let err = KvStore::open(old.path()).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("acknowledged"), "{err}");
}

fn backup_restores_every_record_and_a_damaged_backup_is_refused(place: Place) {
    let store = place.open();
    store
        .create_entries(
            &[entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 2)],
            &Audit::quiet(),
        )
        .unwrap();
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    let mut backup = Vec::new();
    store.backup(&mut backup).unwrap();
    let before = store.check().unwrap();

    let target = tempfile::tempdir().unwrap();
    let restored = KvStore::restore(&target.path().join("store"), &mut backup.as_slice()).unwrap();
    assert_eq!(restored, before);
    let reopened = KvStore::open(&target.path().join("store")).unwrap();
    assert_eq!(reopened.entry("b").unwrap().map(|e| e.id), Some("b".into()));

    let mut flipped = backup.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let err =
        KvStore::restore(&tempfile::tempdir().unwrap().path().join("s"), &mut flipped.as_slice());
    assert!(err.unwrap_err().to_string().contains("checksum"));
    let err = KvStore::restore(&target.path().join("store"), &mut backup.as_slice()).unwrap_err();
    assert!(err.to_string().contains("already holds a store"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

fn join_token_can_be_taken_once(place: Place) {
    let store = place.open();
    let token = pb::JoinToken {
        token: "t".into(),
        spiffe_id: "spiffe://example.org/a".into(),
        expires_at: 5,
        pending: None,
        approved: false,
    };
    store.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
    let stored = pb::JoinToken { token: String::new(), ..token };
    assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), Some(stored));
    assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), None);
}

/// Issue 19 (1, 11): a token is kept only as its hash; a token or an
/// attestation for the ID of an agent on record (live or banned) or of
/// an entry is refused, and an entry cannot take an agent's ID.
fn join_tokens_are_hashed_and_never_name_an_agent_or_entry(place: Place) {
    let store = place.open();
    let secret = "d3b07384-d9a0-4c4e-9b1e-secret-token";
    let token = |id: &str| pb::JoinToken {
        token: secret.into(),
        spiffe_id: format!("spiffe://example.org/{id}"),
        expires_at: 5,
        pending: None,
        approved: false,
    };
    store.put_join_token(&token("node/1"), &Audit::quiet()).unwrap().unwrap();
    let dump = store.dump().unwrap();
    let all: Vec<u8> =
        dump.iter().flatten().flat_map(|(k, v)| [k.clone(), v.clone()].concat()).collect();
    assert!(
        !all.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the token is not stored in clear"
    );
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    assert_eq!(
        store.put_join_token(&token("agent"), &Audit::quiet()).unwrap(),
        Err(AgentRefusal::Exists("spiffe://example.org/agent".into()))
    );
    assert_eq!(
        store
            .register_agent(&agent("agent", "s1"), &agent_svid("agent", "s1"), &Audit::quiet())
            .unwrap(),
        Err(AgentRefusal::Exists("spiffe://example.org/agent".into())),
        "a second attestation does not take over a live agent's ID"
    );
    assert_eq!(store.agent("spiffe://example.org/agent").unwrap().unwrap().x509_svid_serial, "s0");
    store.ban_agent("spiffe://example.org/agent", "test", 1, &Audit::quiet()).unwrap().unwrap();
    assert!(matches!(
        store.put_join_token(&token("agent"), &Audit::quiet()).unwrap(),
        Err(AgentRefusal::Exists(_))
    ));
    store
        .create_entries(&[entry("e1", "prod/payments", "agent", 1)], &Audit::quiet())
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(
        store.put_join_token(&token("prod/payments"), &Audit::quiet()).unwrap(),
        Err(AgentRefusal::EntryIdentity("spiffe://example.org/prod/payments".into()))
    );
    assert!(matches!(
        store
            .register_agent(
                &agent("prod/payments", "s2"),
                &agent_svid("prod/payments", "s2"),
                &Audit::quiet()
            )
            .unwrap(),
        Err(AgentRefusal::EntryIdentity(_))
    ));
    assert_eq!(
        store
            .create_entries(&[entry("e2", "agent", "agent", 1)], &Audit::quiet())
            .unwrap()
            .remove(0),
        Err(EntryError::AgentIdentity("spiffe://example.org/agent".into()))
    );
}

/// Issue 19 (4): a proposal is taken by the approval that names its
/// hash, in the commit that writes it; a second proposal for the entry
/// is refused while one waits.
fn an_approval_writes_exactly_the_proposal_it_names(place: Place) {
    let store = place.open();
    let op = |uid| pb::Operator { uid, gid: uid, pid: 1 };
    let e = entry("e1", "prod/a", "agent", 1);
    let first = approval::proposal(&e, approval::OP_CREATE, &op(1), vec![], 10, 60, 0);
    store.propose(&first, &Audit::quiet()).unwrap().unwrap();
    let second = approval::proposal(
        &entry("e1", "prod/b", "agent", 1),
        approval::OP_CREATE,
        &op(1),
        vec![],
        10,
        60,
        0,
    );
    assert!(matches!(
        store.propose(&second, &Audit::quiet()).unwrap(),
        Err(ApprovalRefusal::AlreadyPending { .. })
    ));
    let hash = |p: &pb::Entry| p.pending.clone().unwrap().content_hash;
    assert!(matches!(
        store.approve("e1", &hash(&second), 2, 11, &Audit::quiet()).unwrap(),
        Err(ApprovalRefusal::HashMismatch { .. })
    ));
    assert!(matches!(
        store.approve("e1", &hash(&first), 1, 11, &Audit::quiet()).unwrap(),
        Err(ApprovalRefusal::SameOperator { .. })
    ));
    assert!(store.entry("e1").unwrap().is_none(), "nothing written by a refused approval");
    let proposal_id = first.pending.clone().unwrap().proposal_id;
    let approved =
        store.approve(&proposal_id, &hash(&first), 2, 11, &Audit::quiet()).unwrap().unwrap();
    assert_eq!(approved.proposal, first);
    assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/a");
    assert!(
        matches!(
            store.approve("e1", &hash(&first), 2, 11, &Audit::quiet()).unwrap(),
            Err(ApprovalRefusal::NotFound(_))
        ),
        "taken once"
    );
    // An update proposed against a revision is refused once the entry moved on.
    let current = store.entry("e1").unwrap().unwrap();
    let update = approval::proposal(
        &entry("e1", "prod/c", "agent", 1),
        approval::OP_UPDATE,
        &op(1),
        vec![],
        12,
        60,
        current.revision,
    );
    store.propose(&update, &Audit::quiet()).unwrap().unwrap();
    store
        .update_entries(&[entry("e1", "prod/d", "agent", 1)], 12, "test", &Audit::quiet())
        .unwrap();
    assert!(matches!(
        store.approve("e1", &hash(&update), 2, 13, &Audit::quiet()).unwrap(),
        Err(ApprovalRefusal::Changed(_))
    ));
    assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/d");
}

/// An update judged against a revision (the approval policy's decision)
/// replaces only that revision: one that lands after an approval (or
/// another change) is refused, and the approved entry stays.
fn an_update_decided_against_a_revision_replaces_only_that_revision(place: Place) {
    let store = place.open();
    let created =
        store.create_entries(&[entry("e1", "dev/a", "agent", 1)], &Audit::quiet()).unwrap();
    let judged = created[0].clone().unwrap().revision;
    store
        .update_entries(&[entry("e1", "prod/approved", "agent", 1)], 1, "approved", &Audit::quiet())
        .unwrap();
    let mut late = entry("e1", "dev/b", "agent", 2);
    late.revision = judged;
    let write = store.update_entries(&[late], 2, "late", &Audit::quiet()).unwrap();
    assert_eq!(write.results, vec![Err(EntryError::Changed("e1".into()))]);
    assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/approved");
}

fn join_token_exists_reads_without_writing(place: Place) {
    let store = place.open();
    let token = pb::JoinToken {
        token: "t".into(),
        spiffe_id: "spiffe://example.org/a".into(),
        expires_at: 5,
        pending: None,
        approved: false,
    };
    store.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
    let before = store.check().unwrap().write_seq;
    assert!(store.join_token_exists("t").unwrap());
    assert!(!store.join_token_exists("bogus").unwrap());
    assert_eq!(store.check().unwrap().write_seq, before, "a lookup commits nothing");
    let stored = pb::JoinToken { token: String::new(), ..token };
    assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), Some(stored));
    assert!(!store.join_token_exists("t").unwrap());
}

/// Several servers on one PostgreSQL database.
mod shared_postgres {
    use super::*;

    fn two() -> (Place, KvStore, KvStore) {
        let place = Place::postgres();
        let (a, b) = (place.open_as("server-a"), place.open_as("server-b"));
        (place, a, b)
    }

    /// Runs `work(store, i)` for `i` in `0..n` on as many threads at
    /// once, even `i` on server A and odd on B; the results in order.
    fn at_once<T: Send + 'static>(
        a: &Arc<KvStore>,
        b: &Arc<KvStore>,
        n: usize,
        work: fn(&KvStore, usize) -> T,
    ) -> Vec<T> {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                std::thread::spawn(move || work(&store, i))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// Writers on two servers at once: the log has every change once,
    /// numbered without holes, and both servers read the same log.
    #[test]
    fn two_servers_share_one_change_log_without_holes() {
        let (_place, a, b) = two();
        let (a, b) = (Arc::new(a), Arc::new(b));
        at_once(&a, &b, 4, |store, w| {
            for i in 0..25 {
                let e = entry(&format!("e{w}-{i}"), &format!("w{w}-{i}"), "agent", 1);
                assert!(store.create_entries(&[e], &Audit::quiet()).unwrap()[0].is_ok());
            }
        });
        for store in [&a, &b] {
            let revisions: Vec<u64> =
                store.changes_since(0, 1000).unwrap().iter().map(|c| c.revision).collect();
            assert_eq!(revisions, (1..=100).collect::<Vec<_>>());
            assert_eq!(store.revision().unwrap(), 100);
            assert_eq!(store.entry_count(), 100);
        }
    }

    /// A commit on one server wakes the other's change feed (NOTIFY).
    #[test]
    fn a_commit_on_one_server_wakes_the_other() {
        let (_place, a, b) = two();
        let mut woken = b.subscribe();
        // The listener connects in the background: commit until it hears.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut n = 0;
        loop {
            n += 1;
            a.create_entries(
                &[entry(&format!("e{n}"), &format!("w{n}"), "agent", 1)],
                &Audit::quiet(),
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            if woken.has_changed().unwrap() && *woken.borrow_and_update() >= 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "server B never heard of A's commits");
        }
        assert_eq!(b.changes_since(0, 100).unwrap().len(), n);
    }

    /// A join token is taken once, whichever servers race for it.
    #[test]
    fn a_join_token_is_taken_once_across_servers() {
        let (_place, a, b) = two();
        let (a, b) = (Arc::new(a), Arc::new(b));
        for i in 0..20 {
            let token = pb::JoinToken {
                token: format!("t{i}"),
                spiffe_id: "spiffe://example.org/a".into(),
                expires_at: 5,
                pending: None,
                approved: false,
            };
            a.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
        }
        let takers: Vec<_> = [a.clone(), b.clone(), a, b]
            .into_iter()
            .map(|store| {
                std::thread::spawn(move || {
                    (0..20)
                        .filter(|i| {
                            store
                                .take_join_token(&format!("t{i}"), &Audit::quiet())
                                .unwrap()
                                .is_some()
                        })
                        .count()
                })
            })
            .collect();
        let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 20, "every token taken exactly once");
    }

    /// Two servers rotating their CAs at once: each publishes only its
    /// own records, so the bundle is always the union of both latest sets.
    #[test]
    fn two_servers_rotating_at_once_keep_one_whole_bundle() {
        let (_place, a, b) = two();
        let (a, b) = (Arc::new(a), Arc::new(b));
        at_once(&a, &b, 2, |store, i| {
            let name = ["a", "b"][i];
            for seq in 1..=30 {
                store.publish_cas(name, &[ca_record(name, seq), ca_record(name, seq + 1)]).unwrap();
            }
        });
        for store in [&a, &b] {
            let mut held: Vec<(String, u32)> =
                store.cas().unwrap().into_iter().map(|r| (r.server_id, r.seq)).collect();
            held.sort();
            assert_eq!(
                held,
                [("a".into(), 30), ("a".into(), 31), ("b".into(), 30), ("b".into(), 31)]
            );
        }
    }

    /// An agent's signing budget is one across servers: what it took
    /// on A is gone on B; time refills it.
    #[test]
    fn a_signing_budget_is_shared_across_servers() {
        let (_place, a, b) = two();
        let (rate, burst) = (100, 1000);
        assert_eq!(a.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(true));
        assert_eq!(b.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(false));
        assert_eq!(b.take_shared_budget("agent", 400, rate, burst, 0).unwrap(), Some(true));
        assert_eq!(a.take_shared_budget("agent", 1, rate, burst, 0).unwrap(), Some(false));
        assert_eq!(a.take_shared_budget("other", 1000, rate, burst, 0).unwrap(), Some(true));
        // One second later: 100 more, no more.
        assert_eq!(a.take_shared_budget("agent", 100, rate, burst, 1000).unwrap(), Some(true));
        assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 1000).unwrap(), Some(false));
        // A server whose clock is behind does not refill it.
        assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 500).unwrap(), Some(false));
    }

    /// Eight callers on two servers at once never take more than the
    /// bucket holds.
    #[test]
    fn concurrent_takes_on_two_servers_never_exceed_the_budget() {
        let (_place, a, b) = two();
        let (a, b) = (Arc::new(a), Arc::new(b));
        let taken: usize = at_once(&a, &b, 8, |store, _| {
            (0..40)
                .filter(|_| {
                    store.take_shared_budget("agent", 10, 0, 1000, 0).unwrap() == Some(true)
                })
                .count()
        })
        .into_iter()
        .sum();
        assert_eq!(taken * 10, 1000, "exactly the burst, no more, no less");
    }

    /// A ban on one server is enforced by the other, and a renewal
    /// racing it on the other server cannot undo it.
    #[test]
    fn a_ban_on_one_server_holds_on_the_other() {
        let (_place, a, b) = two();
        let id = "spiffe://example.org/agent";
        a.register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        b.ban_agent(id, "test", 1, &Audit::quiet()).unwrap().unwrap();
        assert_eq!(a.check_agent(id, "s0").unwrap(), Err(AgentRefusal::Banned(id.into())));
        let refused =
            a.renew_agent(id, "s0", &agent_svid("agent", "s1"), 2, &Audit::quiet()).unwrap();
        assert_eq!(refused.err(), Some(AgentRefusal::Banned(id.into())));
    }
}
