//! `tessera-agent`: see `tessera-agent --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_agent::cli::Cli;

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tessera_common::cli_support::small_pages_only();
    let cli = match tessera_agent::cli_support::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match tessera_common::cli_support::runtime() {
        Ok(runtime) => tessera_agent::cli_support::exit_code(runtime.block_on(cli.run())),
        Err(e) => {
            tessera_agent::cli_support::exit_code(Err(format!("cannot start the runtime: {e}")))
        }
    }
}
