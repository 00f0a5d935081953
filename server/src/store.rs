//! Durable storage: the `Store` trait the server needs, and its sled
//! implementation. Every write method returns only after the data is on disk.

use std::fmt;
use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;

use crate::entry::{Entry, EntryError};

/// The store's page cache.
pub const STORE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest number of items in one batch write.
pub const MAX_BATCH: usize = 1000;

/// Storage failures (not per-item refusals, which are [`EntryError`]s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption).
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("store: corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        reason: String,
    },
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

/// One entry change, as kept in the change log for agents resuming a sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryChange {
    /// Revision of the change.
    pub revision: u64,
    /// The entry.
    pub entry_id: String,
    /// The entry's parent ID (before the change for an update that moved it).
    pub parent_id: String,
    /// True if the entry was deleted (or moved away from `parent_id`).
    pub removed: bool,
}

/// Filters for listing entries.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
}

/// What the server needs from storage.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Stores new entries (IDs already assigned); per-item results. Items
    /// that duplicate an existing entry (or an earlier item) are refused.
    fn create_entries(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError>;
    /// Replaces entries by ID; per-item results.
    fn update_entries(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError>;
    /// Deletes entries by ID; per-item results carry the deleted entry.
    fn delete_entries(&self, ids: &[String]) -> Result<Vec<Result<Entry, EntryError>>, StoreError>;
    /// One entry.
    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;
    /// Every entry whose parent ID is `parent` (an index lookup, no scan).
    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError>;
    /// A page of entries ordered by ID, starting after `after`.
    fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Changes after `revision`, oldest first.
    fn changes_since(&self, revision: u64) -> Result<Vec<EntryChange>, StoreError>;
    /// The latest revision.
    fn revision(&self) -> Result<u64, StoreError>;
    /// Number of entries.
    fn entry_count(&self) -> usize;
    /// Stores a join token.
    fn put_join_token(&self, token: &pb::JoinToken) -> Result<(), StoreError>;
    /// Removes and returns a join token: a token can be taken once.
    fn take_join_token(&self, token: &str) -> Result<Option<pb::JoinToken>, StoreError>;
    /// Creates or replaces an agent.
    fn put_agent(&self, agent: &pb::Agent) -> Result<(), StoreError>;
    /// One agent.
    fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError>;
    /// All agents.
    fn agents(&self) -> Result<Vec<pb::Agent>, StoreError>;
    /// Forgets an agent; returns whether it existed.
    fn delete_agent(&self, spiffe_id: &str) -> Result<bool, StoreError>;

    /// Records signed SVIDs (kept until they expire).
    fn record_issued(&self, issued: &[pb::IssuedSvid]) -> Result<(), StoreError>;
    /// An unexpired SVID by serial.
    fn issued(&self, serial: &str) -> Result<Option<pb::IssuedSvid>, StoreError>;
    /// SVIDs issued for an entry.
    fn issued_for_entry(&self, entry_id: &str) -> Result<Vec<pb::IssuedSvid>, StoreError>;
    /// SVIDs issued to or through an agent (its own and its workloads').
    fn issued_through_agent(&self, agent_id: &str) -> Result<Vec<pb::IssuedSvid>, StoreError>;
    /// Stores revocations.
    fn revoke(&self, revocations: &[pb::Revocation]) -> Result<(), StoreError>;
    /// A revocation by serial.
    fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError>;
    /// Every revocation whose certificate has not expired yet.
    fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError>;
    /// Forgets issued SVIDs and revocations of certificates expired at `now`.
    fn prune_expired(&self, now: i64) -> Result<usize, StoreError>;
    /// IDs of entries whose `expires_at` is at or before `now`.
    fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// The next CRL number (monotonic, durable).
    fn next_crl_number(&self) -> Result<u64, StoreError>;
    /// Number of issued SVIDs on record (unexpired or not yet pruned).
    fn issued_count(&self) -> usize;
}

/// The sled-backed store, in `<data_dir>/store`.
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    by_parent: sled::Tree,
    by_identity: sled::Tree,
    changes: sled::Tree,
    meta: sled::Tree,
    join_tokens: sled::Tree,
    agents: sled::Tree,
    by_expiry: sled::Tree,
    issued: sled::Tree,
    issued_by_entry: sled::Tree,
    revocations: sled::Tree,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore").field("entries", &self.entries.len()).finish_non_exhaustive()
    }
}

