//! The node API (agent ↔ server): join-token attestation, agent SVID
//! renewal, batch signing of workload SVIDs, and the Sync push stream.
//! Refusals are logged here, once, with their reason.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tessera_proto::node::{self as pb, node_server::Node};
use tessera_proto::types::{self as types, Status as ItemStatus};
use tessera_workload_api::SpiffeId;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ca::SignedSvid;
use crate::csr::parse_csr;
use crate::entry::Entry;
use crate::state::{EntryEvent, State};
use crate::store::{EntryChange, Store, StoreError, MAX_BATCH};
use crate::tls::NodePeer;

/// Entries per snapshot chunk in `Sync`, well under any message size limit.
pub const SNAPSHOT_CHUNK: usize = 500;

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeService {
    state: Arc<State>,
}

fn refuse(op: &str, agent: &str, status: Status) -> Status {
    warn!(target: "tessera::audit", op, agent_id = agent, code = ?status.code(), reason = status.message(), "node request refused");
    status
}

impl NodeService {
    /// The service over shared server state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// The calling agent's SPIFFE ID, from its verified client certificate,
    /// if it is a known agent, not banned, presenting its current SVID.
    async fn authenticate<T>(&self, op: &str, request: &Request<T>) -> Result<SpiffeId, Status> {
        let certs =
            request.extensions().get::<NodePeer>().and_then(|peer| peer.certs.clone()).ok_or_else(
                || refuse(op, "", Status::unauthenticated("agent X509-SVID required (mTLS)")),
            )?;
        let leaf = certs
            .first()
            .ok_or_else(|| refuse(op, "", Status::unauthenticated("empty certificate chain")))?;
        let id = tessera_workload_api::spiffe_id_of_cert(leaf).map_err(|e| {
            refuse(op, "", Status::unauthenticated(format!("client certificate: {e}")))
        })?;
        // An unparsable leaf has no serial, so it matches no agent's current one.
        let serial = tessera_workload_api::certificate_serial_hex(leaf).unwrap_or_default();
        let key = id.to_string();
        let agent = self.state.store_op(move |store| store.agent(&key)).await?;
        let Some(agent) = agent else {
            return Err(refuse(
                op,
                id.as_str(),
                Status::permission_denied(format!("{id} is not an attested agent")),
            ));
        };
        if agent.banned {
            return Err(refuse(
                op,
                id.as_str(),
                Status::permission_denied(format!("agent {id} is banned")),
            ));
        }
        if agent.x509_svid_serial != serial {
            return Err(refuse(
                op,
                id.as_str(),
                Status::permission_denied(
                    "agent SVID is not the agent's current SVID (superseded by a renewal)",
                ),
            ));
        }
        Ok(id)
    }

