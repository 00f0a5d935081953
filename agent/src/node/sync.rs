//! The agent's long-running loops: the `Sync` stream from the server (entries
//! and bundle pushed as they change), the signer that keeps an SVID for every
//! entry (new entries at once, renewal at half-life ± 10 % jitter), and the
//! renewal of the agent's own SVID.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use tessera_proto::node::{self as pb, node_client::NodeClient, sync_message::Event};
use tessera_proto::Refusal;
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::cache::{AgentEntry, Cache, CacheState, CachedSvid};
use crate::identity::{certs_pem, new_key_and_csr, write_private, AgentIdentity};
use crate::jwt::JwtSvids;
use crate::node_client::{node_tls_config, NodeClientError, Servers};
use crate::standing::{self, Call, Death, Standing};
use tessera_workload_api::jwt::{JwtBundle, JwtKey};

/// The server backdates NotBefore by this much for clock skew; lifetimes
/// for renewal are counted from issuance, not from the backdated NotBefore.
pub const BACKDATE_SECS: i64 = 10;
/// Most CSRs sent in one `SignX509` call.
pub const SIGN_BATCH: usize = 500;
/// Wait before retrying an entry whose signing failed.
const SIGN_RETRY_SECS: i64 = 5;

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A uniformly random factor in `[1 - spread, 1 + spread]`.
pub fn jitter(spread: f64) -> f64 {
    let mut bytes = [0u8; 4];
    // Without randomness, no jitter: renewal still happens on time.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 1.0;
    }
    let unit = f64::from(u32::from_be_bytes(bytes)) / f64::from(u32::MAX);
    1.0 - spread + 2.0 * spread * unit
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// half its lifetime, ± 10 %.
pub fn renew_point(not_before: i64, not_after: i64) -> i64 {
    let not_before = not_before.min(not_after - 1);
    let lifetime = (not_after - not_before).max(1) as f64;
    (not_before + (lifetime * 0.5 * jitter(0.1)).round() as i64).min(not_after - 1)
}

/// Exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { next: min, min, max }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(jitter(0.2));
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The connection to the server's node API, with the agent's current SVID.
#[derive(Debug)]
pub struct NodeLink {
    servers: Servers,
    trust_domain: TrustDomain,
    /// Trust anchors for the server's certificate (updated from pushed bundles).
    pub anchors: TrustAnchors,
    identity: RwLock<AgentIdentity>,
    client: Mutex<Option<NodeClient<Channel>>>,
    data_dir: PathBuf,
    /// Notified when the agent's SVID changed: the Sync stream reopens with
    /// the new one at once (the server closes streams of superseded SVIDs).
    resync: Notify,
    /// Counts identity changes (renewal, attesting again).
    generation: watch::Sender<u64>,
    /// Whether the identity is dead, and since when no server answered.
    pub standing: Standing,
}

impl NodeLink {
    /// A link to the servers at `addresses` authenticated as `identity`.
    pub fn new(
        addresses: Vec<String>,
        trust_domain: TrustDomain,
        anchors: TrustAnchors,
        identity: AgentIdentity,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            servers: Servers::new(addresses, identity.spiffe_id.as_str()),
            trust_domain,
            anchors,
            identity: RwLock::new(identity),
            client: Mutex::new(None),
            data_dir,
            resync: Notify::new(),
            generation: watch::Sender::new(0),
            standing: Standing::default(),
        }
    }

    /// The serial of the agent's current SVID.
    pub fn serial(&self) -> String {
        let identity = self.identity.read().unwrap_or_else(|e| e.into_inner());
        identity
            .chain
            .first()
            .and_then(|leaf| tessera_workload_api::certificate_serial_hex(leaf).ok())
            .unwrap_or_default()
    }

    /// Judges a failed `call` that presented the SVID with serial `used`:
    /// with a typed refusal (from the status, else from a TLS alert seen
    /// since), records the identity dead when the refusal ends it (see
    /// [`standing::ends_identity`]), and asks for a renewal when the SVID
    /// was called superseded. Answers whether the identity is dead.
    pub fn judge(&self, status: Option<&tonic::Status>, call: Call, used: &str) -> bool {
        let alert = self.standing.alerts.take();
        let Some(refusal) = status.and_then(Refusal::of).or(alert) else {
            return self.standing.death().is_some();
        };
        let current = self.serial();
        if standing::ends_identity(refusal, call, used, &current) {
            let agent_id = self.identity().spiffe_id.to_string();
            self.standing.die(Death { refusal, agent_id });
        } else if refusal == Refusal::Superseded && used == current {
            // The server holds another SVID as this agent's current one
            // (a renewal whose answer was lost): renew now. A refusal of
            // an SVID the agent has renewed since means nothing more than
            // that the call raced the renewal: it reconnects with the new
            // one (renewing again would supersede the retry too).
            self.standing.renew_now.notify_one();
        }
        self.standing.death().is_some()
    }

    /// A receiver that sees every change of the agent's identity.
    pub fn identity_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The agent's identity.
    pub fn identity(&self) -> AgentIdentity {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A client on the current connection (connecting if needed).
    pub async fn client(&self) -> Result<NodeClient<Channel>, NodeClientError> {
        if let Some(client) = self.client.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(client);
        }
        let tls = node_tls_config(
            self.anchors.clone(),
            &self.trust_domain,
            Some(self.identity().client_identity()),
        )?;
        let (client, _) = self.servers.connect_watched(&tls, &self.standing.alerts).await?;
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// The server the agent is (or was last) connected to.
    pub fn server(&self) -> Option<String> {
        self.servers.current()
    }

    /// Drops the connection; the next `client` reconnects to the same server.
    pub fn reset(&self) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drops the connection after the server failed a call; the next
    /// `client` tries the next server first (with one server, the same).
    pub fn fail_over(&self) {
        self.reset();
        self.servers.fail_over();
    }

    /// Replaces the agent's identity (renewed, or attested again): the
    /// connection and the Sync stream reopen with it.
    pub fn set_identity(&self, identity: AgentIdentity) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
        self.reset();
        self.generation.send_modify(|g| *g += 1);
        self.resync.notify_one();
    }

    /// Records a bundle pushed by the server: trust anchors and `bundle.pem`.
    pub fn set_bundle(&self, certs: &[CertificateDer<'static>]) {
        self.anchors.update(certs.to_vec());
        if let Err(e) =
            write_private(&self.data_dir.join("bundle.pem"), certs_pem(certs).as_bytes())
        {
            warn!(error = %e, "cannot store trust bundle");
        }
    }
}

