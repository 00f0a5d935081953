//! The node API's TLS: a server X509-SVID (`spiffe://<td>/tessera/server`)
//! re-issued before it expires, optional client certificates (agents present
//! their agent SVID; attestation comes without one), and an accept loop that
//! hands tonic connections carrying the peer's certificates.
//!
//! # Unauthenticated load
//!
//! Anyone who can reach the port can open connections, so what a peer
//! without a verified certificate can hold is bounded here, before gRPC:
//!
//! - The accept loop never waits: it takes a connection slot (or closes the
//!   socket at once when over a cap, counted in
//!   `tessera_server_node_connections_refused` and logged at most once per
//!   [`REFUSAL_LOG_INTERVAL`]) and hands the handshake to its own task,
//!   which gives up after [`NodeLimits::handshake_timeout`].
//! - Caps: [`NodeLimits::max_connections`] in total, and for connections
//!   that are not authenticated (handshake in progress, or finished without
//!   a client certificate) [`NodeLimits::max_unauthenticated`] in total and
//!   [`NodeLimits::max_unauthenticated_per_ip`] per source address. A
//!   connection that presents a verified agent SVID leaves the
//!   unauthenticated counts (agents behind one NAT are not capped per IP:
//!   they are accountable, and can be banned).
//! - Finished connections go to one of two gRPC servers ([`Incoming`]): the
//!   authenticated one with the usual HTTP/2 limits, the certless one with
//!   one stream at a time, 16 KiB flow-control windows and frames, an
//!   8 KiB header list and a 16 KiB message limit (an Attest request, CSR
//!   included, is well under 8 KiB), and a maximum age. The memory
//!   unauthenticated peers can make the server hold is therefore at most
//!   `max_unauthenticated` × (TLS buffers + one window + one message):
//!   about 1,024 × 100 KiB ≈ 100 MiB with the defaults, however they send.
//! - Idle connections are closed: a certless one after
//!   [`NodeLimits::unauthenticated_idle`] without an open request, an
//!   authenticated one after [`NodeLimits::authenticated_idle`] without an
//!   open stream. An agent's Sync stream is an open stream, so it is never
//!   cut for being quiet. [`Activity`] counts a connection's open streams.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_workload_api::{SpiffeClientCertVerifier, SpiffeId, TrustAnchors, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::ca::{Ca, CaError};
use crate::metrics::Metrics;

/// How long a TLS handshake on the node API may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections on the node API at once, by default (lowered to fit the
/// process's file descriptor limit); a setting of the config file.
pub const MAX_CONNECTIONS: usize = crate::config::DEFAULT_NODE_MAX_CONNECTIONS;

/// Unauthenticated connections (handshaking or certless) at once.
pub const MAX_UNAUTHENTICATED: usize = 1_024;

/// Unauthenticated connections from one source address at once, by
/// default; a setting of the config file.
pub const MAX_UNAUTHENTICATED_PER_IP: usize =
    crate::config::DEFAULT_NODE_MAX_UNAUTHENTICATED_PER_IP;

/// A certless connection without an open request is closed after this.
pub const UNAUTHENTICATED_IDLE: Duration = Duration::from_secs(5);

/// An authenticated connection without an open stream is closed after this.
pub const AUTHENTICATED_IDLE: Duration = Duration::from_secs(300);

/// Connections refused over a cap are logged at most once per interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// File descriptors kept free for the store, the admin socket and logs when
/// the connection cap is fitted to the descriptor limit.
const RESERVED_FDS: u64 = 256;

/// Lifetime of the server's own SVID, seconds.
pub const SERVER_SVID_TTL: u32 = 3600;

/// The server's current TLS certificate, swapped without blocking handshakes.
pub struct ServerSvid {
    current: RwLock<(Arc<CertifiedKey>, i64)>,
    spiffe_id: SpiffeId,
}

impl fmt::Debug for ServerSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSvid").field("spiffe_id", &self.spiffe_id).finish_non_exhaustive()
    }
}

impl ServerSvid {
    /// Issues the first server SVID from `ca`.
    pub fn issue(ca: &Ca, trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let spiffe_id = SpiffeId::from_parts(trust_domain, "/tessera/server")
            .map_err(|e| CaError::Corrupt { path: "server id".into(), reason: e.to_string() })?;
        let current = issue_certified_key(ca, &spiffe_id)?;
        Ok(Self { current: RwLock::new(current), spiffe_id })
    }

    /// Re-issues the SVID (after half its life, or when the CA changed).
    pub fn renew(&self, ca: &Ca) -> Result<(), CaError> {
        let next = issue_certified_key(ca, &self.spiffe_id)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Unix seconds at which the current SVID expires.
    pub fn expires_at(&self) -> i64 {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1
    }
}

impl ResolvesServerCert for ServerSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }
}

fn issue_certified_key(ca: &Ca, id: &SpiffeId) -> Result<(Arc<CertifiedKey>, i64), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let svid = ca.sign_svid(&key, id, SERVER_SVID_TTL, &[])?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der)
        .map_err(|e| CaError::Corrupt { path: "server key".into(), reason: e.to_string() })?;
    Ok((
        Arc::new(CertifiedKey::new(vec![CertificateDer::from(svid.leaf)], signing)),
        svid.expires_at,
    ))
}

