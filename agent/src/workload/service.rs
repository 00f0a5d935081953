//! The SPIFFE Workload API on the agent's Unix socket. Refusals are
//! logged here, once.
//!
//! Each connection is attested once, when it is accepted (see
//! [`super::attestor`]): the peer process is pinned by the kernel's own
//! reference (`SO_PEERPIDFD`) and the executable it runs is recorded. Every
//! call on the connection is served from that attestation, after checking
//! that the same process still runs the same executable; one that has exec'd
//! another program (or exited) is refused with `Unavailable` (retryable: the
//! client's next connection is attested afresh as the program it is then) and
//! the connection is closed shortly after the refusal is sent.
//!
//! Memory a caller can make the agent hold is bounded before anything is
//! decoded: a uid past its connection limit is closed at accept (an HTTP/2
//! GOAWAY saying why, then close; nothing of it is read); requests are at
//! most [`super::limits::MAX_REQUEST_BYTES`], header lists
//! [`super::limits::MAX_HEADER_LIST_BYTES`], with
//! small flow-control windows and a cap on streams per connection; refusal
//! events are folded per uid by the event spool.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::workload::{self as pb};
use tessera_workload_api::{Selector, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::clock::Clock;
use crate::event_schema::{self as schema, kind, EventExt};
use crate::event_spool::EventSpool;
use crate::metrics::AgentMetrics;
use crate::svid::cache::{Cache, CacheState, CachedSvid};
use crate::svid::jwt::JwtSvids;
use crate::workload::limits::{PerUid, UidSlot, WorkloadLimits};
use crate::workload::listener::{Attesting, WorkloadPeer};
use crate::workload::peer::PeerProcess;
use tessera_proto::types::{Event, Workload};

/// How long a first fetch waits for the agent's first sync, or for SVIDs of
/// matching entries still being signed.
pub const FIRST_RESPONSE_WAIT: Duration = Duration::from_secs(10);

/// How long an update that lacks an SVID being replaced waits for the
/// replacement before it is sent anyway.
pub const REPLACEMENT_WAIT: Duration = Duration::from_secs(2);

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    pub(crate) cache: Cache,
    pub(crate) jwt: Arc<JwtSvids>,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) shutdown: CancellationToken,
    /// Attests at accept (on the blocking pool, a bounded number at once)
    /// and checks, before each call, that the caller still runs what it was
    /// attested as (on the caller's thread: a `statx` and a `poll`).
    pub(crate) attesting: Attesting,
    pub(crate) limits: WorkloadLimits,
    pub(crate) streams: PerUid,
    pub(crate) events: Arc<EventSpool>,
    pub(crate) metrics: AgentMetrics,
    /// The time: what is served, and when an SVID has expired.
    pub(crate) clock: Arc<dyn Clock>,
}

pub(crate) type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The event schema's view of a Workload API caller.
pub fn workload_of(peer: &PeerProcess, selectors: &[Selector]) -> Workload {
    let value = |key: &str| {
        selectors
            .iter()
            .find(|s| s.kind() == "unix" && s.value().starts_with(key))
            .map(|s| s.value()[key.len()..].to_string())
            .unwrap_or_default()
    };
    Workload {
        pid: peer.pid.unwrap_or(0),
        uid: peer.uid,
        gid: peer.gid,
        path: value("path:"),
        sha256: value("sha256:"),
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
    }
}

pub(crate) fn peer_of<T>(request: &Request<T>) -> Option<WorkloadPeer> {
    request.extensions().get::<WorkloadPeer>().cloned()
}

/// An attested caller of one call.
pub(crate) struct Caller {
    /// Its connection.
    pub(crate) conn: WorkloadPeer,
    /// Its process.
    pub(crate) peer: Arc<PeerProcess>,
    /// Its selectors, from the connection's attestation.
    pub(crate) selectors: Vec<Selector>,
    /// Counts the call against its uid's stream limit until dropped.
    pub(crate) slot: UidSlot,
}

