//! The `Sync` stream from the server: entries, bundles and revocations
//! pushed as they change, applied to the cache; reopened at once with the
//! agent's new SVID after a renewal, with back-off after a failure.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_proto::node::{self as pb, sync_message::Event};
use tessera_proto::Refusal;
use tessera_workload_api::jwt::{JwtBundle, JwtKey};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::node::client::NodeClientError;
use crate::node::link::{CallFailure, Next, NodeLink};
use crate::node::standing::{Call, Death};
use crate::schedule::Backoff;
use crate::svid::cache::{AgentEntry, Cache, CacheState};
use crate::svid::jwt::JwtSvids;

/// Follows the server's Sync stream forever: reopened at once with the
/// agent's new SVID when it changes (the server closes the streams of a
/// replaced SVID), after a failure as the link's rule says.
pub async fn sync_loop(
    link: Arc<NodeLink>,
    cache: Cache,
    jwt: Arc<JwtSvids>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut changes = link.identity_changes();
    loop {
        changes.mark_unchanged();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                info!("agent SVID changed: reopening the sync stream with it");
                continue;
            }
            result = sync_once(&link, &cache, &jwt, &wake, &mut backoff) => result,
        };
        let server = link.server().unwrap_or_default();
        match result {
            Ok(()) => {
                info!(server = %server, "sync stream closed by server; reconnecting");
                link.reset();
            }
            Err(failure) => {
                if failure.refusal_of_banned() {
                    cache.withdraw_all();
                }
                let refused = failure.call.status.as_ref().and_then(Refusal::of).is_some();
                if failure.banned {
                    link.standing.die(Death {
                        refusal: Refusal::Banned,
                        agent_id: link.identity().spiffe_id.to_string(),
                    });
                } else {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = link.after_failure(Call::Sync, &failure.call) => next,
                    };
                    match next {
                        // The recovery task says why, once; nothing to add here.
                        Next::Dead => {}
                        Next::Now => {
                            info!(server = %server, "sync stream refused for the agent SVID being replaced; reopening it with the new one");
                            continue;
                        }
                        Next::BackOff if !refused => {
                            link.standing.unreachable(link.clock.now());
                            warn!(server = %server, error = %failure.call.message, "sync stream failed; reconnecting, to the next server if there are several");
                        }
                        Next::BackOff => {
                            warn!(server = %server, error = %failure.call.message, "sync stream refused; reconnecting, to the next server if there are several");
                        }
                    }
                }
                link.fail_over();
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            _ = link.clock.sleep(delay) => {}
        }
    }
}

/// Why a Sync stream ended.
#[derive(Debug)]
struct SyncFailure {
    /// The call, the SVID it presented and the server's status.
    call: CallFailure,
    /// The server said the agent is banned (in the stream).
    banned: bool,
}

impl SyncFailure {
    fn connect(used: String, e: NodeClientError) -> Self {
        Self { call: CallFailure::local(used, e), banned: false }
    }

    fn status(used: &str, status: tonic::Status) -> Self {
        Self { call: CallFailure::status(used.to_string(), status), banned: false }
    }

    fn refusal_of_banned(&self) -> bool {
        self.banned || self.call.status.as_ref().and_then(Refusal::of) == Some(Refusal::Banned)
    }
}

