//! Node attestation: join tokens spent once, the refused-attestation
//! budget per source address, and agent SVID renewal.

use std::net::IpAddr;

use tessera_proto::node as pb;
use tessera_proto::types::{self as types};
use tessera_workload_api::SpiffeId;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::ca::csr::parse_csr;
use crate::ca::SignedSvid;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::{AgentRefusal, Audit};
use tessera_common::rate::TokenBucket;

use super::service::*;

impl NodeService {
    /// Refuses an attestation from `source` at once when its budget of
    /// refusals is spent.
    pub(super) fn check_attest_rate(&self, source: IpAddr) -> Result<(), Status> {
        let config = &self.state.config();
        let (rate, burst, now_ms) =
            (config.attest_rate, config.attest_burst, self.state.clock().now_ms());
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
    pub(super) fn join_token_is_held(&self, token: &str) -> Result<bool, Status> {
        let governance = &self.state.governance();
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
    pub(super) fn refuse_stranger(
        &self,
        op: &'static str,
        source: Option<IpAddr>,
        agent: &str,
        status: Status,
    ) -> Status {
        let Some(source) = source else { return self.refuse(op, agent, status) };
        let rate_limited = status.code() == tonic::Code::ResourceExhausted;
        if rate_limited {
            self.state.metrics().attestation_rate_limited();
        }
        {
            let mut limits = self.attest_limits.lock().unwrap_or_else(|e| e.into_inner());
            let config = &self.state.config();
            let (rate, burst, now_ms) =
                (config.attest_rate, config.attest_burst, self.state.clock().now_ms());
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
            self.state.events().record(vec![e]);
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
            self.state.events().record(events);
        }
    }

    /// Signs an agent SVID; the caller stores it with the agent record.
    pub(super) fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr: &[u8],
    ) -> Result<(SignedSvid, types::IssuedSvid), Status> {
        let key = parse_csr(csr).map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let ttl = self.state.config().agent_svid_ttl;
        let svid = self
            .state
            .ca()
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

    pub(super) async fn attest_with_token(
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
        let now = self.state.clock().now();
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
            let policy = &self.state.governance().policy;
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
            x509_svid: vec![svid.leaf],
            bundle: self.bundle(),
        }))
    }

    pub(super) async fn renew(
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
        let now = self.state.clock().now();
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
            x509_svid: vec![svid.leaf],
            bundle: self.bundle(),
        }))
    }
}
