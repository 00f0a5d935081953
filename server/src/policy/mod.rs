//! Who may change what: the operators (by uid, from the admin socket's
//! peer credentials), the approval policy that holds a change for a second
//! operator (`governance.rs`), and the proposals and the checks an approval
//! must pass (`approval.rs`: content hash, a different operator, expiry).
//!
//! Depends on the entry model and the store's types; the admin API and the
//! store's approval commit use it.

pub mod approval;
pub mod caller;
pub mod governance;
