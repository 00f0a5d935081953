//! Child processes: this binary started again in a mode of its own, so that
//! a server or an agent is alone in its process (its memory can be measured)
//! or an attacker runs as a process (and uid) of its own. Each child prints
//! `READY …` once started and runs until its stdin closes. Both sides live
//! here: the children themselves (`run_child`) and how the parent starts,
//! measures and stops them (`Child`); the plain signer's child is in
//! `plain_signer.rs`, started from here. Uses no other bench file.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_agent::{cli_request, connect_workload_api};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;

/// An admin API client.
pub type AdminClient = admin_pb::admin_client::AdminClient<tonic::transport::Channel>;

/// The modes: the first argument names one.
const SERVER: &str = "__server";
const AGENT: &str = "__agent";
const WORKLOAD_FLOOD: &str = "__workload_flood";
const NODE_ATTACK: &str = "__node_attack";
/// `plain_signer.rs` runs this child: it needs more than this file holds.
pub const PLAIN_SIGNER: &str = "__plain_signer";

/// Runs the child that `args` names, if they name one, to its exit code.
pub async fn run_child(args: &[String]) -> Option<ExitCode> {
    let code = match args.first().map(String::as_str) {
        Some(SERVER) => child_server(&args[1..]).await,
        Some(AGENT) => child_agent(&args[1..]).await,
        Some(WORKLOAD_FLOOD) => child_workload_flood(&args[1..]).await,
        Some(NODE_ATTACK) => child_node_attack(&args[1..]).await,
        _ => return None,
    };
    Some(code)
}

/// Returns once the parent closes this child's stdin.
pub async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

async fn child_server(args: &[String]) -> ExitCode {
    let dir = std::path::PathBuf::from(&args[0]);
    let mut config = tessera_tests::test_config(&dir);
    // The per-agent signing budget protects the server from one agent; it
    // must not cap a throughput measurement.
    config.sign_rate = 10_000_000;
    config.sign_burst = 10_000_000;
    config.events.enabled = !args.iter().any(|a| a == "--no-events");
    config.datastore = args.iter().find_map(|a| a.strip_prefix("--datastore=")).map(str::to_string);
    if let Some(max) = args.iter().find_map(|a| a.strip_prefix("--max-connections=")) {
        config.node_max_connections = max.parse().expect("--max-connections=N");
    }
    if let Some(keep) = args.iter().find_map(|a| a.strip_prefix("--change-log-keep=")) {
        config.change_log_keep = keep.parse().expect("--change-log-keep=N");
    }
    let server =
        tessera_server::Server::bind(config, std::sync::Arc::new(tessera_server::SystemClock))
            .await
            .expect("server binds");
    println!("READY {}", server.node_addr().unwrap());
    if let Some(file) = args.iter().find_map(|a| a.strip_prefix("--heap-file=")) {
        write_heap_stats(file.into());
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        until_stdin_closes().await;
        stop.cancel();
    });
    server.run(shutdown).await.expect("server runs");
    ExitCode::SUCCESS
}

/// Writes the allocator's figures to `file` every 5 s (`allocated
/// resident metadata`, bytes; replaced whole), for the soak to read. A write that
/// fails removes the file, so that the soak sees no figure rather than a
/// stale one.
///
/// In a build with the `heap-profiling` feature and
/// `TESSERA_BENCH_HEAP_PROFILES=DIR` set, it also writes jemalloc's heap
/// profile to `DIR/server-<minutes>m.heap` every five minutes, for `jeprof
/// --base` to compare two points of a soak.
fn write_heap_stats(file: std::path::PathBuf) {
    #[cfg(feature = "heap-profiling")]
    let profiles = std::env::var_os("TESSERA_BENCH_HEAP_PROFILES").map(std::path::PathBuf::from);
    #[cfg(feature = "heap-profiling")]
    let mut ticks = 0u64;
    std::thread::spawn(move || loop {
        #[cfg(feature = "heap-profiling")]
        {
            if let Some(dir) = &profiles {
                if ticks.is_multiple_of(60) {
                    let path = dir.join(format!("server-{}m.heap", ticks / 12));
                    if let Err(e) = tessera_common::heap::dump_profile(&path) {
                        eprintln!("{e}");
                    }
                }
            }
            ticks += 1;
        }
        let tmp = file.with_extension("tmp");
        let written = tessera_common::heap::stats()
            .ok_or_else(|| std::io::Error::other("jemalloc gave no statistics"))
            .and_then(|s| {
                std::fs::write(&tmp, format!("{} {} {}\n", s.allocated, s.resident, s.metadata))
            })
            .and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            eprintln!("heap figures not written to {}: {e}", file.display());
            let _ = std::fs::remove_file(&file);
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
}

async fn child_agent(args: &[String]) -> ExitCode {
    let mut config = tessera_agent::AgentConfig::new(args[0].clone().into(), args[1].clone());
    config.socket_path = match args.iter().find_map(|a| a.strip_prefix("--socket=")) {
        Some(path) => path.into(),
        None => std::path::Path::new(&args[0]).join("public/api.sock"),
    };
    if !args.iter().any(|a| a == "--default-limits") {
        // One uid stands in for 1,000 workloads here: lift the per-uid limits.
        config.workload_limits.connections_per_uid = 100_000;
        config.workload_limits.streams_per_uid = 100_000;
    }
    config.join_token = Some(args[2].clone());
    config.trust_bundle = Some(args[3].clone().into());
    let agent = tessera_agent::Agent::start(config).await.expect("agent starts");
    println!("READY {}", agent.socket_path().display());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        until_stdin_closes().await;
        stop.cancel();
    });
    agent.run(shutdown).await.expect("agent runs");
    ExitCode::SUCCESS
}

