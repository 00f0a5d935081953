//! Conformance: what a delete, a change, a ban or a renewal revokes, and
//! the races between them.

use super::*;

/// Item 4: a delete and the revocation of its SVIDs are one commit;
/// what is reopened after it has both or neither.
pub(super) fn a_delete_and_its_revocations_are_one_commit(place: Place) {
    {
        let (store, _) = store_with_one_svid(&place);
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
/// recorded and revoked in the same commit, never handed out valid: the
/// commit re-reads the entries because the store moved past the revision
/// they were read at.
pub(super) fn svids_recorded_after_their_entry_changed_are_revoked(place: Place) {
    let store = place.open();
    let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 1));
    store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
    store
        .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    let read = store.entries_for_signing(&["a".into(), "b".into()]).unwrap();
    let [Some(a), Some(b)] = <[Option<Arc<Entry>>; 2]>::try_from(read.entries).unwrap() else {
        panic!("entries a and b were not read");
    };
    store.delete_entries(&["a".into()], 1, "deleted", &Audit::quiet()).unwrap();
    let mut renamed = Entry::clone(&b);
    renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/other").unwrap();
    store.update_entries(&[renamed], 1, "renamed", &Audit::quiet()).unwrap();
    let signed = [
        Signed { svid: issued("0a", &a), entry: a.clone(), event: Default::default() },
        Signed { svid: issued("0b", &b), entry: b.clone(), event: Default::default() },
    ];
    let results = recorded(&store, "spiffe://example.org/agent", "s0", read.revision, &signed, 2);
    assert!(results.iter().all(Result::is_err), "{results:?}");
    assert!(store.revocation("0a").unwrap().is_some() && store.revocation("0b").unwrap().is_some());

    // Signed with an agent SVID a renewal replaced meanwhile: refused
    // with the typed code the agent acts on (sign again at once).
    let d = entry("d", "w4", "agent", 1);
    store.create_entries(std::slice::from_ref(&d), &Audit::quiet()).unwrap();
    let read = store.entries_for_signing(&["d".into()]).unwrap();
    let signed = [Signed { svid: issued("0d", &d), entry: d.into(), event: Default::default() }];
    let results =
        recorded(&store, "spiffe://example.org/agent", "s-old", read.revision, &signed, 3);
    assert_eq!(
        results[0].as_ref().err().map(|r| r.refusal),
        Some(Refusal::AgentSvidChanged),
        "{results:?}"
    );

    let c = entry("c", "w3", "agent", 1);
    store.create_entries(std::slice::from_ref(&c), &Audit::quiet()).unwrap();
    let read = store.entries_for_signing(&["c".into()]).unwrap();
    store.ban_agent("spiffe://example.org/agent", "test", 3, &Audit::quiet()).unwrap().unwrap();
    let signed =
        [Signed { svid: issued("0c", &c), entry: c.clone().into(), event: Default::default() }];
    let results = recorded(&store, "spiffe://example.org/agent", "s0", read.revision, &signed, 4);
    assert_eq!(results[0].as_ref().err().map(|r| r.refusal), Some(Refusal::Banned));
    assert!(store.revocation("0c").unwrap().is_some());

    // Read at the revision the store is still at: recorded as signed.
    let e = entry("e", "w5", "agent2", 1);
    entries_under_agent(&store, std::slice::from_ref(&e), "agent2", "t0");
    let read = store.entries_for_signing(&["e".into()]).unwrap();
    let signed = [Signed { svid: issued("0e", &e), entry: e.into(), event: Default::default() }];
    let results = recorded(&store, "spiffe://example.org/agent2", "t0", read.revision, &signed, 5);
    assert_eq!(results, [Ok(())]);
    assert!(store.revocation("0e").unwrap().is_none() && store.issued("0e").unwrap().is_some());
}

