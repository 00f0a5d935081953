//! JWT-SVIDs on the agent: tokens the server signs per (entry, audience
//! set), cached so the common `FetchJWTSVID` is served from memory, renewed
//! in the background before half-life while they are in use, and never
//! served past half-life; and the set of revoked `jti`s the server pushes,
//! which `ValidateJWTSVID` refuses until the tokens expire.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::node as pb;
use tessera_proto::Refusal;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::node::link::{CallFailure, Next, NodeLink};
use crate::node::standing::Call;
use crate::svid::cache::AgentEntry;
use crate::svid::{ItemOutcome, SIGN_BATCH};
use tessera_common::rate::TokenBucket;

/// Tokens kept at most; past it, tokens not in use are dropped first.
pub const MAX_CACHED_TOKENS: usize = 50_000;
/// A token in use is re-signed in the background at this fraction of its life...
const REFRESH_AT: f64 = 0.4;
/// ...and never served past this one (half-life).
const SERVE_UNTIL: f64 = 0.5;

/// Waits before retrying a failed signing call (about 1.5 s in all).
const SIGN_RETRIES: [Duration; 4] = [
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1000),
];

/// Cache key: the entry, its SPIFFE ID (an entry whose ID changed must not
/// get the old token) and the sorted audience set.
type Key = (String, String, Vec<String>);

/// A cached token.
struct CachedJwt {
    token: String,
    jti: String,
    issued_at: i64,
    expires_at: i64,
    last_used: AtomicI64,
}

impl CachedJwt {
    fn point(&self, fraction: f64) -> i64 {
        self.issued_at + ((self.expires_at - self.issued_at) as f64 * fraction) as i64
    }

    fn servable(&self, now: i64) -> bool {
        now < self.point(SERVE_UNTIL).max(self.issued_at + 1) && now < self.expires_at
    }
}

type Outcome = Option<Result<Arc<CachedJwt>, Status>>;

#[derive(Default)]
struct Inner {
    tokens: HashMap<Key, Arc<CachedJwt>>,
    /// Signing budget per caller uid: tokens left, and when last refilled.
    budgets: HashMap<u32, TokenBucket>,
    /// Signings under way: later callers for the same key wait for them.
    inflight: HashMap<Key, watch::Receiver<Outcome>>,
    /// Revoked jti → the token's expiry.
    revoked: HashMap<String, i64>,
}

/// The agent's JWT-SVIDs and JWT revocations.
pub struct JwtSvids {
    link: Arc<NodeLink>,
    inner: Mutex<Inner>,
    /// Signings per second per uid, and the burst.
    per_uid: (u32, u32),
}

impl fmt::Debug for JwtSvids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("JwtSvids")
            .field("tokens", &inner.tokens.len())
            .field("revoked", &inner.revoked.len())
            .finish_non_exhaustive()
    }
}

/// A token handed to a workload.
#[derive(Debug, Clone)]
pub struct IssuedJwt {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
}

