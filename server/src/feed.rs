//! The change feed: one task per server tails the store's change log,
//! decodes each change once and keeps a window of the most recent ones that
//! every Sync stream reads from. The log stays the truth: a stream whose
//! revision is older than the window reads the store directly, and the
//! feed only ever holds a contiguous run of the log.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::entry::Entry;
use crate::store::{Change, ChangeKind, Store};

/// Changes kept in memory for streams to read.
pub const FEED_WINDOW: usize = 50_000;

/// Changes read from the store at a time.
const READ_PAGE: usize = 5_000;

/// Called with each batch of changes the feed reads, before streams see them.
pub type ChangeHook = Arc<dyn Fn(&dyn Store, &[Change]) + Send + Sync>;

/// A change as the feed holds it, with what streams need of it read once
/// for all of them.
#[derive(Debug)]
pub struct FedChange {
    /// The change.
    pub change: Change,
    /// For an entry change, the entry as read right after the feed read the
    /// change (`Some(None)`: gone by then); `None` when not read, and a
    /// stream reads it itself. Either is at least as new as the change,
    /// and any later change follows in the log.
    pub entry: Option<Option<Entry>>,
    /// When the feed took the change in (`None` for one a stream read from
    /// the store itself): push latency is counted from here. The entry
    /// read began then and saw every commit made before; a stream uses it
    /// only if it began after the stream opened and after the stream's own
    /// last read of the store, so that nothing it sends is older than what
    /// it (or, before a failover, another server) sent before.
    pub read_at: Option<std::time::Instant>,
}

impl FedChange {
    /// A change a stream read from the store; it reads the entry itself.
    pub fn bare(change: Change) -> Self {
        Self { change, entry: None, read_at: None }
    }
}

/// Recent changes of the log, shared by every Sync stream.
#[derive(Debug)]
pub struct ChangeFeed {
    /// Contiguous revisions, oldest first.
    window: RwLock<VecDeque<Arc<FedChange>>>,
    /// The last revision in the window (or the store's at start).
    latest: watch::Sender<u64>,
    /// The CRLs in force as of at least `latest`, read once for all streams.
    crls: RwLock<Arc<Vec<Vec<u8>>>>,
    /// Why the last read of the store failed; `None` once a read succeeds.
    store_error: RwLock<Option<String>>,
}

impl ChangeFeed {
    /// An empty feed starting after `revision`, with the CRLs then in force.
    pub fn new(revision: u64, crls: Vec<Vec<u8>>) -> Self {
        Self {
            window: RwLock::new(VecDeque::new()),
            latest: watch::channel(revision).0,
            crls: RwLock::new(Arc::new(crls)),
            store_error: RwLock::new(None),
        }
    }

    /// Why the feed's last read of the store failed, if it did (a shared
    /// datastore is read at least every second, so this is current).
    pub fn store_error(&self) -> Option<String> {
        self.store_error.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_store_error(&self, error: Option<String>) {
        *self.store_error.write().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The CRLs in force, at least as new as every change the feed holds.
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.crls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wakes whenever the feed holds newer changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Up to `limit` changes after `revision`, if the window covers them;
    /// `None` when the stream must read the store.
    pub fn since(&self, revision: u64, limit: usize) -> Option<Vec<Arc<FedChange>>> {
        let window = self.window.read().unwrap_or_else(|e| e.into_inner());
        let latest = *self.latest.borrow();
        if revision >= latest {
            return Some(Vec::new());
        }
        let first = window.front()?.change.revision;
        if revision + 1 < first {
            return None;
        }
        let skip = (revision + 1 - first) as usize;
        Some(window.iter().skip(skip).take(limit).cloned().collect())
    }

    /// Tails the store's log until `shutdown`. `on_changes` sees each batch
    /// of changes (on a blocking thread) before any stream does: the server
    /// takes in other servers' CAs and CRLs there.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
        on_changes: ChangeHook,
    ) {
        let mut wake = store.subscribe();
        loop {
            let after = *self.latest.borrow();
            let reader = store.clone();
            let read =
                tokio::task::spawn_blocking(move || reader.changes_since(after, READ_PAGE)).await;
            if matches!(read, Ok(Ok(_))) {
                self.set_store_error(None);
            }
            let changes = match read {
                // CRLs change only with a `Crls` change (a revoking commit
                // logs one too): read them once, before streams see it.
                Ok(Ok(changes)) if changes.iter().any(|c| matches!(c.kind, ChangeKind::Crls)) => {
                    let reader = store.clone();
                    match tokio::task::spawn_blocking(move || reader.crls()).await {
                        Ok(Ok(crls)) => {
                            *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(crls);
                            changes
                        }
                        _ => {
                            warn!("reading the CRLs failed; retrying");
                            Vec::new()
                        }
                    }
                }
                Ok(Ok(changes)) => changes,
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the change log failed; retrying");
                    self.set_store_error(Some(e.to_string()));
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "change log reader failed; retrying");
                    Vec::new()
                }
            };
            if !changes.is_empty() {
                let (hook, reader, batch) = (on_changes.clone(), store.clone(), changes.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || hook(&*reader, &batch)).await {
                    warn!(error = %e, "change hook failed");
                }
            }
            if let Some(last) = changes.last().map(|c| c.revision) {
                let fed = with_entries(&store, changes).await;
                let mut window = self.window.write().unwrap_or_else(|e| e.into_inner());
                window.extend(fed.into_iter().map(Arc::new));
                while window.len() > FEED_WINDOW {
                    window.pop_front();
                }
                drop(window);
                self.latest.send_replace(last);
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = wake.changed() => if changed.is_err() { return },
                // A failed read is retried without waiting for the next commit.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The changes, each entry change with its entry read now, all in one
/// read (one round trip to a network database, not one per stream).
async fn with_entries(store: &Arc<dyn Store>, changes: Vec<Change>) -> Vec<FedChange> {
    let ids: Vec<String> = changes
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::Entry { entry_id, .. } => Some(entry_id.clone()),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut current = std::collections::HashMap::new();
    let read_at = Some(std::time::Instant::now());
    if !ids.is_empty() {
        let reader = store.clone();
        match tokio::task::spawn_blocking(move || {
            let entries = reader.entries(&ids)?;
            Ok::<_, crate::store::StoreError>(ids.into_iter().zip(entries).collect())
        })
        .await
        {
            Ok(Ok(read)) => current = read,
            // The streams read the entries themselves.
            Ok(Err(e)) => warn!(error = %e, "reading changed entries failed"),
            Err(e) => warn!(error = %e, "entry reader failed"),
        }
    }
    changes
        .into_iter()
        .map(|change| {
            let entry = match &change.kind {
                ChangeKind::Entry { entry_id, .. } => current.get(entry_id).cloned(),
                _ => None,
            };
            FedChange { change, entry, read_at }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: u64) -> Arc<FedChange> {
        Arc::new(FedChange::bare(Change { revision, kind: ChangeKind::Bundle }))
    }

    #[test]
    fn the_window_answers_only_what_it_holds_contiguously() {
        let feed = ChangeFeed::new(10, Vec::new());
        assert_eq!(feed.since(10, 5).map(|c| c.len()), Some(0), "nothing newer yet");
        feed.window.write().unwrap().extend((11..=20).map(change));
        feed.latest.send_replace(20);
        let got: Vec<u64> = feed.since(12, 3).unwrap().iter().map(|c| c.change.revision).collect();
        assert_eq!(got, [13, 14, 15]);
        assert!(feed.since(9, 3).is_none(), "older than the window: read the store");
        assert_eq!(feed.since(20, 3).map(|c| c.len()), Some(0));
    }
}
