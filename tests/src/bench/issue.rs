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

use crate::signing::{ecdsa_limit, node_api_and_plain, plain_rows, Ecdsa, Signing};
use crate::stats::{cpu_row, ratio_row, round, Figures};

pub async fn run(quick: bool) -> Figures {
    let secs = if quick { 5 } else { 15 };
    let (signed, plain) = node_api_and_plain(Duration::from_secs(secs), Signing::X509).await;
    let (rate, cpu_us) = (signed.per_s, signed.server_cpu_us);
    let limit = ecdsa_limit(Duration::from_secs(2), Ecdsa::SignAndVerify);
    ratio_row("SVIDs/s signed via node API; ring limit; ratio", rate, limit);
    cpu_row("  server CPU per SVID (us); the limit's pair", cpu_us, limit);
    let keys =
        ["issue_plain_per_s", "issue_plain_cpu_us", "issue_plain_limit_ratio", "issue_plain_ratio"];
    let mut out = plain_rows(["ring limit", "SVID", "pair"], (signed, plain, limit), keys);
    out.extend([
        ("issue_server_cpu_us", json!(round(cpu_us))),
        ("issue_svids_per_s", json!(rate.round())),
        ("issue_limit_per_s", json!(limit.round())),
        ("issue_limit_ratio", json!(round(rate / limit))),
    ]);
    out
}
