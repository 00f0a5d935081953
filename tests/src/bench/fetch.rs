//! `fetch`: first-response latency of FetchX509SVID on a warm agent: each
//! call opens a stream on one connection (as SPIFFE clients do), is
//! attested, and gets the cached SVID.

use serde_json::json;

use crate::stats::{round, row, Figures};
use crate::workload::{fetch_latency, me, setup};

pub async fn run(quick: bool) -> Figures {
    let calls = if quick { 2_000 } else { 10_000 };
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let (p50, p99) = fetch_latency(&agent, calls).await;
    agent.stop().await;
    server.stop().await;
    row("FetchX509SVID first response (ms)", p50, p99, calls);
    vec![("fetch_p50_ms", json!(round(p50))), ("fetch_p99_ms", json!(round(p99)))]
}
