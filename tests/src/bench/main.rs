//! `tessera-bench`: measures Tessera on this machine with real server and
//! agent code on loopback and temp data dirs. Prints a table and, as its last
//! line, one JSON object of results. Scenarios: see `SCENARIOS` (`all` runs
//! each but `scale10k` and `soak`, which run only when named: they take
//! minutes to an hour).
//!
//! ```sh
//! cargo run --release -p tessera-tests --bin tessera-bench -- all
//! cargo run --release -p tessera-tests --bin tessera-bench -- scale10k [--agents N] [--entries N] [--servers 1|2|both]
//! cargo run --release -p tessera-tests --bin tessera-bench -- soak [--duration 60m] [--no-events] [--change-log-keep N]
//! ```
//!
//! What lives here. This file only reads the command line and runs the
//! scenarios in order. Each scenario has a file of its own (`issue.rs` …
//! `hostile.rs`, `scale10k.rs`, `soak/`) with a `run` that prints its rows
//! and returns its JSON results. The shared helpers:
//!
//! - `stats.rs` — percentiles, rates, rounding, table rows, the JSON result;
//! - `children.rs` — the re-exec children (`__server`, `__agent`,
//!   `__workload_flood`, `__node_attack`) and how the parent starts, measures
//!   and stops them, with its admin calls on a server child (bundle, join
//!   tokens, simulated agents);
//! - `workload.rs` — servers and agents in this process, and a workload's
//!   view of them (warm clients, open streams, first-response latencies,
//!   entry propagation);
//! - `plain_signer.rs` — the `__plain_signer` child: the node API's signing
//!   calls served with the server's CA and nothing behind them (the
//!   transport's ceiling);
//! - `signing.rs` — node API signing throughput (the server's and the plain
//!   signer's) and ring's ECDSA limits;
//! - `bounds.rs` — each figure's target and regression bound: after the
//!   scenarios, the figures against their targets and a `WARNING` line for
//!   each past its bound.
//!
//! What may depend on what: scenario files use the helpers, never each
//! other. Among the helpers, each uses only those listed before it
//! (`stats` and `children` use none; `plain_signer` uses `children`;
//! `workload` uses `stats`; `signing` uses `stats` and `children`, which
//! starts the plain signer's child).
#![forbid(unsafe_code)]
// A benchmark: a failed step must abort the run rather than report figures
// for work that did not happen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

// Shared helpers.
mod bounds;
mod children;
mod plain_signer;
mod signing;
mod stats;
mod workload;

// Scenarios.
mod broker;
mod broker_policy;
mod events;
mod fairness;
mod fetch;
mod ha;
mod handshake;
mod hostile;
mod issue;
mod jwt;
mod propagate;
mod revoke;
mod scale;
mod scale10k;
mod soak;
mod streams;

const SCENARIOS: &[&str] = &[
    "issue",
    "scale",
    "fetch",
    "propagate",
    "revoke",
    "handshake",
    "fairness",
    "streams",
    "jwt",
    "events",
    "ha",
    "hostile",
    "broker",
    "broker-policy",
    "scale10k",
    "soak",
    "all",
];

/// jemalloc, as every Tessera binary (`tessera_common::heap` says why).
#[global_allocator]
static ALLOCATOR: tessera_common::heap::Allocator = tessera_common::heap::Allocator;

fn main() -> ExitCode {
    // As the server and agent binaries run (the children are this binary).
    match tessera_common::cli_support::on_runtime(run()) {
        Ok(code) => code,
        Err(e) => tessera_common::cli_support::exit_code(Err(e)),
    }
}

async fn run() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = children::run_child(&args).await {
        return code;
    }
    if let Some(code) = plain_signer::run_child(&args).await {
        return code;
    }
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    if !SCENARIOS.contains(&scenario) {
        eprintln!("error: unknown scenario {scenario:?}; choose one of {}", SCENARIOS.join(", "));
        return ExitCode::from(2);
    }
    // The soak's flags, read before anything runs: a bad one is a usage error.
    let soak = match (scenario == "soak").then(|| soak::options_from(&args[1..])).transpose() {
        Ok(soak) => soak,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
    };
    // `all` takes the short form of every scenario that has one.
    let quick = args.iter().any(|a| a == "--quick") || scenario == "all";
    let runs = |name: &str| scenario == name || scenario == "all";
    tessera_server::cli::init_logging("error", tessera_server::cli::LogFormat::Text);
    let mut results = stats::Results::new();
    stats::header(scenario);
    if runs("issue") {
        results.extend(issue::run(quick).await);
    }
    if runs("scale") {
        results.extend(scale::run().await);
    }
    if runs("fetch") {
        results.extend(fetch::run(quick).await);
    }
    if runs("propagate") {
        results.extend(propagate::run(quick).await);
    }
    if runs("revoke") {
        results.extend(revoke::run(quick).await);
    }
    if runs("handshake") {
        results.extend(handshake::run(quick).await);
    }
    if runs("fairness") {
        results.extend(fairness::run(quick).await);
    }
    if runs("streams") {
        results.extend(streams::run().await);
    }
    if runs("jwt") {
        results.extend(jwt::run(quick).await);
    }
    if runs("events") {
        results.extend(events::run(quick).await);
    }
    if runs("ha") {
        results.extend(ha::run(quick).await);
    }
    if runs("hostile") {
        results.extend(hostile::run(quick).await);
    }
    if runs("broker") {
        results.extend(broker::run(quick).await);
    }
    if runs("broker-policy") {
        results.extend(broker_policy::run(quick).await);
    }
    // Long runs of their own, never part of `all`.
    if scenario == "scale10k" {
        match scale10k::run(&args).await {
            Ok(figures) => results.extend(figures),
            Err(e) => {
                eprintln!("error: scale10k: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(options) = soak {
        results.extend(soak::run(options).await);
    }
    bounds::report(&results);
    results.print();
    ExitCode::SUCCESS
}
