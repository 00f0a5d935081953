//! Operators by identity and approval above a blast-radius threshold.
//!
//! - The admin socket's callers are authorized by their peer credentials:
//!   root, the server's own uid, `admin_uids`, and members of `admin_gids`.
//! - An entry the approval policy matches (or created with
//!   `--require-approval`) is stored as a proposal in its own tree, which
//!   nothing that signs or pushes reads, until an operator with another uid
//!   approves it.

use std::collections::BTreeSet;

use prost::Message;
use serde::Deserialize;
use tessera_proto::types::{self as pb, Operator};

use tessera_workload_api::{Selector, SelectorScope, SpiffeId};

use crate::entry::Entry;
use crate::policy::caller::AdminPeer;
use crate::refusals::RefusalFolder;
use crate::store::kv::Kv;
use crate::store::StoreError;

/// The config file's `[approval]` table: what needs a second operator.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalPolicy {
    /// Entries whose selectors name only a uid and/or gid (every process of
    /// that user or group gets the identity).
    pub uid_gid_only_selectors: bool,
    /// Entries with a `unix:uid:0` or `unix:gid:0` selector.
    pub root_selectors: bool,
    /// Entries whose X509-SVID TTL is above this many seconds.
    pub max_x509_svid_ttl: Option<u32>,
    /// SPIFFE ID path prefixes (e.g. `/prod/payments`) whose entries need approval.
    pub protected_path_prefixes: Vec<String>,
    /// JWT audiences whose entries need approval (and an entry allowed any
    /// audience, when this list is not empty).
    pub protected_jwt_audiences: Vec<String>,
    /// Seconds a proposal waits before it is dropped; default 7 days.
    pub pending_ttl: Option<u32>,
}

/// Default life of a proposal.
pub const DEFAULT_PENDING_TTL: u32 = 7 * 24 * 3600;

impl ApprovalPolicy {
    /// Why `entry` needs approval; empty when it does not. Selectors are
    /// judged by what they match ([`Selector::scope`]), one rule for every
    /// kind: `unix:user:root` is `unix:uid:0`.
    pub fn reasons(&self, entry: &Entry) -> Vec<String> {
        let mut why = Vec::new();
        if entry.require_approval {
            why.push("created with --require-approval".to_string());
        }
        let scopes: Vec<SelectorScope> = entry.selectors.iter().map(Selector::scope).collect();
        if self.uid_gid_only_selectors && !scopes.contains(&SelectorScope::Program) {
            why.push(
                "selectors name only users or groups (no program): every process of that user or group gets it"
                    .into(),
            );
        }
        if self.root_selectors && scopes.contains(&SelectorScope::Principal { root: true }) {
            why.push("selects uid or gid 0 (root)".into());
        }
        if let Some(max) = self.max_x509_svid_ttl {
            if entry.x509_svid_ttl > max {
                why.push(format!("X509-SVID TTL {}s is above {max}s", entry.x509_svid_ttl));
            }
        }
        why.extend(self.path_reasons(&entry.spiffe_id));
        if !self.protected_jwt_audiences.is_empty() {
            if entry.jwt_audiences.is_empty() {
                why.push("may get JWT-SVIDs for any audience, protected ones included".into());
            }
            for aud in &entry.jwt_audiences {
                if self.protected_jwt_audiences.contains(aud) {
                    why.push(format!("JWT audience {aud} is protected"));
                }
            }
        }
        why
    }

    /// Why an agent SPIFFE ID (of a join token) needs approval: it is under
    /// a protected path.
    pub fn agent_id_reasons(&self, id: &SpiffeId) -> Vec<String> {
        self.path_reasons(id)
    }

    /// Why an update from `old` to `new` needs approval: any change to an
    /// entry the policy matches before or after it (an approved entry
    /// cannot be changed by one operator, nor changed into one that needs
    /// approval). Empty when nothing changes or neither side matches.
    pub fn update_reasons(&self, old: &Entry, new: &Entry) -> Vec<String> {
        if old.same_content(new) {
            return Vec::new();
        }
        let mut why = self.reasons(new);
        for reason in self.reasons(old) {
            let reason = format!("the entry as it stands: {reason}");
            if !why.contains(&reason) {
                why.push(reason);
            }
        }
        why
    }

    fn path_reasons(&self, id: &SpiffeId) -> Vec<String> {
        let path = id.path();
        self.protected_path_prefixes
            .iter()
            .map(|prefix| prefix.trim_end_matches('/'))
            .filter(|prefix| path == *prefix || path.starts_with(&format!("{prefix}/")))
            .map(|prefix| format!("SPIFFE ID under protected path {prefix}"))
            .collect()
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        for prefix in &self.protected_path_prefixes {
            if !prefix.starts_with('/') || prefix.len() < 2 {
                return Err(format!(
                    "protected path prefix {prefix:?} must start with / and name a path"
                ));
            }
        }
        if self.pending_ttl == Some(0) {
            return Err("pending_ttl must be at least 1 second".into());
        }
        Ok(())
    }
}

