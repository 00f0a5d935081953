//! The `tessera-server` command line: `run`, and operator commands that talk
//! to a running server's admin API. This file holds the command tree, the
//! dispatch and what every admin command shares (the socket); each command
//! group lives in its own file and depends only on this one, the admin
//! client and the proto types.

use clap::{Parser, Subcommand};

pub use crate::cli_support::{format_time, init_logging, wait_for_signal, CliError, LogFormat};
use args::SocketArg;
pub use args::{parse_duration, ADMIN_SOCKET_ENV};

mod agent;
mod args;
mod broker;
mod bundle;
mod entry;
mod events;
mod health;
mod mint;
mod request;
mod run;
mod store;
mod svid;
mod task;
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
    /// Token broker tasks: every access token is issued under one.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Token requests held for an operator's approval.
    #[command(subcommand)]
    Request(request::RequestCommand),
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
    /// The token broker: its Cedar policies, offline.
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
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
            Command::Task(command) => task::task_command(command).await,
            Command::Request(command) => request::request_command(command).await,
            Command::Broker(command) => broker::broker_command(command).await,
        }
    }
}
