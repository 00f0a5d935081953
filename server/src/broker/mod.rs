//! The token broker: an OAuth 2.0 authorization server inside Tessera that
//! turns a proven SPIFFE identity into a short-lived, task-scoped access
//! token for one tool, decided per request by Cedar policy, held for an
//! operator's approval above a blast-radius threshold.
//!
//! - `records.rs`: tasks, issued access tokens and held requests (the store keeps them).
//! - `policy/`: the Cedar policy engine (policy directory, resources file,
//!   blast radius, decisions, reload on change).

pub mod policy;
pub mod records;
