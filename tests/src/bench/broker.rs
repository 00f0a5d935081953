//! `broker`: the token broker on loopback HTTPS. Token exchange latency on
//! a warm path (one keep-alive connection, a JWT-SVID subject token, a read
//! the policy permits), exchanges per second over 16 connections against
//! ring's ES256 signing limit measured in the same run, how long after
//! `task end` introspection says `active: false`, and all of it with the
//! event stream off and on (alternating, so drift hits both).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_proto::admin as admin_pb;
use tessera_server::SystemClock;
use tessera_tests::broker::{broker_config, free_port, Https};
use tessera_tests::{test_config, TestServer};

use crate::signing::{ecdsa_limit, Ecdsa};
use crate::stats::{percentiles, ratio_row, round, row, Figures};

const AGENT: &str = "spiffe://example.org/agents/reporter";
const TOOL: &str = "spiffe://example.org/tools/crm";
const CRM: &str = "https://tools.example/crm";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const CONNECTIONS: usize = 16;

struct Broker {
    server: TestServer,
    addr: std::net::SocketAddr,
    issuer: String,
    ca: PathBuf,
    subject: String,
    tool_svid: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start(events: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = test_config(&dir.path().join("server"));
        config.broker = Some(broker_config(dir.path(), port).resolve().unwrap());
        config.events.enabled = events;
        let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
        let issuer = format!("https://127.0.0.1:{port}");
        let mut admin = server.admin().await;
        let mint = |id: &str| admin_pb::MintJwtSvidRequest {
            spiffe_id: id.into(),
            audience: vec![issuer.clone()],
            ttl: 3600,
        };
        let subject = admin.mint_jwt_svid(mint(AGENT)).await.unwrap().into_inner().token;
        let tool_svid = admin.mint_jwt_svid(mint(TOOL)).await.unwrap().into_inner().token;
        Self {
            addr: server.broker_addr.unwrap(),
            server,
            issuer,
            ca: dir.path().join("ca.pem"),
            subject,
            tool_svid,
            _dir: dir,
        }
    }

