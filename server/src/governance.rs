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
use tessera_proto::types::{self as pb, Operator, PendingApproval};

use crate::entry::Entry;
use crate::kv::{Kv, Lock, Op};
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
    /// Why `entry` needs approval; empty when it does not.
    pub fn reasons(&self, entry: &Entry) -> Vec<String> {
        let mut why = Vec::new();
        if entry.require_approval {
            why.push("created with --require-approval".to_string());
        }
        let unix: Vec<(&str, &str)> = entry
            .selectors
            .iter()
            .filter(|s| s.kind() == "unix")
            .filter_map(|s| s.value().split_once(':'))
            .collect();
        if self.uid_gid_only_selectors
            && entry.selectors.iter().all(|s| {
                s.kind() == "unix"
                    && s.value().split_once(':').is_some_and(|(k, _)| k == "uid" || k == "gid")
            })
        {
            why.push(
                "selectors name only a uid/gid: every process of that user or group gets it".into(),
            );
        }
        if self.root_selectors
            && unix.iter().any(|(k, v)| (*k == "uid" || *k == "gid") && *v == "0")
        {
            why.push("selects uid or gid 0".into());
        }
        if let Some(max) = self.max_x509_svid_ttl {
            if entry.x509_svid_ttl > max {
                why.push(format!("X509-SVID TTL {}s is above {max}s", entry.x509_svid_ttl));
            }
        }
        let path = entry.spiffe_id.path();
        for prefix in &self.protected_path_prefixes {
            let prefix = prefix.trim_end_matches('/');
            if path == prefix || path.starts_with(&format!("{prefix}/")) {
                why.push(format!("SPIFFE ID under protected path {prefix}"));
            }
        }
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
    /// `Ok` when the caller may use the admin API; else why not.
    pub fn authorize(&self, caller: &Operator) -> Result<(), String> {
        let me = rustix::process::geteuid().as_raw();
        if caller.uid == 0 || caller.uid == me || self.uids.contains(&caller.uid) {
            return Ok(());
        }
        if self.gids.contains(&caller.gid) {
            return Ok(());
        }
        if !self.gids.is_empty() && caller.pid > 0 {
            if let Some(groups) = supplementary_groups(caller.pid) {
                if groups.iter().any(|g| self.gids.contains(g)) {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "uid {} is not an operator of this server (root, uid {me}, admin_uids or admin_gids)",
            caller.uid
        ))
    }
}

/// The caller's supplementary groups, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(line["Groups:".len()..].split_whitespace().filter_map(|g| g.parse().ok()).collect())
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
}

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

const PENDING: &str = "pending_entries";

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

    /// Stores (or replaces) a proposal, durably.
    pub fn put(&self, proposal: &pb::Entry) -> Result<(), StoreError> {
        self.kv.apply(vec![Op::Put(
            PENDING,
            proposal.id.as_bytes().to_vec(),
            proposal.encode_to_vec(),
        )])?;
        self.kv.flush()
    }

    /// A proposal by entry ID.
    pub fn get(&self, id: &str) -> Result<Option<pb::Entry>, StoreError> {
        self.kv.get(PENDING, id.as_bytes())?.map(|v| decode_proposal(id.as_bytes(), &v)).transpose()
    }

    /// Removes a proposal, durably; true for the one caller (of every
    /// server) that removed it.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut removed = false;
        self.kv.transaction(Lock::Store, &mut |tx| {
            removed = tx.delete(PENDING, id.as_bytes())?.is_some();
            Ok(())
        })?;
        self.kv.flush()?;
        Ok(removed)
    }

    /// Every proposal.
    pub fn list(&self) -> Result<Vec<pb::Entry>, StoreError> {
        crate::kv::scan_prefix(&*self.kv, PENDING, b"")?
            .into_iter()
            .map(|(key, value)| decode_proposal(&key, &value))
            .collect()
    }

    /// Number of proposals.
    pub fn count(&self) -> usize {
        self.kv.len(PENDING).unwrap_or(0)
    }
}

/// A proposal of `entry` (op `create` or `update`) by `caller`, for `reasons`.
pub fn proposal(
    entry: &Entry,
    op: &str,
    caller: &Operator,
    reasons: Vec<String>,
    now: i64,
    ttl: u32,
    base_revision: u64,
) -> pb::Entry {
    let mut p = entry.to_proto();
    p.pending = Some(PendingApproval {
        op: op.to_string(),
        requested_by_uid: caller.uid,
        reasons,
        requested_at: now,
        expires_at: now + i64::from(ttl),
        base_revision,
    });
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Proposals live in the shared datastore: one made through one server
    /// is seen by another, and only one server can take it (approve,
    /// reject or expire it).
    #[test]
    fn a_proposal_is_shared_and_taken_once_across_servers() {
        let url = crate::pg_cluster::PgCluster::shared().database();
        let kv = |_: &str| -> std::sync::Arc<dyn Kv> {
            std::sync::Arc::new(crate::pg::PgKv::connect(&url).unwrap())
        };
        let (a, b) = (Pending::open(kv("a")).unwrap(), Pending::open(kv("b")).unwrap());
        let proposal = pb::Entry { id: "e1".into(), ..Default::default() };
        a.put(&proposal).unwrap();
        assert_eq!(b.get("e1").unwrap(), Some(proposal));
        assert_eq!(b.count(), 1);
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let takers: Vec<_> = [a.clone(), b.clone(), a, b]
            .into_iter()
            .map(|p| std::thread::spawn(move || p.remove("e1").unwrap()))
            .collect();
        let taken = takers.into_iter().map(|t| t.join().unwrap()).filter(|t| *t).count();
        assert_eq!(taken, 1, "exactly one server takes the proposal");
    }
}
