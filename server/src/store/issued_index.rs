//! How issued SVIDs are kept. On a shared database (PostgreSQL) each
//! record is a row of `issued_svids` under its own key, indexed by owner in
//! `issued_by_owner`: another server's commit must find what this one
//! issued. On sled a signing batch's records share rows of `issued_svids`
//! (up to [`ISSUED_PER_ROW`] a row and `sled::ROW_BYTES`, under
//! `batch:<the first one's key>`), and the
//! index (which SVIDs each entry or agent has, and which row holds each)
//! is in memory, rebuilt from the rows at open. The rows are the durable
//! truth either way.
//!
//! Why: on sled, each row written costs about as much whatever it holds;
//! a row and an index row per SVID were a fifth of the server's CPU under
//! issuance (`tessera-bench issue`, `jwt`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

// foldhash is fast and seeded per process but makes no claim to resist
// chosen keys; these are serials and `jti`s the server made and entry or
// agent IDs (one set per owner). SipHash was about a quarter of an insert.
use foldhash::{HashMap, HashSet};

use prost::Message;
use tessera_proto::types as pb;

use super::error::StoreError;
use super::kv::{Kv, Op, Pairs};
use super::layout::{decode, owner_of, svid_key, t, ISSUED, ISSUED_BY_OWNER};
use super::sled::row_sizes;

/// Records a sled row holds at most.
pub(super) const ISSUED_PER_ROW: usize = 64;

/// The key prefix of a row holding several records.
const BATCH_ROW: &str = "batch:";

/// The records of one `issued_svids` row: a batch row's, or the one record
/// of a row under its own key (PostgreSQL, and sled before batch rows).
pub(super) fn decode_row(key: &[u8], bytes: &[u8]) -> Result<Vec<pb::IssuedSvid>, StoreError> {
    if key.starts_with(BATCH_ROW.as_bytes()) {
        Ok(decode::<pb::IssuedSvids>(key, bytes)?.svids)
    } else {
        Ok(vec![decode(key, bytes)?])
    }
}

/// A batch row's value: `svids` as one `IssuedSvids` (`decode_row` reads
/// it back), encoded from the records where they are.
pub(super) fn encode_batch<'a>(
    svids: impl IntoIterator<Item = &'a pb::IssuedSvid> + Clone,
) -> Vec<u8> {
    use prost::encoding::message;
    // `IssuedSvids.svids` is field 1.
    let len = svids.clone().into_iter().map(|svid| message::encoded_len(1, svid)).sum();
    let mut out = Vec::with_capacity(len);
    svids.into_iter().for_each(|svid| message::encode(1, svid, &mut out));
    out
}

/// A row of `issued_svids`: its key and value.
pub(super) type Row = (Vec<u8>, Vec<u8>);

/// One record as it is to be written: its key, its owner, and the key of
/// the row that holds it.
#[derive(Debug, Clone)]
pub(super) struct Placed {
    pub(super) key: Arc<str>,
    pub(super) owner: String,
    pub(super) row: Arc<str>,
}

/// The rows holding `svids` and where each record went: a row per record
/// (`shared`), or batch rows.
pub(super) fn rows_of(svids: &[&pb::IssuedSvid], shared: bool) -> (Vec<Row>, Vec<Placed>) {
    let mut rows = Vec::new();
    let mut placed = Vec::with_capacity(svids.len());
    if shared {
        for svid in svids {
            let key: Arc<str> = Arc::from(svid_key(&svid.serial, &svid.jti));
            rows.push((key.as_bytes().to_vec(), svid.encode_to_vec()));
            placed.push(Placed { row: key.clone(), key, owner: owner_of(svid) });
        }
        return (rows, placed);
    }
    for chunk in row_chunks(svids) {
        let first = svid_key(&chunk[0].serial, &chunk[0].jti);
        let row: Arc<str> = Arc::from(format!("{BATCH_ROW}{first}"));
        let value = encode_batch(chunk.iter().copied());
        rows.push((row.as_bytes().to_vec(), value));
        for svid in chunk {
            let key = Arc::from(svid_key(&svid.serial, &svid.jti));
            placed.push(Placed { key, owner: owner_of(svid), row: row.clone() });
        }
    }
    (rows, placed)
}

