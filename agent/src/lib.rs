//! Tessera's node agent: attests to the server with a join token, follows
//! its entries over the server's `Sync` push stream, keeps an X509-SVID for
//! each (keys generated here, renewed at half-life), attests local processes
//! from the Unix socket peer and serves them the standard SPIFFE Workload API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_agent::{Agent, AgentConfig};
//!
//! let mut config = AgentConfig::new("/var/lib/tessera/agent".into(), "127.0.0.1:8081".into());
//! config.join_token = Some("<token>".into());
//! config.trust_bundle = Some("/etc/tessera/bundle.pem".into());
//! let agent = Agent::start(config).await?;
//! agent.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod agent;
#[path = "workload/attestor.rs"]
mod attestor;
#[path = "workload/authority.rs"]
mod authority;
#[path = "svid/cache.rs"]
mod cache;
pub mod cli;
#[path = "../../common/cli_support.rs"]
pub mod cli_support;
#[path = "../../common/events.rs"]
pub mod event_schema;
#[path = "event_spool.rs"]
mod events;
mod fetch;
mod health;
mod identity;
#[path = "svid/jwt.rs"]
mod jwt;
#[path = "node/sync.rs"]
mod manager;
mod metrics;
#[path = "node/attestation.rs"]
mod node_attestation;
#[path = "node/client.rs"]
mod node_client;
#[path = "node/recovery.rs"]
mod recovery;
#[path = "node/renewal.rs"]
mod renewal;
#[path = "node/standing.rs"]
mod standing;
#[path = "../../common/telemetry.rs"]
mod telemetry;
#[path = "workload/service.rs"]
mod workload;
pub use workload::WorkloadLimits;
#[path = "workload/client.rs"]
mod workload_client;

pub use agent::{Agent, AgentConfig, AgentError, DEFAULT_DATA_DIR, DEFAULT_SOCKET_PATH};
pub use attestor::{
    AttestError, Attestation, Executable, HashLimits, PeerProcess, PendingHash, PinnedBy,
    UnixAttestor, WorkloadAttestor,
};
pub use authority::{AuthorityError, AuthorityRewriter, RewriteAuthority};
pub use health::{decide as decide_health, Facts as HealthFacts, Health};
pub use node_client::{
    alert_refusal, connect_node, connect_node_watched, node_tls_config, AlertSlot, ClientIdentity,
    NodeClientError, Servers, MAX_MESSAGE_BYTES,
};
pub use workload_client::{
    connect_workload_api, fetch_x509, with_header as cli_request, FetchedSvid,
};
