//! Approvals: a second operator approves or rejects a proposal; the
//! approval's checks, the write and its event are one commit.

use tessera_proto::admin::{self as pb};
use tessera_proto::types::{self as types, Operator};
use tonic::{Request, Response, Status};

use crate::api::admin::peer::operator_of;
use crate::entry::Entry;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::policy::approval::ApprovalRefusal;
use crate::state::State;
use crate::store::{Approved, Audit, StoreError};

use super::service::*;

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
    let now = state.clock().now();
    let proposals = match state.governance().pending.list() {
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

impl AdminService {
    pub(super) async fn approve_entry(
        &self,
        request: Request<pb::ApproveEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let operator = operator_of(&request);
        let caller = operator.unwrap_or_default();
        let req = request.into_inner();
        let (id, hash) = (req.id.clone(), req.content_hash);
        let now = self.state.clock().now();
        // The checks (hash, proposer, expiry, unchanged entry) and the write
        // are one commit.
        let audit = Audit::new(operator, move |r: &Result<Approved, ApprovalRefusal>| match r {
            Ok(approved) => vec![approval_event(&operator, approved)],
            // The commit dropped the stale proposal: its event is in it.
            Err(ApprovalRefusal::Changed(entry)) => {
                let mut e = admin_event(kind::ENTRY_REJECT, &operator).entry(entry.clone());
                e.decision = schema::DENY.into();
                e.reason = "the entry changed after this update was proposed".into();
                vec![e]
            }
            Err(_) => Vec::new(),
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

    pub(super) async fn reject_entry(
        &self,
        request: Request<pb::RejectEntryRequest>,
    ) -> Result<Response<pb::RejectEntryResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let internal = |e: StoreError| Status::internal(e.to_string());
        let Some(proposal) = self.state.governance().pending.find(&req.id).map_err(internal)?
        else {
            let status =
                Status::not_found(format!("no proposal {} is waiting for approval", req.id));
            let e = schema::refused(kind::ENTRY_REJECT, &status)
                .operator(operator)
                .entry(req.id.clone());
            self.state.events().record(vec![e]);
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
}
