//! Token exchange (RFC 8693) at `POST /token`: who asks (authn.rs), what
//! for (form.rs), what policy says now (policy/), and then a token, a
//! held request, or a refusal — each with its event, the token's and the
//! held request's in the same commit as their record.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use tessera_common::event_schema::{self, kind, EventExt};
use tessera_proto::types as pb;

use super::authn::{Parties, PeerSvid};
use super::error::{one_line, BrokerError};
use super::form::{Ask, Form, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT};
use super::policy::{AccessRequest, Decision, Outcome, Principal, RequestContext, TaskContext};
use super::records::{AccessToken, PendingRequest, RequestState, Task, TokenToRecord};
use super::Broker;
use crate::store::{Audit, EntryFilter, Store};

/// A refusal and the event that records it (stored after the answer,
/// durably: a refusal changes nothing).
#[derive(Debug)]
pub struct Refused {
    /// What the caller is told.
    pub error: BrokerError,
    /// The decision's event, if the request got as far as a decision.
    pub event: Option<Box<pb::Event>>,
}

impl From<BrokerError> for Refused {
    fn from(error: BrokerError) -> Self {
        Self { error, event: None }
    }
}

/// What the subject's registration entry says about it, for policy: its
/// selectors (`type:value`) and its labels (the principal's tags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct EntryFacts {
    pub(super) selectors: Vec<String>,
    pub(super) labels: BTreeMap<String, String>,
}

/// What the broker knows of the request while deciding it: for events.
struct Described<'a> {
    parties: &'a Parties,
    agent: String,
    ask: &'a Ask,
    blast: i64,
    policies: &'a [String],
}

impl Described<'_> {
    fn event(&self, kind: &str, decision: &str, reason: &str) -> pb::Event {
        let mut e = event_schema::event(kind, decision)
            .agent(self.agent.clone())
            .spiffe_id(self.parties.subject.spiffe_id.as_str())
            .attr("task", &self.ask.task)
            .attr("tool", &self.ask.tool)
            .attr("actions", self.ask.actions.join(","))
            .attr("blast_radius", self.blast)
            .attr("policies", self.policies.join(","));
        if !self.ask.targets.is_empty() {
            e = e.attr("targets", self.ask.targets.join(","));
        }
        if let Some(actor) = &self.parties.actor {
            e = e.attr("actor", actor.spiffe_id.as_str());
        }
        e.reason = one_line(reason);
        e
    }
}

