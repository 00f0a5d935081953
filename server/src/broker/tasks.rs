//! Sub-tasks a workload starts for itself at `POST /task`, within one of
//! its live tasks, when policy permits the action `start_task` on the
//! resource `tessera:tasks` (context: the parent task). The sub-task
//! never outlives its parent, inherits its labels, and ends with it.

use serde_json::{json, Value};
use tessera_common::event_schema::{self, kind, EventExt};

use super::authn::PeerSvid;
use super::error::BrokerError;
use super::exchange::Refused;
use super::form::Form;
use super::policy::Outcome;
use super::records::Task;
use super::Broker;
use crate::store::Audit;

/// The action policy must permit for a workload to start a sub-task.
pub const START_TASK: &str = "start_task";
/// The resource that action is on.
pub const TASKS_RESOURCE: &str = "tessera:tasks";

impl Broker {
    /// Answers a sub-task form (blocking: reads and writes the store).
    pub fn start_sub_task(&self, form: &Form, peer: Option<&PeerSvid>) -> Result<Value, Refused> {
        let now = self.now();
        let store = self.state.store().as_ref();
        let bundle = self.jwt_bundle();
        let verifier = self.verifier(&bundle, store, now);
        let parties = verifier.exchange(form, peer)?;
        if parties.actor.is_some() {
            return Err(BrokerError::InvalidRequest(
                "a workload starts sub-tasks for itself only".into(),
            )
            .into());
        }
        let subject = parties.subject.spiffe_id.as_str().to_string();
        let parent_id = form.require("parent")?;
        let parent = super::exchange::live_task(store, parent_id, &subject, now)?;
        let ttl: i64 = match form.get("ttl") {
            None => i64::from(self.config.task_ttl),
            Some(t) => t
                .parse::<i64>()
                .ok()
                .filter(|t| *t > 0 && *t <= i64::from(self.config.max_task_ttl))
                .ok_or_else(|| {
                    BrokerError::InvalidRequest(format!(
                        "ttl must be 1 to {} seconds",
                        self.config.max_task_ttl
                    ))
                })?,
        };
        let ask = super::form::Ask {
            tool: TASKS_RESOURCE.to_string(),
            actions: vec![START_TASK.to_string()],
            targets: Vec::new(),
            scope: Vec::new(),
            details: Vec::new(),
            detail_types: Vec::new(),
            datatypes: Vec::new(),
            amount: None,
            task: parent.id.clone(),
        };
        let (agent, selectors) = self.whereabouts(store, &parties)?;
        let request = self.access_request(&parties, &agent, &selectors, &ask, &parent, now);
        let decision = self.policy.decide(&request);
        let mut event = event_schema::event(kind::BROKER_TASK_START, event_schema::ALLOW)
            .agent(agent)
            .spiffe_id(subject.clone())
            .attr("parent", &parent.id)
            .attr("policies", decision.policies.join(","))
            .attr("blast_radius", decision.blast_radius);
        if !matches!(decision.outcome, Outcome::Allow) {
            let why = match decision.outcome {
                Outcome::Approval => {
                    "a sub-task cannot wait for approval; an operator starts it".to_string()
                }
                _ => decision.reason.clone(),
            };
            event.decision = event_schema::DENY.into();
            event.reason = super::error::one_line(&why);
            return Err(Refused {
                error: BrokerError::AccessDenied(why),
                event: Some(Box::new(event)),
            });
        }
        let task = Task {
            id: format!("task-{}", uuid::Uuid::new_v4()),
            spiffe_id: subject.clone(),
            labels: parent.labels.clone(),
            parent: parent.id.clone(),
            started_by: subject,
            created_at: now,
            expires_at: (now + ttl).min(parent.expires_at),
            ended_at: 0,
            ended_by: String::new(),
            tokens_issued: 0,
            done: Vec::new(),
        };
        event = event.attr("task", &task.id).attr("expires_at", task.expires_at);
        event.reason = super::error::one_line(&decision.reason);
        store
            .start_task(&task, &Audit::if_ok(None, vec![event]))
            .map_err(BrokerError::from)?
            .map_err(BrokerError::from)?;
        Ok(
            json!({ "task": task.id, "parent": task.parent, "expires_at": task.expires_at, "expires_in": task.expires_at - now }),
        )
    }
}
