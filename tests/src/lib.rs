//! Shared helpers for Tessera's end-to-end tests and benchmark: start a real
//! server on loopback with a temp data dir, attest simulated agents through
//! the real node API.
#![forbid(unsafe_code)]
// A test harness: a failed setup step must stop the test at once, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_agent::{connect_node, node_tls_config, Agent, AgentConfig, ClientIdentity};
use tessera_proto::admin::{self as admin_pb, admin_client::AdminClient};
use tessera_proto::node::{self as node_pb, node_client::NodeClient};
use tessera_proto::types;
use tessera_server::{Clock, Config, Server, SystemClock};
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use tessera_common::pg_cluster;

pub mod broker;

/// The trust domain tests use.
pub const TRUST_DOMAIN: &str = "example.org";

/// A server running in this process on real sockets.
#[derive(Debug)]
pub struct TestServer {
    /// Node API address.
    pub addr: SocketAddr,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// The metrics endpoint, when the config asks for one.
    pub metrics_addr: Option<SocketAddr>,
    /// The PostgreSQL datastore, when it shares one with other servers.
    pub datastore: Option<String>,
    /// The token broker's address, when the config has a `[broker]`.
    pub broker_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// `None` once stopped.
    task: Option<JoinHandle<()>>,
}

/// What a task's panic said.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A task's end: a panic in it (the server's or the agent's) fails the
/// test, unless the test is already failing. A task ended otherwise gives
/// its output, if any.
fn surfaced<T>(what: &str, result: Result<T, tokio::task::JoinError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) if e.is_panic() => {
            let message = panic_message(&*e.into_panic());
            if !std::thread::panicking() {
                panic!("the {what} task panicked: {message}");
            }
            None
        }
        Err(_) => None,
    }
}

/// On drop: stops `task` and, if it already ended with a panic, fails the
/// test with it (a server or agent dropped without `stop` must not hide one).
fn drop_task<T>(what: &str, shutdown: &CancellationToken, task: Option<JoinHandle<T>>) {
    shutdown.cancel();
    let Some(mut task) = task else { return };
    if task.is_finished() {
        if let Some(result) = futures::FutureExt::now_or_never(&mut task) {
            surfaced(what, result);
        }
    }
}

/// Server config for tests: loopback, ephemeral port, `data_dir`.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::new(TrustDomain::new(TRUST_DOMAIN).unwrap(), data_dir.to_owned());
    config.bind = "127.0.0.1:0".parse().unwrap();
    config
}

impl TestServer {
    /// Starts a server with the system clock.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(test_config(data_dir), Arc::new(SystemClock)).await
    }

    /// Starts a server with a config and clock.
    pub async fn start_with(config: Config, clock: Arc<dyn Clock>) -> Self {
        let admin_socket = config.admin_socket.clone();
        let data_dir = config.data_dir.clone();
        let datastore = config.datastore.clone();
        let server = Server::bind(config, clock).await.expect("server binds");
        let addr = server.node_addr().unwrap();
        let metrics_addr = server.metrics_addr();
        let broker_addr = server.broker_addr();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            server.run(stop).await.expect("server runs");
        });
        Self {
            addr,
            admin_socket,
            data_dir,
            metrics_addr,
            datastore,
            broker_addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the server and waits until it has released its store; a
    /// panic of the server's task fails the test here.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            surfaced("server", task.await);
        }
    }

    /// Stops the server and starts it again on the same address and data dir.
    pub async fn restart(self) -> Self {
        let (addr, data_dir, datastore) =
            (self.addr, self.data_dir.clone(), self.datastore.clone());
        self.stop().await;
        let mut config = test_config(&data_dir);
        config.bind = addr;
        config.datastore = datastore;
        Self::start_with(config, Arc::new(SystemClock)).await
    }

    /// How many agents' Sync streams this server holds (its
    /// `tessera_server_sync_streams` gauge; 0 without metrics).
    pub fn sync_streams(&self) -> u64 {
        let Some(addr) = self.metrics_addr else { return 0 };
        let (_, body) = http_get(addr, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("tessera_server_sync_streams "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// An admin API client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        tessera_server::connect_admin(&self.admin_socket).await.expect("admin socket")
    }

    /// The trust bundle, via the admin API.
    pub async fn bundle(&self) -> Vec<CertificateDer<'static>> {
        let bundle = self
            .admin()
            .await
            .get_bundle(admin_pb::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        bundle.authorities.into_iter().map(CertificateDer::from).collect()
    }

    /// A fresh join token; `spiffe_id` empty for the default agent ID.
    pub async fn join_token(&self, spiffe_id: &str, ttl: u32) -> types::JoinToken {
        self.admin()
            .await
            .create_join_token(admin_pb::CreateJoinTokenRequest {
                ttl,
                spiffe_id: spiffe_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Creates an entry; returns its ID.
    pub async fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        ttl: Option<u32>,
    ) -> String {
        let entry = entry(spiffe_id, parent_id, selectors, ttl);
        let response = self
            .admin()
            .await
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![entry] })
            .await
            .unwrap();
        let result = response.into_inner().results.remove(0);
        assert_eq!(result.status.as_ref().unwrap().code, 0, "{:?}", result.status);
        result.entry.unwrap().id
    }
}

/// An admin API entry from parts (`selectors` as `unix:uid:1000`).
pub fn entry(
    spiffe_id: &str,
    parent_id: &str,
    selectors: &[&str],
    ttl: Option<u32>,
) -> types::Entry {
    types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap();
                types::Selector { r#type: kind.into(), value: value.into() }
            })
            .collect(),
        x509_svid_ttl: ttl,
        ..Default::default()
    }
}

