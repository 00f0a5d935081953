//! `revoke`: from `svid revoke` returning to the replacement SVID, with one
//! agent and with 100; and how long `svid revoke` itself takes once the
//! CRL lists thousands of serials (it is signed and stored again each
//! time).

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
    let (p50, p99) = one_agent(rounds).await;
    row("revoke -> replacement on stream, 1 agent (ms)", p50, p99, rounds);
    let (p50_many, p99_many, p50_workload, p99_workload) = many_agents(100, 10, rounds).await;
    row("revoke -> replacement, 100 agents x 10 (ms)", p50_many, p99_many, rounds);
    row("  ... the real agent's workload stream (ms)", p50_workload, p99_workload, rounds / 4);
    let (listed, calls) = if quick { (1_000, 50) } else { (3_000, 100) };
    let (p50_crl, p99_crl) = with_a_large_crl(listed, calls).await;
    row(&format!("svid revoke, {listed} serials in the CRL (ms)"), p50_crl, p99_crl, calls);
    vec![
        ("revoke_large_crl_p50_ms", json!(round(p50_crl))),
        ("revoke_large_crl_p99_ms", json!(round(p99_crl))),
        ("revoke_p50_ms", json!(round(p50))),
        ("revoke_p99_ms", json!(round(p99.max(p99_many).max(p99_workload)))),
        ("revoke_1_agent_p99_ms", json!(round(p99))),
        ("revoke_100_agents_p99_ms", json!(round(p99_many))),
        ("revoke_100_agents_workload_p99_ms", json!(round(p99_workload))),
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

/// Revokes `serial`, the SVID `stream` carries, then reads the stream until
/// it carries another: the time from the revocation's return, and the new
/// serial.
async fn replaced_on_stream(
    admin: &mut AdminClient,
    stream: &mut tonic::Streaming<pb::X509svidResponse>,
    serial: &str,
) -> (Duration, String) {
    revoke(admin, serial).await;
    let start = Instant::now();
    loop {
        let next = first_serial(&stream.message().await.unwrap().unwrap());
        if next != serial {
            return (start.elapsed(), next);
        }
    }
}

/// From `svid revoke` returning to the workload's stream carrying the
/// replacement SVID (and the CRL naming the old one).
async fn one_agent(rounds: usize) -> (f64, f64) {
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
    percentiles(samples)
}

/// 100 agents with 10 SVIDs each (one real agent with a workload, the rest
/// simulated node API clients that re-issue what is revoked). Every
/// revocation is pushed to all of them; measured at the owning agent (and,
/// for the real one, at its workload's stream).
async fn many_agents(agents: usize, per_agent: usize, rounds: usize) -> (f64, f64, f64, f64) {
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
        revoke(&mut admin, &serial).await;
        let start = Instant::now();
        loop {
            let (old, at) = rx.recv().await.unwrap();
            if old == serial {
                many.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    for sim in simulated {
        sim.stop();
    }
    agent.stop().await;
    server.stop().await;
    let (p50, p99) = percentiles(many);
    let (wp50, wp99) = percentiles(workload);
    (p50, p99, wp50, wp99)
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
