//! The server's two APIs as gRPC glue: `node/` (agents, over mutual TLS:
//! attestation, signing, the Sync stream, event ingestion) and `admin/`
//! (operators, over the admin Unix socket, authorized by peer uid). Each
//! authenticates the caller, calls the domain (the store, the CA, the
//! policy, the event log) and maps the domain's refusals to a status.
//!
//! Depends on every domain room; nothing but `server.rs` depends on it.

pub mod admin;
pub mod node;
