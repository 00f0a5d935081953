//! The broker's group commit: access tokens decided at the same time are
//! recorded in one commit (each with its own checks and its own event),
//! so that many callers share one durable write instead of queueing for
//! one each. A caller waits for its token's outcome; nothing is answered
//! before its record is durable.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

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

/// The writer: one thread that records queued tokens in batches.
#[derive(Debug)]
pub struct TokenWriter {
    queue: SyncSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("jti", &self.token.token.jti).finish_non_exhaustive()
    }
}

impl TokenWriter {
    /// Starts the writer thread on `store`.
    pub fn start(store: Arc<dyn Store>) -> Result<Self, BrokerError> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(4 * MAX_BATCH);
        std::thread::Builder::new()
            .name("broker-tokens".into())
            .spawn(move || write_loop(store.as_ref(), &jobs))
            .map_err(|e| BrokerError::Internal(format!("cannot start the token writer: {e}")))?;
        Ok(Self { queue })
    }

    /// Records `token` with its allow `event`, in the next commit; waits
    /// until it is durable (or refused).
    pub fn record(&self, token: TokenToRecord, event: pb::Event) -> Outcome {
        let (done, outcome) = mpsc::sync_channel(1);
        self.queue
            .send(Job { token, event, done })
            .map_err(|_| BrokerError::Internal("the token writer has stopped".into()))?;
        outcome.recv().map_err(|_| BrokerError::Internal("the token writer has stopped".into()))?
    }
}

/// Takes what is queued (up to [`MAX_BATCH`]), records it in one commit,
/// answers each caller; until every sender is gone.
fn write_loop(store: &dyn Store, jobs: &Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
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
}
