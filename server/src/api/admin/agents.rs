//! Agents over the admin API: join tokens (held for approval when the
//! policy matches), ban, evict, lookup.

use tessera_proto::admin as pb;
use tessera_proto::types::{self as types};
use tessera_workload_api::SpiffeId;
use tonic::{Request, Response, Status};

use crate::api::admin::peer::operator_of;
use crate::entry::Entry;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::AgentRefusal;
use crate::store::{join_token_key, Audit};

use super::service::*;

impl AdminService {
    pub(super) async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let config = &self.state.config();
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
        let now = self.state.clock().now();
        let mut reasons = self.state.governance().policy.agent_id_reasons(&spiffe_id);
        // Whoever attests with the token serves the entries parented to its
        // ID: when the policy matches any of them, the token needs the same
        // second operator they did.
        let parent = spiffe_id.clone();
        let children = self.state.store_op(move |store| store.entries_by_parent(&parent)).await?;
        let matched: Vec<&Entry> = children
            .iter()
            .filter(|e| !self.state.governance().policy.reasons(e).is_empty())
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
            let proposal = crate::policy::approval::join_token_proposal(
                spiffe_id.as_str(),
                String::from_utf8_lossy(&join_token_key(&token)).into_owned(),
                ttl,
                &operator.unwrap_or_default(),
                reasons.clone(),
                now,
                config.pending_ttl(),
            );
            let mut e = entry_event(kind::ENTRY_PENDING, &operator, None, Some(&proposal))
                .attr("op", crate::policy::approval::OP_JOIN_TOKEN)
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

    pub(super) async fn get_agent(
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

    pub(super) async fn ban_agent(
        &self,
        request: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let id = self.parse_id(&operator, "agent SPIFFE ID", &req.spiffe_id)?;
        let reason =
            if req.reason.is_empty() { "banned by operator".to_string() } else { req.reason };
        let (key, why, now) = (id.to_string(), reason.clone(), self.state.clock().now());
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
                self.state.events().record(vec![e]);
                Status::not_found(format!("agent {id} not found"))
            })?;
        crate::revocation::revoked(&self.state, &revoked).await?;
        let (jwts, x509): (Vec<_>, Vec<_>) = revoked.into_iter().partition(|r| !r.jti.is_empty());
        Ok(Response::new(pb::BanAgentResponse {
            revoked_serials: x509.into_iter().map(|r| r.serial).collect(),
            revoked_jtis: jwts.into_iter().map(|r| r.jti).collect(),
        }))
    }

    pub(super) async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let id = self.parse_id(&operator, "agent SPIFFE ID", &req.spiffe_id)?;
        let (key, unban, now) = (id.to_string(), req.unban, self.state.clock().now());
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
                self.state.events().record(vec![e]);
                Status::not_found(format!("agent {id} not found"))
            })?;
        crate::revocation::revoked(&self.state, &revoked).await?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }
}
