//! The ordered key-value layer under the store, the event log and the
//! proposals: named trees of byte keys and values, read directly or inside
//! a locked transaction. `sled/` has one server's embedded database,
//! `postgres.rs` PostgreSQL, shared by several servers. This layer knows
//! nothing of the store above it but [`StoreError`].
//!
//! A transaction holds an exclusive [`Lock`] for its whole life: on sled a
//! mutex, on PostgreSQL an advisory lock held until commit, so every
//! server sharing the database takes turns. Inside it, reads see the
//! committed state plus the transaction's own writes, and nothing else can
//! write what the lock guards; the writes are applied atomically at the end.

use super::error::StoreError;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Key-value pairs, in key order.
pub type Pairs = Vec<Pair>;

/// A transaction's buffered writes: `None` deletes.
type Writes = BTreeMap<(&'static str, Vec<u8>), Option<Vec<u8>>>;

/// Committed values a transaction read ahead: `None` is absent.
type ReadAhead = HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>;

/// The exclusive locks transactions take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// The store's records and change log.
    Store = 1,
    /// The event chain.
    Events = 2,
    /// Both, taken in that order (every holder of both takes `Store`
    /// first): a change and its events in one commit.
    StoreAndEvents = 3,
}

impl Lock {
    /// The locks to take, in the order every transaction takes them.
    pub fn parts(self) -> &'static [Lock] {
        match self {
            Lock::Store => &[Lock::Store],
            Lock::Events => &[Lock::Events],
            Lock::StoreAndEvents => &[Lock::Store, Lock::Events],
        }
    }
}

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace.
    Put(&'static str, Vec<u8>, Vec<u8>),
    /// Remove, if present.
    Delete(&'static str, Vec<u8>),
}

/// Reads of the committed state, for a transaction (under its lock).
pub trait TxRead {
    /// One value.
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keys starting with `prefix`, in order.
    fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StoreError>;
    /// The greatest key and its value.
    fn last(&self, tree: &'static str) -> Result<Option<Pair>, StoreError>;
    /// The values of `keys`, in their order (`None` where absent): one
    /// round trip for a network database.
    fn get_many(
        &self,
        tree: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(tree, key)).collect()
    }
}

/// A transaction's view: the committed state under the lock, plus its own
/// writes, which are applied when the transaction's function succeeds.
pub struct Txn<'a> {
    base: &'a dyn TxRead,
    writes: RefCell<Writes>,
    /// What [`Txn::prefetch`] read: the committed state, which the lock
    /// keeps still until the transaction ends.
    read_ahead: RefCell<ReadAhead>,
    notify: RefCell<Option<u64>>,
}

impl fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Txn").field("writes", &self.writes.borrow().len()).finish()
    }
}

impl<'a> Txn<'a> {
    /// A transaction reading `base`.
    pub fn new(base: &'a dyn TxRead) -> Self {
        Self {
            base,
            writes: RefCell::default(),
            read_ahead: RefCell::default(),
            notify: RefCell::default(),
        }
    }

