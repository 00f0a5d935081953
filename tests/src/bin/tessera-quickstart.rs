//! `tessera-quickstart`: starts a Tessera server and agent on embedded
//! defaults under `./.tessera`, registers an entry for the invoking user's
//! uid, fetches that user's X509-SVID through the Workload API (a real
//! client on the real socket) and keeps both running until Ctrl-C.
//! Run again, it reuses its data dirs.
#![forbid(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tessera_agent::{fetch_x509, Agent, AgentConfig};
use tessera_proto::admin as admin_pb;
use tessera_proto::types;
use tessera_server::{Config, Server, SystemClock};
use tessera_workload_api::TrustDomain;
use tokio_util::sync::CancellationToken;

const TRUST_DOMAIN: &str = "example.org";
const AGENT_ID: &str = "spiffe://example.org/tessera/agent/quickstart";

/// jemalloc, as every Tessera binary (`tessera_common::heap` says why).
#[global_allocator]
static ALLOCATOR: tessera_common::heap::Allocator = tessera_common::heap::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    tessera_common::cli_support::small_pages_only();
    tessera_server::cli::init_logging(
        "warn,tessera::audit=error",
        tessera_server::cli::LogFormat::Text,
    );
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How to run `name` from here: the binary built next to this one (the
/// README's command builds them all), else through cargo.
fn binary(name: &str) -> String {
    let built = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(name)));
    match built.filter(|path| path.is_file()) {
        Some(path) => {
            let cwd = std::env::current_dir().unwrap_or_default();
            path.strip_prefix(&cwd).map_or(path.clone(), PathBuf::from).display().to_string()
        }
        None => format!("cargo run -q --bin {name} --"),
    }
}

async fn run() -> Result<(), String> {
    let base = std::env::current_dir().map_err(|e| e.to_string())?.join(".tessera");
    let trust_domain = TrustDomain::new(TRUST_DOMAIN).map_err(|e| e.to_string())?;
    let config = Config::new(trust_domain, base.join("server"));
    let admin_socket = config.admin_socket.clone();
    let server = Server::bind(config, Arc::new(SystemClock))
        .await
        .map_err(|e| format!("cannot start the server: {e} (is another quickstart running?)"))?;
    let node_addr = server.node_addr().map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server.run(shutdown.clone()));
    println!(
        "server   trust domain {TRUST_DOMAIN}, node API {node_addr}, admin socket {}",
        admin_socket.display()
    );

    let mut admin = tessera_server::connect_admin(&admin_socket).await?;
    let agent_dir = base.join("agent");
    let token = quickstart_token(&mut admin, &agent_dir).await?;
    let bundle = admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    std::fs::create_dir_all(&agent_dir).map_err(|e| format!("{}: {e}", agent_dir.display()))?;
    let bootstrap = agent_dir.join("bootstrap-bundle.pem");
    let pem: String = bundle
        .authorities
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.clone())))
        .collect();
    std::fs::write(&bootstrap, pem).map_err(|e| format!("{}: {e}", bootstrap.display()))?;

    let uid = std::fs::metadata("/proc/self").map_err(|e| e.to_string())?.uid();
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/user/{uid}");
    let entry = types::Entry {
        spiffe_id: spiffe_id.clone(),
        parent_id: AGENT_ID.into(),
        selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{uid}") }],
        ..Default::default()
    };
    let result = admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![entry] })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .results
        .pop()
        .and_then(|r| r.status)
        .unwrap_or_default();
    match result.code {
        0 => println!("entry    {spiffe_id} for unix:uid:{uid}, served by {AGENT_ID}"),
        c if c == tonic::Code::AlreadyExists as i32 => {
            println!("entry    {spiffe_id} (already registered)")
        }
        _ => return Err(format!("cannot register the entry: {}", result.message)),
    }

    let mut agent_config = AgentConfig::new(agent_dir.clone(), node_addr.to_string());
    agent_config.join_token = token;
    agent_config.trust_bundle = Some(bootstrap);
    let agent =
        Agent::start(agent_config).await.map_err(|e| format!("cannot start the agent: {e}"))?;
    let socket: PathBuf = agent.socket_path().to_owned();
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    let endpoint = format!("unix://{}", socket.display());
    println!("agent    {AGENT_ID}, Workload API {endpoint}");

    let svids =
        fetch_x509(&endpoint).await.map_err(|e| format!("Workload API fetch failed: {e}"))?;
    println!();
    println!("Fetched through the SPIFFE Workload API:");
    for svid in &svids {
        tessera_agent::cli::print_svid(svid);
    }
    println!();
    let (agent_bin, server_bin) = (binary("tessera-agent"), binary("tessera-server"));
    println!("Use it from another shell:");
    println!("  export SPIFFE_ENDPOINT_SOCKET={endpoint}");
    println!("  export TESSERA_ADMIN_SOCKET={}", admin_socket.display());
    println!("  {agent_bin} api fetch --write /tmp/svid");
    println!("  {agent_bin} api fetch jwt --audience my-api");
    println!("  {server_bin} entry show");
    println!();
    println!("Server and agent are running; press Ctrl-C to stop.");

    tessera_server::cli::wait_for_signal().await;
    println!("stopping");
    shutdown.cancel();
    let _ = agent_task.await;
    let _ = server_task.await;
    Ok(())
}

/// A join token for the quickstart agent; none when the agent is already on
/// record and keeps its SVID in `agent_dir` (a second run restarts it on
/// that SVID, as a node does). An agent on record without its SVID (its data
/// dir removed) is evicted first: a token for a live agent's ID is refused.
async fn quickstart_token(
    admin: &mut tessera_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    agent_dir: &std::path::Path,
) -> Result<Option<String>, String> {
    let request = || admin_pb::CreateJoinTokenRequest { ttl: 600, spiffe_id: AGENT_ID.into() };
    match admin.create_join_token(request()).await {
        Ok(token) => return Ok(Some(token.into_inner().token)),
        Err(s) if s.code() != tonic::Code::FailedPrecondition => {
            return Err(s.message().to_string())
        }
        Err(_) if agent_dir.join("agent_svid.pem").exists() => return Ok(None),
        Err(_) => {}
    }
    admin
        .evict_agent(admin_pb::EvictAgentRequest { spiffe_id: AGENT_ID.into(), unban: false })
        .await
        .map_err(|s| s.message().to_string())?;
    let token = admin.create_join_token(request()).await.map_err(|s| s.message().to_string())?;
    Ok(Some(token.into_inner().token))
}