impl JwtSvids {
    /// An empty cache signing through `link`; each caller uid may have
    /// `rate` tokens per second signed, after a burst of `burst`.
    pub fn new(link: Arc<NodeLink>, rate: u32, burst: u32) -> Self {
        Self { link, inner: Mutex::new(Inner::default()), per_uid: (rate, burst) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token for each entry, for `audience` (sorted, deduplicated, checked
    /// by the caller): from the cache when one is fresh, else signed by the
    /// server (one call for all misses; concurrent callers share it), within
    /// the signing budget of the caller's `uid`.
    pub async fn fetch(
        self: &Arc<Self>,
        entries: &[Arc<AgentEntry>],
        audience: &[String],
        uid: u32,
    ) -> Result<Vec<IssuedJwt>, Status> {
        let now = self.link.clock.now();
        let keys: Vec<Key> = entries
            .iter()
            .map(|e| (e.id.clone(), e.spiffe_id.to_string(), audience.to_vec()))
            .collect();
        let mut found: Vec<Option<Arc<CachedJwt>>> = vec![None; keys.len()];
        let mut waits = Vec::new();
        let mut to_sign = Vec::new();
        {
            let mut inner = self.lock();
            let mut misses = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                if let Some(cached) = inner.tokens.get(key) {
                    if cached.servable(now) && !inner.revoked.contains_key(&cached.jti) {
                        cached.last_used.store(now, Ordering::Relaxed);
                        found[i] = Some(cached.clone());
                        continue;
                    }
                }
                match inner.inflight.get(key) {
                    Some(rx) => waits.push((i, rx.clone())),
                    None => misses.push(i),
                }
            }
            if !misses.is_empty() {
                self.take_budget(&mut inner, uid, misses.len())?;
            }
            for i in misses {
                let (tx, rx) = watch::channel(None);
                inner.inflight.insert(keys[i].clone(), rx.clone());
                waits.push((i, rx));
                to_sign.push((keys[i].clone(), tx));
            }
        }
        if !to_sign.is_empty() {
            // A task of its own: a caller that goes away does not strand
            // the others waiting for the same tokens.
            let this = self.clone();
            tokio::spawn(async move { this.sign(to_sign).await });
        }
        // An entry the server no longer has (deleted there, its removal not
        // here yet) gets no token; the call still serves the others.
        let mut gone = None;
        for (i, mut rx) in waits {
            let waited = rx.wait_for(Option::is_some).await.map(|outcome| outcome.clone());
            let outcome = match waited {
                Ok(outcome) => outcome,
                Err(_) => {
                    // The signing task ended without an answer: forget it,
                    // so the next caller signs again.
                    let mut inner = self.lock();
                    if inner.inflight.get(&keys[i]).is_some_and(|r| r.same_channel(&rx)) {
                        inner.inflight.remove(&keys[i]);
                    }
                    return Err(Status::unavailable("JWT-SVID signing was interrupted; retry"));
                }
            };
            match outcome {
                Some(Ok(cached)) => {
                    cached.last_used.store(now, Ordering::Relaxed);
                    found[i] = Some(cached);
                }
                Some(Err(status)) if status.code() == tonic::Code::NotFound => gone = Some(status),
                Some(Err(status)) => return Err(status),
                None => return Err(Status::unavailable("JWT-SVID not signed; retry")),
            }
        }
        served(found, gone)
    }

    /// Signs tokens for `keys` (in batches), caches them and tells whoever waits.
    async fn sign(&self, keys: Vec<(Key, watch::Sender<Outcome>)>) {
        for chunk in keys.chunks(SIGN_BATCH) {
            let items = chunk
                .iter()
                .map(|((entry_id, _, audience), _)| pb::SignJwtItem {
                    entry_id: entry_id.clone(),
                    audience: audience.clone(),
                })
                .collect();
            let request = pb::SignJwtRequest { items };
            let mut response = self.sign_once(&request).await;
            // A call made with the agent SVID a renewal is replacing is the
            // link's to make again at once with the new one, and so are
            // items refused because the renewal landed while the server
            // signed (the link's rule). Other failures get a few more
            // tries, after a short wait, on a fresh connection.
            for delay in SIGN_RETRIES {
                let next = match &response {
                    Ok((answer, used)) if answer.results.iter().any(svid_changed) => {
                        self.link
                            .after_refusal(Call::Sign, used, Some(Refusal::AgentSvidChanged))
                            .await
                    }
                    Ok(_) | Err((_, Next::Dead)) => break,
                    Err(_) => Next::BackOff,
                };
                match next {
                    Next::Now => {}
                    Next::BackOff => {
                        self.link.reset();
                        self.link.clock.sleep(delay).await;
                    }
                    Next::Dead => break,
                }
                response = self.sign_once(&request).await;
            }
            let results = match response {
                Ok((answer, _)) => answer.results,
                Err((failure, _)) => {
                    warn!(error = %failure.message, "JWT-SVID signing failed");
                    self.link.reset();
                    let reason =
                        failure.status.as_ref().map_or(&failure.message[..], |s| s.message());
                    let status = Status::unavailable(format!(
                        "cannot get a JWT-SVID from the server: {reason}"
                    ));
                    let mut inner = self.lock();
                    for (key, tx) in chunk {
                        inner.inflight.remove(key);
                        tx.send_replace(Some(Err(status.clone())));
                    }
                    continue;
                }
            };
            let now = self.link.clock.now();
            let mut inner = self.lock();
            let mut results = results.into_iter();
            for (key, tx) in chunk {
                inner.inflight.remove(key);
                let outcome = match results.next() {
                    None => Err(Status::internal("server returned too few results")),
                    Some(result) => {
                        let status = result.status.unwrap_or_default();
                        if status.code != 0 {
                            warn!(entry_id = %key.0, audience = ?key.2, code = status.code, reason = %status.message, "server refused to sign JWT-SVID");
                            Err(Status::new(tonic::Code::from(status.code), status.message))
                        } else if inner.revoked.contains_key(&result.jti) {
                            Err(Status::unavailable("the new JWT-SVID was revoked at once; retry"))
                        } else if result.spiffe_id != key.1 {
                            // Signed for the entry as the server has it now:
                            // its SPIFFE ID changed and the change has not
                            // reached this agent yet.
                            Err(Status::unavailable("the entry is changing; retry"))
                        } else {
                            debug!(entry_id = %key.0, jti = %result.jti, expires_at = result.expires_at, "JWT-SVID cached");
                            let cached = Arc::new(CachedJwt {
                                token: result.token,
                                jti: result.jti,
                                issued_at: result.issued_at.min(now),
                                expires_at: result.expires_at,
                                last_used: AtomicI64::new(now),
                            });
                            if inner.tokens.len() >= MAX_CACHED_TOKENS {
                                evict(&mut inner.tokens, now);
                            }
                            inner.tokens.insert(key.clone(), cached.clone());
                            Ok(cached)
                        }
                    }
                };
                tx.send_replace(Some(outcome));
            }
        }
    }

    /// Takes `n` signings from `uid`'s budget, or refuses.
    fn take_budget(&self, inner: &mut Inner, uid: u32, n: usize) -> Result<(), Status> {
        let (rate, burst) = self.per_uid;
        let now_ms = self.link.clock.now_ms();
        let bucket = inner.budgets.entry(uid).or_insert(TokenBucket::full(burst, now_ms));
        if !bucket.take(n as f64, f64::from(rate), burst, now_ms) {
            return Err(Status::resource_exhausted(format!(
                "uid {uid} asked for too many new JWT-SVIDs (limit {rate}/s, burst {burst}); \
                 reuse audiences or retry later"
            )));
        }
        Ok(())
    }

    async fn sign_once(
        &self,
        request: &pb::SignJwtRequest,
    ) -> Result<(pb::SignJwtResponse, String), (CallFailure, Next)> {
        self.link
            .call(Call::Sign, |mut client| {
                let request = request.clone();
                async move { client.sign_jwt(request).await }
            })
            .await
    }

    /// Adds revocations pushed by the server. A revocation is never undone,
    /// so the set only grows (and forgets tokens once they expired): the
    /// full set sent at the start of a stream, in chunks, is merged too.
    pub fn apply_revocations(&self, jwts: Vec<pb::RevokedJwt>) {
        let mut inner = self.lock();
        let mut dropped = 0;
        for jwt in jwts {
            inner.revoked.insert(jwt.jti, jwt.expires_at);
        }
        let Inner { tokens, revoked, .. } = &mut *inner;
        tokens.retain(|_, t| {
            let keep = !revoked.contains_key(&t.jti);
            dropped += usize::from(!keep);
            keep
        });
        if dropped > 0 {
            info!(dropped, "revoked JWT-SVIDs dropped from the cache");
        }
    }

    /// Whether the server revoked the token with this `jti`.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.lock().revoked.contains_key(jti)
    }

    /// Re-signs tokens in use before they stop being served, and forgets
    /// expired tokens and revocations. Runs until `shutdown`.
    pub async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.link.clock.sleep(Duration::from_secs(1)) => {}
            }
            let now = self.link.clock.now();
            let to_sign = {
                let mut inner = self.lock();
                inner.revoked.retain(|_, expires_at| *expires_at > now);
                let (rate, burst) = self.per_uid;
                let now_ms = self.link.clock.now_ms();
                // A budget that has refilled is the same as none.
                inner.budgets.retain(|_, b| !b.full_at(f64::from(rate), burst, now_ms));
                inner.tokens.retain(|_, t| t.servable(now));
                let due: Vec<Key> = inner
                    .tokens
                    .iter()
                    .filter(|(key, t)| {
                        now >= t.point(REFRESH_AT)
                            // In use: fetched since it was signed, beyond the first fetch.
                            && t.last_used.load(Ordering::Relaxed) > t.issued_at
                            && !inner.inflight.contains_key(*key)
                    })
                    .map(|(key, _)| key.clone())
                    .collect();
                let mut to_sign = Vec::with_capacity(due.len());
                for key in due {
                    let (tx, rx) = watch::channel(None);
                    inner.inflight.insert(key.clone(), rx);
                    to_sign.push((key, tx));
                }
                to_sign
            };
            if !to_sign.is_empty() {
                debug!(tokens = to_sign.len(), "renewing JWT-SVIDs in use");
                self.sign(to_sign).await;
            }
        }
    }
}

