//! The admin API (operator ↔ server) on the server's Unix socket. Refusals
//! are logged here, once, with their reason.

use std::pin::Pin;
use std::sync::Arc;

use tessera_proto::admin::{self as pb, admin_server::Admin};
use tessera_proto::types::{self as types, Operator, Status as ItemStatus};
use tessera_workload_api::SpiffeId;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::admin_ops::MAX_PAGE;
use crate::admin_peer::{operator_of, AdminPeer};
use crate::approval::ApprovalRefusal;
use crate::entry::{Entry, EntryError};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::events::entry_json;
use crate::revocation::{normalize_serial, revoke_issued};
use crate::state::State;
use crate::store::AgentRefusal;
use crate::store::{
    join_token_key, svid_key, Approved, Audit, EntryFilter, EntryWrite, Store, StoreError,
    StoreReport, MAX_BATCH,
};

/// A store batch write at a time: per-item results and what it revoked.
type BatchWrite = fn(
    &dyn Store,
    &[Entry],
    i64,
    Option<Operator>,
    DescribeItems,
) -> Result<EntryWrite, StoreError>;

/// Builds the events of a batch's stored items, inside its commit.
type DescribeItems = Box<dyn Fn(&[Result<Entry, EntryError>]) -> Vec<types::Event> + Send>;

/// Bytes per message of a streamed backup.
const BACKUP_CHUNK: usize = 1024 * 1024;

/// How often relying parties should re-read the bundle (the SPIFFE
/// bundle's `spiffe_refresh_hint`): well within a CA's prepare-to-activate
/// window at the default CA lifetime.
pub const BUNDLE_REFRESH_HINT_SECS: u64 = 300;

/// The store check's report as the admin API sends it.
pub fn report_proto(report: &StoreReport) -> pb::StoreReport {
    pb::StoreReport {
        revision: report.revision,
        write_seq: report.write_seq,
        entries: report.entries as u64,
        agents: report.agents as u64,
        issued_svids: report.issued as u64,
        revocations: report.revocations as u64,
    }
}

/// Lets operators through (root, the server's uid, `admin_uids`,
/// `admin_gids`); refuses, records and logs anyone else.
pub fn authorize(state: &State, request: Request<()>) -> Result<Request<()>, Status> {
    let method = request
        .extensions()
        .get::<crate::admin_peer::CalledMethod>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    let peer = request.extensions().get::<AdminPeer>();
    let operator = peer.map(|p| p.operator);
    let verdict = match peer {
        Some(peer) => state.governance.operators.authorize(peer),
        None => Err("the caller's peer credentials are unknown".to_string()),
    };
    match verdict {
        Ok(()) => Ok(request),
        Err(why) => {
            // The first refusal of a uid in an interval is an event at once;
            // the rest are folded into one with a count (`flush_refusals`).
            let uid = operator.map_or(u32::MAX, |o| o.uid);
            if state.governance.refused.note(uid, &why, false) {
                let e = schema::denied(kind::ADMIN_REFUSED, why.clone())
                    .code(schema::grpc_code(tonic::Code::PermissionDenied))
                    .operator(operator)
                    .attr("method", &method)
                    .attr("count", 1);
                state.events.record(vec![e]);
            }
            Err(Status::permission_denied(why))
        }
    }
}

/// Records the admin refusals folded since the last call: one
/// `admin.refused` event per uid with `count`.
pub fn flush_refusals(state: &State) {
    let events: Vec<types::Event> = state
        .governance
        .refused
        .take()
        .into_iter()
        .map(|(uid, f)| {
            tracing::warn!(uid, refused = f.count, "admin calls refused");
            schema::denied(
                kind::ADMIN_REFUSED,
                format!(
                    "{} more admin calls refused from uid {uid} (last: {})",
                    f.count, f.last_reason
                ),
            )
            .code(schema::grpc_code(tonic::Code::PermissionDenied))
            .operator(Some(Operator { uid, gid: 0, pid: 0 }))
            .attr("count", f.count)
        })
        .collect();
    if !events.is_empty() {
        state.events.record(events);
    }
}

/// The status of a refused proposal or approval.
fn approval_code(refusal: &ApprovalRefusal) -> tonic::Code {
    match refusal {
        ApprovalRefusal::NotFound(_) => tonic::Code::NotFound,
        ApprovalRefusal::HashRequired => tonic::Code::InvalidArgument,
        ApprovalRefusal::SameOperator { .. } => tonic::Code::PermissionDenied,
        ApprovalRefusal::Entry(e) => e.code(),
        _ => tonic::Code::FailedPrecondition,
    }
}

