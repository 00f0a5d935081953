//! The agent's side of the server: its own identity there (node
//! attestation, renewal of the agent SVID, recovery when the server ends
//! it, its standing) and the clients of the node API that share one link
//! to the server (the `Sync` stream, the event pusher).
//!
//! Every node client gets its connection from `link`, which only hands out
//! connections made with the agent's current SVID, and follows the one
//! rule there for a failed call (`NodeLink::after_failure`: the SVID was
//! replaced, or is being replaced, so call again at once with the new one;
//! else back off, or stop when the identity is dead).
//!
//! Dependencies: `client` (TLS, the server ring) and `standing` are the
//! bottom of this folder; `link` builds on them; the loops build on the
//! link. `sync` is the only file here that uses `svid/` (it fills the cache
//! and the JWT revocations); nothing here uses `workload/`.

pub mod attestation;
pub mod client;
pub mod event_push;
pub mod link;
pub mod recovery;
pub mod renewal;
pub mod standing;
pub mod sync;
