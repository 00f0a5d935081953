//! `scale10k`: 10,000 simulated agents (real node API clients over TLS,
//! each attested with its own join token and holding one Sync stream) on
//! one server, then on two servers sharing PostgreSQL. Measured: the time
//! to attest them all, the servers' memory, one entry created for every
//! agent → every agent has it (p50/p99 from the first create call), and
//! 100,000 entries spread over them → every agent has all of its own.
//!
//! ```sh
//! tessera-bench scale10k [--agents N] [--entries N] [--servers 1|2|both]
//! ```
//!
//! The servers run as child processes (their RSS is their own); the agents
//! are in this process. Both sides hold one socket per agent: the bench
//! raises its own file limit to the hard limit and needs about 10,300 fds
//! per 10,000 agents on each side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_proto::admin as admin_pb;
use tessera_proto::node::sync_message::Event;
use tessera_tests::entry;

use crate::children::{admin_at, bundle_of, join_token, open_sync, AdminClient, Child};
use crate::stats::{percentiles, round, row, Figures};

/// Attestations in flight at once (under the server's 32 unauthenticated
/// connections per source address).
const ATTESTING: usize = 16;
/// Entries per admin call.
const BATCH: usize = 1_000;

/// What the command line asked for.
struct Plan {
    agents: usize,
    entries: usize,
    setups: Vec<usize>,
}

