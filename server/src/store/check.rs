//! The integrity check: every record decodes (the broker's JSON ones too),
//! the indexes match the entries, and the change log ends at the revision.

use tessera_proto::types as pb;

use super::error::StoreError;
use super::issued_index::decode_row;
use super::kv::Pairs;
use super::kv_store::KvStore;
use super::layout::{
    decode, decode_entry, decode_json, parent_key, read_u64, AGENTS, BROKER_KEYS, BROKER_REQUESTS,
    BROKER_TASKS, BROKER_TOKENS, BY_EXPIRY, BY_IDENTITY, BY_PARENT, CHANGES, ENTRIES, ISSUED, META,
    REVISION_KEY, REVOCATIONS, WRITE_SEQ_KEY,
};
use super::StoreReport;
use crate::broker::records::{AccessToken, PendingRequest, PublishedKey, Task};

impl KvStore {
    pub(super) fn check(&self) -> Result<StoreReport, StoreError> {
        Ok(self.check_dump()?.0)
    }

    /// The check, and the dump it read (opening a store builds from it).
    pub(super) fn check_dump(&self) -> Result<(StoreReport, Vec<Pairs>), StoreError> {
        let trees = self.dump()?;
        Ok((verify_records(&trees)?, trees))
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
    let mut issued = 0;
    for (key, bytes) in &trees[ISSUED] {
        issued += decode_row(key, bytes)?.len();
    }
    for (key, bytes) in &trees[REVOCATIONS] {
        decode::<pb::Revocation>(key, bytes)?;
    }
    check_broker_records(trees, &corrupt)?;
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
        issued,
        revocations: trees[REVOCATIONS].len(),
    })
}

/// Every broker record decodes and is stored under its own ID.
fn check_broker_records(
    trees: &[Pairs],
    corrupt: &dyn Fn(&[u8], &str) -> StoreError,
) -> Result<(), StoreError> {
    let under_own = |key: &[u8], id: &str| {
        if key == id.as_bytes() {
            Ok(())
        } else {
            Err(corrupt(key, "stored under another record's ID"))
        }
    };
    for (key, bytes) in &trees[BROKER_TASKS] {
        under_own(key, &decode_json::<Task>(key, bytes)?.id)?;
    }
    for (key, bytes) in &trees[BROKER_TOKENS] {
        under_own(key, &decode_json::<AccessToken>(key, bytes)?.jti)?;
    }
    for (key, bytes) in &trees[BROKER_REQUESTS] {
        under_own(key, &decode_json::<PendingRequest>(key, bytes)?.id)?;
    }
    for (key, bytes) in &trees[BROKER_KEYS] {
        decode_json::<Vec<PublishedKey>>(key, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Audit;

    /// A store with two entries (one task-scoped), dumped.
    fn healthy() -> Vec<Pairs> {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path()).unwrap();
        let rules = crate::entry::EntryRules {
            trust_domain: tessera_workload_api::TrustDomain::new("example.org").unwrap(),
            default_ttl: 60,
            max_ttl: 600,
            default_jwt_ttl: 300,
            max_jwt_ttl: 600,
        };
        let entries: Vec<_> = [("a", 0), ("b", i64::MAX / 2)]
            .into_iter()
            .map(|(id, expires_at)| {
                let mut e = rules
                    .validate(
                        &pb::Entry {
                            spiffe_id: format!("spiffe://example.org/{id}"),
                            parent_id: "spiffe://example.org/agent".into(),
                            selectors: vec![pb::Selector {
                                r#type: "unix".into(),
                                value: "uid:1".into(),
                            }],
                            expires_at,
                            ..Default::default()
                        },
                        0,
                    )
                    .unwrap();
                e.id = id.into();
                e
            })
            .collect();
        store.create_entries(&entries, &Audit::quiet()).unwrap();
        store.dump().unwrap()
    }

    fn refusal(trees: &[Pairs]) -> String {
        match verify_records(trees) {
            Err(StoreError::Corrupt { key, reason }) => format!("{key}: {reason}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_healthy_store_checks_out() {
        let report = verify_records(&healthy()).unwrap();
        assert_eq!(report.entries, 2);
    }

    #[test]
    fn an_entry_under_another_id_is_refused() {
        let mut trees = healthy();
        let (_, value) = trees[ENTRIES][0].clone();
        trees[ENTRIES][0] = (b"zz".to_vec(), value);
        assert!(refusal(&trees).contains("stored under another entry's ID"));
    }

    #[test]
    fn an_entry_missing_from_an_index_is_refused() {
        let mut trees = healthy();
        trees[BY_PARENT].remove(0);
        assert!(refusal(&trees).contains("missing from the parent index"));
        let mut trees = healthy();
        for (_, id) in trees[BY_IDENTITY].iter_mut() {
            *id = b"someone-else".to_vec();
        }
        assert!(refusal(&trees).contains("missing from the identity index"));
    }

    #[test]
    fn an_index_with_records_no_entry_has_is_refused() {
        for (tree, what) in
            [(BY_PARENT, "parent index"), (BY_IDENTITY, "identity index"), (BY_EXPIRY, "expiry")]
        {
            let mut trees = healthy();
            trees[tree].push((b"\xffstray".to_vec(), Vec::new()));
            let why = refusal(&trees);
            assert!(why.contains(what) && why.contains("records for"), "{what}: {why}");
        }
    }

    #[test]
    fn a_change_log_that_does_not_end_at_the_revision_is_refused() {
        let mut trees = healthy();
        let (_, value) = trees[CHANGES].last().unwrap().clone();
        trees[CHANGES].push((99u64.to_be_bytes().to_vec(), value));
        assert!(refusal(&trees).contains("change log: ends at 99"));
        // The healthy store's one commit logged both entries in one row.
        let mut trees = healthy();
        trees[CHANGES].last_mut().unwrap().0 = 1u64.to_be_bytes().to_vec();
        assert!(refusal(&trees).contains("change log: ends at 1 but the revision is 2"));
    }
}