/// Makes room: drops tokens that can no longer be served, then the least
/// recently used tenth.
fn evict(tokens: &mut HashMap<Key, Arc<CachedJwt>>, now: i64) {
    tokens.retain(|_, t| t.servable(now));
    if tokens.len() < MAX_CACHED_TOKENS {
        return;
    }
    let mut by_use: Vec<(i64, Key)> =
        tokens.iter().map(|(key, t)| (t.last_used.load(Ordering::Relaxed), key.clone())).collect();
    by_use.sort_unstable();
    for (_, key) in by_use.into_iter().take(tokens.len() / 10) {
        tokens.remove(&key);
    }
}

/// The tokens of a fetch: those found, unless none was because every entry
/// asked for is gone on the server (then why).
fn served(
    found: Vec<Option<Arc<CachedJwt>>>,
    gone: Option<Status>,
) -> Result<Vec<IssuedJwt>, Status> {
    let tokens: Vec<IssuedJwt> = found
        .into_iter()
        .flatten()
        .map(|c| IssuedJwt { token: c.token.clone(), jti: c.jti.clone() })
        .collect();
    match gone {
        Some(status) if tokens.is_empty() => Err(status),
        _ => Ok(tokens),
    }
}

/// Whether a signing item was refused because the agent's SVID was renewed
/// while the server signed (by its typed refusal).
fn svid_changed(item: &pb::SignJwtResult) -> bool {
    ItemOutcome::of(item.status.as_ref()) == ItemOutcome::SignAgain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(jti: &str) -> Option<Arc<CachedJwt>> {
        Some(Arc::new(CachedJwt {
            token: format!("t.{jti}"),
            jti: jti.into(),
            issued_at: 0,
            expires_at: 100,
            last_used: AtomicI64::new(0),
        }))
    }

    /// FetchJWTSVID for every identity: one entry deleted on the server
    /// (its removal not on the agent yet) does not fail the others.
    #[test]
    fn an_entry_gone_on_the_server_is_skipped_and_the_rest_served() {
        let gone = || Some(Status::not_found("entry e2 not found"));
        let served_now = served(vec![token("a"), None, token("c")], gone()).unwrap();
        assert_eq!(served_now.iter().map(|t| t.jti.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        let err = served(vec![None], gone()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "nothing left: the caller hears why");
        assert_eq!(served(vec![token("a")], None).unwrap().len(), 1);
    }
}
