//! Node agents: attested (registered), checked, renewed, banned, evicted,
//! each decision made inside the commit that acts on it.

use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;

use super::audit::Audit;
use super::commit::{Tx, TxResult};
use super::error::StoreError;
use super::kv_store::KvStore;
use super::layout::{
    agent_owner, decode, entry_spiffe_id, parent_key, t, AGENTS, BY_PARENT, ENTRIES, REVOCATIONS,
};
use super::revocations::revocation_of;
use super::{AgentCheck, AgentRefusal, ChangeKind, RenewOutcome};

impl Tx<'_> {
    /// Whether `agent_id` may become an agent's: no agent on record (live
    /// or banned) and no entry has it. Reads every entry, unless the ID is
    /// reserved (default join-token IDs are: no entry can have them), so
    /// only an operator-named agent ID costs the scan (a bogus token never
    /// gets here).
    pub(super) fn agent_id_free(&self, agent_id: &str) -> TxResult<Result<(), AgentRefusal>> {
        if self.agent(agent_id)?.is_some() {
            return Ok(Err(AgentRefusal::Exists(agent_id.to_string())));
        }
        if SpiffeId::parse(agent_id).is_ok_and(|id| crate::entry::is_reserved(&id)) {
            return Ok(Ok(()));
        }
        // Every entry's SPIFFE ID alone (a full decode of each cost ~0.3 s
        // per call at 100,000 entries; an index by SPIFFE ID would make it
        // a lookup).
        for (key, bytes) in self.txn.scan_prefix(t(ENTRIES), b"")? {
            if entry_spiffe_id(&key, &bytes)? == agent_id {
                return Ok(Err(AgentRefusal::EntryIdentity(agent_id.to_string())));
            }
        }
        Ok(Ok(()))
    }

    /// SVIDs issued to or through an agent (its own and its entries').
    pub(super) fn issued_through_agent(&self, agent_id: &str) -> TxResult<Vec<pb::IssuedSvid>> {
        // An entry's SVIDs are revoked when it moves to another parent or is
        // deleted, so these are all SVIDs still valid through this agent.
        let mut owners = vec![agent_owner(agent_id)];
        if let Ok(parent) = SpiffeId::parse(agent_id) {
            let prefix = parent_key(&parent, "");
            for (key, _) in self.txn.scan_prefix(t(BY_PARENT), &prefix)? {
                owners.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
            }
        }
        self.issued_by_owners(&owners)
    }
}

