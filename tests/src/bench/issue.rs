//! `issue`: SVIDs signed per second through the node API by 8 concurrent
//! agents (batches of 500, as agents send them; CSRs made in advance),
//! against the machine's raw limit: one ECDSA P-256 signature plus one
//! verification per SVID, with ring, on every core; and the server
//! process's CPU per SVID over the same window beside what a pair costs in
//! the limit's loop (the difference is the server's own work).

use std::time::Duration;

use serde_json::json;

use crate::signing::{ecdsa_limit, node_api_throughput, Ecdsa, Signing};
use crate::stats::{cpu_row, ratio_row, round, Figures};

pub async fn run(quick: bool) -> Figures {
    let secs = if quick { 5 } else { 15 };
    let signed = node_api_throughput(Duration::from_secs(secs), Signing::X509, true, None).await;
    let (rate, cpu_us) = (signed.per_s, signed.server_cpu_us);
    let limit = ecdsa_limit(Duration::from_secs(2), Ecdsa::SignAndVerify);
    ratio_row("SVIDs/s signed via node API; ring limit; ratio", rate, limit);
    cpu_row("  server CPU per SVID (us); the limit's pair", cpu_us, limit);
    vec![
        ("issue_server_cpu_us", json!(round(cpu_us))),
        ("issue_svids_per_s", json!(rate.round())),
        ("issue_limit_per_s", json!(limit.round())),
        ("issue_limit_ratio", json!(round(rate / limit))),
    ]
}
