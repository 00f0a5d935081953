//! A client for the server's node API: TLS to the server, which must present
//! `spiffe://<td>/tessera/server` chained to the trust bundle, with the
//! agent's X509-SVID as client certificate once it has one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::Refusal;
use tessera_workload_api::{
    error_chain, SpiffeId, SpiffeServerCertVerifier, TrustAnchors, TrustDomain,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{info, warn};

/// Largest gRPC message the agent accepts or sends (the rule both sides use).
pub use tessera_common::rules::MAX_MESSAGE_BYTES;
/// How long one server may take to accept a connection before the agent
/// tries the next.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a node API connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeClientError {
    /// The TLS configuration was refused (e.g. the client key is unusable).
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// The server address is not `host:port`.
    #[error("invalid server address {0:?}: want host:port")]
    Address(String),
    /// Connecting failed.
    #[error("cannot connect to server {address}: {message}")]
    Connect {
        /// The server address.
        address: String,
        /// Why.
        message: String,
    },
}

/// The agent's credentials for mTLS.
pub struct ClientIdentity {
    /// Agent X509-SVID chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

/// Builds the rustls client config for the node API.
pub fn node_tls_config(
    anchors: TrustAnchors,
    trust_domain: &TrustDomain,
    identity: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, NodeClientError> {
    let server_id = SpiffeId::from_parts(trust_domain, "/tessera/server")
        .map_err(|e| NodeClientError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier =
        SpiffeServerCertVerifier::new(anchors, Arc::new(move |id: &SpiffeId| *id == server_id));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.chain, identity.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Where a connection records the refusal a TLS alert from the server
/// carried (see [`alert_refusal`]); shared by the connections of one agent.
#[derive(Debug, Clone, Default)]
pub struct AlertSlot(Arc<Mutex<Option<Refusal>>>);

impl AlertSlot {
    /// The refusal seen since the last `take`, if any.
    pub fn take(&self) -> Option<Refusal> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn set(&self, refusal: Refusal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
    }
}

/// The refusal a TLS alert received from the server means. The node API
/// checks client certificates against its CRLs in the handshake, and
/// rustls answers a revoked one with the `certificate_revoked` alert. Only
/// an alert read after this side's handshake completed is the server's
/// word (protected by keys the server's certificate authenticated); one
/// read during the handshake may come from anyone on the path (a
/// plaintext alert in place of the ServerHello), so callers look at
/// alerts on established connections only ([`Watched`]). Found by type,
/// never by message text.
pub fn alert_refusal(e: &io::Error) -> Option<Refusal> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked) => {
            Some(Refusal::Revoked)
        }
        _ => None,
    }
}

/// An established TLS stream (its handshake completed, so the server was
/// authenticated) that records in its [`AlertSlot`] the refusal of any
/// alert it reads. HTTP/2 turns I/O errors into text before a call sees
/// them, so the typed alert is taken here, where the error is still an
/// `io::Error`. With TLS 1.3 the server's `certificate_revoked` answer to
/// the agent's certificate arrives here, after the client's handshake.
struct Watched<S> {
    inner: S,
    alerts: AlertSlot,
}

impl<S> Watched<S> {
    fn note<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            if let Some(refusal) = alert_refusal(e) {
                self.alerts.set(refusal);
            }
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects to the node API at `address` (`host:port`).
pub async fn connect_node(
    address: &str,
    tls: rustls::ClientConfig,
) -> Result<NodeClient<Channel>, NodeClientError> {
    connect_node_watched(address, tls, AlertSlot::default()).await
}

/// Connects to the node API at `address`, recording the refusal of any TLS
/// alert the server sends on this connection, once established, in
/// `alerts`.
pub async fn connect_node_watched(
    address: &str,
    tls: rustls::ClientConfig,
    alerts: AlertSlot,
) -> Result<NodeClient<Channel>, NodeClientError> {
    if !address.contains(':') {
        return Err(NodeClientError::Address(address.to_string()));
    }
    let connector = TlsConnector::from(Arc::new(tls));
    let target = address.to_string();
    // The URI is required by the API but unused: the connector dials `address`
    // and the server is authenticated by SPIFFE ID, not by host name.
    let endpoint = Endpoint::from_static("http://tessera-server.invalid");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let target = target.clone();
            let alerts = alerts.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("tessera-server").map_err(std::io::Error::other)?;
                // An alert during the handshake is not recorded: the server
                // is not authenticated yet, so anyone on the path can send it.
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(Watched { inner: tls, alerts }))
            }
        }))
        .await
        .map_err(|e| NodeClientError::Connect {
            address: address.to_string(),
            message: error_chain(&e),
        })?;
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The servers an agent may use and the one it is on: it holds one
/// connection at a time, starting at a server picked by a hash of its
/// identity (so a fleet spreads over the servers) and moving on round the
/// ring when a server cannot be reached or fails a call.
#[derive(Debug)]
pub struct Servers {
    addresses: Vec<String>,
    /// Index in the resolved ring to try first.
    next: AtomicUsize,
    /// The server of the last connection, for the log.
    current: Mutex<Option<String>>,
}

