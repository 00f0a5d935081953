//! The `tessera-agent` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tessera_proto::workload as pb;
use tessera_workload_api::TrustDomain;

use crate::agent::{Agent, AgentConfig, DEFAULT_DATA_DIR, DEFAULT_SOCKET_PATH};
pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError, LogFormat};
use crate::fetch::{jwt_json, report_written, svid_json, write_jwt, write_x509};
use crate::workload::client::{
    connect_workload_api, decode_response, fetch_x509_with_federated, with_header, FetchedSvid,
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
    /// Check the agent's health: what a workload would get now (exits
    /// non-zero when unhealthy, and says why).
    Healthcheck(SocketArg),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data directory.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Server node API address, host:port. Give it several times (or
    /// comma-separated, or a name resolving to several addresses) for
    /// several servers: the agent spreads over them and fails over.
    #[arg(long, default_value = "127.0.0.1:8081", value_delimiter = ',', num_args = 1)]
    server_address: Vec<String>,
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
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Serve Prometheus metrics, /live and /ready on this address (off by default).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Most bytes of events kept in the spool while the server is away
    /// [default: 64 MiB]; past it, events are counted, not kept.
    #[arg(long)]
    event_spool_bytes: Option<u64>,
    /// Do not record Workload API events (they are still logged). Only for
    /// measuring what the event stream costs.
    #[arg(long)]
    no_events: bool,
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
    /// Fetch this process's X509-SVIDs once (or, with a subcommand, JWT-SVIDs
    /// or the JWT bundle).
    #[command(args_conflicts_with_subcommands = true)]
    Fetch {
        #[command(subcommand)]
        what: Option<FetchCommand>,
        #[command(flatten)]
        x509: X509Args,
    },
    /// Print every X509-SVID update until interrupted.
    Watch {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Validate a token through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
}

#[derive(Debug, Args)]
struct X509Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Write every SVID into DIR: svid.N.pem, svid.N.key (0600),
    /// bundle.N.pem, federated_bundle.N.M.pem; prints which holds which ID.
    #[arg(long)]
    write: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum FetchCommand {
    /// Fetch this process's X509-SVIDs once (what `api fetch` does).
    X509(X509Args),
    /// Fetch JWT-SVIDs for an audience (one per identity, unless --spiffe-id).
    Jwt {
        /// Audience the token is for (repeatable; at least one).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Write each token into DIR as jwt_svid.N.token (0600); prints
        /// which holds which ID.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print the JWT bundles (JWK Sets) by trust domain.
    JwtBundle {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID for an audience; prints its SPIFFE ID and claims.
    Jwt {
        /// The audience the token must be for.
        #[arg(long)]
        audience: String,
        /// The token.
        token: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// Prints one SVID the way `api fetch` does.
pub fn print_svid(svid: &FetchedSvid) {
    crate::outln!("SPIFFE ID:     {}", svid.spiffe_id);
    crate::outln!("Serial:        {}", svid.serial);
    crate::outln!("Expires at:    {}", format_time(svid.expires_at));
    if !svid.hint.is_empty() {
        crate::outln!("Hint:          {}", svid.hint);
    }
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Run(args) => run_agent(args).await,
            Command::Api(ApiCommand::Fetch { what: Some(what), .. }) => fetch_command(what).await,
            Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
                audience,
                token,
                socket,
            })) => {
                let mut client = connect_workload_api(&socket.address()).await?;
                let response = client
                    .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
                        audience,
                        svid: token.trim().to_string(),
                    }))
                    .await
                    .map_err(|s| CliError(format!("token is not valid: {}", s.message())))?
                    .into_inner();
                crate::outln!("SVID is valid.");
                crate::outln!("SPIFFE ID : {}", response.spiffe_id);
                let claims = response.claims.map(struct_json).unwrap_or_default();
                crate::outln!("Claims    : {claims}");
                Ok(())
            }
            Command::Api(ApiCommand::Fetch { what: None, x509 }) => fetch_x509_command(x509).await,
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
                    crate::outln!(
                        "--- update at {}",
                        format_time(crate::clock::Clock::now(&crate::clock::SystemClock))
                    );
                    for svid in decode_response(response)? {
                        print_svid(&svid);
                    }
                }
            }
            Command::Healthcheck(socket) => {
                let (code, reason) = crate::health::check(&socket.address())
                    .await
                    .map_err(|e| CliError(format!("agent is unhealthy: {e}")))?;
                match code.as_str() {
                    "healthy" => crate::outln!("Agent is healthy."),
                    "degraded" => crate::outln!("Agent is degraded: {reason}."),
                    _ => return Err(CliError(format!("agent is unhealthy: {reason}"))),
                }
                Ok(())
            }
        }
    }
}

