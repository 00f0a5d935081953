//! The workload SVIDs the agent holds: the cache of entries, X509-SVIDs and
//! bundles that the Workload API serves from, the X.509 signer that keeps
//! an SVID for every entry (rotated at half-life), and the JWT-SVID cache.
//!
//! Dependencies: `cache` depends on nothing in the crate; the signers reach
//! the server only through `node::link`. Nothing here uses `workload/`.

pub mod cache;
pub mod jwt;
pub mod x509;

/// Most items sent in one `SignX509` or `SignJWT` call.
pub const SIGN_BATCH: usize = 500;
