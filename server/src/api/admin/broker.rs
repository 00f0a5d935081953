//! The token broker over the admin API: an operator starts and ends tasks
//! (ending one makes every token issued under it inactive), lists them,
//! and approves or denies the token requests policy held. Each change and
//! its event are one commit; a refusal is a typed [`BrokerRefusal`] turned
//! into a status in one place (`service.rs`), with a denial event.

use tessera_proto::admin as pb;
use tessera_proto::types::{self as types, Operator};
use tonic::{Request, Response, Status};

use crate::api::admin::peer::operator_of;
use crate::broker::records::{AccessToken, BrokerRefusal, PendingRequest, Task};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::Audit;

use super::service::*;

/// A task's lifetime when the operator gives none (seconds).
pub const DEFAULT_TASK_TTL: u64 = 3600;
/// The longest an operator's task may last (seconds).
pub const MAX_TASK_TTL: u64 = 86_400;
/// Most labels on a task.
const MAX_LABELS: usize = 64;
/// Longest task or request ID, label key or value, and reason.
const MAX_TEXT: usize = 1024;

/// A record as the admin API sends it: its JSON.
fn json_of(record: &impl serde::Serialize) -> Result<String, Status> {
    serde_json::to_string(record).map_err(|e| Status::internal(e.to_string()))
}

/// The event of a task started or ended: the operator, the workload, the task.
fn task_event(kind: &str, operator: &Option<Operator>, task: &Task) -> types::Event {
    let labels: Vec<String> = task.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    admin_event(kind, operator)
        .spiffe_id(&task.spiffe_id)
        .attr("task", &task.id)
        .attr("expires_at", task.expires_at)
        .attr("labels", labels.join(","))
}

/// The event of an operator's decision on a held request: who decided, the
/// workload, the task, the tool, the actions and targets, the score, the
/// policies that held it, the hash decided on and the reason.
fn decision_event(operator: &Option<Operator>, held: &PendingRequest) -> types::Event {
    let approved = held.state != crate::broker::records::RequestState::Denied;
    let (kind, decision) = if approved {
        (kind::BROKER_APPROVE, schema::ALLOW)
    } else {
        (kind::BROKER_DENY, schema::DENY)
    };
    let mut e = held
        .event(kind, decision)
        .operator(*operator)
        .attr("content_hash", &held.content_hash)
        .attr("decided_by", &held.decided_by);
    if !approved {
        e = e.code(schema::OPERATOR);
    }
    e.reason = held.reason.clone();
    e
}

/// A task or request ID from a request, or its refusal.
fn id_arg(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("give the {what} ID (--id)"));
    }
    if id.len() > MAX_TEXT || id.chars().any(char::is_control) {
        return Err(format!("invalid {what} ID: want up to {MAX_TEXT} printable characters"));
    }
    Ok(())
}

/// A free text (reason, label) is printable and bounded.
fn text_arg(what: &str, text: &str) -> Result<(), String> {
    if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        return Err(format!("invalid {what}: want up to {MAX_TEXT} printable characters"));
    }
    Ok(())
}

impl AdminService {
    /// Records a refused broker operation (`kind`'s denial, naming the
    /// task or request) and returns its status.
    fn refuse_broker(
        &self,
        kind: &str,
        operator: &Option<Operator>,
        (key, id): (&str, &str),
        status: Status,
    ) -> Status {
        let e = schema::refused(kind, &status).operator(*operator).attr(key, id);
        self.state.events().record(vec![e]);
        status
    }

