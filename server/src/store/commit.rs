//! One commit: serialized with every other (of every server), atomic
//! across trees, durable (and watermarked on sled) before it returns, with
//! its events chained into the event log and, when it revoked X509-SVIDs,
//! the CRLs re-signed inside it. [`Tx`] is a commit's view of the trees,
//! with the reads and writes of records the other files build on.

use std::cell::Cell;
use std::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

use prost::Message;
use tessera_proto::types as pb;

use super::audit::Audit;
use super::changes::change_row;
use super::error::StoreError;
use super::issued_index::{read_records, rows_of, IssuedIndex, Placed, Row};
use super::kv::{Lock, Pairs, Txn};
use super::kv_store::{KvStore, Writer};
use super::layout::{
    decode, decode_entry, expiry_key, index_key, parent_key, read_u64, t, AGENTS, BY_EXPIRY,
    BY_IDENTITY, BY_PARENT, CHANGES, CRLS_KEY, CRL_NUMBER_KEY, ENTRIES, ISSUED, ISSUED_BY_OWNER,
    META, REVISION_KEY, REVOCATIONS, TREE_NAMES, WRITE_SEQ_KEY,
};
use super::{Change, ChangeKind};
use crate::entry::Entry;

pub(super) type TxResult<T> = Result<T, StoreError>;

/// One commit's view of every tree.
pub(super) struct Tx<'a> {
    pub(super) txn: &'a Txn<'a>,
    pub(super) revision: Cell<u64>,
    /// Revocations stored by this commit: the CRLs are re-signed in it.
    pub(super) revoked: std::cell::RefCell<Vec<pb::Revocation>>,
    pub(super) resign: Cell<bool>,
    /// Who the commit acts for (named in its revocations' events).
    pub(super) operator: Option<pb::Operator>,
    /// Events the commit's own steps add (revocations, issuance).
    pub(super) events: std::cell::RefCell<Vec<pb::Event>>,
    /// On sled, the index of issued SVIDs as committed
    /// (`issued_index.rs`); None when it is rows of a shared database.
    pub(super) index: Option<&'a IssuedIndex>,
    /// On sled, where each SVID this commit records went: added to the
    /// index once it is committed.
    pub(super) recorded: std::cell::RefCell<Vec<Placed>>,
    /// The changes this commit logged, written as one row of the change
    /// log when it is done (`changes.rs`).
    pub(super) changes: std::cell::RefCell<Vec<Change>>,
}

