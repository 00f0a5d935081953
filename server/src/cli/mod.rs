//! The `tessera-server` command line: `run`, and operator commands that talk
//! to a running server's admin API. This file holds the command tree, the
//! dispatch and what every admin command shares (the socket); each command
//! group lives in its own file and depends only on this one, the admin
//! client and the proto types.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use tessera_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError, LogFormat};
use crate::config::DEFAULT_DATA_DIR;

mod agent;
mod bundle;
mod entry;
mod events;
mod health;
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

/// A time for JSON output: RFC 3339, like the text output (`null` for 0,
/// which means "never" or "unknown"). Epoch twins are named `*_unix`.
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
        }
    }
}
