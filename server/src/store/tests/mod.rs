//! The store's unit tests: a conformance suite every test of which runs
//! on sled and on PostgreSQL, tests of sled alone, and of several servers
//! sharing one PostgreSQL database.
//!
//! Here: the fixtures, `Place` (where a conformance test's store lives)
//! and the suite's list, and the sled-only tests. The conformance tests
//! live by concept in `entries.rs`, `revocations.rs`, `records.rs` and
//! `broker.rs` (the token broker's records, with its own test of two
//! servers); several servers in `shared_postgres.rs`.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::entry::EntryRules;
use crate::policy::approval;
use tessera_workload_api::TrustDomain;

mod broker;
mod entries;
mod records;
mod revocations;
mod shared_postgres;

use broker::*;
use entries::*;
use records::*;
use revocations::*;

pub(super) fn entry(id: &str, spiffe: &str, parent: &str, uid: u32) -> Entry {
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

pub(super) fn issued(serial: &str, entry: &Entry) -> pb::IssuedSvid {
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

pub(super) fn agent(id: &str, serial: &str) -> pb::Agent {
    pb::Agent {
        spiffe_id: format!("spiffe://example.org/{id}"),
        x509_svid_serial: serial.into(),
        x509_svid_expires_at: i64::MAX,
        ..Default::default()
    }
}

pub(super) fn agent_svid(id: &str, serial: &str) -> pb::IssuedSvid {
    pb::IssuedSvid {
        serial: serial.into(),
        agent_id: format!("spiffe://example.org/{id}"),
        expires_at: i64::MAX,
        ..Default::default()
    }
}

/// Creates `entries` and registers their agent `agent` with SVID `serial`.
pub(super) fn entries_under_agent(
    store: &KvStore,
    entries: &[Entry],
    agent_name: &str,
    serial: &str,
) {
    store.create_entries(entries, &Audit::quiet()).unwrap();
    store
        .register_agent(
            &agent(agent_name, serial),
            &agent_svid(agent_name, serial),
            &Audit::quiet(),
        )
        .unwrap()
        .unwrap();
}

/// A store with entry `a` under agent `agent` (SVID `s0`) and one SVID,
/// What became of each of `signed`, recorded by `store.record_issued`.
fn recorded(
    store: &KvStore,
    agent_id: &str,
    agent_serial: &str,
    read_at: u64,
    signed: &[Signed],
    now: i64,
) -> Vec<Result<(), ItemRefused>> {
    let recorded = store.record_issued(agent_id, agent_serial, read_at, signed.to_vec(), now);
    recorded.unwrap().into_iter().map(|(_, result)| result).collect()
}

/// `01`, recorded for the entry.
fn store_with_one_svid(place: &Place) -> (KvStore, Entry) {
    let store = place.open();
    let e = entry("a", "w", "agent", 1);
    entries_under_agent(&store, std::slice::from_ref(&e), "agent", "s0");
    let signed =
        [Signed { svid: issued("01", &e), entry: e.clone().into(), event: Default::default() }];
    assert_eq!(recorded(&store, &e.parent_id.to_string(), "s0", 0, &signed, 5), [Ok(())]);
    (store, e)
}

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
    entries_read_for_signing_are_current_at_their_revision,
    entries_list_in_pages_with_and_without_filters,
    duplicates_are_refused_per_item_and_store_unchanged,
    an_update_is_one_change_naming_old_and_new_parent,
    the_change_log_is_trimmed_to_its_newest_changes,
    a_commits_changes_are_one_row_read_from_anywhere_in_it,
    a_delete_and_its_revocations_are_one_commit,
    svids_recorded_after_their_entry_changed_are_revoked,
    a_revision_pushed_ahead_never_skips_the_entry_check,
    jwt_svids_are_revoked_with_their_entry_and_agent,
    a_dns_name_change_revokes_and_a_ttl_change_does_not,
    a_label_change_alone_revokes_nothing,
    a_renewal_never_undoes_a_ban,
    a_ban_racing_a_renewal_is_never_undone,
    what_was_issued_before_a_restart_is_revoked_after_it,
    agents_are_checked_many_at_once_as_one_at_a_time,
    backup_restores_every_record_and_a_damaged_backup_is_refused,
    join_token_can_be_taken_once,
    join_tokens_are_hashed_and_never_name_an_agent_or_entry,
    an_approval_writes_exactly_the_proposal_it_names,
    an_update_decided_against_a_revision_replaces_only_that_revision,
    join_token_exists_reads_without_writing,
    a_ca_record_set_per_server_makes_one_bundle,
    a_task_ends_once_with_its_sub_tasks_and_its_tokens_go_inactive,
    tokens_recorded_together_are_each_checked_on_their_own,
    an_access_token_is_recorded_only_under_a_live_task_of_its_workload,
    a_decision_binds_the_content_and_never_the_workloads_own_uid,
    lapsed_requests_are_dropped_and_returned_for_their_events,
    old_tokens_and_tasks_are_pruned_and_keys_are_every_servers,
    broker_records_are_checked_and_survive_a_backup,
);

/// A store written by a version that kept a row per record (under its
/// serial) and the owner index as rows: the index rows are removed at
/// open; the old records are still found, revoked with their entry and
/// pruned at expiry, beside records written since.
#[test]
fn a_store_of_an_older_version_is_read_and_its_index_rows_removed_at_open() {
    let place = Place::sled();
    let e = {
        let (store, e) = store_with_one_svid(&place);
        assert_eq!(store.kv.len(layout::t(layout::ISSUED_BY_OWNER)).unwrap(), 0);
        assert_eq!(store.index().len(), 2, "the agent's SVID and the entry's");
        let (issued_tree, index_tree) =
            (layout::t(layout::ISSUED), layout::t(layout::ISSUED_BY_OWNER));
        let mut ops = Vec::new();
        for (serial, expires_at) in [("02", 10), ("03", i64::MAX)] {
            let record = pb::IssuedSvid { expires_at, ..issued(serial, &e) };
            ops.push(kv::Op::Put(
                issued_tree,
                serial.into(),
                prost::Message::encode_to_vec(&record),
            ));
            ops.push(kv::Op::Put(index_tree, format!("a\0{serial}").into_bytes(), vec![]));
        }
        ops.push(kv::Op::Put(index_tree, b"agent:spiffe://example.org/agent\0s0".to_vec(), vec![]));
        store.kv.apply(ops).unwrap();
        store.kv.flush().unwrap();
        e
    };
    let store = place.open();
    assert_eq!(store.kv.len(layout::t(layout::ISSUED_BY_OWNER)).unwrap(), 0);
    assert_eq!(store.index().len(), 4);
    assert_eq!(store.check().unwrap().issued, 4);
    assert_eq!(store.issued("03").unwrap().map(|s| s.entry_id), Some(e.id.clone()));
    assert_eq!(store.prune_expired(10).unwrap(), 1, "02 expired");
    assert!(store.issued("02").unwrap().is_none());
    assert_eq!(store.kv.get(layout::t(layout::ISSUED), b"02").unwrap(), None);
    let write = store.delete_entries(&["a".into()], 11, "deleted", &Audit::quiet()).unwrap();
    let mut revoked: Vec<&str> = write.revoked.iter().map(|r| r.serial.as_str()).collect();
    revoked.sort_unstable();
    assert_eq!(revoked, ["01", "03"]);
}

/// One server on its embedded store keeps signing budgets in memory.
#[test]
fn an_embedded_store_leaves_signing_budgets_to_the_server() {
    let store = Place::sled().open();
    assert_eq!(store.take_shared_budget("agent", 1, 1, 1000, 0).unwrap(), None);
}

/// Item 7: a store behind its watermark (data lost, or an old copy put
/// back) is refused, never served as what is left.
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
