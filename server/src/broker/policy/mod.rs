//! Request-time policy: Cedar policies and a schema read from a directory,
//! validated at load, swapped in atomically on reload, and asked once per
//! requested (action, resource) pair for every token request.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use tessera_server::broker::policy::{AccessRequest, BlastWeights, Outcome, PolicyEngine};
//!
//! let engine = PolicyEngine::load(
//!     Path::new("examples/broker/policies"),
//!     Some(Path::new("examples/broker/resources.toml")),
//!     BlastWeights::default(),
//! )?;
//! let mut req = AccessRequest::default();
//! req.principal.spiffe_id = "spiffe://example.org/agents/reporter".into();
//! req.actions = vec!["read".into()];
//! req.tool = "https://tools.example/crm".into();
//! let decision = engine.decide(&req);
//! assert_eq!(decision.outcome, Outcome::Allow);
//! # Ok(()) }
//! ```
//!
//! # The directory
//!
//! Exactly one `*.cedarschema` file and any number of `*.cedar` files. Each
//! policy is known by its `@id("...")` annotation (unique across files), or
//! else as `<file>:policyN`. A permit carrying `@approval("why")` that
//! decides a request makes it [`Outcome::Approval`] rather than `Allow`.
//! The policies are validated against the schema in strict mode. Any fault
//! (a syntax error, a validation error, a duplicate `@id`, a malformed
//! resources file) is a one-line [`PolicyError`] naming the file and line,
//! and on [`PolicyEngine::reload`] the set in force stays in force.
//!
//! # What Cedar sees
//!
//! - principal: `Tessera::Workload::"<SPIFFE ID>"` with attributes
//!   `trust_domain: String`, `path: String`, `agent: String` (the agent's
//!   SPIFFE ID, or empty), `selectors: Set<String>` (`type:value`), and the
//!   entry's labels as tags (`principal.getTag("team")`, `tags String`).
//! - action: `Tessera::Action::"<name>"`, once per requested action.
//! - resource: `Tessera::Resource::"<id>"` with `owner: String`,
//!   `sensitivity: Long`, `kind: String` from the resources file (a
//!   resource it does not name: `""`, the default sensitivity, `""`). The
//!   resource is each target in turn, its parents the tool and the
//!   resources file's `parent` chain (so `resource in Tessera::Resource::"<tool>"`
//!   holds); with no targets, the tool itself.
//! - context: a record of this fixed shape (the schema declares it as the
//!   context of every action):
//!
//! ```text
//! task: { id: String, age_secs: Long, tokens_issued: Long,
//!         done: Set<String>, labels_kv: Set<String> }   // no task: "" and zeros
//! datatypes: Set<String>, detail_types: Set<String>, scope: Set<String>,
//! amount: Long (0 if none), has_amount: Bool,
//! hour: Long (UTC 0-23), weekday: Long (0 = Monday), now: Long (Unix s),
//! anomalies: Set<String>, actor: String ("" if none),
//! blast_radius: Long, breadth: Long, sensitivity: Long
//! ```
//!
//! # Blast radius
//!
//! `blast_radius = breadth × sensitivity × action weight` ([`BlastWeights`]):
//! breadth is the number of distinct targets (1 with none; a target ending
//! in `*` counts `wildcard_breadth`, 10), sensitivity the highest among the
//! tool and the targets (`default_sensitivity`, 1, for one the resources
//! file does not name), and the action weight the highest among the
//! requested actions (read=1, list=1, write=3, create=3, update=3,
//! delete=5, transfer=5, anything else `default_action`, 2). Writing to two
//! targets of a sensitivity-5 tool: 2 × 5 × 3 = 30. The engine reports it
//! (and gives it to policy); the approval threshold is the broker's.
//!
//! # The decision
//!
//! Allowed only if every (action, resource) pair is allowed; denied if any
//! is (the reason names the pair and the forbid policies, or "no policy
//! permits"). [`Decision::policies`] lists the deciding policies: the
//! permits when allowed, the forbids when denied.
//!
//! Files: `load.rs` (the directory), `resources.rs` (the resources file),
//! `request.rs` (entities and context), `blast.rs` (the formula),
//! `slices.rs` (the set cut by principal and action, so a decision reads
//! only what can apply), `decide.rs` (one decision), `watch.rs` (reload on change or SIGHUP),
//! `error.rs`. They use nothing of the broker outside this folder.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

mod blast;
mod decide;
mod error;
mod load;
mod request;
mod resources;
mod slices;
mod watch;

pub use blast::BlastWeights;
pub use error::{Location, PolicyError};

/// The request-time policy engine: the loaded set (swapped whole on
/// reload) and where it was read from.
pub struct PolicyEngine {
    dir: PathBuf,
    resources: Option<PathBuf>,
    weights: BlastWeights,
    loaded: ArcSwap<load::Loaded>,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("dir", &self.dir)
            .field("resources", &self.resources)
            .field("weights", &self.weights)
            .field("summary", &self.summary())
            .finish()
    }
}

impl PolicyEngine {
    /// Loads and validates every `*.cedar` file and the one `*.cedarschema`
    /// in `dir`, and the resources file.
    pub fn load(
        dir: &Path,
        resources: Option<&Path>,
        weights: BlastWeights,
    ) -> Result<Self, PolicyError> {
        let loaded = load::load(dir, resources, &weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            resources: resources.map(Path::to_path_buf),
            weights,
            loaded: ArcSwap::from_pointee(loaded),
        })
    }

    /// Re-reads the same paths; on any error the set in force stays in
    /// force and the error is returned.
    pub fn reload(&self) -> Result<PolicySummary, PolicyError> {
        let loaded = load::load(&self.dir, self.resources.as_deref(), &self.weights)?;
        let summary = loaded.summary.clone();
        self.loaded.store(Arc::new(loaded));
        Ok(summary)
    }

    /// Reloads when a file in the directory (or the resources file)
    /// changes — modification times and sizes polled every `every` — or on
    /// SIGHUP, logging one line per reload (its summary or the error);
    /// runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        watch::watch(self, every, shutdown).await;
    }

    /// What is in force.
    pub fn summary(&self) -> PolicySummary {
        self.loaded.load().summary.clone()
    }

    /// Decides `req` against the set in force.
    pub fn decide(&self, req: &AccessRequest) -> Decision {
        decide::decide(&self.loaded.load(), &self.weights, req)
    }

    /// The blast radius of `req` (the figure [`PolicyEngine::decide`]
    /// gives policy and reports).
    pub fn blast_radius(&self, req: &AccessRequest) -> i64 {
        blast::Blast::of(req, &self.weights, &self.loaded.load().resources).radius
    }
}

/// Loads `dir` (and the resources file) as [`PolicyEngine::load`] does,
/// with the default weights, and says what is in it: `broker policy check`.
pub fn check_dir(dir: &Path, resources: Option<&Path>) -> Result<PolicySummary, PolicyError> {
    Ok(load::load(dir, resources, &BlastWeights::default())?.summary)
}

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

#[cfg(test)]
mod tests;