impl Servers {
    /// The servers at `addresses` (`host:port` each), starting at the one
    /// `seed` (the agent's identity) hashes to.
    pub fn new(addresses: Vec<String>, seed: &str) -> Self {
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let hash = seed.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self { addresses, next: AtomicUsize::new(hash as usize), current: Mutex::new(None) }
    }

    /// Every server, resolved now: a name with several addresses is
    /// several servers. Each with the label the log shows.
    async fn resolve(&self) -> Result<Vec<(String, SocketAddr)>, NodeClientError> {
        let mut ring = Vec::new();
        let mut problems = Vec::new();
        for address in &self.addresses {
            if !address.contains(':') {
                return Err(NodeClientError::Address(address.clone()));
            }
            match tokio::net::lookup_host(address.as_str()).await {
                Ok(found) => {
                    let mut found: Vec<SocketAddr> = found.collect();
                    found.sort();
                    found.dedup();
                    for addr in found {
                        let label = if addr.to_string() == *address {
                            address.clone()
                        } else {
                            format!("{address} ({addr})")
                        };
                        ring.push((label, addr));
                    }
                }
                Err(e) => problems.push(format!("cannot resolve {address}: {e}")),
            }
        }
        if ring.is_empty() {
            return Err(NodeClientError::Connect {
                address: self.addresses.join(","),
                message: problems.join("; "),
            });
        }
        for problem in problems {
            warn!(problem = %problem, "server address skipped");
        }
        Ok(ring)
    }

    /// Connects to the first server, round the ring from the current one,
    /// that answers; returns the client and the server's label.
    pub async fn connect(
        &self,
        tls: &rustls::ClientConfig,
    ) -> Result<(NodeClient<Channel>, String), NodeClientError> {
        self.connect_watched(tls, &AlertSlot::default()).await
    }

    /// [`Servers::connect`], recording the refusal of any TLS alert a
    /// server sends in `alerts`.
    pub async fn connect_watched(
        &self,
        tls: &rustls::ClientConfig,
        alerts: &AlertSlot,
    ) -> Result<(NodeClient<Channel>, String), NodeClientError> {
        let ring = self.resolve().await?;
        let start = self.next.load(Ordering::Relaxed) % ring.len();
        let mut failures = Vec::new();
        for step in 0..ring.len() {
            let index = (start + step) % ring.len();
            let (label, addr) = &ring[index];
            let target = addr.to_string();
            let attempt = connect_node_watched(&target, tls.clone(), alerts.clone());
            let problem = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(client)) => {
                    self.next.store(index, Ordering::Relaxed);
                    let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                    if current.as_deref() != Some(label) {
                        info!(server = %label, servers = ring.len(), "connected to server");
                        *current = Some(label.clone());
                    }
                    return Ok((client, label.clone()));
                }
                // The reason only: the address is said once, below.
                Ok(Err(NodeClientError::Connect { message, .. })) => message,
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    format!("no answer in {}s", CONNECT_TIMEOUT.as_secs())
                }
            };
            if ring.len() > 1 {
                warn!(server = %label, error = %problem, "server unreachable; trying the next");
                failures.push(format!("{label}: {problem}"));
            } else {
                failures.push(problem);
            }
        }
        Err(NodeClientError::Connect {
            address: self.addresses.join(","),
            message: failures.join("; "),
        })
    }

    /// Which of `servers` (the resolved ring's length) the next connection
    /// tries first.
    pub fn starts_at(&self, servers: usize) -> usize {
        self.next.load(Ordering::Relaxed) % servers.max(1)
    }

    /// The server of the last connection.
    pub fn current(&self) -> Option<String> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a failure on the current server: the next connection tries
    /// the next server first.
    pub fn fail_over(&self) {
        self.next.fetch_add(1, Ordering::Relaxed);
    }
}