/// A new P-256 key and a DER CSR for it (asking for a name the server must ignore).
pub fn key_and_csr() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI("spiffe://evil.org/wants-this".try_into().unwrap()));
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    (key, csr)
}

/// An attested simulated agent.
#[derive(Debug, Clone)]
pub struct TestAgent {
    /// Its SPIFFE ID.
    pub id: String,
    /// Its X509-SVID chain.
    pub chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    addr: SocketAddr,
    bundle: Vec<CertificateDer<'static>>,
}

impl TestAgent {
    /// Attests with a join token through the node API.
    pub async fn attest(server: &TestServer, token: &str) -> Result<Self, tonic::Status> {
        Self::attest_to(server.addr, server.bundle().await, token).await
    }

    /// Attests with a join token to the node API at `addr`, trusting `bundle`.
    pub async fn attest_to(
        addr: SocketAddr,
        bundle: Vec<CertificateDer<'static>>,
        token: &str,
    ) -> Result<Self, tonic::Status> {
        let (key, csr) = key_and_csr();
        let tls = node_tls_config(
            TrustAnchors::new(bundle.clone()),
            &TrustDomain::new(TRUST_DOMAIN).unwrap(),
            None,
        )
        .unwrap();
        let mut client = connect_node(&addr.to_string(), tls).await.unwrap();
        let response = client
            .attest(node_pb::AttestRequest { join_token: token.into(), csr })
            .await?
            .into_inner();
        Ok(Self {
            id: response.agent_id,
            chain: response.x509_svid.into_iter().map(CertificateDer::from).collect(),
            key: key.serialize_der(),
            addr,
            bundle,
        })
    }

    /// A node API client authenticated with this agent's SVID.
    pub async fn client(&self, _server: &TestServer) -> NodeClient<Channel> {
        self.connect().await
    }

    /// A node API client authenticated with this agent's SVID.
    pub async fn connect(&self) -> NodeClient<Channel> {
        connect_node(&self.addr.to_string(), self.tls_config()).await.unwrap()
    }

    /// The TLS client config the agent's node API connections use (its
    /// SVID as client certificate). Clones share one session cache.
    pub fn tls_config(&self) -> rustls::ClientConfig {
        let identity = ClientIdentity {
            chain: self.chain.clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())),
        };
        let anchors = TrustAnchors::new(self.bundle.clone());
        node_tls_config(anchors, &TrustDomain::new(TRUST_DOMAIN).unwrap(), Some(identity)).unwrap()
    }

    /// The node API address the agent talks to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The same agent, talking to the node API at `addr` (another server
    /// of a shared datastore).
    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Replaces the agent's SVID (after a renewal).
    pub fn set_svid(&mut self, chain: Vec<CertificateDer<'static>>, key: Vec<u8>) {
        self.chain = chain;
        self.key = key;
    }
}

