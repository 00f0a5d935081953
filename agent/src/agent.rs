//! The agent component: attests (or reuses its stored SVID), binds the
//! Workload API socket, then runs sync, signing, renewal and the Workload
//! API until shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::clock::{Clock, SystemClock};
use crate::event_spool::EventSpool;
use crate::health::HealthProbe;
use crate::identity::{read_pem, AgentIdentity, IdentityError};
use crate::metrics::{AgentHealth, AgentMetrics};
use crate::node::attestation::attest;
pub use crate::node::attestation::AgentError;
use crate::node::client::NodeClientError;
use crate::node::event_push::push_events;
use crate::node::link::NodeLink;
use crate::node::recovery::{recovery_loop, Recovery};
use crate::node::renewal::agent_renewal_loop;
use crate::node::sync::sync_loop;
use crate::svid::cache::Cache;
use crate::svid::jwt::JwtSvids;
use crate::svid::x509::signer_loop;
use crate::workload::attestor::UnixAttestor;
use crate::workload::limits::{self, WorkloadLimits};
use crate::workload::listener::{self, Attesting};
use crate::workload::service::WorkloadService;
use tessera_proto::health::v1::health_server::HealthServer;

/// The agent's default data directory.
pub const DEFAULT_DATA_DIR: &str = ".tessera/agent";

/// The default Workload API socket: outside the agent's private (0700) data
/// dir, in a directory of its own that the agent creates with mode 0755, so
/// a workload of any local uid can connect (as SPIRE's
/// `/tmp/spire-agent/public/api.sock`).
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/tessera-agent/public/api.sock";

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent keeps its key, SVID and bundle.
    pub data_dir: PathBuf,
    /// Node API addresses, `host:port` each: the agent holds one connection
    /// at a time, starts at an address chosen by its identity (so agents
    /// spread over the servers) and moves to the next when a server fails.
    /// A name that resolves to several addresses counts as several servers.
    pub server_addresses: Vec<String>,
    /// Join token for the first attestation.
    pub join_token: Option<String>,
    /// Why the join token given could not be read (an unreadable or empty
    /// `--join-token-file`): an error only if the agent must attest.
    pub join_token_problem: Option<String>,
    /// Bootstrap trust bundle (used until the agent has stored one).
    pub trust_bundle: Option<PathBuf>,
    /// Trust domain; derived from the bundle's CA when not given.
    pub trust_domain: Option<TrustDomain>,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Per-caller limits of the Workload API (connections, streams, hashing).
    pub workload_limits: WorkloadLimits,
    /// Address for Prometheus metrics, `/live` and `/ready` (off when unset).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Record events and send them to the server (off only to measure their cost).
    pub events: bool,
    /// Most bytes of events spooled while the server is away.
    pub event_spool_bytes: u64,
}

impl AgentConfig {
    /// Defaults for a data dir and one server address; socket [`DEFAULT_SOCKET_PATH`].
    pub fn new(data_dir: PathBuf, server_address: String) -> Self {
        let socket_path = PathBuf::from(DEFAULT_SOCKET_PATH);
        Self {
            data_dir,
            server_addresses: vec![server_address],
            join_token: None,
            join_token_problem: None,
            trust_bundle: None,
            trust_domain: None,
            socket_path,
            workload_limits: WorkloadLimits::default(),
            metrics_addr: None,
            events: true,
            event_spool_bytes: crate::event_spool::DEFAULT_SPOOL_BYTES,
        }
    }
}

/// An attested agent with its socket bound.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    link: Arc<NodeLink>,
    trust_domain: TrustDomain,
    listener: UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    events: Arc<EventSpool>,
    metrics: AgentMetrics,
    /// The join token given, when the start did not spend it (a stored SVID
    /// was reused): spent only if that identity turns out dead.
    unspent_token: Option<String>,
}

