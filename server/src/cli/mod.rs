//! The `tessera-server` command line: `run`, and operator commands that talk
//! to a running server's admin API. This file holds the command tree, the
//! dispatch and what every admin command shares (the socket); each command
//! group lives in its own file and depends only on this one, the admin
//! client and the proto types.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tessera_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError, LogFormat};
use crate::config::DEFAULT_DATA_DIR;

mod agent;
mod bundle;
mod entry;
mod events;
mod health;
mod mint;
mod run;
mod store;
mod svid;
mod token;

/// Tessera server: the trust domain's CA and registration authority.
#[derive(Debug, Parser)]
#[command(name = "tessera-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Run(run::RunArgs),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// The trust bundle and CRLs.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Issued X509-SVIDs: revocation.
    #[command(subcommand)]
    Svid(svid::SvidCommand),
    /// X509-SVIDs for identities outside a node.
    #[command(subcommand)]
    X509(mint::X509Command),
    /// JWT-SVIDs for identities outside a node.
    #[command(subcommand)]
    Jwt(mint::JwtCommand),
    /// Check that the server is up and serving.
    Healthcheck(SocketArg),
    /// The server's store: integrity check, backup, restore.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// The event stream: every decision about a workload identity (or,
    /// with `verify`, a check of its hash chain).
    #[command(args_conflicts_with_subcommands = true)]
    Events {
        #[command(subcommand)]
        command: Option<events::EventsCommand>,
        #[command(flatten)]
        filter: events::EventsArgs,
    },
}

/// The admin socket every admin command takes.
#[derive(Debug, Args)]
struct SocketArg {
    /// Admin API socket [default: ./.tessera/server/admin.sock, or
    /// /run/tessera-server/admin.sock when only that one exists]. Also
    /// TESSERA_ADMIN_SOCKET.
    #[arg(long, env = ADMIN_SOCKET_ENV)]
    socket: Option<PathBuf>,
}

/// The environment variable that names the admin socket for every command.
pub const ADMIN_SOCKET_ENV: &str = "TESSERA_ADMIN_SOCKET";

impl SocketArg {
    /// The socket to use: the flag (or `TESSERA_ADMIN_SOCKET`), else the
    /// default of a server run from here, else the system service's.
    fn path(&self) -> PathBuf {
        if let Some(path) = &self.socket {
            return path.clone();
        }
        let local = PathBuf::from(DEFAULT_DATA_DIR).join("admin.sock");
        let system = PathBuf::from(crate::config::SYSTEM_ADMIN_SOCKET);
        if !local.exists() && system.exists() {
            system
        } else {
            local
        }
    }
}

/// How `--selector`s are compared with an entry's or agent's selectors
/// (SPIRE's `-matchSelectorsOn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MatchMode {
    /// The same set.
    Exact,
    /// The entry's selectors are among those given.
    Subset,
    /// Those given are among the entry's (the default).
    Superset,
    /// At least one in common.
    Any,
}

impl MatchMode {
    fn proto(self) -> i32 {
        use tessera_proto::admin::SelectorMatch;
        (match self {
            Self::Exact => SelectorMatch::Exact,
            Self::Subset => SelectorMatch::Subset,
            Self::Superset => SelectorMatch::Superset,
            Self::Any => SelectorMatch::Any,
        }) as i32
    }
}

/// A duration flag: `90`, `90s`, `15m`, `24h`, `7d`, or a sum (`1h30m`).
fn parse_duration(flag: &str, value: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError(format!("invalid {flag} {value:?}: want a duration such as 90s, 15m, 24h or 7d"))
    };
    if value.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(secs);
    }
    let (mut total, mut number) = (0u64, String::new());
    for c in value.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A time for JSON output: RFC 3339, like the text output (`null` for 0,
/// which means "never" or "unknown"). Epoch twins are named `*_unix`.
/// `1 agent`, `2 agents`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn json_time(unix: i64) -> serde_json::Value {
    if unix == 0 {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(format_time(unix))
    }
}

/// Connects to the admin API at the socket `socket` names.
async fn connect(socket: &SocketArg) -> Result<AdminClient<Channel>, CliError> {
    connect_path(&socket.path()).await
}

async fn connect_path(path: &Path) -> Result<AdminClient<Channel>, CliError> {
    Ok(crate::client::connect_admin(path).await?)
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Run(args) => run::run_server(args).await,
            Command::Token(command) => token::token_command(command).await,
            Command::Entry(command) => entry::entry_command(command).await,
            Command::Agent(command) => agent::agent_command(command).await,
            Command::Bundle(command) => bundle::bundle_command(command).await,
            Command::Svid(command) => svid::svid_command(command).await,
            Command::Store(command) => store::store_command(command).await,
            Command::Events {
                command: Some(events::EventsCommand::Verify { json, socket }),
                ..
            } => events::verify_command(json, socket).await,
            Command::Events { command: None, filter } => events::events_command(filter).await,
            Command::Healthcheck(socket) => health::healthcheck(socket).await,
            Command::X509(command) => mint::x509_command(command).await,
            Command::Jwt(command) => mint::jwt_command(command).await,
        }
    }
}
