//! `tessera-server`: see `tessera-server --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_server::cli::Cli;

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tessera_common::cli_support::main_with(Cli::run)
}
