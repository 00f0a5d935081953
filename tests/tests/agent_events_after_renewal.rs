//! The agent's events keep reaching the server across renewals of the
//! agent's own SVID (issue 21, defect 3). A renewal replaces the SVID every
//! node client presents; the server refuses the replaced one (`superseded`)
//! from the moment it commits the renewal, which is a little before the
//! agent has the answer. Every node client (event pusher, Sync stream,
//! signers) follows one rule for that: wait for the renewal's answer, then
//! call again at once with the new SVID. None backs off, and none asks for
//! another renewal (which supersedes everything again).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin::{GetAgentRequest, ListEventsRequest};
use tessera_proto::workload as wpb;
use tessera_tests::{http_get, my_uid, RunningAgent, TestServer};

/// Agent SVID lifetime: renewed at half-life, every 2 s or so.
const AGENT_SVID_TTL: u32 = 4;
/// Renewals watched.
const RENEWALS: usize = 12;
/// How long after a renewal an event the agent records may take to reach
/// the server's event log (pushes go out every 250 ms).
const EVENT_DEADLINE: Duration = Duration::from_secs(3);
/// Renewals closer together than this were not scheduled (half-life is
/// about 2 s, counted in whole seconds): something asked for one more.
const MIN_RENEWAL_GAP: Duration = Duration::from_millis(500);

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Whether the server stored an event the agent recorded at or after `since_ms`.
async fn stored_since(server: &TestServer, agent_id: &str, since_ms: i64) -> bool {
    let request =
        ListEventsRequest { agent_id: agent_id.into(), since_ms, limit: 1, ..Default::default() };
    let mut stream = server.admin().await.list_events(request).await.unwrap().into_inner();
    stream.message().await.unwrap().is_some()
}

async fn agent_serial(server: &TestServer, agent_id: &str) -> String {
    let get = GetAgentRequest { spiffe_id: agent_id.into() };
    server.admin().await.get_agent(get).await.unwrap().into_inner().x509_svid_serial
}

/// The agent's `name` counter from its metrics endpoint.
fn agent_counter(agent: &RunningAgent, name: &str) -> u64 {
    let (_, body) = http_get(agent.metrics_addr.unwrap(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_events_reach_the_server_within_seconds_after_each_agent_svid_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tessera_tests::test_config(&dir.path().join("server"));
    config.agent_svid_ttl = AGENT_SVID_TTL;
    let server = TestServer::start_with(config, Arc::new(tessera_server::SystemClock)).await;
    let agent = RunningAgent::start_configured(&server, &dir.path().join("agent"), |config| {
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    server
        .create_entry(
            "spiffe://example.org/events-after-renewal",
            &agent.id,
            &[&format!("unix:uid:{}", my_uid())],
            Some(600),
        )
        .await;

    // Workloads busy all along, as in production: every call is an event,
    // so pushes are under way when a renewal lands. JWT-SVIDs validated on
    // a few connections (cheap), plus an X509-SVID fetch now and then.
    let audience = vec!["events-after-renewal".to_string()];
    let token = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = connect_workload_api(&agent.endpoint()).await.unwrap();
            let request = wpb::JwtsvidRequest { audience: audience.clone(), spiffe_id: "".into() };
            match client.fetch_jwtsvid(cli_request(request)).await {
                Ok(response) => break response.into_inner().svids[0].svid.clone(),
                Err(e) => assert!(Instant::now() < deadline, "no JWT-SVID: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut traffic = Vec::new();
    for _ in 0..3 {
        let (stop, endpoint, token) = (stop.clone(), agent.endpoint(), token.clone());
        let audience = audience[0].clone();
        traffic.push(tokio::spawn(async move {
            let mut client = connect_workload_api(&endpoint).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let request =
                    wpb::ValidateJwtsvidRequest { audience: audience.clone(), svid: token.clone() };
                let _ = client.validate_jwtsvid(cli_request(request)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    {
        let (stop, endpoint) = (stop.clone(), agent.endpoint());
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = fetch_x509(&endpoint).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Every renewal the server records, as it happens.
    let renewals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let watcher = {
        let (stop, renewals) = (stop.clone(), renewals.clone());
        let (admin_socket, id) = (server.admin_socket.clone(), agent.id.clone());
        tokio::spawn(async move {
            let mut admin = tessera_server::connect_admin(&admin_socket).await.unwrap();
            let get = GetAgentRequest { spiffe_id: id };
            let mut serial = String::new();
            while !stop.load(Ordering::Relaxed) {
                let now = admin.get_agent(get.clone()).await.unwrap().into_inner().x509_svid_serial;
                if !serial.is_empty() && now != serial {
                    renewals.lock().unwrap().push(Instant::now());
                }
                serial = now;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut serial = agent_serial(&server, &agent.id).await;
    let mut delays = Vec::new();
    for round in 1..=RENEWALS {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = agent_serial(&server, &agent.id).await;
            if now != serial {
                serial = now;
                break;
            }
            assert!(Instant::now() < deadline, "renewal {round}: the agent SVID was not renewed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (renewed, since) = (Instant::now(), unix_ms());
        while !stored_since(&server, &agent.id, since).await {
            assert!(
                renewed.elapsed() < EVENT_DEADLINE,
                "renewal {round}: no event the agent recorded after it reached the server \
                 within {EVENT_DEADLINE:?} (earlier renewals: {delays:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        delays.push(renewed.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for task in traffic {
        let _ = task.await;
    }
    let _ = watcher.await;
    let push_failures = agent_counter(&agent, "tessera_agent_event_push_failures_total");
    let renewals = renewals.lock().unwrap().clone();
    let gaps: Vec<Duration> = renewals.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "events after each renewal within {delays:.2?}; renewals {gaps:.2?} apart; \
         pushes failed: {push_failures}"
    );
    // The renewals themselves cost no push: one refused for the SVID being
    // replaced is sent again at once with the new one.
    assert_eq!(push_failures, 0, "pushes failed (and backed off) across the renewals");
    // A refusal of the SVID being replaced asks for no other renewal.
    assert!(
        gaps.iter().all(|gap| *gap >= MIN_RENEWAL_GAP),
        "renewals off schedule (one renewal led to another): {gaps:.2?}"
    );
    agent.stop().await;
    server.stop().await;
}
