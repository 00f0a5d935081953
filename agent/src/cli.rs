//! The `tessera-agent` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tessera_proto::workload as pb;
use tessera_workload_api::TrustDomain;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentConfig, DEFAULT_DATA_DIR, DEFAULT_SOCKET_PATH};
pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError};
use crate::identity::write_private;
use crate::workload_client::{
    connect_workload_api, decode_response, fetch_x509, with_header, FetchedSvid,
};

/// Tessera agent: node attestation and the SPIFFE Workload API.
#[derive(Debug, Parser)]
#[command(name = "tessera-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Use the Workload API as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Check that the agent serves the Workload API.
    Healthcheck(SocketArg),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data directory [default: ./.tessera/agent].
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Server node API address, host:port.
    #[arg(long, default_value = "127.0.0.1:8081")]
    server_address: String,
    /// Join token (needed only when the agent has no valid stored SVID).
    /// Visible to other users in the process list: prefer
    /// --join-token-file or the TESSERA_JOIN_TOKEN environment variable.
    #[arg(long, conflicts_with = "join_token_file")]
    join_token: Option<String>,
    /// File holding the join token (surrounding whitespace ignored).
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Bootstrap trust bundle, PEM (needed until the agent has stored one).
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Trust domain [default: from the bundle].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Workload API socket [default: /tmp/tessera-agent/public/api.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Log filter, e.g. info or debug.
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Debug, Args)]
struct SocketArg {
    /// Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET or /tmp/tessera-agent/public/api.sock].
    #[arg(long)]
    socket: Option<String>,
}

impl SocketArg {
    fn address(&self) -> String {
        self.socket
            .clone()
            .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
            .unwrap_or_else(|| format!("unix://{DEFAULT_SOCKET_PATH}"))
    }
}

/// The environment variable the join token may come from.
pub const JOIN_TOKEN_ENV: &str = "TESSERA_JOIN_TOKEN";

/// The join token from `--join-token`, else `--join-token-file`, else the
/// environment ([`JOIN_TOKEN_ENV`]); `None` when none is given.
fn join_token(
    flag: Option<String>,
    file: Option<&std::path::Path>,
    env: Option<String>,
) -> Result<Option<String>, CliError> {
    let token = match (flag, file) {
        (Some(token), _) => token,
        (None, Some(file)) => std::fs::read_to_string(file).map_err(|e| {
            CliError(format!("cannot read --join-token-file {}: {e}", file.display()))
        })?,
        (None, None) => match env {
            Some(token) => token,
            None => return Ok(None),
        },
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(CliError("the join token is empty".into()));
    }
    Ok(Some(token.to_string()))
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch this process's X509-SVIDs once.
    Fetch {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Write svid.pem, svid.key (0600) and bundle.pem into DIR.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Print every X509-SVID update until interrupted.
    Watch {
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// Prints one SVID the way `api fetch` does.
pub fn print_svid(svid: &FetchedSvid) {
    println!("SPIFFE ID:     {}", svid.spiffe_id);
    println!("Serial:        {}", svid.serial);
    println!("Expires at:    {}", format_time(svid.expires_at));
    if !svid.hint.is_empty() {
        println!("Hint:          {}", svid.hint);
    }
}

fn svid_json(svid: &FetchedSvid) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": svid.spiffe_id,
        "serial": svid.serial,
        "expires_at": svid.expires_at,
        "hint": svid.hint,
        "chain_length": svid.chain.len(),
    })
}

