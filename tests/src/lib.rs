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
pub mod hostile;

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
