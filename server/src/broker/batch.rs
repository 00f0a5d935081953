//! The broker's group commit: access tokens decided at the same time are
//! recorded in one commit (each with its own checks and its own event),
//! so that many callers share one durable write instead of queueing for
//! one each. A caller waits for its token's outcome; nothing is answered
//! before its record is durable. No thread of its own: the caller that
//! finds no commit under way leads.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};

use tessera_proto::types as pb;

use super::error::BrokerError;
use super::records::{BrokerRefusal, TokenToRecord};
use crate::store::{Audit, Store};

/// Most tokens in one commit.
pub const MAX_BATCH: usize = 256;

/// What a waiting caller gets back.
type Outcome = Result<Result<(), BrokerRefusal>, BrokerError>;

struct Job {
    token: TokenToRecord,
    event: pb::Event,
    done: SyncSender<Outcome>,
}

/// The group commit: the first caller to find no commit under way
/// becomes the leader and records its token and everything queued behind
/// it, commit after commit, until the queue is empty; the others wait for
/// their outcome. A lone caller commits at once, on its own thread.
pub struct TokenWriter {
    store: Arc<dyn Store>,
    /// Whether a leader is committing, and the jobs waiting for it.
    queue: Mutex<(bool, Vec<Job>)>,
}

impl std::fmt::Debug for TokenWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenWriter").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("jti", &self.token.token.jti).finish_non_exhaustive()
    }
}

impl TokenWriter {
    /// A writer on `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, queue: Mutex::new((false, Vec::new())) }
    }

    /// Records `token` with its allow `event`, in the next commit; returns
    /// once it is durable (or refused). Blocking.
    pub fn record(&self, token: TokenToRecord, event: pb::Event) -> Outcome {
        let (done, outcome) = mpsc::sync_channel(1);
        let lead = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.1.push(Job { token, event, done });
            !std::mem::replace(&mut queue.0, true)
        };
        if lead {
            // Should a commit panic, the next caller leads (the waiters of
            // the lost batch get an error, not a hang).
            let _unlead = Unlead(&self.queue);
            loop {
                let batch: Vec<Job> = {
                    let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    if queue.1.is_empty() {
                        queue.0 = false;
                        break;
                    }
                    let n = queue.1.len().min(MAX_BATCH);
                    queue.1.drain(..n).collect()
                };
                commit(self.store.as_ref(), batch);
            }
        }
        outcome.recv().map_err(|_| BrokerError::Internal("the token's commit was lost".into()))?
    }
}

/// Clears the leader's flag if it unwinds.
struct Unlead<'a>(&'a Mutex<(bool, Vec<Job>)>);

impl Drop for Unlead<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).0 = false;
        }
    }
}

/// Records `batch` in one commit and answers each caller.
fn commit(store: &dyn Store, batch: Vec<Job>) {
    let tokens: Vec<TokenToRecord> = batch.iter().map(|j| j.token.clone()).collect();
    let events: Vec<pb::Event> = batch.iter().map(|j| j.event.clone()).collect();
    // Each token's event if (and only if) it was recorded.
    let audit = Audit::new(None, move |results: &Vec<Result<(), BrokerRefusal>>| {
        events.iter().zip(results).filter(|(_, r)| r.is_ok()).map(|(e, _)| e.clone()).collect()
    });
    match store.record_access_tokens(&tokens, &audit) {
        Ok(results) => {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.done.send(Ok(result));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "recording access tokens failed");
            for job in batch {
                let _ = job.done.send(Err(BrokerError::Internal(format!("store: {e}"))));
            }
        }
    }
}
