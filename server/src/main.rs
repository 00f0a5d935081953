//! `tessera-server`: see `tessera-server --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_server::cli::Cli;

/// jemalloc, as every Tessera binary (`tessera_common::heap` says why).
#[global_allocator]
static ALLOCATOR: tessera_common::heap::Allocator = tessera_common::heap::Allocator;

fn main() -> ExitCode {
    tessera_common::cli_support::main_with(Cli::run)
}
