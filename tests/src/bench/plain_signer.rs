//! The plain signer: the node API's `SignX509` and `SignJWT` with nothing
//! behind them, in a child process of its own (`__plain_signer <data
//! dir>`). It loads the CA of a stopped server's data dir with the server's
//! own code (`Ca`), serves the same gRPC over TLS 1.3 with the same HTTP/2
//! limits, and signs each item off the async workers as the server does;
//! it reads no entries, checks nothing, records nothing and keeps no
//! events. What it reaches is what signing costs over this transport on
//! this machine: the ceiling of the server's issuance, below ring's limit
//! measured with nothing else running. Uses `children`.

use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_proto::node as pb;
use tessera_proto::node::node_server::{Node, NodeServer};
use tessera_proto::types::Status as ItemStatus;
use tessera_server::{Ca, CaPolicy, SystemClock, MAX_MESSAGE_BYTES};
use tessera_workload_api::{SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::{Request, Response, Status};

use crate::children::{until_stdin_closes, PLAIN_SIGNER};

/// Runs the plain signer if `args` name it, to its exit code.
pub async fn run_child(args: &[String]) -> Option<ExitCode> {
    if args.first().map(String::as_str) != Some(PLAIN_SIGNER) {
        return None;
    }
    Some(serve(Path::new(args.get(1)?)).await)
}

/// Serves on an ephemeral port of 127.0.0.1 (said on stdout as `READY
/// <addr>`) until stdin closes.
async fn serve(dir: &Path) -> ExitCode {
    let config = tessera_tests::test_config(dir);
    let policy = CaPolicy {
        ttl: config.ca_ttl,
        prepare_at: config.ca_prepare_at,
        activate_at: config.ca_activate_at,
        jwt_key_type: config.jwt_key_type,
        jwt_issuer: None,
    };
    let ca = Ca::load_or_create(dir, config.trust_domain.clone(), policy, Arc::new(SystemClock))
        .expect("the server's CA loads");
    let tls = tls_config(&ca, &config.trust_domain);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    println!("READY {}", listener.local_addr().expect("an address"));
    let subject = SpiffeId::parse("spiffe://example.org/plain").expect("a SPIFFE ID");
    let service = NodeServer::new(PlainSigner(Arc::new(Signer { ca, subject })))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (sender, accepted) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = sender.send(Ok::<_, std::io::Error>(Tls(tls))).await;
                }
            });
        }
    });
    // The node API's own settings for authenticated connections.
    tonic::transport::Server::builder()
        .max_frame_size(Some(64 * 1024))
        .http2_max_header_list_size(Some(64 * 1024))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(accepted),
            until_stdin_closes(),
        )
        .await
        .expect("serves");
    ExitCode::SUCCESS
}

/// TLS 1.3 with a certificate for the server's SPIFFE ID from `ca` (what
/// the agents' node API client checks); no client certificate asked for.
fn tls_config(ca: &Ca, trust_domain: &TrustDomain) -> rustls::ServerConfig {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
    let id = SpiffeId::from_parts(trust_domain, "/tessera/server").expect("the server's ID");
    let svid = ca.sign_svid(&key, &id, 3600, &[]).expect("the server's SVID");
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(svid.leaf)], der)
        .expect("the certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Signs whatever it is asked to, for one SPIFFE ID.
struct Signer {
    ca: Ca,
    subject: SpiffeId,
}

/// The node API's service: [`Signer`] shared with the blocking pool.
struct PlainSigner(Arc<Signer>);

fn ok() -> Option<ItemStatus> {
    Some(ItemStatus { code: 0, ..Default::default() })
}

fn failed(message: String) -> Option<ItemStatus> {
    Some(ItemStatus { code: tonic::Code::Internal as i32, message, ..Default::default() })
}

impl Signer {
    fn sign_x509_item(&self, item: pb::SignX509Item) -> pb::SignX509Result {
        let signed =
            tessera_server::parse_csr(&item.csr).map_err(|e| e.to_string()).and_then(|key| {
                self.ca.sign_svid(&key, &self.subject, 3600, &[]).map_err(|e| e.to_string())
            });
        match signed {
            Ok(svid) => pb::SignX509Result {
                entry_id: item.entry_id,
                status: ok(),
                x509_svid: vec![svid.leaf],
                expires_at: svid.expires_at,
                serial: svid.serial,
            },
            Err(e) => pb::SignX509Result {
                entry_id: item.entry_id,
                status: failed(e),
                ..Default::default()
            },
        }
    }

    fn sign_jwt_item(&self, item: pb::SignJwtItem) -> pb::SignJwtResult {
        match self.ca.sign_jwt(&self.subject, &item.audience, 300) {
            Ok((jwt, _)) => pb::SignJwtResult {
                entry_id: item.entry_id,
                status: ok(),
                token: jwt.token,
                expires_at: jwt.expires_at,
                jti: jwt.jti,
                issued_at: jwt.issued_at,
                spiffe_id: self.subject.to_string(),
            },
            Err(e) => pb::SignJwtResult {
                entry_id: item.entry_id,
                status: failed(e.to_string()),
                ..Default::default()
            },
        }
    }
}

/// Runs `sign` over `items` on the blocking pool, as the server signs.
async fn off_workers<I, R>(
    signer: &Arc<Signer>,
    items: Vec<I>,
    sign: fn(&Signer, I) -> R,
) -> Result<Vec<R>, Status>
where
    I: Send + 'static,
    R: Send + 'static,
{
    let signer = signer.clone();
    tokio::task::spawn_blocking(move || items.into_iter().map(|i| sign(&signer, i)).collect())
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

type NoStream = Pin<Box<dyn futures::Stream<Item = Result<pb::SyncMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Node for PlainSigner {
    async fn attest(
        &self,
        _: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        Err(Status::unimplemented("the plain signer only signs"))
    }

    async fn renew_agent(
        &self,
        _: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        Err(Status::unimplemented("the plain signer only signs"))
    }

    async fn sign_x509(
        &self,
        request: Request<pb::SignX509Request>,
    ) -> Result<Response<pb::SignX509Response>, Status> {
        let items = request.into_inner().items;
        let results = off_workers(&self.0, items, Signer::sign_x509_item).await?;
        Ok(Response::new(pb::SignX509Response { results }))
    }

    async fn sign_jwt(
        &self,
        request: Request<pb::SignJwtRequest>,
    ) -> Result<Response<pb::SignJwtResponse>, Status> {
        let items = request.into_inner().items;
        let results = off_workers(&self.0, items, Signer::sign_jwt_item).await?;
        Ok(Response::new(pb::SignJwtResponse { results }))
    }

    type SyncStream = NoStream;

    async fn sync(&self, _: Request<pb::SyncRequest>) -> Result<Response<NoStream>, Status> {
        Err(Status::unimplemented("the plain signer only signs"))
    }

    async fn push_events(
        &self,
        _: Request<pb::PushEventsRequest>,
    ) -> Result<Response<pb::PushEventsResponse>, Status> {
        Err(Status::unimplemented("the plain signer only signs"))
    }
}

/// A TLS connection as tonic serves it.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for Tls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