impl Tx<'_> {
    pub(super) fn get(&self, i: usize, key: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        self.txn.get(t(i), key.as_ref())
    }

    /// Reads `keys` of tree `i` ahead in one go (see [`Txn::prefetch`]).
    pub(super) fn prefetch(&self, i: usize, keys: impl Iterator<Item = Vec<u8>>) -> TxResult<()> {
        self.txn.prefetch(t(i), &keys.collect::<Vec<_>>())
    }

    pub(super) fn put(&self, i: usize, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        self.txn.put(t(i), key, value);
    }

    pub(super) fn remove(&self, i: usize, key: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        self.txn.delete(t(i), key)
    }

    /// Removes a value without reading it first.
    pub(super) fn forget(&self, i: usize, key: impl AsRef<[u8]>) {
        self.txn.forget(t(i), key);
    }

    /// Logs a change under the next revision, returned (written with the
    /// commit's other changes when it is done).
    pub(super) fn log(&self, kind: ChangeKind) -> u64 {
        let revision = self.revision.get() + 1;
        self.changes.borrow_mut().push(Change { revision, kind });
        self.revision.set(revision);
        revision
    }

    pub(super) fn entry(&self, id: &str) -> TxResult<Option<Entry>> {
        match self.get(ENTRIES, id)? {
            None => Ok(None),
            Some(bytes) => decode_entry(id.as_bytes(), &bytes).map(Some),
        }
    }

    pub(super) fn put_entry(&self, entry: &Entry) {
        self.put(ENTRIES, entry.id.as_bytes(), entry.to_proto().encode_to_vec());
        self.put(BY_PARENT, parent_key(&entry.parent_id, &entry.id), []);
        self.put(BY_IDENTITY, entry.identity_key(), entry.id.as_bytes());
        if entry.expires_at != 0 {
            self.put(BY_EXPIRY, expiry_key(entry.expires_at, &entry.id), []);
        }
    }

    pub(super) fn remove_entry(&self, entry: &Entry) -> TxResult<()> {
        self.remove(ENTRIES, entry.id.as_bytes())?;
        self.remove(BY_PARENT, parent_key(&entry.parent_id, &entry.id))?;
        self.remove(BY_IDENTITY, entry.identity_key())?;
        if entry.expires_at != 0 {
            self.remove(BY_EXPIRY, expiry_key(entry.expires_at, &entry.id))?;
        }
        Ok(())
    }

    pub(super) fn agent(&self, id: &str) -> TxResult<Option<pb::Agent>> {
        self.get(AGENTS, id)?.map(|bytes| decode(id.as_bytes(), &bytes)).transpose()
    }

    pub(super) fn put_agent(&self, agent: &pb::Agent) {
        self.put(AGENTS, agent.spiffe_id.as_bytes(), agent.encode_to_vec());
    }

    /// Records an issued SVID (`issued_index.rs` says how).
    pub(super) fn record(&self, svid: &pb::IssuedSvid) {
        let (rows, placed) = rows_of(&[svid], self.index.is_none());
        self.record_rows(rows, placed);
    }

    /// Records issued SVIDs already encoded as `rows` (`rows_of`), in this
    /// commit: on sled the in-memory index takes `placed` once it is done;
    /// on a shared database the owner index is rows too.
    pub(super) fn record_rows(&self, rows: Vec<Row>, placed: Vec<Placed>) {
        for (key, value) in rows {
            self.put(ISSUED, key, value);
        }
        match self.index {
            Some(_) => self.recorded.borrow_mut().extend(placed),
            None => placed.iter().for_each(|p| {
                self.put(ISSUED_BY_OWNER, index_key(&p.owner, &p.key), []);
            }),
        }
    }

    /// The issued SVID recorded under `key` (`svid_key`), unless pruned.
    pub(super) fn issued(&self, key: &str) -> TxResult<Option<pb::IssuedSvid>> {
        let Some(index) = self.index else {
            return self.get(ISSUED, key)?.map(|b| decode(key.as_bytes(), &b)).transpose();
        };
        let recorded = self.recorded.borrow();
        let row = index
            .row_of(key)
            .or_else(|| recorded.iter().find(|p| &*p.key == key).map(|p| p.row.clone()));
        let Some(row) = row else { return Ok(None) };
        Ok(read_records(&[(key.to_string(), row)], |row| self.get(ISSUED, row))?.pop())
    }

    /// The unexpired-or-unpruned SVIDs issued for an entry or an agent.
    pub(super) fn issued_by_owner(&self, owner: &str) -> TxResult<Vec<pb::IssuedSvid>> {
        self.issued_by_owners(&[owner.to_string()])
    }

    /// The unexpired-or-unpruned SVIDs issued for any of `owners` (entries
    /// or agents); on sled each shared row is read and decoded once.
    pub(super) fn issued_by_owners(&self, owners: &[String]) -> TxResult<Vec<pb::IssuedSvid>> {
        let Some(index) = self.index else {
            let mut out = Vec::new();
            for owner in owners {
                let prefix = index_key(owner, "");
                for (key, _) in self.txn.scan_prefix(t(ISSUED_BY_OWNER), &prefix)? {
                    if let Some(bytes) = self.get(ISSUED, &key[prefix.len()..])? {
                        out.push(decode(&key, &bytes)?);
                    }
                }
            }
            return Ok(out);
        };
        let recorded = self.recorded.borrow();
        let mut wanted = Vec::new();
        for owner in owners {
            wanted.extend(index.of_owner(owner));
            wanted.extend(
                recorded
                    .iter()
                    .filter(|p| p.owner == *owner)
                    .map(|p| (p.key.to_string(), p.row.clone())),
            );
        }
        read_records(&wanted, |row| self.get(ISSUED, row))
    }

    /// Every record of every tree, read under the lock.
    pub(super) fn dump(&self) -> TxResult<Vec<Pairs>> {
        TREE_NAMES.iter().map(|name| self.txn.scan_prefix(name, b"")).collect()
    }
}

