//! Conformance: CA records, backup and restore, join tokens and approvals.

use super::*;

/// A stand-in CA record of `server`, generation `seq`.
pub(super) fn ca_record(server: &str, seq: u32) -> pb::CaRecord {
    pb::CaRecord {
        server_id: server.into(),
        seq,
        cert_der: vec![seq as u8],
        jwt: None,
        not_after: 99,
    }
}

pub(super) fn a_ca_record_set_per_server_makes_one_bundle(place: Place) {
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

pub(super) fn backup_restores_every_record_and_a_damaged_backup_is_refused(place: Place) {
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

pub(super) fn copy_dir(from: &Path, to: &Path) {
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

pub(super) fn join_token_can_be_taken_once(place: Place) {
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
pub(super) fn join_tokens_are_hashed_and_never_name_an_agent_or_entry(place: Place) {
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
pub(super) fn an_approval_writes_exactly_the_proposal_it_names(place: Place) {
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
pub(super) fn an_update_decided_against_a_revision_replaces_only_that_revision(place: Place) {
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

pub(super) fn join_token_exists_reads_without_writing(place: Place) {
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
