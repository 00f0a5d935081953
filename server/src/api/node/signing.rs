//! Signing batches for agents: the per-agent budget, each item checked
//! against its entry as read now, and the batch recorded (with each
//! issuance's event) before anything is returned.

use std::sync::Arc;

use tessera_proto::node as pb;
use tessera_proto::types::{self as types, Status as ItemStatus};
use tessera_workload_api::SpiffeId;
use tonic::Status;

use crate::ca::csr::parse_csr;
use crate::ca::jwt::SignedJwt;
use crate::ca::SignedSvid;
use crate::entry::Entry;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::{EntriesRead, Signed, MAX_BATCH};
use tessera_common::rate::TokenBucket;

use super::service::*;

impl NodeService {
    /// Takes `n` CSRs from the agent's signing budget, or says when to
    /// retry. Servers sharing a datastore share the budget through it.
    pub(super) async fn take_sign_budget(
        &self,
        agent_id: &SpiffeId,
        n: usize,
    ) -> Result<(), Status> {
        let config = &self.state.config();
        let over = || {
            Status::resource_exhausted(format!(
                "agent {agent_id} is over its signing limit ({} CSRs/s, burst {}); retry later",
                config.sign_rate, config.sign_burst
            ))
        };
        if config.datastore.is_some() {
            let (agent, rate, burst) = (agent_id.to_string(), config.sign_rate, config.sign_burst);
            let now_ms = self.state.clock().now_ms();
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
            (config.sign_rate, config.sign_burst, self.state.clock().now_ms());
        let mut limits = self.sign_limits.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = limits.entry(agent_id.to_string()).or_insert(TokenBucket::full(burst, now_ms));
        if !bucket.take(n as f64, f64::from(rate), burst, now_ms) {
            return Err(over());
        }
        Ok(())
    }

    /// One signing batch: checked against the size limit and the agent's
    /// budget, each item signed by `sign` (with its entry as read now) off
    /// the async workers, and what was signed recorded.
    pub(super) async fn sign_batch<I, T, F>(
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
        let read = self.batch_entries(op, caller, entry_ids).await?;
        let (read_at, entries) = (read.revision, read.entries);
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
        self.record_batch(caller, read_at, signed).await
    }

    /// Checks a signing batch against the size limit and the agent's
    /// budget, and reads its entries.
    pub(super) async fn batch_entries(
        &self,
        op: &str,
        caller: &Caller,
        ids: Vec<String>,
    ) -> Result<EntriesRead, Status> {
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
        self.state.store_op(move |store| store.entries_for_signing(&ids)).await
    }

    /// Records what a batch signed (durably) before the agent can use it,
    /// checked in the same commit against the agent and the entries as they
    /// are now: an SVID signed while its entry was deleted or changed, or
    /// its agent banned, is revoked at once instead of escaping.
    pub(super) async fn record_batch<T, F>(
        &self,
        caller: &Caller,
        read_at: u64,
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
        let now = self.state.clock().now();
        let (key, serial) = (caller.id.to_string(), caller.serial.clone());
        let count = records.len();
        let recorded = if records.is_empty() {
            Vec::new()
        } else {
            self.state
                .store_op(move |store| store.record_issued(&key, &serial, read_at, records, now))
                .await?
        };
        if recorded.len() != count {
            return Err(Status::internal("the store recorded a different number of SVIDs"));
        }
        let mut recorded = recorded.into_iter();
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
                Some((record, Ok(()))) => Recorded::Issued(signed, record),
                Some((record, Err(why))) => {
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
    pub(super) fn sign_jwt_item(
        &self,
        agent_id: &SpiffeId,
        item: pb::SignJwtItem,
        entry: Option<Arc<Entry>>,
    ) -> Result<(SignedJwt, Signed), pb::SignJwtResult> {
        // The entry as read, for a refusal's event (its ID made only then).
        let read = entry.clone();
        let fail = |code: tonic::Code, message: String| {
            let mut e = schema::denied(kind::JWT_ISSUE, message.clone())
                .code(schema::grpc_code(code))
                .agent(agent_id.as_str())
                .entry(item.entry_id.clone());
            e.spiffe_ids.extend(read.as_ref().map(|e| e.spiffe_id.to_string()));
            e.audience = item.audience.clone();
            self.state.events().record(vec![e]);
            jwt_item_failure(&item.entry_id, code, message)
        };
        let entry = parented_entry(agent_id, &item.entry_id, entry).map_err(|(c, m)| fail(c, m))?;
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
        let now = self.state.clock().now();
        let ttl = entry.ttl_at(self.state.rules().jwt_ttl(entry.jwt_svid_ttl), now);
        if entry.is_expired(now) || ttl == 0 {
            return Err(fail(
                tonic::Code::PermissionDenied,
                format!("entry {} has expired", entry.id),
            ));
        }
        match self.state.ca().sign_jwt(&entry.spiffe_id, &audience, ttl) {
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
                event.audience = audience;
                Ok((jwt, Signed { svid: issued, entry, event }))
            }
            Err(e) => Err(fail(tonic::Code::Internal, e.to_string())),
        }
    }

    // The refusal is the item's own answer, sent as it is: no box.
    #[allow(clippy::result_large_err)]
    pub(super) fn sign_item(
        &self,
        agent_id: &SpiffeId,
        item: pb::SignX509Item,
        entry: Option<Arc<Entry>>,
    ) -> Result<(SignedSvid, Signed), pb::SignX509Result> {
        // The entry as read, for a refusal's event (its ID made only then).
        let read = entry.clone();
        let fail = |code: tonic::Code, message: String| {
            let mut e = schema::denied(kind::X509_ISSUE, message.clone())
                .code(schema::grpc_code(code))
                .agent(agent_id.as_str())
                .entry(item.entry_id.clone());
            e.spiffe_ids.extend(read.as_ref().map(|e| e.spiffe_id.to_string()));
            self.state.events().record(vec![e]);
            item_failure(&item.entry_id, code, message)
        };
        let entry = parented_entry(agent_id, &item.entry_id, entry).map_err(|(c, m)| fail(c, m))?;
        let now = self.state.clock().now();
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
        match self.state.ca().sign_svid(&key, &entry.spiffe_id, ttl, &entry.dns_names) {
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

/// The entry a signing item names, if it exists and is parented to the
/// calling agent; else the item's refusal (code and words).
fn parented_entry(
    agent_id: &SpiffeId,
    entry_id: &str,
    entry: Option<Arc<Entry>>,
) -> Result<Arc<Entry>, (tonic::Code, String)> {
    let entry =
        entry.ok_or_else(|| (tonic::Code::NotFound, format!("entry {entry_id} not found")))?;
    if &entry.parent_id != agent_id {
        return Err((
            tonic::Code::PermissionDenied,
            format!("entry {} is not parented to {agent_id}", entry.id),
        ));
    }
    Ok(entry)
}

/// The event of one signed item (the store turns it into a denial if the
/// commit that records the item revokes it).
fn issued_event(kind: &str, agent_id: &SpiffeId, entry: &Entry) -> types::Event {
    schema::event(kind, schema::ALLOW)
        .agent(agent_id.as_str())
        .spiffe_id(entry.spiffe_id.as_str())
        .entry(entry.id.clone())
}

pub(super) fn item_failure(
    entry_id: &str,
    code: tonic::Code,
    message: String,
) -> pb::SignX509Result {
    pb::SignX509Result {
        entry_id: entry_id.to_string(),
        status: Some(ItemStatus { code: code as i32, message, ..Default::default() }),
        ..Default::default()
    }
}

/// Puts a typed refusal, if any, on an item's status.
pub(super) fn typed_item(status: Option<&mut ItemStatus>, refusal: tessera_proto::Refusal) {
    if let Some(status) = status {
        status.refusal = refusal.as_str().to_string();
    }
}

pub(super) fn jwt_item_failure(
    entry_id: &str,
    code: tonic::Code,
    message: String,
) -> pb::SignJwtResult {
    pb::SignJwtResult {
        entry_id: entry_id.to_string(),
        status: Some(ItemStatus { code: code as i32, message, ..Default::default() }),
        ..Default::default()
    }
}

/// Signs one item of a batch for the calling agent, given its entry as read
/// now: the signed credential and its record, or the item's refusal.
pub(super) type SignItem<I, T, F> =
    fn(&NodeService, &SpiffeId, I, Option<Arc<Entry>>) -> Result<(T, Signed), F>;

/// What became of one signed item of a batch.
pub(super) enum Recorded<T, F> {
    /// Refused before signing.
    Refused(F),
    /// Signed and recorded.
    Issued(T, Signed),
    /// Signed, but revoked as it was recorded (why).
    Revoked(Signed, crate::store::ItemRefused),
}

/// One result per item of a signing batch: a refusal as it is, an issued
/// item by `issued`, an item revoked as it was recorded by `revoked`.
pub(super) fn answer<T, R>(
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
    /// Counts a signing batch (its events were stored with its records).
    pub(super) fn issued(&self, kind: &'static str, started: std::time::Instant, signed: usize) {
        self.state.metrics().issued(kind, signed, started.elapsed().as_secs_f64());
    }
}