const REVISION_KEY: &[u8] = b"revision";

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled's default page cache is 1 GiB; the working set here is far smaller.
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(STORE_CACHE_BYTES)
            .open()?;
        Ok(Self {
            entries: db.open_tree("entries")?,
            by_parent: db.open_tree("entries_by_parent")?,
            by_identity: db.open_tree("entries_by_identity")?,
            changes: db.open_tree("entry_changes")?,
            meta: db.open_tree("meta")?,
            join_tokens: db.open_tree("join_tokens")?,
            agents: db.open_tree("agents")?,
            by_expiry: db.open_tree("entries_by_expiry")?,
            issued: db.open_tree("issued_svids")?,
            issued_by_entry: db.open_tree("issued_by_entry")?,
            revocations: db.open_tree("revocations")?,
            db,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        };
        let p = pb::Entry::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        Entry::from_stored(p).map_err(|e| corrupt(e.to_string()))
    }

    /// Applies `op` to each item in one transaction, bumping the revision
    /// once per successful item, then flushes.
    fn write_entries<T>(
        &self,
        items: &[T],
        op: impl Fn(&EntryTx<'_>, &T, u64) -> TxResult<Result<Entry, EntryError>>,
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        let trees = (
            &self.entries,
            &self.by_parent,
            &self.by_identity,
            &self.changes,
            &self.meta,
            &self.by_expiry,
        );
        let results =
            trees.transaction(|(entries, by_parent, by_identity, changes, meta, by_expiry)| {
                let tx = EntryTx { entries, by_parent, by_identity, changes, by_expiry };
                let mut revision = read_u64(meta.get(REVISION_KEY)?);
                let mut results = Vec::with_capacity(items.len());
                for item in items {
                    let result = op(&tx, item, revision + 1)?;
                    if result.is_ok() {
                        revision += 1;
                    }
                    results.push(result);
                }
                meta.insert(REVISION_KEY, &revision.to_be_bytes())?;
                Ok(results)
            })?;
        self.flush()?;
        Ok(results)
    }
}

/// The trees an entry transaction touches.
struct EntryTx<'a> {
    entries: &'a sled::transaction::TransactionalTree,
    by_parent: &'a sled::transaction::TransactionalTree,
    by_identity: &'a sled::transaction::TransactionalTree,
    changes: &'a sled::transaction::TransactionalTree,
    by_expiry: &'a sled::transaction::TransactionalTree,
}

impl EntryTx<'_> {
    fn get(&self, id: &str) -> TxResult<Option<Entry>> {
        match self.entries.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => SledStore::decode_entry(id.as_bytes(), &bytes)
                .map(Some)
                .map_err(ConflictableTransactionError::Abort),
        }
    }

    fn put(&self, entry: &Entry) -> TxResult<()> {
        self.entries.insert(entry.id.as_bytes(), entry.to_proto().encode_to_vec())?;
        self.by_parent.insert(parent_key(&entry.parent_id, &entry.id), &[])?;
        self.by_identity.insert(entry.identity_key(), entry.id.as_bytes())?;
        if entry.expires_at != 0 {
            self.by_expiry.insert(expiry_key(entry.expires_at, &entry.id), &[])?;
        }
        self.log(entry.revision, &entry.id, &entry.parent_id, false)
    }

    fn remove(&self, entry: &Entry, revision: u64) -> TxResult<()> {
        self.entries.remove(entry.id.as_bytes())?;
        self.by_parent.remove(parent_key(&entry.parent_id, &entry.id))?;
        self.by_identity.remove(entry.identity_key())?;
        if entry.expires_at != 0 {
            self.by_expiry.remove(expiry_key(entry.expires_at, &entry.id))?;
        }
        self.log(revision, &entry.id, &entry.parent_id, true)
    }

    fn duplicate_of(&self, entry: &Entry) -> TxResult<Option<String>> {
        Ok(self
            .by_identity
            .get(entry.identity_key())?
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .filter(|id| *id != entry.id))
    }

    fn log(&self, revision: u64, id: &str, parent: &SpiffeId, removed: bool) -> TxResult<()> {
        let change = EntryChange {
            revision,
            entry_id: id.to_string(),
            parent_id: parent.to_string(),
            removed,
        };
        let bytes = serde_json::to_vec(&change).map_err(|e| {
            ConflictableTransactionError::Abort(StoreError::Corrupt {
                key: id.to_string(),
                reason: e.to_string(),
            })
        })?;
        // Two changes can share a revision (an update that moves an entry
        // logs a removal for the old parent): key by revision then entry ID.
        let mut key = revision.to_be_bytes().to_vec();
        key.extend_from_slice(id.as_bytes());
        key.push(u8::from(removed));
        self.changes.insert(key, bytes)?;
        Ok(())
    }
}