    /// Signs an agent SVID and records it as the agent's current one.
    async fn issue_agent_svid(
        &self,
        agent_id: &SpiffeId,
        csr: &[u8],
        attestation_type: &str,
        previous: Option<types::Agent>,
    ) -> Result<SignedSvid, Status> {
        let key = parse_csr(csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = self.state.config.agent_svid_ttl;
        let svid = self
            .state
            .ca
            .sign_svid(&key, agent_id, ttl, &[])
            .map_err(|e| Status::internal(e.to_string()))?;
        let now = self.state.clock.now();
        let agent = types::Agent {
            spiffe_id: agent_id.to_string(),
            x509_svid_serial: svid.serial.clone(),
            x509_svid_expires_at: svid.expires_at,
            attestation_type: attestation_type.to_string(),
            attested_at: previous.as_ref().map_or(now, |a| a.attested_at),
            banned: false,
            last_seen_at: now,
        };
        let issued = types::IssuedSvid {
            serial: svid.serial.clone(),
            spiffe_id: agent_id.to_string(),
            entry_id: String::new(),
            agent_id: agent_id.to_string(),
            expires_at: svid.expires_at,
            ca_seq: svid.ca_seq,
        };
        self.state
            .store_op(move |store| {
                store.record_issued(std::slice::from_ref(&issued))?;
                store.put_agent(&agent)
            })
            .await?;
        Ok(svid)
    }

    fn bundle(&self) -> Vec<Vec<u8>> {
        self.state.ca.bundle().iter().map(|c| c.to_vec()).collect()
    }

    fn sign_item(
        &self,
        agent_id: &SpiffeId,
        item: pb::SignX509Item,
        entry: Option<Entry>,
    ) -> (pb::SignX509Result, Option<types::IssuedSvid>) {
        let fail = |code: tonic::Code, message: String| {
            warn!(target: "tessera::audit", agent_id = %agent_id, entry_id = %item.entry_id, reason = %message, "X509-SVID refused");
            let result = pb::SignX509Result {
                entry_id: item.entry_id.clone(),
                status: Some(ItemStatus { code: code as i32, message }),
                ..Default::default()
            };
            (result, None)
        };
        let Some(entry) = entry else {
            return fail(tonic::Code::NotFound, format!("entry {} not found", item.entry_id));
        };
        if &entry.parent_id != agent_id {
            return fail(
                tonic::Code::PermissionDenied,
                format!("entry {} is not parented to {agent_id}", entry.id),
            );
        }
        if entry.is_expired(self.state.clock.now()) {
            return fail(tonic::Code::PermissionDenied, format!("entry {} has expired", entry.id));
        }
        let key = match parse_csr(&item.csr) {
            Ok(key) => key,
            Err(e) => return fail(tonic::Code::InvalidArgument, e.to_string()),
        };
        match self.state.ca.sign_svid(&key, &entry.spiffe_id, entry.x509_svid_ttl, &entry.dns_names)
        {
            Ok(svid) => {
                info!(target: "tessera::audit", agent_id = %agent_id, entry_id = %entry.id, spiffe_id = %entry.spiffe_id, serial = %svid.serial, expires_at = svid.expires_at, "X509-SVID issued");
                let issued = types::IssuedSvid {
                    serial: svid.serial.clone(),
                    spiffe_id: entry.spiffe_id.to_string(),
                    entry_id: entry.id.clone(),
                    agent_id: agent_id.to_string(),
                    expires_at: svid.expires_at,
                    ca_seq: svid.ca_seq,
                };
                let result = pb::SignX509Result {
                    entry_id: item.entry_id,
                    status: Some(ItemStatus { code: 0, message: String::new() }),
                    x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
                    expires_at: svid.expires_at,
                    serial: svid.serial,
                };
                (result, Some(issued))
            }
            Err(e) => fail(tonic::Code::Internal, e.to_string()),
        }
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let req = request.into_inner();
        let op = "attest";
        // Check the CSR before spending the token on it.
        parse_csr(&req.csr)
            .map_err(|e| refuse(op, "", Status::invalid_argument(format!("CSR: {e}"))))?;
        if req.join_token.is_empty() {
            return Err(refuse(op, "", Status::invalid_argument("join token is required")));
        }
        let token = req.join_token.clone();
        let record = self.state.store_op(move |store| store.take_join_token(&token)).await?;
        let Some(record) = record else {
            return Err(refuse(
                op,
                "",
                Status::permission_denied("join token does not exist or has already been used"),
            ));
        };
        if self.state.clock.now() >= record.expires_at {
            return Err(refuse(
                op,
                &record.spiffe_id,
                Status::permission_denied("join token has expired"),
            ));
        }
        let agent_id =
            SpiffeId::parse(&record.spiffe_id).map_err(|e| Status::internal(e.to_string()))?;
        let key = agent_id.to_string();
        let previous = self.state.store_op(move |store| store.agent(&key)).await?;
        if previous.as_ref().is_some_and(|a| a.banned) {
            return Err(refuse(
                op,
                agent_id.as_str(),
                Status::permission_denied(format!("agent {agent_id} is banned")),
            ));
        }
        let svid = self
            .issue_agent_svid(&agent_id, &req.csr, "join_token", None)
            .await
            .map_err(|e| refuse(op, agent_id.as_str(), e))?;
        info!(target: "tessera::audit", agent_id = %agent_id, serial = %svid.serial, "agent attested with join token");
        Ok(Response::new(pb::AttestResponse {
            agent_id: agent_id.to_string(),
            x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: self.bundle(),
        }))
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent_id = self.authenticate("renew_agent", &request).await?;
        let key = agent_id.to_string();
        let previous = self.state.store_op(move |store| store.agent(&key)).await?;
        let attestation_type =
            previous.as_ref().map(|a| a.attestation_type.clone()).unwrap_or_default();
        let svid = self
            .issue_agent_svid(&agent_id, &request.get_ref().csr, &attestation_type, previous)
            .await
            .map_err(|e| refuse("renew_agent", agent_id.as_str(), e))?;
        info!(target: "tessera::audit", agent_id = %agent_id, serial = %svid.serial, "agent SVID renewed");
        Ok(Response::new(pb::RenewAgentResponse {
            x509_svid: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: self.bundle(),
        }))
    }

    async fn sign_x509(
        &self,
        request: Request<pb::SignX509Request>,
    ) -> Result<Response<pb::SignX509Response>, Status> {
        let agent_id = self.authenticate("sign_x509", &request).await?;
        let items = request.into_inner().items;
        if items.len() > MAX_BATCH {
            return Err(refuse(
                "sign_x509",
                agent_id.as_str(),
                Status::invalid_argument(format!(
                    "batch has {} items, more than the {MAX_BATCH} allowed",
                    items.len()
                )),
            ));
        }
        let ids: Vec<String> = items.iter().map(|i| i.entry_id.clone()).collect();
        let entries = self
            .state
            .store_op(move |store| {
                ids.iter().map(|id| store.entry(id)).collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let service = self.clone();
        // Signing is CPU work: keep it off the async workers.
        let signed = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .zip(entries)
                .map(|(item, entry)| service.sign_item(&agent_id, item, entry))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("signing task failed: {e}")))?;
        let (results, issued): (Vec<_>, Vec<_>) = signed.into_iter().unzip();
        let issued: Vec<types::IssuedSvid> = issued.into_iter().flatten().collect();
        // Recorded (durably) before the agent can use them, so revoking the
        // entry or banning the agent always finds them.
        if !issued.is_empty() {
            self.state.store_op(move |store| store.record_issued(&issued)).await?;
        }
        Ok(Response::new(pb::SignX509Response { results }))
    }

    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<SyncStream>, Status> {
        let agent_id = self.authenticate("sync", &request).await?;
        // Subscribe before the snapshot so no change falls in between.
        let mut events = self.state.entry_events.subscribe();
        let mut bundles = self.state.ca.watch_bundle();
        let crls = self.state.crls.subscribe();
        let resume_from = request.get_ref().revision;
        let parent = agent_id.clone();
        let (revision, initial) =
            self.state.store_op(move |store| initial_sync(store, &parent, resume_from)).await?;
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.state.shutdown.clone();
        tokio::spawn(async move {
            let bundle = bundles.borrow_and_update().iter().map(|c| c.to_vec()).collect();
            let first = pb::SyncMessage {
                event: Some(pb::sync_message::Event::Bundle(pb::BundleUpdate {
                    authorities: bundle,
                })),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let crls = crls.borrow().as_ref().clone();
            let revocation = pb::SyncMessage {
                event: Some(pb::sync_message::Event::Revocation(pb::Revocation {
                    serials: Vec::new(),
                    crls,
                })),
            };
            if tx.send(Ok(revocation)).await.is_err() {
                return;
            }
            let sent = initial.len();
            for message in initial {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            info!(agent_id = %agent_id, messages = sent, revision, resumed_from = resume_from, "agent sync started");
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    // End the stream so the server's graceful shutdown can finish.
                    _ = shutdown.cancelled() => return,
                    changed = bundles.changed() => {
                        if changed.is_err() { return; }
                        let bundle = bundles.borrow_and_update().iter().map(|c| c.to_vec()).collect();
                        pb::sync_message::Event::Bundle(pb::BundleUpdate { authorities: bundle })
                    }
                    event = events.recv() => match event {
                        Ok(event) if event.agent_id().is_some_and(|id| id != &agent_id) => continue,
                        Ok(event) if event_revision(&event).is_some_and(|r| r <= revision) => continue,
                        Ok(EntryEvent::Revoked { serials, crls }) => pb::sync_message::Event::Revocation(pb::Revocation {
                            serials: serials.as_ref().clone(),
                            crls: crls.as_ref().clone(),
                        }),
                        Ok(EntryEvent::AgentBanned { reason, .. }) => {
                            warn!(agent_id = %agent_id, "closing sync stream of banned agent");
                            let banned = pb::sync_message::Event::Banned(pb::AgentBanned { reason });
                            let _ = tx.send(Ok(pb::SyncMessage { event: Some(banned) })).await;
                            return;
                        }
                        Ok(EntryEvent::AgentEvicted { .. }) => {
                            warn!(agent_id = %agent_id, "closing sync stream of evicted agent");
                            let _ = tx.send(Err(Status::permission_denied(format!("agent {agent_id} was evicted; attest again")))).await;
                            return;
                        }
                        Ok(EntryEvent::Upserted(entry)) => pb::sync_message::Event::Change(pb::EntryChange {
                            revision: entry.revision,
                            change: Some(pb::entry_change::Change::Upserted(entry.to_proto())),
                        }),
                        Ok(EntryEvent::Removed { id, revision, .. }) => pb::sync_message::Event::Change(pb::EntryChange {
                            revision,
                            change: Some(pb::entry_change::Change::RemovedEntryId(id)),
                        }),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // The agent missed changes: end the stream; it
                            // reconnects and gets a fresh snapshot.
                            warn!(agent_id = %agent_id, missed = n, "sync stream lagged; closing for resync");
                            let _ = tx.send(Err(Status::aborted("sync lagged behind; reconnect"))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.send(Ok(pb::SyncMessage { event: Some(message) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a new Sync stream starts with: the changes since `resume_from` when
/// the agent has a revision the store can resume from, else a full snapshot
/// in chunks. Returns the store revision it is current to.
fn initial_sync(
    store: &dyn Store,
    agent_id: &SpiffeId,
    resume_from: u64,
) -> Result<(u64, Vec<pb::SyncMessage>), StoreError> {
    let revision = store.revision()?;
    if resume_from > 0 && resume_from <= revision {
        // The last change per entry decides what the agent must do.
        let mut last: BTreeMap<String, EntryChange> = BTreeMap::new();
        for change in store.changes_since(resume_from)? {
            if change.parent_id == agent_id.as_str() {
                last.insert(change.entry_id.clone(), change);
            }
        }
        let mut messages = Vec::new();
        for (id, change) in last {
            let current = if change.removed { None } else { store.entry(&id)? };
            let event = match current {
                Some(entry) if &entry.parent_id == agent_id => {
                    pb::entry_change::Change::Upserted(entry.to_proto())
                }
                Some(_) => continue,
                None if change.removed => pb::entry_change::Change::RemovedEntryId(id),
                None => continue,
            };
            messages.push(pb::SyncMessage {
                event: Some(pb::sync_message::Event::Change(pb::EntryChange {
                    revision: change.revision,
                    change: Some(event),
                })),
            });
        }
        return Ok((revision, messages));
    }
    let entries = store.entries_by_parent(agent_id)?;
    if entries.is_empty() {
        let empty = pb::EntrySnapshot { entries: vec![], revision, complete: true };
        return Ok((revision, vec![snapshot(empty)]));
    }
    let chunks = entries.chunks(SNAPSHOT_CHUNK).count();
    let messages = entries
        .chunks(SNAPSHOT_CHUNK)
        .enumerate()
        .map(|(i, chunk)| {
            snapshot(pb::EntrySnapshot {
                entries: chunk.iter().map(Entry::to_proto).collect(),
                revision,
                complete: i + 1 == chunks,
            })
        })
        .collect();
    Ok((revision, messages))
}

fn event_revision(event: &EntryEvent) -> Option<u64> {
    match event {
        EntryEvent::Upserted(entry) => Some(entry.revision),
        EntryEvent::Removed { revision, .. } => Some(*revision),
        _ => None,
    }
}

fn snapshot(message: pb::EntrySnapshot) -> pb::SyncMessage {
    pb::SyncMessage { event: Some(pb::sync_message::Event::Snapshot(message)) }
}
