//! The admin API (operator ↔ server) on the server's Unix socket. Refusals
//! are logged here, once, with their reason.

use std::pin::Pin;
use std::sync::Arc;

use tessera_proto::admin::{self as pb, admin_server::Admin};
use tessera_proto::types::{self as types, Status as ItemStatus};
use tessera_workload_api::SpiffeId;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::entry::{Entry, EntryError};
use crate::revocation::{normalize_serial, revoke_issued};
use crate::state::State;
use crate::store::{svid_key, EntryFilter, EntryWrite, Store, StoreError, StoreReport, MAX_BATCH};

/// A store batch write at a time: per-item results and what it revoked.
type BatchWrite = fn(&dyn Store, &[Entry], i64) -> Result<EntryWrite, StoreError>;

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

/// Largest page of a listing.
pub const MAX_PAGE: usize = 10_000;

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

    /// Validates each item; stores the valid ones with `write`; returns
    /// results in request order.
    async fn write_entries(
        &self,
        op: &'static str,
        inputs: Vec<types::Entry>,
        prepare: impl Fn(&types::Entry, Entry) -> Result<Entry, EntryError>,
        write: BatchWrite,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        Self::check_batch(inputs.len())?;
        let now = self.state.clock.now();
        let mut results: Vec<Option<Result<Entry, EntryError>>> = Vec::with_capacity(inputs.len());
        let mut valid = Vec::new();
        let mut slots = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            match self.state.rules.validate(input, now).and_then(|e| prepare(input, e)) {
                Ok(entry) => {
                    valid.push(entry);
                    slots.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut revoked = Vec::new();
        if !valid.is_empty() {
            let stored = self.state.store_op(move |store| write(store, &valid, now)).await?;
            for (slot, result) in slots.into_iter().zip(stored.results) {
                results[slot] = Some(result);
            }
            revoked = stored.revoked;
        }
        let mut response = pb::BatchEntryResponse::default();
        for (input, result) in inputs.iter().zip(results) {
            let result = result.unwrap_or(Err(EntryError::MissingId));
            response.results.push(match result {
                Ok(entry) => {
                    info!(target: "tessera::audit", op, entry_id = %entry.id, spiffe_id = %entry.spiffe_id, parent_id = %entry.parent_id, revision = entry.revision, "entry written");
                    pb::EntryResult { status: Some(ok()), entry: Some(entry.to_proto()) }
                }
                Err(e) => {
                    warn!(target: "tessera::audit", op, spiffe_id = %input.spiffe_id, entry_id = %input.id, reason = %e, "entry refused");
                    pb::EntryResult { status: Some(item_status(e.code(), &e)), entry: None }
                }
            });
        }
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(response))
    }
}

fn ok() -> ItemStatus {
    ItemStatus { code: 0, message: String::new() }
}

fn item_status(code: tonic::Code, message: &impl ToString) -> ItemStatus {
    ItemStatus { code: code as i32, message: message.to_string() }
}

