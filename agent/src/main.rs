//! `tessera-agent`: see `tessera-agent --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_agent::cli::Cli;

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tessera_common::cli_support::main_with(Cli::run)
}
