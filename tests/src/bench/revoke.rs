//! `revoke`: from `svid revoke` to the replacement SVID, with one agent
//! and with 100, timed from the call and from its return (a replacement
//! can arrive before the call returns: zero from the return); how long
//! `svid revoke` itself takes once the CRL lists thousands of serials (it
//! is signed and stored again each time); and the CA signing such a CRL
//! in-process with its revocation dates one second, 100 seconds or a
//! second each.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;

use tessera_proto::node as node_pb;

use crate::children::{attest_simulated, server_and_admin, AdminClient};
use crate::stats::{percentiles, round, row, Figures};
use crate::workload::{me, open_stream, setup};

pub async fn run(quick: bool) -> Figures {
    let rounds = if quick { 100 } else { 300 };
    let [(call50, call99), (p50, p99)] = one_agent(rounds).await;
    row("revoke -> replacement on stream, 1 agent (ms)", p50, p99, rounds);
    row("  ... timed from the call (ms)", call50, call99, rounds);
    let (many, workload) = many_agents(100, 10, rounds).await;
    let [(many_call50, many_call99), (p50_many, p99_many)] = many;
    let [(workload_call50, workload_call99), (p50_workload, p99_workload)] = workload;
    row("revoke -> replacement, 100 agents x 10 (ms)", p50_many, p99_many, rounds);
    row("  ... timed from the call (ms)", many_call50, many_call99, rounds);
    row("  ... the real agent's workload stream (ms)", p50_workload, p99_workload, rounds / 4);
    row("  ... its stream, timed from the call (ms)", workload_call50, workload_call99, rounds / 4);
    let (listed, calls) = if quick { (1_000, 50) } else { (3_000, 100) };
    let (p50_crl, p99_crl) = with_a_large_crl(listed, calls).await;
    row(&format!("svid revoke, {listed} serials in the CRL (ms)"), p50_crl, p99_crl, calls);
    let writes = if quick { 50 } else { 200 };
    let crl = crl_dates(listed, writes);
    for (label, (p50, p99)) in &crl {
        row(&format!("CRL of {listed} serials signed, {label} (ms)"), *p50, *p99, writes);
    }
    let many_dates = crl[1].1 .0 / crl[0].1 .0;
    println!("{:<44} {:>12.3}", "  ... 100 commits' dates / one date, p50", many_dates);
    vec![
        ("crl_one_date_p50_ms", json!(round(crl[0].1 .0))),
        ("crl_100_dates_p50_ms", json!(round(crl[1].1 .0))),
        ("crl_every_date_p50_ms", json!(round(crl[2].1 .0))),
        ("revoke_large_crl_p50_ms", json!(round(p50_crl))),
        ("revoke_large_crl_p99_ms", json!(round(p99_crl))),
        ("revoke_p50_ms", json!(round(p50))),
        ("revoke_p99_ms", json!(round(p99.max(p99_many).max(p99_workload)))),
        ("revoke_1_agent_p99_ms", json!(round(p99))),
        ("revoke_1_agent_from_call_p50_ms", json!(round(call50))),
        ("revoke_1_agent_from_call_p99_ms", json!(round(call99))),
        ("revoke_100_agents_p99_ms", json!(round(p99_many))),
        ("revoke_100_agents_from_call_p50_ms", json!(round(many_call50))),
        ("revoke_100_agents_from_call_p99_ms", json!(round(many_call99))),
        ("revoke_100_agents_workload_p99_ms", json!(round(p99_workload))),
        ("revoke_100_agents_workload_from_call_p99_ms", json!(round(workload_call99))),
    ]
}

/// The serial of the first SVID in a Workload API response.
fn first_serial(response: &pb::X509svidResponse) -> String {
    let svid = &response.svids[0];
    tessera_workload_api::X509Svid::from_der(&svid.x509_svid, &svid.x509_svid_key)
        .unwrap()
        .serial_hex()
}

