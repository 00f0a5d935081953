//! `propagate`: from the admin `entry create` call to the workload's open
//! stream receiving the new SVID (entry pushed to the agent, signed,
//! streamed).

use serde_json::json;

use crate::stats::{round, row, Figures};
use crate::workload::{propagation, setup};

pub async fn run(quick: bool) -> Figures {
    let rounds = if quick { 100 } else { 500 };
    let (_dir, server, agent) = setup().await;
    let (p50, p99) = propagation(&server, &server, &agent, rounds).await;
    agent.stop().await;
    server.stop().await;
    row("entry create -> workload stream (ms)", p50, p99, rounds);
    vec![("propagate_p50_ms", json!(round(p50))), ("propagate_p99_ms", json!(round(p99)))]
}
