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

use tessera_proto::node::{self as pb, node_server::Node, sync_message::Event};
use tessera_proto::types::{self as types, Status as ItemStatus};
use tessera_proto::Refusal;
use tessera_workload_api::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::ca::SignedSvid;
use crate::ca::csr::parse_csr;
use crate::entry::Entry;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::feed::FedChange;
use crate::ca::jwt::SignedJwt;
use crate::refusals::RefusalFolder;
use crate::state::State;
use crate::store::{AgentRefusal, Audit, ChangeKind, Signed, MAX_BATCH};
use crate::tls::NodePeer;
use tessera_common::rate::TokenBucket;

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

    /// Refuses an attestation from `source` at once when its budget of
    /// refusals is spent.
    fn check_attest_rate(&self, source: IpAddr) -> Result<(), Status> {
        let config = &self.state.config;
        let (rate, burst, now_ms) =
            (config.attest_rate, config.attest_burst, self.state.clock.now_ms());
        let mut limits = self.attest_limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut bucket =
            limits.buckets.get(&source).copied().unwrap_or(TokenBucket::full(burst, now_ms));
        let allowed = bucket.has_token(rate, burst, now_ms);
        // A full bucket is the default: only addresses with refusals are kept.
        if bucket.is_full(burst) {
            limits.buckets.remove(&source);
        } else {
            limits.buckets.insert(source, bucket);
        }
        if allowed {
            return Ok(());
        }
        let wait = bucket.secs_to_next(rate);
        Err(RATE_LIMITED.attach(Status::resource_exhausted(format!(
            "too many refused attestations from {source}: at most {} per second after {}; retry in {wait} s",
            config.attest_rate, config.attest_burst
        ))))
    }

    /// Whether `token` is one held for a second operator's approval (not
    /// yet usable). Only looked for when proposals wait, which operators
    /// alone make: a stranger's bogus token costs no scan otherwise.
    fn join_token_is_held(&self, token: &str) -> Result<bool, Status> {
        let governance = &self.state.governance;
        if governance.pending_count() == 0 {
            return Ok(false);
        }
        let hash = String::from_utf8_lossy(&crate::store::join_token_key(token)).into_owned();
        let held = governance.pending.list().map_err(|e| Status::internal(e.to_string()))?;
        Ok(held.iter().any(|p| p.pending.as_ref().is_some_and(|a| a.join_token_hash == hash)))
    }

    /// Records a refusal of a caller not (yet) known as an agent: draws on
    /// its address's attestation budget, and records its event (the first
    /// of the interval from this address for `op`) or folds it into the
    /// next [`Self::flush_attest_refusals`].
    fn refuse_stranger(
        &self,
        op: &'static str,
        source: Option<IpAddr>,
        agent: &str,
        status: Status,
    ) -> Status {
        let Some(source) = source else { return self.refuse(op, agent, status) };
        let rate_limited = status.code() == tonic::Code::ResourceExhausted;
        if rate_limited {
            self.state.metrics.attestation_rate_limited();
        }
        {
            let mut limits = self.attest_limits.lock().unwrap_or_else(|e| e.into_inner());
            let config = &self.state.config;
            let (rate, burst, now_ms) =
                (config.attest_rate, config.attest_burst, self.state.clock.now_ms());
            let mut bucket =
                limits.buckets.get(&source).copied().unwrap_or(TokenBucket::full(burst, now_ms));
            bucket.spend(rate, burst, now_ms);
            if limits.buckets.len() >= MAX_ATTEST_BUCKETS && !limits.buckets.contains_key(&source) {
                // Addresses beyond what is kept start afresh (with their
                // burst): memory stays bounded under an attack from many.
                limits.buckets.clear();
            }
            limits.buckets.insert(source, bucket);
        }
        // Folded by address and operation; beyond so many addresses in one
        // interval, the rest together (a record at once for each would be a
        // write per address).
        let first = self.stranger_refusals.note((source, op), status.message(), rate_limited);
        if first {
            let e = schema::refused(refusal_kind(op), &status)
                .agent(agent)
                .attr("op", op)
                .attr("source", source)
                .attr("count", 1);
            self.state.events.record(vec![e]);
        } else {
            tracing::debug!(%source, error = %status.message(), "attestation refused (folded into the next event)");
        }
        status
    }

    /// Records the refused attestations folded since the last call: one
    /// event per address, with `count` (and how many of them were over the
    /// rate limit).
    pub fn flush_attest_refusals(&self) {
        let events: Vec<types::Event> = self
            .stranger_refusals
            .take()
            .into_iter()
            .map(|((source, op), f)| {
                warn!(%source, op, refused = f.count, rate_limited = f.flagged, "node requests refused");
                schema::denied(
                    refusal_kind(op),
                    format!(
                        "{} more {op} requests refused from {source} (last: {})",
                        f.count, f.last_reason
                    ),
                )
                .code(if f.flagged > 0 {
                    tessera_proto::Refusal::RateLimited.as_str()
                } else {
                    schema::grpc_code(tonic::Code::PermissionDenied)
                })
                .attr("op", op)
                .attr("source", source)
                .attr("count", f.count)
                .attr("rate_limited", f.flagged)
            })
            .collect();
        if !events.is_empty() {
            self.state.events.record(events);
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

    /// Takes `n` CSRs from the agent's signing budget, or says when to
    /// retry. Servers sharing a datastore share the budget through it.
    async fn take_sign_budget(&self, agent_id: &SpiffeId, n: usize) -> Result<(), Status> {
        let config = &self.state.config;
        let over = || {
            Status::resource_exhausted(format!(
                "agent {agent_id} is over its signing limit ({} CSRs/s, burst {}); retry later",
                config.sign_rate, config.sign_burst
            ))
        };
        if config.datastore.is_some() {
            let (agent, rate, burst) = (agent_id.to_string(), config.sign_rate, config.sign_burst);
            let now_ms = self.state.clock.now_ms();
            let taken = self
                .state
                .store_op(move |store| {
                    store.take_shared_budget(&agent, n as u64, rate, burst, now_ms)
                })
                .await?;
            match taken {
                Some(true) => return Ok(()),
                Some(false) => return Err(over()),
                None => {}
            }
        }
        let (rate, burst, now_ms) =
            (config.sign_rate, config.sign_burst, self.state.clock.now_ms());
        let mut limits = self.sign_limits.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = limits.entry(agent_id.to_string()).or_insert(TokenBucket::full(burst, now_ms));
        if !bucket.take(n as f64, f64::from(rate), burst, now_ms) {
            return Err(over());
        }
        Ok(())
    }

    /// Signs an agent SVID; the caller stores it with the agent record.
    fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr: &[u8],
    ) -> Result<(SignedSvid, types::IssuedSvid), Status> {
        let key = parse_csr(csr).map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let ttl = self.state.config.agent_svid_ttl;
        let svid = self
            .state
            .ca
            .sign_svid(&key, agent_id, ttl, &[])
            .map_err(|e| Status::internal(e.to_string()))?;
        let issued = types::IssuedSvid {
            serial: svid.serial.clone(),
            spiffe_id: agent_id.to_string(),
            entry_id: String::new(),
            agent_id: agent_id.to_string(),
            expires_at: svid.expires_at,
            ca_seq: svid.ca_seq,
            jti: String::new(),
        };
        Ok((svid, issued))
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

    /// One signing batch: checked against the size limit and the agent's
    /// budget, each item signed by `sign` (with its entry as read now) off
    /// the async workers, and what was signed recorded.
    async fn sign_batch<I, T, F>(
        &self,
        op: &str,
        caller: &Caller,
        items: Vec<I>,
        entry_ids: Vec<String>,
        sign: SignItem<I, T, F>,
    ) -> Result<Vec<Recorded<T, F>>, Status>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Send + 'static,
    {
        let entries = self.batch_entries(op, caller, entry_ids).await?;
        let service = self.clone();
        let agent_id = caller.id.clone();
        // Signing is CPU work: keep it off the async workers.
        let signed = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .zip(entries)
                .map(|(item, entry)| sign(&service, &agent_id, item, entry))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("signing task failed: {e}")))?;
        self.record_batch(caller, signed).await
    }

    /// Checks a signing batch against the size limit and the agent's
    /// budget, and reads its entries.
    async fn batch_entries(
        &self,
        op: &str,
        caller: &Caller,
        ids: Vec<String>,
    ) -> Result<Vec<Option<Entry>>, Status> {
        if ids.len() > MAX_BATCH {
            return Err(self.refuse(
                op,
                caller.id.as_str(),
                Status::invalid_argument(format!(
                    "batch has {} items, more than the {MAX_BATCH} allowed",
                    ids.len()
                )),
            ));
        }
        self.take_sign_budget(&caller.id, ids.len())
            .await
            .map_err(|e| self.refuse(op, caller.id.as_str(), e))?;
        self.state.store_op(move |store| store.entries(&ids)).await
    }

    /// Records what a batch signed (durably) before the agent can use it,
    /// checked in the same commit against the agent and the entries as they
    /// are now: an SVID signed while its entry was deleted or changed, or
    /// its agent banned, is revoked at once instead of escaping.
    async fn record_batch<T, F>(
        &self,
        caller: &Caller,
        signed: Vec<Result<(T, Signed), F>>,
    ) -> Result<Vec<Recorded<T, F>>, Status> {
        let mut pending = Vec::with_capacity(signed.len());
        let mut records = Vec::new();
        for result in signed {
            pending.push(result.map(|(signed, record)| {
                records.push(record);
                signed
            }));
        }
        let now = self.state.clock.now();
        let (key, serial) = (caller.id.to_string(), caller.serial.clone());
        let (recorded, records) = if records.is_empty() {
            (Vec::new(), records)
        } else {
            self.state
                .store_op(move |store| {
                    let recorded = store.record_issued(&key, &serial, &records, now)?;
                    Ok((recorded, records))
                })
                .await?
        };
        if recorded.len() != records.len() {
            return Err(Status::internal("the store recorded a different number of SVIDs"));
        }
        let mut recorded = recorded.into_iter().zip(records);
        let mut out = Vec::with_capacity(pending.len());
        let mut revoked_any = false;
        for result in pending {
            let signed = match result {
                Err(failure) => {
                    out.push(Recorded::Refused(failure));
                    continue;
                }
                Ok(signed) => signed,
            };
            out.push(match recorded.next() {
                Some((Ok(()), record)) => Recorded::Issued(signed, record),
                Some((Err(why), record)) => {
                    revoked_any = true;
                    Recorded::Revoked(record, why)
                }
                None => return Err(Status::internal("the store recorded fewer SVIDs than signed")),
            });
        }
        if revoked_any {
            crate::revocation::update_verifier_crls(&self.state).await?;
        }
        Ok(out)
    }

    // The refusal is the item's own answer, sent as it is: no box.
    #[allow(clippy::result_large_err)]
    fn sign_jwt_item(
        &self,
        agent_id: &SpiffeId,
        item: pb::SignJwtItem,
        entry: Option<Entry>,
    ) -> Result<(SignedJwt, Signed), pb::SignJwtResult> {
        let spiffe_id = entry.as_ref().map(|e| e.spiffe_id.to_string());
        let fail = |code: tonic::Code, message: String| {
            let mut e = schema::denied(kind::JWT_ISSUE, message.clone())
                .code(schema::grpc_code(code))
                .agent(agent_id.as_str())
                .entry(item.entry_id.clone());
            e.spiffe_ids.extend(spiffe_id.clone());
            e.audience = item.audience.clone();
            self.state.events.record(vec![e]);
            jwt_item_failure(&item.entry_id, code, message)
        };
        let Some(entry) = entry else {
            return Err(fail(tonic::Code::NotFound, format!("entry {} not found", item.entry_id)));
        };
        if &entry.parent_id != agent_id {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!("entry {} is not parented to {agent_id}", entry.id),
            ));
        }
        let audience = match tessera_common::rules::requested_audiences(&item.audience) {
            Ok(audience) => audience,
            Err(e) => return Err(fail(tonic::Code::InvalidArgument, e.to_string())),
        };
        if let Some(denied) = audience.iter().find(|a| !entry.allows_audience(a)) {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!(
                    "entry {} ({}) may not get JWT-SVIDs for audience {denied:?}",
                    entry.id, entry.spiffe_id
                ),
            ));
        }
        let now = self.state.clock.now();
        let config = &self.state.config;
        let ttl =
            if entry.jwt_svid_ttl == 0 { config.default_jwt_svid_ttl } else { entry.jwt_svid_ttl };
        let ttl = entry.ttl_at(ttl.min(config.max_jwt_svid_ttl), now);
        if entry.is_expired(now) || ttl == 0 {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!("entry {} has expired", entry.id),
            ));
        }
        match self.state.ca.sign_jwt(&entry.spiffe_id, &audience, ttl) {
            Ok((jwt, ca_seq)) => {
                let issued = types::IssuedSvid {
                    serial: String::new(),
                    spiffe_id: entry.spiffe_id.to_string(),
                    entry_id: entry.id.clone(),
                    agent_id: agent_id.to_string(),
                    expires_at: jwt.expires_at,
                    ca_seq,
                    jti: jwt.jti.clone(),
                };
                let mut event = issued_event(kind::JWT_ISSUE, agent_id, &entry)
                    .attr("expires_at", jwt.expires_at);
                event.jti = jwt.jti.clone();
                event.audience = jwt.audience.clone();
                Ok((jwt, Signed { svid: issued, entry, event }))
            }
            Err(e) => Err(fail(tonic::Code::Internal, e.to_string())),
        }
    }

    // The refusal is the item's own answer, sent as it is: no box.
    #[allow(clippy::result_large_err)]
    fn sign_item(
        &self,
        agent_id: &SpiffeId,
        item: pb::SignX509Item,
        entry: Option<Entry>,
    ) -> Result<(SignedSvid, Signed), pb::SignX509Result> {
        let spiffe_id = entry.as_ref().map(|e| e.spiffe_id.to_string());
        let fail = |code: tonic::Code, message: String| {
            let mut e = schema::denied(kind::X509_ISSUE, message.clone())
                .code(schema::grpc_code(code))
                .agent(agent_id.as_str())
                .entry(item.entry_id.clone());
            e.spiffe_ids.extend(spiffe_id.clone());
            self.state.events.record(vec![e]);
            item_failure(&item.entry_id, code, message)
        };
        let Some(entry) = entry else {
            return Err(fail(tonic::Code::NotFound, format!("entry {} not found", item.entry_id)));
        };
        if &entry.parent_id != agent_id {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!("entry {} is not parented to {agent_id}", entry.id),
            ));
        }
        let now = self.state.clock.now();
        let ttl = entry.svid_ttl_at(now);
        if entry.is_expired(now) || ttl == 0 {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!("entry {} has expired", entry.id),
            ));
        }
        let key = match parse_csr(&item.csr) {
            Ok(key) => key,
            Err(e) => return Err(fail(tonic::Code::InvalidArgument, e.to_string())),
        };
        match self.state.ca.sign_svid(&key, &entry.spiffe_id, ttl, &entry.dns_names) {
            Ok(svid) => {
                let issued = types::IssuedSvid {
                    serial: svid.serial.clone(),
                    spiffe_id: entry.spiffe_id.to_string(),
                    entry_id: entry.id.clone(),
                    agent_id: agent_id.to_string(),
                    expires_at: svid.expires_at,
                    ca_seq: svid.ca_seq,
                    jti: String::new(),
                };
                let mut event = issued_event(kind::X509_ISSUE, agent_id, &entry)
                    .attr("expires_at", svid.expires_at);
                event.serial = svid.serial.clone();
                Ok((svid, Signed { svid: issued, entry, event }))
            }
            Err(e) => Err(fail(tonic::Code::Internal, e.to_string())),
        }
    }
}