fn write_files(dir: &std::path::Path, svid: &FetchedSvid) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
    let certs = |der: &[Vec<u8>]| -> String {
        der.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.clone()))).collect()
    };
    let write = |name: &str, data: String| -> Result<(), CliError> {
        write_private(&dir.join(name), data.as_bytes()).map_err(|e| CliError(e.to_string()))
    };
    write("svid.key", pem::encode(&pem::Pem::new("PRIVATE KEY", svid.key.clone())))?;
    write("svid.pem", certs(&svid.chain))?;
    write("bundle.pem", certs(&svid.bundle))
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Run(args) => run_agent(args).await,
            Command::Api(ApiCommand::Fetch { socket, json, write }) => {
                let svids = fetch_x509(&socket.address()).await?;
                if let (Some(dir), Some(first)) = (&write, svids.first()) {
                    write_files(dir, first)?;
                }
                if json {
                    let list: Vec<_> = svids.iter().map(svid_json).collect();
                    println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
                } else {
                    for svid in &svids {
                        print_svid(svid);
                    }
                    if let Some(dir) = &write {
                        println!("Wrote svid.pem, svid.key and bundle.pem to {}", dir.display());
                    }
                }
                Ok(())
            }
            Command::Api(ApiCommand::Watch { socket }) => {
                let mut client = connect_workload_api(&socket.address()).await?;
                let mut stream = client
                    .fetch_x509svid(with_header(pb::X509svidRequest {}))
                    .await
                    .map_err(|s| CliError(s.message().to_string()))?
                    .into_inner();
                loop {
                    let message = tokio::select! {
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        message = stream.message() => message.map_err(|s| CliError(s.message().to_string()))?,
                    };
                    let Some(response) = message else {
                        return Err(CliError("the agent closed the stream".into()));
                    };
                    println!("--- update at {}", format_time(crate::manager::now()));
                    for svid in decode_response(response)? {
                        print_svid(&svid);
                    }
                }
            }
            Command::Healthcheck(socket) => {
                let mut client = connect_workload_api(&socket.address())
                    .await
                    .map_err(|e| CliError(format!("agent is unhealthy: {e}")))?;
                let mut stream = client
                    .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
                    .await
                    .map_err(|s| CliError(format!("agent is unhealthy: {}", s.message())))?
                    .into_inner();
                match stream.message().await {
                    Ok(Some(_)) => {
                        println!("Agent is healthy.");
                        Ok(())
                    }
                    Ok(None) => Err(CliError("agent is unhealthy: stream closed".into())),
                    Err(s) => Err(CliError(format!("agent is unhealthy: {}", s.message()))),
                }
            }
        }
    }
}

async fn run_agent(args: RunArgs) -> Result<(), CliError> {
    init_logging(&args.log_level);
    let mut config = AgentConfig::new(args.data_dir, args.server_address);
    config.join_token = join_token(
        args.join_token,
        args.join_token_file.as_deref(),
        std::env::var(JOIN_TOKEN_ENV).ok(),
    )?;
    config.trust_bundle = args.trust_bundle;
    config.trust_domain = args
        .trust_domain
        .map(|td| TrustDomain::new(&td))
        .transpose()
        .map_err(|e| CliError(format!("invalid --trust-domain: {e}")))?;
    if let Some(socket) = args.socket {
        config.socket_path = socket;
    }
    let agent = Agent::start(config).await.map_err(|e| CliError(e.to_string()))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    agent.run(shutdown).await.map_err(|e| CliError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_comes_from_flag_file_or_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let env = || Some("from-env".to_string());
        let flag = || Some("from-flag".to_string());
        assert_eq!(join_token(flag(), None, env()).unwrap().as_deref(), Some("from-flag"));
        assert_eq!(join_token(None, Some(&file), env()).unwrap().as_deref(), Some("from-file"));
        assert_eq!(join_token(None, None, env()).unwrap().as_deref(), Some("from-env"));
        assert_eq!(join_token(None, None, None).unwrap(), None);
        let missing = join_token(None, Some(&dir.path().join("nope")), None).unwrap_err();
        assert!(missing.0.contains("cannot read --join-token-file"), "{missing}");
        std::fs::write(&file, " \n").unwrap();
        assert!(join_token(None, Some(&file), None).unwrap_err().0.contains("empty"));
    }
}
