//! Proposals and their approval: what a proposal binds, and the checks an
//! approval must pass. Pure rules over the proposal record; the store runs
//! them inside the commit that writes what was approved (so nothing can
//! change between the check and the write), the admin API maps
//! [`ApprovalRefusal`] to a status.
//!
//! A proposal is a `types.Entry` with `pending` set, stored under its key
//! (the entry ID; for a join token, the proposal ID). Its `content_hash` is
//! SHA-256 over the whole record with the hash left empty: the entry as
//! proposed (its labels included), the operation, the proposer, the times, the revision an update
//! was proposed against and the proposal's own ID. An approver names that
//! hash, so they approve exactly what they were shown, never a proposal
//! that replaced it.
//!
//! May depend on: `entry`, the proto types. Nothing else.

use prost::Message;
use tessera_proto::types::{self as pb, Operator, PendingApproval};

use crate::entry::{Entry, EntryError};

/// Operation of a proposal that creates an entry.
pub const OP_CREATE: &str = "create";
/// Operation of a proposal that changes an entry.
pub const OP_UPDATE: &str = "update";
/// Operation of a proposal that makes a join token usable.
pub const OP_JOIN_TOKEN: &str = "join_token";

/// Why a proposal or an approval was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalRefusal {
    /// Nothing with that entry or proposal ID waits for approval.
    #[error("no proposal {0} is waiting for approval")]
    NotFound(String),
    /// The approval did not name the proposal's content hash.
    #[error("an approval must name the proposal's content hash (--hash, as `entry show --pending` shows it)")]
    HashRequired,
    /// The proposal waiting is not the one the approver named.
    #[error("proposal {proposal} has content hash {actual}, not {given}: it is not what you reviewed; look again with `entry show --pending`")]
    HashMismatch {
        /// The proposal's ID.
        proposal: String,
        /// The hash the approver gave.
        given: String,
        /// The proposal's hash.
        actual: String,
    },
    /// The approver proposed it.
    #[error("uid {uid} proposed {proposal}; another operator must approve it")]
    SameOperator {
        /// The approver's (and proposer's) uid.
        uid: u32,
        /// The proposal's ID.
        proposal: String,
    },
    /// The proposal's time ran out.
    #[error("proposal {0} has expired; propose it again")]
    Expired(String),
    /// The entry changed after the update was proposed.
    #[error(
        "entry {0} changed (or was deleted) after this update was proposed; the proposal was dropped: propose it again"
    )]
    Changed(String),
    /// A second proposal for an entry that has one waiting.
    #[error("entry {entry} already has proposal {proposal} waiting; approve or reject it first")]
    AlreadyPending {
        /// The entry.
        entry: String,
        /// The proposal waiting.
        proposal: String,
    },
    /// What was approved cannot be written (e.g. a duplicate entry by now).
    #[error("{0}")]
    Entry(EntryError),
    /// The join token's agent ID is now an agent's or an entry's.
    #[error("{0}")]
    Agent(String),
}

/// A proposal of `entry` (`op` create or update) by `caller`, for
/// `reasons`, with its own ID and content hash.
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
    p.pending = Some(pending(op, caller, reasons, now, ttl, base_revision));
    seal(&mut p);
    p
}

/// A proposal that the join token hashed `token_hash` (for agent ID
/// `agent_id`, usable `token_ttl` seconds from its approval) may be used.
pub fn join_token_proposal(
    agent_id: &str,
    token_hash: String,
    token_ttl: u32,
    caller: &Operator,
    reasons: Vec<String>,
    now: i64,
    ttl: u32,
) -> pb::Entry {
    let mut pending = pending(OP_JOIN_TOKEN, caller, reasons, now, ttl, 0);
    pending.join_token_hash = token_hash;
    pending.join_token_ttl = token_ttl;
    let mut p = pb::Entry {
        id: pending.proposal_id.clone(),
        spiffe_id: agent_id.to_string(),
        pending: Some(pending),
        ..Default::default()
    };
    seal(&mut p);
    p
}

fn pending(
    op: &str,
    caller: &Operator,
    reasons: Vec<String>,
    now: i64,
    ttl: u32,
    base_revision: u64,
) -> PendingApproval {
    PendingApproval {
        op: op.to_string(),
        requested_by_uid: caller.uid,
        reasons,
        requested_at: now,
        expires_at: now + i64::from(ttl),
        base_revision,
        proposal_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    }
}

/// Sets the proposal's content hash.
fn seal(p: &mut pb::Entry) {
    let hash = content_hash(p);
    if let Some(pending) = &mut p.pending {
        pending.content_hash = hash;
    }
}

