//! Store writes for operator commands that came with SPIRE's CLI: an SVID
//! minted outside any node, and a purge of long-expired agents. Kept out
//! of the store's other files; it commits through the same `Tx`.

use tessera_proto::types as pb;

use super::audit::Audit;
use super::error::StoreError;
use super::kv_store::KvStore;
use super::layout::{agent_owner, AGENTS};
use super::revocations::revocation_of;
use super::ChangeKind;

impl KvStore {
    /// Records a minted SVID (no entry, no agent) in one commit, durable
    /// before it returns: revocable by serial or `jti` like any other.
    pub(super) fn record_minted_svid(
        &self,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError> {
        self.commit(audit, |tx| {
            tx.record(svid);
            Ok(())
        })
    }

    /// Evicts `agent_id` when, in the commit, it is unbanned and its SVID
    /// expired at or before `expired_before` (a renewal since the listing
    /// keeps it). Returns what the eviction revoked, or `None` if it stays.
    pub(super) fn purge_expired_agent(
        &self,
        agent_id: &str,
        expired_before: i64,
        now: i64,
        audit: &Audit<'_, Option<Vec<pb::Revocation>>>,
    ) -> Result<Option<Vec<pb::Revocation>>, StoreError> {
        self.commit(audit, |tx| {
            let Some(agent) = tx.agent(agent_id)? else {
                return Ok(None);
            };
            if agent.banned || agent.x509_svid_expires_at > expired_before {
                return Ok(None);
            }
            let own = tx.issued_by_owner(&agent_owner(agent_id))?;
            tx.remove(AGENTS, agent_id.as_bytes())?;
            tx.log(ChangeKind::AgentEvicted { agent_id: agent_id.to_string() });
            let revocations: Vec<_> = own
                .iter()
                .map(|s| revocation_of(s, "agent purged: its SVID expired", now))
                .collect();
            Ok(Some(tx.revoke(&revocations)?))
        })
    }
}
