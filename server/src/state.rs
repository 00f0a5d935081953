//! State shared by the server's APIs. What agents must hear travels through
//! the store's change log, not through this state.

use std::sync::Arc;

use tessera_workload_api::TrustAnchors;
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::config::Config;
use crate::entry::EntryRules;
use crate::store::{Store, StoreError};
use tessera_common::clock::Clock;

/// What a [`State`] is made of (only `server.rs` builds one).
#[derive(Debug)]
pub struct StateParts {
    /// Resolved configuration.
    pub config: Config,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// Entry validation rules.
    pub rules: EntryRules,
    /// The bundle as trust anchors for verifying agents.
    pub anchors: TrustAnchors,
    /// The change log's recent changes, decoded once for every Sync stream.
    pub feed: Arc<crate::feed::ChangeFeed>,
    /// Cancelled when the server shuts down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// The event log.
    pub events: Arc<crate::events::EventLog>,
    /// Metrics.
    pub metrics: crate::metrics::Metrics,
    /// Operators, the approval policy and the proposals waiting for it.
    pub governance: crate::policy::governance::Governance,
    /// This server's stable ID (`<data_dir>/server-id`), naming its CAs
    /// and CRLs in a datastore shared with other servers.
    pub server_id: String,
}

/// Everything the APIs share: its parts, private (handlers reach them
/// through the methods below).
#[derive(Debug)]
pub struct State {
    parts: StateParts,
}

impl State {
    /// The state made of `parts`.
    pub fn new(parts: StateParts) -> Self {
        Self { parts }
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.parts.config
    }

    /// The injected clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.parts.clock
    }

    /// The store, for blocking callers (async handlers use `store_op`).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.parts.store
    }

    /// The CA.
    pub fn ca(&self) -> &Arc<Ca> {
        &self.parts.ca
    }

    /// Entry validation rules.
    pub fn rules(&self) -> &EntryRules {
        &self.parts.rules
    }

    /// The bundle and CRLs the node API verifies agents with.
    pub fn anchors(&self) -> &TrustAnchors {
        &self.parts.anchors
    }

    /// The change feed.
    pub fn feed(&self) -> &Arc<crate::feed::ChangeFeed> {
        &self.parts.feed
    }

    /// Cancelled when the server shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.parts.shutdown
    }

    /// The event log.
    pub fn events(&self) -> &Arc<crate::events::EventLog> {
        &self.parts.events
    }

    /// Metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.parts.metrics
    }

    /// Operators, the approval policy and the proposals.
    pub fn governance(&self) -> &crate::policy::governance::Governance {
        &self.parts.governance
    }

    /// This server's stable ID.
    pub fn server_id(&self) -> &str {
        &self.parts.server_id
    }

    /// Runs a blocking store operation off the async workers.
    pub async fn store_op<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let store = self.parts.store.clone();
        tokio::task::spawn_blocking(move || op(store.as_ref()))
            .await
            .map_err(|e| tonic::Status::internal(format!("store task failed: {e}")))?
            .map_err(store_status)
    }
}

/// The status a store failure is answered with (logged here).
pub fn store_status(e: StoreError) -> tonic::Status {
    if matches!(e, StoreError::ChangesTrimmed { .. }) {
        tracing::info!(error = %e, "a reader is behind the trimmed change log");
    } else {
        tracing::error!(error = %e, "store failure");
    }
    match e {
        // Where the database is, and why it fails, is for the server's log
        // (and `healthcheck`), not for callers.
        StoreError::Database(_) => {
            tonic::Status::unavailable("the server's datastore is unavailable; retry")
        }
        // A Sync stream that fell behind the trimmed change log: the agent
        // connects again and gets a snapshot.
        e @ StoreError::ChangesTrimmed { .. } => {
            tonic::Status::aborted(format!("{e}; connect again"))
        }
        e => tonic::Status::internal(e.to_string()),
    }
}
