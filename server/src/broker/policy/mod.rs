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

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

mod blast;
mod decide;
mod error;
mod load;
mod request;
mod resources;
mod slices;
mod types;
mod watch;

pub use blast::BlastWeights;
pub use error::{Location, PolicyError};
pub use types::{
    AccessRequest, Decision, Outcome, PolicySummary, Principal, RequestContext, TaskContext,
};

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

#[cfg(test)]
mod tests;