/// An admin event: `kind` allowed for `operator`.
fn admin_event(kind: &str, operator: &Option<Operator>) -> types::Event {
    schema::event(kind, schema::ALLOW).operator(*operator)
}

/// The event of an entry written, proposed, approved or deleted.
fn entry_event(
    kind: &str,
    operator: &Option<Operator>,
    before: Option<&types::Entry>,
    after: Option<&types::Entry>,
) -> types::Event {
    let mut e = admin_event(kind, operator);
    if let Some(entry) = after.or(before) {
        e.spiffe_ids.push(entry.spiffe_id.clone());
        e.entry_ids.push(entry.id.clone());
        e.agent_id = entry.parent_id.clone();
    }
    e.before = before.map(entry_json).unwrap_or_default();
    e.after = after.map(entry_json).unwrap_or_default();
    e
}

/// What an approval wrote: the entry, or for a join token the proposal.
fn approved_entry(approved: &Approved) -> types::Entry {
    match approved.write.results.first() {
        Some(Ok(entry)) => entry.to_proto(),
        _ => types::Entry { pending: None, ..approved.proposal.clone() },
    }
}

/// The event of an approval, stored in its commit.
fn approval_event(operator: &Option<Operator>, approved: &Approved) -> types::Event {
    let approval = approved.proposal.pending.clone().unwrap_or_default();
    let after = approved_entry(approved);
    let before = approved.write.previous.iter().flatten().next().map(Entry::to_proto);
    let mut e = entry_event(kind::ENTRY_APPROVE, operator, before.as_ref(), Some(&after))
        .attr("op", &approval.op)
        .attr("proposal_id", &approval.proposal_id)
        .attr("content_hash", &approval.content_hash)
        .attr("requested_by_uid", approval.requested_by_uid);
    e.reason = approval.reasons.join("; ");
    e
}

/// Drops proposals past their time, each with an event.
pub async fn expire_proposals(state: &State) {
    let now = state.clock.now();
    let proposals = match state.governance.pending.list() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reading proposals failed");
            return;
        }
    };
    for p in proposals {
        if p.pending.as_ref().is_some_and(|a| a.expires_at <= now) {
            let proposal_id = p.pending.as_ref().map(|a| a.proposal_id.clone());
            let mut e = entry_event(kind::ENTRY_REJECT, &None, Some(&p), None);
            e.decision = schema::DENY.into();
            e.reason = "no operator approved it in time".into();
            let audit = Audit::if_done(None, vec![e]);
            let key = p.id.clone();
            let removed = state
                .store_op(move |store| store.remove_proposal(&key, proposal_id.as_deref(), &audit))
                .await;
            // Approved, rejected or replaced meanwhile (or by another server): false.
            if let Err(e) = removed {
                tracing::error!(error = %e.message(), "dropping an expired proposal failed");
            }
        }
    }
}