impl Broker {
    /// Answers a token-exchange form (blocking: reads and writes the store).
    pub fn exchange(&self, form: &Form, peer: Option<&PeerSvid>) -> Result<Value, Refused> {
        match form.get("grant_type") {
            None => return Err(BrokerError::InvalidRequest("grant_type is required".into()).into()),
            Some(GRANT_TOKEN_EXCHANGE) => {}
            Some(other) => return Err(BrokerError::UnsupportedGrantType(one_line(other)).into()),
        }
        match form.get("requested_token_type") {
            None | Some(TOKEN_TYPE_ACCESS) | Some(TOKEN_TYPE_JWT) => {}
            Some(other) => {
                return Err(BrokerError::InvalidRequest(format!(
                    "requested_token_type {:?} is not issued here: {TOKEN_TYPE_ACCESS}",
                    one_line(other)
                ))
                .into())
            }
        }
        let ask = Ask::from_form(form, &self.config.detail_types)?;
        let now = self.now();
        let store = self.state.store().as_ref();
        let bundle = self.jwt_bundle();
        let verifier = self.verifier(&bundle, store, now);
        let parties = verifier.exchange(form, peer)?;
        let subject = parties.subject.spiffe_id.as_str().to_string();

        let task = live_task(store, &ask.task, &subject, now)?;

        let (agent, facts) = self.whereabouts(store, &parties)?;
        let request = self.access_request(&parties, &agent, &facts, &ask, &task, now);
        let decision = self.policy.decide(&request);
        let content = canonical(&parties, &ask);
        let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, content.as_bytes()));
        let described = Described {
            parties: &parties,
            agent: agent.clone(),
            ask: &ask,
            blast: decision.blast_radius,
            policies: &decision.policies,
        };
        self.raise_anomalies(&described, now);

        let needs_approval = match decision.outcome {
            Outcome::Deny => {
                return Err(self.denied(
                    &described,
                    BrokerError::AccessDenied(decision.reason.clone()),
                    now,
                ))
            }
            Outcome::Approval => decision.approval.clone(),
            Outcome::Allow => self
                .config
                .approval_above
                .filter(|limit| decision.blast_radius > *limit)
                .map(|limit| format!("blast radius {} is above {limit}", decision.blast_radius)),
        };
        let approved = match needs_approval {
            None => None,
            Some(why) => Some(self.held(
                store,
                form,
                &described,
                &decision,
                &content,
                &hash,
                &facts.selectors,
                &why,
                now,
            )?),
        };
        self.issue(&described, &task, approved, &decision, now)
    }

    /// The subject's agent, and the selectors and labels of its entry:
    /// from the record of the SVID it proved itself with (the entry it was
    /// issued for, as that entry stands now; an SVID an operator minted is
    /// recorded without one: no selectors, no labels), else from the
    /// entries with its SPIFFE ID.
    ///
    /// From several entries: every entry's selectors, and only the labels
    /// they all agree on — a key is kept when every entry has it with the
    /// same value, so a label one entry lacks or contradicts is not one
    /// the workload can be said to carry.
    pub(super) fn whereabouts(
        &self,
        store: &dyn Store,
        parties: &Parties,
    ) -> Result<(String, EntryFacts), BrokerError> {
        let subject = &parties.subject;
        if let Some(issued) = store.issued(&subject.record)? {
            if let Some(entry) = store.entry(&issued.entry_id)? {
                let selectors = entry.selectors.iter().map(ToString::to_string).collect();
                return Ok((issued.agent_id, EntryFacts { selectors, labels: entry.labels }));
            }
            return Ok((issued.agent_id, EntryFacts::default()));
        }
        let filter =
            EntryFilter { spiffe_id: Some(subject.spiffe_id.clone()), ..Default::default() };
        let entries = store.list_entries(&filter, None, 16)?;
        let mut selectors: Vec<String> =
            entries.iter().flat_map(|e| e.selectors.iter().map(ToString::to_string)).collect();
        selectors.sort();
        selectors.dedup();
        let labels = agreed_labels(entries.iter().map(|e| &e.labels));
        let agents: Vec<String> =
            entries.iter().map(|e| e.parent_id.as_str().to_string()).collect();
        Ok((agents.join(","), EntryFacts { selectors, labels }))
    }

    pub(super) fn access_request(
        &self,
        parties: &Parties,
        agent: &str,
        facts: &EntryFacts,
        ask: &Ask,
        task: &Task,
        now: i64,
    ) -> AccessRequest {
        let id = &parties.subject.spiffe_id;
        AccessRequest {
            principal: Principal {
                spiffe_id: id.as_str().to_string(),
                trust_domain: id.trust_domain().as_str().to_string(),
                path: id.path().to_string(),
                agent: agent.to_string(),
                selectors: facts.selectors.clone(),
                labels: facts.labels.clone(),
            },
            actions: ask.actions.clone(),
            tool: ask.tool.clone(),
            targets: ask.targets.clone(),
            context: RequestContext {
                task: Some(TaskContext {
                    id: task.id.clone(),
                    age_secs: now - task.created_at,
                    tokens_issued: i64::try_from(task.tokens_issued).unwrap_or(i64::MAX),
                    done: task.done.clone(),
                    labels: task.labels.clone(),
                }),
                datatypes: ask.datatypes.clone(),
                detail_types: ask.detail_types.clone(),
                scope: ask.scope.clone(),
                amount: ask.amount,
                now,
                anomalies: self.anomalies.recent(id.as_str(), now),
                actor: parties.actor.as_ref().map(|a| a.spiffe_id.as_str().to_string()),
            },
        }
    }

    fn raise_anomalies(&self, d: &Described<'_>, now: i64) {
        let raised =
            self.anomalies.observe(d.parties.subject.spiffe_id.as_str(), &d.ask.tool, d.blast, now);
        let events: Vec<pb::Event> = raised
            .into_iter()
            .map(|k| {
                d.event(k, "", &format!("{} on {}", k.trim_start_matches("anomaly."), d.ask.tool))
            })
            .collect();
        if !events.is_empty() {
            self.state.events().record(events);
        }
    }

    fn denied(&self, d: &Described<'_>, error: BrokerError, now: i64) -> Refused {
        if self.anomalies.denied(d.parties.subject.spiffe_id.as_str(), now) {
            self.state.events().record(vec![d.event(
                kind::ANOMALY_BROKER_DENIAL_BURST,
                "",
                &format!(
                    "{} denials within {} s",
                    super::anomaly::BURST_DENIALS,
                    super::anomaly::BURST_WINDOW
                ),
            )]);
        }
        let event =
            d.event(kind::BROKER_TOKEN, event_schema::DENY, &error.to_string()).code(error.code());
        Refused { error, event: Some(Box::new(event)) }
    }

    /// A request that needs approval: the approved request to issue
    /// under, or the refusal (pending, denied, expired, changed).
    #[allow(clippy::too_many_arguments)]
    fn held(
        &self,
        store: &dyn Store,
        form: &Form,
        d: &Described<'_>,
        decision: &Decision,
        content: &str,
        hash: &str,
        selectors: &[String],
        why: &str,
        now: i64,
    ) -> Result<String, Refused> {
        let subject = d.parties.subject.spiffe_id.as_str();
        let existing = match form.get("request_id") {
            Some(id) => {
                let Some(held) = store.request(id).map_err(BrokerError::from)? else {
                    return Err(BrokerError::Expired(format!(
                        "request {id} does not exist (or lapsed)"
                    ))
                    .into());
                };
                if held.spiffe_id != subject {
                    return Err(BrokerError::InvalidGrant(format!(
                        "request {id} is not the caller's"
                    ))
                    .into());
                }
                if held.content_hash != hash {
                    let error = BrokerError::InvalidRequest(format!(
                        "request {id}'s content changed since it was held: an approval binds the exact request (held {}, now {hash})",
                        held.content_hash
                    ));
                    return Err(self.denied(d, error, now));
                }
                Some(held)
            }
            None => store.requests().map_err(BrokerError::from)?.into_iter().find(|r| {
                r.spiffe_id == subject
                    && r.content_hash == hash
                    && matches!(r.state, RequestState::Pending | RequestState::Approved)
            }),
        };
        let interval = self.config.poll_interval;
        let Some(held) = existing else {
            let request = PendingRequest {
                id: format!("req-{}", uuid::Uuid::new_v4()),
                content_hash: hash.to_string(),
                spiffe_id: subject.to_string(),
                agent_id: d.agent.clone(),
                task: d.ask.task.clone(),
                tool: d.ask.tool.clone(),
                actions: d.ask.actions.clone(),
                targets: d.ask.targets.clone(),
                content: content.to_string(),
                blast_radius: decision.blast_radius,
                policies: decision.policies.clone(),
                why: why.to_string(),
                excluded_uids: own_uids(selectors),
                created_at: now,
                expires_at: now + i64::from(self.config.approval_ttl),
                state: RequestState::Pending,
                decided_by: String::new(),
                reason: String::new(),
            };
            let event = d.event(kind::BROKER_PENDING, "", why).attr("request", &request.id);
            let stored = store
                .put_request(&request, &Audit::if_ok(None, vec![event]))
                .map_err(BrokerError::from)?;
            stored.map_err(BrokerError::from)?;
            // The request itself counts as the first poll.
            self.polls.too_soon(&request.id, self.state.clock().now_ms(), interval);
            return Err(BrokerError::Pending {
                request_id: request.id,
                interval,
                why: why.to_string(),
            }
            .into());
        };
        match held.state {
            RequestState::Pending if held.expires_at > now => {
                if let Some(wait) =
                    self.polls.too_soon(&held.id, self.state.clock().now_ms(), interval)
                {
                    return Err(
                        BrokerError::SlowDown { request_id: held.id, interval: wait }.into()
                    );
                }
                Err(BrokerError::Pending { request_id: held.id, interval, why: held.why }.into())
            }
            RequestState::Approved if held.expires_at > now => Ok(held.id),
            RequestState::Denied => Err(self.denied(
                d,
                BrokerError::AccessDenied(format!(
                    "request {} was denied by {}: {}",
                    held.id, held.decided_by, held.reason
                )),
                now,
            )),
            RequestState::Issued => Err(BrokerError::InvalidGrant(format!(
                "request {}'s approval was used already; ask again",
                held.id
            ))
            .into()),
            _ => Err(self.denied(
                d,
                BrokerError::Expired(format!("request {} lapsed", held.id)),
                now,
            )),
        }
    }

    /// Signs and records the access token (the record, the task's
    /// progress, the approval's use and the event in one commit).
    fn issue(
        &self,
        d: &Described<'_>,
        task: &Task,
        request: Option<String>,
        decision: &Decision,
        now: i64,
    ) -> Result<Value, Refused> {
        let parties = d.parties;
        let ask = d.ask;
        let mut exp = (now + i64::from(self.config.token_ttl))
            .min(task.expires_at)
            .min(parties.subject.expires_at);
        if let Some(actor) = &parties.actor {
            exp = exp.min(actor.expires_at);
        }
        if exp <= now {
            return Err(
                BrokerError::InvalidGrant("the task or the credential expires now".into()).into()
            );
        }
        let jti = uuid::Uuid::new_v4().to_string();
        let mut claims = Map::new();
        claims.insert("iss".into(), self.config.issuer.clone().into());
        claims.insert("sub".into(), parties.subject.spiffe_id.as_str().into());
        claims.insert("aud".into(), ask.tool.clone().into());
        claims.insert("client_id".into(), parties.client.as_str().into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), exp.into());
        claims.insert("jti".into(), jti.clone().into());
        claims.insert("task".into(), ask.task.clone().into());
        let scope = ask.actions.join(" ");
        claims.insert("scope".into(), scope.clone().into());
        if !ask.details.is_empty() {
            claims.insert("authorization_details".into(), Value::Array(ask.details.clone()));
        }
        if let Some(actor) = &parties.actor {
            claims.insert("act".into(), json!({ "sub": actor.spiffe_id.as_str() }));
        }
        let token = self
            .keys
            .signer()
            .sign_claims(&Value::Object(claims).to_string())
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let record = AccessToken {
            jti: jti.clone(),
            sub: parties.subject.spiffe_id.as_str().to_string(),
            aud: ask.tool.clone(),
            task: ask.task.clone(),
            scope: scope.clone(),
            authorization_details: if ask.details.is_empty() {
                String::new()
            } else {
                Value::Array(ask.details.clone()).to_string()
            },
            actor: parties
                .actor
                .as_ref()
                .map(|a| a.spiffe_id.as_str().to_string())
                .unwrap_or_default(),
            client_id: parties.client.as_str().to_string(),
            iat: now,
            exp,
            request: request.clone().unwrap_or_default(),
            revoked_at: 0,
        };
        let reason = match &request {
            Some(id) => format!("approved request {id}; {}", decision.reason),
            None => decision.reason.clone(),
        };
        let mut event = d.event(kind::BROKER_TOKEN, event_schema::ALLOW, &reason);
        event.jti = jti.clone();
        event.audience = vec![ask.tool.clone()];
        if let Some(id) = &request {
            event = event.attr("request", id);
        }
        let stored =
            self.writer.record(TokenToRecord { token: record, done: ask.pairs(), now }, event)?;
        if let Err(refusal) = stored {
            return Err(self.denied(d, BrokerError::from(refusal), now));
        }
        let mut answer = json!({
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_ACCESS,
            "token_type": "Bearer",
            "expires_in": exp - now,
        });
        if !ask.details.is_empty() {
            answer["authorization_details"] = Value::Array(ask.details.clone());
        }
        if ask.scope.is_empty() {
            // Actions came from authorization_details alone: say what scope the token carries.
            answer["scope"] = scope.into();
        }
        Ok(answer)
    }
}