fn parent_key(parent: &SpiffeId, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(parent.as_str().len() + 1 + id.len());
    key.extend_from_slice(parent.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn expiry_key(expires_at: i64, id: &str) -> Vec<u8> {
    let mut key = expires_at.max(0).to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// The index owner of an issued SVID: its entry, or for an agent SVID
/// (no entry) the agent, under a prefix no entry ID can have.
fn owner_of(svid: &pb::IssuedSvid) -> String {
    if svid.entry_id.is_empty() {
        agent_owner(&svid.agent_id)
    } else {
        svid.entry_id.clone()
    }
}

fn agent_owner(agent_id: &str) -> String {
    format!("agent:{agent_id}")
}

fn index_key(owner: &str, serial: &str) -> Vec<u8> {
    let mut key = owner.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(serial.as_bytes());
    key
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl SledStore {
    fn issued_by_index(
        &self,
        index: &sled::Tree,
        owner: &str,
    ) -> Result<Vec<pb::IssuedSvid>, StoreError> {
        let prefix = index_key(owner, "");
        let mut out = Vec::new();
        for item in index.scan_prefix(&prefix) {
            let (key, _) = item?;
            if let Some(bytes) = self.issued.get(&key[prefix.len()..])? {
                out.push(decode(&key, &bytes)?);
            }
        }
        Ok(out)
    }
}

const CRL_NUMBER_KEY: &[u8] = b"crl_number";

fn read_u64(value: Option<sled::IVec>) -> u64 {
    value.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

impl Store for SledStore {
    fn create_entries(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        self.write_entries(entries, |tx, entry, revision| {
            if let Some(existing) = tx.duplicate_of(entry)? {
                return Ok(Err(EntryError::Duplicate(existing)));
            }
            let mut entry = entry.clone();
            entry.revision = revision;
            tx.put(&entry)?;
            Ok(Ok(entry))
        })
    }

    fn update_entries(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        self.write_entries(entries, |tx, entry, revision| {
            let Some(old) = tx.get(&entry.id)? else {
                return Ok(Err(EntryError::NotFound(entry.id.clone())));
            };
            if let Some(existing) = tx.duplicate_of(entry)? {
                return Ok(Err(EntryError::Duplicate(existing)));
            }
            tx.remove(&old, revision)?;
            let mut entry = entry.clone();
            entry.revision = revision;
            entry.created_at = old.created_at;
            tx.put(&entry)?;
            Ok(Ok(entry))
        })
    }

    fn delete_entries(&self, ids: &[String]) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        self.write_entries(ids, |tx, id, revision| {
            let Some(mut old) = tx.get(id)? else {
                return Ok(Err(EntryError::NotFound(id.clone())));
            };
            tx.remove(&old, revision)?;
            old.revision = revision;
            Ok(Ok(old))
        })
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.entries
            .get(id.as_bytes())?
            .map(|bytes| Self::decode_entry(id.as_bytes(), &bytes))
            .transpose()
    }

    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        let prefix = parent_key(parent, "");
        let mut out = Vec::new();
        for item in self.by_parent.scan_prefix(&prefix) {
            let (key, _) = item?;
            let id = &key[prefix.len()..];
            if let Some(bytes) = self.entries.get(id)? {
                out.push(Self::decode_entry(id, &bytes)?);
            }
        }
        Ok(out)
    }

    fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let keep = |e: &Entry| filter.spiffe_id.as_ref().is_none_or(|id| &e.spiffe_id == id);
        if let Some(parent) = &filter.parent_id {
            let prefix = parent_key(parent, "");
            let start = parent_key(parent, after.unwrap_or(""));
            for item in self.by_parent.range(start..) {
                let (key, _) = item?;
                if !key.starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                let id = &key[prefix.len()..];
                if after.is_some_and(|a| a.as_bytes() == id) {
                    continue;
                }
                if let Some(bytes) = self.entries.get(id)? {
                    let entry = Self::decode_entry(id, &bytes)?;
                    if keep(&entry) {
                        out.push(entry);
                    }
                }
            }
            return Ok(out);
        }
        let start = after.unwrap_or("").as_bytes().to_vec();
        for item in self.entries.range(start..) {
            let (key, bytes) = item?;
            if out.len() >= limit {
                break;
            }
            if after.is_some_and(|a| a.as_bytes() == key.as_ref()) {
                continue;
            }
            let entry = Self::decode_entry(&key, &bytes)?;
            if keep(&entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    fn changes_since(&self, revision: u64) -> Result<Vec<EntryChange>, StoreError> {
        let start = (revision + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.changes.range(start.as_slice()..) {
            let (key, bytes) = item?;
            let change: EntryChange = serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Corrupt { key: hex::encode(&key), reason: e.to_string() }
            })?;
            out.push(change);
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.meta.get(REVISION_KEY)?))
    }

    fn entry_count(&self) -> usize {
        self.entries.len()
    }

    fn put_join_token(&self, token: &pb::JoinToken) -> Result<(), StoreError> {
        self.join_tokens.insert(token.token.as_bytes(), token.encode_to_vec())?;
        self.flush()
    }

    fn take_join_token(&self, token: &str) -> Result<Option<pb::JoinToken>, StoreError> {
        let removed = self.join_tokens.remove(token.as_bytes())?;
        self.flush()?;
        removed
            .map(|bytes| {
                pb::JoinToken::decode(bytes.as_ref()).map_err(|e| StoreError::Corrupt {
                    key: "join token".into(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    fn put_agent(&self, agent: &pb::Agent) -> Result<(), StoreError> {
        self.agents.insert(agent.spiffe_id.as_bytes(), agent.encode_to_vec())?;
        self.flush()
    }

    fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError> {
        self.agents
            .get(spiffe_id.as_bytes())?
            .map(|bytes| decode_agent(spiffe_id.as_bytes(), &bytes))
            .transpose()
    }

    fn agents(&self) -> Result<Vec<pb::Agent>, StoreError> {
        self.agents
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                decode_agent(&key, &bytes)
            })
            .collect()
    }

    fn delete_agent(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        let existed = self.agents.remove(spiffe_id.as_bytes())?.is_some();
        self.flush()?;
        Ok(existed)
    }

    fn record_issued(&self, issued: &[pb::IssuedSvid]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut by_owner = sled::Batch::default();
        for svid in issued {
            batch.insert(svid.serial.as_bytes(), svid.encode_to_vec());
            by_owner.insert(index_key(&owner_of(svid), &svid.serial), &[]);
        }
        self.issued.apply_batch(batch)?;
        self.issued_by_entry.apply_batch(by_owner)?;
        self.flush()
    }

    fn issued(&self, serial: &str) -> Result<Option<pb::IssuedSvid>, StoreError> {
        self.issued.get(serial.as_bytes())?.map(|b| decode(serial.as_bytes(), &b)).transpose()
    }

    fn issued_for_entry(&self, entry_id: &str) -> Result<Vec<pb::IssuedSvid>, StoreError> {
        self.issued_by_index(&self.issued_by_entry, entry_id)
    }

    fn issued_through_agent(&self, agent_id: &str) -> Result<Vec<pb::IssuedSvid>, StoreError> {
        // The agent's own SVIDs, then those of the entries it parents: an
        // entry's SVIDs are revoked when it moves to another parent or is
        // deleted, so these are all SVIDs still valid through this agent.
        let mut out = self.issued_by_index(&self.issued_by_entry, &agent_owner(agent_id))?;
        if let Ok(parent) = SpiffeId::parse(agent_id) {
            let prefix = parent_key(&parent, "");
            for item in self.by_parent.scan_prefix(&prefix) {
                let (key, _) = item?;
                let entry_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                out.extend(self.issued_by_index(&self.issued_by_entry, &entry_id)?);
            }
        }
        Ok(out)
    }

    fn revoke(&self, revocations: &[pb::Revocation]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for revocation in revocations {
            batch.insert(revocation.serial.as_bytes(), revocation.encode_to_vec());
        }
        self.revocations.apply_batch(batch)?;
        self.flush()
    }

    fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError> {
        self.revocations.get(serial.as_bytes())?.map(|b| decode(serial.as_bytes(), &b)).transpose()
    }

    fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError> {
        self.revocations
            .iter()
            .map(|item| {
                let (key, bytes) = item?;
                decode(&key, &bytes)
            })
            .collect()
    }

    fn prune_expired(&self, now: i64) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for item in self.issued.iter() {
            let (key, bytes) = item?;
            let svid: pb::IssuedSvid = decode(&key, &bytes)?;
            if svid.expires_at <= now {
                self.issued.remove(&key)?;
                self.issued_by_entry.remove(index_key(&owner_of(&svid), &svid.serial))?;
                pruned += 1;
            }
        }
        for item in self.revocations.iter() {
            let (key, bytes) = item?;
            let revocation: pb::Revocation = decode(&key, &bytes)?;
            if revocation.expires_at <= now {
                self.revocations.remove(&key)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            self.flush()?;
        }
        Ok(pruned)
    }

    fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let end = (now.max(0) + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in self.by_expiry.range(..end.as_slice()) {
            let (key, _) = item?;
            out.push(String::from_utf8_lossy(&key[8..]).into_owned());
        }
        Ok(out)
    }

    fn issued_count(&self) -> usize {
        self.issued.len()
    }

    fn next_crl_number(&self) -> Result<u64, StoreError> {
        let next = self.meta.update_and_fetch(CRL_NUMBER_KEY, |old| {
            Some((read_u64(old.map(sled::IVec::from)) + 1).to_be_bytes().to_vec())
        })?;
        self.flush()?;
        Ok(read_u64(next))
    }
}

fn decode_agent(key: &[u8], bytes: &[u8]) -> Result<pb::Agent, StoreError> {
    pb::Agent::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryRules;
    use tessera_workload_api::TrustDomain;

    fn entry(id: &str, spiffe: &str, parent: &str, uid: u32) -> Entry {
        let rules = EntryRules {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            default_ttl: 60,
            max_ttl: 600,
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

    #[test]
    fn entries_are_indexed_by_parent_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let results = store
                .create_entries(&[
                    entry("a", "w1", "agent1", 1),
                    entry("b", "w2", "agent2", 1),
                    entry("c", "w3", "agent1", 2),
                ])
                .unwrap();
            assert!(results.iter().all(Result::is_ok));
            assert_eq!(store.revision().unwrap(), 3);
        }
        let store = SledStore::open(dir.path()).unwrap();
        let parent = SpiffeId::parse("spiffe://example.org/agent1").unwrap();
        let ids: Vec<_> =
            store.entries_by_parent(&parent).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(store.entry_count(), 3);
    }

    #[test]
    fn duplicates_are_refused_per_item_and_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.create_entries(&[entry("a", "w", "agent", 1)]).unwrap();
        let results = store
            .create_entries(&[
                entry("b", "w", "agent", 1),
                entry("c", "w", "agent", 2),
                entry("d", "w", "agent", 2),
            ])
            .unwrap();
        assert_eq!(results[0], Err(EntryError::Duplicate("a".into())));
        assert!(results[1].is_ok());
        assert_eq!(results[2], Err(EntryError::Duplicate("c".into())));
        assert_eq!(store.entry_count(), 2);
        assert_eq!(store.revision().unwrap(), 2);
    }

    #[test]
    fn update_moves_index_and_delete_logs_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.create_entries(&[entry("a", "w", "agent1", 1)]).unwrap();
        let moved = store.update_entries(&[entry("a", "w", "agent2", 1)]).unwrap();
        assert_eq!(moved[0].as_ref().unwrap().revision, 2);
        let agent1 = SpiffeId::parse("spiffe://example.org/agent1").unwrap();
        let agent2 = SpiffeId::parse("spiffe://example.org/agent2").unwrap();
        assert!(store.entries_by_parent(&agent1).unwrap().is_empty());
        assert_eq!(store.entries_by_parent(&agent2).unwrap().len(), 1);
        assert_eq!(
            store.update_entries(&[entry("zz", "w", "agent1", 1)]).unwrap()[0],
            Err(EntryError::NotFound("zz".into()))
        );
        store.delete_entries(&["a".into()]).unwrap();
        let changes = store.changes_since(1).unwrap();
        assert!(changes
            .iter()
            .any(|c| c.removed && c.parent_id.ends_with("agent1") && c.revision == 2));
        assert!(changes
            .iter()
            .any(|c| c.removed && c.parent_id.ends_with("agent2") && c.revision == 3));
        assert_eq!(store.entry_count(), 0);
    }

    #[test]
    fn join_token_can_be_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let token = pb::JoinToken {
            token: "t".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            expires_at: 5,
        };
        store.put_join_token(&token).unwrap();
        assert_eq!(store.take_join_token("t").unwrap(), Some(token));
        assert_eq!(store.take_join_token("t").unwrap(), None);
    }
}
