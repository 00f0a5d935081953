//! The broker's durable records: tasks, the access tokens issued under
//! them, and requests held for an operator's approval. The store keeps
//! them (`store/broker.rs`, JSON in its own trees, shared by every server
//! on PostgreSQL); this file says what they are and the rules read off
//! them (is a token active now, may this operator decide this request).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_proto::types as pb;

use crate::event_schema::{self, EventExt};

/// A task: the span a workload acts within. Every access token is issued
/// under one and never outlives it; ending it (or its expiry) makes every
/// token issued under it inactive at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// `task-<uuid>`.
    pub id: String,
    /// The workload it is for (the only principal that may use it).
    pub spiffe_id: String,
    /// Operator labels (`--label k=v`), given to policy.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The task it was started within (a sub-task a workload started), or empty.
    #[serde(default)]
    pub parent: String,
    /// Who started it: `uid:N` for an operator, or the workload's SPIFFE ID.
    pub started_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: it ends by itself then.
    pub expires_at: i64,
    /// Unix seconds when it was ended (0: not ended).
    #[serde(default)]
    pub ended_at: i64,
    /// Who ended it and why (`uid:N: reason`, or `expired`).
    #[serde(default)]
    pub ended_by: String,
    /// Access tokens issued under it.
    #[serde(default)]
    pub tokens_issued: u64,
    /// What it has done: `action resource` pairs granted, oldest first,
    /// at most [`Task::MAX_DONE`] (policy sees them as `context.task.done`).
    #[serde(default)]
    pub done: Vec<String>,
}

impl Task {
    /// The most `done` pairs kept.
    pub const MAX_DONE: usize = 256;

    /// Whether the task is live at `now` (Unix seconds): not ended, not expired.
    pub fn is_live(&self, now: i64) -> bool {
        self.ended_at == 0 && now < self.expires_at
    }

    /// Records that `pairs` were granted (keeps the newest [`Task::MAX_DONE`], no duplicates).
    pub fn note_done(&mut self, pairs: &[String]) {
        self.tokens_issued += 1;
        for p in pairs {
            if !self.done.contains(p) {
                self.done.push(p.clone());
            }
        }
        let extra = self.done.len().saturating_sub(Self::MAX_DONE);
        self.done.drain(..extra);
    }
}

/// An access token the broker issued (the token itself is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// The token's `jti`.
    pub jti: String,
    /// `sub`: the workload's SPIFFE ID.
    pub sub: String,
    /// `aud`: the tool.
    pub aud: String,
    /// The task it was issued under.
    pub task: String,
    /// Granted scope, space-separated (may be empty).
    #[serde(default)]
    pub scope: String,
    /// Granted `authorization_details`, as JSON (may be empty).
    #[serde(default)]
    pub authorization_details: String,
    /// The actor chain's outermost `sub`, when issued on behalf of another workload.
    #[serde(default)]
    pub actor: String,
    /// `client_id`: the SPIFFE ID of the caller that authenticated.
    pub client_id: String,
    /// Unix seconds.
    pub iat: i64,
    /// Unix seconds.
    pub exp: i64,
    /// The approved request it was issued for, if it needed approval.
    #[serde(default)]
    pub request: String,
    /// Unix seconds when it was revoked (0: not revoked).
    #[serde(default)]
    pub revoked_at: i64,
}

impl AccessToken {
    /// Whether the token is active at `now` given its task (RFC 7662
    /// `active`): issued, unexpired, not revoked, its task live.
    pub fn is_active(&self, task: Option<&Task>, now: i64) -> bool {
        self.revoked_at == 0 && now < self.exp && task.is_some_and(|t| t.is_live(now))
    }
}

/// An access token to record, with what its task has done by it and the
/// time it was decided at (several are recorded in one commit).
#[derive(Debug, Clone)]
pub struct TokenToRecord {
    /// The record.
    pub token: AccessToken,
    /// `action target` pairs it grants (the task's progress).
    pub done: Vec<String>,
    /// Unix seconds.
    pub now: i64,
}

/// Where a request held for approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for an operator.
    Pending,
    /// Approved: the next poll with the same content gets the token.
    Approved,
    /// Denied by an operator.
    Denied,
    /// The approved token was issued (an approval is used once).
    Issued,
}

