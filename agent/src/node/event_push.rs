//! The event pusher: sends the spooled events to the server in batches
//! (a few pushes a second) and has them acknowledged; fsyncs the spool.
//! Depends on `event_spool` and the link.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::node as pb;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::event_spool::{EventSpool, PUSH_BATCH, SYNC_INTERVAL};
use crate::node::link::NodeLink;
use crate::schedule::Backoff;

/// How long events gather before a push that is not full: a few pushes a
/// second instead of one per request keeps the stream's cost off the
/// Workload API's tail latency.
pub const PUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Fsyncs `spool` every [`SYNC_INTERVAL`] and pushes events to the
/// server, retrying with backoff while it is away.
pub async fn push_events(spool: Arc<EventSpool>, link: Arc<NodeLink>, shutdown: CancellationToken) {
    let syncer = spool.clone();
    let stop = shutdown.clone();
    let sync_task = tokio::spawn(async move {
        loop {
            let done = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(SYNC_INTERVAL) => false,
            };
            syncer.flush_folded();
            let spool = syncer.clone();
            let _ = tokio::task::spawn_blocking(move || spool.sync()).await;
            if done {
                return;
            }
        }
    });
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let (spool_id, batch) = spool.batch(PUSH_BATCH);
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = spool.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let full = batch.len() == PUSH_BATCH;
        let sent = async {
            let mut client = link.client().await.map_err(|e| e.to_string())?;
            client
                .push_events(pb::PushEventsRequest { spool_id: spool_id.clone(), events: batch })
                .await
                .map(|r| r.into_inner().acked_seq)
                .map_err(|s| s.message().to_string())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = sent => result,
        };
        match result {
            Ok(acked) => {
                backoff.reset();
                spool.ack(&spool_id, acked);
                if !full {
                    // Gather what arrives next into one push.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(PUSH_INTERVAL) => {}
                    }
                }
            }
            Err(e) => {
                spool.metrics.push_failed();
                let delay = backoff.next_delay();
                warn!(error = %e, spooled = spool.depth(), retry_in = ?delay, "cannot push events to the server; they stay spooled");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let _ = sync_task.await;
    spool.sync();
}
