//! The broker's HTTPS listener: TLS by tokio-rustls (the server's own
//! X509-SVID, or an operator certificate for clients outside the trust
//! domain; client X509-SVIDs optional and verified against the trust
//! bundle), HTTP/1.1 by hyper, routes by axum. Every connection is
//! bounded before anyone is authenticated: a cap on connections, a
//! handshake deadline, a header deadline, and a body limit.
//!
//! Routes: `POST /token`, `POST /introspect`, `POST /task` (a sub-task), `GET /jwks`,
//! `GET /.well-known/oauth-authorization-server` (RFC 8414),
//! `GET /.well-known/openid-configuration`, and with `jwt_svid_path` set,
//! `GET <path>/.well-known/openid-configuration` and `GET <path>/jwks` for
//! the trust domain's JWT-SVIDs.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http_body_util::BodyExt;
use rustls::server::ResolvesServerCert;
use serde_json::{json, Value};
use tessera_common::event_schema::EventExt;
use tessera_workload_api::{SpiffeClientCertVerifier, SpiffeId, TrustAnchors};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::authn::PeerSvid;
use super::error::BrokerError;
use super::exchange::Refused;
use super::form::{Form, ASSERTION_JWT_SPIFFE, GRANT_TOKEN_EXCHANGE, MAX_BODY};
use super::Broker;

/// Connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// An oversized body is read and dropped up to this many bytes (so that
/// the client hears the 413), and refused at once when it declares more.
pub const DRAIN_LIMIT: usize = 1024 * 1024;

/// The peer's certificate, as the handlers see it.
#[derive(Debug, Clone, Default)]
struct Peer(Option<PeerSvid>);

