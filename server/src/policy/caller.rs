//! The admin caller as the kernel pinned it when its connection was
//! accepted: what every operator decision is bound to.

use std::sync::Arc;

use tessera_proto::types::Operator;

/// The admin caller as pinned at accept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminPeer {
    /// uid, primary gid and pid from `SO_PEERCRED`.
    pub operator: Operator,
    /// Supplementary groups of the connecting process, read while the
    /// kernel's pidfd proved it was still that process; empty otherwise.
    pub groups: Arc<[u32]>,
}
