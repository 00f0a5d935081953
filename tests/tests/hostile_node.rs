//! The node API under load from peers without credentials (issue 19, items
//! 7-9), against real servers on real sockets: idle sockets, certless TLS
//! connections sending large HTTP/2 frames, floods of bogus attestations.
//! Attackers connect from loopback addresses other than 127.0.0.1, as other
//! machines would; the agents under test connect from 127.0.0.1.

mod common;

use std::time::Duration;

use common::{server_bin, within, PROMPTLY};
use tessera_tests::hostile::{self, loopback};
use tessera_tests::{http_get, test_config, RunningAgent, TestAgent, TestServer};

/// Item 7: the accept loop never waits on handshakes. 300 sockets that
/// connect and never speak (from 10 addresses, under the per-address cap)
/// once held every handshake slot, and an agent's attestation then failed
/// (`did not answer in 5s`, the agent's connect timeout). A real agent
/// attests through them; the server then closes them (handshake timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_attests_while_300_idle_sockets_hold_the_node_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let sources: Vec<_> = (1..=10).map(|h| loopback(1, h)).collect();
    let mut idle = hostile::idle_sockets(server.addr, &sources, 300).await;

    let agent = within(
        PROMPTLY,
        "the agent's attestation",
        RunningAgent::start(&server, &dir.path().join("agent")),
    )
    .await;
    assert!(agent.id.starts_with("spiffe://example.org/"), "{}", agent.id);
    for socket in idle.iter_mut().take(10) {
        assert!(
            hostile::closed_within(socket, PROMPTLY).await,
            "an idle socket outlived the handshake timeout"
        );
    }
    agent.stop().await;
    server.stop().await;
}

