//! The SPIFFE Workload API on the agent's Unix socket: the listener that
//! attests every connection at accept (`peer`, `executable`, `names`,
//! `attestor`, and `shared`: a process's connections share one attestation),
//! the HTTP/2 adapter in front of the server (`authority`, `h2_frames`),
//! the service (`service`, `api`) and its limits; and `client`, the
//! agent CLI's own Workload API client.
//!
//! Dependencies: the service reads `svid/` (cache, JWT-SVIDs) and records
//! to the event spool; nothing here uses `node/`, and nothing outside this
//! folder but `agent.rs`, `cli.rs` and `fetch.rs` uses it.

pub mod api;
pub mod attestor;
pub mod authority;
pub mod client;
#[cfg(test)]
pub(crate) mod exec_on_cue;
pub mod executable;
pub mod h2_frames;
pub mod limits;
pub mod listener;
pub(crate) mod names;
pub mod peer;
pub mod service;
pub(crate) mod shared;
