//! The integrity check: every record decodes, the indexes match the
//! entries, and the change log ends at the revision.

use tessera_proto::types as pb;

use super::error::StoreError;
use super::kv::Pairs;
use super::kv_store::KvStore;
use super::layout::{
    decode, decode_entry, parent_key, read_u64, AGENTS, BY_EXPIRY, BY_IDENTITY, BY_PARENT, CHANGES,
    ENTRIES, ISSUED, META, REVISION_KEY, REVOCATIONS, WRITE_SEQ_KEY,
};
use super::StoreReport;

impl KvStore {
    pub(super) fn check(&self) -> Result<StoreReport, StoreError> {
        verify_records(&self.dump()?)
    }
}

/// Decodes every record and checks that the indexes match the entries.
fn verify_records(trees: &[Pairs]) -> Result<StoreReport, StoreError> {
    let corrupt = |key: &[u8], reason: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.into(),
    };
    let by_parent: std::collections::HashSet<&[u8]> =
        trees[BY_PARENT].iter().map(|(k, _)| k.as_slice()).collect();
    let by_identity: std::collections::HashMap<&[u8], &[u8]> =
        trees[BY_IDENTITY].iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let mut entries = 0;
    let mut with_expiry = 0;
    for (key, bytes) in &trees[ENTRIES] {
        let entry = decode_entry(key, bytes)?;
        if entry.id.as_bytes() != key.as_slice() {
            return Err(corrupt(key, "stored under another entry's ID"));
        }
        if !by_parent.contains(parent_key(&entry.parent_id, &entry.id).as_slice()) {
            return Err(corrupt(key, "missing from the parent index"));
        }
        if by_identity.get(entry.identity_key().as_slice()) != Some(&key.as_slice()) {
            return Err(corrupt(key, "missing from the identity index"));
        }
        with_expiry += usize::from(entry.expires_at != 0);
        entries += 1;
    }
    for (tree, want, what) in [
        (BY_PARENT, entries, "parent index"),
        (BY_IDENTITY, entries, "identity index"),
        (BY_EXPIRY, with_expiry, "expiry index"),
    ] {
        let have = trees[tree].len();
        if have != want {
            return Err(corrupt(
                what.as_bytes(),
                &format!("has {have} records for {want} entries"),
            ));
        }
    }
    for (key, bytes) in &trees[AGENTS] {
        decode::<pb::Agent>(key, bytes)?;
    }
    for (key, bytes) in &trees[ISSUED] {
        decode::<pb::IssuedSvid>(key, bytes)?;
    }
    for (key, bytes) in &trees[REVOCATIONS] {
        decode::<pb::Revocation>(key, bytes)?;
    }
    let meta: std::collections::HashMap<&[u8], &[u8]> =
        trees[META].iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let revision = read_u64(meta.get(REVISION_KEY).copied());
    if let Some((key, _)) = trees[CHANGES].last() {
        if read_u64(Some(key)) != revision {
            return Err(corrupt(
                b"change log",
                &format!("ends at {} but the revision is {revision}", read_u64(Some(key))),
            ));
        }
    }
    Ok(StoreReport {
        revision,
        write_seq: read_u64(meta.get(WRITE_SEQ_KEY).copied()),
        entries,
        agents: trees[AGENTS].len(),
        issued: trees[ISSUED].len(),
        revocations: trees[REVOCATIONS].len(),
    })
}