/// `svid revoke` of the X509-SVID `serial`.
async fn revoke(admin: &mut AdminClient, serial: &str) {
    admin
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: serial.to_string(),
            reason: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// How long after `svid revoke` a replacement arrived: from the call, and
/// from its return (the call's own time is what separates them).
#[derive(Debug, Clone, Copy)]
struct Replaced {
    from_call: Duration,
    from_return: Duration,
}

/// Revokes `serial`, the SVID `stream` carries, reading the stream while
/// the call runs (a replacement may arrive before it returns) until it
/// carries another: when it came, and the new serial.
async fn replaced_on_stream(
    admin: &mut AdminClient,
    stream: &mut tonic::Streaming<pb::X509svidResponse>,
    serial: &str,
) -> (Replaced, String) {
    let called = Instant::now();
    let call = async {
        revoke(admin, serial).await;
        Instant::now()
    };
    let replaced = async {
        loop {
            let next = first_serial(&stream.message().await.unwrap().unwrap());
            if next != serial {
                return (Instant::now(), next);
            }
        }
    };
    let (returned, (arrived, next)) = tokio::join!(call, replaced);
    let from_call = arrived.duration_since(called);
    // Before the return: zero.
    let from_return = arrived.saturating_duration_since(returned);
    (Replaced { from_call, from_return }, next)
}

/// The p50 and p99 of each side of `samples`: from the call, from the
/// return.
fn both(samples: &[Replaced]) -> [(f64, f64); 2] {
    [
        percentiles(samples.iter().map(|r| r.from_call).collect()),
        percentiles(samples.iter().map(|r| r.from_return).collect()),
    ]
}

/// From `svid revoke` (its call, its return) to the workload's stream
/// carrying the replacement SVID (and the CRL naming the old one).
async fn one_agent(rounds: usize) -> [(f64, f64); 2] {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/revoked", &agent.id, &[&me()], None).await;
    let (_client, mut stream, first) = open_stream(&agent).await;
    let mut serial = first_serial(&first);
    let mut admin = server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (elapsed, next) = replaced_on_stream(&mut admin, &mut stream, &serial).await;
        samples.push(elapsed);
        serial = next;
    }
    agent.stop().await;
    server.stop().await;
    both(&samples)
}

/// 100 agents with 10 SVIDs each (one real agent with a workload, the rest
/// simulated node API clients that re-issue what is revoked). Every
/// revocation is pushed to all of them; measured at the owning agent (and,
/// for the real one, at its workload's stream), from the call and from its
/// return: the simulated agents', then the workload's.
async fn many_agents(
    agents: usize,
    per_agent: usize,
    rounds: usize,
) -> ([(f64, f64); 2], [(f64, f64); 2]) {
    let (_dir, server, agent) = setup().await;
    for j in 0..per_agent {
        let selector = if j == 0 { me() } else { format!("unix:uid:{}", 100_000 + j) };
        server
            .create_entry(&format!("spiffe://example.org/real/w{j}"), &agent.id, &[&selector], None)
            .await;
    }
    let (_client, mut stream, first) = open_stream(&agent).await;
    let mut workload_serial = first_serial(&first);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut simulated = Vec::new();
    for i in 0..agents - 1 {
        simulated
            .push(tessera_tests::SimulatedAgent::start(&server, i, per_agent, tx.clone()).await);
    }
    let mut admin = server.admin().await;
    let (mut many, mut workload) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 4 == 0 {
            let (elapsed, next) =
                replaced_on_stream(&mut admin, &mut stream, &workload_serial).await;
            workload.push(elapsed);
            workload_serial = next;
            continue;
        }
        let sim = &simulated[round % simulated.len()];
        let serial = {
            let held = sim.serials.lock().unwrap();
            held.values().nth(round % per_agent).cloned().unwrap()
        };
        let called = Instant::now();
        revoke(&mut admin, &serial).await;
        let returned = Instant::now();
        loop {
            let (old, at) = rx.recv().await.unwrap();
            if old == serial {
                // A replacement may arrive before the call returns.
                many.push(Replaced {
                    from_call: at.saturating_duration_since(called),
                    from_return: at.saturating_duration_since(returned),
                });
                break;
            }
        }
    }
    for sim in simulated {
        sim.stop();
    }
    agent.stop().await;
    server.stop().await;
    (both(&many), both(&workload))
}

