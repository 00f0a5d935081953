//! A server and an agent in this process, and a workload's view of them:
//! warm Workload API clients, open streams, first-response latencies, and
//! how long a new entry takes to reach a workload. Uses `stats`.

use std::time::Instant;

use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;
use tessera_tests::{entry, my_uid, RunningAgent, TestServer};

use crate::stats::percentiles;

/// A Workload API client.
pub type WorkloadClient =
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>;

/// A server and an agent attested to it, in this process, on a temp dir.
pub async fn setup() -> (tempfile::TempDir, TestServer, RunningAgent) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    (dir, server, agent)
}

/// The selector that matches this process.
pub fn me() -> String {
    format!("unix:uid:{}", my_uid())
}

/// A Workload API client on an agent that has already served this process
/// once (its SVIDs are signed and cached).
pub async fn warm_client(agent: &RunningAgent) -> WorkloadClient {
    fetch_x509(&agent.endpoint()).await.expect("warm-up fetch");
    connect_workload_api(&agent.endpoint()).await.unwrap()
}

/// A warm client, its open FetchX509SVID stream, and the stream's first response.
pub async fn open_stream(
    agent: &RunningAgent,
) -> (WorkloadClient, tonic::Streaming<pb::X509svidResponse>, pb::X509svidResponse) {
    let mut client = warm_client(agent).await;
    let mut stream =
        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    (client, stream, first)
}

/// p50 and p99 of `calls` FetchX509SVID first responses on a warm client.
pub async fn fetch_latency(agent: &RunningAgent, calls: usize) -> (f64, f64) {
    let mut client = warm_client(agent).await;
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let mut stream =
            client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        samples.push(start.elapsed());
        assert_eq!(first.svids.len(), 1);
    }
    percentiles(samples)
}

/// Streams kept open while a figure (RSS) is read.
pub type OpenStreams = Vec<Box<dyn std::any::Any + Send>>;

/// p50/p99 of the first response of `streams` FetchX509SVID streams opened
/// at once, one connection each (all connected before the clock starts),
/// and the streams, still open.
pub async fn concurrent_first_responses(
    endpoint: &str,
    streams: usize,
) -> ((f64, f64), OpenStreams) {
    let (samples, open) = concurrent_first_samples(endpoint, streams).await;
    (percentiles(samples), open)
}

/// [`concurrent_first_responses`], each stream's time to its first
/// response as measured.
pub async fn concurrent_first_samples(
    endpoint: &str,
    streams: usize,
) -> (Vec<std::time::Duration>, OpenStreams) {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(streams));
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let endpoint = endpoint.to_string();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect_workload_api(&endpoint).await.unwrap();
            barrier.wait().await;
            let start = Instant::now();
            let mut stream = client
                .fetch_x509svid(cli_request(pb::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            assert_eq!(first.svids.len(), 1);
            (start.elapsed(), client, stream)
        }));
    }
    let mut samples = Vec::new();
    let mut open = Vec::new();
    for task in tasks {
        let (elapsed, client, stream) = task.await.unwrap();
        samples.push(elapsed);
        open.push(Box::new((client, stream)) as Box<dyn std::any::Any + Send>);
    }
    (samples, open)
}

/// Entry created through `creator` → the new SVID on the open stream of a
/// workload of `agent` (attested to `home`): p50 and p99 over `rounds`.
pub async fn propagation(
    creator: &TestServer,
    home: &TestServer,
    agent: &RunningAgent,
    rounds: usize,
) -> (f64, f64) {
    home.create_entry("spiffe://example.org/base", &agent.id, &[&me()], None).await;
    let (_client, mut stream, _) = open_stream(agent).await;
    let mut admin = creator.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let id = format!("spiffe://example.org/propagate/{i}");
        let new = entry(&id, &agent.id, &[&me()], None);
        let start = Instant::now();
        let created = admin
            .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![new] })
            .await
            .unwrap();
        let entry_id = created.into_inner().results[0].entry.as_ref().unwrap().id.clone();
        until_carries(&mut stream, &id).await;
        samples.push(start.elapsed());
        admin
            .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![entry_id] })
            .await
            .unwrap();
        loop {
            let update = stream.message().await.unwrap().unwrap();
            if !update.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
    }
    percentiles(samples)
}

/// Reads `stream` until a response carries an SVID for `id`.
pub async fn until_carries(stream: &mut tonic::Streaming<pb::X509svidResponse>, id: &str) {
    loop {
        let update = stream.message().await.unwrap().unwrap();
        if update.svids.iter().any(|s| s.spiffe_id == id) {
            break;
        }
    }
}
