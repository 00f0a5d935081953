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
pub mod cli;
pub use tessera_common::cli_support;
use tessera_common::clock;
pub use tessera_common::event_schema;
pub use tessera_common::{out, outln};
mod event_spool;
mod fetch;
mod health;
mod identity;
mod metrics;
mod node;
mod schedule;
mod svid;
use tessera_common::telemetry;
mod workload;
pub use workload::limits::WorkloadLimits;

pub use agent::{Agent, AgentConfig, AgentError, DEFAULT_DATA_DIR, DEFAULT_SOCKET_PATH};
pub use health::{decide as decide_health, Facts as HealthFacts, Health};
pub use node::client::{
    alert_refusal, connect_node, connect_node_watched, node_tls_config, AlertSlot, ClientIdentity,
    NodeClientError, Servers, MAX_MESSAGE_BYTES,
};
pub use workload::attestor::{Attestation, UnixAttestor, WorkloadAttestor};
pub use workload::authority::{AuthorityError, AuthorityRewriter, RewriteAuthority};
pub use workload::client::{
    connect_workload_api, fetch_x509, with_header as cli_request, FetchedSvid,
};
pub use workload::executable::{Executable, HashLimits, PendingHash};
pub use workload::peer::{AttestError, PeerProcess, PinnedBy};
