//! The server component: binds its sockets, then runs the node API, the
//! admin API and the CA rotation loop until shutdown.
//!
//! The node API is two gRPC servers over one listener (`tls::incoming`
//! sorts connections after their handshake): one for connections that
//! presented a verified agent SVID, with the usual HTTP/2 limits, and one
//! for certless connections (attestation), with one stream, small windows
//! and frames, a 16 KiB message limit and a maximum age. tonic's limits are
//! per server and per service, so the split is made where the peer is
//! known, before any request is read. Both serve the same `NodeService`
//! behind `NodeRequests`, which limits each request body by method and
//! counts open streams for the idle timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_proto::admin::admin_server::AdminServer;
use tessera_proto::node::node_server::NodeServer;
use tessera_workload_api::TrustAnchors;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::api::admin::AdminService;
use crate::api::node::tls::{self, NodeLimits, NodePeer, ServerSvid};
use crate::api::node::NodeService;
use crate::ca::{Ca, CaPolicy};
use crate::config::Config;
use crate::entry::EntryRules;
use crate::error::ServerError;
use crate::fsutil::create_private_dir;
use crate::state::{State, StateParts};
use crate::store::{Change, ChangeKind, KvStore, Store};
use tessera_common::clock::Clock;

/// Largest gRPC message the server accepts or sends (the rule both sides use).
pub use tessera_common::rules::MAX_MESSAGE_BYTES;

/// Largest node API request (the rule both sides use).
pub use tessera_common::rules::MAX_NODE_REQUEST_BYTES;

/// Requests in flight on one node API connection.
pub const NODE_CONCURRENCY_PER_CONNECTION: usize = 32;

/// Largest request on a connection without a client certificate: an
/// Attest request (join token and a CSR of at most 8 KiB).
pub const MAX_UNAUTHENTICATED_REQUEST_BYTES: usize = 16 * 1024;

/// HTTP/2 flow-control windows and largest frame for connections without
/// a client certificate (16 KiB, HTTP/2's smallest frame size).
pub const UNAUTHENTICATED_WINDOW: u32 = 16 * 1024;

/// Largest HTTP/2 header list on a connection without a client certificate.
pub const UNAUTHENTICATED_HEADER_BYTES: u32 = 8 * 1024;

/// A connection without a client certificate is closed after this, open
/// requests or not (attesting takes well under a second).
pub const UNAUTHENTICATED_MAX_AGE: Duration = Duration::from_secs(10);

/// A bound, ready-to-run server.
#[derive(Debug)]
pub struct Server {
    state: Arc<State>,
    svid: Arc<ServerSvid>,
    node_listener: TcpListener,
    admin_listener: UnixListener,
    metrics_listener: Option<TcpListener>,
    broker: Option<crate::broker::http::Bound>,
}

impl Server {
    /// Opens the store and CA in the data dir and binds the node and admin
    /// sockets (so `node_addr` is known before `run`).
    pub async fn bind(config: Config, clock: Arc<dyn Clock>) -> Result<Self, ServerError> {
        let io = |what, path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| ServerError::Io { what, path, source }
        };
        create_private_dir(&config.data_dir)
            .map_err(io("cannot create data dir", &config.data_dir))?;
        let server_id = crate::fsutil::server_id(&config.data_dir)
            .map_err(io("cannot read or create the server ID in", &config.data_dir))?;
        let store = match &config.datastore {
            None => KvStore::open(&config.data_dir.join("store"))?,
            Some(url) => {
                let store = KvStore::open_postgres(url, &server_id)?;
                info!(datastore = %crate::store::postgres::redact(url), server_id = %server_id, "using the shared PostgreSQL datastore");
                store
            }
        };
        let metrics = crate::metrics::Metrics::new();
        let events = Arc::new(crate::events::EventLog::open(
            store.kv(),
            config.events.clone(),
            metrics.clone(),
        )?);
        let governance = crate::policy::governance::Governance {
            operators: crate::policy::governance::Operators {
                uids: config.admin_uids.iter().copied().collect(),
                gids: config.admin_gids.iter().copied().collect(),
            },
            policy: config.approval.clone(),
            pending: crate::policy::governance::Pending::open(store.kv())?,
            refused: crate::refusals::RefusalFolder::new(
                crate::policy::governance::MAX_FOLDED_UIDS,
                u32::MAX,
            ),
        };
        let policy = CaPolicy {
            ttl: config.ca_ttl,
            prepare_at: config.ca_prepare_at,
            activate_at: config.ca_activate_at,
            jwt_key_type: config.jwt_key_type,
            jwt_issuer: config.broker.as_ref().and_then(|b| b.jwt_svid_issuer.clone()),
        };
        let ca = Arc::new(Ca::load_or_create(
            &config.data_dir,
            config.trust_domain.clone(),
            policy,
            clock.clone(),
        )?);
        let anchors = TrustAnchors::new(ca.bundle().to_vec());
        let svid = Arc::new(ServerSvid::issue(&ca, &config.trust_domain)?);