impl Agent {
    /// Attests (or reuses the stored agent SVID) and binds the Workload API socket.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| AgentError::Io { what, path, source }
        };
        if let Some(bad) = config.server_addresses.iter().find(|a| !a.contains(':')) {
            return Err(NodeClientError::Address(bad.clone()).into());
        }
        if config.server_addresses.is_empty() {
            return Err(NodeClientError::Address(String::new()).into());
        }
        std::fs::create_dir_all(&config.data_dir)
            .map_err(io("cannot create data dir", &config.data_dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("cannot restrict data dir", &config.data_dir))?;
        }
        let bundle = load_bundle(&config)?;
        let trust_domain = match &config.trust_domain {
            Some(td) => td.clone(),
            None => bundle
                .iter()
                .find_map(|c| tessera_workload_api::validate_ca_cert(c).ok().flatten())
                .map(|id| id.trust_domain().clone())
                .ok_or(AgentError::NoTrustDomain)?,
        };
        let anchors = TrustAnchors::new(bundle);
        // Both addresses are taken before a join token can be spent: an
        // agent that cannot serve must not attest (and add an agent record).
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(crate::telemetry::bind(addr).await.map_err(|source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    AgentError::MetricsInUse(addr)
                } else {
                    io("cannot bind metrics to", Path::new(&addr.to_string()))(source)
                }
            })?),
            None => None,
        };
        let listener = listener::bind_socket(&config.socket_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                AgentError::SocketInUse(config.socket_path.clone())
            } else {
                io("cannot bind Workload API socket", &config.socket_path)(source)
            }
        })?;
        // From here on a failure removes the socket it bound.
        let bound = SocketFile(Some(config.socket_path.clone()));
        let _ = std::fs::remove_file(crate::health::stopped_note(&config.socket_path));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let stored = match AgentIdentity::load(&config.data_dir) {
            Ok(stored) => stored.filter(|id| {
                id.not_after > clock.now() + 5 && id.spiffe_id.trust_domain() == &trust_domain
            }),
            Err(e) => {
                warn!(error = %e, "stored agent SVID unusable; attesting again");
                None
            }
        };
        let mut unspent_token = None;
        let identity = match stored {
            Some(identity) => {
                unspent_token = config.join_token.clone();
                info!(agent_id = %identity.spiffe_id, not_after = identity.not_after, "reusing stored agent SVID");
                identity
            }
            None => {
                let token =
                    config.join_token.clone().ok_or_else(|| match &config.join_token_problem {
                        Some(problem) => {
                            AgentError::JoinToken(config.data_dir.clone(), problem.clone())
                        }
                        None => AgentError::NoJoinToken(config.data_dir.clone()),
                    })?;
                attest(&config.data_dir, &config.server_addresses, &token, &trust_domain, &anchors)
                    .await?
            }
        };
        let metrics = AgentMetrics::new();
        let events = Arc::new(
            EventSpool::open(
                &config.data_dir,
                identity.spiffe_id.to_string(),
                config.event_spool_bytes,
                config.events,
                metrics.clone(),
            )
            .map_err(|e| AgentError::Io {
                what: "cannot open event spool in",
                path: config.data_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?,
        );
        bound.keep();
        info!(socket = %config.socket_path.display(), "Workload API socket bound (mode 0777)");
        let link = Arc::new(NodeLink::new(
            config.server_addresses.clone(),
            trust_domain.clone(),
            anchors,
            identity,
            config.data_dir.clone(),
            clock,
        ));
        Ok(Self {
            config,
            link,
            trust_domain,
            listener,
            metrics_listener,
            events,
            metrics,
            unspent_token,
        })
    }

    /// The metrics endpoint's bound address, when `metrics_addr` is set.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The agent's SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        self.link.identity().spiffe_id.to_string()
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.config.socket_path
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Self {
            config,
            link,
            trust_domain,
            listener,
            metrics_listener,
            events,
            metrics,
            unspent_token,
        } = self;
        let cache = Cache::new();
        let limits = config.workload_limits;
        let jwt = Arc::new(JwtSvids::new(
            link.clone(),
            limits.jwt_signings_per_uid,
            limits.jwt_signing_burst,
        ));
        let wake = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        tasks.spawn(
            sync_loop(link.clone(), cache.clone(), jwt.clone(), wake.clone(), shutdown.clone())
                .instrument(tracing::info_span!("sync")),
        );
        tasks.spawn(
            jwt.clone().refresh_loop(shutdown.clone()).instrument(tracing::info_span!("jwt")),
        );
        tasks.spawn(
            signer_loop(link.clone(), cache.clone(), wake, shutdown.clone())
                .instrument(tracing::info_span!("signer")),
        );
        tasks.spawn(
            agent_renewal_loop(link.clone(), config.data_dir.clone(), shutdown.clone())
                .instrument(tracing::info_span!("agent_svid")),
        );
        tasks.spawn(
            push_events(events.clone(), link.clone(), shutdown.clone())
                .instrument(tracing::info_span!("events")),
        );
        let recovery = Recovery {
            data_dir: config.data_dir.clone(),
            server_addresses: config.server_addresses.clone(),
            token_spent: config.join_token.is_some() && unspent_token.is_none(),
            join_token: unspent_token,
            join_token_problem: config.join_token_problem.clone(),
            trust_domain: trust_domain.clone(),
        };
        let recovering = tokio::spawn(
            recovery_loop(link.clone(), cache.clone(), recovery, shutdown.clone())
                .instrument(tracing::info_span!("recovery")),
        );
        let probe = HealthProbe { cache: cache.clone(), link: link.clone() };
        if let Some(listener) = metrics_listener {
            let health =
                Arc::new(AgentHealth { metrics: metrics.clone(), parts: Default::default() });
            let _ = health.parts.set(probe.clone());
            tasks.spawn(
                crate::telemetry::serve(listener, health, shutdown.clone())
                    .instrument(tracing::info_span!("metrics")),
            );
        }
        let attesting =
            Attesting::new(Arc::new(UnixAttestor::with_limits(limits.hashing)), metrics.clone());
        let service = WorkloadService::new(
            cache,
            jwt,
            attesting.clone(),
            trust_domain,
            limits,
            events.clone(),
            metrics,
            link.clock.clone(),
            shutdown.clone(),
        );
        let spool = events.clone();
        let incoming = listener::incoming(listener, limits, attesting, events, shutdown.clone());
        let stop = shutdown.clone();
        let server = tokio::spawn(
            async move {
                // What one connection can make the agent buffer is bounded
                // before any handler runs: small windows, header lists and
                // frames, few streams, and requests decoded only up to
                // MAX_REQUEST_BYTES (refused from their length prefix).
                tonic::transport::Server::builder()
                    .max_concurrent_streams(limits.streams_per_connection)
                    .initial_stream_window_size(limits::STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(limits::CONNECTION_WINDOW_BYTES)
                    .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
                    .max_frame_size(16 * 1024)
                    .add_service(
                        SpiffeWorkloadApiServer::new(service)
                            .max_decoding_message_size(limits::MAX_REQUEST_BYTES),
                    )
                    .add_service(
                        HealthServer::new(probe)
                            .max_decoding_message_size(limits::MAX_REQUEST_BYTES),
                    )
                    .serve_with_incoming_shutdown(incoming, stop.cancelled())
                    .await
            }
            .instrument(tracing::info_span!("workload_api")),
        );
        info!(agent_id = %link.identity().spiffe_id, socket = %config.socket_path.display(), "tessera-agent ready");
        let (mut server, mut recovering) = (server, recovering);
        // The agent stops on shutdown, or when its identity is dead and it
        // cannot attest again (the recovery task's error).
        let (result, fatal) = tokio::select! {
            result = &mut server => {
                shutdown.cancel();
                (result, recovering.await.ok().and_then(Result::err))
            }
            outcome = &mut recovering => {
                shutdown.cancel();
                (server.await, outcome.ok().and_then(Result::err))
            }
        };
        while tasks.join_next().await.is_some() {}
        // The Workload API has answered its last call: what is folded
        // (held only in memory) and not yet written goes to the spool, for
        // the next run to push.
        spool.flush_all_folded();
        let _ = tokio::task::spawn_blocking(move || spool.sync()).await;
        let _ = std::fs::remove_file(&config.socket_path);
        info!("tessera-agent stopped");
        if let Some(fatal) = fatal {
            // For `healthcheck`, which finds no socket now: why the agent stopped.
            let note = crate::health::stopped_note(&config.socket_path);
            if let Err(e) = crate::health::write_stopped_note(&note, &fatal.to_string()) {
                warn!(path = %note.display(), error = %e, "cannot record why the agent stopped");
            }
            return Err(fatal);
        }
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(AgentError::Io {
                what: "Workload API task",
                path: config.socket_path,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

fn load_bundle(config: &AgentConfig) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let stored = config.data_dir.join("bundle.pem");
    let path = if stored.exists() {
        stored
    } else {
        config.trust_bundle.clone().ok_or(AgentError::NoBundle)?
    };
    let certs: Vec<CertificateDer<'static>> =
        read_pem(&path, "CERTIFICATE")?.into_iter().map(Into::into).collect();
    for cert in &certs {
        tessera_workload_api::validate_ca_cert(cert).map_err(|e| {
            IdentityError::Invalid(format!("{}: not a CA certificate: {e}", path.display()))
        })?;
    }
    Ok(certs)
}

/// Removes the socket file it names when dropped (a start that failed
/// after binding).
struct SocketFile(Option<PathBuf>);

impl SocketFile {
    /// The start went through: the socket stays.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
