//! `hostile`: attackers without credentials against a server and an agent
//! in their own processes, beside the same figures with no attacker.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;
use tessera_tests::entry;
use tessera_tests::hostile;

use crate::children::{admin_at, bundle_of, join_token, AdminClient, Child};
use crate::stats::{percentiles, round, row, Figures};
use crate::workload::me;

/// The `hostile` scenario: a server and an agent in their own processes,
/// and, one after another, four attackers without credentials; beside each,
/// the same figures with no attacker: a normal agent's attestation time
/// (connect, TLS, Attest), a normal workload's FetchX509SVID p99, the
/// server's RSS. Attackers use loopback addresses other than 127.0.0.1
/// (other machines); the normal agent and workload use 127.0.0.1 and this
/// process's uid.
pub async fn run(quick: bool) -> Figures {
    let mut out = Vec::new();
    let calls = if quick { 300 } else { 2_000 };
    let dir = tempfile::tempdir().unwrap();
    // uid 65534 must reach the agent's public socket directory.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let server_dir = dir.path().join("server");
    let server = Child::server(&server_dir, &[]);
    let mut admin = admin_at(&server_dir).await;
    let addr: std::net::SocketAddr = server.ready.parse().unwrap();
    let bundle = bundle_of(&mut admin).await;
    let agent_id = "spiffe://example.org/hostile/agent";
    let token = join_token(&mut admin, agent_id).await;
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, tessera_tests::to_pem(&bundle)).unwrap();
    let socket = dir.path().join("public/api.sock");
    let agent = Child::agent(
        &dir.path().join("agent"),
        &server.ready,
        &token,
        &bundle_path,
        &[&format!("--socket={}", socket.display()), "--default-limits"],
    );
    admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest {
            entries: vec![entry("spiffe://example.org/hostile/workload", agent_id, &[&me()], None)],
        })
        .await
        .unwrap();
    let endpoint = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetch_x509(&endpoint).await.is_err() {
        assert!(Instant::now() < deadline, "the workload never got its SVID");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rounds = 5;
    // What the normal attestations commit (token, its use, the agent) and
    // record, to tell the bogus ones' share apart under attack (c).
    let (writes, recorded) = (hostile::write_seq(&server_dir), attest_events(&mut admin).await);
    let (attest_calm, failed_calm) = attestations(&mut admin, addr, &bundle, rounds).await;
    let normal_writes = hostile::write_seq(&server_dir) - writes;
    let normal_events = attest_events(&mut admin).await - recorded;
    let fetch_calm = fetch_p99(&endpoint, calls).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_calm = server.rss_mb();
    let agent_rss_calm = agent.rss_mb();
    row("hostile: calm attestation, worst of 5 (ms)", attest_calm, attest_calm, rounds);
    row("hostile: calm FetchX509SVID p99 (ms)", fetch_calm, fetch_calm, calls);
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "hostile: calm RSS MB, server; agent", rss_calm, agent_rss_calm
    );
    out.push(("hostile_attest_calm_ms", json!(round(attest_calm))));
    out.push(("hostile_fetch_p99_calm_ms", json!(round(fetch_calm))));
    out.push(("hostile_server_rss_calm_mb", json!(round(rss_calm))));
    let mut warnings = Vec::new();
    if failed_calm > 0 {
        warnings.push(format!("{failed_calm} of {rounds} attestations failed with no attacker"));
    }

    for attack in ["a", "b", "c", "d"] {
        let mut flood = None;
        let work_file = dir.path().join(format!("attack-{attack}.count"));
        let (label, before) = match attack {
            "a" => ("(a) 1,000 idle TCP sockets", None),
            "b" => ("(b) 64 certless TLS conns, large frames", None),
            "c" => {
                let before = (
                    hostile::write_seq(&server_dir),
                    attest_events(&mut admin).await,
                    store_bytes(&server_dir),
                );
                ("(c) bogus Attest flood, 8 addresses", Some(before))
            }
            _ => {
                flood = Some(Child::workload_flood(65534, &endpoint, 1000));
                ("(d) uid 65534: 1,000 Workload API conns", None)
            }
        };
        // The attacker is a process of its own, as it would be.
        let attacker = (attack != "d")
            .then(|| Child::node_attack(attack, &server.ready, &bundle_path, &work_file));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sampling = tokio_util::sync::CancellationToken::new();
        let pid = server.process.id();
        let agent_pid = agent.process.id();
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let (mut peak, mut agent_peak) = (0.0f64, 0.0f64);
                while !sampling.is_cancelled() {
                    peak = peak.max(hostile::rss_mb(pid));
                    agent_peak = agent_peak.max(hostile::rss_mb(agent_pid));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (peak, agent_peak)
            })
        };
        let (attest, failed) = attestations(&mut admin, addr, &bundle, rounds).await;
        let fetch = fetch_p99(&endpoint, calls).await;
        sampling.cancel();
        let (rss, agent_rss) = sampler.await.unwrap();
        if let Some(flood) = flood {
            flood.stop();
        }
        let work: u64 = match attacker {
            Some(attacker) => {
                attacker.stop();
                std::fs::read_to_string(&work_file).ok().and_then(|w| w.parse().ok()).unwrap_or(0)
            }
            None => 0,
        };
        println!("{label}");
        row("  attestation under attack, worst of 5 (ms)", attest, attest, rounds);
        row("  FetchX509SVID p99 under attack (ms)", fetch, fetch, calls);
        println!(
            "{:<44} {:>12.1} {:>12.1} {:>12.2}",
            "  RSS MB, server; agent; server / calm",
            rss,
            agent_rss,
            rss / rss_calm
        );
        let key = |what: &str| -> &'static str {
            Box::leak(format!("hostile_{attack}_{what}").into_boxed_str())
        };
        out.push((key("attest_ms"), json!(round(attest))));
        out.push((key("fetch_p99_ms"), json!(round(fetch))));
        out.push((key("fetch_p99_ratio"), json!(round(fetch / fetch_calm))));
        out.push((key("server_rss_mb"), json!(round(rss))));
        out.push((key("server_rss_ratio"), json!(round(rss / rss_calm))));
        out.push((key("agent_rss_mb"), json!(round(agent_rss))));
        if failed > 0 || attest >= 2_000.0 {
            warnings.push(format!(
                "{label}: attestation {attest:.0} ms, {failed} of {rounds} failed (target < 2 s)"
            ));
        }
        if fetch >= 3.0 * fetch_calm {
            warnings.push(format!(
                "{label}: fetch p99 {fetch:.2} ms is {:.1}x calm (target < 3x)",
                fetch / fetch_calm
            ));
        }
        if rss >= 2.0 * rss_calm {
            warnings.push(format!(
                "{label}: server RSS {rss:.0} MB is {:.1}x calm (target < 2x)",
                rss / rss_calm
            ));
        }
        if let Some((writes, events_before, bytes_before)) = before {
            // Refusals are folded into one event per address per interval.
            tokio::time::sleep(REFUSAL_FOLD_INTERVAL + Duration::from_secs(1)).await;
            let writes_added =
                (hostile::write_seq(&server_dir) - writes).saturating_sub(normal_writes);
            let events_added =
                (attest_events(&mut admin).await - events_before).saturating_sub(normal_events);
            let bytes_after = store_bytes(&server_dir);
            println!(
                "{:<44} {:>12} {:>12} {:>12}",
                "  bogus Attests; their commits; their events", work, writes_added, events_added
            );
            // The database file also holds the event log, which the normal
            // workload's fetches add to meanwhile.
            println!(
                "{:<44} {:>12} {:>12}",
                "  store dir bytes before; after (all events)", bytes_before, bytes_after
            );
            out.push(("hostile_bogus_attests", json!(work)));
            out.push(("hostile_bogus_store_commits", json!(writes_added)));
            out.push(("hostile_bogus_events_added", json!(events_added)));
            out.push(("hostile_store_bytes_before", json!(bytes_before)));
            out.push(("hostile_store_bytes_after", json!(bytes_after)));
            if writes_added > 0 {
                warnings.push(format!(
                    "{label}: the store took {writes_added} commits for {work} bogus Attests (target: none)"
                ));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "hostile targets", "attest < 2s", "p99 < 3x", "RSS < 2x"
    );
    for warning in &warnings {
        println!("WARNING hostile: {warning}");
    }
    out.push(("hostile_warnings", json!(warnings.len())));
    agent.stop();
    server.stop();
    out
}

