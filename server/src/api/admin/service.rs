//! The admin API service: its state, the socket's authorizing
//! interceptor, how refusals are recorded, and the event and status forms
//! its handlers share. The handlers (`entries.rs`, `agents.rs`,
//! `approvals.rs`, `broker.rs`, `events.rs`, `ops.rs`) and the gRPC glue (`mod.rs`)
//! build on it; it depends on none of them.

use std::sync::Arc;

use tessera_proto::admin::{self as pb};
use tessera_proto::types::{self as types, Operator, Status as ItemStatus};
use tessera_workload_api::SpiffeId;
use tonic::{Request, Status};

use crate::broker::records::BrokerRefusal;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::events::entry_json;
use crate::policy::approval::ApprovalRefusal;
use crate::policy::caller::AdminPeer;
use crate::state::State;
use crate::store::{StoreReport, MAX_BATCH};

/// Bytes per message of a streamed backup.
pub(super) const BACKUP_CHUNK: usize = 1024 * 1024;

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
        .get::<crate::api::admin::peer::CalledMethod>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    let peer = request.extensions().get::<AdminPeer>();
    let operator = peer.map(|p| p.operator);
    let verdict = match peer {
        Some(peer) => state.governance().operators.authorize(peer),
        None => Err("the caller's peer credentials are unknown".to_string()),
    };
    match verdict {
        Ok(()) => Ok(request),
        Err(why) => {
            // The first refusal of a uid in an interval is an event at once;
            // the rest are folded into one with a count (`flush_refusals`).
            let uid = operator.map_or(u32::MAX, |o| o.uid);
            if state.governance().refused.note(uid, &why, false) {
                let e = schema::denied(kind::ADMIN_REFUSED, why.clone())
                    .code(schema::grpc_code(tonic::Code::PermissionDenied))
                    .operator(operator)
                    .attr("method", &method)
                    .attr("count", 1);
                state.events().record(vec![e]);
            }
            Err(Status::permission_denied(why))
        }
    }
}

/// Records the admin refusals folded since the last call: one
/// `admin.refused` event per uid with `count`.
pub fn flush_refusals(state: &State) {
    let events: Vec<types::Event> = state
        .governance()
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
        state.events().record(events);
    }
}

/// The status of a refused proposal or approval.
pub(super) fn approval_code(refusal: &ApprovalRefusal) -> tonic::Code {
    match refusal {
        ApprovalRefusal::NotFound(_) => tonic::Code::NotFound,
        ApprovalRefusal::HashRequired => tonic::Code::InvalidArgument,
        ApprovalRefusal::SameOperator { .. } => tonic::Code::PermissionDenied,
        ApprovalRefusal::Entry(e) => e.code(),
        _ => tonic::Code::FailedPrecondition,
    }
}

/// The status of a refused broker operation (task or held request).
pub(super) fn broker_status(refusal: &BrokerRefusal) -> Status {
    let code = match refusal {
        BrokerRefusal::UnknownTask(_)
        | BrokerRefusal::UnknownRequest(_)
        | BrokerRefusal::UnknownToken(_) => tonic::Code::NotFound,
        BrokerRefusal::TaskNotYours { .. } | BrokerRefusal::OwnUid(_) => {
            tonic::Code::PermissionDenied
        }
        BrokerRefusal::TaskEnded(_)
        | BrokerRefusal::RequestState { .. }
        | BrokerRefusal::ContentChanged { .. }
        | BrokerRefusal::RequestExpired(_) => tonic::Code::FailedPrecondition,
        BrokerRefusal::TaskExists(_) => tonic::Code::AlreadyExists,
        BrokerRefusal::TokenRevoked(_) => tonic::Code::FailedPrecondition,
    };
    Status::new(code, refusal.to_string())
}

/// An admin event: `kind` allowed for `operator`.
pub(super) fn admin_event(kind: &str, operator: &Option<Operator>) -> types::Event {
    schema::event(kind, schema::ALLOW).operator(*operator)
}

/// The event of an entry written, proposed, approved or deleted.
pub(super) fn entry_event(
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

/// The admin API service.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub(super) state: Arc<State>,
}

impl AdminService {
    /// The service over shared server state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    pub(super) fn check_batch(len: usize) -> Result<(), Status> {
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

    /// Records a refused approval and returns the status.
    pub(super) fn deny_approval(
        &self,
        operator: &Option<Operator>,
        id: &str,
        status: Status,
    ) -> Status {
        let e = schema::refused(kind::ENTRY_APPROVE, &status).operator(*operator).entry(id);
        self.state.events().record(vec![e]);
        status
    }

    /// A SPIFFE ID from a request, or its refusal.
    pub(super) fn parse_id(
        &self,
        operator: &Option<Operator>,
        field: &str,
        value: &str,
    ) -> Result<SpiffeId, Status> {
        SpiffeId::parse(value)
            .map_err(|e| self.refuse(operator, field, format!("invalid {field}: {e}")))
    }

    /// Refuses a request for bad input, with an event.
    pub(super) fn refuse(
        &self,
        operator: &Option<Operator>,
        what: &str,
        message: String,
    ) -> Status {
        self.refuse_with(operator, what, Status::invalid_argument(message))
    }

    /// Refuses a request with `status` (e.g. one the store's state
    /// refuses: `FailedPrecondition`), with an event.
    pub(super) fn refuse_with(
        &self,
        operator: &Option<Operator>,
        what: &str,
        status: Status,
    ) -> Status {
        let e =
            schema::refused(kind::ADMIN_REFUSED, &status).operator(*operator).attr("request", what);
        self.state.events().record(vec![e]);
        status
    }
}

pub(super) fn ok() -> ItemStatus {
    ItemStatus { code: 0, ..Default::default() }
}

pub(super) fn item_status(code: tonic::Code, message: &impl ToString) -> ItemStatus {
    ItemStatus { code: code as i32, message: message.to_string(), ..Default::default() }
}