impl KvStore {
    pub(super) fn register_agent(
        &self,
        agent: &pb::Agent,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            if let Err(refusal) = tx.agent_id_free(&agent.spiffe_id)? {
                return Ok(Err(refusal));
            }
            tx.put_agent(agent);
            tx.record(svid);
            Ok(Ok(()))
        })
    }

    pub(super) fn check_agent(
        &self,
        agent_id: &str,
        serial: &str,
    ) -> Result<Result<pb::Agent, AgentRefusal>, StoreError> {
        let checked = self.check_agents(&[(agent_id.to_string(), serial.to_string())])?.pop();
        checked.unwrap_or_else(|| Ok(Err(AgentRefusal::Unknown(agent_id.to_string()))))
    }

    /// [`KvStore::check_agent`] for each `(agent_id, serial)`, in order:
    /// one read of the agents and one of the revocations for all of them.
    /// An agent record that cannot be decoded fails only its own caller.
    pub(super) fn check_agents(
        &self,
        callers: &[(String, String)],
    ) -> Result<Vec<AgentCheck>, StoreError> {
        let ids: Vec<Vec<u8>> = callers.iter().map(|(id, _)| id.as_bytes().to_vec()).collect();
        let serials: Vec<Vec<u8>> = callers.iter().map(|(_, s)| s.as_bytes().to_vec()).collect();
        let agents = self.kv.get_many(t(AGENTS), &ids)?;
        let revoked = self.kv.get_many(t(REVOCATIONS), &serials)?;
        let checked = callers
            .iter()
            .zip(agents.into_iter().zip(revoked))
            .map(|((agent_id, serial), (agent, revoked))| -> AgentCheck {
                let agent = agent.map(|b| decode(agent_id.as_bytes(), &b)).transpose()?;
                Ok(standing(agent_id, serial, agent, revoked.is_some()))
            })
            .collect();
        Ok(checked)
    }

    pub(super) fn renew_agent(
        &self,
        agent_id: &str,
        presented: &str,
        svid: &pb::IssuedSvid,
        now: i64,
        audit: &Audit<'_, RenewOutcome>,
    ) -> Result<Result<(pb::Agent, Vec<pb::Revocation>), AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(mut agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            if agent.banned {
                return Ok(Err(AgentRefusal::Banned(agent_id.to_string())));
            }
            if tx.get(REVOCATIONS, presented.as_bytes())?.is_some() {
                return Ok(Err(AgentRefusal::Revoked(presented.to_string())));
            }
            let mut revoked = Vec::new();
            if presented != agent.x509_svid_serial {
                if presented.is_empty() || presented != agent.previous_x509_svid_serial {
                    return Ok(Err(AgentRefusal::Superseded(presented.to_string())));
                }
                // The agent never got the reply to its last renewal: the
                // SVID it lost must not stay valid.
                if let Some(lost) = tx.issued(&agent.x509_svid_serial)? {
                    revoked = tx.revoke(&[revocation_of(
                        &lost,
                        "agent SVID reply lost; superseded",
                        now,
                    )])?;
                }
            }
            agent.previous_x509_svid_serial = presented.to_string();
            agent.x509_svid_serial = svid.serial.clone();
            agent.x509_svid_expires_at = svid.expires_at;
            agent.last_seen_at = now;
            tx.put_agent(&agent);
            tx.record(svid);
            Ok(Ok((agent, revoked)))
        })
    }

    pub(super) fn ban_agent(
        &self,
        agent_id: &str,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        let why = format!("agent banned: {reason}");
        self.commit(audit, |tx| {
            let Some(mut agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            let issued = tx.issued_through_agent(agent_id)?;
            agent.banned = true;
            tx.put_agent(&agent);
            // The ban first: the agent's stream tells it it is banned before
            // the revocation of its own SVID closes the stream.
            tx.log(ChangeKind::AgentBanned {
                agent_id: agent_id.to_string(),
                reason: reason.to_string(),
            });
            let revocations: Vec<_> = issued.iter().map(|s| revocation_of(s, &why, now)).collect();
            let revoked = tx.revoke(&revocations)?;
            Ok(Ok(revoked))
        })
    }

    pub(super) fn evict_agent(
        &self,
        agent_id: &str,
        unban: bool,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            let own = tx.issued_by_owner(&agent_owner(agent_id))?;
            if agent.banned && !unban {
                // Evicting must not become a way to lift a ban: keep the
                // record (banned) so the agent can never attest again.
                let kept = pb::Agent {
                    x509_svid_serial: String::new(),
                    previous_x509_svid_serial: String::new(),
                    ..agent
                };
                tx.put_agent(&kept);
            } else {
                tx.remove(AGENTS, agent_id.as_bytes())?;
            }
            // The eviction first: it closes the agent's stream with a
            // reason before the revocation of its SVID would.
            tx.log(ChangeKind::AgentEvicted { agent_id: agent_id.to_string() });
            let revocations: Vec<_> =
                own.iter().map(|s| revocation_of(s, "agent evicted", now)).collect();
            let revoked = tx.revoke(&revocations)?;
            Ok(Ok(revoked))
        })
    }

    pub(super) fn confirm_agent_svid(
        &self,
        agent_id: &str,
        serial: &str,
    ) -> Result<(), StoreError> {
        // Most calls find nothing to do: check before taking the lock.
        match self.agent(agent_id)? {
            Some(a) if a.x509_svid_serial == serial && !a.previous_x509_svid_serial.is_empty() => {}
            _ => return Ok(()),
        }
        self.commit(&Audit::quiet(), |tx| {
            if let Some(mut agent) = tx.agent(agent_id)? {
                if agent.x509_svid_serial == serial && !agent.previous_x509_svid_serial.is_empty() {
                    agent.previous_x509_svid_serial.clear();
                    tx.put_agent(&agent);
                }
            }
            Ok(())
        })
    }

    pub(super) fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError> {
        self.kv
            .get(t(AGENTS), spiffe_id.as_bytes())?
            .map(|b| decode(spiffe_id.as_bytes(), &b))
            .transpose()
    }

    pub(super) fn agents(&self) -> Result<Vec<pb::Agent>, StoreError> {
        self.decode_tree(t(AGENTS))
    }
}

/// Whether `serial` may act for `agent_id`, given its stored record and
/// whether the serial is revoked: a known, unbanned agent's current SVID.
fn standing(
    agent_id: &str,
    serial: &str,
    agent: Option<pb::Agent>,
    revoked: bool,
) -> Result<pb::Agent, AgentRefusal> {
    let Some(agent) = agent else {
        return Err(AgentRefusal::Unknown(agent_id.to_string()));
    };
    if agent.banned {
        return Err(AgentRefusal::Banned(agent_id.to_string()));
    }
    if revoked {
        return Err(AgentRefusal::Revoked(serial.to_string()));
    }
    if agent.x509_svid_serial != serial {
        return Err(AgentRefusal::Superseded(serial.to_string()));
    }
    Ok(agent)
}
