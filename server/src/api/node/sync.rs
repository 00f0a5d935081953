//! An agent's Sync stream: the bundle and CRLs, then the changes since
//! its revision (or a snapshot), then every change of the log as it
//! commits, from the change feed.

use std::collections::HashSet;
use std::sync::Arc;

use tessera_proto::node::{self as pb, sync_message::Event};
use tessera_proto::Refusal;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};

use crate::entry::Entry;
use crate::feed::FedChange;
use crate::state::store_status;
use crate::store::{AgentRefusal, ChangeKind};

use super::recheck::{Recheck, RECHECK_CHUNK, SYNC_RECHECK};
use super::service::*;

/// An idle stream catches up with other agents' changes (and checkpoints
/// past them) at least this often; nothing wakes it for them.
const CATCH_UP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Changes read from the log at a time.
const SYNC_CHANGES_PAGE: usize = 1000;

/// A stream that moved past other agents' changes only says so (a
/// checkpoint) at most this often; its own changes are checkpointed at once.
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A Sync stream's queue of messages. Each is boxed: a tokio channel
/// allocates its slots 32 at a time, and 32 unboxed messages (the largest
/// variant inline, plus a `Status`) were ~10 KB per block and two blocks
/// per stream, 230 MB with 10,000 agents connected.
pub(super) type SyncSender = mpsc::Sender<Box<Result<pb::SyncMessage, Status>>>;

/// Sends one message; an error when the agent has gone away.
async fn send(tx: &SyncSender, event: Event) -> Result<(), Status> {
    tx.send(Box::new(Ok(pb::SyncMessage { event: Some(event) })))
        .await
        .map_err(|_| Status::cancelled("agent disconnected"))
}

