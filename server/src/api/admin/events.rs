//! The event stream over the admin API: listing (and following) events,
//! and verifying the hash chain.

use tessera_proto::admin::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::event_schema::{self as schema};

use super::service::*;

impl AdminService {
    pub(super) async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<<AdminService as Admin>::ListEventsStream>, Status> {
        let filter = request.into_inner();
        if !filter.decision.is_empty()
            && filter.decision != schema::ALLOW
            && filter.decision != schema::DENY
        {
            return Err(Status::invalid_argument(format!(
                "invalid decision {:?}: want allow or deny",
                filter.decision
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(async move {
            let events = state.events().clone();
            let mut stored = events.subscribe();
            let mut after = filter.after_seq;
            // `limit` bounds the stored events sent; following then sends
            // only what is stored from then on.
            let (mut limited, mut left) = (filter.limit != 0, filter.limit);
            loop {
                if limited && left == 0 {
                    if !filter.follow {
                        return;
                    }
                    after = after.max(*stored.borrow_and_update());
                    limited = false;
                }
                let list = events.clone();
                let f = filter.clone();
                let read = tokio::task::spawn_blocking(move || list.list(&f, after, 1000)).await;
                let (batch, last) = match read {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                let full = batch.len() == 1000;
                after = last;
                for event in batch {
                    if limited {
                        if left == 0 {
                            break;
                        }
                        left -= 1;
                    }
                    after = after.max(event.seq);
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if full || (limited && left == 0) {
                    continue; // more stored events to read, or the limit to apply
                }
                if !filter.follow {
                    return;
                }
                // Follow: wait for the next event stored (or the caller leaving).
                stored.borrow_and_update();
                if *stored.borrow() > after {
                    continue;
                }
                // Other servers sharing the datastore store events too, and
                // this server hears of them only by reading: poll as well.
                let shared = state.config().datastore.is_some();
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = state.shutdown().cancelled() => return,
                    changed = stored.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)), if shared => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    pub(super) async fn verify_events(
        &self,
        _request: Request<pb::VerifyEventsRequest>,
    ) -> Result<Response<pb::VerifyEventsReport>, Status> {
        let events = self.state.events().clone();
        let report = tokio::task::spawn_blocking(move || events.verify())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(report))
    }
}