/// A real agent running in this process, serving the Workload API on its socket.
#[derive(Debug)]
pub struct RunningAgent {
    /// The agent's SPIFFE ID.
    pub id: String,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The metrics endpoint, when the config asks for one.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// `None` once stopped.
    task: Option<JoinHandle<Result<(), tessera_agent::AgentError>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop_task("server", &self.shutdown, self.task.take());
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        drop_task("agent", &self.shutdown, self.task.take());
    }
}

impl RunningAgent {
    /// Attests a new agent (fresh join token) with its data in `data_dir`.
    pub async fn start(server: &TestServer, data_dir: &Path) -> Self {
        Self::start_configured(server, data_dir, |_| {}).await
    }

    /// Like [`RunningAgent::start`], with `configure` applied to the config last.
    pub async fn start_configured(
        server: &TestServer,
        data_dir: &Path,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let token = server.join_token("", 0).await;
        std::fs::create_dir_all(data_dir).unwrap();
        let bundle_path = data_dir.join("bootstrap-bundle.pem");
        std::fs::write(&bundle_path, to_pem(&server.bundle().await)).unwrap();
        let mut config = AgentConfig::new(data_dir.to_owned(), server.addr.to_string());
        // Tests run in parallel: each agent gets its own socket.
        config.socket_path = data_dir.join("public/api.sock");
        config.join_token = Some(token.token);
        config.trust_bundle = Some(bundle_path);
        configure(&mut config);
        Self::start_with(config).await
    }

    /// Starts an agent with `config`.
    pub async fn start_with(config: AgentConfig) -> Self {
        let agent = Agent::start(config).await.expect("agent starts");
        let id = agent.spiffe_id();
        let socket = agent.socket_path().to_owned();
        let metrics_addr = agent.metrics_addr();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(agent.run(stop));
        Self { id, socket, metrics_addr, shutdown, task: Some(task) }
    }

    /// Waits up to `limit` for the agent to stop by itself; its result.
    pub async fn stopped_within(
        mut self,
        limit: std::time::Duration,
    ) -> Result<(), tessera_agent::AgentError> {
        let task = self.task.take().expect("the agent runs");
        match tokio::time::timeout(limit, task).await {
            Ok(result) => surfaced("agent", result).expect("agent task"),
            Err(_) => panic!("the agent did not stop within {limit:?}"),
        }
    }

    /// The Workload API address for clients, `unix:///...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops the agent; a panic of the agent's task fails the test here
    /// (an error it stopped with does not: the test asks for that through
    /// [`RunningAgent::stopped_within`]).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            surfaced("agent", task.await);
        }
    }
}

/// The uid of this test process (what the agent's attestor will see).
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A node API client without a client certificate.
pub async fn anonymous_client(server: &TestServer) -> NodeClient<Channel> {
    let anchors = TrustAnchors::new(server.bundle().await);
    let tls = node_tls_config(anchors, &TrustDomain::new(TRUST_DOMAIN).unwrap(), None).unwrap();
    connect_node(&server.addr.to_string(), tls).await.unwrap()
}

/// PEM-encodes certificates.
pub fn to_pem(certs: &[impl AsRef<[u8]>]) -> String {
    certs.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()))).collect()
}

/// A simulated agent for benchmarks: a real node API client that attests,
/// holds its entries' SVIDs, follows its Sync stream and re-issues any SVID
/// the server revokes — what a real agent does, without workloads.
#[derive(Debug)]
pub struct SimulatedAgent {
    /// Its SPIFFE ID.
    pub id: String,
    /// Current serial per entry ID.
    pub serials: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    task: JoinHandle<()>,
}