/// `svids` cut into the records of each batch row, in order: up to
/// [`ISSUED_PER_ROW`] a row and sled's row size (`row_sizes`; a record
/// larger than that is a row of its own).
fn row_chunks<'a>(svids: &'a [&'a pb::IssuedSvid]) -> Vec<&'a [&'a pb::IssuedSvid]> {
    // Each record is a length-delimited field of the row.
    let lens = svids.iter().map(|svid| prost::encoding::message::encoded_len(1, *svid));
    let mut rest = svids;
    let mut chunks = Vec::new();
    for n in row_sizes(lens, ISSUED_PER_ROW, 0) {
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// sled: record keys by owner (`owner_of`), and the row of each record
/// (each key held once, shared by both maps).
#[derive(Debug, Default)]
pub(super) struct IssuedIndex {
    by_owner: HashMap<String, HashSet<Arc<str>>>,
    rows: HashMap<Arc<str>, Arc<str>>,
}

impl IssuedIndex {
    /// The index of every record of `trees` (a store's dump, as its check
    /// at open read it) in `issued_svids`. Rows an older version kept in
    /// `issued_by_owner` are removed from `kv`: they only repeated the
    /// records, and nothing would keep them current.
    pub(super) fn load(kv: &dyn Kv, trees: &[Pairs]) -> Result<Self, StoreError> {
        let mut index = Self::default();
        for (row, bytes) in &trees[ISSUED] {
            let row_key: Arc<str> = Arc::from(String::from_utf8_lossy(row).as_ref());
            for svid in decode_row(row, bytes)? {
                let key = Arc::from(svid_key(&svid.serial, &svid.jti));
                index.add(&Placed { key, owner: owner_of(&svid), row: row_key.clone() });
            }
        }
        let stale: Vec<Op> = trees[ISSUED_BY_OWNER]
            .iter()
            .map(|(key, _)| Op::Delete(t(ISSUED_BY_OWNER), key.clone()))
            .collect();
        if !stale.is_empty() {
            kv.apply(stale)?;
            kv.flush()?;
        }
        Ok(index)
    }

    pub(super) fn add(&mut self, placed: &Placed) {
        // The owner's key is copied only for its first record.
        if let Some(keys) = self.by_owner.get_mut(&placed.owner) {
            keys.insert(placed.key.clone());
        } else {
            let mut keys = HashSet::default();
            keys.insert(placed.key.clone());
            self.by_owner.insert(placed.owner.clone(), keys);
        }
        self.rows.insert(placed.key.clone(), placed.row.clone());
    }

    pub(super) fn remove(&mut self, owner: &str, key: &str) {
        self.rows.remove(key);
        if let Some(keys) = self.by_owner.get_mut(owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }

    /// The record keys of `owner`'s SVIDs, with the row of each.
    pub(super) fn of_owner(&self, owner: &str) -> Vec<(String, Arc<str>)> {
        let keys = self.by_owner.get(owner).into_iter().flatten();
        keys.filter_map(|key| Some((key.to_string(), self.rows.get(key)?.clone()))).collect()
    }

    /// The row holding the record `key`.
    pub(super) fn row_of(&self, key: &str) -> Option<Arc<str>> {
        self.rows.get(key).cloned()
    }

    /// How many records are indexed.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }
}

/// The records `wanted` (key, row) read from their rows, each row read
/// once by `get`; a record whose row is gone or no longer holds it is
/// left out.
pub(super) fn read_records(
    wanted: &[(String, Arc<str>)],
    mut get: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Vec<pb::IssuedSvid>, StoreError> {
    let mut by_row: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (key, row) in wanted {
        by_row.entry(row).or_default().insert(key);
    }
    let mut out = Vec::new();
    for (row, keys) in by_row {
        let Some(bytes) = get(row.as_bytes())? else { continue };
        for svid in decode_row(row.as_bytes(), &bytes)? {
            if keys.contains(svid_key(&svid.serial, &svid.jti).as_str()) {
                out.push(svid);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svid(serial: &str, entry: &str) -> pb::IssuedSvid {
        pb::IssuedSvid { serial: serial.into(), entry_id: entry.into(), ..Default::default() }
    }

    #[test]
    fn a_batch_is_kept_in_rows_of_at_most_64_and_4_kib_and_every_record_is_found() {
        let svids: Vec<pb::IssuedSvid> = (0..130)
            .map(|i| svid(&format!("{i:04x}"), if i % 2 == 0 { "e1" } else { "e2" }))
            .collect();
        let refs: Vec<&pb::IssuedSvid> = svids.iter().collect();
        let (rows, placed) = rows_of(&refs, false);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].0, b"batch:0000");
        let mut index = IssuedIndex::default();
        placed.iter().for_each(|p| index.add(p));
        assert_eq!(index.len(), 130);
        let stored: HashMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        let e1 = read_records(&index.of_owner("e1"), |row| Ok(stored.get(row).cloned())).unwrap();
        assert_eq!(e1.len(), 65);
        assert!(e1.iter().all(|s| s.entry_id == "e1"));
        index.remove("e1", "0000");
        assert_eq!(index.of_owner("e1").len(), 64);
        assert!(index.row_of("0000").is_none());
        assert_eq!(index.row_of("0081").as_deref(), Some("batch:0080"));
        // A shared database: a row per record, under its own key.
        let (rows, placed) = rows_of(&refs[..2], true);
        assert_eq!(rows[1].0, b"0001");
        assert_eq!(&*placed[1].row, "0001");
        assert_eq!(decode_row(&rows[1].0, &rows[1].1).unwrap(), [svids[1].clone()]);
        // Larger records: rows stop at sled's row size, and every record
        // is kept, in order.
        let big: Vec<pb::IssuedSvid> = (0..100)
            .map(|i| pb::IssuedSvid { agent_id: "a".repeat(300), ..svid(&format!("{i:04x}"), "e") })
            .collect();
        let refs: Vec<&pb::IssuedSvid> = big.iter().collect();
        let (rows, _) = rows_of(&refs, false);
        assert!(
            rows.len() > 2 && rows.iter().all(|(_, v)| v.len() <= crate::store::sled::ROW_BYTES),
            "{}",
            rows.len()
        );
        let back: Vec<_> = rows.iter().flat_map(|(k, v)| decode_row(k, v).unwrap()).collect();
        assert_eq!(back, big);
    }

    #[test]
    fn an_owner_with_no_svids_left_is_forgotten() {
        let mut index = IssuedIndex::default();
        for (owner, key) in [("e1", "s1"), ("e1", "s2"), ("agent:a", "s3")] {
            index.add(&Placed { key: Arc::from(key), owner: owner.into(), row: Arc::from(key) });
        }
        index.remove("e1", "s1");
        index.remove("e1", "s2");
        index.remove("e1", "nothing");
        assert!(index.of_owner("e1").is_empty());
        assert!(!index.by_owner.contains_key("e1"));
        assert_eq!(index.len(), 1);
    }
}
