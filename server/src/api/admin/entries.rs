//! Registration entries over the admin API: batch create, update and
//! delete (each item's event in the commit that stores it; items the
//! approval policy matches held as proposals), listing and lookup.

use tessera_proto::admin as pb;
use tessera_proto::types::{self as types, Operator};
use tonic::{Request, Response, Status};

use crate::api::admin::ops::MAX_PAGE;
use crate::api::admin::peer::operator_of;
use crate::entry::{Entry, EntryError};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::{Audit, EntryFilter, EntryWrite, Store, StoreError};

use super::service::*;

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

impl AdminService {
    /// Validates each item; holds for approval those the policy matches;
    /// stores the other valid ones with `write`; returns results in request order.
    pub(super) async fn write_entries(
        &self,
        op: &'static str,
        operator: Option<Operator>,
        inputs: Vec<types::Entry>,
        prepare: impl Fn(&types::Entry, Entry) -> Result<Entry, EntryError>,
        write: BatchWrite,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        Self::check_batch(inputs.len())?;
        let now = self.state.clock().now();
        let event_kind = if op == crate::policy::approval::OP_CREATE {
            kind::ENTRY_CREATE
        } else {
            kind::ENTRY_UPDATE
        };
        let mut results: Vec<Option<Result<types::Entry, EntryError>>> =
            Vec::with_capacity(inputs.len());
        let mut valid = Vec::new();
        let mut slots = Vec::new();
        for input in &inputs {
            match self.state.rules().validate(input, now).and_then(|e| prepare(input, e)) {
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
        let olds: std::collections::HashMap<String, Entry> =
            if op == crate::policy::approval::OP_UPDATE {
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
            if op == crate::policy::approval::OP_UPDATE {
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
            let policy = &self.state.governance().policy;
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
            let proposal = crate::policy::approval::proposal(
                &entry,
                op,
                &caller,
                reasons.clone(),
                now,
                self.state.config().pending_ttl(),
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
        self.state.events().record(events);
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(response))
    }

    pub(super) async fn batch_create_entry(
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

    pub(super) async fn batch_update_entry(
        &self,
        request: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        let operator = operator_of(&request);
        let inputs = request.into_inner().entries;
        // The store revokes, in the same commit, the SVIDs an update no
        // longer authorizes (new SPIFFE ID, parent or DNS names, earlier expiry).
        self.write_entries(
            crate::policy::approval::OP_UPDATE,
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

    pub(super) async fn batch_delete_entry(
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
                .governance()
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
        let now = self.state.clock().now();
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
        self.state.events().record(events);
        crate::revocation::revoked(&self.state, &write.revoked).await?;
        Ok(Response::new(response))
    }

    pub(super) async fn list_entries(
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
        let query = crate::api::admin::ops::selector_query(&req.selectors, req.selector_match)?;
        let limit = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let first_page = req.page_token.is_empty();
        let after = (!req.page_token.is_empty()).then_some(req.page_token);
        let pending = if first_page {
            self.state
                .governance()
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
            crate::api::admin::ops::matching_entries(&self.state, filter, query, after, limit)
                .await?
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

    pub(super) async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        let id = request.into_inner().id;
        let lookup = id.clone();
        match self.state.store_op(move |store| store.entry(&lookup)).await? {
            Some(entry) => Ok(Response::new(entry.to_proto())),
            None => match self.state.governance().pending.get(&id) {
                Ok(Some(proposal)) => Ok(Response::new(proposal)),
                Ok(None) => Err(Status::not_found(format!("entry {id} not found"))),
                Err(e) => Err(Status::internal(e.to_string())),
            },
        }
    }
}
