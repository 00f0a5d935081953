//! Tessera's node agent. So far: the client for the server's node API. The
//! agent itself (attestation, sync, SVID cache, Workload API) is issue 3.
#![forbid(unsafe_code)]

mod node_client;

pub use node_client::{
    connect_node, node_tls_config, ClientIdentity, NodeClientError, MAX_MESSAGE_BYTES,
};
