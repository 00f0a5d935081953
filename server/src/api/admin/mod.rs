//! The admin API (operator ↔ server) on the server's Unix socket. Refusals
//! are logged here, once, with their reason.
//!
//! The folder: `service.rs` (the service, the `authorize` interceptor,
//! refusal records, event forms) at the bottom; the handlers build on it:
//! `entries.rs`, `agents.rs`, `approvals.rs`, `broker.rs` (the token
//! broker's tasks and held requests), `events.rs`, `ops.rs`
//! (SPIRE's operator commands); `peer.rs` pins each caller at accept and
//! `reach.rs` checks operators can reach the socket. This file is the
//! `Admin` trait's glue, delegating to the handlers. Nothing outside
//! `api/` but `server.rs` and the CLI's report form depends on it.

mod agents;
mod approvals;
mod broker;
mod entries;
mod events;
pub mod ops;
pub mod peer;
pub mod reach;
mod service;

use service::*;
pub use service::{
    authorize, flush_refusals, report_proto, AdminService, BUNDLE_REFRESH_HINT_SECS,
};

pub use approvals::expire_proposals;

use std::pin::Pin;

use tessera_proto::admin::{self as pb, admin_server::Admin};
use tessera_proto::types::{self as types};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::admin::peer::operator_of;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::revocation::{normalize_serial, revoke_issued};
use crate::store::{svid_key, StoreError};

#[tonic::async_trait]
impl Admin for AdminService {
    async fn batch_create_entry(
        &self,
        request: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        AdminService::batch_create_entry(self, request).await
    }

    async fn batch_update_entry(
        &self,
        request: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchEntryResponse>, Status> {
        AdminService::batch_update_entry(self, request).await
    }

    async fn batch_delete_entry(
        &self,
        request: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchDeleteEntryResponse>, Status> {
        AdminService::batch_delete_entry(self, request).await
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        AdminService::list_entries(self, request).await
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        AdminService::get_entry(self, request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        AdminService::create_join_token(self, request).await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        crate::api::admin::ops::list_agents(&self.state, request).await
    }

    async fn count_entries(
        &self,
        _request: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        crate::api::admin::ops::count_entries(&self.state).await
    }

    async fn count_agents(
        &self,
        _request: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        crate::api::admin::ops::count_agents(&self.state).await
    }

    async fn purge_agents(
        &self,
        request: Request<pb::PurgeAgentsRequest>,
    ) -> Result<Response<pb::PurgeAgentsResponse>, Status> {
        crate::api::admin::ops::purge_agents(&self.state, request).await
    }

    async fn mint_x509_svid(
        &self,
        request: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        crate::api::admin::ops::mint_x509(&self.state, request).await
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        crate::api::admin::ops::mint_jwt(&self.state, request).await
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        AdminService::get_agent(self, request).await
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(pb::Bundle {
            trust_domain: self.state.config().trust_domain.to_string(),
            authorities: self.state.ca().bundle().iter().map(|c| c.to_vec()).collect(),
            crls: self.state.store_op(|store| store.crls()).await?,
            jwt_authorities: self.state.ca().jwt_authorities(),
            sequence: self.state.ca().bundle_sequence(),
            refresh_hint: BUNDLE_REFRESH_HINT_SECS,
        }))
    }

    async fn ban_agent(
        &self,
        request: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        AdminService::ban_agent(self, request).await
    }

    async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        AdminService::evict_agent(self, request).await
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
            self.state.events().record(vec![event]);
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
            self.state.events().record(vec![event]);
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
        self.state.events().record_durable(vec![e]).await;
        let chunks: Vec<Result<pb::BackupChunk, Status>> =
            backup.chunks(BACKUP_CHUNK).map(|c| Ok(pb::BackupChunk { data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn approve_entry(
        &self,
        request: Request<pb::ApproveEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        AdminService::approve_entry(self, request).await
    }

    async fn reject_entry(
        &self,
        request: Request<pb::RejectEntryRequest>,
    ) -> Result<Response<pb::RejectEntryResponse>, Status> {
        AdminService::reject_entry(self, request).await
    }

    type ListEventsStream = Pin<Box<dyn Stream<Item = Result<types::Event, Status>> + Send>>;

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        AdminService::list_events(self, request).await
    }

    async fn verify_events(
        &self,
        _request: Request<pb::VerifyEventsRequest>,
    ) -> Result<Response<pb::VerifyEventsReport>, Status> {
        AdminService::verify_events(self, _request).await
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        AdminService::start_task(self, request).await
    }

    async fn end_task(
        &self,
        request: Request<pb::EndTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        AdminService::end_task(self, request).await
    }

    async fn revoke_access_token(
        &self,
        request: Request<pb::RevokeAccessTokenRequest>,
    ) -> Result<Response<pb::AccessTokenRecord>, Status> {
        AdminService::revoke_access_token(self, request).await
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        AdminService::list_tasks(self, request).await
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        AdminService::get_task(self, request).await
    }

    async fn list_broker_requests(
        &self,
        request: Request<pb::ListBrokerRequestsRequest>,
    ) -> Result<Response<pb::ListBrokerRequestsResponse>, Status> {
        AdminService::list_broker_requests(self, request).await
    }

    async fn get_broker_request(
        &self,
        request: Request<pb::GetBrokerRequestRequest>,
    ) -> Result<Response<pb::BrokerRequest>, Status> {
        AdminService::get_broker_request(self, request).await
    }

    async fn decide_broker_request(
        &self,
        request: Request<pb::DecideBrokerRequestRequest>,
    ) -> Result<Response<pb::BrokerRequest>, Status> {
        AdminService::decide_broker_request(self, request).await
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
            trust_domain: self.state.config().trust_domain.to_string(),
            bundle_cas: self.state.ca().bundle().len() as u64,
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
                    .config()
                    .datastore
                    .as_deref()
                    .map_or_else(String::new, crate::store::postgres::redact);
                health.datastore_error = e;
            }
        }
        Ok(Response::new(health))
    }
}
