//! A token request as Cedar sees it: the principal entity (per request),
//! the resource entities (their attributes prebuilt at load, the request's
//! tool added as a target's parent), and the context record. The shapes
//! are the ones the module doc and the example schema declare.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression, Schema,
};

use super::blast::Blast;
use super::error::one_line;
use super::resources::Resources;
use super::types::AccessRequest;

/// Parses a constant entity type name.
#[allow(clippy::expect_used)] // The three names below are constants that parse.
fn type_name(name: &str) -> EntityTypeName {
    EntityTypeName::from_str(name).expect("a constant entity type name")
}

static WORKLOAD: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Tessera::Workload"));
static RESOURCE: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Tessera::Resource"));
static ACTION: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Tessera::Action"));

/// Whether `uid` is a `Tessera::Workload`.
pub(super) fn is_workload(uid: &EntityUid) -> bool {
    uid.type_name() == &*WORKLOAD
}

/// Whether `uid` is a `Tessera::Resource`.
pub(super) fn is_resource(uid: &EntityUid) -> bool {
    uid.type_name() == &*RESOURCE
}

/// Whether `uid` is a `Tessera::Action`.
pub(super) fn is_action(uid: &EntityUid) -> bool {
    uid.type_name() == &*ACTION
}

/// `Tessera::Workload::"<spiffe id>"`.
pub(super) fn workload_uid(spiffe_id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(WORKLOAD.clone(), EntityId::new(spiffe_id))
}

/// `Tessera::Resource::"<id>"`.
pub(super) fn resource_uid(id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(RESOURCE.clone(), EntityId::new(id))
}

/// `Tessera::Action::"<name>"`.
pub(super) fn action_uid(name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(ACTION.clone(), EntityId::new(name))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.into_iter().map(|s| string(s)))
}

type Attrs = Vec<(String, RestrictedExpression)>;

/// A resource's attributes and ancestors, built once per load.
#[derive(Debug)]
struct Parts {
    attrs: Attrs,
    ancestors: Vec<EntityUid>,
}

/// The resources file as Cedar entity parts, by id, and the parts of a
/// resource it does not name.
#[derive(Debug)]
pub(super) struct ResourceEntities {
    known: HashMap<String, Parts>,
    unknown: Attrs,
}

fn resource_attrs(owner: &str, sensitivity: i64, kind: &str) -> Attrs {
    vec![
        ("owner".into(), string(owner)),
        ("sensitivity".into(), RestrictedExpression::new_long(sensitivity)),
        ("kind".into(), string(kind)),
    ]
}

impl ResourceEntities {
    pub fn build(resources: &Resources, default_sensitivity: i64) -> Self {
        let known = resources
            .iter()
            .map(|(id, r)| {
                let parts = Parts {
                    attrs: resource_attrs(&r.owner, r.sensitivity, &r.kind),
                    ancestors: r.ancestors.iter().map(|a| resource_uid(a)).collect(),
                };
                (id.clone(), parts)
            })
            .collect();
        Self { known, unknown: resource_attrs("", default_sensitivity, "") }
    }

    /// The entity of resource `id`; `tool`, when given, is one more parent
    /// (a target is inside the tool it is reached through).
    fn entity(&self, id: &str, tool: Option<&str>) -> Result<Entity, String> {
        let (attrs, ancestors) = match self.known.get(id) {
            Some(p) => (p.attrs.clone(), p.ancestors.as_slice()),
            None => (self.unknown.clone(), &[][..]),
        };
        let parents = ancestors.iter().cloned().chain(tool.map(resource_uid));
        Entity::new_with_tags(resource_uid(id), attrs, parents, []).map_err(one_line)
    }
}

/// The principal: `Tessera::Workload::"<spiffe id>"` with `trust_domain`,
/// `path`, `agent`, `selectors` (a set of `type:value`), its labels as tags.
fn principal_entity(req: &AccessRequest) -> Result<Entity, String> {
    let p = &req.principal;
    let attrs = [
        ("trust_domain".to_string(), string(&p.trust_domain)),
        ("path".to_string(), string(&p.path)),
        ("agent".to_string(), string(&p.agent)),
        ("selectors".to_string(), strings(&p.selectors)),
    ];
    let tags = p.labels.iter().map(|(k, v)| (k.clone(), string(v)));
    Entity::new_with_tags(workload_uid(&p.spiffe_id), attrs, [], tags).map_err(one_line)
}

