//! `tessera-server`: see `tessera-server --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_server::cli::Cli;

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tessera_common::cli_support::small_pages_only();
    match tessera_server::cli_support::parse_args::<Cli>() {
        Ok(cli) => tessera_server::cli_support::exit_code(cli.run().await),
        Err(code) => code,
    }
}
