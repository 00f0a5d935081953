//! `broker-policy`: one token broker policy decision with 1,000 Cedar
//! policies in force (the example policies and generated ones: varied
//! principals, tools, actions and conditions), the request a reporting
//! agent makes to write one CRM record within a task. Measured in this
//! process, on the engine the broker calls (`PolicyEngine::decide`: the
//! request's entities and context built, one Cedar evaluation per action
//! and target). Target: p99 < 100 µs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_server::broker::policy::{
    AccessRequest, BlastWeights, Outcome, PolicyEngine, Principal, RequestContext, TaskContext,
};

use crate::stats::{percentiles, round, Figures};

/// Policies in force.
const POLICIES: usize = 1_000;

pub async fn run(quick: bool) -> Figures {
    let calls = if quick { 5_000 } else { 20_000 };
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/broker");
    for name in ["schema.cedarschema", "tools.cedar"] {
        std::fs::copy(examples.join("policies").join(name), dir.path().join(name)).unwrap();
    }
    let example_count =
        tessera_server::broker::policy::check_dir(dir.path(), None).unwrap().policies;
    std::fs::write(dir.path().join("generated.cedar"), generated(POLICIES - example_count))
        .unwrap();
    let start = Instant::now();
    let engine = PolicyEngine::load(
        dir.path(),
        Some(&examples.join("resources.toml")),
        BlastWeights::default(),
    )
    .unwrap();
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(engine.summary().policies, POLICIES);

    let write_one = request(&["write"], &["https://tools.example/crm/accounts"]);
    let (p50, p99) = decisions(&engine, &write_one, calls, Outcome::Allow);
    let wide = request(
        &["read", "write"],
        &["https://tools.example/crm/accounts", "https://tools.example/crm/contracts"],
    );
    let (wide_p50, wide_p99) = decisions(&engine, &wide, calls / 4, Outcome::Approval);

    println!(
        "{:<44} {:>12.1} {:>12} {:>12}",
        "load 1,000 policies + validate (ms)", load_ms, "", 1
    );
    micro_row("decide, 1,000 policies (µs)", p50, p99, calls);
    micro_row("decide, 2 actions x 2 targets (µs)", wide_p50, wide_p99, calls / 4);
    println!("{:<44} {:>12} {:>12.1} {:>12}", "target: decide p99 < 100 µs", "", p99, verdict(p99));
    vec![
        ("broker_policy_load_ms", json!(round(load_ms))),
        ("broker_policy_decide_p50_us", json!(round(p50))),
        ("broker_policy_decide_p99_us", json!(round(p99))),
        ("broker_policy_decide_4_pairs_p99_us", json!(round(wide_p99))),
    ]
}

fn verdict(p99_us: f64) -> &'static str {
    if p99_us < 100.0 {
        "met"
    } else {
        "missed"
    }
}

/// A row of two latencies in microseconds.
fn micro_row(name: &str, p50: f64, p99: f64, n: usize) {
    println!("{name:<44} {p50:>12.1} {p99:>12.1} {n:>12}");
}

/// p50 and p99 (µs) of `calls` decisions of `req` after a warm-up, each
/// checked to be `expected`.
fn decisions(
    engine: &PolicyEngine,
    req: &AccessRequest,
    calls: usize,
    expected: Outcome,
) -> (f64, f64) {
    for _ in 0..calls / 10 {
        assert_eq!(engine.decide(req).outcome, expected, "{:?}", engine.decide(req));
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let decision = engine.decide(req);
        samples.push(start.elapsed());
        assert_eq!(decision.outcome, expected);
    }
    let (p50, p99) = percentiles(samples);
    (p50 * 1000.0, p99 * 1000.0)
}

