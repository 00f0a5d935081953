//! `tessera-bench`: measures Tessera on this machine with real server and
//! agent code on loopback and temp data dirs. Prints a table and, as its last
//! line, one JSON object of results. Scenarios: see `SCENARIOS` (`all` runs each).
//!
//! ```sh
//! cargo run --release -p tessera-tests --bin tessera-bench -- all
//! ```
//!
//! What lives here. This file only reads the command line and runs the
//! scenarios in order. Each scenario has a file of its own (`issue.rs` …
//! `hostile.rs`) with a `run` that prints its rows and returns its JSON
//! results. The shared helpers:
//!
//! - `stats.rs` — percentiles, rates, rounding, table rows, the JSON result;
//! - `children.rs` — the re-exec children (`__server`, `__agent`,
//!   `__workload_flood`, `__node_attack`) and how the parent starts, measures
//!   and stops them, with its admin calls on a server child (bundle, join
//!   tokens, simulated agents);
//! - `workload.rs` — servers and agents in this process, and a workload's
//!   view of them (warm clients, open streams, first-response latencies,
//!   entry propagation);
//! - `signing.rs` — node API signing throughput and ring's ECDSA limits.
//!
//! What may depend on what: scenario files use the helpers, never each
//! other. Among the helpers, each uses only those listed before it
//! (`stats` and `children` use none; `workload` uses `stats`; `signing`
//! uses `stats` and `children`).
#![forbid(unsafe_code)]
// A benchmark: a failed step must abort the run rather than report figures
// for work that did not happen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

// Shared helpers.
mod children;
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
    "all",
];

/// mimalloc: the system allocator costs measurable throughput under many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = children::run_child(&args).await {
        return code;
    }
    let scenario = args.first().map(String::as_str).unwrap_or("all");
    if !SCENARIOS.contains(&scenario) {
        eprintln!("error: unknown scenario {scenario:?}; choose one of {}", SCENARIOS.join(", "));
        return ExitCode::from(2);
    }
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
    results.print();
    ExitCode::SUCCESS
}
