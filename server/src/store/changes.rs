//! The change log Sync streams read: its records in revision order, the
//! latest revision and its watch, bundle changes, and the trimming that
//! keeps the log to its newest changes.
//!
//! A commit's changes are one row, keyed by the last one's revision: one
//! change as a JSON object (as every row was before), several as a JSON
//! array in revision order. A read from revision `r` starts at the first
//! row keyed past `r` (the one holding `r + 1`) and skips what that row
//! holds up to `r`. Bulk entry creation logs a change per entry; a row per
//! change was a fifth of what such a commit wrote.

use tokio::sync::watch;

use super::audit::Audit;
use super::error::StoreError;
use super::kv_store::KvStore;
use super::layout::{corrupt, read_u64, t, CHANGES, CHANGES_START_KEY, META, REVISION_KEY};
use super::{Change, ChangeKind};

/// The change log row of one commit's `changes` (at least one; see the
/// module doc).
pub(super) fn change_row(changes: &[Change]) -> Result<Vec<u8>, StoreError> {
    match changes {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    }
    .map_err(|e| corrupt("change", e))
}

/// The changes of the row under `key`, in revision order.
pub(super) fn decode_change_row(key: &[u8], bytes: &[u8]) -> Result<Vec<Change>, StoreError> {
    let decoded = if bytes.first() == Some(&b'[') {
        serde_json::from_slice(bytes)
    } else {
        serde_json::from_slice(bytes).map(|one| vec![one])
    };
    decoded.map_err(|e| StoreError::Corrupt {
        key: format!("change {}", read_u64(Some(key))),
        reason: e.to_string(),
    })
}

/// Changes deleted by one trimming commit.
const TRIM_CHUNK: u64 = 10_000;

impl KvStore {
    pub(super) fn changes_since(
        &self,
        revision: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let start = revision.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        // A row holds at least one change: `limit` rows hold enough.
        'rows: for (key, bytes) in self.kv.range(t(CHANGES), &start, None, limit, false)? {
            for change in decode_change_row(&key, &bytes)? {
                if change.revision <= revision {
                    continue; // the first row's changes up to `revision`
                }
                // Revisions are assigned under the store's lock and become
                // visible in order, so the log has no holes; a hole would
                // mean a reader skipping a change, so stop before it and
                // read again.
                let expected = out.last().map_or(revision + 1, |c: &Change| c.revision + 1);
                if change.revision != expected {
                    if out.is_empty() {
                        let start = self.changes_start()?;
                        if expected < start {
                            return Err(StoreError::ChangesTrimmed { asked: revision, start });
                        }
                    }
                    tracing::warn!(
                        expected,
                        found = change.revision,
                        "change log read has a hole; reading again later"
                    );
                    break 'rows;
                }
                out.push(change);
                if out.len() == limit {
                    break 'rows;
                }
            }
        }
        Ok(out)
    }

    /// The oldest revision the log holds (1 until it is first trimmed).
    pub(super) fn changes_start(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.kv.get(t(META), CHANGES_START_KEY)?.as_deref()).max(1))
    }

    /// Deletes the changes older than the newest `keep` (at least one is
    /// kept) once more than `keep + slack` are held, at most
    /// [`TRIM_CHUNK`] of them per call; returns how many. A row is deleted
    /// by its key, its last change's revision: a row that also holds
    /// changes past the new start stays whole until a later trim. Start and
    /// revision are read again inside the commit: servers sharing a
    /// datastore may trim at once, and the start never moves back.
    pub(super) fn trim_changes(&self, keep: u64, slack: u64) -> Result<u64, StoreError> {
        let revision = self.revision()?;
        if revision.saturating_sub(self.changes_start()?) < keep.saturating_add(slack) {
            return Ok(0); // not enough to trim: no commit
        }
        self.commit(&Audit::quiet(), |tx| {
            let start = read_u64(tx.get(META, CHANGES_START_KEY)?.as_deref()).max(1);
            let revision = read_u64(tx.get(META, REVISION_KEY)?.as_deref());
            let new_start = revision.saturating_sub(keep.max(1)) + 1;
            if new_start <= start {
                return Ok(0);
            }
            let upto = new_start.min(start + TRIM_CHUNK);
            for r in start..upto {
                tx.forget(CHANGES, r.to_be_bytes());
            }
            tx.put(META, CHANGES_START_KEY, upto.to_be_bytes());
            Ok(upto - start)
        })
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
