//! The policy set cut into slices by principal, action and resource scope,
//! so a decision evaluates only the policies that can apply to it: with
//! 1,000 policies naming workloads and tools, a request reads a handful.
//!
//! A policy whose scope is `principal == Tessera::Workload::"W"` (or `in`
//! it: workloads have no parents) goes to W's slices, any other principal
//! scope to the shared ones; `action == A` to A's, `action in [..]` to
//! those of each concrete action it covers (action groups expanded through
//! the schema), no action scope to those for every action; `resource ==`
//! or `in Tessera::Resource::"R"` to R's, any other resource scope to
//! those for every resource. A Cedar request is then decided over the
//! slices of its workload (and every workload), its action (and every
//! action), and its resource, each of the resource's ancestors (and every
//! resource) — a superset of the policies whose scope matches. Policies
//! are evaluated independently in Cedar, so the union of the slices'
//! answers is the answer of the whole set: denied if any slice has a
//! satisfied forbid, else allowed if any has a satisfied permit.

use std::collections::HashMap;

use cedar_policy::{
    ActionConstraint, Entities, EntityUid, Policy, PolicySet, PrincipalConstraint,
    ResourceConstraint, Schema,
};

use super::request::{is_action, is_resource, is_workload};

/// The slices for one principal and action scope: by resource, and for any resource.
#[derive(Debug, Default)]
struct ByResource {
    resources: HashMap<String, PolicySet>,
    any: PolicySet,
}

impl ByResource {
    fn add(&mut self, resource: Option<&str>, policy: &Policy) -> Result<(), String> {
        match resource {
            None => self.any.add(policy.clone()),
            Some(r) => self.resources.entry(r.to_string()).or_default().add(policy.clone()),
        }
        .map_err(|e| e.to_string())
    }

    fn for_resources<'a>(
        &'a self,
        resources: &'a [&'a str],
    ) -> impl Iterator<Item = &'a PolicySet> + 'a {
        resources.iter().filter_map(|r| self.resources.get(*r)).chain(std::iter::once(&self.any))
    }
}

/// The slices for one principal scope: by action, and for any action.
#[derive(Debug, Default)]
struct ByAction {
    actions: HashMap<String, ByResource>,
    any: ByResource,
}

impl ByAction {
    fn add(
        &mut self,
        actions: Option<&[String]>,
        resource: Option<&str>,
        policy: &Policy,
    ) -> Result<(), String> {
        match actions {
            None => self.any.add(resource, policy),
            Some(names) => names
                .iter()
                .try_for_each(|a| self.actions.entry(a.clone()).or_default().add(resource, policy)),
        }
    }

    fn for_request<'a>(
        &'a self,
        action: &'a str,
        resources: &'a [&'a str],
    ) -> impl Iterator<Item = &'a PolicySet> + 'a {
        self.actions
            .get(action)
            .into_iter()
            .chain(std::iter::once(&self.any))
            .flat_map(move |b| b.for_resources(resources))
    }
}

/// The policy set, sliced.
#[derive(Debug, Default)]
pub(super) struct Slices {
    workloads: HashMap<String, ByAction>,
    any: ByAction,
}

impl Slices {
    /// Slices `policies` (validated against `schema`).
    pub fn build(policies: &PolicySet, schema: &Schema) -> Result<Self, String> {
        let action_entities = schema.action_entities().map_err(|e| e.to_string())?;
        let mut slices = Self::default();
        for policy in policies.policies() {
            let actions = concrete_actions(&policy.action_constraint(), &action_entities);
            let resource = match policy.resource_constraint() {
                ResourceConstraint::Eq(uid)
                | ResourceConstraint::In(uid)
                | ResourceConstraint::IsIn(_, uid)
                    if is_resource(&uid) =>
                {
                    Some(uid.id().unescaped().to_string())
                }
                _ => None,
            };
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Eq(uid) | PrincipalConstraint::In(uid)
                    if is_workload(&uid) =>
                {
                    slices.workloads.entry(uid.id().unescaped().to_string()).or_default()
                }
                _ => &mut slices.any,
            };
            principal.add(actions.as_deref(), resource.as_deref(), policy)?;
        }
        Ok(slices)
    }

    /// The slices that can hold a policy applying to `workload` doing
    /// `action` on a resource that is, or is in, one of `resources` (the
    /// resource and its ancestors).
    pub fn for_request<'a>(
        &'a self,
        workload: &str,
        action: &'a str,
        resources: &'a [&'a str],
    ) -> impl Iterator<Item = &'a PolicySet> + 'a {
        let own = self.workloads.get(workload);
        own.into_iter()
            .chain(std::iter::once(&self.any))
            .flat_map(move |b| b.for_request(action, resources))
            .filter(|s| !s.is_empty())
    }
}

/// The concrete actions an action scope covers (`None`: every action).
fn concrete_actions(scope: &ActionConstraint, actions: &Entities) -> Option<Vec<String>> {
    let named = |uid: &EntityUid| uid.id().unescaped().to_string();
    match scope {
        ActionConstraint::Any => None,
        ActionConstraint::Eq(uid) => Some(vec![named(uid)]),
        ActionConstraint::In(groups) => {
            let covered: Vec<String> = actions
                .iter()
                .map(|e| e.uid())
                .filter(is_action)
                .filter(|a| {
                    groups.iter().any(|g| {
                        g == a || actions.ancestors(a).is_some_and(|mut up| up.any(|x| x == g))
                    })
                })
                .map(|a| named(&a))
                .collect();
            // Nothing resolved (cannot happen for a validated policy): keep it for every action.
            (!covered.is_empty()).then_some(covered)
        }
    }
}