    pub(super) async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let refuse = |message: String| {
            let status = Status::invalid_argument(message);
            self.refuse_broker(
                kind::BROKER_TASK_START,
                &operator,
                ("spiffe_id", &req.spiffe_id),
                status,
            )
        };
        let spiffe_id = self.parse_id(&operator, "task SPIFFE ID", &req.spiffe_id)?;
        let trust_domain = &self.state.config().trust_domain;
        if spiffe_id.trust_domain() != trust_domain {
            return Err(refuse(format!(
                "task SPIFFE ID {spiffe_id} is not in trust domain {trust_domain}"
            )));
        }
        // The `[broker]` section's lifetimes when there is one.
        let (default_ttl, max_ttl) = match &self.state.config().broker {
            Some(b) => (u64::from(b.task_ttl), u64::from(b.max_task_ttl)),
            None => (DEFAULT_TASK_TTL, MAX_TASK_TTL),
        };
        let ttl = if req.ttl == 0 { default_ttl } else { req.ttl };
        if ttl > max_ttl {
            return Err(refuse(format!("a task may last at most {max_ttl}s, not {ttl}s")));
        }
        if req.labels.len() > MAX_LABELS {
            return Err(refuse(format!("at most {MAX_LABELS} labels, not {}", req.labels.len())));
        }
        for (key, value) in &req.labels {
            if key.is_empty() || key.contains('=') {
                return Err(refuse(format!(
                    "invalid label {key:?}: want key=value, key not empty"
                )));
            }
            text_arg("label", key).and_then(|()| text_arg("label", value)).map_err(&refuse)?;
        }
        let now = self.state.clock().now();
        let task = Task {
            id: format!("task-{}", uuid::Uuid::new_v4()),
            spiffe_id: spiffe_id.to_string(),
            labels: req.labels.clone().into_iter().collect(),
            parent: String::new(),
            started_by: format!("uid:{}", operator.unwrap_or_default().uid),
            created_at: now,
            expires_at: now.saturating_add(ttl as i64),
            ended_at: 0,
            ended_by: String::new(),
            tokens_issued: 0,
            done: Vec::new(),
        };
        let event = task_event(kind::BROKER_TASK_START, &operator, &task).attr("ttl", ttl);
        let (stored, audit) = (task.clone(), Audit::if_ok(operator, vec![event]));
        self.state.store_op(move |store| store.start_task(&stored, &audit)).await?.map_err(
            |refusal| {
                let status = broker_status(&refusal);
                self.refuse_broker(kind::BROKER_TASK_START, &operator, ("task", &task.id), status)
            },
        )?;
        Ok(Response::new(pb::BrokerTask { json: json_of(&task)? }))
    }

    pub(super) async fn end_task(
        &self,
        request: Request<pb::EndTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let refuse = |status: Status| {
            self.refuse_broker(kind::BROKER_TASK_END, &operator, ("task", &req.id), status)
        };
        id_arg("task", &req.id)
            .and_then(|()| text_arg("reason", &req.reason))
            .map_err(|message| refuse(Status::invalid_argument(message)))?;
        let reason = if req.reason.is_empty() { "ended by operator" } else { &req.reason };
        let ended_by = format!("uid:{}: {reason}", operator.unwrap_or_default().uid);
        let reason = reason.to_string();
        // Every token issued under it is inactive from this commit.
        let audit = Audit::new(operator, move |ended: &Result<Task, BrokerRefusal>| match ended {
            Ok(task) => {
                let mut e = task_event(kind::BROKER_TASK_END, &operator, task)
                    .attr("tokens_issued", task.tokens_issued);
                e.reason = reason.clone();
                vec![e]
            }
            Err(_) => Vec::new(),
        });
        let (id, now) = (req.id.clone(), self.state.clock().now());
        let task = self
            .state
            .store_op(move |store| store.end_task(&id, now, &ended_by, &audit))
            .await?
            .map_err(|refusal| refuse(broker_status(&refusal)))?;
        Ok(Response::new(pb::BrokerTask { json: json_of(&task)? }))
    }

    pub(super) async fn revoke_access_token(
        &self,
        request: Request<pb::RevokeAccessTokenRequest>,
    ) -> Result<Response<pb::AccessTokenRecord>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let refuse = |status: Status| {
            self.refuse_broker(kind::BROKER_TOKEN_REVOKE, &operator, ("jti", &req.jti), status)
        };
        id_arg("jti", &req.jti)
            .and_then(|()| text_arg("reason", &req.reason))
            .map_err(|message| refuse(Status::invalid_argument(message)))?;
        let reason = if req.reason.is_empty() {
            "revoked by operator".to_string()
        } else {
            req.reason.clone()
        };
        let audit =
            Audit::new(
                operator,
                move |revoked: &Result<AccessToken, BrokerRefusal>| match revoked {
                    Ok(token) => {
                        let mut e = admin_event(kind::BROKER_TOKEN_REVOKE, &operator)
                            .spiffe_id(token.sub.clone())
                            .attr("task", &token.task)
                            .attr("tool", &token.aud)
                            .attr("actions", token.scope.replace(' ', ","));
                        e.jti = token.jti.clone();
                        e.reason = reason.clone();
                        vec![e]
                    }
                    Err(_) => Vec::new(),
                },
            );
        let (jti, now) = (req.jti.clone(), self.state.clock().now());
        let token = self
            .state
            .store_op(move |store| store.revoke_access_token(&jti, now, &audit))
            .await?
            .map_err(|refusal| refuse(broker_status(&refusal)))?;
        Ok(Response::new(pb::AccessTokenRecord { json: json_of(&token)? }))
    }

    pub(super) async fn list_tasks(
        &self,
        _request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let tasks = self.state.store_op(|store| store.tasks()).await?;
        let tasks = tasks
            .iter()
            .map(|t| Ok(pb::BrokerTask { json: json_of(t)? }))
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    pub(super) async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::BrokerTask>, Status> {
        let id = request.into_inner().id;
        id_arg("task", &id).map_err(Status::invalid_argument)?;
        let lookup = id.clone();
        match self.state.store_op(move |store| store.task(&lookup)).await? {
            Some(task) => Ok(Response::new(pb::BrokerTask { json: json_of(&task)? })),
            None => Err(broker_status(&BrokerRefusal::UnknownTask(id))),
        }
    }

    pub(super) async fn list_broker_requests(
        &self,
        _request: Request<pb::ListBrokerRequestsRequest>,
    ) -> Result<Response<pb::ListBrokerRequestsResponse>, Status> {
        let held = self.state.store_op(|store| store.requests()).await?;
        let requests = held
            .iter()
            .map(|r| Ok(pb::BrokerRequest { json: json_of(r)? }))
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::ListBrokerRequestsResponse { requests }))
    }

    pub(super) async fn get_broker_request(
        &self,
        request: Request<pb::GetBrokerRequestRequest>,
    ) -> Result<Response<pb::BrokerRequest>, Status> {
        let id = request.into_inner().id;
        id_arg("request", &id).map_err(Status::invalid_argument)?;
        let lookup = id.clone();
        match self.state.store_op(move |store| store.request(&lookup)).await? {
            Some(held) => Ok(Response::new(pb::BrokerRequest { json: json_of(&held)? })),
            None => Err(broker_status(&BrokerRefusal::UnknownRequest(id))),
        }
    }

    pub(super) async fn decide_broker_request(
        &self,
        request: Request<pb::DecideBrokerRequestRequest>,
    ) -> Result<Response<pb::BrokerRequest>, Status> {
        let operator = operator_of(&request);
        let req = request.into_inner();
        let kind = if req.approve { kind::BROKER_APPROVE } else { kind::BROKER_DENY };
        let refuse =
            |status: Status| self.refuse_broker(kind, &operator, ("request", &req.id), status);
        let checked = id_arg("request", &req.id).and_then(|()| text_arg("reason", &req.reason));
        let checked = checked.and_then(|()| {
            if req.content_hash.is_empty() {
                Err("give the request's content hash (`request show` prints it): \
                     a decision binds the exact request"
                    .to_string())
            } else if !req.approve && req.reason.trim().is_empty() {
                Err("a denial needs a reason (--reason)".to_string())
            } else {
                Ok(())
            }
        });
        checked.map_err(|message| refuse(Status::invalid_argument(message)))?;
        let reason = if req.reason.is_empty() {
            "approved by operator".to_string()
        } else {
            req.reason.clone()
        };
        let audit =
            Audit::new(operator, move |r: &Result<PendingRequest, BrokerRefusal>| match r {
                Ok(held) => vec![decision_event(&operator, held)],
                Err(_) => Vec::new(),
            });
        let uid = operator.unwrap_or_default().uid;
        let (id, hash, approve, now) =
            (req.id.clone(), req.content_hash.clone(), req.approve, self.state.clock().now());
        let decided = self
            .state
            .store_op(move |store| {
                store.decide_request(&id, &hash, approve, uid, &reason, now, &audit)
            })
            .await?
            .map_err(|refusal| refuse(broker_status(&refusal)))?;
        Ok(Response::new(pb::BrokerRequest { json: json_of(&decided)? }))
    }
}