/// How long the server folds refused attestations into one event (its
/// `node::ATTEST_REFUSAL_INTERVAL`).
const REFUSAL_FOLD_INTERVAL: Duration = Duration::from_secs(10);

/// A normal agent attesting `rounds` times, each with a fresh token: the
/// worst time (ms) and how many failed.
async fn attestations(
    admin: &mut AdminClient,
    addr: std::net::SocketAddr,
    bundle: &[rustls_pki_types::CertificateDer<'static>],
    rounds: usize,
) -> (f64, usize) {
    let mut worst = Duration::ZERO;
    let mut failed = 0;
    for _ in 0..rounds {
        let token = join_token(admin, "").await;
        let start = Instant::now();
        let attested = tokio::time::timeout(
            Duration::from_secs(10),
            tessera_tests::TestAgent::attest_to(addr, bundle.to_vec(), &token),
        )
        .await;
        worst = worst.max(start.elapsed());
        if !matches!(attested, Ok(Ok(_))) {
            failed += 1;
        }
    }
    (worst.as_secs_f64() * 1000.0, failed)
}

/// p99 (ms) of `calls` FetchX509SVID first responses on one connection; a
/// call that fails or takes longer counts as 10 s.
async fn fetch_p99(endpoint: &str, calls: usize) -> f64 {
    let mut client = connect_workload_api(endpoint).await.unwrap();
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let first = async {
            let mut stream =
                client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await?.into_inner();
            stream.message().await
        };
        match tokio::time::timeout(Duration::from_secs(10), first).await {
            Ok(Ok(Some(_))) => samples.push(start.elapsed()),
            _ => samples.push(Duration::from_secs(10)),
        }
    }
    percentiles(samples).1
}

/// The events the server has recorded of refused attestations: they are
/// `node.attest` events (the workload's fetches add `workload.x509` events
/// of their own).
async fn attest_events(admin: &mut AdminClient) -> u64 {
    hostile::events_of_kind(admin, "node.attest").await.len() as u64
}

/// Bytes in the store directory of the server whose data dir is `dir`.
fn store_bytes(dir: &std::path::Path) -> u64 {
    fn walk(path: &std::path::Path) -> u64 {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("store"))
}
