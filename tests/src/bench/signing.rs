//! Signing throughput: SVIDs signed per second through the node API by
//! simulated agents against a server in its own process (and against the
//! plain signer, the same calls with nothing behind them), and the rate at
//! which ring signs and verifies on every core (the machine's limit). Uses
//! `stats` and `children`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tessera_proto::admin as admin_pb;
use tessera_proto::node as node_pb;
use tessera_tests::{entry, TestAgent};

use crate::children::{attest_simulated, server_and_admin, AdminClient, Child};
use serde_json::json;

use crate::stats::{cpu_row, measure_rate_and_cpu, ratio_row, round, Figures};

/// What the simulated agents of [`node_api_throughput`] have signed.
#[derive(Debug, Clone, Copy)]
pub enum Signing {
    X509,
    Jwt,
}

type NodeClient = node_pb::node_client::NodeClient<tonic::transport::Channel>;

/// The requests one simulated agent sends over and over.
#[derive(Clone)]
enum Batch {
    X509(node_pb::SignX509Request),
    Jwt(node_pb::SignJwtRequest),
}

/// SVIDs signed per second by 8 simulated agents (each attested through
/// the real node API, with 500 entries, sending one batch of 500 after
/// another) against a server in its own process, after a 0.5 s warm-up;
/// and the server's CPU per item.
pub async fn node_api_throughput(
    duration: Duration,
    signing: Signing,
    events: bool,
    datastore: Option<&str>,
) -> Throughput {
    let (_dir, server, mut admin, addr, bundle) = server_and_admin(events, datastore).await;
    let agents = simulated_agents(&mut admin, addr, &bundle, signing).await;
    let mut clients = Vec::new();
    for (agent, request) in agents {
        clients.push((agent.connect().await, request));
    }
    let measured = drive(clients, duration, server.process.id()).await;
    server.stop();
    measured
}

/// [`node_api_throughput`] (events on), then the same agents sending the
/// same batches to the plain signer (`plain_signer.rs`: the node API's
/// signing over the same TLS and gRPC, on the server's CA, with nothing
/// behind it), in its own process once the server has stopped.
pub async fn node_api_and_plain(duration: Duration, signing: Signing) -> (Throughput, Throughput) {
    let (dir, server, mut admin, addr, bundle) = server_and_admin(true, None).await;
    let agents = simulated_agents(&mut admin, addr, &bundle, signing).await;
    let mut clients = Vec::new();
    for (agent, request) in &agents {
        clients.push((agent.connect().await, request.clone()));
    }
    let tessera = drive(clients, duration, server.process.id()).await;
    drop(admin);
    server.stop();
    let plain = Child::plain_signer(&dir.path().join("server"));
    let plain_addr: std::net::SocketAddr = plain.ready.parse().unwrap();
    let mut clients = Vec::new();
    for (agent, request) in agents {
        clients.push((agent.at(plain_addr).connect().await, request));
    }
    let without = drive(clients, duration, plain.process.id()).await;
    plain.stop();
    (tessera, without)
}

/// 8 agents attested through the node API at `addr`, each with 500
/// entries of its own, and the batch each sends (one item per entry).
async fn simulated_agents(
    admin: &mut AdminClient,
    addr: std::net::SocketAddr,
    bundle: &[CertificateDer<'static>],
    signing: Signing,
) -> Vec<(TestAgent, Batch)> {
    let (agents, batch) = (8, 500);
    let mut out = Vec::new();
    for i in 0..agents {
        let id = format!("spiffe://example.org/issue/agent-{i}");
        let entries = (0..batch)
            .map(|j| {
                entry(
                    &format!("spiffe://example.org/issue/{i}/{j}"),
                    &id,
                    &[&format!("unix:uid:{}", j + 1)],
                    None,
                )
            })
            .collect();
        let created = admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries })
            .await
            .unwrap()
            .into_inner();
        let ids = created.results.into_iter().map(|r| r.entry.unwrap().id);
        let request = match signing {
            Signing::X509 => Batch::X509(node_pb::SignX509Request {
                items: ids
                    .map(|entry_id| node_pb::SignX509Item {
                        entry_id,
                        csr: tessera_tests::key_and_csr().1,
                    })
                    .collect(),
            }),
            Signing::Jwt => Batch::Jwt(node_pb::SignJwtRequest {
                items: ids
                    .map(|entry_id| node_pb::SignJwtItem {
                        entry_id,
                        audience: vec!["bench".into()],
                    })
                    .collect(),
            }),
        };
        out.push((attest_simulated(admin, addr, bundle, &id).await, request));
    }
    out
}

