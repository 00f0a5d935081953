//! Registration entries: created, updated (revoking what a new version no
//! longer authorizes) and deleted (revoking their SVIDs) in one commit
//! each, and read by ID, by parent, in pages or by expiry.

use std::sync::Arc;

use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;

use super::audit::Audit;
use super::commit::{Tx, TxResult};
use super::error::StoreError;
use super::kv::{prefix_end, scan_prefix};
use super::kv_store::KvStore;
use super::layout::{
    decode_entry, parent_key, read_u64, t, AGENTS, BY_EXPIRY, BY_IDENTITY, BY_PARENT, ENTRIES,
    META, REVISION_KEY,
};
use super::revocations::revocation_of;
use super::{ChangeKind, EntriesRead, EntryFilter, EntryWrite};
use crate::entry::{Entry, EntryError};

/// Sees one key and value of a page; false stops the paging.
type Visit<'f> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'f;

impl Tx<'_> {
    /// Reads ahead, in one go per tree, what [`Tx::create_one`] and
    /// [`Tx::update_one`] look up for each of `entries`: the entry holding
    /// each identity, and the agents the SPIFFE IDs might name.
    fn read_ahead_for(&self, entries: &[Entry]) -> TxResult<()> {
        self.prefetch(BY_IDENTITY, entries.iter().map(Entry::identity_key))?;
        self.prefetch(AGENTS, entries.iter().map(|e| e.spiffe_id.as_str().as_bytes().to_vec()))
    }

    pub(super) fn duplicate_of(&self, entry: &Entry) -> TxResult<Option<String>> {
        Ok(self
            .get(BY_IDENTITY, entry.identity_key())?
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .filter(|id| *id != entry.id))
    }

    /// Creates `entry` (refused as a duplicate, or when its SPIFFE ID is an
    /// agent's).
    pub(super) fn create_one(&self, entry: &Entry) -> TxResult<Result<Entry, EntryError>> {
        if let Some(existing) = self.duplicate_of(entry)? {
            return Ok(Err(EntryError::Duplicate(existing)));
        }
        if self.agent(entry.spiffe_id.as_str())?.is_some() {
            return Ok(Err(EntryError::AgentIdentity(entry.spiffe_id.to_string())));
        }
        let mut entry = entry.clone();
        entry.revision = self.log(ChangeKind::Entry {
            entry_id: entry.id.clone(),
            parents: vec![entry.parent_id.to_string()],
        });
        self.put_entry(&entry);
        Ok(Ok(entry))
    }

    /// Replaces the stored entry with `entry`, adds its result and the
    /// version it replaced to `write`, and what it no longer authorizes to
    /// `revoke`; returns the result too.
    pub(super) fn update_one(
        &self,
        entry: &Entry,
        now: i64,
        reason: &str,
        write: &mut EntryWrite,
        revoke: &mut Vec<pb::Revocation>,
    ) -> TxResult<Result<Entry, EntryError>> {
        let refuse = |write: &mut EntryWrite, e: EntryError| {
            write.results.push(Err(e.clone()));
            write.previous.push(None);
            Ok(Err(e))
        };
        let Some(old) = self.entry(&entry.id)? else {
            return refuse(write, EntryError::NotFound(entry.id.clone()));
        };
        // An update decided against a revision (`entry.revision`; 0: none)
        // replaces only that revision.
        if entry.revision != 0 && entry.revision != old.revision {
            return refuse(write, EntryError::Changed(entry.id.clone()));
        }
        if let Some(existing) = self.duplicate_of(entry)? {
            return refuse(write, EntryError::Duplicate(existing));
        }
        if entry.spiffe_id != old.spiffe_id && self.agent(entry.spiffe_id.as_str())?.is_some() {
            return refuse(write, EntryError::AgentIdentity(entry.spiffe_id.to_string()));
        }
        // Read in the commit: nothing can be issued for the entry between
        // this read and the revocation.
        let issued = self.issued_by_owner(&entry.id)?;
        self.remove_entry(&old)?;
        let mut entry = entry.clone();
        entry.created_at = old.created_at;
        let mut parents = vec![old.parent_id.to_string()];
        if entry.parent_id != old.parent_id {
            parents.push(entry.parent_id.to_string());
        }
        entry.revision = self.log(ChangeKind::Entry { entry_id: entry.id.clone(), parents });
        self.put_entry(&entry);
        revoke.extend(
            issued
                .iter()
                .filter(|svid| !entry.authorizes_svid_of(&old, svid.expires_at))
                .map(|svid| revocation_of(svid, reason, now)),
        );
        write.results.push(Ok(entry.clone()));
        write.previous.push(Some(old));
        Ok(Ok(entry))
    }
}