impl WorkloadService {
    /// The service over the agent's cache.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: Cache,
        jwt: Arc<JwtSvids>,
        attesting: Attesting,
        trust_domain: TrustDomain,
        limits: WorkloadLimits,
        events: Arc<EventSpool>,
        metrics: AgentMetrics,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache,
            jwt,
            trust_domain,
            shutdown,
            attesting,
            limits,
            streams: PerUid::default(),
            events,
            metrics,
            clock,
        }
    }

    /// Records a Workload API decision: the event, and the request metric.
    pub(crate) fn record(&self, method: &str, mut e: Event) {
        self.metrics.request(method, if e.decision == schema::DENY { "refused" } else { "ok" });
        e = e.attr("method", method);
        self.events.emit(e);
    }

    /// Records a refusal of `method` for `peer` (selectors as far as known) and returns `status`.
    pub(crate) fn refuse(
        &self,
        method: &str,
        kind: &str,
        peer: Option<(&PeerProcess, &[Selector])>,
        status: Status,
    ) -> Status {
        self.refuse_because(method, kind, peer, status, None)
    }

    /// [`Self::refuse`], with a stable code for the refusal (attr `refusal`).
    pub(crate) fn refuse_because(
        &self,
        method: &str,
        kind: &str,
        peer: Option<(&PeerProcess, &[Selector])>,
        status: Status,
        refusal: Option<&str>,
    ) -> Status {
        let mut e = schema::refused(kind, &status);
        if let Some(refusal) = refusal {
            e = e.code(refusal).attr("refusal", refusal);
        }
        if let Some((peer, selectors)) = peer {
            e.workload = Some(workload_of(peer, selectors));
        }
        self.record(method, e);
        status
    }

    /// Checks that the connection's process still runs the executable it
    /// was attested with (and lives). If not, the call is refused with
    /// `Unavailable` and the connection is closed once the refusal is out:
    /// a client that reconnects is attested as what it runs then.
    pub(crate) fn verify(&self, method: &str, conn: &WorkloadPeer) -> Result<(), Status> {
        let Err(refusal) = self.attesting.verify(&conn.0) else { return Ok(()) };
        conn.close_soon();
        let recorded = match &conn.0.attested {
            Ok(attestation) => attestation.selectors.as_slice(),
            Err(_) => &[],
        };
        Err(self.refuse_because(
            method,
            kind::WORKLOAD_REFUSED,
            Some((&conn.0.process, recorded)),
            Status::unavailable(format!("caller could not be attested: {}", refusal.message)),
            Some(refusal.code),
        ))
    }

    pub(crate) fn check_header<T>(&self, method: &str, request: &Request<T>) -> Result<(), Status> {
        match request.metadata().get("workload.spiffe.io") {
            Some(value) if value.as_bytes() == b"true" => Ok(()),
            _ => {
                let peer = peer_of(request);
                Err(self.refuse(
                    method,
                    kind::WORKLOAD_REFUSED,
                    peer.as_ref().map(|p| (p.0.process.as_ref(), &[][..])),
                    Status::invalid_argument("security header missing from request"),
                ))
            }
        }
    }

    /// Checks the header and the caller's limits, checks that the caller
    /// still runs what it was attested as at accept, and returns its
    /// selectors (from that attestation; the executable's hash computed
    /// once, from the file opened at accept).
    pub(crate) async fn caller<T>(&self, op: &str, request: &Request<T>) -> Result<Caller, Status> {
        self.check_header(op, request)?;
        let conn = peer_of(request).ok_or_else(|| {
            self.refuse(
                op,
                kind::WORKLOAD_REFUSED,
                None,
                Status::unavailable("caller could not be attested: no peer credentials"),
            )
        })?;
        let peer = conn.0.process.clone();
        let attestation = match &conn.0.attested {
            Ok(attestation) => attestation,
            Err(refusal) => {
                return Err(self.refuse_because(
                    op,
                    kind::WORKLOAD_REFUSED,
                    Some((&peer, &[])),
                    Status::unavailable(format!(
                        "caller could not be attested: {}",
                        refusal.message
                    )),
                    Some(refusal.code),
                ))
            }
        };
        let Some(slot) = self.streams.try_take(peer.uid, self.limits.streams_per_uid) else {
            return Err(self.refuse_because(
                op,
                kind::WORKLOAD_REFUSED,
                Some((&peer, &[])),
                Status::resource_exhausted(format!(
                    "too many Workload API streams for uid {} (limit {}); close some and retry",
                    peer.uid, self.limits.streams_per_uid
                )),
                Some("stream_limit"),
            ));
        };
        let started = std::time::Instant::now();
        self.verify(op, &conn)?;
        let mut selectors = attestation.selectors.clone();
        // Hashing a new executable happens here, with no permit held: it
        // delays only the callers of that executable, which share it.
        if let Some(pending) = &attestation.pending_hash {
            if let Some(hash) = pending.sha256().await {
                if let Ok(selector) = Selector::new("unix", format!("sha256:{hash}")) {
                    selectors.push(selector);
                }
            }
        }
        self.metrics.attested(started.elapsed().as_secs_f64());
        Ok(Caller { conn, peer, selectors, slot })
    }

    pub(crate) fn bundle_bytes(&self, state: &CacheState) -> Vec<u8> {
        state.bundle.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
    }

    pub(crate) fn x509_response(
        &self,
        state: &CacheState,
        svids: &[Arc<CachedSvid>],
    ) -> pb::X509svidResponse {
        let bundle = self.bundle_bytes(state);
        pb::X509svidResponse {
            svids: svids
                .iter()
                .map(|s| pb::X509svid {
                    spiffe_id: s.spiffe_id.to_string(),
                    x509_svid: s.chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect(),
                    x509_svid_key: s.key_pkcs8.as_ref().clone(),
                    bundle: bundle.clone(),
                    hint: s.hint.clone(),
                })
                .collect(),
            crl: state.crls.as_ref().clone(),
            federated_bundles: HashMap::new(),
        }
    }
}