/// The event of one signed item (the store turns it into a denial if the
/// commit that records the item revokes it).
fn issued_event(kind: &str, agent_id: &SpiffeId, entry: &Entry) -> types::Event {
    schema::event(kind, schema::ALLOW)
        .agent(agent_id.as_str())
        .spiffe_id(entry.spiffe_id.as_str())
        .entry(entry.id.clone())
}

fn item_failure(entry_id: &str, code: tonic::Code, message: String) -> pb::SignX509Result {
    pb::SignX509Result {
        entry_id: entry_id.to_string(),
        status: Some(ItemStatus { code: code as i32, message, ..Default::default() }),
        ..Default::default()
    }
}

/// Puts a typed refusal, if any, on an item's status.
fn typed_item(status: Option<&mut ItemStatus>, refusal: Option<tessera_proto::Refusal>) {
    if let (Some(status), Some(refusal)) = (status, refusal) {
        status.refusal = refusal.as_str().to_string();
    }
}

fn jwt_item_failure(entry_id: &str, code: tonic::Code, message: String) -> pb::SignJwtResult {
    pb::SignJwtResult {
        entry_id: entry_id.to_string(),
        status: Some(ItemStatus { code: code as i32, message, ..Default::default() }),
        ..Default::default()
    }
}

/// Signs one item of a batch for the calling agent, given its entry as read
/// now: the signed credential and its record, or the item's refusal.
type SignItem<I, T, F> = fn(&NodeService, &SpiffeId, I, Option<Entry>) -> Result<(T, Signed), F>;