impl KvStore {
    pub(super) fn create_entries(
        &self,
        entries: &[Entry],
        audit: &Audit<'_, Vec<Result<Entry, EntryError>>>,
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        self.commit(audit, |tx| {
            tx.read_ahead_for(entries)?;
            entries.iter().map(|entry| tx.create_one(entry)).collect()
        })
    }

    pub(super) fn update_entries(
        &self,
        entries: &[Entry],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        self.commit(audit, |tx| {
            tx.prefetch(ENTRIES, entries.iter().map(|e| e.id.as_bytes().to_vec()))?;
            tx.read_ahead_for(entries)?;
            let mut write = EntryWrite::default();
            let mut revoke = Vec::new();
            for entry in entries {
                // The item's result is in `write`.
                let _ = tx.update_one(entry, now, reason, &mut write, &mut revoke)?;
            }
            write.revoked = tx.revoke(&revoke)?;
            Ok(write)
        })
    }

    pub(super) fn delete_entries(
        &self,
        ids: &[String],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        self.commit(audit, |tx| {
            let mut write = EntryWrite::default();
            let mut revoke = Vec::new();
            tx.prefetch(ENTRIES, ids.iter().map(|id| id.as_bytes().to_vec()))?;
            for id in ids {
                let Some(mut old) = tx.entry(id)? else {
                    write.results.push(Err(EntryError::NotFound(id.clone())));
                    write.previous.push(None);
                    continue;
                };
                let issued = tx.issued_by_owner(id)?;
                tx.remove_entry(&old)?;
                let previous = old.clone();
                old.revision = tx.log(ChangeKind::Entry {
                    entry_id: id.clone(),
                    parents: vec![old.parent_id.to_string()],
                });
                revoke.extend(issued.iter().map(|svid| revocation_of(svid, reason, now)));
                write.results.push(Ok(old));
                write.previous.push(Some(previous));
            }
            write.revoked = tx.revoke(&revoke)?;
            Ok(write)
        })
    }