/// Builds the node API's rustls config: client certificates are optional
/// and, when presented, must chain to the bundle and name an ID in the
/// trust domain.
pub fn server_config(
    svid: Arc<ServerSvid>,
    anchors: TrustAnchors,
    trust_domain: TrustDomain,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeClientCertVerifier::new(
        anchors,
        Arc::new(move |id: &SpiffeId| id.trust_domain() == &trust_domain),
        false,
    );
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(svid);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session would skip the certificate
    // and CRL checks, and the agent's SVID may have been revoked since.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The node API's connection limits (see the module doc).
#[derive(Debug, Clone)]
pub struct NodeLimits {
    /// Connections at once, authenticated or not.
    pub max_connections: usize,
    /// Unauthenticated connections at once.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one source address at once.
    pub max_unauthenticated_per_ip: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// A certless connection with no open request is closed after this.
    pub unauthenticated_idle: Duration,
    /// An authenticated connection with no open stream is closed after this.
    pub authenticated_idle: Duration,
}

impl Default for NodeLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            max_unauthenticated_per_ip: MAX_UNAUTHENTICATED_PER_IP,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            unauthenticated_idle: UNAUTHENTICATED_IDLE,
            authenticated_idle: AUTHENTICATED_IDLE,
        }
    }
}

impl NodeLimits {
    /// The limits with the connection cap lowered to fit the process's
    /// file descriptor limit: at that limit accept itself fails, for
    /// agents too.
    pub fn fitted_to_fd_limit(mut self) -> Self {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        if let Some(fds) = limit {
            let room = usize::try_from(fds.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            if room < self.max_connections {
                warn!(
                    fd_limit = fds,
                    max_connections = room.max(1),
                    "node API connection cap lowered to fit the file descriptor limit"
                );
                self.max_connections = room.max(1);
            }
        }
        self.max_unauthenticated = self.max_unauthenticated.min(self.max_connections);
        self
    }
}

/// What a node API handler knows about its caller's connection.
#[derive(Debug, Clone)]
pub struct NodePeer {
    /// Remote address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain, if one was presented.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The connection's open streams, for its idle timeout.
    pub activity: Arc<Activity>,
}

/// Open streams of one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self { open: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) }
    }
}

impl Activity {
    /// A stream opens; it counts until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// When the connection becomes idle for good, if it has no open stream.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + timeout)
    }
}

/// One open stream of a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverCap {
    /// [`NodeLimits::max_connections`].
    Total,
    /// [`NodeLimits::max_unauthenticated`].
    Unauthenticated,
    /// [`NodeLimits::max_unauthenticated_per_ip`].
    PerIp,
}

impl OverCap {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Unauthenticated => "unauthenticated",
            Self::PerIp => "per_ip",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    unauthenticated: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The connection caps, shared by the accept loop and every connection.
#[derive(Debug)]
struct Gate {
    limits: NodeLimits,
    counts: Mutex<Counts>,
    metrics: Metrics,
    /// When refusals were last logged, and how many since.
    logged: Mutex<(Option<Instant>, u64)>,
}

impl Gate {
    /// Takes an unauthenticated slot for a connection from `ip`.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, OverCap> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let limits = &self.limits;
        if counts.total >= limits.max_connections {
            return Err(OverCap::Total);
        }
        if counts.unauthenticated >= limits.max_unauthenticated {
            return Err(OverCap::Unauthenticated);
        }
        let from_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= limits.max_unauthenticated_per_ip {
            return Err(OverCap::PerIp);
        }
        counts.total += 1;
        counts.unauthenticated += 1;
        counts.per_ip.insert(ip, from_ip + 1);
        self.metrics.node_connections(counts.unauthenticated, counts.total);
        Ok(Slot { gate: self.clone(), ip, unauthenticated: true })
    }

    /// Counts and (at most once per interval) logs a refused connection.
    fn refused(&self, why: OverCap, remote: SocketAddr) {
        self.metrics.node_connection_refused(why.label());
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        logged.1 += 1;
        let due = logged.0.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
        if due {
            warn!(
                %remote,
                cap = why.label(),
                refused = logged.1,
                "node API connections closed at accept: over a connection cap (logged at most every {}s)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
            *logged = (Some(Instant::now()), 0);
        }
    }

    fn release(&self, ip: IpAddr, unauthenticated: bool, total: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if unauthenticated {
            counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
            if let Some(n) = counts.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.per_ip.remove(&ip);
                }
            }
        }
        if total {
            counts.total = counts.total.saturating_sub(1);
        }
        self.metrics.node_connections(counts.unauthenticated, counts.total);
    }
}

/// A connection's place under the caps, given back when it is dropped.
#[derive(Debug)]
struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
    unauthenticated: bool,
}