/// The admin API service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    /// The service over shared server state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    fn check_batch(len: usize) -> Result<(), Status> {
        if len == 0 {
            return Err(Status::invalid_argument("batch is empty"));
        }
        if len > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "batch has {len} items, more than the {MAX_BATCH} allowed"
            )));
        }
        Ok(())
    }

    /// Validates each item; holds for approval those the policy matches;
    /// stores the other valid ones with `write`; returns results in request order.
    async fn write_entries(
        &self,
        op: &'static str,
        operator: Option<Operator>,
        inputs: Vec<types::Entry>,
        prepare: impl Fn(&types::Entry, Entry) -> Result<Entry, EntryError>,
        write: BatchWrite,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        Self::check_batch(inputs.len())?;
        let now = self.state.clock.now();
        let event_kind =
            if op == crate::approval::OP_CREATE { kind::ENTRY_CREATE } else { kind::ENTRY_UPDATE };
        let mut results: Vec<Option<Result<types::Entry, EntryError>>> =
            Vec::with_capacity(inputs.len());
        let mut valid = Vec::new();
        let mut slots = Vec::new();
        for input in &inputs {
            match self.state.rules.validate(input, now).and_then(|e| prepare(input, e)) {
                Ok(entry) => {
                    valid.push(entry);
                    slots.push(results.len());
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        // The versions being replaced (for updates): what the policy compares
        // against, and the events' "before".
        let ids: Vec<String> = valid.iter().map(|e| e.id.clone()).collect();
        let olds: std::collections::HashMap<String, Entry> = if op == crate::approval::OP_UPDATE {
            self.state
                .store_op(move |store| {
                    let mut olds = std::collections::HashMap::new();
                    for id in ids {
                        if let Some(old) = store.entry(&id)? {
                            olds.insert(id, old);
                        }
                    }
                    Ok(olds)
                })
                .await?
        } else {
            Default::default()
        };
        let caller = operator.unwrap_or_default();
        let mut events = Vec::new();
        let mut direct = Vec::new();
        let mut direct_slots = Vec::new();
        for (mut entry, slot) in valid.into_iter().zip(slots) {
            let old = olds.get(&entry.id);
            if let Some(old) = old {
                // Once approval was required, every change needs it.
                entry.require_approval |= old.require_approval;
            }
            if op == crate::approval::OP_UPDATE {
                match old {
                    // Nothing to judge against: never written unjudged.
                    None => {
                        results[slot] = Some(Err(EntryError::NotFound(entry.id.clone())));
                        continue;
                    }
                    // Nothing changes: nothing is written (no new revision
                    // that would void a proposal waiting for the entry).
                    Some(old) if old.same_content(&entry) => {
                        results[slot] = Some(Ok(old.to_proto()));
                        continue;
                    }
                    // Decided against this revision: the write is refused
                    // if the entry moved on meanwhile (an approval, another
                    // operator), so what was judged is what is replaced.
                    Some(old) => entry.revision = old.revision,
                }
            }
            let policy = &self.state.governance.policy;
            // Any change to an entry the policy matches, before or after it,
            // needs approval (so an approved entry cannot be changed alone).
            let reasons = match old {
                Some(old) => policy.update_reasons(old, &entry),
                None => policy.reasons(&entry),
            };
            if reasons.is_empty() {
                direct.push(entry);
                direct_slots.push(slot);
                continue;
            }
            let proposal = crate::approval::proposal(
                &entry,
                op,
                &caller,
                reasons.clone(),
                now,
                self.state.config.pending_ttl(),
                old.map_or(0, |o| o.revision),
            );
            let mut e = entry_event(
                kind::ENTRY_PENDING,
                &operator,
                old.map(Entry::to_proto).as_ref(),
                Some(&proposal),
            );
            e.reason = reasons.join("; ");
            e = e.attr("op", op);
            let audit = Audit::if_ok(operator, vec![e]);
            let stored = proposal.clone();
            let held = self.state.store_op(move |store| store.propose(&stored, &audit)).await?;
            if let Err(refusal) = held {
                // Recorded as this item's refusal below.
                results[slot] = Some(Err(EntryError::Pending(refusal.to_string())));
                continue;
            }
            results[slot] = Some(Ok(proposal));
        }
        let mut revoked = Vec::new();
        if !direct.is_empty() {
            // Each stored item's event, in the commit that stores it.
            let before: std::collections::HashMap<String, types::Entry> =
                olds.iter().map(|(id, e)| (id.clone(), e.to_proto())).collect();
            let describe: DescribeItems = Box::new(move |results| {
                results
                    .iter()
                    .flatten()
                    .map(|entry| {
                        let after = entry.to_proto();
                        entry_event(event_kind, &operator, before.get(&entry.id), Some(&after))
                    })
                    .collect()
            });
            let stored = self
                .state
                .store_op(move |store| write(store, &direct, now, operator, describe))
                .await?;
            for (slot, result) in direct_slots.into_iter().zip(stored.results) {
                results[slot] = Some(result.map(|e| e.to_proto()));
            }
            revoked = stored.revoked;
        }
        let mut response = pb::BatchEntryResponse::default();
        for (input, result) in inputs.iter().zip(results) {
            let result = result.unwrap_or(Err(EntryError::MissingId));
            response.results.push(match result {
                // Its event was stored with it (the entry or the proposal).
                Ok(entry) => pb::EntryResult { status: Some(ok()), entry: Some(entry) },
                // A refusal changes nothing: its event is best-effort.
                Err(e) => {
                    let mut event = schema::denied(event_kind, e.to_string())
                        .code(schema::grpc_code(e.code()))
                        .operator(operator)
                        .spiffe_id(input.spiffe_id.clone());
                    if !input.id.is_empty() {
                        event.entry_ids.push(input.id.clone());
                    }
                    events.push(event);
                    pb::EntryResult { status: Some(item_status(e.code(), &e)), entry: None }
                }
            });
        }
        self.state.events.record(events);
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(response))
    }

    /// Records a refused approval and returns the status.
    fn deny_approval(&self, operator: &Option<Operator>, id: &str, status: Status) -> Status {
        let e = schema::refused(kind::ENTRY_APPROVE, &status).operator(*operator).entry(id);
        self.state.events.record(vec![e]);
        status
    }

    /// A SPIFFE ID from a request, or its refusal.
    fn parse_id(
        &self,
        operator: &Option<Operator>,
        field: &str,
        value: &str,
    ) -> Result<SpiffeId, Status> {
        SpiffeId::parse(value)
            .map_err(|e| self.refuse(operator, field, format!("invalid {field}: {e}")))
    }

    /// Refuses a request for bad input, with an event.
    fn refuse(&self, operator: &Option<Operator>, what: &str, message: String) -> Status {
        self.refuse_with(operator, what, Status::invalid_argument(message))
    }

    /// Refuses a request with `status` (e.g. one the store's state
    /// refuses: `FailedPrecondition`), with an event.
    fn refuse_with(&self, operator: &Option<Operator>, what: &str, status: Status) -> Status {
        let e =
            schema::refused(kind::ADMIN_REFUSED, &status).operator(*operator).attr("request", what);
        self.state.events.record(vec![e]);
        status
    }
}

fn ok() -> ItemStatus {
    ItemStatus { code: 0, ..Default::default() }
}

fn item_status(code: tonic::Code, message: &impl ToString) -> ItemStatus {
    ItemStatus { code: code as i32, message: message.to_string(), ..Default::default() }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn batch_create_entry(
        &self,
        request: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        let operator = operator_of(&request);
        let inputs = request.into_inner().entries;
        self.write_entries(
            "create",
            operator,
            inputs,
            |_, mut entry| {
                entry.id = uuid::Uuid::new_v4().to_string();
                Ok(entry)
            },
            |store, entries, _, operator, describe| {
                let audit = Audit::new(operator, move |results: &Vec<_>| describe(results));
                let results = store.create_entries(entries, &audit)?;
                Ok(EntryWrite { results, ..Default::default() })
            },
        )
        .await
    }

    async fn batch_update_entry(
        &self,
        request: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        let operator = operator_of(&request);
        let inputs = request.into_inner().entries;
        // The store revokes, in the same commit, the SVIDs an update no
        // longer authorizes (new SPIFFE ID, parent or DNS names, earlier expiry).
        self.write_entries(
            crate::approval::OP_UPDATE,
            operator,
            inputs,
            |input, mut entry| {
                if input.id.is_empty() {
                    return Err(EntryError::MissingId);
                }
                entry.id = input.id.clone();
                Ok(entry)
            },
            |store, entries, now, operator, describe| {
                let audit =
                    Audit::new(operator, move |write: &EntryWrite| describe(&write.results));
                store.update_entries(entries, now, "entry updated", &audit)
            },
        )
        .await
    }

    async fn batch_delete_entry(
        &self,
        request: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchDeleteEntryResponse>, Status> {
        let operator = operator_of(&request);
        let ids = request.into_inner().ids;
        Self::check_batch(ids.len())?;
        // A proposal with the ID goes too (deleting a pending entry rejects
        // it), with its event in the same commit.
        let mut proposals = Vec::new();
        for id in &ids {
            let proposal = self
                .state
                .governance
                .pending
                .get(id)
                .map_err(|e| Status::internal(e.to_string()))?;
            if let Some(p) = &proposal {
                let mut e = entry_event(kind::ENTRY_REJECT, &operator, Some(p), None);
                e.reason = "deleted by operator".into();
                let audit = Audit::if_done(operator, vec![e]);
                let key = id.clone();
                self.state.store_op(move |store| store.remove_proposal(&key, None, &audit)).await?;
            }
            proposals.push(proposal);
        }
        let request_ids = ids.clone();
        let now = self.state.clock.now();
        // The delete, the revocation of the entries' SVIDs and their events
        // are one commit.
        let audit = Audit::new(operator, move |write: &EntryWrite| {
            let deleted = write.results.iter().flatten();
            deleted
                .map(|e| entry_event(kind::ENTRY_DELETE, &operator, Some(&e.to_proto()), None))
                .collect()
        });
        let write = self
            .state
            .store_op(move |store| store.delete_entries(&ids, now, "entry deleted", &audit))
            .await?;
        let mut response = pb::BatchDeleteEntryResponse::default();
        let mut events = Vec::new();
        for ((id, result), proposal) in request_ids.into_iter().zip(write.results).zip(proposals) {
            let status = match result {
                Ok(_) => ok(),
                Err(_) if proposal.is_some() => ok(),
                Err(e) => {
                    events.push(
                        schema::denied(kind::ENTRY_DELETE, e.to_string())
                            .code(schema::grpc_code(e.code()))
                            .operator(operator)
                            .entry(id.clone()),
                    );
                    item_status(e.code(), &e)
                }
            };
            response.results.push(pb::DeleteResult { id, status: Some(status) });
        }
        // Refusals only (they change nothing): best-effort.
        self.state.events.record(events);
        crate::revocation::revoked(&self.state, &write.revoked).await?;
        Ok(Response::new(response))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let filter = EntryFilter {
            parent_id: (!req.parent_id.is_empty())
                .then(|| self.parse_id(&operator, "parent ID", &req.parent_id))
                .transpose()?,
            spiffe_id: (!req.spiffe_id.is_empty())
                .then(|| self.parse_id(&operator, "SPIFFE ID", &req.spiffe_id))
                .transpose()?,
        };
        let query = crate::admin_ops::selector_query(&req.selectors, req.selector_match)?;
        let limit = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let first_page = req.page_token.is_empty();
        let after = (!req.page_token.is_empty()).then_some(req.page_token);
        let pending = if first_page {
            self.state
                .governance
                .pending
                .list()
                .map_err(|e| Status::internal(e.to_string()))?
                .into_iter()
                .filter(|p| {
                    filter.parent_id.as_ref().is_none_or(|id| p.parent_id == id.as_str())
                        && filter.spiffe_id.as_ref().is_none_or(|id| p.spiffe_id == id.as_str())
                        && query.matches_proto(p)
                })
                .collect()
        } else {
            Vec::new()
        };
        let entries = if query.selectors.is_empty() {
            self.state
                .store_op(move |store| store.list_entries(&filter, after.as_deref(), limit))
                .await?
        } else {
            crate::admin_ops::matching_entries(&self.state, filter, query, after, limit).await?
        };
        let next_page_token = if entries.len() == limit {
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(Entry::to_proto).collect(),
            next_page_token,
            pending,
        }))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let id = request.into_inner().id;
        let lookup = id.clone();
        match self.state.store_op(move |store| store.entry(&lookup)).await? {
            Some(entry) => Ok(Response::new(entry.to_proto())),
            None => match self.state.governance.pending.get(&id) {
                Ok(Some(proposal)) => Ok(Response::new(proposal)),
                Ok(None) => Err(Status::not_found(format!("entry {id} not found"))),
                Err(e) => Err(Status::internal(e.to_string())),
            },
        }
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let config = &self.state.config;
        let ttl = if req.ttl == 0 { config.join_token_ttl } else { req.ttl };
        let token = uuid::Uuid::new_v4().to_string();
        let spiffe_id = if req.spiffe_id.is_empty() {
            SpiffeId::from_parts(
                &config.trust_domain,
                &format!("/tessera/agent/join_token/{token}"),
            )
            .map_err(|e| Status::internal(e.to_string()))?
        } else {
            let id = self.parse_id(&operator, "agent SPIFFE ID", &req.spiffe_id)?;
            if id.trust_domain() != &config.trust_domain {
                let message =
                    format!("agent SPIFFE ID {id} is not in trust domain {}", config.trust_domain);
                return Err(self.refuse(&operator, "join token", message));
            }
            if id.is_root() || id.path() == "/tessera/server" {
                let message = format!("agent SPIFFE ID {id} is reserved");
                return Err(self.refuse(&operator, "join token", message));
            }
            id
        };
        let now = self.state.clock.now();
        let mut reasons = self.state.governance.policy.agent_id_reasons(&spiffe_id);
        // Whoever attests with the token serves the entries parented to its
        // ID: when the policy matches any of them, the token needs the same
        // second operator they did.
        let parent = spiffe_id.clone();
        let children = self.state.store_op(move |store| store.entries_by_parent(&parent)).await?;
        let matched: Vec<&Entry> = children
            .iter()
            .filter(|e| !self.state.governance.policy.reasons(e).is_empty())
            .collect();
        if let Some(first) = matched.first() {
            reasons.push(format!(
                "the agent ID is the parent of {} entr{} the approval policy matches (e.g. {})",
                matched.len(),
                if matched.len() == 1 { "y" } else { "ies" },
                first.spiffe_id
            ));
        }
        if !reasons.is_empty() {
            // Held for a second operator like an entry: the token is stored
            // (hashed) only when the proposal is approved, and works for
            // `ttl` seconds from then.
            let proposal = crate::approval::join_token_proposal(
                spiffe_id.as_str(),
                String::from_utf8_lossy(&join_token_key(&token)).into_owned(),
                ttl,
                &operator.unwrap_or_default(),
                reasons.clone(),
                now,
                config.pending_ttl(),
            );
            let mut e = entry_event(kind::ENTRY_PENDING, &operator, None, Some(&proposal))
                .attr("op", crate::approval::OP_JOIN_TOKEN)
                .attr("ttl", ttl);
            e.reason = reasons.join("; ");
            let (stored, audit) = (proposal.clone(), Audit::if_ok(operator, vec![e]));
            // Refused at once when the ID is an agent's or an entry's.
            let held = self.state.store_op(move |store| store.propose(&stored, &audit)).await?;
            if let Err(refusal) = held {
                let status = Status::new(approval_code(&refusal), refusal.to_string());
                return Err(self.refuse_with(&operator, "join token", status));
            }
            return Ok(Response::new(types::JoinToken {
                token,
                spiffe_id: spiffe_id.to_string(),
                expires_at: 0,
                pending: proposal.pending,
                approved: false,
            }));
        }
        let record = types::JoinToken {
            token,
            spiffe_id: spiffe_id.to_string(),
            expires_at: now + i64::from(ttl),
            pending: None,
            approved: false,
        };
        let e =
            admin_event(kind::JOIN_TOKEN, &operator).agent(spiffe_id.to_string()).attr("ttl", ttl);
        let (stored, audit) = (record.clone(), Audit::if_ok(operator, vec![e]));
        let put = self.state.store_op(move |store| store.put_join_token(&stored, &audit)).await?;
        if let Err(refusal) = put {
            let status = Status::failed_precondition(refusal.to_string());
            return Err(self.refuse_with(&operator, "join token", status));
        }
        Ok(Response::new(record))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        crate::admin_ops::list_agents(&self.state, request).await
    }

    async fn count_entries(
        &self,
        _request: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        crate::admin_ops::count_entries(&self.state).await
    }

    async fn count_agents(
        &self,
        _request: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        crate::admin_ops::count_agents(&self.state).await
    }

    async fn purge_agents(
        &self,
        request: Request<pb::PurgeAgentsRequest>,
    ) -> Result<Response<pb::PurgeAgentsResponse>, Status> {
        crate::admin_ops::purge_agents(&self.state, request).await
    }

    async fn mint_x509_svid(
        &self,
        request: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        crate::admin_ops::mint_x509(&self.state, request).await
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        crate::admin_ops::mint_jwt(&self.state, request).await
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        let operator = operator_of(&request);
        let id = self.parse_id(&operator, "agent SPIFFE ID", &request.into_inner().spiffe_id)?;
        let key = id.to_string();
        match self.state.store_op(move |store| store.agent(&key)).await? {
            Some(agent) => Ok(Response::new(agent)),
            None => Err(Status::not_found(format!("agent {id} not found"))),
        }
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(pb::Bundle {
            trust_domain: self.state.config.trust_domain.to_string(),
            authorities: self.state.ca.bundle().iter().map(|c| c.to_vec()).collect(),
            crls: self.state.store_op(|store| store.crls()).await?,
            jwt_authorities: self.state.ca.jwt_authorities(),
            sequence: self.state.ca.bundle_sequence(),
            refresh_hint: BUNDLE_REFRESH_HINT_SECS,
        }))
    }

    async fn ban_agent(
        &self,
        request: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let id = self.parse_id(&operator, "agent SPIFFE ID", &req.spiffe_id)?;
        let reason =
            if req.reason.is_empty() { "banned by operator".to_string() } else { req.reason };
        let (key, why, now) = (id.to_string(), reason.clone(), self.state.clock.now());
        let banned = admin_event(kind::AGENT_BAN, &operator).agent(id.to_string());
        let audit =
            Audit::new(operator, move |r: &Result<Vec<types::Revocation>, AgentRefusal>| {
                let Ok(revoked) = r else { return Vec::new() };
                let mut e = banned.clone().attr("revoked", revoked.len());
                e.reason = reason.clone();
                vec![e]
            });
        // One commit: the ban, the revocation of everything issued to or
        // through the agent, the change that closes its stream, the events.
        let revoked = self
            .state
            .store_op(move |store| store.ban_agent(&key, &why, now, &audit))
            .await?
            .map_err(|refusal| {
                let e = schema::denied(kind::AGENT_BAN, refusal.to_string())
                    .code(refusal.kind().as_str())
                    .operator(operator)
                    .agent(id.to_string());
                self.state.events.record(vec![e]);
                Status::not_found(format!("agent {id} not found"))
            })?;
        crate::revocation::revoked(&self.state, &revoked).await?;
        let (jwts, x509): (Vec<_>, Vec<_>) = revoked.into_iter().partition(|r| !r.jti.is_empty());
        Ok(Response::new(pb::BanAgentResponse {
            revoked_serials: x509.into_iter().map(|r| r.serial).collect(),
            revoked_jtis: jwts.into_iter().map(|r| r.jti).collect(),
        }))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let id = self.parse_id(&operator, "agent SPIFFE ID", &req.spiffe_id)?;
        let (key, unban, now) = (id.to_string(), req.unban, self.state.clock.now());
        let e =
            admin_event(kind::AGENT_EVICT, &operator).agent(id.to_string()).attr("unban", unban);
        let audit = Audit::if_ok(operator, vec![e]);
        let revoked = self
            .state
            .store_op(move |store| store.evict_agent(&key, unban, now, &audit))
            .await?
            .map_err(|refusal| {
                let e = schema::denied(kind::AGENT_EVICT, refusal.to_string())
                    .code(refusal.kind().as_str())
                    .operator(operator)
                    .agent(id.to_string());
                self.state.events.record(vec![e]);
                Status::not_found(format!("agent {id} not found"))
            })?;
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn revoke_svid(
        &self,
        request: Request<pb::RevokeSvidRequest>,
    ) -> Result<Response<types::Revocation>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let refused = |what: &str, e: String| {
            let event = schema::denied(kind::REVOKE, e.clone())
                .code(schema::grpc_code(tonic::Code::InvalidArgument))
                .operator(operator)
                .attr("svid", what);
            self.state.events.record(vec![event]);
            Status::invalid_argument(e)
        };
        let (lookup, serial) = match (req.serial.is_empty(), req.jti.is_empty()) {
            (false, true) => {
                let serial = normalize_serial(&req.serial).map_err(|e| refused(&req.serial, e))?;
                (serial.clone(), format!("serial {serial}"))
            }
            (true, false) => {
                if req.jti.len() > 256 || req.jti.chars().any(char::is_control) {
                    return Err(refused(
                        &req.jti,
                        "invalid jti: want up to 256 printable characters".into(),
                    ));
                }
                (svid_key("", &req.jti), format!("jti {}", req.jti))
            }
            _ => return Err(refused("", "give exactly one of a serial and a jti".into())),
        };
        let (issued, existing) = self
            .state
            .store_op(move |store| Ok((store.issued(&lookup)?, store.revocation(&lookup)?)))
            .await?;
        if let Some(existing) = existing {
            return Ok(Response::new(existing));
        }
        let Some(issued) = issued else {
            let message = format!("no unexpired SVID with {serial} was issued by this server");
            let event = schema::denied(kind::REVOKE, message.clone())
                .code(schema::grpc_code(tonic::Code::NotFound))
                .operator(operator)
                .attr("svid", &serial);
            self.state.events.record(vec![event]);
            return Err(Status::not_found(message));
        };
        let reason =
            if req.reason.is_empty() { "revoked by operator".to_string() } else { req.reason };
        let mut revoked =
            revoke_issued(&self.state, vec![issued], &reason, operator.as_ref()).await?;
        revoked.pop().map(Response::new).ok_or_else(|| Status::internal("revocation not stored"))
    }

    async fn list_revocations(
        &self,
        _request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let revocations = self.state.store_op(|store| store.revocations()).await?;
        Ok(Response::new(pb::ListRevocationsResponse { revocations }))
    }

    async fn check_store(
        &self,
        _request: Request<pb::CheckStoreRequest>,
    ) -> Result<Response<pb::StoreReport>, Status> {
        let report = self.state.store_op(|store| store.check()).await?;
        Ok(Response::new(report_proto(&report)))
    }

    type BackupStoreStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup_store(
        &self,
        request: Request<pb::BackupStoreRequest>,
    ) -> Result<Response<Self::BackupStoreStream>, Status> {
        let operator = operator_of(&request);
        let mut bytes = Vec::new();
        let backup = self
            .state
            .store_op(move |store| {
                store.backup(&mut bytes)?;
                Ok(bytes)
            })
            .await?;
        let e = admin_event(kind::BACKUP, &operator).attr("bytes", backup.len());
        self.state.events.record_durable(vec![e]).await;
        let chunks: Vec<Result<pb::BackupChunk, Status>> =
            backup.chunks(BACKUP_CHUNK).map(|c| Ok(pb::BackupChunk { data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn approve_entry(
        &self,
        request: Request<pb::ApproveEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let operator = operator_of(&request);
        let caller = operator.unwrap_or_default();
        let req = request.into_inner();
        let (id, hash) = (req.id.clone(), req.content_hash);
        let now = self.state.clock.now();
        // The checks (hash, proposer, expiry, unchanged entry) and the write
        // are one commit.
        let audit = Audit::new(operator, move |r: &Result<Approved, ApprovalRefusal>| {
            r.iter().map(|approved| approval_event(&operator, approved)).collect()
        });
        let approved = self
            .state
            .store_op(move |store| store.approve(&req.id, &hash, caller.uid, now, &audit))
            .await?
            .map_err(|refusal| {
                let status = Status::new(approval_code(&refusal), refusal.to_string());
                self.deny_approval(&operator, &id, status)
            })?;
        crate::revocation::revoked(&self.state, &approved.write.revoked).await?;
        Ok(Response::new(approved_entry(&approved)))
    }

    async fn reject_entry(
        &self,
        request: Request<pb::RejectEntryRequest>,
    ) -> Result<Response<pb::RejectEntryResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let internal = |e: StoreError| Status::internal(e.to_string());
        let Some(proposal) = self.state.governance.pending.find(&req.id).map_err(internal)? else {
            let status =
                Status::not_found(format!("no proposal {} is waiting for approval", req.id));
            let e = schema::refused(kind::ENTRY_REJECT, &status)
                .operator(operator)
                .entry(req.id.clone());
            self.state.events.record(vec![e]);
            return Err(status);
        };
        let proposal_id = proposal.pending.as_ref().map(|a| a.proposal_id.clone());
        let mut e = entry_event(kind::ENTRY_REJECT, &operator, Some(&proposal), None);
        e.reason = if req.reason.is_empty() { "rejected by operator".into() } else { req.reason };
        let audit = Audit::if_done(operator, vec![e]);
        let (key, id) = (proposal.id.clone(), proposal_id.clone());
        let removed = self
            .state
            .store_op(move |store| store.remove_proposal(&key, id.as_deref(), &audit))
            .await?;
        if !removed {
            let status = Status::failed_precondition(format!(
                "proposal {} was approved, rejected or replaced meanwhile; nothing rejected",
                proposal_id.as_deref().unwrap_or(&proposal.id)
            ));
            return Err(self.refuse_with(&operator, "reject", status));
        }
        Ok(Response::new(pb::RejectEntryResponse {}))
    }

    type ListEventsStream = Pin<Box<dyn Stream<Item = Result<types::Event, Status>> + Send>>;

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
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
            let events = state.events.clone();
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
                let shared = state.config.datastore.is_some();
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = state.shutdown.cancelled() => return,
                    changed = stored.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)), if shared => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn verify_events(
        &self,
        _request: Request<pb::VerifyEventsRequest>,
    ) -> Result<Response<pb::VerifyEventsReport>, Status> {
        let events = self.state.events.clone();
        let report = tokio::task::spawn_blocking(move || events.verify())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(report))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        // The server answers even when its datastore does not: it says so.
        // The datastore's own error, for the operator (callers of other
        // APIs get only that it is unavailable).
        let read = self
            .state
            .store_op(|store| {
                let read = || {
                    Ok((
                        store.health()?,
                        store.revision()?,
                        store.entry_count(),
                        store.agents()?.len(),
                        store.issued_count(),
                    ))
                };
                Ok(read().map_err(|e: StoreError| e.to_string()))
            })
            .await
            .unwrap_or_else(|status| Err(status.message().to_string()));
        let mut health = pb::HealthResponse {
            trust_domain: self.state.config.trust_domain.to_string(),
            bundle_cas: self.state.ca.bundle().len() as u64,
            ..Default::default()
        };
        match read {
            Ok((datastore, revision, entries, agents, issued)) => {
                health.datastore = datastore;
                health.revision = revision;
                health.entries = entries as u64;
                health.agents = agents as u64;
                health.issued_svids = issued as u64;
            }
            Err(e) => {
                health.datastore = self
                    .state
                    .config
                    .datastore
                    .as_deref()
                    .map_or_else(String::new, crate::store::postgres::redact);
                health.datastore_error = e;
            }
        }
        Ok(Response::new(health))
    }
}
