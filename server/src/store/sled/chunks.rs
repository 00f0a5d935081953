//! Values larger than a row, split across rows of their own, so that no
//! sled node grows past the size at which sled writes it to a file it never
//! fsyncs (`ROW_BYTES`). A value past [`CHUNK_BYTES`] is written as a stub
//! under its own key, its chunks and a manifest in the tree [`CHUNKS`],
//! all in the commit that writes the value; reads put it back together.
//! Callers of [`SledKv`](super::SledKv) never see a stub or a chunk.
//!
//! A stub is recognised by its shape (36 bytes, starting with a byte no
//! protobuf message, JSON text or number the store keeps starts with) and
//! only counts when the manifest of its key says the same: a stored value
//! that merely looks like a stub is returned as it is.

use std::collections::{HashMap, HashSet};

use crate::store::error::StoreError;
use crate::store::kv::{Op, Pairs};

/// The tree of chunks (`c`, the value's ID, the chunk's index) and
/// manifests (`m`, the tree's name, 0, the key): not one of the trees the
/// store names.
pub(super) const CHUNKS: &str = "chunked_values";

/// The key, in [`CHUNKS`], that says every value past a row is split (a
/// store written before values were split is, once, at its next open).
pub(super) const SPLIT_ALL: &[u8] = b"split-all";

/// `name` as the `&'static str` a write names its tree by: each name is
/// kept once per process (the trees a store has are few).
pub(super) fn tree_name(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.iter().find(|known| **known == name) {
        return known;
    }
    let kept: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(kept);
    kept
}

/// A value longer than this is split into chunks of this size.
pub(super) const CHUNK_BYTES: usize = super::rows::ROW_BYTES;

/// A stub's first bytes. 0xFF begins no protobuf message (a field key with
/// wire type 7), no JSON text and no UTF-8.
const MAGIC: [u8; 8] = *b"\xFFchunks1";

/// A stub: the magic, the value's ID (16 bytes), its chunk count (u32) and
/// length (u64), big-endian.
const STUB_LEN: usize = MAGIC.len() + 16 + 4 + 8;

/// Where a large value's chunks are, and how many bytes they add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stub {
    id: [u8; 16],
    chunks: u32,
    len: u64,
}

impl Stub {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STUB_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.chunks.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The stub `value` would be, by its shape alone.
    pub(super) fn parse(value: &[u8]) -> Option<Self> {
        if value.len() != STUB_LEN || value[..MAGIC.len()] != MAGIC {
            return None;
        }
        let rest = &value[MAGIC.len()..];
        Some(Self {
            id: rest[..16].try_into().ok()?,
            chunks: u32::from_be_bytes(rest[16..20].try_into().ok()?),
            len: u64::from_be_bytes(rest[20..28].try_into().ok()?),
        })
    }
}