/// An attacker on the Workload API, run as another uid: `N` connections
/// each holding a FetchX509SVID stream (reopened a second after any
/// refusal or end) until stdin closes.
async fn child_workload_flood(args: &[String]) -> ExitCode {
    let endpoint = args[0].clone();
    let n: usize = args[1].parse().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..n {
        let (endpoint, stop) = (endpoint.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut client) = connect_workload_api(&endpoint).await {
                    if let Ok(response) =
                        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await
                    {
                        let mut stream = response.into_inner();
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = async { while let Ok(Some(_)) = stream.message().await {} } => {}
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    println!("READY {n}");
    until_stdin_closes().await;
    stop.cancel();
    ExitCode::SUCCESS
}

/// An attacker on the node API at `addr` (`hostile` scenario (a), (b) or
/// (c)), until stdin closes; then writes how much it did (connections
/// opened, bytes sent, bogus attestations) to the file named last.
async fn child_node_attack(args: &[String]) -> ExitCode {
    use tessera_tests::hostile::{self, loopback};
    let (kind, addr) = (args[0].as_str(), args[1].parse::<std::net::SocketAddr>().unwrap());
    let bundle: Vec<CertificateDer<'static>> = pem::parse_many(std::fs::read(&args[2]).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents().into())
        .collect();
    let sources =
        |net: u8, n: u8| -> Vec<std::net::IpAddr> { (1..=n).map(|h| loopback(net, h)).collect() };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks: Vec<tokio::task::JoinHandle<u64>> = Vec::new();
    match kind {
        "a" => tasks.push(hostile::hold_idle_sockets(addr, sources(10, 32), 1_000, stop.clone())),
        "b" => {
            for source in sources(11, 4).into_iter().cycle().take(64) {
                let (bundle, stop) = (bundle.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut bytes = 0;
                    while !stop.is_cancelled() {
                        let report =
                            hostile::large_frames(addr, &bundle, source, 4 << 20, 32, stop.clone())
                                .await;
                        bytes += report.bytes;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    bytes
                }));
            }
        }
        _ => {
            for source in sources(12, 8) {
                for _ in 0..4 {
                    let (bundle, stop) = (bundle.clone(), stop.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut sent = 0u64;
                        let Ok(mut client) =
                            hostile::certless_client_from(addr, &bundle, source).await
                        else {
                            return 0;
                        };
                        while !stop.is_cancelled() {
                            hostile::bogus_attest(&mut client, sent as usize).await;
                            sent += 1;
                        }
                        sent
                    }));
                }
            }
        }
    }
    println!("READY {kind}");
    until_stdin_closes().await;
    stop.cancel();
    let mut work = 0u64;
    for task in tasks {
        work += task.await.unwrap_or(0);
    }
    let _ = std::fs::write(&args[3], work.to_string());
    ExitCode::SUCCESS
}

/// A child process started in one of the modes above.
pub struct Child {
    pub process: std::process::Child,
    /// What it said after `READY`: a server's node API address, an agent's
    /// socket path.
    pub ready: String,
}

impl Child {
    /// A server on the data dir `dir`; `flags`: `--no-events`,
    /// `--datastore=URL`, `--max-connections=N` (node API),
    /// `--heap-file=PATH` (its allocator's figures written there),
    /// `--change-log-keep=N`.
    pub fn server(dir: &Path, flags: &[&str]) -> Self {
        let dir = dir.display().to_string();
        Self::start(None, &[SERVER, &dir], flags)
    }

