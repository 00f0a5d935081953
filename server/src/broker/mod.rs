//! The token broker: an OAuth 2.0 authorization server inside Tessera that
//! turns a proven SPIFFE identity into a short-lived, task-scoped access
//! token for one tool, decided per request by Cedar policy and held for
//! an operator's approval above a blast-radius threshold. Enabled by the
//! config's `[broker]` section; the README's "Token broker" section is
//! the user's guide.
//!
//! One file per concept, glue apart from the domain:
//!
//! - `config.rs`: the `[broker]` section.
//! - `records.rs`: tasks, issued access tokens, held requests (the store
//!   keeps them: `store/broker*.rs`).
//! - `error.rs`: [`BrokerError`], and the one place it becomes an OAuth
//!   error response.
//! - `policy/`: the Cedar engine, the blast-radius score, the resources file.
//! - `form.rs`: reading a request form and what it asks for.
//! - `authn.rs`: the caller's SPIFFE credentials.
//! - `keys.rs`: the broker's signing keys and JWKS.
//! - `anomaly.rs`: per-workload anomaly signals, and the polls of held
//!   requests (`slow_down`).
//! - `exchange.rs`: token exchange (RFC 8693): decide, hold, issue.
//! - `batch.rs`: the group commit of issued tokens.
//! - `introspect.rs`: introspection (RFC 7662).
//! - `tasks.rs`: sub-tasks a workload starts for itself (`POST /task`).
//! - `http.rs`: the HTTPS listener and routes (axum on tokio-rustls),
//!   metadata (RFC 8414) and discovery documents.
//! - `upkeep.rs`: expiring tasks and held requests, rotating and
//!   publishing keys.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_workload_api::jwt::{JwtBundle, JwtKey};

pub mod anomaly;
pub mod authn;
pub mod batch;
pub mod config;
pub mod error;
pub mod exchange;
pub mod form;
pub mod http;
pub mod introspect;
pub mod keys;
pub mod policy;
pub mod records;
pub mod tasks;
pub mod upkeep;

pub use error::BrokerError;

use crate::state::State;
use config::BrokerConfig;
use keys::BrokerKeys;
use policy::PolicyEngine;

/// The broker: its settings, policy, keys and the server's state.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    state: Arc<State>,
    policy: Arc<PolicyEngine>,
    keys: BrokerKeys,
    anomalies: anomaly::Tracker,
    /// The trust domain's JWT authorities, by bundle sequence.
    bundle: ArcSwap<(u64, JwtBundle)>,
    /// JWT-SVIDs already checked.
    svids: authn::SvidCache,
    /// Polls of held requests.
    polls: anomaly::Polls,
    /// The group commit of issued tokens.
    writer: batch::TokenWriter,
}

impl Broker {
    /// Loads the policy (refusing to start on a bad one) and the keys.
    pub fn new(config: BrokerConfig, state: Arc<State>) -> Result<Self, BrokerError> {
        let policy = PolicyEngine::load(
            &config.policy_dir,
            config.resources.as_deref(),
            config.weights.clone(),
        )
        .map_err(|e| BrokerError::Internal(format!("broker policy: {e}")))?;
        let now = state.clock().now();
        let keys =
            BrokerKeys::open(&state.config().data_dir, config.key_rotation, config.token_ttl, now)?;
        let writer = batch::TokenWriter::new(state.store().clone());
        let bundle = ArcSwap::from_pointee((
            u64::MAX,
            JwtBundle::new(state.config().trust_domain.clone(), Vec::new()),
        ));
        Ok(Self {
            config,
            state,
            policy: Arc::new(policy),
            keys,
            anomalies: anomaly::Tracker::default(),
            bundle,
            svids: Default::default(),
            polls: Default::default(),
            writer,
        })
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The policy engine (for reloads).
    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// Unix seconds, from the server's clock.
    fn now(&self) -> i64 {
        self.state.clock().now()
    }

    /// A verifier of callers' credentials against `bundle`, now.
    fn verifier<'a>(
        &'a self,
        bundle: &'a (u64, JwtBundle),
        store: &'a dyn crate::store::Store,
        now: i64,
    ) -> authn::Verifier<'a> {
        authn::Verifier {
            issuer: &self.config.issuer,
            bundle: &bundle.1,
            store,
            now,
            cache: Some((&self.svids, bundle.0)),
        }
    }

    /// The trust domain's JWT authorities, rebuilt when the bundle changes.
    pub fn jwt_bundle(&self) -> Arc<(u64, JwtBundle)> {
        let seq = self.state.ca().bundle_sequence();
        let current = self.bundle.load_full();
        if current.0 == seq {
            return current;
        }
        let keys = self
            .state
            .ca()
            .jwt_authorities()
            .into_iter()
            .filter_map(|k| JwtKey::from_spki_der(&k.kid, &k.public_key).ok())
            .collect();
        let fresh = Arc::new((seq, JwtBundle::new(self.state.config().trust_domain.clone(), keys)));
        self.bundle.store(fresh.clone());
        fresh
    }
}
