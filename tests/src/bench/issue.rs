//! `issue`: SVIDs signed per second through the node API by 8 concurrent
//! agents (batches of 500, as agents send them; CSRs made in advance),
//! against the machine's raw limit: one ECDSA P-256 signature plus one
//! verification per SVID, with ring, on every core; the same batches sent
//! to the plain signer (the same calls over the same transport, signed
//! with the server's CA code, with nothing behind them); and each
//! process's CPU per SVID over its window beside what a pair costs in the
//! limit's loop (the difference is that process's own work).

use std::time::Duration;

use serde_json::json;

use crate::signing::{ecdsa_limit, node_api_and_plain, Ecdsa, Signing};
use crate::stats::{cpu_row, ratio_row, round, Figures};

pub async fn run(quick: bool) -> Figures {
    let secs = if quick { 5 } else { 15 };
    let (signed, plain) = node_api_and_plain(Duration::from_secs(secs), Signing::X509).await;
    let (rate, cpu_us) = (signed.per_s, signed.server_cpu_us);
    let limit = ecdsa_limit(Duration::from_secs(2), Ecdsa::SignAndVerify);
    ratio_row("SVIDs/s signed via node API; ring limit; ratio", rate, limit);
    cpu_row("  server CPU per SVID (us); the limit's pair", cpu_us, limit);
    ratio_row("  plain signer, same transport; ring limit", plain.per_s, limit);
    cpu_row("  its CPU per SVID (us); the limit's pair", plain.server_cpu_us, limit);
    ratio_row("  node API; plain signer", rate, plain.per_s);
    vec![
        ("issue_server_cpu_us", json!(round(cpu_us))),
        ("issue_svids_per_s", json!(rate.round())),
        ("issue_limit_per_s", json!(limit.round())),
        ("issue_limit_ratio", json!(round(rate / limit))),
        ("issue_plain_per_s", json!(plain.per_s.round())),
        ("issue_plain_cpu_us", json!(round(plain.server_cpu_us))),
        ("issue_plain_limit_ratio", json!(round(plain.per_s / limit))),
        ("issue_plain_ratio", json!(round(rate / plain.per_s))),
    ]
}
