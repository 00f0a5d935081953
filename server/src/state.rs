//! State shared by the server's APIs, and the events they publish.

use std::sync::Arc;

use tessera_workload_api::{SpiffeId, TrustAnchors};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::clock::Clock;
use crate::config::Config;
use crate::entry::{Entry, EntryRules};
use crate::store::{Store, StoreError};

/// A change to an entry, pushed to the Sync streams of the agents concerned.
#[derive(Debug, Clone)]
pub enum EntryEvent {
    /// Created or updated; sent to the entry's parent.
    Upserted(Arc<Entry>),
    /// Deleted, or moved away from `parent_id`.
    Removed {
        /// The entry.
        id: String,
        /// The agent that must drop it.
        parent_id: SpiffeId,
        /// Revision of the change.
        revision: u64,
    },
    /// SVIDs revoked; sent to every agent with the new CRLs.
    Revoked {
        /// Lowercase hex serials.
        serials: Arc<Vec<String>>,
        /// The CRLs now in force (DER, one per CA).
        crls: Arc<Vec<Vec<u8>>>,
    },
    /// An agent was banned: its stream ends after telling it.
    AgentBanned {
        /// The agent.
        agent_id: SpiffeId,
        /// Why, as the operator said.
        reason: String,
    },
    /// An agent was evicted: its stream ends; it must attest again.
    AgentEvicted {
        /// The agent.
        agent_id: SpiffeId,
    },
}

impl EntryEvent {
    /// The agent this event concerns; `None` for every agent.
    pub fn agent_id(&self) -> Option<&SpiffeId> {
        match self {
            Self::Upserted(entry) => Some(&entry.parent_id),
            Self::Removed { parent_id, .. } => Some(parent_id),
            Self::Revoked { .. } => None,
            Self::AgentBanned { agent_id, .. } | Self::AgentEvicted { agent_id } => Some(agent_id),
        }
    }
}

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
    /// Entry changes, fanned out to Sync streams.
    pub entry_events: broadcast::Sender<EntryEvent>,
    /// The bundle as trust anchors for verifying agents.
    pub anchors: TrustAnchors,
    /// Cancelled when the server shuts down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// The CRLs in force (DER, one per CA in the bundle).
    pub crls: watch::Sender<Arc<Vec<Vec<u8>>>>,
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
                tonic::Status::internal(e.to_string())
            })
    }

    /// Publishes entry changes to connected agents (no receivers is fine).
    pub fn publish(&self, event: EntryEvent) {
        let _ = self.entry_events.send(event);
    }
}
