//! The node API service: its state, the caller as its certificate pins
//! it, the checks every call makes and how refusals are recorded. The
//! call handlers (`attest.rs`, `signing.rs`, `sync.rs`) and the gRPC
//! glue (`mod.rs`) build on it; it depends on none of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tessera_proto::node::{self as pb};
use tessera_proto::types;
use tessera_proto::Refusal;
use tessera_workload_api::SpiffeId;
use tonic::{Request, Status};

use crate::api::node::tls::NodePeer;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::refusals::RefusalFolder;
use crate::state::State;
use crate::store::AgentRefusal;
use tessera_common::rate::TokenBucket;

/// Revoked JWT IDs (about 60 bytes each), and as many X.509 serials, per
/// message at the start of a Sync stream.
pub const REVOCATIONS_CHUNK: usize = 10_000;

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
pub(super) const MAX_ATTEST_BUCKETS: usize = 65_536;

/// Addresses whose refusals get an event of their own per interval; the
/// refusals of any more are folded under `0.0.0.0`.
pub(super) const MAX_FOLDED_ADDRESSES: usize = 1_024;

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeService {
    pub(super) state: Arc<State>,
    pub(super) sign_limits: Arc<Mutex<HashMap<String, TokenBucket>>>,
    pub(super) attest_limits: Arc<Mutex<AttestLimits>>,
    /// Refusals of callers without a client certificate, by address and
    /// operation, not yet recorded as an event.
    pub(super) stranger_refusals: Arc<RefusalFolder<(IpAddr, &'static str)>>,
    /// The open Sync streams' callers, checked again every few seconds.
    pub(super) rechecks: Arc<super::recheck::Rechecks<Caller>>,
}

/// Per source address: the refused-attestation budget.
#[derive(Debug, Default)]
pub(super) struct AttestLimits {
    /// Budgets not full, read against the injected clock.
    pub(super) buckets: HashMap<IpAddr, TokenBucket>,
}

/// The event kind of a refused node request.
pub(super) fn refusal_kind(op: &str) -> &'static str {
    match op {
        "attest" => kind::NODE_ATTEST,
        "renew_agent" => kind::NODE_RENEW,
        _ => kind::NODE_REFUSED,
    }
}

/// A refusal of the calling agent, with its typed reason attached.
pub(super) fn agent_refused(kind: Refusal, message: String) -> Status {
    kind.attach(Status::permission_denied(message))
}

impl From<AgentRefusal> for Status {
    fn from(refusal: AgentRefusal) -> Self {
        agent_refused(refusal.kind(), refusal.to_string())
    }
}

/// The calling agent: its ID and the serial of the SVID it presented.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub(super) id: SpiffeId,
    pub(super) serial: String,
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
            rechecks: Arc::default(),
        }
    }

    /// Records the refusal of a node request (event and log) and returns it.
    pub(super) fn refuse(&self, op: &str, agent: &str, status: Status) -> Status {
        let e = schema::refused(refusal_kind(op), &status).agent(agent).attr("op", op);
        self.state.events().record(vec![e]);
        status
    }

    /// The agent ID and serial of the verified client certificate. A call
    /// without one is a stranger's: refused like a bad attestation.
    pub(super) fn presented<T>(
        &self,
        op: &'static str,
        request: &Request<T>,
    ) -> Result<Caller, Status> {
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
    pub(super) async fn authenticate<T>(
        &self,
        op: &'static str,
        request: &Request<T>,
    ) -> Result<Caller, Status> {
        let caller = self.presented(op, request)?;
        self.check_caller(&caller).await.map_err(|e| self.refuse(op, caller.id.as_str(), e))?;
        Ok(caller)
    }

    pub(super) async fn check_caller(&self, caller: &Caller) -> Result<(), Status> {
        let (key, serial) = (caller.id.to_string(), caller.serial.clone());
        let checked = self.state.store_op(move |store| store.check_agent(&key, &serial)).await?;
        if self.standing(caller, checked)? {
            self.confirm(caller).await?;
        }
        Ok(())
    }

    /// What the agent's stored record, as checked, says of `caller`:
    /// refused (and why), or whether the SVID it presented must still be
    /// confirmed as the one in use. Decided here for every call and for
    /// the periodic re-check of Sync streams (`recheck.rs`).
    pub(super) fn standing(
        &self,
        caller: &Caller,
        checked: Result<types::Agent, AgentRefusal>,
    ) -> Result<bool, Status> {
        let agent = checked?;
        if agent.x509_svid_expires_at <= self.state.clock().now() {
            return Err(agent_refused(
                Refusal::Expired,
                format!("agent SVID {} has expired", caller.serial),
            ));
        }
        // The agent has its renewed SVID: the one before may no longer
        // renew (whoever else holds its key could take the agent over).
        Ok(!agent.previous_x509_svid_serial.is_empty())
    }

    /// Records that the caller's SVID, its agent's newest, is in use.
    pub(super) async fn confirm(&self, caller: &Caller) -> Result<(), Status> {
        let (key, serial) = (caller.id.to_string(), caller.serial.clone());
        self.state.store_op(move |store| store.confirm_agent_svid(&key, &serial)).await
    }

    pub(super) fn bundle(&self) -> Vec<Vec<u8>> {
        self.state.ca().bundle().iter().map(|c| c.to_vec()).collect()
    }

    pub(super) fn bundle_update(&self) -> pb::BundleUpdate {
        pb::BundleUpdate {
            authorities: self.bundle(),
            jwt_authorities: self.state.ca().jwt_authorities(),
        }
    }
}
