//! Issued SVIDs: recorded by group commit (concurrent batches share one
//! commit and one fsync), each checked in the commit against its agent and
//! entry as they are now, and revoked at once if no longer authorized.

use prost::Message;
use tessera_proto::types as pb;
use tessera_proto::Refusal;

use super::audit::Audit;
use super::commit::{Tx, TxResult};
use super::error::StoreError;
use super::issue_queue::IssueJob;
use super::issued_index::read_records;
use super::kv_store::{KvStore, Writer};
use super::layout::{decode, decode_entry, t, ENTRIES, ISSUED};
use super::revocations::revocation_of;
use super::{ItemRefused, Signed};
use crate::event_schema::{self as schema, EventExt};

impl KvStore {
    pub(super) fn record_issued(
        &self,
        agent_id: &str,
        agent_serial: &str,
        read_at: u64,
        signed: Vec<Signed>,
        now: i64,
    ) -> Result<Vec<super::RecordedSvid>, StoreError> {
        // Group commit: concurrent batches (many agents signing at once)
        // share one commit and one fsync. Each caller encodes its batch and
        // queues it; whoever holds the writer lock records everything queued.
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job =
            IssueJob::new(agent_id, agent_serial, read_at, signed, self.kv.shared(), now, done);
        self.issue_queue.lock().unwrap_or_else(|e| e.into_inner()).push(job);
        {
            let mut writer = self.lock();
            let mut jobs =
                std::mem::take(&mut *self.issue_queue.lock().unwrap_or_else(|e| e.into_inner()));
            if !jobs.is_empty() {
                match self.record_jobs(&mut writer, &mut jobs) {
                    Ok(all) => {
                        for (job, results) in jobs.into_iter().zip(all) {
                            let _ =
                                job.done.send(Ok(job.signed.into_iter().zip(results).collect()));
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        for job in &jobs {
                            let _ = job.done.send(Err(why.clone()));
                        }
                    }
                }
            }
        }
        result
            .recv()
            .map_err(|_| StoreError::Group("the commit of this batch was abandoned".into()))?
            .map_err(StoreError::Group)
    }

    /// Records queued issuance batches in one commit: the records (encoded
    /// by their callers, outside the lock: on sled up to 4 KiB a row, so
    /// that the commit writes few keys), each checked against the agent
    /// (still current and unbanned) and the entry as it is now (unchanged:
    /// the store still at the revision the entries were read at, or the
    /// entry re-read and equal to its encoding then, or still authorizing
    /// the SVID), the
    /// issuance events, the write sequence and the revocation of the SVIDs
    /// no longer authorized; everything is durable before anyone is
    /// answered. A crash before the commit leaves no record and no event
    /// (`tests/tests/crash_signing.rs`); on sled the in-memory index takes
    /// the records once the commit is done.
    fn record_jobs(
        &self,
        writer: &mut Writer,
        jobs: &mut [IssueJob],
    ) -> Result<Vec<Vec<Result<(), ItemRefused>>>, StoreError> {
        self.commit_locked(writer, &Audit::quiet(), |tx| {
            // The committed revision: this commit's own revocations come last.
            let committed = tx.revision.get();
            for job in jobs.iter_mut() {
                tx.record_rows(std::mem::take(&mut job.rows), std::mem::take(&mut job.placed));
            }
            let mut revoke = Vec::new();
            let mut all = Vec::with_capacity(jobs.len());
            for job in jobs.iter_mut() {
                let agent_refusal = match tx.agent(&job.agent_id)? {
                    None => Some(ItemRefused::typed(
                        Refusal::Evicted,
                        format!("agent {} was evicted while signing", job.agent_id),
                    )),
                    Some(a) if a.banned => Some(ItemRefused::typed(
                        Refusal::Banned,
                        format!("agent {} was banned while signing", job.agent_id),
                    )),
                    Some(a) if a.x509_svid_serial != job.agent_serial => Some(ItemRefused::typed(
                        Refusal::AgentSvidChanged,
                        tessera_proto::AGENT_SVID_CHANGED.to_string(),
                    )),
                    Some(_) => None,
                };
                // No entry changed since they were read: each is as signed.
                let as_read = job.read_at == committed;
                let mut results = Vec::with_capacity(job.signed.len());
                for (item, mut event) in job.signed.iter().zip(std::mem::take(&mut job.events)) {
                    let refusal = match &agent_refusal {
                        Some(why) => Some(why.clone()),
                        None if as_read => None,
                        None => entry_refusal(tx, item)?,
                    };
                    // The issuance's event, in the commit that records it.
                    match refusal {
                        Some(why) => {
                            revoke.push(revocation_of(&item.svid, &why.why, job.now));
                            event.decision = schema::DENY.into();
                            event.reason.clone_from(&why.why);
                            tx.events.borrow_mut().push(event.attr("revoked_as_issued", true));
                            results.push(Err(why));
                        }
                        None => {
                            tx.events.borrow_mut().push(event);
                            results.push(Ok(()));
                        }
                    }
                }
                all.push(results);
            }
            tx.revoke(&revoke)?;
            Ok(all)
        })
    }

    /// The issued SVID recorded under `key` (`svid_key`), unless pruned.
    pub(super) fn issued(&self, key: &str) -> Result<Option<pb::IssuedSvid>, StoreError> {
        if self.kv.shared() {
            return self
                .kv
                .get(t(ISSUED), key.as_bytes())?
                .map(|b| decode(key.as_bytes(), &b))
                .transpose();
        }
        let Some(row) = self.index().row_of(key) else { return Ok(None) };
        Ok(read_records(&[(key.to_string(), row)], |row| self.kv.get(t(ISSUED), row))?.pop())
    }

    pub(super) fn issued_count(&self) -> usize {
        if self.kv.shared() {
            self.kv.len(t(ISSUED)).unwrap_or(0)
        } else {
            self.index().len()
        }
    }
}

/// Why an SVID signed from `item.entry` may not be handed out now that the
/// store has moved past the read: its entry deleted, or changed so that it
/// no longer authorizes it (an unchanged encoding needs no decoding).
fn entry_refusal(tx: &Tx<'_>, item: &Signed) -> TxResult<Option<ItemRefused>> {
    let id = item.entry.id.as_bytes();
    let Some(stored) = tx.get(ENTRIES, id)? else {
        return Ok(Some(ItemRefused::typed(
            Refusal::EntryChanged,
            format!("entry {} was deleted while signing", item.entry.id),
        )));
    };
    if stored == item.entry.to_proto().encode_to_vec()
        || decode_entry(id, &stored)?.authorizes_svid_of(&item.entry, item.svid.expires_at)
    {
        return Ok(None);
    }
    Ok(Some(ItemRefused::typed(
        Refusal::EntryChanged,
        format!("entry {} changed while signing", item.entry.id),
    )))
}