/// Builds the TLS config: `resolver` serves the certificate.
pub fn tls_config(
    resolver: Arc<dyn ResolvesServerCert>,
    anchors: TrustAnchors,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeClientCertVerifier::new(anchors, Arc::new(|_: &SpiffeId| true), false);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: a resumed session would skip the certificate checks.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Always the same certificate: an operator's.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An operator certificate chain and key (PEM) as a resolver.
pub fn operator_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<dyn ResolvesServerCert>, String> {
    use rustls_pki_types::pem::PemObject;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let pem = read(cert)?;
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_reader_iter(BufReader::new(pem.as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_der = rustls_pki_types::PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Arc::new(Fixed(Arc::new(rustls::sign::CertifiedKey::new(certs, signing)))))
}

/// A broker ready to serve: its listener bound and TLS set up, so a bad
/// policy, key or address stops the server at startup with one line.
#[derive(Debug)]
pub struct Bound {
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
}

impl Bound {
    /// Loads the broker and binds its address; `svid` serves TLS unless
    /// the config names an operator certificate.
    pub async fn bind(
        config: super::config::BrokerConfig,
        state: Arc<crate::state::State>,
        svid: Arc<dyn rustls::server::ResolvesServerCert>,
    ) -> Result<Self, BrokerError> {
        let resolver = match &config.tls {
            Some((cert, key)) => operator_cert(cert, key).map_err(BrokerError::Internal)?,
            None => svid,
        };
        let tls = tls_config(resolver, state.anchors().clone())
            .map_err(|e| BrokerError::Internal(format!("TLS: {e}")))?;
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|e| BrokerError::Internal(format!("cannot bind {}: {e}", config.bind)))?;
        let broker = Arc::new(Broker::new(config, state)?);
        let first = broker.clone();
        tokio::task::spawn_blocking(move || first.upkeep_once(true))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??;
        Ok(Self { broker, listener, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves, keeps up and watches the policy until `shutdown`.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let Self { broker, listener, tls } = self;
        let watch =
            broker.policy.clone().watch(std::time::Duration::from_secs(1), shutdown.clone());
        let upkeep = broker.clone().upkeep(shutdown.clone());
        let serve = serve(broker, listener, tls, shutdown);
        tokio::join!(watch, upkeep, serve);
    }
}

/// The routes.
pub fn router(broker: Arc<Broker>) -> Router {
    let mut router = Router::new()
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/task", post(sub_task))
        .route("/jwks", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/.well-known/openid-configuration", get(openid_configuration));
    let issuer_path = broker.config().issuer_path().to_string();
    if !issuer_path.is_empty() {
        // RFC 8414 §3: the well-known path with the issuer's path appended.
        router = router
            .route(&format!("/.well-known/oauth-authorization-server{issuer_path}"), get(metadata));
    }
    if let Some(path) = broker.config().jwt_svid_path() {
        router = router
            .route(&format!("{path}/.well-known/openid-configuration"), get(svid_discovery))
            .route(&format!("{path}/jwks"), get(svid_jwks));
    }
    router.with_state(broker)
}

/// Serves the broker on `listener` until `shutdown`.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let router = router(broker);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    info!(addr = ?listener.local_addr().ok(), "token broker listening");
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "broker accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap: close at once rather than queue.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%addr, "broker connection refused: at the connection cap");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                debug!(%addr, "broker TLS handshake failed or timed out");
                return;
            };
            let peer = Peer(
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(peer_svid),
            );
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(peer.clone());
                    router.clone().oneshot(req)
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The SPIFFE ID, serial and expiry of a verified client certificate.
fn peer_svid(der: &rustls_pki_types::CertificateDer<'_>) -> Option<PeerSvid> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uri = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    })?;
    Some(PeerSvid {
        spiffe_id: SpiffeId::parse(uri).ok()?,
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Reads a form body: the content type, then at most [`MAX_BODY`] bytes.
async fn read_form(headers: &HeaderMap, body: Body) -> Result<Form, BrokerError> {
    let content_type =
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(BrokerError::InvalidRequest(format!(
            "content type {media:?} is not application/x-www-form-urlencoded"
        )));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(BrokerError::TooLarge(MAX_BODY));
    }
    let mut body = body;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| BrokerError::InvalidRequest(format!("cannot read the body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            seen += data.len();
            if seen > DRAIN_LIMIT {
                break;
            }
            if seen <= MAX_BODY {
                bytes.extend_from_slice(&data);
            }
        }
        Ok::<(), BrokerError>(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(BrokerError::InvalidRequest("the body did not arrive in time".into()))
        }
    }
    if seen > MAX_BODY {
        // Read (and dropped) up to DRAIN_LIMIT so that the client, still
        // sending, hears the answer instead of a reset.
        return Err(BrokerError::TooLarge(MAX_BODY));
    }
    Form::parse(&bytes)
}

fn no_store(value: Value) -> Response {
    let mut response = Json(value).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(format!("broker task failed: {e}")))
}

async fn token(
    AxumState(broker): AxumState<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    request: Request,
) -> Response {
    decided(broker, peer, request, |b, form, peer| b.exchange(form, peer)).await
}

/// Reads the form, decides it on the blocking pool with `decide`, answers.
async fn decided(
    broker: Arc<Broker>,
    peer: Peer,
    request: Request,
    decide: fn(&Broker, &Form, Option<&PeerSvid>) -> Result<Value, Refused>,
) -> Response {
    let (parts, body) = request.into_parts();
    let form = match read_form(&parts.headers, body).await {
        Ok(form) => form,
        Err(e) => return e.into_response(),
    };
    let worker = broker.clone();
    answer(&broker, blocking(move || decide(&worker, &form, peer.0.as_ref())).await).await
}

/// The answer to a decision: the JSON, or the refusal, whose event (a
/// refusal changes nothing) is stored durably before the answer goes out.
async fn answer(broker: &Broker, outcome: Result<Result<Value, Refused>, BrokerError>) -> Response {
    match outcome {
        Ok(Ok(answer)) => no_store(answer),
        Ok(Err(refused)) => {
            if let Some(event) = refused.event {
                broker.state.events().record_durable(vec![event.code(refused.error.code())]).await;
            }
            refused.error.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn sub_task(
    AxumState(broker): AxumState<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    request: Request,
) -> Response {
    decided(broker, peer, request, |b, form, peer| b.start_sub_task(form, peer)).await
}

async fn introspect(
    AxumState(broker): AxumState<Arc<Broker>>,
    Extension(peer): Extension<Peer>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let form = match read_form(&parts.headers, body).await {
        Ok(form) => form,
        Err(e) => return e.into_response(),
    };
    match blocking(move || broker.introspect(&form, peer.0.as_ref(), bearer.as_deref())).await {
        Ok(Ok(answer)) => no_store(answer),
        Ok(Err(e)) | Err(e) => e.into_response(),
    }
}

async fn jwks(AxumState(broker): AxumState<Arc<Broker>>) -> Response {
    // Every server's keys as the store has them now (a relying party that
    // meets an unknown kid fetches the JWKS again, and must find it).
    let worker = broker.clone();
    let refreshed = blocking(move || worker.refresh_keys()).await;
    if let Ok(Err(e)) | Err(e) = refreshed {
        warn!(error = %e, "broker JWKS: cannot read other servers' keys; serving what is known");
    }
    Json(broker.keys.jwks()).into_response()
}

fn metadata_document(broker: &Broker) -> Value {
    let issuer = &broker.config().issuer;
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/token"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "jwks_uri": format!("{issuer}/jwks"),
        "grant_types_supported": [GRANT_TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["tls_client_auth", ASSERTION_JWT_SPIFFE],
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth", ASSERTION_JWT_SPIFFE, "bearer_jwt_svid"],
        "authorization_details_types_supported": broker.config().detail_types,
        "response_types_supported": ["token"],
        "scopes_supported": [],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "ES384", "RS256", "PS256"],
        "tls_client_certificate_bound_access_tokens": false,
    })
}

async fn metadata(AxumState(broker): AxumState<Arc<Broker>>) -> Response {
    Json(metadata_document(&broker)).into_response()
}

async fn openid_configuration(AxumState(broker): AxumState<Arc<Broker>>) -> Response {
    let mut doc = metadata_document(&broker);
    doc["subject_types_supported"] = json!(["public"]);
    doc["id_token_signing_alg_values_supported"] = json!(["ES256"]);
    Json(doc).into_response()
}

async fn svid_discovery(AxumState(broker): AxumState<Arc<Broker>>) -> Response {
    let Some(issuer) = broker.config().jwt_svid_issuer.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let algs: Vec<&str> = {
        let bundle = broker.jwt_bundle();
        let mut algs: Vec<&str> = bundle.1.keys().iter().map(|k| k.default_alg()).collect();
        algs.sort();
        algs.dedup();
        algs
    };
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
    }))
    .into_response()
}

async fn svid_jwks(AxumState(broker): AxumState<Arc<Broker>>) -> Response {
    let bundle = broker.jwt_bundle();
    let keys: Vec<Value> = bundle.1.keys().iter().map(super::keys::jwt_svid_jwk).collect();
    Json(json!({ "keys": keys })).into_response()
}
