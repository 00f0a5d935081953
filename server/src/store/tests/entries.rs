//! Conformance: entries, their indexes, pages, duplicates and updates.

use super::*;

/// Pages of every size, after every position, with each filter, give
/// exactly the matching entries in ID order.
pub(super) fn entries_list_in_pages_with_and_without_filters(place: Place) {
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
pub(super) fn entries_are_read_at_once_in_the_order_asked(place: Place) {
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

/// Entries read for signing (on sled through the store's cache of them)
/// are never older than the revision they come with: whenever the store
/// is still at that revision, they are exactly what it holds. A writer
/// renames, re-parents, deletes and recreates entries while two readers
/// read them for signing and compare with what the store holds under its
/// lock.
pub(super) fn entries_read_for_signing_are_current_at_their_revision(place: Place) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let store = Arc::new(place.open());
    let ids: Vec<String> = (0..6).map(|i| format!("e{i}")).collect();
    let made: Vec<Entry> =
        ids.iter().enumerate().map(|(i, id)| entry(id, &format!("w{i}"), "agent", 1)).collect();
    store.create_entries(&made, &Audit::quiet()).unwrap();
    let parent = made[0].parent_id.clone();
    let (stop, checked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, ids, parent) = (store.clone(), ids.clone(), parent.clone());
            let (stop, checked) = (stop.clone(), checked.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let read = store.entries_for_signing(&ids).unwrap();
                    let (revision, now) = store.snapshot(&parent).unwrap();
                    if revision != read.revision {
                        continue;
                    }
                    // The snapshot holds every entry under `parent` at
                    // that revision: one read under it is there as read,
                    // one absent or elsewhere is not there.
                    for (id, got) in ids.iter().zip(&read.entries) {
                        let want = now.iter().find(|e| &e.id == id);
                        let got = got.as_deref().filter(|e| e.parent_id == parent);
                        assert_eq!(got, want, "{id} at revision {revision}");
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut rng = 0x5eed_u64;
    for round in 0..400u32 {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let i = (rng >> 33) as usize % ids.len();
        let current = store.entries(std::slice::from_ref(&ids[i])).unwrap().remove(0);
        match (current, (rng >> 40) % 3) {
            (None, _) => {
                let again = entry(&ids[i], &format!("w{i}-{round}"), "agent", 1);
                store.create_entries(&[again], &Audit::quiet()).unwrap();
            }
            (Some(_), 0) => {
                store.delete_entries(&[ids[i].clone()], 1, "gone", &Audit::quiet()).unwrap();
            }
            (Some(mut e), kind) => {
                e.spiffe_id =
                    SpiffeId::parse(&format!("spiffe://example.org/w{i}-{round}")).unwrap();
                if kind == 2 {
                    let other = if e.parent_id == parent { "agent-2" } else { "agent" };
                    e.parent_id =
                        SpiffeId::parse(&format!("spiffe://example.org/{other}")).unwrap();
                }
                store.update_entries(&[e], 1, "changed", &Audit::quiet()).unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    readers.into_iter().for_each(|r| r.join().unwrap());
    assert!(checked.load(Ordering::Relaxed) > 0, "no read was compared");
}

pub(super) fn entries_are_indexed_by_parent_and_survive_reopen(place: Place) {
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

pub(super) fn duplicates_are_refused_per_item_and_store_unchanged(place: Place) {
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
pub(super) fn an_update_is_one_change_naming_old_and_new_parent(place: Place) {
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

/// The change log keeps its newest changes: a reader behind the trimmed
/// start is told so (it needs a snapshot), never given a log with a hole;
/// a reader at the start reads on; the start never moves back; and the
/// store still checks whole, also after a reopen.
pub(super) fn the_change_log_is_trimmed_to_its_newest_changes(place: Place) {
    let store = place.open();
    for i in 0..25 {
        store
            .create_entries(
                &[entry(&format!("e{i}"), &format!("w{i}"), "agent1", 1)],
                &Audit::quiet(),
            )
            .unwrap();
    }
    assert_eq!((store.revision().unwrap(), store.changes_start().unwrap()), (25, 1));
    assert_eq!(store.trim_changes(100, 0).unwrap(), 0, "fewer than kept: nothing");
    assert_eq!(store.trim_changes(10, 15).unwrap(), 0, "not more than keep + slack: nothing");
    assert_eq!(store.trim_changes(10, 0).unwrap(), 15);
    assert_eq!(store.changes_start().unwrap(), 16);
    assert_eq!(store.revision().unwrap(), 25, "trimming is not a change");
    assert!(matches!(
        store.changes_since(3, 100),
        Err(StoreError::ChangesTrimmed { asked: 3, start: 16 })
    ));
    assert!(matches!(store.changes_since(0, 100), Err(StoreError::ChangesTrimmed { .. })));
    let revisions: Vec<u64> =
        store.changes_since(15, 100).unwrap().iter().map(|c| c.revision).collect();
    assert_eq!(revisions, (16..=25).collect::<Vec<_>>());
    assert_eq!(store.trim_changes(20, 0).unwrap(), 0, "keeping more never moves the start back");
    assert_eq!(store.changes_start().unwrap(), 16);
    assert_eq!(store.trim_changes(1, 0).unwrap(), 9);
    assert_eq!(store.changes_since(24, 100).unwrap().len(), 1, "the newest is always kept");
    drop(store);
    let again = place.open();
    assert_eq!((again.revision().unwrap(), again.changes_start().unwrap()), (25, 25));
    again.create_entries(&[entry("late", "wl", "agent1", 1)], &Audit::quiet()).unwrap();
    assert_eq!(again.changes_since(24, 100).unwrap().len(), 2);
    assert_eq!(
        again.snapshot(&"spiffe://example.org/agent1".parse().unwrap()).unwrap().1.len(),
        26
    );
}

/// A commit's changes are one row of the change log, keyed by its last
/// revision: a read from inside a row gets the rest of it, a limit may cut
/// a row, and a trim whose cut falls inside a row keeps that row whole
/// (readers before the new start are still told the log was trimmed).
pub(super) fn a_commits_changes_are_one_row_read_from_anywhere_in_it(place: Place) {
    let store = place.open();
    let batch = |from: usize, n: usize| -> Vec<Entry> {
        (from..from + n).map(|i| entry(&format!("e{i}"), &format!("w{i}"), "agent1", 1)).collect()
    };
    store.create_entries(&batch(0, 5), &Audit::quiet()).unwrap(); // revisions 1..=5
    store.create_entries(&batch(5, 3), &Audit::quiet()).unwrap(); // 6..=8
    store.create_entries(&batch(8, 1), &Audit::quiet()).unwrap(); // 9
    let rows = |store: &KvStore| store.kv.len(layout::t(layout::CHANGES)).unwrap();
    assert_eq!(rows(&store), 3, "a row per commit");
    let revisions = |from: u64, limit: usize| -> Vec<u64> {
        store.changes_since(from, limit).unwrap().iter().map(|c| c.revision).collect()
    };
    assert_eq!(revisions(0, 100), (1..=9).collect::<Vec<_>>());
    assert_eq!(revisions(2, 100), (3..=9).collect::<Vec<_>>(), "from inside a row");
    assert_eq!(revisions(5, 100), (6..=9).collect::<Vec<_>>(), "from a row's end");
    assert_eq!(revisions(2, 2), [3, 4], "a limit inside a row");
    assert_eq!(revisions(4, 3), [5, 6, 7], "a limit across rows");
    for limit in 1..=10 {
        let want: Vec<u64> = (1..=9).take(limit).collect();
        assert_eq!(revisions(0, limit), want, "limit {limit}");
    }
    assert!(revisions(0, 0).is_empty());
    assert!(revisions(9, 100).is_empty());
    // Keeping 3 moves the start to 7, inside the second row: the first row
    // goes, the second stays whole.
    assert_eq!(store.trim_changes(3, 0).unwrap(), 6);
    assert_eq!(store.changes_start().unwrap(), 7);
    assert_eq!(rows(&store), 2);
    assert_eq!(revisions(6, 100), [7, 8, 9]);
    assert!(matches!(
        store.changes_since(2, 100),
        Err(StoreError::ChangesTrimmed { asked: 2, start: 7 })
    ));
    drop(store);
    // The check at open: the log still ends at the revision.
    let again = place.open();
    assert_eq!(again.revision().unwrap(), 9);
    assert_eq!(again.changes_since(6, 100).unwrap().len(), 3);
}