/// The distinct targets of `req`, or the tool when it names none: the
/// resources of its Cedar requests.
pub(super) fn resources_of(req: &AccessRequest) -> Vec<&str> {
    let mut targets: Vec<&str> = req.targets.iter().map(String::as_str).collect();
    targets.sort_unstable();
    targets.dedup();
    if targets.is_empty() {
        targets.push(&req.tool);
    }
    targets
}

/// `resource` and every resource it is in: itself, its `parent` chain
/// and, for a target, the tool and the tool's chain (what `resource in`
/// can match; the slices are looked up by these).
pub(super) fn resource_and_ancestors<'a>(
    req: &'a AccessRequest,
    resources: &'a Resources,
    resource: &'a str,
) -> Vec<&'a str> {
    let chain = |id: &'a str| {
        std::iter::once(id).chain(
            resources.get(id).into_iter().flat_map(|r| r.ancestors.iter().map(String::as_str)),
        )
    };
    let mut all: Vec<&str> = chain(resource).collect();
    if resource != req.tool {
        all.extend(chain(&req.tool));
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// The request's entities: the principal, the tool and every target
/// (checked against the schema; the schema adds the action entities).
pub(super) fn entities(
    req: &AccessRequest,
    resources: &ResourceEntities,
    schema: &Schema,
) -> Result<Entities, String> {
    let mut list = Vec::with_capacity(req.targets.len() + 2);
    list.push(principal_entity(req)?);
    list.push(resources.entity(&req.tool, None)?);
    for target in resources_of(req) {
        if target != req.tool {
            list.push(resources.entity(target, Some(&req.tool))?);
        }
    }
    Entities::from_entities(list, Some(schema)).map_err(one_line)
}

/// UTC hour (0–23) and weekday (0 = Monday) of Unix time `now`.
pub(super) fn hour_and_weekday(now: i64) -> (i64, i64) {
    let days = now.div_euclid(86_400);
    // 1970-01-01 was a Thursday (3 when Monday is 0).
    (now.rem_euclid(86_400) / 3600, (days + 3).rem_euclid(7))
}

/// The context record (see the module doc for its shape).
pub(super) fn context(req: &AccessRequest, blast: &Blast) -> Result<Context, String> {
    let c = &req.context;
    let long = RestrictedExpression::new_long;
    let task = match &c.task {
        Some(t) => {
            let labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            [
                ("id".to_string(), string(&t.id)),
                ("age_secs".to_string(), long(t.age_secs)),
                ("tokens_issued".to_string(), long(t.tokens_issued)),
                ("done".to_string(), strings(&t.done)),
                ("labels_kv".to_string(), strings(&labels)),
            ]
        }
        None => [
            ("id".to_string(), string("")),
            ("age_secs".to_string(), long(0)),
            ("tokens_issued".to_string(), long(0)),
            ("done".to_string(), strings(&[])),
            ("labels_kv".to_string(), strings(&[])),
        ],
    };
    let task = RestrictedExpression::new_record(task).map_err(one_line)?;
    let (hour, weekday) = hour_and_weekday(c.now);
    let pairs = [
        ("task".to_string(), task),
        ("datatypes".to_string(), strings(&c.datatypes)),
        ("detail_types".to_string(), strings(&c.detail_types)),
        ("scope".to_string(), strings(&c.scope)),
        ("amount".to_string(), long(c.amount.unwrap_or(0))),
        ("has_amount".to_string(), RestrictedExpression::new_bool(c.amount.is_some())),
        ("hour".to_string(), long(hour)),
        ("weekday".to_string(), long(weekday)),
        ("now".to_string(), long(c.now)),
        ("anomalies".to_string(), strings(&c.anomalies)),
        ("blast_radius".to_string(), long(blast.radius)),
        ("breadth".to_string(), long(blast.breadth)),
        ("sensitivity".to_string(), long(blast.sensitivity)),
        ("actor".to_string(), string(c.actor.as_deref().unwrap_or(""))),
    ];
    Context::from_pairs(pairs).map_err(one_line)
}
