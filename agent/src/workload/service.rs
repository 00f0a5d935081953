//! The SPIFFE Workload API on the agent's Unix socket. Refusals are
//! logged here, once.
//!
//! Each connection is attested once, when it is accepted (see
//! [`crate::attestor`]): the peer process is pinned by the kernel's own
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
//! most [`MAX_REQUEST_BYTES`], header lists [`MAX_HEADER_LIST_BYTES`], with
//! small flow-control windows and a cap on streams per connection; refusal
//! events are folded per uid by the event spool.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tessera_proto::workload::{self as pb, spiffe_workload_api_server::SpiffeWorkloadApi};
use tessera_workload_api::{jwt, Selector, SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::attestor::{AttestError, Attestation, HashLimits, PeerProcess, WorkloadAttestor};
use crate::authority::RewriteAuthority;
use crate::cache::{Cache, CacheState, CachedSvid};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::events::EventSpool;
use crate::jwt::{JwtSvids, MAX_AUDIENCES};
use crate::manager::now;
use crate::metrics::AgentMetrics;
use tessera_proto::types::{Event, Workload};

/// How long a first fetch waits for the agent's first sync, or for SVIDs of
/// matching entries still being signed.
pub const FIRST_RESPONSE_WAIT: Duration = Duration::from_secs(10);

/// How long an update that lacks an SVID being replaced waits for the
/// replacement before it is sent anyway.
pub const REPLACEMENT_WAIT: Duration = Duration::from_secs(2);

/// Largest request message the Workload API decodes (its requests are a
/// few hundred bytes: audiences, a token to validate). Larger ones are
/// refused from the gRPC length prefix, before they are buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest HTTP/2 header list a request may carry (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// HTTP/2 flow-control windows the agent grants: what one stream, and one
/// connection, can make it buffer before the handler reads.
pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// How long a connection whose process exec'd stays open after its refusal,
/// so the refusal reaches the client before the close.
pub const CLOSE_AFTER_REFUSAL: Duration = Duration::from_millis(500);

/// Per-caller limits of the Workload API.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadLimits {
    /// Open connections per caller uid; connections past it are closed at
    /// accept, before anything is read from them.
    pub connections_per_uid: usize,
    /// Open calls (streams) per caller uid, all connections together.
    pub streams_per_uid: usize,
    /// Concurrent streams per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub streams_per_connection: u32,
    /// Executable hashing: size limit and concurrency.
    pub hashing: HashLimits,
    /// JWT-SVIDs per second each caller uid may have the server sign (cache
    /// misses: new identities or audiences), after a burst of
    /// `jwt_signing_burst`; past it, `ResourceExhausted`. One workload
    /// asking for endless new audiences cannot use up the agent's signing
    /// budget at the server.
    pub jwt_signings_per_uid: u32,
    /// See `jwt_signings_per_uid`.
    pub jwt_signing_burst: u32,
}

impl Default for WorkloadLimits {
    fn default() -> Self {
        Self {
            connections_per_uid: 64,
            streams_per_uid: 256,
            streams_per_connection: 32,
            hashing: HashLimits::default(),
            jwt_signings_per_uid: 50,
            jwt_signing_burst: 500,
        }
    }
}

/// Counts what each uid holds open; a [`UidSlot`] gives its unit back on drop.
#[derive(Debug, Clone, Default)]
struct PerUid(Arc<std::sync::Mutex<HashMap<u32, usize>>>);

#[derive(Debug)]
struct UidSlot {
    counts: PerUid,
    uid: u32,
}

impl PerUid {
    fn try_take(&self, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(uid).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot { counts: self.clone(), uid })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// What every request on a connection knows about it: the peer pinned at
/// accept and what its attestation found then.
#[derive(Debug, Clone)]
pub struct WorkloadPeer(Arc<Connection>);

#[derive(Debug)]
struct Connection {
    process: Arc<PeerProcess>,
    attested: Result<Attestation, Refusal>,
    closing: Closing,
}

/// Why a connection could not be attested at accept.
#[derive(Debug, Clone)]
struct Refusal {
    /// A stable code (`AttestError::code`).
    code: &'static str,
    message: String,
}

impl From<AttestError> for Refusal {
    fn from(e: AttestError) -> Self {
        Self { code: e.code(), message: e.to_string() }
    }
}

/// Closes a connection from the server side: once set, reads see the end
/// of the stream and the HTTP/2 server lets the connection go.
#[derive(Debug, Default)]
struct Closing {
    scheduled: AtomicBool,
    closed: AtomicBool,
    reader: Mutex<Option<Waker>>,
}

impl Closing {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(waker) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            waker.wake();
        }
    }
}