/// The reporting agent, in a task, with its entry's selectors and labels.
fn request(actions: &[&str], targets: &[&str]) -> AccessRequest {
    AccessRequest {
        principal: Principal {
            spiffe_id: "spiffe://example.org/agents/reporter".into(),
            trust_domain: "example.org".into(),
            path: "/agents/reporter".into(),
            agent: "spiffe://example.org/tessera/agent/node-1".into(),
            selectors: vec!["unix:uid:1000".into(), "unix:gid:1000".into()],
            labels: BTreeMap::from([
                ("team".into(), "sales".into()),
                ("env".into(), "prod".into()),
            ]),
        },
        actions: actions.iter().map(|a| a.to_string()).collect(),
        tool: "https://tools.example/crm".into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        context: RequestContext {
            task: Some(TaskContext {
                id: "task-0b1c".into(),
                age_secs: 42,
                tokens_issued: 3,
                done: vec!["read https://tools.example/crm/accounts".into()],
                labels: BTreeMap::from([("ticket".into(), "OPS-17".into())]),
            }),
            datatypes: vec!["customer".into()],
            detail_types: vec!["crm_access".into()],
            scope: vec!["crm.write".into()],
            amount: None,
            now: 1_700_000_000,
            anomalies: Vec::new(),
            actor: None,
        },
    }
}

/// `n` policies over 200 agents, 50 tools and every action: most scoped to
/// one agent (some with conditions on the context, the resource or the
/// agent's tags), some to a tool for any agent, a few forbids.
fn generated(n: usize) -> String {
    const ACTIONS: [&str; 7] = ["read", "list", "write", "create", "update", "delete", "transfer"];
    let mut out = String::new();
    for i in 0..n {
        let agent = format!("spiffe://example.org/agents/agent-{}", i % 200);
        let tool = format!("https://tools.example/tool-{}", i % 50);
        let action = ACTIONS[i % ACTIONS.len()];
        let (effect, principal, condition) = match i % 10 {
            0 => ("permit", format!("principal == Tessera::Workload::\"{agent}\""), String::new()),
            1 => (
                "permit",
                format!("principal == Tessera::Workload::\"{agent}\""),
                "when { context.task.id != \"\" && context.blast_radius <= 20 }".into(),
            ),
            2 => (
                "permit",
                format!("principal == Tessera::Workload::\"{agent}\""),
                format!("when {{ context.has_amount && context.amount <= {} }}", 100 * (i + 1)),
            ),
            3 => (
                "permit",
                "principal".into(),
                format!(
                    "when {{ principal.hasTag(\"team\") && principal.getTag(\"team\") == \"team-{}\" }}",
                    i % 30
                ),
            ),
            4 => (
                "permit",
                "principal".into(),
                format!("when {{ principal.path == \"/agents/agent-{}\" && resource.sensitivity < 4 }}", i % 200),
            ),
            5 => (
                "forbid",
                "principal".into(),
                format!("when {{ context.anomalies.contains(\"anomaly.kind-{}\") }}", i % 40),
            ),
            6 => (
                "permit",
                format!("principal == Tessera::Workload::\"{agent}\""),
                format!("when {{ context.task.labels_kv.contains(\"ticket=T-{i}\") }}"),
            ),
            7 => (
                "permit",
                "principal".into(),
                format!("when {{ principal.selectors.contains(\"unix:uid:{}\") && context.hour < 18 }}", 2000 + i),
            ),
            8 => (
                "permit",
                format!("principal == Tessera::Workload::\"{agent}\""),
                "when { context.breadth <= 3 && !context.task.done.isEmpty() }".into(),
            ),
            _ => (
                "forbid",
                format!("principal == Tessera::Workload::\"{agent}\""),
                "when { context.weekday >= 5 }".into(),
            ),
        };
        let _ = writeln!(
            out,
            "@id(\"gen-{i}\")\n{effect} (\n  {principal},\n  action == Tessera::Action::\"{action}\",\n  resource in Tessera::Resource::\"{tool}\"\n)\n{condition};\n"
        );
    }
    out
}