fn plan(args: &[String]) -> Result<Plan, String> {
    let mut plan = Plan { agents: 10_000, entries: 100_000, setups: vec![1, 2] };
    let mut args = args.iter().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--agents" => plan.agents = number(flag, value()?)?,
            "--entries" => plan.entries = number(flag, value()?)?,
            "--servers" => {
                plan.setups = match value()?.as_str() {
                    "1" => vec![1],
                    "2" => vec![2],
                    "both" => vec![1, 2],
                    other => return Err(format!("--servers: {other:?} is not 1, 2 or both")),
                }
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if plan.agents == 0 || plan.entries < plan.agents {
        return Err("--agents must be at least 1 and --entries at least --agents".into());
    }
    Ok(plan)
}

fn number(flag: &str, value: &str) -> Result<usize, String> {
    value.replace(',', "").parse().map_err(|_| format!("{flag}: {value:?} is not a number"))
}

pub async fn run(args: &[String]) -> Result<Figures, String> {
    let plan = plan(args)?;
    raise_fd_limit();
    let mut out = Vec::new();
    for &servers in &plan.setups {
        out.extend(setup(&plan, servers).await);
    }
    Ok(out)
}

/// The soft file limit raised to the hard one (children inherit it).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// A server child and an admin client on it.
struct Server {
    child: Child,
    admin: AdminClient,
    addr: std::net::SocketAddr,
}

/// One setup: `servers` servers (sled for one, a shared PostgreSQL for two).
async fn setup(plan: &Plan, servers: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let cluster = (servers > 1).then(|| {
        tessera_tests::pg_cluster::PgCluster::start_with(true).expect("a PostgreSQL cluster")
    });
    let max = format!("--max-connections={}", plan.agents + 1_000);
    let database = cluster.as_ref().map(|c| format!("--datastore={}", c.database()));
    let mut running = Vec::new();
    for i in 0..servers {
        let server_dir = dir.path().join(format!("server-{i}"));
        let mut flags = vec![max.clone()];
        flags.extend(database.clone());
        let child =
            Child::server(&server_dir, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        let admin = admin_at(&server_dir).await;
        let addr = child.ready.parse().unwrap();
        running.push(Server { child, admin, addr });
    }
    let label = if servers == 1 { "1 server, sled" } else { "2 servers, PostgreSQL" };
    let key = if servers == 1 { "scale10k_1" } else { "scale10k_2" };
    // Each server has its own CA; on a shared database each trusts both.
    let bundle = loop {
        let bundle = bundle_of(&mut running[0].admin).await;
        if bundle.len() >= servers {
            break bundle;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let idle_rss: f64 = running.iter().map(|s| s.child.rss_mb()).sum();

    // Attest every agent (to server i % servers) and open its Sync stream.
    let start = Instant::now();
    let counts: Arc<Vec<AtomicUsize>> =
        Arc::new((0..plan.agents).map(|_| AtomicUsize::new(0)).collect());
    let (tx, mut reached) = tokio::sync::mpsc::unbounded_channel();
    let next = Arc::new(AtomicUsize::new(0));
    let mut attesting = Vec::new();
    for _ in 0..ATTESTING {
        let admins: Vec<_> = running.iter().map(|s| (s.admin.clone(), s.addr)).collect();
        let (bundle, counts, tx, next) = (bundle.clone(), counts.clone(), tx.clone(), next.clone());
        let agents = plan.agents;
        attesting.push(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= agents {
                    return held;
                }
                let (mut admin, addr) = admins[i % admins.len()].clone();
                let token = join_token(&mut admin, &agent_id(i)).await;
                let agent = tessera_tests::TestAgent::attest_to(addr, bundle.clone(), &token)
                    .await
                    .unwrap();
                let (client, mut stream) = open_sync(&agent).await;
                // The stream is live once its (empty) snapshot is complete.
                loop {
                    let message = stream.message().await.unwrap().unwrap();
                    if matches!(message.event, Some(Event::Snapshot(s)) if s.complete) {
                        break;
                    }
                }
                let (counts, tx) = (counts.clone(), tx.clone());
                tokio::spawn(async move {
                    while let Ok(Some(message)) = stream.message().await {
                        if let Some(Event::Change(change)) = message.event {
                            if matches!(
                                change.change,
                                Some(tessera_proto::node::entry_change::Change::Upserted(_))
                            ) {
                                let n = counts[i].fetch_add(1, Ordering::Relaxed) + 1;
                                let _ = tx.send((i, n, Instant::now()));
                            }
                        }
                    }
                });
                held.push((agent, client));
            }
        }));
    }
    drop(tx);
    let mut held = Vec::new();
    for task in attesting {
        held.extend(task.await.unwrap());
    }
    let attest_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected_rss: Vec<f64> = running.iter().map(|s| s.child.rss_mb()).collect();
    println!("{label}: {} agents", plan.agents);
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "  attested + Sync open (s); agents/s",
        attest_s,
        plan.agents as f64 / attest_s,
        plan.agents
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "  server RSS MB: idle (sum), connected (max)",
        idle_rss,
        connected_rss.iter().copied().fold(0.0, f64::max),
        servers
    );

    // One entry for every agent, created on the first server in batches of
    // 1,000 back to back: from the first call to each agent hearing of it.
    let mut admin = running[0].admin.clone();
    let first = |i: usize| {
        entry(
            &format!("spiffe://example.org/s10k/{i}/0"),
            &agent_id(i),
            &[&format!("unix:uid:{}", i + 1)],
            None,
        )
    };
    let start = Instant::now();
    create(&mut admin, (0..plan.agents).map(first).collect()).await;
    let committed_ms = start.elapsed().as_secs_f64() * 1000.0;
    let heard = until_every_agent_has(&mut reached, plan.agents, 1, start).await;
    let (p50, p99) = percentiles(heard.clone());
    println!(
        "{:<44} {:>12.1} {:>12} {:>12}",
        "  one entry per agent: all committed (ms)", committed_ms, "", plan.agents
    );
    row("  ... create -> every agent has its entry (ms)", p50, p99, heard.len());

    // The rest of the entries, spread evenly: every agent gets all of its own.
    let per_agent = plan.entries / plan.agents;
    let rest: Vec<_> = (1..per_agent)
        .flat_map(|j| {
            (0..plan.agents).map(move |i| {
                entry(
                    &format!("spiffe://example.org/s10k/{i}/{j}"),
                    &agent_id(i),
                    &[&format!("unix:uid:{}", i + 1)],
                    None,
                )
            })
        })
        .collect();
    let total = plan.agents * per_agent;
    let start = Instant::now();
    // With one entry per agent (`--entries` = `--agents`) there is no rest
    // to create, and every agent already has all of its own.
    let (mut created_s, mut all_s) = (0.0, 0.0);
    if !rest.is_empty() {
        create(&mut admin, rest).await;
        created_s = start.elapsed().as_secs_f64();
        let all = until_every_agent_has(&mut reached, plan.agents, per_agent, start).await;
        all_s = all.iter().max().copied().unwrap_or_default().as_secs_f64();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_rss: Vec<f64> = running.iter().map(|s| s.child.rss_mb()).collect();
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>12}",
        "  entries to total: created (s), all heard (s)", created_s, all_s, total
    );
    println!(
        "{:<44} {:>12.1} {:>12} {:>12}",
        "  server RSS MB with all entries (max)",
        loaded_rss.iter().copied().fold(0.0, f64::max),
        "",
        servers
    );
    drop(held);
    for server in running {
        server.child.stop();
    }
    drop(cluster);
    // The JSON keys name the setup (two setups per run: leaking the few
    // key strings is harmless in a benchmark).
    let k = |name: &str| -> &'static str { Box::leak(format!("{key}_{name}").into_boxed_str()) };
    vec![
        (k("agents"), json!(plan.agents)),
        (k("attest_all_s"), json!(round(attest_s))),
        (
            k("server_rss_connected_mb"),
            json!(round(connected_rss.iter().copied().fold(0.0, f64::max))),
        ),
        (k("fanout_commit_ms"), json!(round(committed_ms))),
        (k("fanout_p50_ms"), json!(round(p50))),
        (k("fanout_p99_ms"), json!(round(p99))),
        (k("entries"), json!(total)),
        (k("entries_created_s"), json!(round(created_s))),
        (k("entries_all_heard_s"), json!(round(all_s))),
        (k("server_rss_loaded_mb"), json!(round(loaded_rss.iter().copied().fold(0.0, f64::max)))),
    ]
}

fn agent_id(i: usize) -> String {
    format!("spiffe://example.org/s10k/agent-{i}")
}

/// Creates `entries` in batches of [`BATCH`], one call after another.
async fn create(admin: &mut AdminClient, mut entries: Vec<tessera_proto::types::Entry>) {
    while !entries.is_empty() {
        let rest = entries.split_off(entries.len().min(BATCH));
        let batch = std::mem::replace(&mut entries, rest);
        let response = admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: batch })
            .await
            .unwrap()
            .into_inner();
        assert!(response.results.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
    }
}

/// Waits until every agent has heard of `target` entries; for each, how
/// long after `start` it reached it (at most 120 s, then those heard).
async fn until_every_agent_has(
    reached: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, usize, Instant)>,
    agents: usize,
    target: usize,
    start: Instant,
) -> Vec<Duration> {
    let mut heard = Vec::with_capacity(agents);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while heard.len() < agents {
        match tokio::time::timeout_at(deadline, reached.recv()).await {
            Ok(Some((_, n, at))) if n == target => heard.push(at.duration_since(start)),
            Ok(Some(_)) => {}
            _ => {
                println!(
                    "WARNING: only {} of {agents} agents heard of {target} entries in 120 s",
                    heard.len()
                );
                break;
            }
        }
    }
    heard
}