    pub(super) fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.kv
            .get(t(ENTRIES), id.as_bytes())?
            .map(|bytes| decode_entry(id.as_bytes(), &bytes))
            .transpose()
    }

    pub(super) fn entries(&self, ids: &[String]) -> Result<Vec<Option<Entry>>, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        let values = self.kv.get_many(t(ENTRIES), &keys)?;
        keys.iter()
            .zip(values)
            .map(|(key, value)| value.map(|bytes| decode_entry(key, &bytes)).transpose())
            .collect()
    }

    /// The revision is read before the entries: a commit that finds the
    /// store still at it knows that no entry changed since the read (every
    /// entry write logs a change), and one that finds it moved re-reads
    /// them. On sled it is the last one published (`self.revision`, sent
    /// once its commit is visible). On a shared database it is read from
    /// the database: the published one also takes other servers'
    /// notifications, which anyone who can connect can send, and which a
    /// database restored to an earlier point leaves ahead of it, so it
    /// could be ahead of what the read sees.
    ///
    /// On sled the entries come from a cache of entries decoded for
    /// signing (`entry_cache::EntryCache`), read in through it when absent.
    pub(super) fn entries_for_signing(&self, ids: &[String]) -> Result<EntriesRead, StoreError> {
        if self.kv.shared() {
            let revision = self.revision()?;
            let entries = self.entries(ids)?.into_iter().map(|e| e.map(Arc::new)).collect();
            return Ok(EntriesRead { revision, entries });
        }
        let revision = *self.revision.borrow();
        let cache = || self.entry_cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = cache().lookup(revision, ids);
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| entries[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(EntriesRead { revision, entries });
        }
        let wanted: Vec<String> = missing.iter().map(|&i| ids[i].clone()).collect();
        let read: Vec<Option<Arc<Entry>>> =
            self.entries(&wanted)?.into_iter().map(|e| e.map(Arc::new)).collect();
        cache().keep(revision, &read);
        for (i, entry) in missing.into_iter().zip(read) {
            entries[i] = entry;
        }
        Ok(EntriesRead { revision, entries })
    }

    pub(super) fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        let prefix = parent_key(parent, "");
        let mut out = Vec::new();
        for (key, _) in scan_prefix(&*self.kv, t(BY_PARENT), &prefix)? {
            let id = &key[prefix.len()..];
            if let Some(bytes) = self.kv.get(t(ENTRIES), id)? {
                out.push(decode_entry(id, &bytes)?);
            }
        }
        Ok(out)
    }

    pub(super) fn snapshot(&self, parent: &SpiffeId) -> Result<(u64, Vec<Entry>), StoreError> {
        self.commit_read(|tx| {
            let revision = read_u64(tx.get(META, REVISION_KEY)?.as_deref());
            let prefix = parent_key(parent, "");
            let mut entries = Vec::new();
            for (key, _) in tx.txn.scan_prefix(t(BY_PARENT), &prefix)? {
                if let Some(entry) = tx.entry(&String::from_utf8_lossy(&key[prefix.len()..]))? {
                    entries.push(entry);
                }
            }
            Ok((revision, entries))
        })
    }

    pub(super) fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let keep = |e: &Entry| filter.spiffe_id.as_ref().is_none_or(|id| &e.spiffe_id == id);
        if let Some(parent) = &filter.parent_id {
            let prefix = parent_key(parent, "");
            let end = prefix_end(&prefix);
            let start = parent_key(parent, after.unwrap_or(""));
            self.page_through(BY_PARENT, start, end, after.is_some(), limit, &mut |key, _| {
                let id = &key[prefix.len()..];
                if let Some(bytes) = self.kv.get(t(ENTRIES), id)? {
                    let entry = decode_entry(id, &bytes)?;
                    if keep(&entry) {
                        out.push(entry);
                    }
                }
                Ok(out.len() < limit)
            })?;
        } else {
            let start = after.unwrap_or("").as_bytes().to_vec();
            self.page_through(ENTRIES, start, None, after.is_some(), limit, &mut |key, bytes| {
                let entry = decode_entry(key, bytes)?;
                if keep(&entry) {
                    out.push(entry);
                }
                Ok(out.len() < limit)
            })?;
        }
        Ok(out)
    }

    pub(super) fn entry_count(&self) -> usize {
        self.kv.len(t(ENTRIES)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "counting entries failed");
            0
        })
    }

    pub(super) fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let end = (now.max(0) + 1).to_be_bytes();
        Ok(self
            .kv
            .range(t(BY_EXPIRY), b"", Some(&end), usize::MAX, false)?
            .into_iter()
            .map(|(key, _)| String::from_utf8_lossy(&key[8..]).into_owned())
            .collect())
    }

    /// Calls `visit` with each pair of `tree` from `start` (after it, if
    /// `skip_start`) to `end`, read in pages of up to 1,000 (at most
    /// `limit`), until `visit` answers false: a filter that skips many pairs
    /// costs no more than reading them.
    fn page_through(
        &self,
        tree: usize,
        mut start: Vec<u8>,
        end: Option<Vec<u8>>,
        mut skip_start: bool,
        limit: usize,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let page = limit.clamp(1, 1000);
        loop {
            let pairs = self.kv.range(t(tree), &start, end.as_deref(), page + 1, false)?;
            let Some((last, _)) = pairs.last() else { return Ok(()) };
            let next = last.clone();
            for (key, value) in &pairs {
                if std::mem::take(&mut skip_start) && *key == start {
                    continue;
                }
                if !visit(key, value)? {
                    return Ok(());
                }
            }
            if pairs.len() <= page {
                return Ok(());
            }
            start = next;
            skip_start = true;
        }
    }
}
