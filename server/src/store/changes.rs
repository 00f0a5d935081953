//! The change log Sync streams read: its records in revision order, the
//! latest revision and its watch, and bundle changes.

use tokio::sync::watch;

use super::audit::Audit;
use super::error::StoreError;
use super::kv_store::KvStore;
use super::layout::{read_u64, t, CHANGES, META, REVISION_KEY};
use super::{Change, ChangeKind};

impl KvStore {
    pub(super) fn changes_since(
        &self,
        revision: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let start = revision.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for (key, bytes) in self.kv.range(t(CHANGES), &start, None, limit, false)? {
            let change: Change =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    key: format!("change {}", read_u64(Some(&key))),
                    reason: e.to_string(),
                })?;
            // Revisions are assigned under the store's lock and become
            // visible in order, so the log has no holes; a hole would mean
            // a reader skipping a change, so stop before it and read again.
            let expected = out.last().map_or(revision + 1, |c: &Change| c.revision + 1);
            if change.revision != expected {
                tracing::warn!(
                    expected,
                    found = change.revision,
                    "change log read has a hole; reading again later"
                );
                break;
            }
            out.push(change);
        }
        Ok(out)
    }

    pub(super) fn revision(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.kv.get(t(META), REVISION_KEY)?.as_deref()))
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub(super) fn log_bundle_change(&self, audit: &Audit<'_, u64>) -> Result<u64, StoreError> {
        self.commit(audit, |tx| tx.log(ChangeKind::Bundle))
    }
}
