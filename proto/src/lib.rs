//! Generated protocol code for Tessera.
//!
//! - [`workload`]: the SPIFFE Workload API (`SpiffeWorkloadAPI`), wire-compatible
//!   with every standard SPIFFE client.
//! - [`node`]: agent ↔ server (attestation, SVID signing, the `Sync` push stream).
//! - [`admin`]: operator ↔ server (entries, join tokens, agents, bundle).
//! - [`types`]: records shared by both Tessera APIs.
//! - [`health`]: the standard gRPC health service.
//! - [`Refusal`]: the typed refusals of the node API, for both sides.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The SPIFFE Workload API (the `.proto` has no package).
pub mod workload {
    tonic::include_proto!("_");
}

/// The standard gRPC health checking protocol (`grpc.health.v1.Health`),
/// which the agent serves on its Workload API socket.
pub mod health {
    pub mod v1 {
        tonic::include_proto!("grpc.health.v1");
    }
}

/// Tessera's own packages, nested as their proto packages are (generated
/// code refers across them by relative path).
pub mod tessera {
    pub mod types {
        pub mod v1 {
            tonic::include_proto!("tessera.types.v1");
        }
    }
    pub mod node {
        pub mod v1 {
            tonic::include_proto!("tessera.node.v1");
        }
    }
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("tessera.admin.v1");
        }
    }
}

/// Operator ↔ server.
pub use tessera::admin::v1 as admin;
/// Agent ↔ server.
pub use tessera::node::v1 as node;
/// Records shared by the node and admin APIs.
pub use tessera::types::v1 as types;

mod refusal;
pub use refusal::{Refusal, UnknownRefusal, REFUSAL_METADATA};

/// The words of a signing item's refusal when the agent's own SVID was
/// renewed while the server signed (the batch is refused whole); the item
/// carries [`Refusal::AgentSvidChanged`], which the agent acts on.
pub const AGENT_SVID_CHANGED: &str = "the agent's SVID changed while signing";
