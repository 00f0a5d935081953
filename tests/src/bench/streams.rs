//! `streams`: 1,000 workloads (one connection each) open FetchX509SVID at
//! once, on the real agent and on a plain tonic server with nothing behind
//! it. Both serve for the whole run. Each gets one round first that is not
//! measured (the first 1,000 connections in a process take fresh memory
//! that every later round reuses, the bench's client included: measured,
//! ~5,800 more page faults on the same client code in the round that came
//! first), then six measured rounds alternate, each side first in three,
//! one second apart. Each side's p50 and p99 are over all its measured
//! samples (6,000), and every round's p99 is printed.

use std::time::Duration;

use serde_json::json;
use tessera_proto::workload as pb;
use tessera_tests::{RunningAgent, TestServer};

use crate::stats::{percentiles, round, row, Figures};
use crate::workload::{concurrent_first_samples, me, open_stream};

/// Measured rounds per side (even: each side goes first in half of them).
const ROUNDS: usize = 6;
/// The pause after each round: its 1,000 connections close, and their
/// teardown is not charged to the next round (the other side's).
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run() -> Figures {
    let (agent, plain) = agent_and_plain(1_000).await;
    let per_round = |rounds: &[Vec<Duration>]| -> Vec<f64> {
        rounds.iter().map(|r| percentiles(r.clone()).1).collect()
    };
    let (agent_rounds, plain_rounds) = (per_round(&agent), per_round(&plain));
    let a = percentiles(agent.concat());
    let p = percentiles(plain.concat());
    row(&format!("1,000 concurrent streams, agent (ms; {ROUNDS} rounds)"), a.0, a.1, 1_000);
    row("  ... same tonic server, no attestation (ms)", p.0, p.1, 1_000);
    println!("{:<44} {:>12.2} {:>12.2}", "  ... ratio agent / plain", a.0 / p.0, a.1 / p.1);
    let rounds: Vec<String> =
        agent_rounds.iter().zip(&plain_rounds).map(|(a, p)| format!("{a:.1}/{p:.1}")).collect();
    println!("  ... p99 per round, agent/plain (ms): {}", rounds.join(" "));
    vec![
        ("streams_agent_p50_ms", json!(round(a.0))),
        ("streams_agent_p99_ms", json!(round(a.1))),
        ("streams_plain_p50_ms", json!(round(p.0))),
        ("streams_plain_p99_ms", json!(round(p.1))),
        ("streams_p99_ratio", json!(round(a.1 / p.1))),
    ]
}

/// 1,000 workloads (one connection each) open FetchX509SVID at once: each
/// stream's time to its first response, per measured round, from the real
/// agent and from the same tonic server type on the same kind of Unix
/// socket serving a response of the same size with no attestation, no
/// `:authority` rewriting and no cache.
async fn agent_and_plain(streams: usize) -> (Vec<Vec<Duration>>, Vec<Vec<Duration>>) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.connections_per_uid = 100_000;
        config.workload_limits.streams_per_uid = 100_000;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let (_client, _stream, response) = open_stream(&agent).await;

    let socket = dir.path().join("plain.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = stop.clone();
    let plain = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                    PlainService(std::sync::Arc::new(response)),
                ),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                serving.cancelled(),
            )
            .await
    });
    let endpoints = [agent.endpoint(), format!("unix://{}", socket.display())];
    let mut measured = [Vec::new(), Vec::new()];
    // Round 0 warms both sides up and is not measured; then the first side
    // alternates.
    for i in 0..=ROUNDS {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (samples, open) = concurrent_first_samples(&endpoints[side], streams).await;
            if i > 0 {
                measured[side].push(samples);
            }
            // The round's connections close before the next round starts.
            drop(open);
            tokio::time::sleep(SETTLE).await;
        }
    }
    stop.cancel();
    let _ = plain.await;
    agent.stop().await;
    server.stop().await;
    let [agent_rounds, plain_rounds] = measured;
    (agent_rounds, plain_rounds)
}

/// The Workload API with nothing behind it: every FetchX509SVID stream gets
/// one fixed response, then stays open until the client leaves.
#[derive(Debug)]
struct PlainService(std::sync::Arc<pb::X509svidResponse>);

type PlainStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi for PlainService {
    type FetchX509SVIDStream = PlainStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        _request: tonic::Request<pb::X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let response = self.0.as_ref().clone();
        tokio::spawn(async move {
            if tx.send(Ok(response)).await.is_ok() {
                tx.closed().await;
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type FetchX509BundlesStream = PlainStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        _request: tonic::Request<pb::X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    async fn fetch_jwtsvid(
        &self,
        _request: tonic::Request<pb::JwtsvidRequest>,
    ) -> Result<tonic::Response<pb::JwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    type FetchJWTBundlesStream = PlainStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _request: tonic::Request<pb::JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }

    async fn validate_jwtsvid(
        &self,
        _request: tonic::Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<pb::ValidateJwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("plain baseline"))
    }
}