fn parse_id(field: &str, value: &str) -> Result<SpiffeId, Status> {
    SpiffeId::parse(value).map_err(|e| {
        warn!(target: "tessera::audit", field, value, reason = %e, "admin request refused");
        Status::invalid_argument(format!("invalid {field}: {e}"))
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn batch_create_entry(
        &self,
        request: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        let inputs = request.into_inner().entries;
        self.write_entries(
            "create",
            inputs,
            |_, mut entry| {
                entry.id = uuid::Uuid::new_v4().to_string();
                Ok(entry)
            },
            |store, entries, _| {
                Ok(EntryWrite { results: store.create_entries(entries)?, ..Default::default() })
            },
        )
        .await
    }

    async fn batch_update_entry(
        &self,
        request: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        let inputs = request.into_inner().entries;
        // The store revokes, in the same commit, the SVIDs an update no
        // longer authorizes (new SPIFFE ID, parent or DNS names, earlier expiry).
        self.write_entries(
            "update",
            inputs,
            |input, mut entry| {
                if input.id.is_empty() {
                    return Err(EntryError::MissingId);
                }
                entry.id = input.id.clone();
                Ok(entry)
            },
            |store, entries, now| store.update_entries(entries, now, "entry updated"),
        )
        .await
    }

    async fn batch_delete_entry(
        &self,
        request: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchDeleteEntryResponse>, Status> {
        let ids = request.into_inner().ids;
        Self::check_batch(ids.len())?;
        let request_ids = ids.clone();
        let now = self.state.clock.now();
        // The delete and the revocation of the entries' SVIDs are one commit.
        let write = self
            .state
            .store_op(move |store| store.delete_entries(&ids, now, "entry deleted"))
            .await?;
        let mut response = pb::BatchDeleteEntryResponse::default();
        for (id, result) in request_ids.into_iter().zip(write.results) {
            let status = match result {
                Ok(entry) => {
                    info!(target: "tessera::audit", entry_id = %entry.id, spiffe_id = %entry.spiffe_id, revision = entry.revision, "entry deleted");
                    ok()
                }
                Err(e) => {
                    warn!(target: "tessera::audit", entry_id = %id, reason = %e, "entry delete refused");
                    item_status(e.code(), &e)
                }
            };
            response.results.push(pb::DeleteResult { id, status: Some(status) });
        }
        crate::revocation::revoked(&self.state, &write.revoked).await?;
        Ok(Response::new(response))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let req = request.into_inner();
        let filter = EntryFilter {
            parent_id: (!req.parent_id.is_empty())
                .then(|| parse_id("parent ID", &req.parent_id))
                .transpose()?,
            spiffe_id: (!req.spiffe_id.is_empty())
                .then(|| parse_id("SPIFFE ID", &req.spiffe_id))
                .transpose()?,
        };
        let limit = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let after = (!req.page_token.is_empty()).then_some(req.page_token);
        let entries = self
            .state
            .store_op(move |store| store.list_entries(&filter, after.as_deref(), limit))
            .await?;
        let next_page_token = if entries.len() == limit {
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(Entry::to_proto).collect(),
            next_page_token,
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
            None => Err(Status::not_found(format!("entry {id} not found"))),
        }
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
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
            let id = parse_id("agent SPIFFE ID", &req.spiffe_id)?;
            if id.trust_domain() != &config.trust_domain {
                let message =
                    format!("agent SPIFFE ID {id} is not in trust domain {}", config.trust_domain);
                warn!(target: "tessera::audit", reason = %message, "join token refused");
                return Err(Status::invalid_argument(message));
            }
            if id.is_root() || id.path() == "/tessera/server" {
                let message = format!("agent SPIFFE ID {id} is reserved");
                warn!(target: "tessera::audit", reason = %message, "join token refused");
                return Err(Status::invalid_argument(message));
            }
            id
        };
        let record = types::JoinToken {
            token,
            spiffe_id: spiffe_id.to_string(),
            expires_at: self.state.clock.now() + i64::from(ttl),
        };
        let stored = record.clone();
        self.state.store_op(move |store| store.put_join_token(&stored)).await?;
        info!(target: "tessera::audit", agent_id = %spiffe_id, ttl, "join token created");
        Ok(Response::new(record))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.state.store_op(|store| store.agents()).await?;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        let id = parse_id("agent SPIFFE ID", &request.into_inner().spiffe_id)?;
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
        let req = request.into_inner();
        let id = parse_id("agent SPIFFE ID", &req.spiffe_id)?;
        let reason =
            if req.reason.is_empty() { "banned by operator".to_string() } else { req.reason };
        let (key, why, now) = (id.to_string(), reason.clone(), self.state.clock.now());
        // One commit: the ban, the revocation of everything issued to or
        // through the agent, and the change that closes its stream.
        let revoked = self
            .state
            .store_op(move |store| store.ban_agent(&key, &why, now))
            .await?
            .map_err(|refusal| {
                warn!(target: "tessera::audit", agent_id = %id, reason = %refusal, "agent ban refused");
                Status::not_found(format!("agent {id} not found"))
            })?;
        info!(target: "tessera::audit", agent_id = %id, reason = %reason, revoked = revoked.len(), "agent banned");
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
        let req = request.into_inner();
        let id = parse_id("agent SPIFFE ID", &req.spiffe_id)?;
        let (key, unban, now) = (id.to_string(), req.unban, self.state.clock.now());
        let revoked = self
            .state
            .store_op(move |store| store.evict_agent(&key, unban, now))
            .await?
            .map_err(|refusal| {
                warn!(target: "tessera::audit", agent_id = %id, reason = %refusal, "agent evict refused");
                Status::not_found(format!("agent {id} not found"))
            })?;
        info!(target: "tessera::audit", agent_id = %id, unban, "agent evicted; it must attest again");
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn revoke_svid(
        &self,
        request: Request<pb::RevokeSvidRequest>,
    ) -> Result<Response<types::Revocation>, Status> {
        let req = request.into_inner();
        let refused = |what: &str, e: String| {
            warn!(target: "tessera::audit", svid = %what, reason = %e, "revocation refused");
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
            warn!(target: "tessera::audit", serial = %serial, reason = %message, "revocation refused");
            return Err(Status::not_found(message));
        };
        let reason =
            if req.reason.is_empty() { "revoked by operator".to_string() } else { req.reason };
        let mut revoked = revoke_issued(&self.state, vec![issued], &reason).await?;
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
        _request: Request<pb::BackupStoreRequest>,
    ) -> Result<Response<Self::BackupStoreStream>, Status> {
        let mut bytes = Vec::new();
        let backup = self
            .state
            .store_op(move |store| {
                store.backup(&mut bytes)?;
                Ok(bytes)
            })
            .await?;
        info!(target: "tessera::audit", bytes = backup.len(), "store backup taken");
        let chunks: Vec<Result<pb::BackupChunk, Status>> =
            backup.chunks(BACKUP_CHUNK).map(|c| Ok(pb::BackupChunk { data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let (revision, entries, agents, issued) = self
            .state
            .store_op(|store| {
                Ok((
                    store.revision()?,
                    store.entry_count(),
                    store.agents()?.len(),
                    store.issued_count(),
                ))
            })
            .await?;
        Ok(Response::new(pb::HealthResponse {
            trust_domain: self.state.config.trust_domain.to_string(),
            revision,
            entries: entries as u64,
            agents: agents as u64,
            issued_svids: issued as u64,
        }))
    }
}