impl WorkloadPeer {
    /// Closes the connection after [`CLOSE_AFTER_REFUSAL`] (once).
    fn close_soon(&self) {
        if self.0.closing.scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let connection = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_AFTER_REFUSAL).await;
            connection.closing.close();
        });
    }
}

/// An accepted Workload API connection and its attested peer. What the
/// client sends goes through [`RewriteAuthority`], so clients that send the
/// socket path as `:authority` (gRPC C-core, grpc-java) are served.
#[derive(Debug)]
pub struct WorkloadConn {
    stream: RewriteAuthority<UnixStream>,
    peer: WorkloadPeer,
    _slot: UidSlot,
}

impl Connected for WorkloadConn {
    type ConnectInfo = WorkloadPeer;

    fn connect_info(&self) -> WorkloadPeer {
        self.peer.clone()
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let closing = &this.peer.0.closing;
        if closing.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(())); // the end of the stream
        }
        // The task reading is woken by `Closing::close` as well as by the socket.
        {
            let mut reader = closing.reader.lock().unwrap_or_else(|e| e.into_inner());
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
        }
        if closing.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Attestation work shared by the accept path and the requests: the
/// attestor, and a bound on how many attestations (each reads `/proc` on a
/// blocking thread) run at once, so a burst of callers queues instead of
/// spawning hundreds of threads. Executable hashing happens outside it, on
/// the attestor's own bounded pool.
#[derive(Debug, Clone)]
pub struct Attesting {
    attestor: Arc<dyn WorkloadAttestor>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Attesting {
    /// Attestation with `attestor`, [`MAX_CONCURRENT_ATTESTATIONS`] at a time.
    pub fn new(attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self {
            attestor,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_ATTESTATIONS)),
        }
    }

    /// Runs `work` on a blocking thread, under a permit.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn WorkloadAttestor) -> Result<T, AttestError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let unavailable = |message: String| Refusal { code: "agent_unavailable", message };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unavailable("agent is shutting down".into()))?;
        let attestor = self.attestor.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(attestor.as_ref())
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(Refusal::from)
    }
}

/// The first bytes the agent sends to a connection it refuses at accept:
/// its HTTP/2 SETTINGS (empty) and a GOAWAY (ENHANCE_YOUR_CALM, no stream
/// processed) whose debug data says why. Nothing the client sent is read.
fn goaway_frames(why: &str) -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let debug = &why.as_bytes()[..why.len().min(1024)];
    let mut out = Vec::with_capacity(9 + 9 + 8 + debug.len());
    let mut frame = |kind: u8, payload: &[u8]| {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
    };
    frame(SETTINGS, &[]);
    let mut goaway = Vec::with_capacity(8 + debug.len());
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream ID
    goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    goaway.extend_from_slice(debug);
    frame(GOAWAY, &goaway);
    out
}