/// On a shared database the revision entries are read at is the
/// database's, never the published one (which other servers' notifications
/// move, and anyone who can connect can send): with it pushed ahead, an
/// SVID signed from an entry deleted before it is recorded is still
/// revoked.
pub(super) fn a_revision_pushed_ahead_never_skips_the_entry_check(place: Place) {
    let store = place.open();
    entries_under_agent(&store, &[entry("a", "w1", "agent", 1)], "agent", "s0");
    if store.kv.shared() {
        // A forged notification: one past the database.
        store.revision.send_replace(store.revision().unwrap() + 1);
    }
    let read = store.entries_for_signing(&["a".into()]).unwrap();
    assert_eq!(read.revision, store.revision().unwrap());
    let a = read.entries[0].clone().unwrap();
    store.delete_entries(&["a".into()], 1, "deleted", &Audit::quiet()).unwrap();
    let signed = [Signed { svid: issued("0a", &a), entry: a, event: Default::default() }];
    let results = recorded(&store, "spiffe://example.org/agent", "s0", read.revision, &signed, 2);
    assert!(results[0].is_err(), "{results:?}");
    assert!(store.revocation("0a").unwrap().is_some());
}

/// JWT-SVIDs are recorded under `jwt:<jti>` and revoked with their entry
/// (renamed) or agent (banned) like X509-SVIDs; their revocations are
/// logged with their expiry and kept out of the CRL signing set, and
/// survive a reopen.
pub(super) fn jwt_svids_are_revoked_with_their_entry_and_agent(place: Place) {
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
            Signed { svid: jwt("j1", &a), entry: a.clone().into(), event: Default::default() },
            Signed { svid: jwt("j2", &b), entry: b.clone().into(), event: Default::default() },
            Signed { svid: issued("0b", &b), entry: b.clone().into(), event: Default::default() },
        ];
        let results = recorded(&store, "spiffe://example.org/agent", "s0", 0, &signed, 1);
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
pub(super) fn a_dns_name_change_revokes_and_a_ttl_change_does_not(place: Place) {
    let (store, e) = store_with_one_svid(&place);
    let mut longer = e.clone();
    longer.x509_svid_ttl = 600;
    assert!(store
        .update_entries(&[longer.clone()], 6, "ttl", &Audit::quiet())
        .unwrap()
        .revoked
        .is_empty());
    let mut named = longer;
    named.dns_names = vec!["web.internal".into()];
    let revoked = store.update_entries(&[named], 6, "dns", &Audit::quiet()).unwrap().revoked;
    assert_eq!(revoked.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(), ["01"]);
}

/// Labels are policy metadata, in no SVID: an update that changes only
/// them is a new revision and revokes nothing, and they survive a reopen.
pub(super) fn a_label_change_alone_revokes_nothing(place: Place) {
    let (store, e) = store_with_one_svid(&place);
    let before = store.entry("a").unwrap().unwrap().revision;
    let mut labelled = e.clone();
    labelled.labels.insert("team".into(), "finance".into());
    let write = store.update_entries(&[labelled], 6, "labels", &Audit::quiet()).unwrap();
    assert!(write.revoked.is_empty(), "{:?}", write.revoked);
    assert!(matches!(write.results.as_slice(), [Ok(_)]), "{:?}", write.results);
    let mut relabelled = store.entry("a").unwrap().unwrap();
    assert!(relabelled.revision > before, "a label change is a change");
    relabelled.labels = [("team".to_string(), "sales".to_string())].into();
    let write = store.update_entries(&[relabelled], 7, "labels", &Audit::quiet()).unwrap();
    assert!(write.revoked.is_empty(), "{:?}", write.revoked);
    drop(store);
    let store = place.open();
    let stored = store.entry("a").unwrap().unwrap();
    assert_eq!(stored.labels.get("team").map(String::as_str), Some("sales"));
    assert!(store.revocation("01").unwrap().is_none());
}

