//! The thread that stores agents' pushed events, at a lower CPU priority
//! than the threads that answer requests: when both want the CPU, a
//! workload's fetch or an agent's signing goes first and the push waits a
//! little (its events are already durable in the agent's spool, and the
//! agent is answered only once they are stored here). The kernel still
//! gives the thread its share, so ingestion is slowed under load, never
//! stopped.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use crate::store::StoreError;

/// The nice value of the ingestion thread (0 is the default; 10 gets about
/// a tenth of the CPU a thread at 0 gets when both are runnable).
pub const INGEST_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs one at a time on the ingestion thread.
#[derive(Debug)]
pub(super) struct Background {
    jobs: Option<mpsc::Sender<Job>>,
}

impl Background {
    /// Starts the thread (it ends when this is dropped). If no thread can
    /// be started, jobs run on the runtime's blocking pool instead.
    pub(super) fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("event-ingest".into()).spawn(move || {
            tessera_common::cli_support::lower_this_thread_priority(INGEST_NICE);
            while let Ok(job) = rx.recv() {
                // A job that panics has dropped its answer: its caller sees
                // the failure; the thread goes on with the next.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        });
        Self { jobs: spawned.ok().map(|_| tx) }
    }

    /// Queues `work` on the ingestion thread, after the jobs already
    /// queued, without waiting for it (runs it here if there is no thread).
    pub(super) fn spawn(&self, work: impl FnOnce() + Send + 'static) {
        match &self.jobs {
            Some(jobs) => {
                if let Err(mpsc::SendError(job)) = jobs.send(Box::new(work)) {
                    job();
                }
            }
            None => work(),
        }
    }

    /// Runs `work` on the ingestion thread and returns what it returned.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let failed = |why: &str| StoreError::Io(format!("event ingestion task failed: {why}"));
        let Some(jobs) = &self.jobs else {
            return tokio::task::spawn_blocking(work).await.map_err(|e| failed(&e.to_string()));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        jobs.send(Box::new(move || {
            let _ = tx.send(work());
        }))
        .map_err(|_| failed("the ingestion thread has stopped"))?;
        rx.await.map_err(|_| failed("it panicked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs run on a thread at the ingestion priority, one at a time; one
    /// that panics fails alone and the thread goes on.
    #[tokio::test]
    async fn jobs_run_below_the_request_priority_and_survive_a_panic() {
        let nice_here = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        // The test may itself run under `nice`: the thread is lowered to
        // INGEST_NICE, or left where it already is if that is lower.
        let before = nice_here().unwrap();
        let background = Background::start();
        let nice = background.run(nice_here).await.unwrap().unwrap();
        assert_eq!(nice, before.max(INGEST_NICE));
        assert_eq!(nice_here().unwrap(), before, "only the ingestion thread is lowered");
        let failed = background.run(|| panic!("a bad job")).await;
        assert!(failed.is_err());
        assert_eq!(background.run(|| 7).await.unwrap(), 7);
    }
}