pub(super) fn manifest_key(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + tree.len() + key.len());
    out.push(b'm');
    out.extend_from_slice(tree.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

/// The tree and key a manifest key names.
fn parse_manifest_key(key: &[u8]) -> Option<(String, Vec<u8>)> {
    let rest = key.strip_prefix(b"m")?;
    let end = rest.iter().position(|b| *b == 0)?;
    let tree = std::str::from_utf8(&rest[..end]).ok()?;
    Some((tree.to_string(), rest[end + 1..].to_vec()))
}

fn chunk_prefix(id: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(21);
    out.push(b'c');
    out.extend_from_slice(id);
    out
}

fn chunk_key(id: &[u8; 16], index: u32) -> Vec<u8> {
    let mut out = chunk_prefix(id);
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The deletes of a stored large value's manifest and chunks.
fn forget(tree: &str, key: &[u8], stub: &Stub, out: &mut Vec<Op>) {
    out.push(Op::Delete(CHUNKS, manifest_key(tree, key)));
    out.extend((0..stub.chunks).map(|i| Op::Delete(CHUNKS, chunk_key(&stub.id, i))));
}

/// Whether `ops` write a large value or replace or delete one (`split`
/// says whether a key holds one now: its manifest is there): only then
/// does a commit go through [`expand`].
pub(super) fn involves(
    ops: &[Op],
    split: impl Fn(&str, &[u8]) -> Result<bool, StoreError>,
) -> Result<bool, StoreError> {
    for op in ops {
        let involved = match op {
            Op::Put(tree, key, value) => value.len() > CHUNK_BYTES || split(tree, key)?,
            Op::Delete(tree, key) => split(tree, key)?,
        };
        if involved {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `ops` as sled is to apply them: each large value as its stub, its
/// chunks and its manifest; each replaced or deleted large value's chunks
/// and manifest deleted (`manifest` reads a stored one). `new_id` gives
/// each new value its ID: never one given before, and greater than the
/// last, so that new chunks are appended to the tree rather than strewn
/// over it (sled then keeps fewer of its pages changing, and in memory).
pub(super) fn expand(
    ops: Vec<Op>,
    manifest: impl Fn(&str, &[u8]) -> Result<Option<Stub>, StoreError>,
    mut new_id: impl FnMut() -> [u8; 16],
) -> Result<Vec<Op>, StoreError> {
    let mut out = Vec::with_capacity(ops.len());
    // This commit's own large values, by tree and key (`None`: removed).
    let mut now: HashMap<(&'static str, Vec<u8>), Option<Stub>> = HashMap::new();
    for op in ops {
        let (tree, key) = match &op {
            Op::Put(tree, key, _) | Op::Delete(tree, key) => (*tree, key.clone()),
        };
        let stored = match now.get(&(tree, key.clone())) {
            Some(stub) => *stub,
            None => manifest(tree, &key)?,
        };
        if let Some(stub) = &stored {
            forget(tree, &key, stub, &mut out);
        }
        match op {
            Op::Put(_, _, value) if value.len() > CHUNK_BYTES => {
                let id = new_id();
                let chunks = value.chunks(CHUNK_BYTES);
                let stub = Stub {
                    id,
                    chunks: u32::try_from(chunks.len())
                        .map_err(|_| StoreError::Io("a value too large to store".into()))?,
                    len: value.len() as u64,
                };
                for (i, chunk) in (0u32..).zip(chunks) {
                    out.push(Op::Put(CHUNKS, chunk_key(&id, i), chunk.to_vec()));
                }
                out.push(Op::Put(CHUNKS, manifest_key(tree, &key), stub.encode()));
                out.push(Op::Put(tree, key.clone(), stub.encode()));
                now.insert((tree, key), Some(stub));
            }
            op => {
                out.push(op);
                now.insert((tree, key), None);
            }
        }
    }
    Ok(out)
}

/// The writes that remove what no stored value names, given the manifests
/// (every pair of [`CHUNKS`] under `m`) and the chunks' keys: chunks of no
/// manifest, and manifests whose key holds something else now (a value
/// written over it by a commit that raced the one writing it).
pub(super) fn stale(
    manifests: Pairs,
    chunk_keys: impl Iterator<Item = Vec<u8>>,
    value_of: impl Fn(&str, &[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Vec<Op>, StoreError> {
    let mut live = HashSet::new();
    let mut stale = Vec::new();
    for (manifest, stub_bytes) in manifests {
        let (Some((tree, key)), Some(stub)) =
            (parse_manifest_key(&manifest), Stub::parse(&stub_bytes))
        else {
            stale.push(Op::Delete(CHUNKS, manifest));
            continue;
        };
        if value_of(&tree, &key)?.as_deref() == Some(stub_bytes.as_slice()) {
            live.insert(stub.id);
        } else {
            stale.push(Op::Delete(CHUNKS, manifest));
        }
    }
    for key in chunk_keys {
        let id: Option<[u8; 16]> = key.get(1..17).and_then(|id| id.try_into().ok());
        if !id.is_some_and(|id| live.contains(&id)) {
            stale.push(Op::Delete(CHUNKS, key));
        }
    }
    Ok(stale)
}

/// What [`resolve`] read.
#[derive(Debug)]
pub(super) enum Read {
    /// The value, whole.
    Value(Vec<u8>),
    /// The key was deleted while it was read.
    Gone,
    /// The value was replaced each time it was read: read again while no
    /// commit can delete chunks.
    Replaced,
}

/// `value`, as read under `key` of `tree`, put back together if it is a
/// large value's stub, trying at most `tries` times. `manifest` reads the
/// key's manifest, `chunks` the chunks under a prefix (in order), `reread`
/// the key's value again.
///
/// Reads outside the store's lock race the commits: a stub read just
/// before a commit replaced it may find its manifest replaced and its
/// chunks deleted. A value's chunks never change once written (a new value
/// gets a new ID), so the read is consistent when the key still holds the
/// same stub after its manifest and chunks were read; otherwise it starts
/// again from what the key holds now.
pub(super) fn resolve(
    tree: &str,
    key: &[u8],
    mut value: Vec<u8>,
    tries: usize,
    reread: impl Fn() -> Result<Option<Vec<u8>>, StoreError>,
    manifest: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
    chunks: impl Fn(&[u8]) -> Result<Pairs, StoreError>,
) -> Result<Read, StoreError> {
    for _ in 0..tries {
        let Some(stub) = Stub::parse(&value) else { return Ok(Read::Value(value)) };
        let named = manifest(&manifest_key(tree, key))?.as_deref() == Some(value.as_slice());
        let whole = if named { assemble(&stub, chunks(&chunk_prefix(&stub.id))?) } else { None };
        if let Some(whole) = whole {
            return Ok(Read::Value(whole));
        }
        match reread()? {
            // Unchanged: shaped like a stub but no manifest names it (an
            // ordinary value), or named but its chunks are not all there.
            Some(again) if again == value && !named => return Ok(Read::Value(value)),
            Some(again) if again == value => {
                return Err(StoreError::Corrupt {
                    key: format!("{tree}/{}", String::from_utf8_lossy(key)),
                    reason: format!(
                        "the value's {} chunks ({} bytes) are not all stored",
                        stub.chunks, stub.len
                    ),
                })
            }
            Some(again) => value = again,
            None => return Ok(Read::Gone),
        }
    }
    Ok(Read::Replaced)
}

/// The value `parts` (a stub's chunks, as read) make, if they are all there.
fn assemble(stub: &Stub, parts: Pairs) -> Option<Vec<u8>> {
    let complete = parts.len() == stub.chunks as usize
        && parts.iter().enumerate().all(|(i, (k, _))| *k == chunk_key(&stub.id, i as u32));
    if !complete {
        return None;
    }
    let mut whole = Vec::with_capacity(parts.iter().map(|(_, chunk)| chunk.len()).sum());
    parts.into_iter().for_each(|(_, chunk)| whole.extend_from_slice(&chunk));
    (whole.len() as u64 == stub.len).then_some(whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::{Kv, Lock, TxRead};
    use crate::store::sled::SledKv;
    use std::collections::BTreeMap;

    #[test]
    fn a_stub_reads_back_and_nothing_else_parses_as_one() {
        let stub = Stub { id: [3; 16], chunks: 7, len: 28_000 };
        assert_eq!(Stub::parse(&stub.encode()), Some(stub));
        let mut longer = stub.encode();
        longer.push(0);
        assert_eq!(Stub::parse(&longer), None);
        assert_eq!(Stub::parse(&stub.encode()[1..]), None);
        assert_eq!(Stub::parse(&[0u8; STUB_LEN]), None);
    }

    #[test]
    fn a_manifest_key_names_its_tree_and_key() {
        let key = manifest_key("crls", b"a\0b");
        assert_eq!(parse_manifest_key(&key), Some(("crls".into(), b"a\0b".to_vec())));
        assert_eq!(parse_manifest_key(b"c123"), None);
    }

    /// A value of `len` bytes that differs from every other of this test.
    fn value(len: usize, seed: u64) -> Vec<u8> {
        (0..len).map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed) as u8).collect()
    }

    /// Every key of the chunk tree but the mark that every value is split.
    fn chunk_rows(kv: &SledKv) -> Vec<Vec<u8>> {
        let keys = kv.tree_of(CHUNKS).unwrap().iter().keys().map(|k| k.unwrap().to_vec());
        keys.filter(|k| k != SPLIT_ALL).collect()
    }

    /// The files sled wrote under `blobs/` (nodes past 128 KiB).
    fn blob_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
    }

    /// Values past a row are stored as rows of at most 4 KiB, whichever
    /// way they are written, and read back whole by every read; sled
    /// writes no file of its own for them.
    #[test]
    fn large_values_are_split_into_rows_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
        let sizes = [0, 10, CHUNK_BYTES, CHUNK_BYTES + 1, 100_000, 3 << 20];
        for (i, len) in sizes.into_iter().enumerate() {
            let key = format!("k{i}").into_bytes();
            match i % 3 {
                0 => kv.apply(vec![Op::Put("t", key, value(len, i as u64))]).unwrap(),
                1 => kv.apply_per_tree(vec![Op::Put("t", key, value(len, i as u64))]).unwrap(),
                _ => kv
                    .transaction(Lock::Store, &mut |tx| {
                        tx.put("t", &key, value(len, i as u64));
                        Ok(())
                    })
                    .unwrap(),
            }
        }
        kv.flush().unwrap();
        assert_eq!(blob_files(dir.path()), 0, "no node went to a file of its own");
        let expected: Pairs = sizes
            .iter()
            .enumerate()
            .map(|(i, len)| (format!("k{i}").into_bytes(), value(*len, i as u64)))
            .collect();
        assert_eq!(kv.range("t", b"", None, usize::MAX, false).unwrap(), expected);
        for (key, value) in &expected {
            assert_eq!(Kv::get(&kv, "t", key).unwrap().as_ref(), Some(value));
        }
        assert_eq!(TxRead::last(&kv, "t").unwrap().as_ref(), expected.last());
        kv.transaction(Lock::Store, &mut |tx| {
            assert_eq!(tx.get("t", b"k4")?, Some(value(100_000, 4)));
            Ok(())
        })
        .unwrap();
        let chunks = sizes.iter().filter(|l| **l > CHUNK_BYTES).map(|l| l.div_ceil(CHUNK_BYTES));
        let manifests = sizes.iter().filter(|l| **l > CHUNK_BYTES).count();
        assert_eq!(chunk_rows(&kv).len(), chunks.sum::<usize>() + manifests);
        assert!(kv
            .tree_of(CHUNKS)
            .unwrap()
            .iter()
            .values()
            .all(|v| v.unwrap().len() <= CHUNK_BYTES));
    }

    /// A stored value shaped like a stub, with no manifest naming it, is
    /// an ordinary value; a split value missing a chunk is an error, never
    /// a shorter value.
    #[test]
    fn only_a_manifest_makes_a_stub_and_a_missing_chunk_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
        let lookalike = Stub { id: [1; 16], chunks: 1, len: 5 }.encode();
        kv.apply(vec![Op::Put("t", b"a".to_vec(), lookalike.clone())]).unwrap();
        assert_eq!(Kv::get(&kv, "t", b"a").unwrap(), Some(lookalike));
        kv.apply(vec![Op::Put("t", b"b".to_vec(), value(20_000, 1))]).unwrap();
        let chunk = chunk_rows(&kv).into_iter().find(|k| k[0] == b'c').unwrap();
        kv.tree_of(CHUNKS).unwrap().remove(chunk).unwrap();
        let err = Kv::get(&kv, "t", b"b").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(kv.range("t", b"", None, usize::MAX, false).is_err());
    }

    /// Reads outside the lock, racing commits that replace a split value
    /// (and delete its chunks), always get one whole value that was
    /// written, never an error or a mix of two.
    #[test]
    fn reads_racing_replacements_get_a_whole_value() {
        let dir = tempfile::tempdir().unwrap();
        let kv = std::sync::Arc::new(SledKv::open(dir.path(), 1 << 24).unwrap());
        // Generation g: (g % 7 + 2) chunks' worth of the byte g.
        let written = |g: u32| vec![g as u8; (g as usize % 7 + 2) * CHUNK_BYTES - 5];
        kv.apply(vec![Op::Put("t", b"k".to_vec(), written(0))]).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (kv, done) = (kv.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                        let value = if r == 0 {
                            Kv::get(&*kv, "t", b"k").unwrap().unwrap()
                        } else {
                            kv.range("t", b"", None, 10, false).unwrap().pop().unwrap().1
                        };
                        let g = value[0];
                        assert!(value.iter().all(|b| *b == g), "a value of one write");
                        assert_eq!(value.len(), (g as usize % 7 + 2) * CHUNK_BYTES - 5);
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for g in 1..250 {
            kv.apply(vec![Op::Put("t", b"k".to_vec(), written(g))]).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
        assert_eq!(chunk_rows(&kv).len(), written(249).len().div_ceil(CHUNK_BYTES) + 1);
    }

    /// Seeded random sequences of puts of every size, deletes and reopens,
    /// written every way the store writes: reads always give what a plain
    /// map holds, and the chunk tree holds exactly the live values' chunks
    /// and manifests (nothing left behind by a replace or a delete).
    #[test]
    fn random_writes_and_reopens_match_a_map_and_leave_no_stray_chunks() {
        for seed in [1u64, 7, 42, 2026] {
            let dir = tempfile::tempdir().unwrap();
            let mut kv = SledKv::open(dir.path(), 1 << 24).unwrap();
            let mut model: BTreeMap<(&'static str, Vec<u8>), Vec<u8>> = BTreeMap::new();
            let mut state = seed;
            let mut next = move |n: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % n
            };
            for step in 0..400 {
                let batch: Vec<Op> = (0..1 + next(4))
                    .map(|_| {
                        let tree = ["t", "u"][next(2) as usize];
                        let key = format!("k{}", next(12)).into_bytes();
                        if next(4) == 0 {
                            Op::Delete(tree, key)
                        } else {
                            let len = match next(3) {
                                0 => next(64),
                                1 => CHUNK_BYTES as u64 - 2 + next(4),
                                _ => next(40_000),
                            };
                            Op::Put(tree, key, value(len as usize, step))
                        }
                    })
                    .collect();
                for op in &batch {
                    match op {
                        Op::Put(t, k, v) => model.insert((*t, k.clone()), v.clone()),
                        Op::Delete(t, k) => model.remove(&(*t, k.clone())),
                    };
                }
                match next(3) {
                    0 => kv.apply(batch).unwrap(),
                    1 => kv.apply_per_tree(batch).unwrap(),
                    _ => kv
                        .transaction(Lock::Store, &mut |tx| {
                            for op in &batch {
                                match op {
                                    Op::Put(t, k, v) => tx.put(t, k, v.clone()),
                                    Op::Delete(t, k) => tx.forget(t, k),
                                }
                            }
                            Ok(())
                        })
                        .unwrap(),
                }
                if next(40) == 0 {
                    kv.flush().unwrap();
                    drop(kv);
                    kv = SledKv::open(dir.path(), 1 << 24).unwrap();
                }
                for tree in ["t", "u"] {
                    let stored = kv.range(tree, b"", None, usize::MAX, false).unwrap();
                    let expected: Pairs = model
                        .iter()
                        .filter(|((t, _), _)| *t == tree)
                        .map(|((_, k), v)| (k.clone(), v.clone()))
                        .collect();
                    assert_eq!(stored, expected, "seed {seed}, step {step}, tree {tree}");
                }
                let live = model.values().filter(|v| v.len() > CHUNK_BYTES);
                let rows: usize = live.map(|v| v.len().div_ceil(CHUNK_BYTES) + 1).sum();
                assert_eq!(chunk_rows(&kv).len(), rows, "seed {seed}, step {step}");
            }
            kv.flush().unwrap();
            assert_eq!(blob_files(dir.path()), 0, "seed {seed}");
        }
    }

    /// A store written before values were split (its large values whole)
    /// has them split at its next open, once, and reads them back the same;
    /// the layer's own tree is not one a caller may write.
    #[test]
    fn values_written_whole_are_split_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
            // As an older server wrote them: whole, no mark.
            kv.tree("t").unwrap().insert(b"big", value(50_000, 3)).unwrap();
            kv.tree("u").unwrap().insert(b"small", value(100, 4)).unwrap();
            kv.tree_of(CHUNKS).unwrap().remove(SPLIT_ALL).unwrap();
            kv.flush().unwrap();
        }
        let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
        assert_eq!(Kv::get(&kv, "t", b"big").unwrap(), Some(value(50_000, 3)));
        assert_eq!(Kv::get(&kv, "u", b"small").unwrap(), Some(value(100, 4)));
        let stored = kv.tree("t").unwrap().get(b"big").unwrap().unwrap();
        assert!(Stub::parse(&stored).is_some(), "stored as a stub now");
        assert_eq!(chunk_rows(&kv).len(), 50_000usize.div_ceil(CHUNK_BYTES) + 1, "and a manifest");
        // Replacing it removes its chunks: the split is known.
        kv.apply(vec![Op::Put("t", b"big".to_vec(), b"small".to_vec())]).unwrap();
        assert!(chunk_rows(&kv).is_empty());
        let refused = kv.apply(vec![Op::Put(CHUNKS, b"x".to_vec(), b"y".to_vec())]);
        assert!(refused.is_err(), "the chunk tree is the layer's own");
        assert!(kv.apply_per_tree(vec![Op::Delete("a\0b", b"x".to_vec())]).is_err());
        assert!(Kv::get(&kv, CHUNKS, SPLIT_ALL).is_err());
    }

    /// What a write that raced a split value's commit leaves (the value
    /// written over its stub, the manifest and chunks still there), and
    /// chunks of no manifest, are removed when the store opens.
    #[test]
    fn chunks_nothing_names_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
            kv.apply(vec![Op::Put("t", b"a".to_vec(), value(30_000, 1))]).unwrap();
            kv.apply(vec![Op::Put("t", b"b".to_vec(), value(30_000, 2))]).unwrap();
            // Over the stub, bypassing the split (as a racing commit would).
            kv.tree("t").unwrap().insert(b"a", b"small".to_vec()).unwrap();
            kv.tree_of(CHUNKS).unwrap().insert(chunk_key(&[9; 16], 0), b"orphan".to_vec()).unwrap();
            kv.flush().unwrap();
        }
        let kv = SledKv::open(dir.path(), 1 << 24).unwrap();
        assert_eq!(Kv::get(&kv, "t", b"a").unwrap(), Some(b"small".to_vec()));
        assert_eq!(Kv::get(&kv, "t", b"b").unwrap(), Some(value(30_000, 2)));
        assert_eq!(chunk_rows(&kv).len(), 30_000usize.div_ceil(CHUNK_BYTES) + 1, "b's only");
        // b's value is still known as split: replacing it removes its chunks.
        kv.apply(vec![Op::Put("t", b"b".to_vec(), b"small".to_vec())]).unwrap();
        assert!(chunk_rows(&kv).is_empty());
    }
}
