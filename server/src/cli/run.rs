//! `run`: the server itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::cli_support::{init_logging, CliError};
use crate::config::{Config, FileConfig};
use crate::server::Server;
use tessera_common::clock::SystemClock;

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// TOML config file; flags override its settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./.tessera/server].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Node API address [default: 127.0.0.1:8081].
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Admin API socket [default: <data_dir>/admin.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Log filter, e.g. info or debug.
    #[arg(long)]
    log_level: Option<String>,
    /// Log lines as `text` or `json` (one object per line) [default: text].
    #[arg(long)]
    log_format: Option<String>,
    /// Serve Prometheus metrics, /live and /ready on this address (off by default).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Store in PostgreSQL, shared with other servers: postgres://USER[:PASSWORD]@HOST[:PORT]/DB
    /// [default: the embedded store in <data_dir>/store]. Also TESSERA_DATASTORE.
    #[arg(long, env = "TESSERA_DATASTORE", hide_env_values = true)]
    datastore: Option<String>,
}

pub(super) async fn run_server(args: RunArgs) -> Result<(), CliError> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| CliError(e.to_string()))?,
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        trust_domain: args.trust_domain,
        data_dir: args.data_dir,
        bind: args.bind,
        admin_socket: args.admin_socket,
        log_level: args.log_level,
        log_format: args.log_format,
        metrics_addr: args.metrics_addr,
        datastore: args.datastore,
        ..Default::default()
    };
    let config = Config::resolve(file, flags).map_err(|e| CliError(e.to_string()))?;
    init_logging(&config.log_level, config.log_format);
    let server =
        Server::bind(config, Arc::new(SystemClock)).await.map_err(|e| CliError(e.to_string()))?;
    let shutdown = crate::cli_support::shutdown_on_signal();
    server.run(shutdown).await.map_err(|e| CliError(e.to_string()))
}