/// Item 7: connections over the per-address cap of unauthenticated
/// connections are closed at accept and counted; the ones under it are
/// closed by the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_closed_at_accept_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    config.node_max_unauthenticated_per_ip = 8;
    let server =
        TestServer::start_with(config, std::sync::Arc::new(tessera_server::SystemClock)).await;
    let metrics = server.metrics_addr.unwrap();
    let mut sockets = hostile::idle_sockets(server.addr, &[loopback(2, 1)], 20).await;
    let refused = || {
        let (_, body) = http_get(metrics, "/metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix("tessera_server_node_connections_refused_total{cap=\"per_ip\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    within(PROMPTLY, "12 connections refused over the cap of 8", async {
        while refused() < 12.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(refused(), 12.0);
    // Another address is not held up by this one.
    let agent = within(
        PROMPTLY,
        "attestation from another address",
        RunningAgent::start(&server, &dir.path().join("agent")),
    )
    .await;
    for socket in &mut sockets {
        assert!(hostile::closed_within(socket, PROMPTLY).await, "a connection was never closed");
    }
    agent.stop().await;
    server.stop().await;
}

/// Item 8: before a client certificate is verified a connection holds at
/// most one small request. 64 certless TLS connections that each open
/// streams of 2 MiB messages and send all but their last byte (obeying
/// HTTP/2 flow control) once made the server buffer every stream; its
/// memory stays within a bound, and it closes the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certless_connections_sending_large_frames_hold_little_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = hostile::ServerProcess::start(&server_bin(), &dir.path().join("server"), "").await;
    let bundle = server.bundle().await;
    // Warm: one attestation, so the calm figure includes a served request.
    let token = server
        .admin()
        .await
        .create_join_token(tessera_proto::admin::CreateJoinTokenRequest {
            ttl: 60,
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    TestAgent::attest_to(server.addr, bundle.clone(), &token.token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calm = server.rss_mb();

    let stop = tokio_util::sync::CancellationToken::new();
    let attackers: Vec<_> = (0..64)
        .map(|i| {
            let (bundle, stop) = (bundle.clone(), stop.clone());
            let source = loopback(4, 1 + (i % 4) as u8);
            let addr = server.addr;
            tokio::spawn(async move {
                hostile::large_frames(addr, &bundle, source, 2 << 20, 8, stop).await
            })
        })
        .collect();
    let mut peak = calm;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(server.rss_mb());
    }
    eprintln!("server RSS calm {calm:.1} MiB, peak under attack {peak:.1} MiB");
    let reports = within(PROMPTLY, "the server closing every certless connection", async {
        let mut reports = Vec::new();
        for attacker in attackers {
            reports.push(attacker.await.unwrap());
        }
        reports
    })
    .await;
    stop.cancel();
    let sent: u64 = reports.iter().map(|r| r.bytes).sum();
    let streams: u64 = reports.iter().map(|r| r.streams).sum();
    eprintln!("attackers opened {streams} streams, sent {sent} bytes");
    assert!(streams >= 64, "the attack did not run: {reports:?}");
    assert!(reports.iter().all(|r| r.closed_by_server), "{reports:?}");
    assert!(
        peak < calm + 128.0,
        "64 certless connections took the server from {calm:.1} to {peak:.1} MiB"
    );
}

/// Item 9: bogus join tokens cost no store write, are rate-limited per
/// source address (typed refusal `rate-limited`), and fold into a few
/// events with a count; other addresses and, once its budget refills, the
/// same address attest with valid tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_attestations_write_nothing_are_rate_limited_and_folded_into_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let bundle = server.bundle().await;
    let attacker = loopback(3, 1);
    let mut client = hostile::certless_client_from(server.addr, &bundle, attacker).await.unwrap();
    let mut admin = server.admin().await;
    let events_before = hostile::events_of_kind(&mut admin, "node.attest").await.len();
    let writes_before = hostile::write_seq(&server.data_dir);

    let mut statuses = Vec::new();
    for i in 0..200 {
        statuses.push(hostile::bogus_attest(&mut client, i).await);
    }
    let limited: Vec<_> =
        statuses.iter().filter(|s| s.code() == tonic::Code::ResourceExhausted).collect();
    assert!(
        statuses.iter().all(|s| matches!(
            s.code(),
            tonic::Code::PermissionDenied | tonic::Code::ResourceExhausted
        )),
        "{statuses:?}"
    );
    assert!(limited.len() >= 150, "only {} of 200 were rate-limited", limited.len());
    assert!(limited.iter().all(|s| hostile::refusal(s).as_deref() == Some("rate-limited")));
    assert_eq!(
        statuses[0].code(),
        tonic::Code::PermissionDenied,
        "the first bogus token is refused for what it is"
    );
    assert_eq!(hostile::write_seq(&server.data_dir), writes_before, "a bogus token was written");

    // One event at once, the rest folded into one with a count.
    let from_attacker =
        |events: &[tessera_proto::types::Event]| -> Vec<tessera_proto::types::Event> {
            events
                .iter()
                .filter(|e| hostile::attr(e, "source") == Some(attacker.to_string().as_str()))
                .cloned()
                .collect()
        };
    let folded = within(PROMPTLY, "the folded refusal event", async {
        loop {
            let events = hostile::events_of_kind(&mut admin, "node.attest").await;
            let mine = from_attacker(&events);
            let counted: u64 = mine
                .iter()
                .filter_map(|e| hostile::attr(e, "count").and_then(|c| c.parse::<u64>().ok()))
                .sum();
            if counted >= 200 {
                return (events.len(), mine, counted);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let (all, mine, counted) = folded;
    assert_eq!(counted, 200, "{mine:?}");
    assert!(mine.len() <= 4, "{} events for 200 refusals: {mine:?}", mine.len());
    assert!(all - events_before <= 4, "{} node.attest events", all - events_before);
    assert!(mine.iter().all(|e| e.decision == "deny"));

    // Another address is not limited by this one.
    let token = server.join_token("", 60).await;
    TestAgent::attest(&server, &token.token).await.expect("attestation from 127.0.0.1");
    // The attacker's address gets its budget back with time.
    let token = server.join_token("", 60).await;
    within(PROMPTLY, "a valid token from the limited address", async {
        loop {
            match client
                .attest(tessera_proto::node::AttestRequest {
                    join_token: token.token.clone(),
                    csr: tessera_tests::key_and_csr().1,
                })
                .await
            {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await;
    server.stop().await;
}

/// Item 8: message limits per method. An Attest larger than an Attest can
/// be (16 KiB) is refused before it is read, on a certless connection and
/// on an agent's; an agent's RenewAgent likewise; a signing batch may
/// still be large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_their_methods_limit_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let oversized = || vec![0u8; 20 * 1024];
    let too_large = |status: &tonic::Status| {
        matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)
    };
    let mut certless = tessera_tests::anonymous_client(&server).await;
    let refused = certless
        .attest(tessera_proto::node::AttestRequest { join_token: "t".into(), csr: oversized() })
        .await
        .unwrap_err();
    assert!(too_large(&refused), "{refused:?}");

    let token = server.join_token("", 60).await;
    let agent = TestAgent::attest(&server, &token.token).await.unwrap();
    let mut client = agent.connect().await;
    let refused = client
        .renew_agent(tessera_proto::node::RenewAgentRequest { csr: oversized() })
        .await
        .unwrap_err();
    assert!(too_large(&refused), "{refused:?}");
    let refused = client
        .attest(tessera_proto::node::AttestRequest { join_token: "t".into(), csr: oversized() })
        .await
        .unwrap_err();
    assert!(too_large(&refused), "{refused:?}");
    // A batch of 1,000 CSRs (about 300 KB) is still one request.
    let items = (0..1000)
        .map(|i| tessera_proto::node::SignX509Item {
            entry_id: format!("missing-{i}"),
            csr: tessera_tests::key_and_csr().1,
        })
        .collect();
    let answered = client
        .sign_x509(tessera_proto::node::SignX509Request { items })
        .await
        .expect("a full signing batch is within its limit");
    assert_eq!(answered.into_inner().results.len(), 1000);
    server.stop().await;
}
