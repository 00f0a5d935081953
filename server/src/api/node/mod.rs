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
//! [`Config::attest_rate`]: crate::config::Config::attest_rate
//! [`Config::attest_burst`]: crate::config::Config::attest_burst

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tessera_proto::node::{self as pb, node_server::Node};
use tessera_proto::types::Status as ItemStatus;
use tessera_proto::Refusal;
use tessera_workload_api::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::node::tls::NodePeer;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::refusals::RefusalFolder;
use crate::state::State;
use crate::store::AgentRefusal;
use tessera_common::rate::TokenBucket;

mod attest;
mod signing;
mod sync;
pub mod tls;

use signing::{answer, item_failure, jwt_item_failure, typed_item};

/// JWT revocations per message at the start of a Sync stream (about 60
/// bytes each).
pub const JWT_REVOCATIONS_CHUNK: usize = 10_000;

/// Entries per snapshot chunk in `Sync`, well under any message size limit.
pub const SNAPSHOT_CHUNK: usize = 500;

/// The typed refusal (see [`REFUSAL_METADATA`]) of an attestation from an
/// address over its rate limit.
pub const RATE_LIMITED: Refusal = Refusal::RateLimited;

/// The typed refusal (see [`REFUSAL_METADATA`]) of an attestation whose
/// join token one operator made, for an agent ID that parents entries the
/// approval policy matches.
pub const APPROVAL_REQUIRED: Refusal = Refusal::ApprovalRequired;

/// Refused attestations from one address are folded into one event per
/// interval.
pub const ATTEST_REFUSAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Addresses whose attestation budgets are kept (those with refusals);
/// beyond it every address starts afresh.
const MAX_ATTEST_BUCKETS: usize = 65_536;

/// Addresses whose refusals get an event of their own per interval; the
/// refusals of any more are folded under `0.0.0.0`.
const MAX_FOLDED_ADDRESSES: usize = 1_024;

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeService {
    state: Arc<State>,
    sign_limits: Arc<Mutex<HashMap<String, TokenBucket>>>,
    attest_limits: Arc<Mutex<AttestLimits>>,
    /// Refusals of callers without a client certificate, by address and
    /// operation, not yet recorded as an event.
    stranger_refusals: Arc<RefusalFolder<(IpAddr, &'static str)>>,
}

/// Per source address: the refused-attestation budget.
#[derive(Debug, Default)]
struct AttestLimits {
    /// Budgets not full, read against the injected clock.
    buckets: HashMap<IpAddr, TokenBucket>,
}

/// The event kind of a refused node request.
fn refusal_kind(op: &str) -> &'static str {
    match op {
        "attest" => kind::NODE_ATTEST,
        "renew_agent" => kind::NODE_RENEW,
        _ => kind::NODE_REFUSED,
    }
}

pub use tessera_proto::REFUSAL_METADATA;

/// A refusal of the calling agent, with its typed reason attached.
fn agent_refused(kind: Refusal, message: String) -> Status {
    kind.attach(Status::permission_denied(message))
}

impl From<AgentRefusal> for Status {
    fn from(refusal: AgentRefusal) -> Self {
        agent_refused(refusal.kind(), refusal.to_string())
    }
}

/// The calling agent: its ID and the serial of the SVID it presented.
#[derive(Debug, Clone)]
struct Caller {
    id: SpiffeId,
    serial: String,
}

impl NodeService {
    /// The service over shared server state.
    pub fn new(state: Arc<State>) -> Self {
        Self {
            state,
            sign_limits: Arc::new(Mutex::new(HashMap::new())),
            attest_limits: Arc::new(Mutex::new(AttestLimits::default())),
            stranger_refusals: Arc::new(RefusalFolder::new(
                MAX_FOLDED_ADDRESSES,
                (IpAddr::from([0, 0, 0, 0]), "any"),
            )),
        }
    }

    /// Records the refusal of a node request (event and log) and returns it.
    fn refuse(&self, op: &str, agent: &str, status: Status) -> Status {
        let e = schema::refused(refusal_kind(op), &status).agent(agent).attr("op", op);
        self.state.events.record(vec![e]);
        status
    }

    /// The agent ID and serial of the verified client certificate. A call
    /// without one is a stranger's: refused like a bad attestation.
    fn presented<T>(&self, op: &'static str, request: &Request<T>) -> Result<Caller, Status> {
        let peer = request.extensions().get::<NodePeer>();
        let source = peer.and_then(|p| p.remote).map(|r| r.ip().to_canonical());
        let certs = peer.and_then(|peer| peer.certs.clone()).ok_or_else(|| {
            self.refuse_stranger(
                op,
                source,
                "",
                Status::unauthenticated("agent X509-SVID required (mTLS)"),
            )
        })?;
        let leaf = certs.first().ok_or_else(|| {
            self.refuse(op, "", Status::unauthenticated("empty certificate chain"))
        })?;
        let id = tessera_workload_api::spiffe_id_of_cert(leaf).map_err(|e| {
            self.refuse(op, "", Status::unauthenticated(format!("client certificate: {e}")))
        })?;
        // An unparsable leaf has no serial, so it matches no agent's current one.
        let serial = tessera_workload_api::certificate_serial_hex(leaf).unwrap_or_default();
        Ok(Caller { id, serial })
    }

    /// The calling agent, if it is a known agent, not banned, presenting
    /// its current SVID, unrevoked and unexpired.
    async fn authenticate<T>(
        &self,
        op: &'static str,
        request: &Request<T>,
    ) -> Result<Caller, Status> {
        let caller = self.presented(op, request)?;
        self.check_caller(&caller).await.map_err(|e| self.refuse(op, caller.id.as_str(), e))?;
        Ok(caller)
    }

    async fn check_caller(&self, caller: &Caller) -> Result<(), Status> {
        let (key, serial) = (caller.id.to_string(), caller.serial.clone());
        let agent = self.state.store_op(move |store| store.check_agent(&key, &serial)).await??;
        if agent.x509_svid_expires_at <= self.state.clock.now() {
            return Err(agent_refused(
                Refusal::Expired,
                format!("agent SVID {} has expired", caller.serial),
            ));
        }
        if !agent.previous_x509_svid_serial.is_empty() {
            // The agent has its renewed SVID: the one before may no longer
            // renew (whoever else holds its key could take the agent over).
            let (key, serial) = (caller.id.to_string(), caller.serial.clone());
            self.state.store_op(move |store| store.confirm_agent_svid(&key, &serial)).await?;
        }
        Ok(())
    }

    fn bundle(&self) -> Vec<Vec<u8>> {
        self.state.ca.bundle().iter().map(|c| c.to_vec()).collect()
    }

    fn bundle_update(&self) -> pb::BundleUpdate {
        pb::BundleUpdate {
            authorities: self.bundle(),
            jwt_authorities: self.state.ca.jwt_authorities(),
        }
    }
}

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
        self.state.metrics.attestation(result.is_ok(), started.elapsed().as_secs_f64());
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
                entry_id: record.entry.id,
                status: Some(ItemStatus { code: 0, ..Default::default() }),
                x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
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
                entry_id: record.entry.id,
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
            .events
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
        let (tx, rx) = mpsc::channel(64);
        let service = self.clone();
        tokio::spawn(
            async move {
                let streams = service.state.metrics.sync_streams().clone();
                streams.inc();
                if let Err(status) = service.run_sync(&caller, resume_from, &tx).await {
                    let _ = tx.send(Err(status)).await;
                }
                streams.dec();
            }
            .instrument(tracing::info_span!("sync")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