/// The task `id` if it exists, is `subject`'s and is live at `now`: a
/// token is issued, or a sub-task started, only within one.
pub(super) fn live_task(
    store: &dyn Store,
    id: &str,
    subject: &str,
    now: i64,
) -> Result<Task, BrokerError> {
    let task = store
        .task(id)?
        .ok_or_else(|| BrokerError::InvalidGrant(format!("task {id} does not exist")))?;
    if task.spiffe_id != subject {
        return Err(BrokerError::InvalidGrant(format!(
            "task {} belongs to {}, not to {subject}",
            task.id, task.spiffe_id
        )));
    }
    if !task.is_live(now) {
        return Err(BrokerError::InvalidGrant(format!("task {} has ended", task.id)));
    }
    Ok(task)
}

/// The request's canonical content (what an approval binds): the parties
/// and the normalized ask, as JSON with sorted keys.
fn canonical(parties: &Parties, ask: &Ask) -> String {
    json!({
        "sub": parties.subject.spiffe_id.as_str(),
        "actor": parties.actor.as_ref().map(|a| a.spiffe_id.as_str()),
        "tool": ask.tool,
        "actions": ask.actions,
        "targets": ask.targets,
        "scope": ask.scope,
        "authorization_details": ask.details,
        "task": ask.task,
    })
    .to_string()
}

/// The labels every one of `sets` has with the same value (none when
/// there are no sets).
fn agreed_labels<'a>(
    mut sets: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let Some(first) = sets.next() else {
        return BTreeMap::new();
    };
    let mut agreed = first.clone();
    for set in sets {
        agreed.retain(|key, value| set.get(key) == Some(value));
    }
    agreed
}

/// The uids a workload runs as, from its entry's `unix:uid:N` selectors:
/// they may not approve its requests.
fn own_uids(selectors: &[String]) -> Vec<u32> {
    selectors
        .iter()
        .filter_map(|s| s.strip_prefix("unix:uid:"))
        .filter_map(|u| u.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn several_entries_give_only_the_labels_they_agree_on() {
        let a = set(&[("team", "finance"), ("env", "prod"), ("tier", "1")]);
        let b = set(&[("team", "finance"), ("env", "staging")]);
        assert_eq!(agreed_labels([&a, &b].into_iter()), set(&[("team", "finance")]));
        assert_eq!(agreed_labels([&a].into_iter()), a);
        assert_eq!(agreed_labels([&a, &set(&[])].into_iter()), set(&[]));
        assert_eq!(agreed_labels(std::iter::empty()), set(&[]));
    }
}
