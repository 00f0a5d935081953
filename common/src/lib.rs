//! What Tessera's server and agent share, decided once: the injected
//! [`clock`], the event schema ([`event_schema`]: kinds, codes, the chain
//! hash), [`telemetry`] (metrics and the `/metrics` listener), CLI support
//! ([`cli_support`]: one-line errors, `outln!`, logging, signals), the one
//! token bucket ([`rate`]) and the request rules both sides apply
//! ([`rules`]: audience limits, entry expiry), and the allocator every
//! binary uses with what it reports ([`heap`]).
//!
//! Depends only on `tessera-proto` and maintained libraries; the server
//! and the agent depend on it, never the other way round.
#![forbid(unsafe_code)]

pub mod cli_support;
pub mod clock;
pub mod event_schema;
pub mod heap;
#[cfg(feature = "pg-cluster")]
pub mod pg_cluster;
pub mod rate;
pub mod rules;
pub mod telemetry;
