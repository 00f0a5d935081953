//! The node API's TLS: a server X509-SVID (`spiffe://<td>/tessera/server`)
//! re-issued before it expires, optional client certificates (agents present
//! their agent SVID; attestation comes without one), and an accept loop that
//! hands tonic connections carrying the peer's certificates.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

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

/// TLS handshakes in progress at once on the node API.
pub const MAX_HANDSHAKES: usize = 256;

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
    Ok((Arc::new(CertifiedKey::new(svid.chain, signing)), svid.expires_at))
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

/// What a node API handler knows about its caller's connection.
#[derive(Debug, Clone)]
pub struct NodePeer {
    /// Remote address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain, if one was presented.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// An accepted TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: NodePeer,
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
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
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

/// Accepts TCP connections and completes TLS handshakes concurrently (a
/// slow client cannot hold up others); yields finished connections until
/// `shutdown`.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(128);
    // Unauthenticated handshakes in flight are bounded: a flood of slow
    // clients waits here instead of growing memory.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
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
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                let handshake = handshake.await;
                drop(permit);
                match handshake {
                    Ok(Ok(inner)) => {
                        let certs =
                            inner.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        let peer = NodePeer { remote: Some(remote), certs };
                        let _ = tx.send(Ok(TlsConn { inner, peer })).await;
                    }
                    Ok(Err(e)) => warn!(%remote, error = %e, "node API TLS handshake refused"),
                    Err(_) => debug!(%remote, "node API TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
