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

/// Everything the APIs share.
#[derive(Debug)]
pub struct State {
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

impl State {
    /// Runs a blocking store operation off the async workers.
    pub async fn store_op<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(store.as_ref()))
            .await
            .map_err(|e| tonic::Status::internal(format!("store task failed: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "store failure");
                match e {
                    // Where the database is, and why it fails, is for the
                    // server's log (and `healthcheck`), not for callers.
                    StoreError::Database(_) => {
                        tonic::Status::unavailable("the server's datastore is unavailable; retry")
                    }
                    e => tonic::Status::internal(e.to_string()),
                }
            })
    }
}