/// Follows the server's Sync stream forever, reconnecting with backoff.
pub async fn sync_loop(
    link: Arc<NodeLink>,
    cache: Cache,
    jwt: Arc<JwtSvids>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let used = link.serial();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = link.resync.notified() => {
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
                    withdraw_everything(&cache);
                }
                let refused = failure.status.as_ref().and_then(Refusal::of).is_some();
                if failure.banned {
                    link.standing.die(Death {
                        refusal: Refusal::Banned,
                        agent_id: link.identity().spiffe_id.to_string(),
                    });
                } else if link.judge(failure.status.as_ref(), Call::Sync, &used) {
                    // The recovery task says why, once; nothing to add here.
                } else if !refused {
                    link.standing.unreachable(now());
                    warn!(server = %server, error = %failure.message, "sync stream failed; reconnecting, to the next server if there are several");
                } else {
                    warn!(server = %server, error = %failure.message, "sync stream refused; reconnecting, to the next server if there are several");
                }
                link.fail_over();
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = link.resync.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why a Sync stream ended.
#[derive(Debug)]
struct SyncFailure {
    message: String,
    /// The server's status, when it answered one.
    status: Option<tonic::Status>,
    /// The server said the agent is banned (in the stream).
    banned: bool,
}

impl SyncFailure {
    fn connect(e: NodeClientError) -> Self {
        Self { message: e.to_string(), status: None, banned: false }
    }

    fn status(status: tonic::Status) -> Self {
        Self {
            message: format!("{:?}: {}", status.code(), status.message()),
            status: Some(status),
            banned: false,
        }
    }

    fn refusal_of_banned(&self) -> bool {
        self.banned || self.status.as_ref().and_then(Refusal::of) == Some(Refusal::Banned)
    }
}

async fn sync_once(
    link: &NodeLink,
    cache: &Cache,
    jwt: &JwtSvids,
    wake: &Notify,
    backoff: &mut Backoff,
) -> Result<(), SyncFailure> {
    let mut client = link.client().await.map_err(SyncFailure::connect)?;
    let state = cache.state();
    let revision = if state.ready { state.revision } else { 0 };
    let mut stream = match client.sync(pb::SyncRequest { revision }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(SyncFailure::status(status)),
    };
    link.standing.reached();
    info!(revision, server = %link.server().unwrap_or_default(), "sync stream open");
    let mut snapshot: Vec<AgentEntry> = Vec::new();
    loop {
        let message = stream.message().await.map_err(SyncFailure::status)?;
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
                        s.entries =
                            entries.into_iter().map(|e| (e.id.clone(), Arc::new(e))).collect();
                        let entries = &s.entries;
                        s.svids.retain(|id, svid| {
                            entries.get(id).is_some_and(|e| e.spiffe_id == svid.spiffe_id)
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
                withdraw_everything(cache);
                return Err(SyncFailure {
                    message: format!("agent banned: {}", banned.reason),
                    status: None,
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

/// A banned agent serves nothing: every workload loses its identity.
fn withdraw_everything(cache: &Cache) {
    cache.update(|s| {
        let changed = !s.entries.is_empty() || !s.svids.is_empty();
        s.entries.clear();
        s.reindex();
        s.svids.clear();
        s.ready = true;
        changed
    });
}

/// Keeps an SVID for every entry: signs new entries at once and renews at
/// half-life; drops SVIDs that expire (e.g. while the server is down).
pub async fn signer_loop(
    link: Arc<NodeLink>,
    cache: Cache,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut retry_at: HashMap<String, i64> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let now = now();
        cache.update(|s| {
            let before = s.svids.len();
            s.svids.retain(|_, svid| svid.expires_at > now);
            before != s.svids.len()
        });
        let state = cache.state();
        retry_at.retain(|id, at| *at > now && state.entries.contains_key(id));
        let due: Vec<Arc<AgentEntry>> = if state.ready {
            state
                .entries
                .values()
                .filter(|e| e.expires_at == 0 || e.expires_at > now)
                // Renew at the renewal point, unless the SVID already runs to
                // the entry's expiry: a new one could not last longer.
                .filter(|e| {
                    state.svids.get(&e.id).is_none_or(|s| {
                        s.renew_at <= now && (e.expires_at == 0 || s.expires_at < e.expires_at)
                    })
                })
                .filter(|e| !retry_at.contains_key(&e.id))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut wait = Duration::from_secs(3600);
        if !due.is_empty() {
            let used = link.serial();
            match sign(&link, &cache, &due, &mut retry_at).await {
                Ok(()) => backoff.reset(),
                Err((e, status)) => {
                    if !link.judge(status.as_ref(), Call::Sign, &used) {
                        warn!(error = %e, entries = due.len(), "SVID signing failed; will retry");
                    }
                    link.fail_over();
                    wait = backoff.next_delay();
                }
            }
        }
        let state = cache.state();
        let now = crate::manager::now();
        let next = state
            .svids
            .values()
            .flat_map(|s| {
                let capped = state
                    .entries
                    .get(&s.entry_id)
                    .is_some_and(|e| e.expires_at != 0 && s.expires_at >= e.expires_at);
                [if capped { s.expires_at } else { s.renew_at }, s.expires_at]
            })
            .chain(retry_at.values().copied())
            .min();
        if let Some(next) = next {
            wait = wait.min(Duration::from_secs((next - now).max(0) as u64));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn sign(
    link: &NodeLink,
    cache: &Cache,
    due: &[Arc<AgentEntry>],
    retry_at: &mut HashMap<String, i64>,
) -> Result<(), (String, Option<tonic::Status>)> {
    let mut client = link.client().await.map_err(|e| (e.to_string(), None))?;
    for chunk in due.chunks(SIGN_BATCH) {
        let entries = chunk.to_vec();
        let prepared = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|e| new_key_and_csr().map(|(key, csr)| (e, key, csr)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| (e.to_string(), None))?
        .map_err(|e| (e.to_string(), None))?;
        let items = prepared
            .iter()
            .map(|(e, _, csr)| pb::SignX509Item { entry_id: e.id.clone(), csr: csr.clone() })
            .collect();
        let response = client
            .sign_x509(pb::SignX509Request { items })
            .await
            .map_err(|s| (format!("{:?}: {}", s.code(), s.message()), Some(s)))?
            .into_inner();
        let now = now();
        let mut fresh = Vec::new();
        for ((entry, key, _), result) in prepared.into_iter().zip(response.results) {
            let status = result.status.unwrap_or_default();
            if status.code != 0 {
                if status.refusal == Refusal::AgentSvidChanged.as_str() {
                    // Renewed while the server signed: again in a second,
                    // on a connection with the new SVID.
                    debug!(entry_id = %entry.id, "agent SVID renewed while signing; signing again");
                    link.reset();
                    retry_at.insert(entry.id.clone(), now + 1);
                    continue;
                }
                warn!(entry_id = %entry.id, code = status.code, reason = %status.message, "server refused to sign SVID");
                retry_at.insert(entry.id.clone(), now + SIGN_RETRY_SECS);
                continue;
            }
            let chain: Vec<CertificateDer<'static>> =
                result.x509_svid.into_iter().map(Into::into).collect();
            let svid = CachedSvid {
                entry_id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.clone(),
                chain,
                key_pkcs8: Arc::new(key),
                serial: result.serial,
                expires_at: result.expires_at,
                renew_at: renew_point(now, result.expires_at),
                hint: entry.hint.clone(),
            };
            debug!(entry_id = %entry.id, serial = %svid.serial, expires_at = svid.expires_at, "SVID cached");
            fresh.push(svid);
        }
        cache.update(|s| {
            let mut changed = false;
            for svid in fresh {
                // The entry may have changed or gone while we were signing.
                if s.entries.get(&svid.entry_id).is_some_and(|e| e.spiffe_id == svid.spiffe_id) {
                    s.svids.insert(svid.entry_id.clone(), Arc::new(svid));
                    changed = true;
                }
            }
            changed
        });
    }
    Ok(())
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
