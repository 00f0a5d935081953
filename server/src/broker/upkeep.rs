//! The broker's periodic work: tasks that reached their expiry are ended
//! (each in one commit with its `broker.task.expire` event; introspection
//! already treats them as ended from the second they expire), held
//! requests and unused approvals that lapsed are dropped with a
//! `broker.request.expire` event, old token records are pruned, the
//! signing key rotates, and every server's keys are re-read.

use std::sync::Arc;
use std::time::Duration;

use tessera_common::event_schema::{self, kind, EventExt};
use tessera_proto::types as pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::records::PendingRequest;
use super::Broker;
use crate::store::Audit;

/// How often the broker's upkeep runs.
pub const EVERY: Duration = Duration::from_secs(1);

impl Broker {
    /// Runs the upkeep until `shutdown`.
    pub async fn upkeep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks: u64 = 0;
        loop {
            let broker = self.clone();
            let keys_too = ticks.is_multiple_of(5);
            let done = tokio::task::spawn_blocking(move || broker.upkeep_once(keys_too)).await;
            if let Ok(Err(e)) = done {
                warn!(error = %e, "broker upkeep failed; retrying");
            }
            ticks += 1;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    /// One round of upkeep (blocking).
    pub fn upkeep_once(&self, keys_too: bool) -> Result<(), super::BrokerError> {
        let now = self.now();
        let store = self.state.store().as_ref();
        for id in store.expired_tasks(now)? {
            let mut event = event_schema::event(kind::BROKER_TASK_EXPIRE, "").attr("task", &id);
            event.reason =
                "the task reached its expiry: every token issued under it is revoked".into();
            let ended = store.end_task(&id, now, "expired", &Audit::if_ok(None, vec![event]))?;
            if ended.is_ok() {
                info!(task = %id, "task expired: its tokens are revoked");
            }
        }
        let describe = |lapsed: &Vec<PendingRequest>| -> Vec<pb::Event> {
            lapsed
                .iter()
                .map(|r| {
                    let mut e = r
                        .event(kind::BROKER_REQUEST_EXPIRE, event_schema::DENY)
                        .code("expired_token");
                    e.reason = format!("request {:?} lapsed unanswered or unused", r.state);
                    e
                })
                .collect()
        };
        store.expire_requests(now, &Audit::new(None, describe))?;
        store.prune_access_tokens(now)?;
        if keys_too {
            if self.keys.rotate_if_due(now)? {
                info!("broker signing key rotated");
            }
            store.publish_broker_keys(self.state.server_id(), &self.keys.own()?)?;
            self.refresh_keys()?;
        }
        Ok(())
    }

    /// Reads every server's published signing keys from the store: for
    /// the JWKS, and to verify tokens other servers signed (blocking).
    pub(super) fn refresh_keys(&self) -> Result<(), super::BrokerError> {
        self.keys.set_published(self.state.store().broker_keys()?, self.now());
        Ok(())
    }
}