impl KvStore {
    /// Runs `f` as one commit: serialized with every other commit (of
    /// every server), atomic across trees, durable (and watermarked on
    /// sled) before it returns; wakes Sync streams if it logged a change.
    pub(super) fn commit<T>(
        &self,
        audit: &Audit<'_, T>,
        f: impl FnOnce(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let mut writer = self.lock();
        self.commit_locked(&mut writer, audit, f)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// sled: the index of issued SVIDs, to read.
    pub(super) fn index(&self) -> RwLockReadGuard<'_, IssuedIndex> {
        self.issued_index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// sled: the index of issued SVIDs, to change (under the writer lock).
    pub(super) fn index_mut(&self) -> RwLockWriteGuard<'_, IssuedIndex> {
        self.issued_index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn commit_locked<T>(
        &self,
        writer: &mut Writer,
        audit: &Audit<'_, T>,
        f: impl FnOnce(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        // The key-value layer runs a transaction's body once (no retries):
        // `f` may move what it writes instead of copying it.
        let mut f = Some(f);
        let mut out = None;
        let (mut revision, mut seq, mut added, mut chained) = (0, 0, Vec::new(), Vec::new());
        let stored = &writer.revocations;
        let index = (!self.kv.shared()).then(|| self.index());
        let mut recorded = Vec::new();
        let sink = self.event_sink.get();
        let lock = if sink.is_some() { Lock::StoreAndEvents } else { Lock::Store };
        self.kv.transaction(lock, &mut |txn| {
            let start = read_u64(txn.get(t(META), REVISION_KEY)?.as_deref());
            let tx = Tx {
                txn,
                revision: Cell::new(start),
                revoked: Default::default(),
                resign: Cell::new(false),
                operator: audit.operator,
                events: Default::default(),
                index: index.as_deref(),
                recorded: Default::default(),
                changes: Default::default(),
            };
            let f = f.take().ok_or_else(|| StoreError::Group("a commit ran twice".into()))?;
            let value = f(&tx)?;
            if tx.resign.get() {
                self.sign_crls_in(stored, &tx)?;
            }
            // The change's events, in the change's commit.
            let mut events = audit.describe(&value);
            events.append(&mut tx.events.borrow_mut());
            chained = match sink {
                Some(sink) if !events.is_empty() => sink.chain_in(txn, events)?,
                _ => Vec::new(),
            };
            let changes = tx.changes.take();
            if let Some(last) = changes.last() {
                txn.put(t(CHANGES), last.revision.to_be_bytes(), change_row(&changes)?);
            }
            seq = read_u64(txn.get(t(META), WRITE_SEQ_KEY)?.as_deref()) + 1;
            txn.put(t(META), WRITE_SEQ_KEY, seq.to_be_bytes());
            revision = tx.revision.get();
            if revision != start {
                txn.put(t(META), REVISION_KEY, revision.to_be_bytes());
                txn.notify(revision);
            }
            added = tx.revoked.take();
            recorded = tx.recorded.take();
            out = Some(value);
            Ok(())
        })?;
        drop(index);
        if !self.kv.shared() {
            keep_sorted(&mut writer.revocations, added);
            let mut index = self.index_mut();
            recorded.iter().for_each(|placed| index.add(placed));
        }
        self.kv.flush()?;
        if let Some(watermark) = &self.watermark {
            watermark.write(seq)?;
        }
        if let Some(sink) = sink {
            sink.committed(&chained);
        }
        self.revision.send_if_modified(|current| {
            let newer = revision > *current;
            if newer {
                *current = revision;
            }
            newer
        });
        out.ok_or_else(|| StoreError::Group("the commit produced no result".into()))
    }

    /// Runs `f` under the store's lock (of every server) without writing.
    pub(super) fn commit_read<T>(
        &self,
        f: impl Fn(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let _writer = self.lock();
        let index = (!self.kv.shared()).then(|| self.index());
        let mut out = None;
        self.kv.transaction(Lock::Store, &mut |txn| {
            let tx = Tx {
                txn,
                revision: Cell::new(0),
                revoked: Default::default(),
                resign: Cell::new(false),
                operator: None,
                events: Default::default(),
                index: index.as_deref(),
                recorded: Default::default(),
                changes: Default::default(),
            };
            out = Some(f(&tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Group("the read produced no result".into()))
    }

    /// A whole copy of every tree, read under the lock: consistent.
    pub(super) fn dump(&self) -> Result<Vec<Pairs>, StoreError> {
        self.commit_read(|tx| tx.dump())
    }

    /// This server's key for a per-server record in `meta`.
    pub(super) fn own_key(&self, name: &str) -> String {
        if self.server_id.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{}", self.server_id)
        }
    }

    /// Signs this server's CRLs for every stored revocation (`stored` on
    /// sled; read in the commit from a shared database) plus this commit's,
    /// stores them and logs the change, inside the commit.
    pub(super) fn sign_crls_in(&self, stored: &[pb::Revocation], tx: &Tx<'_>) -> TxResult<()> {
        let Some(signer) = self.crl_signer.get() else { return Ok(()) };
        let mut read = Vec::new();
        let stored = if self.kv.shared() {
            let scanned = tx.txn.scan_prefix(t(REVOCATIONS), b"")?;
            let all = scanned.iter().map(|(key, bytes)| decode(key, bytes));
            keep_sorted(&mut read, all.collect::<Result<_, _>>()?);
            &read
        } else {
            stored
        };
        let revoked = tx.revoked.borrow();
        let mut new: Vec<&pb::Revocation> = revoked.iter().filter(|r| r.jti.is_empty()).collect();
        new.sort_by(|a, b| a.serial.cmp(&b.serial));
        let all = merged(stored, &new);
        let number_key = self.own_key(CRL_NUMBER_KEY);
        let number = read_u64(tx.get(META, &number_key)?.as_deref()) + 1;
        let crls = signer
            .sign_crls(&all, number)
            .map_err(|reason| StoreError::Corrupt { key: "CRL".into(), reason })?;
        tx.put(META, number_key, number.to_be_bytes());
        tx.put(META, self.own_key(CRLS_KEY), pb::Crls { crls }.encode_to_vec());
        tx.log(ChangeKind::Crls);
        Ok(())
    }
}

/// `revocations` kept sorted by serial, each serial once (the first kept),
/// with `added` taken in: a few inserted where they go, many sorted in.
pub(super) fn keep_sorted(revocations: &mut Vec<pb::Revocation>, added: Vec<pb::Revocation>) {
    let by_serial = |a: &pb::Revocation, b: &pb::Revocation| a.serial.cmp(&b.serial);
    let added = added.into_iter().filter(|r| r.jti.is_empty());
    if added.size_hint().1 < Some(9) {
        for revocation in added {
            if let Err(at) = revocations.binary_search_by(|r| by_serial(r, &revocation)) {
                revocations.insert(at, revocation);
            }
        }
        return;
    }
    revocations.extend(added);
    revocations.sort_by(by_serial);
    revocations.dedup_by(|later, first| later.serial == first.serial);
}

/// `stored` (sorted by serial, each once) and `new` (sorted) as one list in
/// serial order, a serial in both listed once (as stored).
fn merged<'a>(stored: &'a [pb::Revocation], new: &[&'a pb::Revocation]) -> Vec<&'a pb::Revocation> {
    let mut all = Vec::with_capacity(stored.len() + new.len());
    let (mut old, mut new) = (stored.iter().peekable(), new.iter().copied().peekable());
    loop {
        let next = match (old.peek(), new.peek()) {
            (Some(o), Some(n)) if n.serial < o.serial => new.next(),
            (Some(o), Some(n)) if n.serial == o.serial => {
                new.next();
                old.next()
            }
            (Some(_), _) => old.next(),
            (None, Some(_)) => new.next(),
            (None, None) => break,
        };
        if let Some(next) = next {
            if all.last().is_none_or(|last: &&pb::Revocation| last.serial != next.serial) {
                all.push(next);
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(serial: &str, reason: &str) -> pb::Revocation {
        pb::Revocation { serial: serial.into(), reason: reason.into(), ..Default::default() }
    }

    fn serials(list: &[&pb::Revocation]) -> Vec<String> {
        list.iter().map(|r| format!("{}{}", r.serial, r.reason)).collect()
    }

    /// The stored revocations stay sorted and unique whether a few or many
    /// are added (the first of a serial kept; JWT-SVIDs' left out), and a
    /// commit's own merge in once each, in order.
    #[test]
    fn revocations_stay_sorted_and_merge_once_each() {
        let mut stored = Vec::new();
        let many: Vec<_> = ["c", "a", "e", "a", "g", "b", "i", "k", "m", "o"]
            .iter()
            .map(|s| revocation(s, "1"))
            .collect();
        keep_sorted(&mut stored, many);
        let refs: Vec<&pb::Revocation> = stored.iter().collect();
        assert_eq!(serials(&refs), ["a1", "b1", "c1", "e1", "g1", "i1", "k1", "m1", "o1"]);
        let mut jwt = revocation("", "1");
        jwt.jti = "j".into();
        keep_sorted(&mut stored, vec![revocation("d", "2"), revocation("c", "2"), jwt]);
        let refs: Vec<&pb::Revocation> = stored.iter().collect();
        assert_eq!(serials(&refs), ["a1", "b1", "c1", "d2", "e1", "g1", "i1", "k1", "m1", "o1"]);
        let (new_a, new_f, new_z) =
            (revocation("a", "3"), revocation("f", "3"), revocation("z", "3"));
        let all = merged(&stored, &[&new_a, &new_f, &new_z]);
        assert_eq!(
            serials(&all),
            ["a1", "b1", "c1", "d2", "e1", "f3", "g1", "i1", "k1", "m1", "o1", "z3"]
        );
        assert!(merged(&[], &[]).is_empty());
    }
}