    /// An agent on the data dir `dir`, attesting to the server at `server`
    /// with `token`, trusting the PEM file `bundle`; `flags`:
    /// `--socket=PATH`, `--default-limits`.
    pub fn agent(dir: &Path, server: &str, token: &str, bundle: &Path, flags: &[&str]) -> Self {
        let (dir, bundle) = (dir.display().to_string(), bundle.display().to_string());
        Self::start(None, &[AGENT, &dir, server, token, &bundle], flags)
    }

    /// `connections` Workload API streams held on `endpoint`, run as `uid`
    /// (and gid).
    pub fn workload_flood(uid: u32, endpoint: &str, connections: usize) -> Self {
        Self::start(Some(uid), &[WORKLOAD_FLOOD, endpoint, &connections.to_string()], &[])
    }

    /// The plain signer (`plain_signer.rs`) on the CA of the stopped
    /// server whose data dir is `dir`.
    pub fn plain_signer(dir: &Path) -> Self {
        Self::start(None, &[PLAIN_SIGNER, &dir.display().to_string()], &[])
    }

    /// The node API attack `kind` on the server at `server` (whose bundle is
    /// the PEM file `bundle`); its count of work goes to `work_file`.
    pub fn node_attack(kind: &str, server: &str, bundle: &Path, work_file: &Path) -> Self {
        let (bundle, work_file) = (bundle.display().to_string(), work_file.display().to_string());
        Self::start(None, &[NODE_ATTACK, kind, server, &bundle, &work_file], &[])
    }

    /// Starts a child with `args` then `flags`, as `uid` (and gid) when
    /// given, and waits for its `READY` line.
    fn start(uid: Option<u32>, args: &[&str], flags: &[&str]) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let mut process = command
            .args(args)
            .args(flags)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("child said {line:?}"))
            .to_string();
        Self { process, ready }
    }

    /// Its resident memory, MiB.
    pub fn rss_mb(&self) -> f64 {
        tessera_tests::hostile::rss_mb(self.process.id())
    }

    /// Closes its stdin and waits for it to exit.
    pub fn stop(mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

/// An admin client on the server whose data dir is `dir`.
pub async fn admin_at(dir: &Path) -> AdminClient {
    tessera_server::connect_admin(&dir.join("admin.sock")).await.unwrap()
}

/// The server's trust bundle.
pub async fn bundle_of(admin: &mut AdminClient) -> Vec<CertificateDer<'static>> {
    admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .authorities
        .into_iter()
        .map(Into::into)
        .collect()
}

/// A server in its own process (events on or off), an admin client on it,
/// its node API address and its bundle.
pub async fn server_and_admin(
    events: bool,
    datastore: Option<&str>,
) -> (tempfile::TempDir, Child, AdminClient, std::net::SocketAddr, Vec<CertificateDer<'static>>) {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut flags = Vec::new();
    if !events {
        flags.push("--no-events".to_string());
    }
    flags.extend(datastore.map(|url| format!("--datastore={url}")));
    let server = Child::server(&server_dir, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let mut admin = admin_at(&server_dir).await;
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle = bundle_of(&mut admin).await;
    (dir, server, admin, addr, bundle)
}

/// A join token (valid 600 s) for `spiffe_id` (empty: the default agent ID).
pub async fn join_token(admin: &mut AdminClient, spiffe_id: &str) -> String {
    admin
        .create_join_token(admin_pb::CreateJoinTokenRequest {
            ttl: 600,
            spiffe_id: spiffe_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A simulated agent `id` attested with a fresh join token through the
/// node API at `addr` (the server `admin` is on).
pub async fn attest_simulated(
    admin: &mut AdminClient,
    addr: std::net::SocketAddr,
    bundle: &[CertificateDer<'static>],
    id: &str,
) -> tessera_tests::TestAgent {
    let token = join_token(admin, id).await;
    tessera_tests::TestAgent::attest_to(addr, bundle.to_vec(), &token).await.unwrap()
}

/// A simulated agent's node API client and its Sync stream, opened with no
/// revision (so it starts with a snapshot of the agent's entries).
pub async fn open_sync(
    agent: &tessera_tests::TestAgent,
) -> (
    tessera_proto::node::node_client::NodeClient<tonic::transport::Channel>,
    tonic::Streaming<tessera_proto::node::SyncMessage>,
) {
    let mut client = agent.connect().await;
    let stream =
        client.sync(tessera_proto::node::SyncRequest { revision: 0 }).await.unwrap().into_inner();
    (client, stream)
}
