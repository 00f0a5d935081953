//! `streams`: 1,000 workloads (one connection each) open FetchX509SVID at
//! once, on the real agent and on a plain tonic server with nothing behind
//! it.

use serde_json::json;
use tessera_proto::workload as pb;
use tessera_tests::{RunningAgent, TestServer};

use crate::stats::{round, row, Figures};
use crate::workload::{concurrent_first_responses, me, open_stream};

pub async fn run() -> Figures {
    let (agent, plain) = agent_and_plain(1_000).await;
    row("1,000 concurrent streams, agent (ms)", agent.0, agent.1, 1_000);
    row("  ... same tonic server, no attestation (ms)", plain.0, plain.1, 1_000);
    println!(
        "{:<44} {:>12.2} {:>12.2}",
        "  ... ratio agent / plain",
        agent.0 / plain.0,
        agent.1 / plain.1
    );
    vec![
        ("streams_agent_p50_ms", json!(round(agent.0))),
        ("streams_agent_p99_ms", json!(round(agent.1))),
        ("streams_plain_p50_ms", json!(round(plain.0))),
        ("streams_plain_p99_ms", json!(round(plain.1))),
        ("streams_p99_ratio", json!(round(agent.1 / plain.1))),
    ]
}

/// 1,000 workloads (one connection each) open FetchX509SVID at once: first
/// response p50/p99 from the real agent, then from the same tonic server type
/// on the same kind of Unix socket serving a response of the same size with
/// no attestation, no `:authority` rewriting and no cache.
async fn agent_and_plain(streams: usize) -> ((f64, f64), (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.connections_per_uid = 100_000;
        config.workload_limits.streams_per_uid = 100_000;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let (_client, _stream, response) = open_stream(&agent).await;
    let (agent_figures, open) = concurrent_first_responses(&agent.endpoint(), streams).await;
    drop(open);
    agent.stop().await;
    server.stop().await;

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
    let plain_figures =
        concurrent_first_responses(&format!("unix://{}", socket.display()), streams).await.0;
    stop.cancel();
    let _ = plain.await;
    (agent_figures, plain_figures)
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
