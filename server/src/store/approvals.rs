//! Proposals waiting for a second operator's approval (shared by every
//! server), and the approval that writes what one proposed.

use prost::Message;
use tessera_proto::types as pb;

use super::audit::Audit;
use super::error::StoreError;
use super::kv::scan_prefix;
use super::kv_store::KvStore;
use super::layout::{corrupt, decode, JOIN_TOKENS};
use super::{Approved, EntryWrite};
use crate::entry::Entry;
use crate::policy::approval::{self, ApprovalRefusal};

/// The tree of proposals waiting for approval (shared by every server).
pub const PENDING: &str = "pending_entries";

impl KvStore {
    pub(super) fn propose(
        &self,
        proposal: &pb::Entry,
        audit: &Audit<'_, Result<(), ApprovalRefusal>>,
    ) -> Result<Result<(), ApprovalRefusal>, StoreError> {
        let bytes = proposal.encode_to_vec();
        self.commit(audit, |tx| {
            if let Some(waiting) = tx.txn.get(PENDING, proposal.id.as_bytes())? {
                let waiting: pb::Entry = decode(proposal.id.as_bytes(), &waiting)?;
                let id = waiting.pending.map(|p| p.proposal_id).unwrap_or_default();
                return Ok(Err(ApprovalRefusal::AlreadyPending {
                    entry: proposal.id.clone(),
                    proposal: id,
                }));
            }
            let op = proposal.pending.as_ref().map(|p| p.op.as_str());
            if op == Some(approval::OP_JOIN_TOKEN) {
                if let Err(refusal) = tx.agent_id_free(&proposal.spiffe_id)? {
                    return Ok(Err(ApprovalRefusal::Agent(refusal.to_string())));
                }
            }
            tx.txn.put(PENDING, proposal.id.as_bytes(), bytes.as_slice());
            Ok(Ok(()))
        })
    }

    pub(super) fn remove_proposal(
        &self,
        key: &str,
        proposal_id: Option<&str>,
        audit: &Audit<'_, bool>,
    ) -> Result<bool, StoreError> {
        self.commit(audit, |tx| {
            let Some(bytes) = tx.txn.get(PENDING, key.as_bytes())? else { return Ok(false) };
            if let Some(wanted) = proposal_id {
                let stored: pb::Entry = decode(key.as_bytes(), &bytes)?;
                if stored.pending.is_none_or(|p| p.proposal_id != wanted) {
                    return Ok(false);
                }
            }
            Ok(tx.txn.delete(PENDING, key.as_bytes())?.is_some())
        })
    }

    pub(super) fn approve(
        &self,
        key: &str,
        content_hash: &str,
        approver_uid: u32,
        now: i64,
        audit: &Audit<'_, Result<Approved, ApprovalRefusal>>,
    ) -> Result<Result<Approved, ApprovalRefusal>, StoreError> {
        // A proposal ID names its key (the entry ID) through a scan; the
        // commit then re-reads and checks the record under that key.
        let key = match self.kv.get(PENDING, key.as_bytes())? {
            Some(_) => key.to_string(),
            None => scan_prefix(&*self.kv, PENDING, b"")?
                .into_iter()
                .find_map(|(k, v)| {
                    let p: pb::Entry = decode(&k, &v).ok()?;
                    (p.pending?.proposal_id == key).then(|| String::from_utf8_lossy(&k).into())
                })
                .unwrap_or_else(|| key.to_string()),
        };
        self.commit(audit, |tx| {
            let Some(bytes) = tx.txn.get(PENDING, key.as_bytes())? else {
                return Ok(Err(ApprovalRefusal::NotFound(key.clone())));
            };
            let proposal: pb::Entry = decode(key.as_bytes(), &bytes)?;
            let pending = match approval::check(&proposal, content_hash, approver_uid, now) {
                Ok(pending) => pending,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let mut write = EntryWrite::default();
            match pending.op.as_str() {
                approval::OP_JOIN_TOKEN => {
                    if let Err(refusal) = tx.agent_id_free(&proposal.spiffe_id)? {
                        return Ok(Err(ApprovalRefusal::Agent(refusal.to_string())));
                    }
                    let token = pb::JoinToken {
                        token: String::new(),
                        spiffe_id: proposal.spiffe_id.clone(),
                        expires_at: now + i64::from(pending.join_token_ttl),
                        pending: None,
                        approved: true,
                    };
                    tx.put(JOIN_TOKENS, pending.join_token_hash.as_bytes(), token.encode_to_vec());
                }
                op => {
                    let stored = pb::Entry { pending: None, ..proposal.clone() };
                    let entry = Entry::from_stored(stored).map_err(|e| corrupt("proposal", e))?;
                    let result = if op == approval::OP_UPDATE {
                        match tx.entry(&entry.id)? {
                            Some(current) if current.revision == pending.base_revision => {}
                            // Never approvable again: dropped in this
                            // commit, so that it can be proposed anew.
                            _ => {
                                tx.txn.delete(PENDING, key.as_bytes())?;
                                return Ok(Err(ApprovalRefusal::Changed(entry.id.clone())));
                            }
                        }
                        let mut revoke = Vec::new();
                        let mut written = EntryWrite::default();
                        let result =
                            tx.update_one(&entry, now, "entry updated", &mut written, &mut revoke)?;
                        write.previous = written.previous;
                        write.revoked = tx.revoke(&revoke)?;
                        result
                    } else {
                        tx.create_one(&entry)?
                    };
                    match result {
                        Ok(entry) => write.results.push(Ok(entry)),
                        Err(e) => return Ok(Err(ApprovalRefusal::Entry(e))),
                    }
                }
            }
            tx.txn.delete(PENDING, key.as_bytes())?;
            Ok(Ok(Approved { proposal: proposal.clone(), write }))
        })
    }
}