impl NodeService {
    /// One agent's Sync stream: the bundle and CRLs, then either the changes
    /// since `resume_from` or a snapshot, then every change of the log as
    /// it commits. Returns when the agent goes away, the server shuts
    /// down, or the agent may no longer sync (the error says why).
    pub(super) async fn run_sync(
        &self,
        caller: &Caller,
        resume_from: u64,
        tx: &SyncSender,
    ) -> Result<(), Status> {
        let agent_id = &caller.id;
        // The feed's reads of changed entries count only if made after this.
        let mut fresh_since = std::time::Instant::now();
        let mut wake = self.state.feed().subscribe(agent_id.as_str());
        let mut recheck = self.recheck(caller);
        send(tx, Event::Bundle(self.bundle_update())).await?;
        // The CRLs are read after the revision the stream starts from, so
        // they are at least that new: a CRL change before it is not lost.
        let parent = agent_id.clone();
        // So are the revocations: every one in force, X.509 serials and
        // JWTs (the agent may have missed some while disconnected, or get a
        // snapshot that keeps an SVID whose entry did not change; it drops
        // what they name).
        let now = self.state.clock().now();
        let (snapshot, crls, (serials, jwts)) = self
            .state
            .store_op(move |store| {
                let latest = store.revision()?;
                // Resumed only if the log still holds the changes after it
                // (the server may have been restored, or the log trimmed).
                let resumable = resume_from > 0
                    && resume_from <= latest
                    && resume_from + 1 >= store.changes_start()?;
                let snapshot = if resumable { None } else { Some(store.snapshot(&parent)?) };
                // A minute of grace for agents whose clocks are behind.
                let (jwts, serials): (Vec<_>, Vec<_>) = store
                    .revocations()?
                    .into_iter()
                    .filter(|r| r.expires_at > now - 60)
                    .partition(|r| !r.jti.is_empty());
                let serials = serials.into_iter().map(|r| r.serial).filter(|s| !s.is_empty());
                let jwts = jwts
                    .into_iter()
                    .map(|r| pb::RevokedJwt { jti: r.jti, expires_at: r.expires_at });
                Ok((snapshot, store.crls()?, (serials.collect(), jwts.collect())))
            })
            .await?;
        // In chunks that stay far below the message size limit; the CRLs
        // go with the first.
        let (mut jwts, mut crls): (Vec<pb::RevokedJwt>, _) = (jwts, crls);
        let mut serials: Vec<String> = serials;
        loop {
            let rest = jwts.split_off(jwts.len().min(REVOCATIONS_CHUNK));
            let more = serials.split_off(serials.len().min(REVOCATIONS_CHUNK));
            let crls = std::mem::take(&mut crls);
            let revocation = pb::Revocation { serials, crls, jwts };
            send(tx, Event::Revocation(revocation)).await?;
            if rest.is_empty() && more.is_empty() {
                break;
            }
            (jwts, serials) = (rest, more);
        }
        let mut cursor = match snapshot {
            None => resume_from,
            Some((revision, entries)) => {
                let chunks: Vec<&[Entry]> = if entries.is_empty() {
                    vec![&[]]
                } else {
                    entries.chunks(SNAPSHOT_CHUNK).collect()
                };
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let snapshot = pb::EntrySnapshot {
                        entries: chunk.iter().map(Entry::to_proto).collect(),
                        revision,
                        complete: i == last,
                    };
                    send(tx, Event::Snapshot(snapshot)).await?;
                }
                revision
            }
        };
        info!(agent_id = %agent_id, revision = cursor, resumed_from = resume_from, "agent sync started");
        let shutdown = self.state.shutdown().clone();
        // The revision last checkpointed, and when; whether one is due.
        let (mut checkpointed, mut checkpoint_at) = (cursor, tokio::time::Instant::now());
        let mut checkpoint_due = false;
        loop {
            if let Some(status) = recheck.verdict() {
                return Err(self.refuse("sync", agent_id.as_str(), status));
            }
            let (changes, covered) =
                match self.state.feed().for_agent(agent_id.as_str(), cursor, SYNC_CHANGES_PAGE) {
                    Some(read) => (read.changes, read.covered),
                    // Older than the shared window: read the log itself.
                    None => {
                        let from = cursor;
                        let read = self
                            .state
                            .store_op(move |store| store.changes_since(from, SYNC_CHANGES_PAGE))
                            .await?;
                        let covered = read.last().map_or(cursor, |c| c.revision);
                        (read.into_iter().map(|c| Arc::new(FedChange::bare(c))).collect(), covered)
                    }
                };
            if changes.is_empty() {
                // Only other agents' changes, or none: nothing to send now.
                cursor = cursor.max(covered);
                if checkpoint_due {
                    if cursor > checkpointed {
                        send(tx, Event::Checkpoint(pb::Checkpoint { revision: cursor })).await?;
                    }
                    (checkpointed, checkpoint_at) = (cursor, tokio::time::Instant::now());
                    checkpoint_due = false;
                }
                // Other agents' changes wake only their own streams; this one
                // catches up with them, and checkpoints, at most once per
                // CHECKPOINT_IDLE: 10,000 streams do not each wake and send a
                // checkpoint for every commit none of them is concerned by.
                let owed = cursor > checkpointed || self.state.feed().latest() > cursor;
                tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    // End the stream so the server's graceful shutdown can finish.
                    _ = shutdown.cancelled() => return Ok(()),
                    alive = wake.changed() => if !alive { return Ok(()) },
                    _ = tokio::time::sleep_until(checkpoint_at + CHECKPOINT_IDLE), if owed => {
                        checkpoint_due = true;
                    }
                    // Revocations and bans arrive through the log; a
                    // renewal (superseded SVID) or expiry, through the
                    // periodic re-check of every stream's caller.
                    status = recheck.refused() => {
                        return Err(self.refuse("sync", agent_id.as_str(), status));
                    }
                    _ = tokio::time::sleep(CATCH_UP_IDLE) => {}
                }
                continue;
            }
            for fed in changes {
                cursor = fed.change.revision;
                if self.send_change(caller, &fed, &mut fresh_since, tx).await? {
                    if let Some(at) = fed.read_at {
                        let revocation = matches!(fed.change.kind, ChangeKind::Revoked { .. });
                        self.state.metrics().pushed(revocation, at.elapsed().as_secs_f64());
                    }
                }
            }
            cursor = cursor.max(covered);
            send(tx, Event::Checkpoint(pb::Checkpoint { revision: cursor })).await?;
            (checkpointed, checkpoint_at) = (cursor, tokio::time::Instant::now());
            checkpoint_due = false;
        }
    }

    /// Registers an open Sync stream's caller for the re-check every
    /// [`SYNC_RECHECK`], starting the task that runs it on first use.
    fn recheck(&self, caller: &Caller) -> Recheck<Caller> {
        let (recheck, start) = self.rechecks.register(caller);
        if start {
            tokio::spawn(self.clone().run_rechecks());
        }
        recheck
    }

    /// Until shutdown, every [`SYNC_RECHECK`]: checks every open stream's
    /// caller against the store, [`RECHECK_CHUNK`] callers per store call.
    async fn run_rechecks(self) {
        let _running = self.rechecks.running();
        let shutdown = self.state.shutdown().clone();
        let mut tick = tokio::time::interval(SYNC_RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Streams a round could not check because the store failed: a
        // second failure in a row ends them (one failed query does not
        // disconnect a thousand agents at once).
        let mut unchecked = HashSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut failed = HashSet::new();
            for chunk in self.rechecks.snapshot().chunks(RECHECK_CHUNK) {
                self.recheck_chunk(chunk, &unchecked, &mut failed).await;
            }
            unchecked = failed;
        }
    }

    async fn recheck_chunk(
        &self,
        chunk: &[(u64, Caller)],
        unchecked: &HashSet<u64>,
        failed: &mut HashSet<u64>,
    ) {
        let pairs: Vec<(String, String)> =
            chunk.iter().map(|(_, c)| (c.id.to_string(), c.serial.clone())).collect();
        let checked = match self.state.store_op(move |store| store.check_agents(&pairs)).await {
            Ok(checked) if checked.len() == chunk.len() => checked,
            read => {
                let status = read.err().unwrap_or_else(|| {
                    Status::internal("the re-check read a different number of agents")
                });
                for (id, _) in chunk {
                    if unchecked.contains(id) {
                        self.rechecks.refuse(*id, status.clone());
                    } else {
                        failed.insert(*id);
                    }
                }
                return;
            }
        };
        for ((id, caller), checked) in chunk.iter().zip(checked) {
            let verdict = match checked.map_err(store_status).map(|c| self.standing(caller, c)) {
                Ok(Ok(true)) => self.confirm(caller).await,
                Ok(Ok(false)) => Ok(()),
                Ok(Err(status)) | Err(status) => Err(status),
            };
            if let Err(status) = verdict {
                self.rechecks.refuse(*id, status);
            }
        }
    }

    /// Sends what one change means for this agent, if anything; true when
    /// something was sent.
    pub(super) async fn send_change(
        &self,
        caller: &Caller,
        fed: &FedChange,
        fresh_since: &mut std::time::Instant,
        tx: &SyncSender,
    ) -> Result<bool, Status> {
        let (agent_id, change) = (&caller.id, &fed.change);
        let revision = change.revision;
        match &change.kind {
            ChangeKind::Entry { entry_id, parents } => {
                if !parents.iter().any(|p| p == agent_id.as_str()) {
                    return Ok(false);
                }
                // The entry as it is now (or as the feed read it, for every
                // stream at once) decides: kept if still ours, else dropped.
                let current = match &fed.entry {
                    Some(read) if fed.read_at.is_some_and(|at| at >= *fresh_since) => read.clone(),
                    _ => {
                        let id = entry_id.clone();
                        let read = self.state.store_op(move |store| store.entry(&id)).await?;
                        *fresh_since = std::time::Instant::now();
                        read
                    }
                };
                let change = match current {
                    Some(entry) if &entry.parent_id == agent_id => {
                        pb::entry_change::Change::Upserted(entry.to_proto())
                    }
                    _ => pb::entry_change::Change::RemovedEntryId(entry_id.clone()),
                };
                send(tx, Event::Change(pb::EntryChange { revision, change: Some(change) })).await?;
                Ok(true)
            }
            ChangeKind::Revoked { serials, jwts } => {
                if serials.contains(&caller.serial) {
                    warn!(agent_id = %agent_id, "closing sync stream: the agent's SVID was revoked");
                    return Err(AgentRefusal::Revoked(caller.serial.clone()).into());
                }
                // The commit that revoked also signed CRLs listing them:
                // the agent gets both in one message.
                let crls = self.state.feed().crls().as_ref().clone();
                let jwts = jwts
                    .iter()
                    .map(|j| pb::RevokedJwt { jti: j.jti.clone(), expires_at: j.expires_at })
                    .collect();
                let revocation = pb::Revocation { serials: serials.clone(), crls, jwts };
                send(tx, Event::Revocation(revocation)).await?;
                Ok(true)
            }
            ChangeKind::Crls => {
                let crls = self.state.feed().crls().as_ref().clone();
                send(tx, Event::Revocation(pb::Revocation { crls, ..Default::default() })).await?;
                Ok(false)
            }
            ChangeKind::Bundle => {
                send(tx, Event::Bundle(self.bundle_update())).await?;
                Ok(false)
            }
            ChangeKind::AgentBanned { agent_id: banned, reason } if banned == agent_id.as_str() => {
                warn!(agent_id = %agent_id, "closing sync stream of banned agent");
                send(tx, Event::Banned(pb::AgentBanned { reason: reason.clone() })).await?;
                Err(AgentRefusal::Banned(banned.clone()).into())
            }
            ChangeKind::AgentEvicted { agent_id: evicted } if evicted == agent_id.as_str() => {
                warn!(agent_id = %agent_id, "closing sync stream of evicted agent");
                Err(agent_refused(
                    Refusal::Evicted,
                    format!("agent {agent_id} was evicted; attest again"),
                ))
            }
            _ => Ok(false),
        }
    }
}