/// Each client sending its batch over and over: items signed per second
/// over `duration` (after a 0.5 s warm-up), and the CPU per item of the
/// process `pid` that signs them.
async fn drive(clients: Vec<(NodeClient, Batch)>, duration: Duration, pid: u32) -> Throughput {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (mut client, request) in clients {
        let (done, stop) = (done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let ok =
                |status: Option<&tessera_proto::types::Status>| status.is_some_and(|s| s.code == 0);
            while !stop.load(Ordering::Relaxed) {
                let signed = match request.clone() {
                    Batch::X509(request) => {
                        let results = client.sign_x509(request).await.unwrap().into_inner().results;
                        results.iter().filter(|r| ok(r.status.as_ref())).count()
                    }
                    Batch::Jwt(request) => {
                        let results = client.sign_jwt(request).await.unwrap().into_inner().results;
                        results.iter().filter(|r| ok(r.status.as_ref())).count()
                    }
                };
                done.fetch_add(signed as u64, Ordering::Relaxed);
            }
        }));
    }
    let (per_s, cpu_us) = measure_rate_and_cpu(&done, &stop, workers, duration, Some(pid)).await;
    Throughput { per_s, server_cpu_us: cpu_us.unwrap_or(f64::NAN) }
}

/// The rows comparing the server (`signed`) with the plain signer
/// (`plain`) and ring's `limit`, with the words `[limit, item, op]` (the
/// limit's name, what one item is, what the limit's loop does per item);
/// and their figures under `keys` (the plain signer's rate, its CPU per
/// item, its ratio to the limit, the server's ratio to it).
pub fn plain_rows(
    [name, item, op]: [&str; 3],
    (signed, plain, limit): (Throughput, Throughput, f64),
    keys: [&'static str; 4],
) -> Figures {
    ratio_row(&format!("  plain signer, same transport; {name}"), plain.per_s, limit);
    cpu_row(&format!("  its CPU per {item} (us); the limit's {op}"), plain.server_cpu_us, limit);
    ratio_row("  node API; plain signer", signed.per_s, plain.per_s);
    let [per_s, cpu_us, limit_ratio, ratio] = keys;
    vec![
        (per_s, json!(plain.per_s.round())),
        (cpu_us, json!(round(plain.server_cpu_us))),
        (limit_ratio, json!(round(plain.per_s / limit))),
        (ratio, json!(round(signed.per_s / plain.per_s))),
    ]
}

/// What [`node_api_throughput`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Signed per second.
    pub per_s: f64,
    /// The signing process's CPU per item signed (µs, user and system):
    /// with the limit's cost per signature beside it, what the server's own
    /// work costs (it swings with the machine too).
    pub server_cpu_us: f64,
}

/// What [`ecdsa_limit`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecdsa {
    /// A P-256 signature plus its verification over a TBSCertificate-sized
    /// message (DER signatures): what issuing an X509-SVID costs at least.
    SignAndVerify,
    /// ES256 signatures (fixed-length) over a JWT-sized signing input.
    Es256Sign,
    /// ES256 verifications.
    Es256Verify,
}

/// Operations per second with ring on every core.
pub fn ecdsa_limit(duration: Duration, op: Ecdsa) -> f64 {
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    let (signing, verifying, size) = match op {
        Ecdsa::SignAndVerify => (&ECDSA_P256_SHA256_ASN1_SIGNING, &ECDSA_P256_SHA256_ASN1, 600),
        Ecdsa::Es256Sign | Ecdsa::Es256Verify => {
            (&ECDSA_P256_SHA256_FIXED_SIGNING, &ECDSA_P256_SHA256_FIXED, 250)
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let rng = SystemRandom::new();
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
                let key = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
                let public = UnparsedPublicKey::new(verifying, key.public_key().as_ref().to_vec());
                let message = vec![7u8; size];
                let signature = key.sign(&rng, &message).unwrap();
                let (start, mut ops) = (Instant::now(), 0u64);
                while start.elapsed() < duration {
                    match op {
                        Ecdsa::SignAndVerify => {
                            let signature = key.sign(&rng, &message).unwrap();
                            public.verify(&message, signature.as_ref()).unwrap();
                        }
                        Ecdsa::Es256Sign => drop(key.sign(&rng, &message).unwrap()),
                        Ecdsa::Es256Verify => public.verify(&message, signature.as_ref()).unwrap(),
                    }
                    ops += 1;
                }
                ops as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}