/// What became of one signed item of a batch.
enum Recorded<T, F> {
    /// Refused before signing.
    Refused(F),
    /// Signed and recorded.
    Issued(T, Signed),
    /// Signed, but revoked as it was recorded (why).
    Revoked(Signed, crate::store::ItemRefused),
}

/// One result per item of a signing batch: a refusal as it is, an issued
/// item by `issued`, an item revoked as it was recorded by `revoked`.
fn answer<T, R>(
    outcomes: Vec<Recorded<T, R>>,
    mut issued: impl FnMut(T, Signed) -> R,
    mut revoked: impl FnMut(Signed, crate::store::ItemRefused) -> R,
) -> Vec<R> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Recorded::Refused(failure) => failure,
            Recorded::Issued(signed, record) => issued(signed, record),
            Recorded::Revoked(record, why) => revoked(record, why),
        })
        .collect()
}

impl NodeService {
    async fn attest_with_token(
        &self,
        req: pb::AttestRequest,
        source: Option<IpAddr>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let op = "attest";
        if let Some(source) = source {
            self.check_attest_rate(source)
                .map_err(|e| self.refuse_stranger(op, Some(source), "", e))?;
        }
        // Check the CSR before spending the token on it.
        parse_csr(&req.csr).map_err(|e| {
            self.refuse_stranger(op, source, "", Status::invalid_argument(format!("CSR: {e}")))
        })?;
        if req.join_token.is_empty() {
            return Err(self.refuse_stranger(
                op,
                source,
                "",
                Status::invalid_argument("join token is required"),
            ));
        }
        let unknown =
            || Status::permission_denied("join token does not exist or has already been used");
        // Read-only first: an unknown token costs no commit.
        let token = req.join_token.clone();
        if !self.state.store_op(move |store| store.join_token_exists(&token)).await? {
            let status = if self.join_token_is_held(&req.join_token)? {
                agent_refused(
                    APPROVAL_REQUIRED,
                    "this join token is waiting for a second operator's approval (tessera-server entry show --pending)"
                        .into(),
                )
            } else {
                unknown()
            };
            return Err(self.refuse_stranger(op, source, "", status));
        }
        let token = req.join_token.clone();
        let spent = move |taken: &Option<types::JoinToken>| -> Vec<types::Event> {
            taken
                .iter()
                .map(|t| {
                    schema::event(kind::JOIN_TOKEN_SPEND, schema::ALLOW)
                        .agent(t.spiffe_id.clone())
                        .spiffe_id(t.spiffe_id.clone())
                        .attr("source", source.map_or_else(String::new, |s| s.to_string()))
                })
                .collect()
        };
        let record = self
            .state
            .store_op(move |store| store.take_join_token(&token, &Audit::new(None, spent)))
            .await?;
        let Some(record) = record else {
            return Err(self.refuse_stranger(op, source, "", unknown()));
        };
        let now = self.state.clock.now();
        if now >= record.expires_at {
            return Err(self.refuse_stranger(
                op,
                source,
                &record.spiffe_id,
                Status::permission_denied("join token has expired"),
            ));
        }
        let agent_id =
            SpiffeId::parse(&record.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
        if !record.approved {
            // Entries the policy matches may have been parented to this ID
            // (and approved) after one operator made the token: whoever
            // attests would serve them, so the token needs the approval
            // they had.
            let parent = agent_id.clone();
            let children =
                self.state.store_op(move |store| store.entries_by_parent(&parent)).await?;
            let policy = &self.state.governance.policy;
            let matched = children.iter().filter(|e| !policy.reasons(e).is_empty()).count();
            if matched > 0 {
                let status = agent_refused(
                    APPROVAL_REQUIRED,
                    format!(
                        "agent ID {agent_id} is the parent of {matched} entries the approval policy matches; its join token needs a second operator's approval (a new token for it is held for one)"
                    ),
                );
                return Err(self.refuse_stranger(op, source, agent_id.as_str(), status));
            }
        }
        let (svid, issued) = self
            .sign_agent_svid(&agent_id, &req.csr)
            .map_err(|e| self.refuse(op, agent_id.as_str(), e))?;
        let agent = types::Agent {
            spiffe_id: agent_id.to_string(),
            x509_svid_serial: svid.serial.clone(),
            x509_svid_expires_at: svid.expires_at,
            attestation_type: "join_token".into(),
            attested_at: now,
            banned: false,
            last_seen_at: now,
            previous_x509_svid_serial: String::new(),
        };
        let mut e = schema::event(kind::NODE_ATTEST, schema::ALLOW)
            .agent(agent_id.as_str())
            .spiffe_id(agent_id.as_str())
            .attr("attestation_type", "join_token");
        e.serial = svid.serial.clone();
        let audit = Audit::new(None, move |registered: &Result<(), AgentRefusal>| {
            registered.iter().map(|()| e.clone()).collect()
        });
        self.state
            .store_op(move |store| store.register_agent(&agent, &issued, &audit))
            .await?
            .map_err(|e| self.refuse(op, agent_id.as_str(), e.into()))?;
        Ok(Response::new(pb::AttestResponse {
            agent_id: agent_id.to_string(),
            x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: self.bundle(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let op = "renew_agent";
        let caller = self.presented(op, &request)?;
        let agent_id = caller.id.clone();
        // Cheap early refusals before signing; the commit checks again.
        let key = agent_id.to_string();
        match self.state.store_op(move |store| store.agent(&key)).await? {
            None => {
                return Err(self.refuse(
                    op,
                    agent_id.as_str(),
                    AgentRefusal::Unknown(agent_id.to_string()).into(),
                ))
            }
            Some(a) if a.banned => {
                return Err(self.refuse(
                    op,
                    agent_id.as_str(),
                    AgentRefusal::Banned(agent_id.to_string()).into(),
                ))
            }
            Some(_) => {}
        }
        let (svid, issued) = self
            .sign_agent_svid(&agent_id, &request.get_ref().csr)
            .map_err(|e| self.refuse(op, agent_id.as_str(), e))?;
        let now = self.state.clock.now();
        let (key, presented) = (agent_id.to_string(), caller.serial.clone());
        let mut e = schema::event(kind::NODE_RENEW, schema::ALLOW)
            .agent(agent_id.as_str())
            .spiffe_id(agent_id.as_str());
        e.serial = svid.serial.clone();
        let audit = Audit::new(None, move |renewed: &crate::store::RenewOutcome| {
            renewed.iter().map(|_| e.clone()).collect()
        });
        let renewed = self
            .state
            .store_op(move |store| store.renew_agent(&key, &presented, &issued, now, &audit))
            .await?
            .map_err(|e| self.refuse(op, agent_id.as_str(), e.into()))?;
        // A renewal after a lost reply revoked the lost SVID (CRLs re-signed
        // in the same commit).
        crate::revocation::revoked(&self.state, &renewed.1).await?;
        Ok(Response::new(pb::RenewAgentResponse {
            x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: self.bundle(),
        }))
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

/// How often an open Sync stream re-checks its agent's SVID (superseded by
/// a renewal, expired) when no change wakes it.
const SYNC_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Changes read from the log at a time.
const SYNC_CHANGES_PAGE: usize = 1000;

type SyncSender = mpsc::Sender<Result<pb::SyncMessage, Status>>;

/// Sends one message; an error when the agent has gone away.
async fn send(tx: &SyncSender, event: Event) -> Result<(), Status> {
    tx.send(Ok(pb::SyncMessage { event: Some(event) }))
        .await
        .map_err(|_| Status::cancelled("agent disconnected"))
}

impl NodeService {
    /// Counts a signing batch (its events were stored with its records).
    fn issued(&self, kind: &'static str, started: std::time::Instant, signed: usize) {
        self.state.metrics.issued(kind, signed, started.elapsed().as_secs_f64());
    }

    /// One agent's Sync stream: the bundle and CRLs, then either the changes
    /// since `resume_from` or a snapshot, then every change of the log as
    /// it commits. Returns when the agent goes away, the server shuts
    /// down, or the agent may no longer sync (the error says why).
    async fn run_sync(
        &self,
        caller: &Caller,
        resume_from: u64,
        tx: &SyncSender,
    ) -> Result<(), Status> {
        let agent_id = &caller.id;
        // The feed's reads of changed entries count only if made after this.
        let mut fresh_since = std::time::Instant::now();
        let mut wake = self.state.feed.subscribe();
        send(tx, Event::Bundle(self.bundle_update())).await?;
        // The CRLs are read after the revision the stream starts from, so
        // they are at least that new: a CRL change before it is not lost.
        let parent = agent_id.clone();
        // So are the JWT revocations: every one in force (the agent may
        // have missed some while disconnected; it merges them).
        let now = self.state.clock.now();
        let (snapshot, crls, jwts) = self
            .state
            .store_op(move |store| {
                let latest = store.revision()?;
                let snapshot = if resume_from > 0 && resume_from <= latest {
                    None
                } else {
                    Some(store.snapshot(&parent)?)
                };
                let jwts = store
                    .revocations()?
                    .into_iter()
                    // A minute of grace for agents whose clocks are behind.
                    .filter(|r| !r.jti.is_empty() && r.expires_at > now - 60)
                    .map(|r| pb::RevokedJwt { jti: r.jti, expires_at: r.expires_at })
                    .collect();
                Ok((snapshot, store.crls()?, jwts))
            })
            .await?;
        // In chunks that stay far below the message size limit; the CRLs
        // go with the first.
        let (mut jwts, mut crls): (Vec<pb::RevokedJwt>, _) = (jwts, crls);
        loop {
            let rest = jwts.split_off(jwts.len().min(JWT_REVOCATIONS_CHUNK));
            let crls = std::mem::take(&mut crls);
            let revocation = pb::Revocation { serials: Vec::new(), crls, jwts };
            send(tx, Event::Revocation(revocation)).await?;
            if rest.is_empty() {
                break;
            }
            jwts = rest;
        }
        let mut cursor = match snapshot {
            None => resume_from,
            Some((revision, entries)) => {
                let chunks: Vec<&[Entry]> = if entries.is_empty() {
                    vec![&[]]
                } else {
                    entries.chunks(SNAPSHOT_CHUNK).collect()
                };
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let snapshot = pb::EntrySnapshot {
                        entries: chunk.iter().map(Entry::to_proto).collect(),
                        revision,
                        complete: i == last,
                    };
                    send(tx, Event::Snapshot(snapshot)).await?;
                }
                revision
            }
        };
        info!(agent_id = %agent_id, revision = cursor, resumed_from = resume_from, "agent sync started");
        let shutdown = self.state.shutdown.clone();
        loop {
            let changes = match self.state.feed.since(cursor, SYNC_CHANGES_PAGE) {
                Some(changes) => changes,
                // Older than the shared window: read the log itself.
                None => {
                    let from = cursor;
                    let read = self
                        .state
                        .store_op(move |store| store.changes_since(from, SYNC_CHANGES_PAGE))
                        .await?;
                    read.into_iter().map(|c| Arc::new(FedChange::bare(c))).collect()
                }
            };
            if changes.is_empty() {
                tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    // End the stream so the server's graceful shutdown can finish.
                    _ = shutdown.cancelled() => return Ok(()),
                    changed = wake.changed() => if changed.is_err() { return Ok(()) },
                    _ = tokio::time::sleep(SYNC_RECHECK) => {
                        // Revocations and bans arrive through the log; a
                        // renewal (superseded SVID) or expiry is checked here.
                        self.check_caller(caller).await.map_err(|e| self.refuse("sync", agent_id.as_str(), e))?;
                    }
                }
                continue;
            }
            for fed in changes {
                cursor = fed.change.revision;
                if self.send_change(caller, &fed, &mut fresh_since, tx).await? {
                    if let Some(at) = fed.read_at {
                        let revocation = matches!(fed.change.kind, ChangeKind::Revoked { .. });
                        self.state.metrics.pushed(revocation, at.elapsed().as_secs_f64());
                    }
                }
            }
            send(tx, Event::Checkpoint(pb::Checkpoint { revision: cursor })).await?;
        }
    }

    /// Sends what one change means for this agent, if anything; true when
    /// something was sent.
    async fn send_change(
        &self,
        caller: &Caller,
        fed: &FedChange,
        fresh_since: &mut std::time::Instant,
        tx: &SyncSender,
    ) -> Result<bool, Status> {
        let (agent_id, change) = (&caller.id, &fed.change);
        let revision = change.revision;
        match &change.kind {
            ChangeKind::Entry { entry_id, parents } => {
                if !parents.iter().any(|p| p == agent_id.as_str()) {
                    return Ok(false);
                }
                // The entry as it is now (or as the feed read it, for every
                // stream at once) decides: kept if still ours, else dropped.
                let current = match &fed.entry {
                    Some(read) if fed.read_at.is_some_and(|at| at >= *fresh_since) => read.clone(),
                    _ => {
                        let id = entry_id.clone();
                        let read = self.state.store_op(move |store| store.entry(&id)).await?;
                        *fresh_since = std::time::Instant::now();
                        read
                    }
                };
                let change = match current {
                    Some(entry) if &entry.parent_id == agent_id => {
                        pb::entry_change::Change::Upserted(entry.to_proto())
                    }
                    _ => pb::entry_change::Change::RemovedEntryId(entry_id.clone()),
                };
                send(tx, Event::Change(pb::EntryChange { revision, change: Some(change) })).await?;
                Ok(true)
            }
            ChangeKind::Revoked { serials, jwts } => {
                if serials.contains(&caller.serial) {
                    warn!(agent_id = %agent_id, "closing sync stream: the agent's SVID was revoked");
                    return Err(AgentRefusal::Revoked(caller.serial.clone()).into());
                }
                // The commit that revoked also signed CRLs listing them:
                // the agent gets both in one message.
                let crls = self.state.feed.crls().as_ref().clone();
                let jwts = jwts
                    .iter()
                    .map(|j| pb::RevokedJwt { jti: j.jti.clone(), expires_at: j.expires_at })
                    .collect();
                let revocation = pb::Revocation { serials: serials.clone(), crls, jwts };
                send(tx, Event::Revocation(revocation)).await?;
                Ok(true)
            }
            ChangeKind::Crls => {
                let crls = self.state.feed.crls().as_ref().clone();
                send(tx, Event::Revocation(pb::Revocation { crls, ..Default::default() })).await?;
                Ok(false)
            }
            ChangeKind::Bundle => {
                send(tx, Event::Bundle(self.bundle_update())).await?;
                Ok(false)
            }
            ChangeKind::AgentBanned { agent_id: banned, reason } if banned == agent_id.as_str() => {
                warn!(agent_id = %agent_id, "closing sync stream of banned agent");
                send(tx, Event::Banned(pb::AgentBanned { reason: reason.clone() })).await?;
                Err(AgentRefusal::Banned(banned.clone()).into())
            }
            ChangeKind::AgentEvicted { agent_id: evicted } if evicted == agent_id.as_str() => {
                warn!(agent_id = %agent_id, "closing sync stream of evicted agent");
                Err(agent_refused(
                    Refusal::Evicted,
                    format!("agent {agent_id} was evicted; attest again"),
                ))
            }
            _ => Ok(false),
        }
    }
}
