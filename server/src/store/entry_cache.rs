//! sled: the cache of entries decoded for signing
//! ([`KvStore::entries_for_signing`](super::KvStore)), which never serves
//! an entry older than the revision it is read with.

use std::collections::HashMap;
use std::sync::Arc;

use crate::entry::Entry;

/// Entries kept at most by [`EntryCache`].
const ENTRY_CACHE_MAX: usize = 20_000;

/// sled: entries decoded for signing, each read from the database while
/// the published revision was `at` (so none is older than that
/// revision). A read at another published revision empties it first, and
/// one at an older revision (a reader that read it before a newer one was
/// published) passes it by. So an entry from it is as current as one read
/// from the database then: every entry write logs a change (a new
/// revision, published once the commit is visible), and a signing commit
/// that finds the store moved past the read checks each entry again
/// (`issuance.rs`). Bounded: past [`ENTRY_CACHE_MAX`] entries, entries are
/// read from the database and not kept.
#[derive(Debug, Default)]
pub(super) struct EntryCache {
    at: u64,
    entries: HashMap<String, Arc<Entry>>,
}

impl EntryCache {
    /// What it holds of `ids` (in order; `None` where absent) for a read at
    /// published revision `revision`.
    pub(super) fn lookup(&mut self, revision: u64, ids: &[String]) -> Vec<Option<Arc<Entry>>> {
        if revision > self.at {
            self.entries.clear();
            self.at = revision;
        }
        if revision != self.at {
            return vec![None; ids.len()];
        }
        ids.iter().map(|id| self.entries.get(id).cloned()).collect()
    }

    /// Keeps `read` (entries read from the database after `revision` was
    /// published), unless the cache has moved to another revision.
    pub(super) fn keep(&mut self, revision: u64, read: &[Option<Arc<Entry>>]) {
        if revision != self.at {
            return;
        }
        for entry in read.iter().flatten() {
            if self.entries.len() >= ENTRY_CACHE_MAX {
                return;
            }
            self.entries.insert(entry.id.clone(), entry.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::entry;

    /// Entries read before a newer revision was published are neither
    /// kept nor served at it; a reader at an older revision passes the
    /// cache by; the cache is bounded.
    #[test]
    fn the_entry_cache_serves_only_reads_made_at_its_revision() {
        let ids = vec!["a".to_string()];
        let old = Some(Arc::new(entry("a", "w1", "agent", 1)));
        let mut cache = EntryCache::default();
        assert_eq!(cache.lookup(1, &ids), [None]);
        cache.keep(1, std::slice::from_ref(&old));
        assert_eq!(cache.lookup(1, &ids), std::slice::from_ref(&old));
        // Revision 2 published: what was kept at 1 is gone, and a read
        // that began at 1 and ends now is not kept.
        assert_eq!(cache.lookup(2, &ids), [None]);
        cache.keep(1, std::slice::from_ref(&old));
        assert_eq!(cache.lookup(2, &ids), [None]);
        // A reader still at 1 gets nothing from it and changes nothing.
        let new = Some(Arc::new(entry("a", "w2", "agent", 1)));
        cache.keep(2, std::slice::from_ref(&new));
        assert_eq!(cache.lookup(1, &ids), [None]);
        assert_eq!(cache.lookup(2, &ids), [new]);
        // Bounded.
        let many: Vec<_> = (0..ENTRY_CACHE_MAX + 10)
            .map(|i| Some(Arc::new(entry(&format!("e{i}"), "w", "agent", 1))))
            .collect();
        cache.keep(2, &many);
        assert_eq!(cache.entries.len(), ENTRY_CACHE_MAX);
    }
}