async fn fetch_x509_command(args: X509Args) -> Result<(), CliError> {
    let X509Args { socket, json, write } = args;
    let (svids, federated) = fetch_x509_with_federated(&socket.address()).await?;
    if json {
        let list: Vec<_> = svids.iter().map(svid_json).collect();
        crate::outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
    } else {
        for svid in &svids {
            print_svid(svid);
        }
    }
    if let Some(dir) = &write {
        let written = write_x509(dir, &svids, &federated)?;
        report_written(dir, &written, json);
    }
    Ok(())
}

async fn fetch_command(what: FetchCommand) -> Result<(), CliError> {
    match what {
        FetchCommand::X509(args) => fetch_x509_command(args).await,
        FetchCommand::Jwt { audience, spiffe_id, json, write, socket } => {
            let mut client = connect_workload_api(&socket.address()).await?;
            let svids = client
                .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(|s| CliError(s.message().to_string()))?
                .into_inner()
                .svids;
            if json {
                let list: Vec<_> =
                    svids.iter().map(|s| jwt_json(&s.spiffe_id, &s.svid, &s.hint)).collect();
                crate::outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
            } else {
                for svid in &svids {
                    crate::outln!("token({}):", svid.spiffe_id);
                    crate::outln!("\t{}", svid.svid);
                }
            }
            if let Some(dir) = &write {
                let tokens: Vec<(String, String)> =
                    svids.iter().map(|s| (s.spiffe_id.clone(), s.svid.clone())).collect();
                report_written(dir, &write_jwt(dir, &tokens)?, json);
            }
            Ok(())
        }
        FetchCommand::JwtBundle { socket } => {
            let mut client = connect_workload_api(&socket.address()).await?;
            let mut stream = client
                .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
                .await
                .map_err(|s| CliError(s.message().to_string()))?
                .into_inner();
            let response =
                stream.message().await.map_err(|s| CliError(s.message().to_string()))?.ok_or_else(
                    || CliError("the agent closed the stream without an answer".into()),
                )?;
            let mut bundles: Vec<_> = response.bundles.into_iter().collect();
            bundles.sort();
            for (trust_domain, jwks) in bundles {
                crate::outln!("bundle({trust_domain}):");
                crate::outln!("\t{}", String::from_utf8_lossy(&jwks));
            }
            Ok(())
        }
    }
}

/// A `google.protobuf.Struct` as JSON.
fn struct_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, value_json(v))).collect())
}

fn value_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                (n as i64).into()
            } else {
                n.into()
            }
        }
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_json).collect(),
        Some(Kind::StructValue(s)) => struct_json(s),
    }
}

async fn run_agent(args: RunArgs) -> Result<(), CliError> {
    init_logging(&args.log_level, args.log_format);
    let mut config = AgentConfig::new(args.data_dir, String::new());
    config.server_addresses = args.server_address;
    // A token file is read now, but a problem with it matters only if the
    // agent has no valid stored SVID to reuse (the file may be gone after
    // the first attestation).
    match join_token(
        args.join_token,
        args.join_token_file.as_deref(),
        std::env::var(JOIN_TOKEN_ENV).ok(),
    ) {
        Ok(token) => config.join_token = token,
        Err(problem) if args.join_token_file.is_some() => {
            config.join_token_problem = Some(problem.0);
        }
        Err(problem) => return Err(problem),
    }
    config.trust_bundle = args.trust_bundle;
    config.trust_domain = args
        .trust_domain
        .map(|td| TrustDomain::new(&td))
        .transpose()
        .map_err(|e| CliError(format!("invalid --trust-domain: {e}")))?;
    if let Some(socket) = args.socket {
        config.socket_path = socket;
    }
    config.metrics_addr = args.metrics_addr;
    config.events = !args.no_events;
    if let Some(bytes) = args.event_spool_bytes {
        if bytes < 64 * 1024 {
            return Err(CliError("--event-spool-bytes must be at least 65536".into()));
        }
        config.event_spool_bytes = bytes;
    }
    let agent = Agent::start(config).await.map_err(|e| CliError(e.to_string()))?;
    let shutdown = crate::cli_support::shutdown_on_signal();
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
