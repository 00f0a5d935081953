//! The open Sync streams' callers, for the re-check that runs once per
//! [`SYNC_RECHECK`] (`sync.rs::run_rechecks`): one task reads the records
//! of all the agents whose streams are open, a thousand per store call,
//! and tells each stream whose caller may no longer sync (renewed past,
//! expired; bans, evictions and revocations also arrive through the
//! change log). A round whose store read fails tries again at the next;
//! the streams it could not check twice in a row end with the store's
//! error, as each stream's own check ended it before (one failed query
//! does not disconnect a thousand agents at once); a record that cannot be
//! decoded ends only its own stream. One read per thousand streams instead
//! of one per stream:
//! with 10,000 agents on PostgreSQL the per-stream checks were 4,000 round
//! trips a second sharing the pool with the commits. Every stream is
//! checked on every round, however busy (a per-stream timer restarted on
//! each change sent never fired for an agent whose entries changed more
//! often than the interval).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tonic::Status;

/// How often every open Sync stream's caller is checked against the store.
pub const SYNC_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Callers per store call of a round.
pub(super) const RECHECK_CHUNK: usize = 1_000;

/// The open streams' callers (`C`), and the verdicts sent to them.
#[derive(Debug)]
pub(super) struct Rechecks<C> {
    streams: Mutex<HashMap<u64, Watched<C>>>,
    next_id: AtomicU64,
    running: AtomicBool,
}

impl<C> Default for Rechecks<C> {
    fn default() -> Self {
        Self {
            streams: Mutex::default(),
            next_id: AtomicU64::new(0),
            running: AtomicBool::new(false),
        }
    }
}

#[derive(Debug)]
struct Watched<C> {
    caller: C,
    /// `Some` once the caller may no longer sync: why.
    verdict: watch::Sender<Option<Status>>,
}

/// One stream's registration; dropping it ends its checks.
#[derive(Debug)]
pub(super) struct Recheck<C> {
    id: u64,
    verdict: watch::Receiver<Option<Status>>,
    rechecks: Arc<Rechecks<C>>,
}

impl<C> Recheck<C> {
    /// The refusal, if a round found the caller may no longer sync.
    pub(super) fn verdict(&self) -> Option<Status> {
        self.verdict.borrow().clone()
    }

    /// Resolves with the refusal once a round finds the caller may no
    /// longer sync; never resolves otherwise.
    pub(super) async fn refused(&mut self) -> Status {
        loop {
            if let Some(status) = self.verdict.borrow_and_update().clone() {
                return status;
            }
            if self.verdict.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl<C> Drop for Recheck<C> {
    fn drop(&mut self) {
        self.rechecks.streams.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl<C: Clone> Rechecks<C> {
    /// Registers `caller`; `start` is true for the first registration
    /// ever (whoever gets it starts the task that runs the rounds).
    pub(super) fn register(self: &Arc<Self>, caller: &C) -> (Recheck<C>, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (verdict, receiver) = watch::channel(None);
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Watched { caller: caller.clone(), verdict });
        let start = !self.running.swap(true, Ordering::AcqRel);
        (Recheck { id, verdict: receiver, rechecks: self.clone() }, start)
    }

    /// Held by the task that runs the rounds: when it ends (shutdown, or
    /// a panic), the next registration starts another.
    pub(super) fn running(self: &Arc<Self>) -> Running<C> {
        Running(self.clone())
    }

    /// Every registered caller, for a round.
    pub(super) fn snapshot(&self) -> Vec<(u64, C)> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.iter().map(|(id, w)| (*id, w.caller.clone())).collect()
    }

    /// Tells stream `id` (if still open) why its caller may no longer sync.
    pub(super) fn refuse(&self, id: u64, status: Status) {
        if let Some(watched) = self.streams.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            watched.verdict.send_replace(Some(status));
        }
    }
}

/// See [`Rechecks::running`].
pub(super) struct Running<C>(Arc<Rechecks<C>>);

impl<C> Drop for Running<C> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_reaches_its_stream_only_and_a_dropped_stream_is_forgotten() {
        let rechecks = Arc::new(Rechecks::default());
        let (mut a, first) = rechecks.register(&"a");
        let (b, second) = rechecks.register(&"b");
        assert!(first && !second, "the task is started once");
        let ids: HashMap<&str, u64> =
            rechecks.snapshot().into_iter().map(|(i, c)| (c, i)).collect();
        rechecks.refuse(ids["a"], Status::permission_denied("superseded"));
        assert_eq!(a.refused().await.message(), "superseded");
        assert!(a.verdict().is_some() && b.verdict().is_none());
        drop(b);
        assert_eq!(rechecks.snapshot().len(), 1, "b's registration ended with it");
        // A refusal for a stream that is gone is dropped.
        rechecks.refuse(ids["b"], Status::permission_denied("late"));
        // A task that ended (shut down, or panicked) is started again.
        drop(rechecks.running());
        let (_c, again) = rechecks.register(&"c");
        assert!(again, "the next registration restarts the task");
    }
}