impl SimulatedAgent {
    /// Attests agent number `index`, registers `entries` entries under it,
    /// gets their SVIDs, and follows its Sync stream. Every SVID it replaces
    /// after a revocation is reported on `replaced` as the revoked serial.
    pub async fn start(
        server: &TestServer,
        index: usize,
        entries: usize,
        replaced: tokio::sync::mpsc::UnboundedSender<(String, std::time::Instant)>,
    ) -> Self {
        let id = format!("spiffe://{TRUST_DOMAIN}/sim/agent-{index}");
        let agent =
            TestAgent::attest(server, &server.join_token(&id, 0).await.token).await.unwrap();
        let batch = (0..entries)
            .map(|j| {
                entry(
                    &format!("spiffe://{TRUST_DOMAIN}/sim/{index}/w{j}"),
                    &id,
                    &[&format!("unix:uid:{}", j + 1)],
                    None,
                )
            })
            .collect();
        let created = server
            .admin()
            .await
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch })
            .await
            .unwrap();
        let ids: Vec<String> =
            created.into_inner().results.into_iter().map(|r| r.entry.unwrap().id).collect();
        let mut client = agent.client(server).await;
        let serials = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        for (entry_id, serial) in sign(&mut client, &ids).await {
            serials.lock().unwrap().insert(entry_id, serial);
        }
        let mut stream =
            client.sync(node_pb::SyncRequest { revision: 0 }).await.unwrap().into_inner();
        let held = serials.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let Some(node_pb::sync_message::Event::Revocation(revocation)) = message.event
                else {
                    continue;
                };
                let hit: Vec<(String, String)> = held
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, serial)| revocation.serials.contains(serial))
                    .map(|(e, s)| (e.clone(), s.clone()))
                    .collect();
                if hit.is_empty() {
                    continue;
                }
                let ids: Vec<String> = hit.iter().map(|(e, _)| e.clone()).collect();
                for (entry_id, serial) in sign(&mut client, &ids).await {
                    held.lock().unwrap().insert(entry_id, serial);
                }
                let now = std::time::Instant::now();
                for (_, old) in hit {
                    let _ = replaced.send((old, now));
                }
            }
        });
        Self { id, serials, task }
    }

    /// Stops following the stream; if the follower already ended with a
    /// panic, fails with it.
    pub fn stop(mut self) {
        if self.task.is_finished() {
            if let Some(result) = futures::FutureExt::now_or_never(&mut self.task) {
                surfaced("simulated agent", result);
            }
        }
        self.task.abort();
    }
}

/// Signs SVIDs for entries through the node API; returns (entry ID, serial).
pub async fn sign(client: &mut NodeClient<Channel>, entry_ids: &[String]) -> Vec<(String, String)> {
    let items = entry_ids
        .iter()
        .map(|id| node_pb::SignX509Item { entry_id: id.clone(), csr: key_and_csr().1 })
        .collect();
    let response = client.sign_x509(node_pb::SignX509Request { items }).await.unwrap().into_inner();
    response
        .results
        .into_iter()
        .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
        .map(|r| (r.entry_id, r.serial))
        .collect()
}

/// A plain HTTP/1.1 GET: the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// What an attacker without credentials does to the node API, for the
/// tests and the benchmark's `hostile` scenario: idle sockets, certless TLS
/// connections sending large HTTP/2 frames, bogus attestations, each from
/// loopback addresses other than 127.0.0.1 (standing for other machines;
/// Linux routes all of 127.0.0.0/8 to `lo`).
pub mod hostile {
    use std::collections::HashMap;
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use rustls_pki_types::{CertificateDer, ServerName};
    use tessera_agent::node_tls_config;
    use tessera_proto::admin::admin_client::AdminClient;
    use tessera_proto::node::{self as node_pb, node_client::NodeClient};
    use tessera_workload_api::{TrustAnchors, TrustDomain};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::TRUST_DOMAIN;

    /// `127.0.<net>.<host>`.
    pub fn loopback(net: u8, host: u8) -> IpAddr {
        IpAddr::from([127, 0, net, host])
    }