/// A token request held for an operator's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// `req-<uuid>`: given to the caller with `authorization_pending`.
    pub id: String,
    /// SHA-256 (hex) of the request's canonical content: an approval binds
    /// it, and a poll whose content differs is refused.
    pub content_hash: String,
    /// The workload asking.
    pub spiffe_id: String,
    /// Its agent (empty if unknown).
    #[serde(default)]
    pub agent_id: String,
    /// The task.
    pub task: String,
    /// The tool (`audience`/`resource`).
    pub tool: String,
    /// Requested actions.
    pub actions: Vec<String>,
    /// Requested targets.
    #[serde(default)]
    pub targets: Vec<String>,
    /// The request's canonical content, as JSON (what the hash covers).
    pub content: String,
    /// The computed blast radius.
    pub blast_radius: i64,
    /// The policies that permitted it and asked for approval.
    pub policies: Vec<String>,
    /// Why approval is needed (the `@approval` annotation, or the threshold).
    pub why: String,
    /// Uids that may not decide it (the workload's own, from its entry's
    /// `unix:uid` selectors).
    #[serde(default)]
    pub excluded_uids: Vec<u32>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: a pending request, or an unused approval, lapses then.
    pub expires_at: i64,
    /// Where it stands.
    pub state: RequestState,
    /// The operator who decided (`uid:N`), and why.
    #[serde(default)]
    pub decided_by: String,
    /// The operator's reason.
    #[serde(default)]
    pub reason: String,
}

impl PendingRequest {
    /// An event about this request (held, decided, lapsed): the workload,
    /// its agent, the task, the request, the tool, the actions and targets,
    /// the score and the policies that held it.
    pub fn event(&self, kind: &str, decision: &str) -> pb::Event {
        event_schema::event(kind, decision)
            .spiffe_id(self.spiffe_id.clone())
            .agent(self.agent_id.clone())
            .attr("task", &self.task)
            .attr("request", &self.id)
            .attr("tool", &self.tool)
            .attr("actions", self.actions.join(","))
            .attr("targets", self.targets.join(","))
            .attr("blast_radius", self.blast_radius)
            .attr("policies", self.policies.join(","))
    }
}

/// Why the store refused a broker write: typed, so the HTTP side maps
/// each to its OAuth error in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerRefusal {
    /// No such task.
    #[error("task {0} does not exist")]
    UnknownTask(String),
    /// A task with this ID exists already.
    #[error("task {0} exists already")]
    TaskExists(String),
    /// The task has ended or expired.
    #[error("task {0} has ended")]
    TaskEnded(String),
    /// The task belongs to another workload.
    #[error("task {task} belongs to {owner}, not to the caller")]
    TaskNotYours {
        /// The task.
        task: String,
        /// Its workload.
        owner: String,
    },
    /// No access token with this jti on record.
    #[error("no access token with jti {0} is on record")]
    UnknownToken(String),
    /// The access token is revoked already.
    #[error("access token {0} is revoked already")]
    TokenRevoked(String),
    /// No such request.
    #[error("request {0} does not exist")]
    UnknownRequest(String),
    /// The request is not in the state the operation needs.
    #[error("request {id} is {state:?}, not {wanted}")]
    RequestState {
        /// The request.
        id: String,
        /// Its state.
        state: RequestState,
        /// What was needed.
        wanted: &'static str,
    },
    /// The request's content is not what was approved (or shown).
    #[error("request {id}'s content hash is {actual}, not {expected}: an approval binds the exact request")]
    ContentChanged {
        /// The request.
        id: String,
        /// The hash given.
        expected: String,
        /// The stored hash.
        actual: String,
    },
    /// The request (or its approval) lapsed.
    #[error("request {0} expired")]
    RequestExpired(String),
    /// The operator is the workload's own uid.
    #[error("uid {0} is the requesting workload's own uid; another operator must decide")]
    OwnUid(u32),
}

/// A broker signing key as a server publishes it to the others (the
/// JWKS is the union of every server's): the public half only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// The JWK's `kid`.
    pub kid: String,
    /// The JWS algorithm (`ES256`); empty: the broker's default.
    #[serde(default)]
    pub alg: String,
    /// SubjectPublicKeyInfo, DER, standard base64.
    pub public_key_der_b64: String,
    /// Unix seconds: the key leaves the JWKS then (every token it signed
    /// has expired by that time).
    pub expires_at: i64,
}
