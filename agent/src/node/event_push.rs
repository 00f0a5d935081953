//! The event pusher: sends the spooled events to the server in batches
//! (a few pushes a second) and has them acknowledged; fsyncs the spool.
//! A push refused for the agent SVID being replaced goes again at once
//! with the new one (the link's rule); other failures back off. Depends on
//! `event_spool` and the link.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::node as pb;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::event_spool::{Batch, EventSpool, PUSH_BATCH, SYNC_INTERVAL};
use crate::node::link::{Next, NodeLink};
use crate::node::standing::Call;
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
        // Reads the spool file (and waits for an fsync in progress).
        let reader = spool.clone();
        let Ok(Batch { spool_id, events: batch, damaged }) =
            tokio::task::spawn_blocking(move || reader.batch(PUSH_BATCH)).await
        else {
            break;
        };
        if let (true, Some(damaged)) = (batch.is_empty(), damaged) {
            // Nothing readable after a damaged record: give it up here, so
            // that it cannot hold back what comes after it.
            acknowledge(&spool, spool_id, damaged).await;
            continue;
        }
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = spool.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let full = batch.len() == PUSH_BATCH;
        let request = pb::PushEventsRequest { spool_id: spool_id.clone(), events: batch };
        // A push refused for the SVID a renewal is replacing goes again at
        // once with the new one (the link's rule): no back-off.
        let sent = link.call(Call::Push, |mut client| {
            let request = request.clone();
            async move { client.push_events(request).await }
        });
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = sent => result,
        };
        match result {
            Ok((response, _)) => {
                let acked = response.acked_seq;
                backoff.reset();
                acknowledge(&spool, spool_id, acked).await;
                if !full {
                    // Gather what arrives next into one push.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(PUSH_INTERVAL) => {}
                    }
                }
            }
            Err((failure, next)) => {
                spool.metrics.push_failed();
                let delay = backoff.next_delay();
                if next != Next::Dead {
                    warn!(error = %failure.message, spooled = spool.depth(), retry_in = ?delay, "cannot push events to the server; they stay spooled");
                }
                // A new SVID ends the back-off: the next push goes with it.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = link.pause(&failure.used, delay) => {}
                }
            }
        }
    }
    let _ = sync_task.await;
    spool.sync();
}

/// Acknowledges `spool_id` up to `seq` on a blocking thread (a compaction
/// copies the file).
async fn acknowledge(spool: &Arc<EventSpool>, spool_id: Vec<u8>, seq: u64) {
    let spool = spool.clone();
    let _ = tokio::task::spawn_blocking(move || spool.ack(&spool_id, seq)).await;
}
