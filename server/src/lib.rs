//! Tessera's server: the trust domain's certificate authority and
//! registration authority. It stores registration entries, attests node
//! agents with join tokens, signs X509-SVIDs from agents' CSRs and pushes
//! entry and bundle changes to agents over their `Sync` streams.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tessera_server::{Config, Server, SystemClock};
//! use tessera_workload_api::TrustDomain;
//!
//! let config = Config::new(TrustDomain::new("example.org")?, "/var/lib/tessera".into());
//! let server = Server::bind(config, Arc::new(SystemClock)).await?;
//! server.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

/// The token broker (public for its config in tests and its policy engine in `tessera-bench`).
pub mod broker;
mod ca;
pub mod cli;
mod policy;
pub use tessera_common::cli_support;
mod client;
mod config;
mod entry;
mod error;
pub use tessera_common::event_schema;
mod api;
mod events;
mod feed;
mod fsutil;
mod health;
mod maintenance;
mod metrics;
mod mint;
#[cfg(test)]
use tessera_common::pg_cluster;
mod queries;
mod refusals;
mod revocation;
mod server;
mod state;
mod store;
pub use store::kv_api as kv;
use tessera_common::telemetry;

pub use api::node::tls::NodePeer;
pub use api::node::REFUSAL_METADATA;
pub use ca::csr::{parse_csr, CsrError};
pub use ca::jwt::JwtKeyType;
pub use ca::{Ca, CaError, CaPolicy, CrlEntry, SignedSvid};
pub use client::connect_admin;
pub use config::{Config, ConfigError, FileConfig};
pub use entry::{Entry, EntryError, EntryRules};
pub use error::ServerError;
pub use events::EventConfig;
pub use policy::governance::ApprovalPolicy;
pub use revocation::normalize_serial;
pub use server::{Server, MAX_MESSAGE_BYTES};
pub use store::{
    AgentRefusal, Change, ChangeKind, EntryFilter, EntryWrite, KvStore, Signed, Store, StoreError,
    StoreReport,
};
pub use tessera_common::clock::{Clock, ManualClock, SystemClock};
pub use tessera_common::{out, outln};
