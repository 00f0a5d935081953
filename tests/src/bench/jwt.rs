//! `jwt`: JWT-SVIDs signed per second through the node API against ring's
//! ES256 limit and against the plain signer (the same calls over the same
//! transport with nothing behind them), with each process's CPU per token
//! beside a signature's in the limit's loop; FetchJWTSVID from the agent's cache,
//! ValidateJWTSVID calls per second against ring's verify limit, and from
//! `svid revoke --jti` to the agent refusing the token.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_agent::{cli_request, connect_workload_api};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload as pb;
use tessera_tests::{RunningAgent, TestServer};

use crate::signing::{ecdsa_limit, node_api_and_plain, plain_rows, Ecdsa, Signing, Throughput};
use crate::stats::{cpu_row, measure_rate, percentiles, ratio_row, round, row, Figures};
use crate::workload::{me, setup, warm_client};

pub async fn run(quick: bool) -> Figures {
    let mut out = Vec::new();
    let secs = if quick { 5 } else { 10 };
    let (signed, plain, limit) = signing_rate(Duration::from_secs(secs)).await;
    let rate = signed.per_s;
    ratio_row("JWT-SVIDs/s signed via node API; ES256 limit", rate, limit);
    cpu_row("  server CPU per token (us); the limit's signature", signed.server_cpu_us, limit);
    let keys =
        ["jwt_plain_per_s", "jwt_plain_cpu_us", "jwt_plain_limit_ratio", "jwt_issue_plain_ratio"];
    out.extend(plain_rows(["ES256 limit", "token", "signature"], (signed, plain, limit), keys));
    out.push(("jwt_server_cpu_us", json!(round(signed.server_cpu_us))));
    out.push(("jwt_issue_per_s", json!(rate.round())));
    out.push(("jwt_issue_limit_per_s", json!(limit.round())));
    out.push(("jwt_issue_ratio", json!(round(rate / limit))));
    let calls = if quick { 2_000 } else { 10_000 };
    let (p50, p99) = cached_fetch(calls).await;
    row("FetchJWTSVID from the cache (ms)", p50, p99, calls);
    out.push(("jwt_fetch_p50_ms", json!(round(p50))));
    out.push(("jwt_fetch_p99_ms", json!(round(p99))));
    let (rate, limit) = validate_rate(Duration::from_secs(secs)).await;
    ratio_row("ValidateJWTSVID/s; ES256 verify limit", rate, limit);
    out.push(("jwt_validate_per_s", json!(rate.round())));
    out.push(("jwt_verify_limit_per_s", json!(limit.round())));
    out.push(("jwt_validate_ratio", json!(round(rate / limit))));
    let rounds = if quick { 100 } else { 300 };
    let (p50, p99) = revoke_to_refusal(rounds).await;
    row("JWT revoke -> refused by agent (ms)", p50, p99, rounds);
    out.push(("jwt_revoke_p50_ms", json!(round(p50))));
    out.push(("jwt_revoke_p99_ms", json!(round(p99))));
    out
}

/// JWT-SVIDs per second through the node API (8 simulated agents, batches
/// of 500, audience "bench"), the same through the plain signer, and the
/// raw ES256 signing rate of ring on every core, measured in the same run.
async fn signing_rate(duration: Duration) -> (Throughput, Throughput, f64) {
    let (rate, plain) = node_api_and_plain(duration, Signing::Jwt).await;
    (rate, plain, ecdsa_limit(Duration::from_secs(2), Ecdsa::Es256Sign))
}

/// A JWT-SVID request for `audience`, any identity.
fn jwt_request(audience: &str) -> tonic::Request<pb::JwtsvidRequest> {
    cli_request(pb::JwtsvidRequest { audience: vec![audience.into()], spiffe_id: String::new() })
}

/// FetchJWTSVID latency on a warm agent: the token for the audience is
/// cached, so each call is attestation plus a cache read.
async fn cached_fetch(calls: usize) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let first = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner();
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let response = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner();
        samples.push(start.elapsed());
        assert_eq!(response.svids[0].svid, first.svids[0].svid, "served from the cache");
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}

/// ValidateJWTSVID calls per second on one agent (16 concurrent callers on
/// 4 connections), against ring's ES256 verify rate on every core. The
/// agent, its server and the callers share this machine's cores.
async fn validate_rate(duration: Duration) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let token = client.fetch_jwtsvid(jwt_request("bench")).await.unwrap().into_inner().svids[0]
        .svid
        .clone();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = connect_workload_api(&agent.endpoint()).await.unwrap();
        for _ in 0..4 {
            let (mut client, done, stop, token) =
                (client.clone(), done.clone(), stop.clone(), token.clone());
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = pb::ValidateJwtsvidRequest {
                        audience: "bench".into(),
                        svid: token.clone(),
                    };
                    client.validate_jwtsvid(cli_request(request)).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let rate = measure_rate(&done, &stop, workers, duration).await;
    agent.stop().await;
    server.stop().await;
    (rate, ecdsa_limit(Duration::from_secs(2), Ecdsa::Es256Verify))
}

/// From the start of `svid revoke --jti` to the workload's agent refusing
/// the token in ValidateJWTSVID (polled back to back). Each round revokes
/// a fresh token (a new audience, so not from the cache).
async fn revoke_to_refusal(rounds: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    // Every round asks for a new audience: more than a uid's default budget.
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.workload_limits.jwt_signings_per_uid = 100_000;
        config.workload_limits.jwt_signing_burst = 100_000;
    })
    .await;
    server.create_entry("spiffe://example.org/bench", &agent.id, &[&me()], None).await;
    let mut client = warm_client(&agent).await;
    let mut admin = server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let audience = format!("revoke-{i}");
        let token = client.fetch_jwtsvid(jwt_request(&audience)).await.unwrap().into_inner().svids
            [0]
        .svid
        .clone();
        let claims = tessera_workload_api::jwt::UnverifiedJwt::decode(&token).unwrap();
        let jti = claims.jti().unwrap().to_string();
        let validate =
            || pb::ValidateJwtsvidRequest { audience: audience.clone(), svid: token.clone() };
        client.validate_jwtsvid(cli_request(validate())).await.unwrap();
        let start = Instant::now();
        admin.revoke_svid(admin_pb::RevokeSvidRequest { jti, ..Default::default() }).await.unwrap();
        while client.validate_jwtsvid(cli_request(validate())).await.is_ok() {}
        samples.push(start.elapsed());
    }
    agent.stop().await;
    server.stop().await;
    percentiles(samples)
}