/// `svid revoke` of one SVID at a time, timed from the call to its return
/// (the revocation, the CRL signed again and stored, the fsync), with
/// `listed` serials already in the CRL (revoked together by deleting
/// their entry): a server in its own process, a simulated agent.
async fn with_a_large_crl(listed: usize, calls: usize) -> (f64, f64) {
    let (_dir, server, mut admin, addr, bundle) = server_and_admin(true, None).await;
    let agent_id = "spiffe://example.org/revoke/agent";
    let mut client = attest_simulated(&mut admin, addr, &bundle, agent_id).await.connect().await;
    let entries = ["listed", "revoked"].map(|name| {
        tessera_tests::entry(
            &format!("spiffe://example.org/revoke/{name}"),
            agent_id,
            &["unix:uid:1"],
            None,
        )
    });
    let created = admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: entries.into() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = created.results.into_iter().map(|r| r.entry.unwrap().id).collect();
    let mut sign = async |entry_id: &str, n: usize| {
        let mut serials = Vec::with_capacity(n);
        while serials.len() < n {
            let items = (0..(n - serials.len()).min(500))
                .map(|_| node_pb::SignX509Item {
                    entry_id: entry_id.to_string(),
                    csr: tessera_tests::key_and_csr().1,
                })
                .collect();
            let results = client.sign_x509(node_pb::SignX509Request { items }).await.unwrap();
            serials.extend(results.into_inner().results.into_iter().map(|r| r.serial));
        }
        serials
    };
    sign(&ids[0], listed).await;
    let to_revoke = sign(&ids[1], calls).await;
    admin
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![ids[0].clone()] })
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(calls);
    for serial in &to_revoke {
        let start = Instant::now();
        revoke(&mut admin, serial).await;
        samples.push(start.elapsed());
    }
    server.stop();
    percentiles(samples)
}

/// The CA signing a CRL of `listed` serials (shaped as issued ones), its
/// revocation dates one second, 100 seconds interleaved (100 revoking
/// commits, as serial order interleaves them) and a second each: p50 and
/// p99 of `writes` signings each, taken in turn, in-process (no store, no
/// RPC).
fn crl_dates(listed: usize, writes: usize) -> [(&'static str, (f64, f64)); 3] {
    let dir = tempfile::tempdir().unwrap();
    let policy = tessera_server::CaPolicy {
        ttl: 86_400,
        prepare_at: 0.5,
        activate_at: 5.0 / 6.0,
        jwt_key_type: Default::default(),
        jwt_issuer: None,
    };
    let clock = std::sync::Arc::new(tessera_common::clock::SystemClock);
    let now = tessera_common::clock::Clock::now(&*clock);
    let ca = tessera_server::Ca::load_or_create(
        dir.path(),
        tessera_workload_api::TrustDomain::new("example.org").unwrap(),
        policy,
        clock,
    )
    .unwrap();
    // The active CA's sequence, as what it signs carries it.
    let id = tessera_workload_api::SpiffeId::parse("spiffe://example.org/crl").unwrap();
    let (_, seq) = ca.sign_jwt(&id, &["bench".to_string()], 60).unwrap();
    // In serial order, as the store hands them to the CA.
    let mut serials: Vec<String> =
        (0..listed as u128).map(|i| format!("4{:031x}", i * 0x9e37_79b9_7f4a_7c15)).collect();
    serials.sort();
    let spread = |seconds: i64| -> Vec<tessera_server::CrlEntry<'_>> {
        serials
            .iter()
            .enumerate()
            .map(|(i, serial)| tessera_server::CrlEntry {
                serial,
                revoked_at: now - (i as i64 * 7_919) % seconds,
                ca_seq: seq,
            })
            .collect()
    };
    let cases = [
        ("one date", spread(1)),
        ("100 dates", spread(100)),
        ("a date each", spread(listed as i64)),
    ];
    // A few first, then the cases in turn, so that the machine's drift
    // hits each alike.
    for (_, entries) in &cases {
        ca.sign_crls(entries, 1, 86_400).unwrap();
    }
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for n in 0..writes {
        for ((_, entries), samples) in cases.iter().zip(&mut samples) {
            let start = Instant::now();
            ca.sign_crls(entries, n as u64 + 2, 86_400).unwrap();
            samples.push(start.elapsed());
        }
    }
    let mut samples = samples.into_iter();
    cases.map(|(label, _)| (label, percentiles(samples.next().unwrap_or_default())))
}
