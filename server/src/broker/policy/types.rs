//! The types the engine speaks: a request, its decision, and the summary
//! of what is loaded. They depend on nothing else in the folder.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// What a loaded policy set holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySummary {
    /// The policy directory.
    pub dir: String,
    /// Policies in force.
    pub policies: usize,
    /// Of which permits.
    pub permits: usize,
    /// Of which forbids.
    pub forbids: usize,
    /// Policies that carry `@approval`.
    pub approvals: usize,
    /// The `*.cedar` files, by name.
    pub files: Vec<String>,
    /// The schema file's name.
    pub schema: String,
    /// Resources in the resources file.
    pub resources: usize,
    /// The resources file, if any.
    pub resources_file: Option<String>,
    /// Unix seconds.
    pub loaded_at: i64,
}

impl fmt::Display for PolicySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} policies ({} permit, {} forbid, {} with @approval) from {}, {} resources, schema {}",
            self.policies,
            self.permits,
            self.forbids,
            self.approvals,
            if self.files.is_empty() { "no files".into() } else { self.files.join(", ") },
            self.resources,
            self.schema
        )
    }
}

/// A token request as policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AccessRequest {
    /// Who asks.
    pub principal: Principal,
    /// Each a Cedar action `Tessera::Action::"<name>"`; every one must be allowed.
    pub actions: Vec<String>,
    /// The audience/resource URI: `Tessera::Resource::"<tool>"`.
    pub tool: String,
    /// `authorization_details` locations/identifiers: each a
    /// `Tessera::Resource` whose parent is the tool.
    pub targets: Vec<String>,
    /// Everything else policy reads (`context`).
    pub context: RequestContext,
}

/// The workload asking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// Its SPIFFE ID (the entity's id).
    pub spiffe_id: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// The SPIFFE ID's path (`/agents/reporter`).
    pub path: String,
    /// Its agent's SPIFFE ID (empty if unknown).
    pub agent: String,
    /// Its entry's selectors, `type:value`.
    pub selectors: Vec<String>,
    /// Its entry's labels (Cedar entity tags).
    pub labels: BTreeMap<String, String>,
}

/// The request's context (see the module doc for how Cedar sees it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestContext {
    /// The task it acts within.
    pub task: Option<TaskContext>,
    /// `authorization_details` datatypes.
    pub datatypes: Vec<String>,
    /// `authorization_details` types.
    pub detail_types: Vec<String>,
    /// The requested scope, split on spaces.
    pub scope: Vec<String>,
    /// An amount from `authorization_details`, if any.
    pub amount: Option<i64>,
    /// Unix seconds.
    pub now: i64,
    /// The caller's recent anomaly signals (event kinds).
    pub anomalies: Vec<String>,
    /// The workload it acts on behalf of (`actor_token`), if any.
    pub actor: Option<String>,
}

/// The task a request acts within.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TaskContext {
    /// Its id.
    pub id: String,
    /// Seconds since it started.
    pub age_secs: i64,
    /// Tokens issued under it so far.
    pub tokens_issued: i64,
    /// `action resource` pairs granted under it so far.
    pub done: Vec<String>,
    /// Its labels (Cedar sees `k=v` strings in `labels_kv`).
    pub labels: BTreeMap<String, String>,
}

/// What policy says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every pair permitted, no deciding permit asks for approval.
    Allow,
    /// Some pair not permitted, or forbidden.
    Deny,
    /// Every pair permitted, and a deciding permit carries `@approval`.
    Approval,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "Allow",
            Self::Deny => "Deny",
            Self::Approval => "Approval",
        })
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow, deny or hold for approval.
    pub outcome: Outcome,
    /// The request's blast radius.
    pub blast_radius: i64,
    /// The deciding policies' `@id` (or `<file>:policyN`), de-duplicated,
    /// sorted: the permits when allowed, the forbids when denied.
    pub policies: Vec<String>,
    /// The `@approval` values (joined with "; ") when held for approval.
    pub approval: Option<String>,
    /// One line: "permitted by …", "no policy permits write on …",
    /// "forbidden by …", or what went wrong.
    pub reason: String,
}