    async fn task(&self) -> String {
        let task = self
            .server
            .admin()
            .await
            .start_task(admin_pb::StartTaskRequest {
                spiffe_id: AGENT.into(),
                ttl: 3600,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let task: Value = serde_json::from_str(&task.json).unwrap();
        task["id"].as_str().unwrap().to_string()
    }

    async fn exchange(&self, https: &mut Https, task: &str) -> String {
        let fields = [
            ("grant_type", GRANT),
            ("subject_token", self.subject.as_str()),
            ("subject_token_type", JWT),
            ("audience", CRM),
            ("scope", "read"),
            ("task", task),
        ];
        let (status, body) = https.post_form("/token", &fields, None).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

pub async fn run(quick: bool) -> Figures {
    let mut out = Vec::new();
    let calls = if quick { 1_000 } else { 5_000 };
    let secs = if quick { 3 } else { 8 };
    let (mut lat, mut rate) = ([(0.0, 0.0); 2], [0.0; 2]);
    // Off, on, off, on: each figure is the mean of two runs.
    for round_ in 0..2 {
        for (i, events) in [false, true].into_iter().enumerate() {
            let broker = Broker::start(events).await;
            let (p50, p99) = warm_path(&broker, calls).await;
            lat[i].0 += p50 / 2.0;
            lat[i].1 += p99 / 2.0;
            rate[i] += throughput(&broker, Duration::from_secs(secs)).await / 2.0;
            if events && round_ == 1 {
                let rounds = if quick { 100 } else { 300 };
                let (p50, p99) = task_end_to_inactive(&broker, rounds).await;
                row("task end -> introspection inactive (ms)", p50, p99, rounds);
                out.push(("broker_task_end_p50_ms", json!(round(p50))));
                out.push(("broker_task_end_p99_ms", json!(round(p99))));
            }
            broker.stop().await;
        }
    }
    row("token exchange, warm (ms), events on", lat[1].0, lat[1].1, calls);
    row("token exchange, warm (ms), events off", lat[0].0, lat[0].1, calls);
    let limit = ecdsa_limit(Duration::from_secs(2), Ecdsa::Es256Sign);
    ratio_row("token exchanges/s (16 conns); ES256 limit", rate[1], limit);
    ratio_row("exchange p99, events on; off", lat[1].1, lat[0].1);
    ratio_row("exchanges/s, events on; off", rate[1], rate[0]);
    out.push(("broker_exchange_p50_ms", json!(round(lat[1].0))));
    out.push(("broker_exchange_p99_ms", json!(round(lat[1].1))));
    out.push(("broker_exchange_p99_events_off_ms", json!(round(lat[0].1))));
    out.push(("broker_exchanges_per_s", json!(rate[1].round())));
    out.push(("broker_exchanges_per_s_events_off", json!(rate[0].round())));
    out.push(("broker_es256_limit_per_s", json!(limit.round())));
    out.push(("broker_exchange_ratio", json!(round(rate[1] / limit))));
    out.push(("broker_events_p99_ratio", json!(round(lat[1].1 / lat[0].1))));
    out.push(("broker_events_rate_ratio", json!(round(rate[1] / rate[0]))));
    out
}

/// Sequential exchanges on one keep-alive connection, after a warm-up.
async fn warm_path(broker: &Broker, calls: usize) -> (f64, f64) {
    let task = broker.task().await;
    let mut https = Https::connect(broker.addr, &broker.ca).await;
    for _ in 0..50 {
        broker.exchange(&mut https, &task).await;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        broker.exchange(&mut https, &task).await;
        samples.push(t.elapsed());
    }
    percentiles(samples)
}

/// Exchanges per second over [`CONNECTIONS`] connections.
async fn throughput(broker: &Broker, duration: Duration) -> f64 {
    let task = broker.task().await;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut workers = Vec::new();
    let broker = Arc::new((broker.addr, broker.ca.clone(), broker.subject.clone()));
    for _ in 0..CONNECTIONS {
        let (done, broker, task) = (done.clone(), broker.clone(), task.clone());
        workers.push(tokio::spawn(async move {
            let mut https = Https::connect(broker.0, &broker.1).await;
            let fields = [
                ("grant_type", GRANT),
                ("subject_token", broker.2.as_str()),
                ("subject_token_type", JWT),
                ("audience", CRM),
                ("scope", "read"),
                ("task", task.as_str()),
            ];
            while Instant::now() < deadline {
                let (status, body) = https.post_form("/token", &fields, None).await;
                assert_eq!(status, 200, "{body}");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for w in workers {
        w.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// From the `EndTask` call to introspection answering `active: false` for
/// a token issued under the task (polled on a warm connection).
async fn task_end_to_inactive(broker: &Broker, rounds: usize) -> (f64, f64) {
    let mut https = Https::connect(broker.addr, &broker.ca).await;
    let mut introspect = Https::connect(broker.addr, &broker.ca).await;
    let mut admin = broker.server.admin().await;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let task = broker.task().await;
        let token = broker.exchange(&mut https, &task).await;
        let (_, seen) = introspect
            .post_form("/introspect", &[("token", &token)], Some(&broker.tool_svid))
            .await;
        assert_eq!(seen["active"], true, "{seen}");
        let t = Instant::now();
        admin
            .end_task(admin_pb::EndTaskRequest { id: task, reason: "bench".into() })
            .await
            .unwrap();
        loop {
            let (_, seen) = introspect
                .post_form("/introspect", &[("token", &token)], Some(&broker.tool_svid))
                .await;
            if seen["active"] == false {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the token stayed active after its task ended"
            );
        }
        samples.push(t.elapsed());
    }
    let _ = &broker.issuer;
    percentiles(samples)
}