/// What a workload currently gets, for change detection: (entry, serial)
/// pairs, the bundle and the CRLs (a CRL-only change is sent too, so relying
/// parties learn of revoked peers at once).
pub(crate) type Fingerprint =
    (Vec<(String, String)>, Arc<Vec<rustls_pki_types::CertificateDer<'static>>>, Arc<Vec<Vec<u8>>>);

pub(crate) fn fingerprint(state: &CacheState, svids: &[Arc<CachedSvid>]) -> Fingerprint {
    (
        svids.iter().map(|s| (s.entry_id.clone(), s.serial.clone())).collect(),
        state.bundle.clone(),
        state.crls.clone(),
    )
}

impl WorkloadService {
    /// A bundle stream: waits (briefly) until `key` has a value, sends
    /// `message` then and again each time `key` changes (only then: every
    /// message carries the full state, and a repeat would look like an
    /// update to clients).
    pub(crate) async fn bundle_stream<K, M>(
        &self,
        slot: UidSlot,
        missing: &'static str,
        key: impl Fn(&CacheState) -> Option<K> + Send + 'static,
        message: impl Fn(&Self, &CacheState) -> M + Send + 'static,
    ) -> Result<Stream_<M>, Status>
    where
        K: PartialEq + Send + 'static,
        M: Send + 'static,
    {
        let mut updates = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_WAIT;
        while key(&updates.borrow_and_update()).is_none() {
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                return Err(Status::unavailable(missing));
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = None;
            loop {
                let state = updates.borrow_and_update().clone();
                let current = key(&state);
                if current.is_some() && last != current {
                    last = current;
                    if tx.send(Ok(message(&service, &state))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = service.shutdown.cancelled() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// The cache once the agent has synced (waiting briefly for it).
    pub(crate) async fn ready_state(&self) -> Result<Arc<CacheState>, Status> {
        let mut updates = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_WAIT;
        loop {
            let state = updates.borrow_and_update().clone();
            if state.ready {
                return Ok(state);
            }
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                return Err(Status::unavailable("agent has not synced with the server yet; retry"));
            }
        }
    }
}