/// SHA-256 (hex) of the proposal with its hash field empty. Its one map
/// field, the entry's labels, is a sorted map (proto/build.rs), so its
/// encoding is deterministic and the hash covers the labels too.
pub fn content_hash(p: &pb::Entry) -> String {
    let mut unsealed = p.clone();
    if let Some(pending) = &mut unsealed.pending {
        pending.content_hash.clear();
    }
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &unsealed.encode_to_vec()))
}

/// The checks an approval of `proposal` by `approver_uid`, naming
/// `given_hash`, must pass at `now` (the store runs them in the approving
/// commit). The proposal's stored hash is recomputed, so a record changed
/// in the datastore is refused too.
pub fn check(
    proposal: &pb::Entry,
    given_hash: &str,
    approver_uid: u32,
    now: i64,
) -> Result<PendingApproval, ApprovalRefusal> {
    let pending = proposal.pending.clone().unwrap_or_default();
    let id = if pending.proposal_id.is_empty() { &proposal.id } else { &pending.proposal_id };
    if given_hash.is_empty() {
        return Err(ApprovalRefusal::HashRequired);
    }
    let actual = content_hash(proposal);
    if !given_hash.eq_ignore_ascii_case(&actual) || pending.content_hash != actual {
        return Err(ApprovalRefusal::HashMismatch {
            proposal: id.clone(),
            given: given_hash.to_string(),
            actual,
        });
    }
    if pending.requested_by_uid == approver_uid {
        return Err(ApprovalRefusal::SameOperator { uid: approver_uid, proposal: id.clone() });
    }
    if pending.expires_at <= now {
        return Err(ApprovalRefusal::Expired(id.clone()));
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token_proposal() -> pb::Entry {
        let op = Operator { uid: 1, gid: 1, pid: 1 };
        join_token_proposal("spiffe://td/node", "ab".into(), 600, &op, vec![], 100, 60)
    }

    #[test]
    fn an_approval_names_exactly_the_proposal_it_approves() {
        let p = token_proposal();
        let hash = p.pending.as_ref().unwrap().content_hash.clone();
        assert_eq!(hash.len(), 64);
        assert!(check(&p, &hash, 2, 101).is_ok());
        assert_eq!(check(&p, "", 2, 101), Err(ApprovalRefusal::HashRequired));
        assert!(matches!(
            check(&p, &"0".repeat(64), 2, 101),
            Err(ApprovalRefusal::HashMismatch { .. })
        ));
        assert!(matches!(check(&p, &hash, 1, 101), Err(ApprovalRefusal::SameOperator { .. })));
        assert!(matches!(check(&p, &hash, 2, 160), Err(ApprovalRefusal::Expired(_))));
        // A record changed after it was sealed no longer matches its hash.
        let mut changed = p.clone();
        changed.spiffe_id = "spiffe://td/other".into();
        assert!(matches!(
            check(&changed, &hash, 2, 101),
            Err(ApprovalRefusal::HashMismatch { .. })
        ));
        // Two proposals of the same content differ (own ID, own hash).
        assert_ne!(token_proposal().pending.unwrap().content_hash, hash);
    }

    #[test]
    fn an_approval_binds_the_proposed_labels() {
        use tessera_workload_api::TrustDomain;
        let rules = crate::entry::EntryRules {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            default_ttl: 60,
            max_ttl: 600,
            default_jwt_ttl: 60,
            max_jwt_ttl: 600,
        };
        let mut input = pb::Entry {
            spiffe_id: "spiffe://example.org/bot".into(),
            parent_id: "spiffe://example.org/node".into(),
            selectors: vec![pb::Selector { r#type: "unix".into(), value: "uid:7".into() }],
            ..Default::default()
        };
        input.labels.insert("team".into(), "sales".into());
        input.labels.insert("env".into(), "prod".into());
        let entry = rules.validate(&input, 1).unwrap();
        let op = Operator { uid: 1, gid: 1, pid: 1 };
        let p = proposal(&entry, OP_CREATE, &op, vec![], 1, 60, 0);
        let hash = p.pending.as_ref().unwrap().content_hash.clone();
        assert_eq!(content_hash(&p), hash, "the same record hashes the same every time");
        assert!(check(&p, &hash, 2, 2).is_ok());
        let mut swapped = p.clone();
        swapped.labels.insert("team".into(), "finance".into());
        assert!(matches!(check(&swapped, &hash, 2, 2), Err(ApprovalRefusal::HashMismatch { .. })));
        let mut dropped = p;
        dropped.labels.clear();
        assert!(matches!(check(&dropped, &hash, 2, 2), Err(ApprovalRefusal::HashMismatch { .. })));
    }
}