/// Accepts connections, closes those past their uid's connection limit at
/// once (before reading anything from them), and attests each of the others
/// (pinning its process, recording its executable) before its first request
/// is read. Attestation runs in a task per connection, so one slow peer
/// does not hold up the accept loop.
pub fn incoming(
    listener: UnixListener,
    limits: WorkloadLimits,
    attesting: Attesting,
    events: Arc<EventSpool>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<WorkloadConn>> {
    let connections = PerUid::default();
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "Workload API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let cred = match stream.peer_cred() {
                Ok(cred) => cred,
                Err(e) => {
                    warn!(error = %e, "cannot read Workload API peer credentials; closing");
                    continue;
                }
            };
            let Some(slot) = connections.try_take(cred.uid(), limits.connections_per_uid) else {
                let why = format!(
                    "too many Workload API connections for uid {} (limit {}); close some and retry",
                    cred.uid(),
                    limits.connections_per_uid
                );
                let _ = stream.try_write(&goaway_frames(&why));
                drop(stream);
                let caller = Workload {
                    pid: cred.pid().unwrap_or(0),
                    uid: cred.uid(),
                    gid: cred.gid(),
                    ..Default::default()
                };
                events.emit(
                    schema::denied(kind::WORKLOAD_REFUSED, why)
                        .code("connection_limit")
                        .workload(caller)
                        .attr("refusal", "connection_limit")
                        .attr("limit", limits.connections_per_uid),
                );
                continue;
            };
            let attesting = attesting.clone();
            let tx = tx.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let result = attesting
                    .run(move |attestor| {
                        let process = PeerProcess::of_socket(&stream)?;
                        let attested = attestor.attest(&process);
                        Ok((stream, process, attested))
                    })
                    .await;
                let (stream, process, attested) = match result {
                    Ok((stream, process, attested)) => {
                        (stream, process, attested.map_err(Refusal::from))
                    }
                    Err(refusal) => {
                        // Not pinned (it exited already, or, without
                        // SO_PEERPIDFD, its PID now names another process):
                        // nothing to answer; closed.
                        debug!(code = refusal.code, error = %refusal.message, "Workload API peer could not be pinned; closing");
                        let caller = Workload {
                            pid: cred.pid().unwrap_or(0),
                            uid: cred.uid(),
                            gid: cred.gid(),
                            ..Default::default()
                        };
                        events.emit(
                            schema::denied(
                                kind::WORKLOAD_REFUSED,
                                format!("caller could not be pinned: {}", refusal.message),
                            )
                            .code(refusal.code)
                            .workload(caller)
                            .attr("refusal", refusal.code),
                        );
                        return;
                    }
                };
                let peer = WorkloadPeer(Arc::new(Connection {
                    process: Arc::new(process),
                    attested,
                    closing: Closing::default(),
                }));
                let _ = tx
                    .send(Ok(WorkloadConn {
                        stream: RewriteAuthority::new(stream),
                        peer,
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds the Workload API socket with mode 0777 (anyone may ask;
/// attestation decides). Directories missing on the way are created with
/// mode 0755 so every local uid can reach the socket; a directory that
/// already exists keeps its mode (the agent never changes what it did not
/// create), but one that another non-root user owns is refused, since its
/// owner could replace the socket. A stale socket file is replaced; a
/// socket another agent serves, or a file that is not a socket, is not.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        let mut missing = Vec::new();
        let mut existing = dir;
        while !existing.as_os_str().is_empty() && !existing.exists() {
            missing.push(existing);
            existing = existing.parent().unwrap_or(Path::new(""));
        }
        for created in missing.into_iter().rev() {
            match std::fs::DirBuilder::new().mode(0o755).create(created) {
                Ok(()) => {
                    // The umask may have narrowed the mode given to mkdir.
                    std::fs::set_permissions(created, std::fs::Permissions::from_mode(0o755))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {} // created meanwhile
                Err(e) => return Err(e),
            }
        }
        // Checked after creating: a directory someone else made first counts.
        if let Ok(meta) = std::fs::metadata(dir) {
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me && meta.uid() != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "socket directory {} is owned by uid {}, not by the agent (uid {me}) or root; \
                         its owner could replace the socket",
                        dir.display(),
                        meta.uid()
                    ),
                ));
            }
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another agent is serving this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    cache: Cache,
    jwt: Arc<JwtSvids>,
    trust_domain: TrustDomain,
    shutdown: CancellationToken,
    /// Checks, before each call, that the caller still runs what it was
    /// attested as (shares the accept path's bound on /proc readers).
    attesting: Attesting,
    limits: WorkloadLimits,
    streams: PerUid,
    events: Arc<EventSpool>,
    metrics: AgentMetrics,
}

/// Attestations running at once.
pub const MAX_CONCURRENT_ATTESTATIONS: usize = 8;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

fn peer_of<T>(request: &Request<T>) -> Option<WorkloadPeer> {
    request.extensions().get::<WorkloadPeer>().cloned()
}

/// An attested caller of one call.
struct Caller {
    /// Its connection.
    conn: WorkloadPeer,
    /// Its process.
    peer: Arc<PeerProcess>,
    /// Its selectors, from the connection's attestation.
    selectors: Vec<Selector>,
    /// Counts the call against its uid's stream limit until dropped.
    slot: UidSlot,
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
        }
    }

    /// Records a Workload API decision: the event, and the request metric.
    fn record(&self, method: &str, mut e: Event) {
        self.metrics.request(method, if e.decision == schema::DENY { "refused" } else { "ok" });
        e = e.attr("method", method);
        self.events.emit(e);
    }

    /// Records a refusal of `method` for `peer` (selectors as far as known) and returns `status`.
    fn refuse(
        &self,
        method: &str,
        kind: &str,
        peer: Option<(&PeerProcess, &[Selector])>,
        status: Status,
    ) -> Status {
        self.refuse_because(method, kind, peer, status, None)
    }

    /// [`Self::refuse`], with a stable code for the refusal (attr `refusal`).
    fn refuse_because(
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
    async fn verify(&self, method: &str, conn: &WorkloadPeer) -> Result<(), Status> {
        let connection = conn.0.clone();
        let result = self
            .attesting
            .run(move |attestor| match &connection.attested {
                Ok(attestation) => attestor.verify(&connection.process, attestation),
                Err(_) => Ok(()),
            })
            .await;
        let Err(refusal) = result else { return Ok(()) };
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

    fn check_header<T>(&self, method: &str, request: &Request<T>) -> Result<(), Status> {
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
    async fn caller<T>(&self, op: &str, request: &Request<T>) -> Result<Caller, Status> {
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
        self.verify(op, &conn).await?;
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

    fn bundle_bytes(&self, state: &CacheState) -> Vec<u8> {
        state.bundle.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
    }

    fn x509_response(&self, state: &CacheState, svids: &[Arc<CachedSvid>]) -> pb::X509svidResponse {
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
type Fingerprint =
    (Vec<(String, String)>, Arc<Vec<rustls_pki_types::CertificateDer<'static>>>, Arc<Vec<Vec<u8>>>);

fn fingerprint(state: &CacheState, svids: &[Arc<CachedSvid>]) -> Fingerprint {
    (
        svids.iter().map(|s| (s.entry_id.clone(), s.serial.clone())).collect(),
        state.bundle.clone(),
        state.crls.clone(),
    )
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = Stream_<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let Caller { conn, peer, selectors, slot } = self.caller("FetchX509SVID", &request).await?;
        let mut updates = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_WAIT;
        // Wait (briefly) for the first sync and for SVIDs still being signed.
        let (state, svids) = loop {
            let state = updates.borrow_and_update().clone();
            let now = now();
            let svids = state.svids_for(&selectors, now);
            if !svids.is_empty() || (state.ready && !state.has_entries_for(&selectors, now)) {
                break (state, svids);
            }
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                break (state, svids);
            }
        };
        const METHOD: &str = "FetchX509SVID";
        if svids.is_empty() {
            let caller = Some((peer.as_ref(), selectors.as_slice()));
            if !state.ready {
                return Err(self.refuse(
                    METHOD,
                    kind::WORKLOAD_X509,
                    caller,
                    Status::unavailable("agent has not synced with the server yet; retry"),
                ));
            }
            if state.has_entries_for(&selectors, now()) {
                // Entitled, but the SVID could not be signed yet (the server
                // may be unreachable): a retryable answer, not a denial.
                return Err(self.refuse(
                    METHOD,
                    kind::WORKLOAD_X509,
                    caller,
                    Status::unavailable("identity not issued yet; retry"),
                ));
            }
            return Err(self.refuse(
                METHOD,
                kind::WORKLOAD_X509,
                caller,
                Status::permission_denied("no identity issued"),
            ));
        }
        let mut served = schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .workload(workload_of(&peer, &selectors));
        for svid in &svids {
            served = served.spiffe_id(svid.spiffe_id.to_string()).entry(svid.entry_id.clone());
        }
        served.serial = svids.iter().map(|s| s.serial.as_str()).collect::<Vec<_>>().join(",");
        self.record(METHOD, served);
        debug!(pid = ?peer.pid, uid = peer.uid, svids = svids.len(), "X509-SVIDs served");
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = fingerprint(&state, &svids);
            if tx.send(Ok(service.x509_response(&state, &svids))).await.is_err() {
                return;
            }
            let mut defer_until: Option<tokio::time::Instant> = None;
            loop {
                // Wake for cache changes, and for an SVID expiring on its own.
                let next_expiry = updates
                    .borrow()
                    .svids_for(&selectors, now())
                    .iter()
                    .map(|s| s.expires_at)
                    .min();
                let mut wait = next_expiry.map_or(Duration::from_secs(3600), |at| {
                    Duration::from_secs((at - now()).max(0) as u64 + 1)
                });
                if let Some(until) = defer_until {
                    wait = wait.min(until.saturating_duration_since(tokio::time::Instant::now()));
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = service.shutdown.cancelled() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(wait) => {}
                }
                let state = updates.borrow_and_update().clone();
                let now = now();
                let svids = state.svids_for(&selectors, now);
                if svids.is_empty() {
                    if state.has_entries_for(&selectors, now) {
                        continue; // being re-signed: the next change brings it
                    }
                    let status = service.refuse(
                        METHOD,
                        kind::WORKLOAD_X509,
                        Some((&peer, &selectors)),
                        Status::permission_denied("no identity issued"),
                    );
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                // An SVID being replaced (revoked, or its entry changed) is
                // missing for the moment its successor is signed: wait for
                // it (briefly) rather than announce the identity's withdrawal.
                let replacing = last.0.iter().any(|(entry_id, _)| {
                    !svids.iter().any(|s| &s.entry_id == entry_id)
                        && state.entries.get(entry_id).is_some_and(|e| {
                            Selector::all_present(&e.selectors, &selectors)
                                && (e.expires_at == 0 || e.expires_at > now)
                        })
                });
                if replacing {
                    let until = *defer_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + REPLACEMENT_WAIT);
                    if tokio::time::Instant::now() < until {
                        continue;
                    }
                }
                defer_until = None;
                let current = fingerprint(&state, &svids);
                if current != last {
                    // Only to the program the connection was attested as.
                    if let Err(status) = service.verify(METHOD, &conn).await {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    last = current;
                    if tx.send(Ok(service.x509_response(&state, &svids))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchX509BundlesStream = Stream_<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let Caller { peer, selectors, slot, .. } =
            self.caller("FetchX509Bundles", &request).await?;
        self.record(
            "FetchX509Bundles",
            schema::event(kind::WORKLOAD_BUNDLE, schema::ALLOW)
                .workload(workload_of(&peer, &selectors)),
        );
        let stream = self
            .bundle_stream(
                slot,
                "agent has no trust bundle yet",
                |state| {
                    (!state.bundle.is_empty()).then(|| (state.bundle.clone(), state.crls.clone()))
                },
                |service, state| {
                    let mut bundles = HashMap::new();
                    bundles.insert(service.trust_domain.id_string(), service.bundle_bytes(state));
                    pb::X509BundlesResponse { crl: state.crls.as_ref().clone(), bundles }
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let Caller { peer, selectors, slot: _slot, .. } =
            self.caller("FetchJWTSVID", &request).await?;
        const METHOD: &str = "FetchJWTSVID";
        let req = request.into_inner();
        let refuse = |status: Status| {
            let mut e = schema::refused(kind::WORKLOAD_JWT, &status)
                .workload(workload_of(&peer, &selectors));
            e.audience = req.audience.clone();
            if !req.spiffe_id.is_empty() {
                e.spiffe_ids.push(req.spiffe_id.clone());
            }
            self.record(METHOD, e);
            status
        };
        let audience = requested_audience(&req.audience).map_err(refuse)?;
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            id => Some(SpiffeId::parse(id).map_err(|e| {
                refuse(Status::invalid_argument(format!(
                    "invalid spiffe_id {:?}: {e}",
                    shortened(id)
                )))
            })?),
        };
        let state = self.ready_state().await.map_err(refuse)?;
        let mut entries = state.entries_for(&selectors, now());
        if let Some(wanted) = &wanted {
            entries.retain(|e| &e.spiffe_id == wanted);
        }
        // One token per identity: the first entry (in a stable order) of each.
        entries.dedup_by(|b, a| a.spiffe_id == b.spiffe_id);
        if entries.is_empty() {
            return Err(refuse(Status::permission_denied("no identity issued")));
        }
        // The entries' audience policy, enforced here and again by the server.
        let mut denied = Vec::new();
        entries.retain(|e| match audience.iter().find(|a| !e.allows_audience(a)) {
            None => true,
            Some(a) => {
                denied.push(format!("{} may not get JWT-SVIDs for audience {a:?}", e.spiffe_id));
                false
            }
        });
        if entries.is_empty() {
            return Err(refuse(Status::permission_denied(format!(
                "audience not allowed: {}",
                denied.join("; ")
            ))));
        }
        for why in &denied {
            // Some of the caller's identities were left out for their audience policy.
            warn!(target: "tessera::audit", pid = ?peer.pid, uid = peer.uid, audience = ?audience, reason = %why, "JWT-SVID identity left out by audience policy");
        }
        let tokens = self.jwt.fetch(&entries, &audience, peer.uid).await.map_err(refuse)?;
        let mut served = schema::event(kind::WORKLOAD_JWT, schema::ALLOW)
            .workload(workload_of(&peer, &selectors));
        for (entry, token) in entries.iter().zip(&tokens) {
            served = served.spiffe_id(entry.spiffe_id.to_string()).entry(entry.id.clone());
            if !served.jti.is_empty() {
                served.jti.push(',');
            }
            served.jti.push_str(&token.jti);
        }
        served.audience = audience.clone();
        self.record(METHOD, served);
        debug!(pid = ?peer.pid, uid = peer.uid, jtis = ?tokens.iter().map(|t| t.jti.as_str()).collect::<Vec<_>>(), "JWT-SVIDs served");
        let svids = entries
            .iter()
            .zip(tokens)
            .map(|(e, t)| pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: t.token,
                hint: e.hint.clone(),
            })
            .collect();
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = Stream_<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let Caller { peer, selectors, slot, .. } = self.caller("FetchJWTBundles", &request).await?;
        self.record(
            "FetchJWTBundles",
            schema::event(kind::WORKLOAD_BUNDLE, schema::ALLOW)
                .workload(workload_of(&peer, &selectors)),
        );
        let stream = self
            .bundle_stream(
                slot,
                "agent has no JWT bundle yet",
                |state| state.jwt_bundle.clone(),
                |service, state| {
                    let mut bundles = HashMap::new();
                    if let Some(bundle) = &state.jwt_bundle {
                        bundles.insert(service.trust_domain.id_string(), bundle.to_jwks());
                    }
                    pb::JwtBundlesResponse { bundles }
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        // Anyone local may validate a token: no attestation, but the
        // header and the caller's connection limit apply.
        const METHOD: &str = "ValidateJWTSVID";
        self.check_header(METHOD, &request)?;
        let peer = peer_of(&request);
        let req = request.into_inner();
        let caller = peer.as_ref().map(|p| workload_of(&p.0.process, &[]));
        let refuse = |reason: String| {
            let mut e = schema::denied(kind::WORKLOAD_VALIDATE, reason.clone())
                .code(schema::grpc_code(tonic::Code::InvalidArgument));
            e.workload = caller.clone();
            e.audience = vec![req.audience.clone()];
            self.record(METHOD, e);
            Status::invalid_argument(reason)
        };
        if req.audience.is_empty() {
            return Err(refuse("audience must be specified".into()));
        }
        if req.svid.is_empty() {
            return Err(refuse("svid must be specified".into()));
        }
        let state = self.cache.state();
        let Some(bundle) = state.jwt_bundle.clone() else {
            return Err(Status::unavailable("agent has no JWT bundle yet; retry"));
        };
        let valid = jwt::validate(&req.svid, &req.audience, &bundle, now())
            .map_err(|e| refuse(format!("invalid JWT-SVID: {e}")))?;
        if let Some(jti) = &valid.jti {
            if self.jwt.is_revoked(jti) {
                return Err(refuse(format!("JWT-SVID {jti} has been revoked")));
            }
        }
        let mut e = schema::event(kind::WORKLOAD_VALIDATE, schema::ALLOW)
            .spiffe_id(valid.spiffe_id.to_string());
        e.workload = caller.clone();
        e.audience = vec![req.audience.clone()];
        e.jti = valid.jti.clone().unwrap_or_default();
        self.record(METHOD, e);
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(to_struct(valid.claims)),
        }))
    }
}

impl WorkloadService {
    /// A bundle stream: waits (briefly) until `key` has a value, sends
    /// `message` then and again each time `key` changes (only then: every
    /// message carries the full state, and a repeat would look like an
    /// update to clients).
    async fn bundle_stream<K, M>(
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
    async fn ready_state(&self) -> Result<Arc<CacheState>, Status> {
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

/// The requested audiences, checked, sorted and deduplicated.
fn requested_audience(audience: &[String]) -> Result<Vec<String>, Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    let mut out: Vec<String> = audience.to_vec();
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_AUDIENCES} audiences per JWT-SVID"
        )));
    }
    if let Some(bad) = out.iter().find(|a| !jwt::valid_audience(a)) {
        return Err(Status::invalid_argument(format!(
            "invalid audience {:?}: want 1-256 printable characters, no spaces",
            shortened(bad)
        )));
    }
    Ok(out)
}

/// At most the first 64 characters of what a caller sent, for a refusal
/// message (which travels back in a header and into the event stream).
fn shortened(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// JSON claims as a `google.protobuf.Struct`.
fn to_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: claims.into_iter().map(|(k, v)| (k, to_value(v))).collect() }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}