/// Item 4: a renewal cannot undo a ban, and is refused once banned.
pub(super) fn a_renewal_never_undoes_a_ban(place: Place) {
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
pub(super) fn a_ban_racing_a_renewal_is_never_undone(place: Place) {
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

/// The Sync re-check reads many callers at once: each gets what
/// `check_agent` alone says of it, in order, a caller asked twice included.
pub(super) fn agents_are_checked_many_at_once_as_one_at_a_time(place: Place) {
    let store = place.open();
    let id = |name: &str| format!("spiffe://example.org/{name}");
    for name in ["a", "b", "c"] {
        let registered =
            store.register_agent(&agent(name, "s0"), &agent_svid(name, "s0"), &Audit::quiet());
        registered.unwrap().unwrap();
    }
    let svid = agent_svid("b", "s1");
    store.renew_agent(&id("b"), "s0", &svid, 2, &Audit::quiet()).unwrap().unwrap();
    store.ban_agent(&id("c"), "test", 3, &Audit::quiet()).unwrap().unwrap();
    let asked = [("a", "s0"), ("b", "s0"), ("b", "s1"), ("c", "s0"), ("nobody", "s0"), ("a", "s0")];
    let callers: Vec<(String, String)> =
        asked.iter().map(|(name, serial)| (id(name), serial.to_string())).collect();
    let many = store.check_agents(&callers).unwrap();
    assert_eq!(many.len(), callers.len());
    for ((agent_id, serial), checked) in callers.iter().zip(many) {
        let alone = store.check_agent(agent_id, serial).unwrap();
        assert_eq!(checked.unwrap(), alone, "{agent_id} {serial}");
    }
    let replaced = store.check_agents(&callers[1..2]).unwrap().pop().unwrap().unwrap();
    assert!(replaced.is_err(), "the SVID a renewal replaced still passes: {replaced:?}");
    let banned = store.check_agents(&callers[3..4]).unwrap().pop().unwrap().unwrap();
    assert_eq!(banned, Err(AgentRefusal::Banned(id("c"))));
    assert!(store.check_agents(&callers[2..3]).unwrap().pop().unwrap().unwrap().is_ok());
}

/// What was issued before a restart is found after it: an entry's delete
/// revokes the SVIDs recorded for it (X.509 and JWT) and no other, a ban
/// revokes the agent's own SVID and its entries', and a record pruned at
/// its expiry is no longer found. On sled the index of records by owner
/// is rebuilt from the records at open (`issued_index.rs`); on PostgreSQL it is
/// rows.
pub(super) fn what_was_issued_before_a_restart_is_revoked_after_it(place: Place) {
    let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 2));
    let jwt = |jti: &str, entry: &Entry| pb::IssuedSvid {
        serial: String::new(),
        jti: jti.into(),
        ..issued("", entry)
    };
    {
        let store = place.open();
        store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        let short = pb::IssuedSvid { expires_at: 10, ..issued("0e", &b) };
        let signed = [
            Signed { svid: issued("0a", &a), entry: a.clone().into(), event: Default::default() },
            Signed { svid: jwt("ja", &a), entry: a.clone().into(), event: Default::default() },
            Signed { svid: issued("0b", &b), entry: b.clone().into(), event: Default::default() },
            Signed { svid: short, entry: b.clone().into(), event: Default::default() },
        ];
        let results = recorded(&store, "spiffe://example.org/agent", "s0", 0, &signed, 1);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    let store = place.open();
    let write = store.delete_entries(&["a".into()], 2, "deleted", &Audit::quiet()).unwrap();
    let mut revoked: Vec<String> =
        write.revoked.iter().map(|r| format!("{}{}", r.serial, r.jti)).collect();
    revoked.sort_unstable();
    assert_eq!(revoked, ["0a", "ja"]);
    assert_eq!(store.prune_expired(10).unwrap(), 1, "0e expired");
    assert!(store.issued("0e").unwrap().is_none());
    drop(store);
    let store = place.open();
    let revoked = store
        .ban_agent("spiffe://example.org/agent", "test", 11, &Audit::quiet())
        .unwrap()
        .unwrap();
    let mut serials: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
    serials.sort_unstable();
    assert_eq!(serials, ["0b", "s0"], "its own SVID and its entries', not the pruned one");
}