    /// One value, as this transaction left it.
    pub fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let at = (tree, key.to_vec());
        if let Some(write) = self.writes.borrow().get(&at) {
            return Ok(write.clone());
        }
        if let Some(read) = self.read_ahead.borrow().get(&at) {
            return Ok(read.clone());
        }
        self.base.get(tree, key)
    }

    /// Reads the committed values of `keys` in one go (one round trip on
    /// PostgreSQL), so that the [`Txn::get`]s of a batch that follow do
    /// not each wait for the database. Keys this transaction wrote keep
    /// their written values.
    pub fn prefetch(&self, tree: &'static str, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let wanted: Vec<Vec<u8>> = {
            let (writes, read) = (self.writes.borrow(), self.read_ahead.borrow());
            let mut seen = std::collections::HashSet::new();
            keys.iter()
                .filter(|k| {
                    let at = (tree, k.to_vec());
                    !writes.contains_key(&at) && !read.contains_key(&at) && seen.insert(*k)
                })
                .cloned()
                .collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let values = self.base.get_many(tree, &wanted)?;
        let mut read = self.read_ahead.borrow_mut();
        for (key, value) in wanted.into_iter().zip(values) {
            read.insert((tree, key), value);
        }
        Ok(())
    }

    /// Keys starting with `prefix`, as this transaction left them.
    pub fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.base.scan_prefix(tree, prefix)?.into_iter().collect();
        for ((t, key), value) in self.writes.borrow().iter() {
            if *t == tree && key.starts_with(prefix) {
                match value {
                    Some(v) => merged.insert(key.clone(), v.clone()),
                    None => merged.remove(key),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// The greatest key of `tree` and its value, as this transaction left it.
    pub fn last(&self, tree: &'static str) -> Result<Option<Pair>, StoreError> {
        let writes = self.writes.borrow();
        let mut best = self.base.last(tree)?;
        // A removed last key: fall back to a scan (rare: only pruning removes).
        if best.as_ref().is_some_and(|(k, _)| writes.get(&(tree, k.clone())) == Some(&None)) {
            drop(writes);
            best = self.scan_prefix(tree, b"")?.pop();
            return Ok(best);
        }
        for ((t, key), value) in writes.iter() {
            if let (true, Some(v)) = (*t == tree, value) {
                if best.as_ref().is_none_or(|(k, _)| key > k) {
                    best = Some((key.clone(), v.clone()));
                }
            }
        }
        Ok(best)
    }

    /// Inserts or replaces a value.
    pub fn put(&self, tree: &'static str, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        self.writes.borrow_mut().insert((tree, key.as_ref().to_vec()), Some(value.into()));
    }

    /// Removes a value; returns what it was.
    pub fn delete(
        &self,
        tree: &'static str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let old = self.get(tree, key.as_ref())?;
        self.writes.borrow_mut().insert((tree, key.as_ref().to_vec()), None);
        Ok(old)
    }

    /// Removes a value without reading it first (a network database
    /// answers a read per key: pruning thousands of keys deletes blind).
    pub fn forget(&self, tree: &'static str, key: impl AsRef<[u8]>) {
        self.writes.borrow_mut().insert((tree, key.as_ref().to_vec()), None);
    }

    /// Tells other servers, once this commits, that the change log reached `revision`.
    pub fn notify(&self, revision: u64) {
        *self.notify.borrow_mut() = Some(revision);
    }

    /// Whether the transaction wrote anything.
    pub fn is_empty(&self) -> bool {
        self.writes.borrow().is_empty()
    }

    /// The writes, and the revision to announce.
    pub fn into_parts(self) -> (Vec<Op>, Option<u64>) {
        let ops = self
            .writes
            .into_inner()
            .into_iter()
            .map(|((tree, key), value)| match value {
                Some(v) => Op::Put(tree, key, v),
                None => Op::Delete(tree, key),
            })
            .collect();
        (ops, self.notify.into_inner())
    }
}

/// Called with the change log's revision when another server committed.
pub type OnRemoteChange = Box<dyn Fn(u64) + Send + Sync>;

/// What the store, the event log and the proposals need from a database.
pub trait Kv: Send + Sync + fmt::Debug {
    /// One value.
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Takes `n` from the signing budget `key` (a token bucket of `burst`,
    /// refilled at `rate` per second; `now_ms` in Unix milliseconds) where
    /// servers share it: `Some(taken)`; `None` where they do not (the
    /// embedded database: the one server keeps budgets in memory).
    fn take_budget(
        &self,
        _key: &str,
        _n: u64,
        _rate: u32,
        _burst: u32,
        _now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }
    /// The values of `keys`, in their order (`None` where absent): one
    /// round trip for a network database.
    fn get_many(
        &self,
        tree: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(tree, key)).collect()
    }
    /// Up to `limit` pairs with `start <= key` (and `key < end` if given),
    /// ascending, or descending from the greatest if `reverse`.
    fn range(
        &self,
        tree: &'static str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, StoreError>;
    /// Number of keys in `tree`.
    fn len(&self, tree: &'static str) -> Result<usize, StoreError>;
    /// Runs `f` holding `lock` (across every server sharing the database)
    /// and applies its writes atomically. Durable on return only after
    /// [`Kv::flush`] on sled; at once on PostgreSQL.
    fn transaction(
        &self,
        lock: Lock,
        f: &mut dyn FnMut(&Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Applies writes atomically, without a lock.
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Applies writes without a lock, atomically within each tree but not
    /// across trees, in the order of the trees' first writes: for writes
    /// whose readers tolerate some trees' share without the others' (a
    /// crash between them leaves the earlier trees' writes). Cheaper on
    /// sled (one batch per tree instead of a transaction, which reads
    /// every key it writes); [`Kv::apply`] elsewhere.
    fn apply_per_tree(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.apply(ops)
    }
    /// Makes every applied write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Whether other servers share this database.
    fn shared(&self) -> bool;
    /// Calls `f` whenever another server announces a change-log revision.
    fn on_remote_change(&self, f: OnRemoteChange);
    /// Whether the database answers, and how it is (for health checks).
    fn health(&self) -> Result<String, StoreError>;
}

/// Keys starting with `prefix`, as a `range` over a [`Kv`].
pub fn scan_prefix(kv: &dyn Kv, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StoreError> {
    match prefix_end(prefix) {
        Some(end) => kv.range(tree, prefix, Some(&end), usize::MAX, false),
        None => kv.range(tree, prefix, None, usize::MAX, false),
    }
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed state, counting how often it is asked.
    #[derive(Default)]
    struct Counted {
        values: BTreeMap<Vec<u8>, Vec<u8>>,
        gets: std::cell::Cell<usize>,
        batches: std::cell::Cell<usize>,
    }

    impl TxRead for Counted {
        fn get(&self, _: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.gets.set(self.gets.get() + 1);
            Ok(self.values.get(key).cloned())
        }
        fn scan_prefix(&self, _: &'static str, _: &[u8]) -> Result<Pairs, StoreError> {
            Ok(Vec::new())
        }
        fn last(&self, _: &'static str) -> Result<Option<Pair>, StoreError> {
            Ok(None)
        }
        fn get_many(
            &self,
            _: &'static str,
            keys: &[Vec<u8>],
        ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.batches.set(self.batches.get() + 1);
            Ok(keys.iter().map(|k| self.values.get(k).cloned()).collect())
        }
    }

    /// A batch's lookups read ahead are one read of the base; what the
    /// transaction wrote, before or after, still wins over what was read.
    #[test]
    fn read_ahead_answers_gets_and_never_hides_the_transactions_writes() {
        let mut base = Counted::default();
        base.values.insert(b"a".to_vec(), b"1".to_vec());
        base.values.insert(b"b".to_vec(), b"2".to_vec());
        base.values.insert(b"c".to_vec(), b"3".to_vec());
        let tx = Txn::new(&base);
        tx.put("t", b"c", b"written".to_vec());
        let keys: Vec<Vec<u8>> =
            [&b"a"[..], b"b", b"c", b"a", b"absent"].map(<[u8]>::to_vec).into();
        tx.prefetch("t", &keys).unwrap();
        assert_eq!(base.batches.get(), 1);
        tx.delete("t", b"b").unwrap();
        assert_eq!(tx.get("t", b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(tx.get("t", b"b").unwrap(), None, "deleted after the read-ahead");
        assert_eq!(tx.get("t", b"c").unwrap(), Some(b"written".to_vec()), "written before it");
        assert_eq!(tx.get("t", b"absent").unwrap(), None);
        assert_eq!(base.gets.get(), 0, "every key was read ahead");
        // Another tree is not answered from this one's read-ahead.
        assert_eq!(tx.get("u", b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(base.gets.get(), 1);
        // Keys already read are not read again.
        tx.prefetch("t", &keys).unwrap();
        assert_eq!(base.batches.get(), 1);
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
    }
}
