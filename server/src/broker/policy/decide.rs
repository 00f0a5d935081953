//! One decision: a Cedar request per (action, resource) pair against the
//! loaded set, and the answer for the whole token request — allowed only
//! if every pair is, held for approval if a deciding permit says so.

use std::collections::BTreeSet;

use cedar_policy::{Decision as CedarDecision, Request};

use super::blast::{Blast, BlastWeights};
use super::error::one_line;
use super::load::Loaded;
use super::request::{self, action_uid, resource_uid, workload_uid};
use super::types::{AccessRequest, Decision, Outcome};

/// A denied pair and the forbid policies that decided it (none: no permit).
struct Denied<'a> {
    action: &'a str,
    resource: &'a str,
    forbids: Vec<String>,
}

/// Decides `req` against `loaded` (see the module doc for the rules).
pub(super) fn decide(loaded: &Loaded, weights: &BlastWeights, req: &AccessRequest) -> Decision {
    let blast = Blast::of(req, weights, &loaded.resources);
    let deny = |reason: String| Decision {
        outcome: Outcome::Deny,
        blast_radius: blast.radius,
        policies: Vec::new(),
        approval: None,
        reason,
    };
    if req.actions.is_empty() {
        return deny("no action requested".into());
    }
    let entities = match request::entities(req, &loaded.entities, &loaded.schema) {
        Ok(e) => e,
        Err(e) => return deny(format!("the request's entities do not fit the schema: {e}")),
    };
    let context = match request::context(req, &blast) {
        Ok(c) => c,
        Err(e) => return deny(format!("the request's context is malformed: {e}")),
    };
    let principal = workload_uid(&req.principal.spiffe_id);
    let mut actions: Vec<&str> = req.actions.iter().map(String::as_str).collect();
    actions.sort_unstable();
    actions.dedup();
    let resources = request::resources_of(req);

    let mut permits = BTreeSet::new();
    let mut denied: Vec<Denied<'_>> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for &action in &actions {
        for &resource in &resources {
            let cedar_request = Request::new(
                principal.clone(),
                action_uid(action),
                resource_uid(resource),
                context.clone(),
                Some(&loaded.schema),
            );
            let cedar_request = match cedar_request {
                Ok(r) => r,
                Err(e) => {
                    errors.push(one_line(e));
                    denied.push(Denied { action, resource, forbids: Vec::new() });
                    continue;
                }
            };
            // Each slice decides on its own; together they are the whole set.
            let (mut satisfied_permits, mut satisfied_forbids) = (Vec::new(), Vec::new());
            let within = request::resource_and_ancestors(req, &loaded.resources, resource);
            for slice in loaded.slices.for_request(&req.principal.spiffe_id, action, &within) {
                let response = loaded.authorizer.is_authorized(&cedar_request, slice, &entities);
                let diagnostics = response.diagnostics();
                errors.extend(diagnostics.errors().map(one_line));
                // Fail closed: Cedar skips a policy whose evaluation errs,
                // so a forbid that errs (a missing tag, an overflow) would
                // otherwise let a permit through. It forbids instead.
                for error in diagnostics.errors() {
                    let cedar_policy::AuthorizationError::PolicyEvaluationError(error) = error;
                    let id = error.policy_id();
                    if slice.policy(id).is_some_and(|p| p.effect() == cedar_policy::Effect::Forbid)
                    {
                        satisfied_forbids.push(format!("{id} (its evaluation failed)"));
                    }
                }
                let deciding = diagnostics.reason().map(ToString::to_string);
                match response.decision() {
                    CedarDecision::Allow => satisfied_permits.extend(deciding),
                    CedarDecision::Deny => satisfied_forbids.extend(deciding),
                }
            }
            if !satisfied_forbids.is_empty() || satisfied_permits.is_empty() {
                satisfied_forbids.sort_unstable();
                satisfied_forbids.dedup();
                denied.push(Denied { action, resource, forbids: satisfied_forbids });
            } else {
                permits.extend(satisfied_permits);
            }
        }
    }

    let errors = if errors.is_empty() {
        String::new()
    } else {
        let mut distinct: Vec<String> = Vec::new();
        for e in errors {
            if !distinct.contains(&e) {
                distinct.push(e);
            }
        }
        format!(" (errors: {})", distinct.join("; "))
    };
    if let Some(first) = denied.first() {
        let forbids: BTreeSet<String> =
            denied.iter().flat_map(|d| d.forbids.iter().cloned()).collect();
        let mut reason = if first.forbids.is_empty() {
            format!("no policy permits {} on {}", first.action, first.resource)
        } else {
            format!(
                "forbidden by {} ({} on {})",
                first.forbids.join(", "),
                first.action,
                first.resource
            )
        };
        if denied.len() > 1 {
            reason
                .push_str(&format!(" and {} more action/resource pairs denied", denied.len() - 1));
        }
        reason.push_str(&errors);
        return Decision { policies: forbids.into_iter().collect(), ..deny(reason) };
    }

    let policies: Vec<String> = permits.into_iter().collect();
    let mut why: Vec<&str> = Vec::new();
    for w in policies.iter().filter_map(|p| loaded.approvals.get(p)) {
        if !why.contains(&w.as_str()) {
            why.push(w);
        }
    }
    let permitted = format!("permitted by {}", policies.join(", "));
    if why.is_empty() {
        Decision {
            outcome: Outcome::Allow,
            blast_radius: blast.radius,
            reason: format!("{permitted}{errors}"),
            policies,
            approval: None,
        }
    } else {
        let approval = why.join("; ");
        Decision {
            outcome: Outcome::Approval,
            blast_radius: blast.radius,
            reason: format!("{permitted}; needs approval: {approval}{errors}"),
            policies,
            approval: Some(approval),
        }
    }
}
