//! The change log Sync streams read: its records in revision order, the
//! latest revision and its watch, bundle changes, and the trimming that
//! keeps the log to its newest changes.
//!
//! A commit's changes are one row, keyed by the last one's revision: one
//! change as a JSON object (as every row was before), several as a JSON
//! array in revision order. A read from revision `r` starts at the first
//! row keyed past `r` (the one holding `r + 1`) and skips what that row
//! holds up to `r`, reading a row first and then as many rows as those
//! read so far say the rest takes (a row may hold a whole batch). Bulk
//! entry creation logs a change per entry; a row per change was a quarter
//! of the rows such a commit wrote.

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
    decoded.map_err(|e| corrupt(&format!("change {}", read_u64(Some(key))), e))
}

/// Adds `changes` (a row's, in order) past `revision` to `out`; true
/// once `out` holds `limit`, or at a hole (revisions are assigned under
/// the store's lock and become visible in order, so the log has none; a
/// hole would mean a reader skipping a change, so it stops before it and
/// reads again later). A hole at the start of the read, before the log's
/// start (`start`), is the log trimmed past `revision`.
fn take_changes(
    changes: Vec<Change>,
    revision: u64,
    limit: usize,
    out: &mut Vec<Change>,
    start: impl Fn() -> Result<u64, StoreError>,
) -> Result<bool, StoreError> {
    for change in changes {
        if change.revision <= revision {
            continue; // the first row's changes up to `revision`
        }
        let expected = out.last().map_or(revision + 1, |c: &Change| c.revision + 1);
        if change.revision != expected {
            if out.is_empty() {
                let start = start()?;
                if expected < start {
                    return Err(StoreError::ChangesTrimmed { asked: revision, start });
                }
            }
            tracing::warn!(
                expected,
                found = change.revision,
                "change log read has a hole; reading again later"
            );
            return Ok(true);
        }
        out.push(change);
        if out.len() == limit {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Changes deleted by one trimming commit.
const TRIM_CHUNK: u64 = 10_000;

impl KvStore {
    pub(super) fn changes_since(
        &self,
        revision: u64,
        limit: usize,
    ) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        let mut from = revision.saturating_add(1);
        // A row holds one change or a whole batch's: read one row, then as
        // many as the rows read so far say the rest of `limit` takes.
        let (mut want, mut rows_read, mut decoded) = (limit.min(1), 0, 0);
        'reads: while want > 0 {
            let rows = self.kv.range(t(CHANGES), &from.to_be_bytes(), None, want, false)?;
            let Some((last, _)) = rows.last() else { break };
            from = read_u64(Some(last)).saturating_add(1);
            let read = rows.len();
            for (key, bytes) in rows {
                let changes = decode_change_row(&key, &bytes)?;
                decoded += changes.len();
                if take_changes(changes, revision, limit, &mut out, || self.changes_start())? {
                    break 'reads;
                }
            }
            if read < want {
                break;
            }
            rows_read += read;
            want = (limit - out.len()).div_ceil(decoded.div_ceil(rows_read).max(1));
        }
        Ok(out)
    }

    /// The log's start (1 until it is first trimmed): every change from it
    /// on is held.
    pub(super) fn changes_start(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.kv.get(t(META), CHANGES_START_KEY)?.as_deref()).max(1))
    }

    /// Deletes the changes older than the newest `keep` (at least one is
    /// kept) once more than `keep + slack` are held, at most
    /// [`TRIM_CHUNK`] of them per call; returns how far the log's start
    /// moved. A row is deleted by its key, its last change's revision: a
    /// row that also holds changes past the new start stays whole until a
    /// later trim. Start and
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
        self.commit(audit, |tx| Ok(tx.log(ChangeKind::Bundle)))
    }
}