    /// A TCP connection to `addr` from the local address `source`.
    pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// `n` TCP connections that never send a byte, spread over `sources`.
    pub async fn idle_sockets(addr: SocketAddr, sources: &[IpAddr], n: usize) -> Vec<TcpStream> {
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            held.push(connect_from(sources[i % sources.len()], addr).await.unwrap());
        }
        held
    }

    /// Whether the peer closed `stream` (end of file or reset) within `limit`.
    pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Keeps `n` idle TCP connections open (spread over `sources`),
    /// opening a new one whenever the server closes one, until `stop`.
    /// Answers how many connections were opened in all.
    pub fn hold_idle_sockets(
        addr: SocketAddr,
        sources: Vec<IpAddr>,
        n: usize,
        stop: CancellationToken,
    ) -> JoinHandle<u64> {
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let (source, stop) = (sources[i % sources.len()], stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut opened = 0u64;
                    while !stop.is_cancelled() {
                        if let Ok(mut stream) = connect_from(source, addr).await {
                            opened += 1;
                            let mut buf = [0u8; 1024];
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = async { while let Ok(n) = stream.read(&mut buf).await { if n == 0 { break } } } => {}
                            }
                        }
                        // Closed by the server: open another shortly.
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    opened
                }));
            }
            let mut opened = 0;
            for task in tasks {
                opened += task.await.unwrap_or(0);
            }
            opened
        })
    }

    fn certless_tls(bundle: &[CertificateDer<'static>]) -> rustls::ClientConfig {
        node_tls_config(
            TrustAnchors::new(bundle.to_vec()),
            &TrustDomain::new(TRUST_DOMAIN).unwrap(),
            None,
        )
        .unwrap()
    }

    /// A node API client without a client certificate, connecting from `source`.
    pub async fn certless_client_from(
        addr: SocketAddr,
        bundle: &[CertificateDer<'static>],
        source: IpAddr,
    ) -> Result<NodeClient<Channel>, tonic::transport::Error> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(certless_tls(bundle)));
        let channel = Endpoint::from_static("http://tessera-server.invalid")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let connector = connector.clone();
                async move {
                    let tcp = connect_from(source, addr).await?;
                    let name = ServerName::try_from("tessera-server").map_err(io::Error::other)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(NodeClient::new(channel))
    }

    /// One attestation with a made-up join token and a valid CSR.
    pub async fn bogus_attest(client: &mut NodeClient<Channel>, i: usize) -> tonic::Status {
        let request = node_pb::AttestRequest {
            join_token: format!("bogus-{i}-{}", uuid_like(i)),
            csr: super::key_and_csr().1,
        };
        match client.attest(request).await {
            Ok(_) => panic!("a bogus join token was accepted"),
            Err(status) => status,
        }
    }

    fn uuid_like(i: usize) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{:08x}{:08x}", nanos, i.wrapping_mul(2_654_435_761))
    }

    /// The typed refusal of a node API status (`tessera-refusal`), if any.
    pub fn refusal(status: &tonic::Status) -> Option<String> {
        status
            .metadata()
            .get(tessera_proto::REFUSAL_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// What one [`large_frames`] connection did.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct LargeFrames {
        /// Streams opened.
        pub streams: u64,
        /// Request bytes sent (DATA payloads).
        pub bytes: u64,
        /// The server ended the connection (not `stop`).
        pub closed_by_server: bool,
    }

    /// Flow-control state of a [`large_frames`] connection.
    #[derive(Debug)]
    struct Windows {
        connection: i64,
        initial: i64,
        streams: HashMap<u32, i64>,
        max_streams: u32,
        dead: bool,
    }

    type Writer =
        Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>>>;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// HPACK: a literal header field without indexing, new name, no Huffman.
    fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0);
        for s in [name, value] {
            assert!(s.len() < 127);
            block.push(s.len() as u8);
            block.extend_from_slice(s.as_bytes());
        }
    }

    /// One TLS connection without a client certificate that opens as many
    /// Attest streams as the server allows and on each sends a gRPC message
    /// announced as `message` bytes, all but its last byte, as fast as
    /// HTTP/2 flow control lets it (a client that obeys the protocol, so
    /// what the server buffers is what its settings allow), opening a new
    /// stream whenever the server ends one (at most `streams` at once);
    /// until `stop` or the server closes the connection. Connects from
    /// `source`.
    pub async fn large_frames(
        addr: SocketAddr,
        bundle: &[CertificateDer<'static>],
        source: IpAddr,
        message: usize,
        streams: u32,
        stop: CancellationToken,
    ) -> LargeFrames {
        let mut report = LargeFrames::default();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(certless_tls(bundle)));
        let Ok(tcp) = connect_from(source, addr).await else {
            report.closed_by_server = true;
            return report;
        };
        let name = ServerName::try_from("tessera-server").unwrap();
        let Ok(Ok(tls)) =
            tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await
        else {
            report.closed_by_server = true;
            return report;
        };
        let (mut reader, writer) = tokio::io::split(tls);
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
        let windows = Arc::new(std::sync::Mutex::new(Windows {
            connection: 65_535,
            initial: 65_535,
            streams: HashMap::new(),
            max_streams: 100,
            dead: false,
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        {
            let mut w = writer.lock().await;
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend(frame(0x4, 0, 0, &[]));
            if w.write_all(&hello).await.is_err() {
                report.closed_by_server = true;
                return report;
            }
        }
        // Reads the server's frames: settings, window updates, stream ends.
        let reading = {
            let (windows, writer, wake) = (windows.clone(), writer.clone(), wake.clone());
            tokio::spawn(async move {
                let mut header = [0u8; 9];
                loop {
                    if reader.read_exact(&mut header).await.is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                    let (kind, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    if reader.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    let mut reply = None;
                    let mut ended = false;
                    {
                        let mut w = windows.lock().unwrap();
                        match kind {
                            0x4 if flags & 1 == 0 => {
                                for setting in payload.chunks_exact(6) {
                                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                                    let value = u32::from_be_bytes([
                                        setting[2], setting[3], setting[4], setting[5],
                                    ]);
                                    match id {
                                        3 => w.max_streams = value,
                                        4 => {
                                            let delta = i64::from(value) - w.initial;
                                            w.initial = i64::from(value);
                                            for window in w.streams.values_mut() {
                                                *window += delta;
                                            }
                                        }
                                        _ => {}
                                    }
                                }
                                reply = Some(frame(0x4, 1, 0, &[]));
                            }
                            0x8 if payload.len() == 4 => {
                                let inc = i64::from(
                                    u32::from_be_bytes([
                                        payload[0], payload[1], payload[2], payload[3],
                                    ]) & 0x7fff_ffff,
                                );
                                if stream == 0 {
                                    w.connection += inc;
                                } else if let Some(window) = w.streams.get_mut(&stream) {
                                    *window += inc;
                                }
                            }
                            0x3 => {
                                w.streams.remove(&stream);
                            }
                            0x0 | 0x1 if flags & 1 == 1 => {
                                ended = w.streams.remove(&stream).is_some();
                            }
                            0x6 if flags & 1 == 0 => reply = Some(frame(0x6, 1, 0, &payload)),
                            0x7 => {
                                w.dead = true;
                            }
                            _ => {}
                        }
                    }
                    if ended {
                        // Our side of a stream the server answered.
                        reply = Some(frame(0x3, 0, stream, &8u32.to_be_bytes()));
                    }
                    if let Some(bytes) = reply {
                        if writer.lock().await.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    wake.notify_one();
                }
                windows.lock().unwrap().dead = true;
                wake.notify_one();
            })
        };
        let zeros = vec![0u8; 16_384];
        let mut headers = Vec::new();
        literal(&mut headers, ":method", "POST");
        literal(&mut headers, ":scheme", "https");
        literal(&mut headers, ":path", "/tessera.node.v1.Node/Attest");
        literal(&mut headers, ":authority", "tessera-server");
        literal(&mut headers, "content-type", "application/grpc");
        literal(&mut headers, "te", "trailers");
        let mut next_id = 1u32;
        // Bytes still to send, per open stream.
        let mut open: HashMap<u32, usize> = HashMap::new();
        'attack: while !stop.is_cancelled() {
            let mut out = Vec::new();
            {
                let mut w = windows.lock().unwrap();
                if w.dead {
                    report.closed_by_server = true;
                    break 'attack;
                }
                open.retain(|id, _| w.streams.contains_key(id));
                while (open.len() as u32) < w.max_streams.min(streams) && w.connection >= 5 {
                    let id = next_id;
                    next_id += 2;
                    out.extend(frame(0x1, 0x4, id, &headers));
                    let mut prefix = vec![0u8];
                    prefix.extend_from_slice(&(message as u32).to_be_bytes());
                    out.extend(frame(0x0, 0, id, &prefix));
                    let initial = w.initial;
                    w.streams.insert(id, initial - 5);
                    w.connection -= 5;
                    open.insert(id, message.saturating_sub(1));
                    report.streams += 1;
                }
                for (id, left) in open.iter_mut() {
                    let window = w.streams.get(id).copied().unwrap_or(0);
                    let n = (*left as i64).min(16_384).min(window).min(w.connection);
                    if n <= 0 {
                        continue;
                    }
                    out.extend(frame(0x0, 0, *id, &zeros[..n as usize]));
                    *left -= n as usize;
                    w.connection -= n;
                    if let Some(window) = w.streams.get_mut(id) {
                        *window -= n;
                    }
                    report.bytes += n as u64;
                    if out.len() > 256 * 1024 {
                        break;
                    }
                }
            }
            if out.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => break 'attack,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            if writer.lock().await.write_all(&out).await.is_err() {
                report.closed_by_server = true;
                break;
            }
        }
        reading.abort();
        report
    }

    /// A `tessera-server run` process on loopback with its own data dir.
    #[derive(Debug)]
    pub struct ServerProcess {
        /// Node API address.
        pub addr: SocketAddr,
        /// Data dir.
        pub data_dir: PathBuf,
        /// Admin socket.
        pub admin_socket: PathBuf,
        child: std::process::Child,
    }

    impl ServerProcess {
        /// Starts `bin` (the `tessera-server` binary) with a config file made
        /// of the basics and `extra` (TOML lines); returns once it serves.
        pub async fn start(bin: &Path, data_dir: &Path, extra: &str) -> Self {
            std::fs::create_dir_all(data_dir).unwrap();
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let config = data_dir.join("server.toml");
            let store = data_dir.join("data");
            std::fs::write(
                &config,
                format!(
                    "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nbind = \"{addr}\"\nlog_level = \"warn\"\n{extra}\n",
                    store.display()
                ),
            )
            .unwrap();
            let child = std::process::Command::new(bin)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let admin_socket = store.join("admin.sock");
            let server = Self { addr, data_dir: store, admin_socket, child };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(mut admin) = tessera_server::connect_admin(&server.admin_socket).await {
                    if admin.get_bundle(tessera_proto::admin::GetBundleRequest {}).await.is_ok() {
                        break;
                    }
                }
                assert!(std::time::Instant::now() < deadline, "tessera-server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            server
        }

        /// Its process ID.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Its resident memory, MiB.
        pub fn rss_mb(&self) -> f64 {
            rss_mb(self.child.id())
        }

        /// An admin API client.
        pub async fn admin(&self) -> AdminClient<Channel> {
            tessera_server::connect_admin(&self.admin_socket).await.unwrap()
        }

        /// The trust bundle.
        pub async fn bundle(&self) -> Vec<CertificateDer<'static>> {
            let bundle = self
                .admin()
                .await
                .get_bundle(tessera_proto::admin::GetBundleRequest {})
                .await
                .unwrap()
                .into_inner();
            bundle.authorities.into_iter().map(CertificateDer::from).collect()
        }
    }

    impl Drop for ServerProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Resident memory of process `pid`, MiB (`VmRSS`).
    pub fn rss_mb(pid: u32) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// The store's write sequence (one per commit), from the watermark file
    /// the sled store keeps in `<data_dir>/store`.
    pub fn write_seq(data_dir: &Path) -> u64 {
        let bytes = std::fs::read(data_dir.join("store/tessera.watermark")).unwrap();
        u64::from_be_bytes(bytes[8..16].try_into().unwrap())
    }

    /// Stored events of `kind`.
    pub async fn events_of_kind(
        admin: &mut AdminClient<Channel>,
        kind: &str,
    ) -> Vec<tessera_proto::types::Event> {
        let mut stream = admin
            .list_events(tessera_proto::admin::ListEventsRequest {
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = stream.message().await.unwrap() {
            out.push(e);
        }
        out
    }

    /// An event's attribute.
    pub fn attr<'a>(e: &'a tessera_proto::types::Event, key: &str) -> Option<&'a str> {
        e.attrs.iter().find(|a| a.key == key).map(|a| a.value.as_str())
    }
}
