//! Agents' pushed events: stored once (a retried batch is not stored
//! twice, even through another server), attributed to the authenticated
//! agent whatever the event claims, and fsynced before the agent is told.

use std::sync::Arc;

use tessera_proto::types::Event;

use super::{seq_of, EventLog, META, SPOOL_PREFIX};
use crate::event_schema::EventExt;
use crate::store::StoreError;

impl EventLog {
    /// Stores an agent's pushed events (those after what was already stored
    /// from the same spool), fsynced, and returns the spool position stored.
    /// The CPU work runs on the ingestion thread (see `background.rs`), off
    /// the async workers and below the priority of the threads that answer
    /// requests.
    pub async fn ingest(
        self: &Arc<Self>,
        agent_id: &str,
        spool_id: &[u8],
        events: Vec<Event>,
    ) -> Result<u64, StoreError> {
        let (log, agent_id, spool_id) = (self.clone(), agent_id.to_string(), spool_id.to_vec());
        let acked =
            self.ingest.run(move || log.store_pushed(&agent_id, &spool_id, events)).await??;
        self.flush().await?;
        Ok(acked)
    }

    pub(super) fn store_pushed(
        &self,
        agent_id: &str,
        spool_id: &[u8],
        events: Vec<Event>,
    ) -> Result<u64, StoreError> {
        let key = format!("{SPOOL_PREFIX}{agent_id}");
        let position_of = |position: Option<Vec<u8>>| match position {
            Some(p) if p.len() == spool_id.len() + 8 && &p[8..] == spool_id => seq_of(&p[..8]),
            _ => 0,
        };
        let mut acked = position_of(self.kv.get(META, key.as_bytes())?);
        let mut fresh = Vec::new();
        for mut e in events {
            if e.agent_seq <= acked {
                continue; // a retry of a batch whose answer was lost
            }
            acked = e.agent_seq;
            // The sender is the authenticated agent, whatever the event says,
            // and it reports only its own kinds of decision.
            e.agent_id = agent_id.to_string();
            e.source = "agent".into();
            if !(e.kind.starts_with("workload.") || e.kind.starts_with("agent.")) {
                let claimed = std::mem::replace(&mut e.kind, "agent.unknown".into());
                e = e.attr("claimed_kind", claimed);
            }
            e.operator = None;
            e.seq = 0;
            e.hash.clear();
            e.prev_hash.clear();
            fresh.push(e);
        }
        let mut position = acked.to_be_bytes().to_vec();
        position.extend_from_slice(spool_id);
        let count = fresh.len();
        // The position is stored with the events, in one commit; a batch
        // another server stored meanwhile (an agent that failed over) is
        // not stored twice.
        let stored = self.append_with(fresh, &|tx, events| {
            let now = position_of(tx.get(META, key.as_bytes())?);
            events.retain(|e| e.agent_seq == 0 || e.agent_seq > now);
            tx.put(META, key.as_bytes(), position.clone());
            Ok(())
        })?;
        if count > 0 {
            self.metrics.events_ingested().inc_by(stored as u64);
        }
        Ok(acked)
    }
}