async fn sync_once(
    link: &NodeLink,
    cache: &Cache,
    jwt: &JwtSvids,
    wake: &Notify,
    backoff: &mut Backoff,
) -> Result<(), SyncFailure> {
    let conn = link.connect().await.map_err(|e| SyncFailure::connect(link.serial(), e))?;
    let (mut client, used) = (conn.client, conn.serial);
    let state = cache.state();
    let revision = if state.ready { state.revision } else { 0 };
    let mut stream = match client.sync(pb::SyncRequest { revision }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(SyncFailure::status(&used, status)),
    };
    link.standing.reached();
    info!(revision, server = %link.server().unwrap_or_default(), "sync stream open");
    let mut snapshot: Vec<AgentEntry> = Vec::new();
    loop {
        let message = stream.message().await.map_err(|s| SyncFailure::status(&used, s))?;
        let Some(event) = message.and_then(|m| m.event) else { return Ok(()) };
        backoff.reset();
        match event {
            Event::Bundle(bundle) => {
                let certs: Vec<CertificateDer<'static>> =
                    bundle.authorities.into_iter().map(Into::into).collect();
                link.set_bundle(&certs);
                let jwt_keys = bundle
                    .jwt_authorities
                    .iter()
                    .filter_map(|k| match JwtKey::from_spki_der(&k.kid, &k.public_key) {
                        Ok(key) => Some(key),
                        Err(e) => {
                            warn!(kid = %k.kid, error = %e, "server sent an unusable JWT key; ignored");
                            None
                        }
                    })
                    .collect();
                let jwt_bundle = JwtBundle::new(link.trust_domain.clone(), jwt_keys);
                cache.update(|s| {
                    let mut changed = false;
                    if *s.bundle != certs {
                        s.bundle = Arc::new(certs);
                        changed = true;
                    }
                    if s.jwt_bundle.as_deref() != Some(&jwt_bundle) {
                        s.jwt_bundle = Some(Arc::new(jwt_bundle));
                        changed = true;
                    }
                    changed
                });
            }
            Event::Snapshot(chunk) => {
                snapshot.extend(chunk.entries.iter().filter_map(AgentEntry::from_proto));
                if chunk.complete {
                    let entries = std::mem::take(&mut snapshot);
                    info!(
                        entries = entries.len(),
                        revision = chunk.revision,
                        "entry snapshot applied"
                    );
                    cache.update(|s| {
                        let old = std::mem::replace(
                            &mut s.entries,
                            entries.into_iter().map(|e| (e.id.clone(), Arc::new(e))).collect(),
                        );
                        // An SVID stays only if it is still right for its
                        // entry as the snapshot has it (the one rule).
                        let entries = &s.entries;
                        s.svids.retain(|id, _| match (old.get(id), entries.get(id)) {
                            (Some(was), Some(now)) => now.same_certificate_content(was),
                            _ => false,
                        });
                        s.revision = chunk.revision;
                        s.ready = true;
                        s.reindex();
                        true
                    });
                    wake.notify_one();
                }
            }
            Event::Revocation(revocation) => {
                if !revocation.jwts.is_empty() {
                    jwt.apply_revocations(revocation.jwts);
                }
                let serials: std::collections::HashSet<String> =
                    revocation.serials.into_iter().collect();
                let crls = revocation.crls;
                cache.update(|s| {
                    let mut changed = false;
                    // No CRLs: a revocation only; the re-signed CRLs follow.
                    if !crls.is_empty() && *s.crls != crls {
                        s.crls = Arc::new(crls);
                        changed = true;
                    }
                    let before = s.svids.len();
                    s.svids.retain(|_, svid| !serials.contains(&svid.serial));
                    if before != s.svids.len() {
                        info!(
                            dropped = before - s.svids.len(),
                            "revoked SVIDs dropped; re-issuing where entries still stand"
                        );
                        changed = true;
                    }
                    changed
                });
                wake.notify_one();
            }
            Event::Banned(banned) => {
                warn!(reason = %banned.reason, "this agent was banned: dropping every entry and SVID");
                cache.withdraw_all();
                return Err(SyncFailure {
                    call: CallFailure::local(used, format!("agent banned: {}", banned.reason)),
                    banned: true,
                });
            }
            Event::Checkpoint(checkpoint) => {
                cache.update(|s| {
                    s.revision = s.revision.max(checkpoint.revision);
                    false // nothing a workload sees changed
                });
            }
            Event::Change(change) => {
                let revision = change.revision;
                match change.change {
                    Some(pb::entry_change::Change::Upserted(entry)) => {
                        let Some(entry) = AgentEntry::from_proto(&entry) else { continue };
                        debug!(entry_id = %entry.id, revision, "entry upserted");
                        cache.update(|s| apply_upsert(s, entry, revision));
                    }
                    Some(pb::entry_change::Change::RemovedEntryId(id)) => {
                        debug!(entry_id = %id, revision, "entry removed");
                        cache.update(|s| apply_removal(s, &id, revision));
                    }
                    None => {}
                }
                wake.notify_one();
            }
        }
    }
}

/// Applies an upsert logged at `revision`, unless the agent is already past
/// that revision or holds a later version of the entry: the agent never
/// goes backwards (a stale upsert cannot resurrect a removed entry).
fn apply_upsert(s: &mut CacheState, entry: AgentEntry, revision: u64) -> bool {
    if revision <= s.revision
        || s.entries.get(&entry.id).is_some_and(|old| old.revision > entry.revision)
    {
        return false;
    }
    let stale = s.entries.get(&entry.id).is_some_and(|old| !old.same_certificate_content(&entry));
    if stale {
        s.svids.remove(&entry.id);
    }
    s.insert_entry(Arc::new(entry));
    s.revision = s.revision.max(revision);
    true
}

/// Applies a removal logged at `revision`, unless the agent holds a later
/// version of the entry.
fn apply_removal(s: &mut CacheState, id: &str, revision: u64) -> bool {
    if revision <= s.revision || s.entries.get(id).is_some_and(|old| old.revision > revision) {
        return false;
    }
    s.remove_entry(id);
    s.svids.remove(id);
    s.revision = s.revision.max(revision);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, revision: u64) -> AgentEntry {
        AgentEntry {
            id: id.into(),
            spiffe_id: "spiffe://example.org/w".parse().unwrap(),
            selectors: vec!["unix:uid:1".parse().unwrap()],
            x509_svid_ttl: 60,
            dns_names: vec![],
            expires_at: 0,
            revision,
            hint: String::new(),
            jwt_audiences: vec![],
        }
    }

    /// Item 4: an upsert that raced a delete (an older revision arriving
    /// after the removal) must not resurrect the entry; the agent never
    /// goes backwards.
    #[test]
    fn a_stale_upsert_does_not_resurrect_a_removed_entry() {
        let mut state = CacheState::default();
        assert!(apply_upsert(&mut state, entry("a", 3), 3));
        assert!(apply_upsert(&mut state, entry("a", 5), 5));
        assert!(!apply_upsert(&mut state, entry("a", 4), 4), "older version ignored");
        assert_eq!(state.entries["a"].revision, 5);
        assert!(!apply_removal(&mut state, "a", 4), "an older removal is ignored");
        assert!(apply_removal(&mut state, "a", 6));
        assert!(!apply_upsert(&mut state, entry("a", 5), 5), "a stale upsert after the removal");
        assert!(!state.entries.contains_key("a"), "the removed entry stays removed");
        assert_eq!(state.revision, 6);
    }
}
