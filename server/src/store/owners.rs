//! On sled, which issued SVIDs belong to each entry or agent, in memory:
//! the records themselves (`issued_svids`) are the durable truth, and this
//! index is rebuilt from them at open. A shared database (PostgreSQL)
//! keeps the index as rows (`issued_by_owner`) instead, since another
//! server's commit must find what this one issued.
//!
//! Why: on sled, one more row per issued SVID cost about a tenth of the
//! server's CPU under issuance (`tessera-bench issue`, `jwt`), and the
//! row only repeats what the record says.

use std::collections::{BTreeSet, HashMap};

use tessera_proto::types as pb;

use super::error::StoreError;
use super::kv::{scan_prefix, Kv, Op};
use super::layout::{decode, owner_of, svid_key, t, ISSUED, ISSUED_BY_OWNER};

/// Record keys (`svid_key`) by owner (`owner_of`).
#[derive(Debug, Default)]
pub(super) struct Owners {
    by_owner: HashMap<String, BTreeSet<String>>,
}

impl Owners {
    /// The index of every record in `kv`'s `issued_svids`. Rows an older
    /// version kept in `issued_by_owner` are removed: they only repeated
    /// the records, and nothing would keep them current.
    pub(super) fn load(kv: &dyn Kv) -> Result<Self, StoreError> {
        let mut owners = Self::default();
        for (key, bytes) in scan_prefix(kv, t(ISSUED), b"")? {
            let svid: pb::IssuedSvid = decode(&key, &bytes)?;
            owners.add(owner_of(&svid), svid_key(&svid.serial, &svid.jti));
        }
        let stale: Vec<Op> = scan_prefix(kv, t(ISSUED_BY_OWNER), b"")?
            .into_iter()
            .map(|(key, _)| Op::Delete(t(ISSUED_BY_OWNER), key))
            .collect();
        if !stale.is_empty() {
            kv.apply(stale)?;
            kv.flush()?;
        }
        Ok(owners)
    }

    pub(super) fn add(&mut self, owner: String, key: String) {
        self.by_owner.entry(owner).or_default().insert(key);
    }

    pub(super) fn remove(&mut self, owner: &str, key: &str) {
        if let Some(keys) = self.by_owner.get_mut(owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }

    /// The record keys of `owner`'s SVIDs.
    pub(super) fn keys(&self, owner: &str) -> impl Iterator<Item = &String> {
        self.by_owner.get(owner).into_iter().flatten()
    }

    /// How many records are indexed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_owner.values().map(BTreeSet::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_with_no_svids_left_is_forgotten() {
        let mut owners = Owners::default();
        owners.add("e1".into(), "s1".into());
        owners.add("e1".into(), "s2".into());
        owners.add("agent:a".into(), "s3".into());
        assert_eq!(owners.keys("e1").collect::<Vec<_>>(), ["s1", "s2"]);
        owners.remove("e1", "s1");
        owners.remove("e1", "s2");
        owners.remove("e1", "nothing");
        assert_eq!(owners.keys("e1").count(), 0);
        assert!(!owners.by_owner.contains_key("e1"));
        assert_eq!(owners.len(), 1);
    }
}