impl Slot {
    /// The connection presented a verified certificate: it leaves the
    /// unauthenticated counts (and keeps its place in the total).
    fn authenticated(&mut self) {
        if self.unauthenticated {
            self.unauthenticated = false;
            self.gate.release(self.ip, true, false);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.release(self.ip, self.unauthenticated, true);
    }
}

/// Closes a connection once it has been idle for `timeout` (see
/// [`Activity`]): polled from the connection's reads, which the HTTP/2
/// server always has pending.
#[derive(Debug)]
struct IdleTimer {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    fn new(activity: Arc<Activity>, timeout: Duration) -> Self {
        let sleep = Box::pin(tokio::time::sleep(timeout));
        Self { activity, timeout, sleep }
    }

    /// Ready when the connection has been idle too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let next = match self.activity.idle_deadline(self.timeout) {
                None => now + self.timeout,
                Some(deadline) if deadline <= now => return Poll::Ready(()),
                Some(deadline) => deadline,
            };
            self.sleep.as_mut().reset(next.into());
        }
    }
}

/// An accepted TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: NodePeer,
    idle: IdleTimer,
    _slot: Slot,
}

impl Connected for TlsConn {
    type ConnectInfo = NodePeer;

    fn connect_info(&self) -> NodePeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.idle.poll_expired(cx).is_ready() {
            debug!(remote = ?this.peer.remote, "closing idle node API connection");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection")));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Finished TLS connections, by whether the peer presented a verified
/// client certificate: each kind goes to its own gRPC server.
#[derive(Debug)]
pub struct Incoming {
    /// Connections with a verified client certificate (agents).
    pub authenticated: ReceiverStream<io::Result<TlsConn>>,
    /// Connections without one (attestation).
    pub certless: ReceiverStream<io::Result<TlsConn>>,
}

/// Accepts TCP connections under the caps of `limits` and completes TLS
/// handshakes each in its own task (the loop never waits on one); yields
/// finished connections until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: NodeLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Incoming {
    let (authenticated_tx, authenticated) = mpsc::channel(128);
    let (certless_tx, certless) = mpsc::channel(128);
    let gate = Arc::new(Gate {
        limits,
        counts: Mutex::new(Counts::default()),
        metrics,
        logged: Mutex::new((None, 0)),
    });
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "node API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let slot = match gate.admit(remote.ip().to_canonical()) {
                Ok(slot) => slot,
                Err(why) => {
                    // Closed at once: dropping the socket.
                    drop(tcp);
                    gate.refused(why, remote);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let (authenticated_tx, certless_tx) = (authenticated_tx.clone(), certless_tx.clone());
            let limits = gate.limits.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                let mut slot = slot;
                let inner = match handshake.await {
                    Ok(Ok(inner)) => inner,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "node API TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "node API TLS handshake timed out");
                        return;
                    }
                };
                let certs = inner
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                let activity = Arc::new(Activity::default());
                let (tx, idle) = if certs.is_some() {
                    slot.authenticated();
                    (authenticated_tx, limits.authenticated_idle)
                } else {
                    (certless_tx, limits.unauthenticated_idle)
                };
                let peer = NodePeer { remote: Some(remote), certs, activity: activity.clone() };
                let conn =
                    TlsConn { inner, peer, idle: IdleTimer::new(activity, idle), _slot: slot };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    Incoming {
        authenticated: ReceiverStream::new(authenticated),
        certless: ReceiverStream::new(certless),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: NodeLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            counts: Mutex::new(Counts::default()),
            metrics: Metrics::new(),
            logged: Mutex::new((None, 0)),
        })
    }

    #[test]
    fn caps_count_unauthenticated_connections_per_address_and_all_in_total() {
        let gate = gate(NodeLimits {
            max_connections: 4,
            max_unauthenticated: 3,
            max_unauthenticated_per_ip: 2,
            ..NodeLimits::default()
        });
        let (a, b, c) =
            (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let mut a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), OverCap::PerIp);
        // An agent that authenticates leaves the unauthenticated counts.
        a1.authenticated();
        let b1 = gate.admit(b).unwrap();
        let _b2 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(c).unwrap_err(), OverCap::Total, "4 in all");
        drop(a1);
        assert_eq!(gate.admit(c).unwrap_err(), OverCap::Unauthenticated, "3 unauthenticated");
        drop(b1);
        assert!(gate.admit(c).is_ok(), "a closed connection gives its place back");
    }

    #[tokio::test]
    async fn an_open_stream_keeps_a_connection_from_idling_out() {
        let activity = Arc::new(Activity::default());
        let mut timer = IdleTimer::new(activity.clone(), Duration::from_millis(20));
        let stream = activity.begin();
        let expired = |timer: &mut IdleTimer| {
            let waker = std::task::Waker::noop();
            timer.poll_expired(&mut Context::from_waker(waker)).is_ready()
        };
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!expired(&mut timer), "a connection with an open stream idled out");
        }
        drop(stream);
        let idled_out = tokio::time::timeout(
            Duration::from_secs(30),
            std::future::poll_fn(|cx| timer.poll_expired(cx)),
        )
        .await;
        assert!(idled_out.is_ok(), "a connection without streams never idled out");
    }
}
