//! The node API (agent ↔ server): join-token attestation, agent SVID
//! renewal, batch signing of workload SVIDs, and the Sync push stream.
//! Refusals are logged here, once, with their reason.
//!
//! Attestation is the one call anyone may make, so what a stranger can make
//! it cost is bounded: a join token is looked up read-only before anything
//! is written (an unknown token costs no commit); refused attestations
//! draw on a token bucket per source address ([`Config::attest_rate`] per
//! second after a burst of [`Config::attest_burst`]; an address whose
//! bucket is empty is answered `ResourceExhausted` with the typed refusal
//! [`RATE_LIMITED`], even with a valid token); and the refusals of one
//! address are folded into one event per [`ATTEST_REFUSAL_INTERVAL`]: the
//! first is recorded at once, the rest as one event with `count`.
//!
//! The folder: `service.rs` (the service, the caller's checks, refusal
//! records) at the bottom; `attest.rs`, `signing.rs` and `sync.rs` build on
//! it; `tls.rs` is the listener's transport. This file is the `Node`
//! trait's glue. Only `server.rs` depends on it.
//!
//! [`Config::attest_rate`]: crate::config::Config::attest_rate
//! [`Config::attest_burst`]: crate::config::Config::attest_burst

use std::pin::Pin;

use tessera_proto::node::{self as pb, node_server::Node};
use tessera_proto::types::Status as ItemStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::node::tls::NodePeer;

mod attest;
mod recheck;
mod service;
mod signing;
mod sync;
pub mod tls;

pub use service::{NodeService, ATTEST_REFUSAL_INTERVAL};
pub use tessera_proto::REFUSAL_METADATA;

use signing::{answer, item_failure, jwt_item_failure, typed_item};

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let started = std::time::Instant::now();
        let source = request
            .extensions()
            .get::<NodePeer>()
            .and_then(|peer| peer.remote)
            .map(|remote| remote.ip().to_canonical());
        let result = self.attest_with_token(request.into_inner(), source).await;
        self.state.metrics().attestation(result.is_ok(), started.elapsed().as_secs_f64());
        result
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        self.renew(request).await
    }

    async fn sign_x509(
        &self,
        request: Request<pb::SignX509Request>,
    ) -> Result<Response<pb::SignX509Response>, Status> {
        let op = "sign_x509";
        let started = std::time::Instant::now();
        let caller = self.authenticate(op, &request).await?;
        let items = request.into_inner().items;
        let ids = items.iter().map(|i| i.entry_id.clone()).collect();
        let outcomes = self.sign_batch(op, &caller, items, ids, Self::sign_item).await?;
        let results = answer(
            outcomes,
            |svid, record| pb::SignX509Result {
                entry_id: record.entry.id.clone(),
                status: Some(ItemStatus { code: 0, ..Default::default() }),
                x509_svid: vec![svid.leaf],
                expires_at: svid.expires_at,
                serial: svid.serial,
            },
            |record, refused| {
                let mut failure =
                    item_failure(&record.entry.id, tonic::Code::PermissionDenied, refused.why);
                typed_item(failure.status.as_mut(), refused.refusal);
                failure
            },
        );
        let signed = results.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0));
        self.issued("x509", started, signed.count());
        Ok(Response::new(pb::SignX509Response { results }))
    }

    async fn sign_jwt(
        &self,
        request: Request<pb::SignJwtRequest>,
    ) -> Result<Response<pb::SignJwtResponse>, Status> {
        let op = "sign_jwt";
        let started = std::time::Instant::now();
        let caller = self.authenticate(op, &request).await?;
        let items = request.into_inner().items;
        let ids = items.iter().map(|i| i.entry_id.clone()).collect();
        let outcomes = self.sign_batch(op, &caller, items, ids, Self::sign_jwt_item).await?;
        let results = answer(
            outcomes,
            |jwt, record| pb::SignJwtResult {
                spiffe_id: record.entry.spiffe_id.to_string(),
                entry_id: record.entry.id.clone(),
                status: Some(ItemStatus { code: 0, ..Default::default() }),
                token: jwt.token,
                expires_at: jwt.expires_at,
                jti: jwt.jti,
                issued_at: jwt.issued_at,
            },
            |record, refused| {
                let mut failure =
                    jwt_item_failure(&record.entry.id, tonic::Code::PermissionDenied, refused.why);
                typed_item(failure.status.as_mut(), refused.refusal);
                failure
            },
        );
        let signed = results.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0));
        self.issued("jwt", started, signed.count());
        Ok(Response::new(pb::SignJwtResponse { results }))
    }

    type SyncStream = SyncStream;

    async fn push_events(
        &self,
        request: Request<pb::PushEventsRequest>,
    ) -> Result<Response<pb::PushEventsResponse>, Status> {
        let op = "push_events";
        let caller = self.authenticate(op, &request).await?;
        let req = request.into_inner();
        if req.events.len() > crate::events::MAX_PUSH_EVENTS || req.spool_id.len() > 64 {
            return Err(self.refuse(
                op,
                caller.id.as_str(),
                Status::invalid_argument(format!(
                    "at most {} events per batch and a spool ID of up to 64 bytes",
                    crate::events::MAX_PUSH_EVENTS
                )),
            ));
        }
        if req.events.windows(2).any(|w| w[1].agent_seq <= w[0].agent_seq) {
            return Err(self.refuse(
                op,
                caller.id.as_str(),
                Status::invalid_argument("events must be in increasing agent_seq order"),
            ));
        }
        let acked_seq = self
            .state
            .events()
            .ingest(caller.id.as_str(), &req.spool_id, req.events)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::PushEventsResponse { acked_seq }))
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<SyncStream>, Status> {
        let caller = self.authenticate("sync", &request).await?;
        let resume_from = request.get_ref().revision;
        let (tx, rx): (sync::SyncSender, _) = mpsc::channel(64);
        let service = self.clone();
        tokio::spawn(
            async move {
                let streams = service.state.metrics().sync_streams().clone();
                streams.inc();
                if let Err(status) = service.run_sync(&caller, resume_from, &tx).await {
                    let _ = tx.send(Box::new(Err(status))).await;
                }
                streams.dec();
            }
            .instrument(tracing::info_span!("sync")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|message| *message))))
    }
}