/// Who may use the admin socket.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    /// Extra operator uids (root and the server's own uid always are).
    pub uids: BTreeSet<u32>,
    /// Groups whose members are operators (primary or supplementary).
    pub gids: BTreeSet<u32>,
}

impl Operators {
    /// `Ok` when the caller may use the admin API; else why not. Decided
    /// on what the kernel pinned to the connection at accept
    /// ([`AdminPeer`]), never on a PID looked up now.
    pub fn authorize(&self, caller: &AdminPeer) -> Result<(), String> {
        let me = rustix::process::geteuid().as_raw();
        let Operator { uid, gid, .. } = caller.operator;
        if uid == 0 || uid == me || self.uids.contains(&uid) {
            return Ok(());
        }
        if self.gids.contains(&gid) || caller.groups.iter().any(|g| self.gids.contains(g)) {
            return Ok(());
        }
        Err(format!(
            "uid {uid} is not an operator of this server (root, uid {me}, admin_uids or admin_gids)"
        ))
    }
}

/// Operators, the approval policy, and the proposals waiting for approval.
#[derive(Debug)]
pub struct Governance {
    /// Who may use the admin socket.
    pub operators: Operators,
    /// What needs a second operator.
    pub policy: ApprovalPolicy,
    /// Proposals waiting for approval.
    pub pending: Pending,
    /// Refused admin callers by uid, folded per interval (one local uid
    /// cannot flood the event stream through the admin socket).
    pub refused: RefusalFolder<u32>,
}

/// uids whose admin refusals get an event of their own per interval; the
/// rest are folded under uid `u32::MAX`.
pub const MAX_FOLDED_UIDS: usize = 1_024;

impl Governance {
    /// Proposals waiting.
    pub fn pending_count(&self) -> usize {
        self.pending.count()
    }
}

/// The proposals waiting for approval, in the store's database (shared by
/// every server on PostgreSQL, so any server can approve).
pub struct Pending {
    kv: std::sync::Arc<dyn Kv>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("proposals", &self.count()).finish()
    }
}

use crate::store::PENDING;

fn decode_proposal(key: &[u8], value: &[u8]) -> Result<pb::Entry, StoreError> {
    pb::Entry::decode(value).map_err(|e| StoreError::Corrupt {
        key: format!("pending/{}", String::from_utf8_lossy(key)),
        reason: e.to_string(),
    })
}

impl Pending {
    /// The proposals in `kv`.
    pub fn open(kv: std::sync::Arc<dyn Kv>) -> Result<Self, StoreError> {
        Ok(Self { kv })
    }

    /// A proposal by entry ID.
    pub fn get(&self, id: &str) -> Result<Option<pb::Entry>, StoreError> {
        self.kv.get(PENDING, id.as_bytes())?.map(|v| decode_proposal(id.as_bytes(), &v)).transpose()
    }

    /// A proposal by entry ID or by its own proposal ID.
    pub fn find(&self, id: &str) -> Result<Option<pb::Entry>, StoreError> {
        if let Some(p) = self.get(id)? {
            return Ok(Some(p));
        }
        Ok(self
            .list()?
            .into_iter()
            .find(|p| p.pending.as_ref().is_some_and(|a| a.proposal_id == id)))
    }

    /// Every proposal.
    pub fn list(&self) -> Result<Vec<pb::Entry>, StoreError> {
        crate::store::kv::scan_prefix(&*self.kv, PENDING, b"")?
            .into_iter()
            .map(|(key, value)| decode_proposal(&key, &value))
            .collect()
    }

    /// Number of proposals.
    pub fn count(&self) -> usize {
        self.kv.len(PENDING).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::kv::Op;

    /// Proposals live in the shared datastore: one made through one server
    /// is seen by another, and only one server can take it (approve,
    /// reject or expire it).
    #[test]
    fn a_proposal_is_shared_and_taken_once_across_servers() {
        let url = crate::pg_cluster::PgCluster::shared().database();
        let kv = |_: &str| -> std::sync::Arc<dyn Kv> {
            std::sync::Arc::new(crate::store::postgres::PgKv::connect(&url).unwrap())
        };
        let b = Pending::open(kv("b")).unwrap();
        let proposal = pb::Entry { id: "e1".into(), ..Default::default() };
        kv("a").apply(vec![Op::Put(PENDING, b"e1".to_vec(), proposal.encode_to_vec())]).unwrap();
        assert_eq!(b.get("e1").unwrap(), Some(proposal));
        assert_eq!(b.count(), 1);
        let store =
            |id: &str| std::sync::Arc::new(crate::store::KvStore::open_postgres(&url, id).unwrap());
        let takers: Vec<_> = [store("a"), store("b"), store("a"), store("b")]
            .into_iter()
            .map(|s| {
                std::thread::spawn(move || {
                    use crate::store::{Audit, Store};
                    s.remove_proposal("e1", None, &Audit::quiet()).unwrap()
                })
            })
            .collect();
        let taken = takers.into_iter().map(|t| t.join().unwrap()).filter(|t| *t).count();
        assert_eq!(taken, 1, "exactly one server takes the proposal");
    }
}