        let node_listener = TcpListener::bind(config.bind).await.map_err(io(
            "cannot bind node API to",
            std::path::Path::new(&config.bind.to_string()),
        ))?;
        let shared = !config.admin_uids.is_empty() || !config.admin_gids.is_empty();
        let admin_listener = bind_admin_socket(&config.admin_socket, shared).await?;
        crate::api::admin::reach::warn_unreachable(
            &config.admin_socket,
            &config.admin_uids,
            &config.admin_gids,
        );
        let metrics_listener =
            match config.metrics_addr {
                Some(addr) => Some(crate::telemetry::bind(addr).await.map_err(io(
                    "cannot bind metrics to",
                    std::path::Path::new(&addr.to_string()),
                ))?),
                None => None,
            };

        let rules = EntryRules {
            trust_domain: config.trust_domain.clone(),
            default_ttl: config.default_x509_svid_ttl,
            max_ttl: config.max_x509_svid_ttl,
            default_jwt_ttl: config.default_jwt_svid_ttl,
            max_jwt_ttl: config.max_jwt_svid_ttl,
        };
        store.set_crl_signer(Arc::new(crate::revocation::CaCrlSigner(ca.clone())));
        // Every commit chains its events into the log in the same commit.
        store.set_event_sink(events.clone());
        let feed = Arc::new(crate::feed::ChangeFeed::new(store.revision()?, store.crls()?));
        let state = Arc::new(State::new(StateParts {
            config,
            clock,
            store: Arc::new(store),
            ca,
            rules,
            anchors,
            feed,
            shutdown: CancellationToken::new(),
            events,
            metrics,
            governance,
            server_id,
        }));
        let shared = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || crate::maintenance::share_bundle(&state))
                .await
                .map_err(|e| ServerError::Crl(e.to_string()))?
        };
        shared.map_err(|e| ServerError::Crl(e.to_string()))?;
        // The bundle may have changed while the server was down (a CA
        // expired or was prepared): agents resuming from the log hear of it.
        state
            .store_op(|store| store.log_bundle_change(&crate::store::Audit::quiet()))
            .await
            .map_err(|e| ServerError::Crl(e.message().to_string()))?;
        crate::revocation::refresh_crls(&state)
            .await
            .map_err(|e| ServerError::Crl(e.message().to_string()))?;
        let broker = match state.config().broker.clone() {
            Some(config) => Some(
                crate::broker::http::Bound::bind(config, state.clone(), svid.clone())
                    .await
                    .map_err(|e| ServerError::Broker(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Self { state, svid, node_listener, admin_listener, metrics_listener, broker })
    }

    /// The metrics endpoint's bound address, when `metrics_addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The node API's bound address.
    pub fn node_addr(&self) -> Result<SocketAddr, ServerError> {
        self.node_listener.local_addr().map_err(|source| ServerError::Io {
            what: "node API address",
            path: String::new(),
            source,
        })
    }

    /// The token broker's bound address, when `[broker]` is configured.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(|b| b.local_addr())
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.state.ca().bundle().to_vec()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let Self { state, svid, node_listener, admin_listener, metrics_listener, broker } = self;
        let node_addr = node_listener.local_addr().ok();
        let tls_config = tls::server_config(
            svid.clone(),
            state.anchors().clone(),
            state.config().trust_domain.clone(),
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
        let mut tasks = JoinSet::new();
        let streams_shutdown = state.shutdown().clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            streams_shutdown.cancel();
        });

        // Two gRPC servers over one listener (see `tls`): connections with a
        // verified agent SVID, and certless ones, which may only attest and
        // get small HTTP/2 limits.
        let service = NodeService::new(state.clone());
        let refusals = service.clone();
        let admin_state = state.clone();
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                loop {
                    let stopping = tokio::select! {
                        _ = stop.cancelled() => true,
                        _ = tokio::time::sleep(crate::api::node::ATTEST_REFUSAL_INTERVAL) => false,
                    };
                    refusals.flush_attest_refusals();
                    crate::api::admin::flush_refusals(&admin_state);
                    if stopping {
                        return Ok(());
                    }
                }
            }
            .instrument(tracing::info_span!("refusals")),
        );
        let node = NodeRequests::new(
            NodeServer::new(service.clone())
                .max_decoding_message_size(MAX_NODE_REQUEST_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        let certless_node = NodeRequests::new(
            NodeServer::new(service)
                .max_decoding_message_size(MAX_UNAUTHENTICATED_REQUEST_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        let limits = node_limits(state.config());
        let incoming = tls::incoming(
            node_listener,
            acceptor,
            limits.clone(),
            state.metrics().clone(),
            shutdown.clone(),
        );
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .concurrency_limit_per_connection(NODE_CONCURRENCY_PER_CONNECTION)
                    .max_concurrent_streams(Some(NODE_CONCURRENCY_PER_CONNECTION as u32))
                    .max_frame_size(Some(64 * 1024))
                    .http2_max_header_list_size(Some(64 * 1024))
                    .add_service(node)
                    .serve_with_incoming_shutdown(incoming.authenticated, stop.cancelled())
                    .await
                    .map_err(ServerError::from)
            }
            .instrument(tracing::info_span!("node_api")),
        );
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                // Before a client certificate: one small request at a time.
                tonic::transport::Server::builder()
                    .concurrency_limit_per_connection(1)
                    .max_concurrent_streams(Some(1))
                    .initial_stream_window_size(Some(UNAUTHENTICATED_WINDOW))
                    .initial_connection_window_size(Some(UNAUTHENTICATED_WINDOW))
                    .max_frame_size(Some(UNAUTHENTICATED_WINDOW))
                    .http2_max_header_list_size(Some(UNAUTHENTICATED_HEADER_BYTES))
                    .http2_max_pending_accept_reset_streams(Some(4))
                    .http2_max_local_error_reset_streams(Some(16))
                    .max_connection_age(UNAUTHENTICATED_MAX_AGE)
                    .max_connection_age_grace(Duration::from_secs(2))
                    .add_service(certless_node)
                    .serve_with_incoming_shutdown(incoming.certless, stop.cancelled())
                    .await
                    .map_err(ServerError::from)
            }
            .instrument(tracing::info_span!("node_api_certless")),
        );

        let admin = AdminServer::new(AdminService::new(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let gate = state.clone();
        let admin = crate::api::admin::peer::WithMethod(
            tonic::service::interceptor::InterceptedService::new(admin, move |request| {
                crate::api::admin::authorize(&gate, request)
            }),
        );
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                tonic::transport::Server::builder()
                    .add_service(admin)
                    .serve_with_incoming_shutdown(
                        crate::api::admin::peer::incoming(admin_listener, stop.clone()),
                        stop.cancelled(),
                    )
                    .await
                    .map_err(ServerError::from)
            }
            .instrument(tracing::info_span!("admin_api")),
        );

        tasks.spawn(
            crate::maintenance::rotation_loop(state.clone(), svid, shutdown.clone())
                .instrument(tracing::info_span!("ca_rotation")),
        );
        tasks.spawn(
            crate::maintenance::expiry_loop(state.clone(), shutdown.clone())
                .instrument(tracing::info_span!("expiry")),
        );
        let events = state.events().clone();
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                events.flush_loop(stop).await;
                Ok(())
            }
            .instrument(tracing::info_span!("events")),
        );
        if let Some(broker) = broker {
            let stop = shutdown.clone();
            tasks.spawn(
                async move {
                    broker.run(stop).await;
                    Ok(())
                }
                .instrument(tracing::info_span!("broker")),
            );
        }
        if let Some(listener) = metrics_listener {
            let health = Arc::new(crate::health::ServerHealth { state: Default::default() });
            let _ = health.state.set(state.clone());
            let stop = shutdown.clone();
            tasks.spawn(
                async move {
                    crate::telemetry::serve(listener, health, stop).await;
                    Ok(())
                }
                .instrument(tracing::info_span!("metrics")),
            );
        }
        let hook_state = state.clone();
        let hook: crate::feed::ChangeHook =
            Arc::new(move |store, changes| on_changes(&hook_state, store, changes));
        let feed = state.feed().clone().run(state.store().clone(), shutdown.clone(), hook);
        tasks.spawn(
            async move {
                feed.await;
                Ok(())
            }
            .instrument(tracing::info_span!("change_feed")),
        );

        info!(
            trust_domain = %state.config().trust_domain,
            node_api = %node_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
            admin_socket = %state.config().admin_socket.display(),
            "tessera-server ready"
        );
        let mut result = Ok(());
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(error = %e, "server task failed");
                    shutdown.cancel();
                    result = Err(e);
                }
                Err(e) => {
                    error!(error = %e, "server task panicked");
                    shutdown.cancel();
                }
            }
        }
        let _ = std::fs::remove_file(&state.config().admin_socket);
        info!("tessera-server stopped");
        result
    }
}

/// Binds the admin socket: mode 0600, or 0666 in a directory others can
/// reach when operators other than the server's user are configured
/// (`shared`): callers are then authorized by their peer credentials.
async fn bind_admin_socket(
    path: &std::path::Path,
    shared: bool,
) -> Result<UnixListener, ServerError> {
    let io = |what| {
        let path = path.display().to_string();
        move |source| ServerError::Io { what, path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Created 0700 (never wider, whatever the umask), checked, and only
        // then opened: a directory another local user made first, or a
        // symlink of theirs in its place, is refused before anything is
        // bound or chmod'ed through it.
        let created = !dir.exists();
        if created {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("cannot create admin socket dir"))?;
        }
        crate::fsutil::check_trusted_dir(dir).map_err(|why| ServerError::Io {
            what: "cannot use admin socket",
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        })?;
        if created {
            use std::os::unix::fs::PermissionsExt;
            let mode = if shared { 0o755 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(io("cannot open admin socket dir"))?;
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::AdminSocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io("cannot remove stale admin socket"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("cannot bind admin socket"))?;
    use std::os::unix::fs::PermissionsExt;
    let mode = if shared { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot restrict admin socket"))?;
    Ok(listener)
}

/// What the server itself does with changes other servers committed,
/// before any Sync stream sees them: takes in their CAs (a bundle change)
/// and CRLs, and re-signs its own CRLs when they revoked SVIDs (its CAs
/// may have signed them; only it holds their keys).
fn on_changes(state: &State, store: &dyn Store, changes: &[Change]) {
    let bundle = changes.iter().any(|c| matches!(c.kind, ChangeKind::Bundle));
    if bundle {
        match store.cas() {
            Ok(records) => {
                if state.ca().set_peers(state.server_id(), records) {
                    state.anchors().update(state.ca().bundle().to_vec());
                    info!(
                        cas = state.ca().bundle().len(),
                        "trust bundle changed on another server"
                    );
                }
            }
            Err(e) => error!(error = %e, "reading other servers' CAs failed"),
        }
    }
    if state.config().datastore.is_none() {
        return;
    }
    let revoked = changes
        .iter()
        .any(|c| matches!(&c.kind, ChangeKind::Revoked { serials, .. } if !serials.is_empty()));
    if revoked {
        if let Err(e) = store.resign_crls() {
            error!(error = %e, "re-signing this server's CRLs failed");
        }
    }
    if revoked || changes.iter().any(|c| matches!(c.kind, ChangeKind::Crls)) {
        match store.crls() {
            Ok(crls) => {
                if let Err(e) = state.anchors().update_crls(&crls) {
                    warn!(error = %e, "node API verifier refused the new CRLs");
                }
            }
            Err(e) => error!(error = %e, "reading the CRLs failed"),
        }
    }
}

/// The node API's connection limits from the config.
fn node_limits(config: &Config) -> NodeLimits {
    NodeLimits {
        max_connections: config.node_max_connections,
        max_unauthenticated_per_ip: config.node_max_unauthenticated_per_ip,
        ..NodeLimits::default()
    }
    .fitted_to_fd_limit()
}

/// The largest request body of a node API method, gRPC framing included:
/// the messages of attestation, renewal and Sync are small; signing
/// batches and event pushes get [`MAX_NODE_REQUEST_BYTES`].
pub fn node_request_limit(path: &str) -> usize {
    match path.rsplit('/').next() {
        Some("Attest" | "RenewAgent") => MAX_UNAUTHENTICATED_REQUEST_BYTES,
        Some("SignX509" | "SignJWT" | "PushEvents") => MAX_NODE_REQUEST_BYTES,
        _ => 4 * 1024,
    }
}

/// The node API service with what holds for every request: its stream
/// counted on its connection (the idle timeout spares connections with an
/// open stream, such as an agent's Sync), and its body limited by method
/// ([`node_request_limit`]; over it the call fails `ResourceExhausted`).
#[derive(Debug, Clone)]
struct NodeRequests<S> {
    inner: S,
}

impl<S> NodeRequests<S> {
    fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for NodeRequests<S> {
    const NAME: &'static str = S::NAME;
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S> tonic::codegen::Service<HttpRequest> for NodeRequests<S>
where
    S: tonic::codegen::Service<HttpRequest, Response = HttpResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        use http_body_util::BodyExt;
        let open = request.extensions().get::<NodePeer>().map(|peer| peer.activity.begin());
        let limit = node_request_limit(request.uri().path());
        let request = request.map(|body| {
            // The limit is on the message; the body also holds gRPC's 5-byte prefix.
            let bytes = limit + 5;
            tonic::body::Body::new(http_body_util::Limited::new(body, bytes).map_err(
                move |e| -> tonic::codegen::StdError {
                    if e.is::<http_body_util::LengthLimitError>() {
                        Box::new(tonic::Status::resource_exhausted(format!(
                            "request larger than the {limit} bytes this method takes"
                        )))
                    } else {
                        e
                    }
                },
            ))
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // The stream counts as open until its response body is done.
            Ok(response.map(move |body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    let _open = &open;
                    frame
                }))
            }))
        })
    }
}
