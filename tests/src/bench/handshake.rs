//! `handshake`: full mTLS handshakes per second against a server pinned to
//! one thread (one core), first with the `X509Source`-fed config (live
//! rotation, CRL checks, SPIFFE ID authorization), then with a static
//! rustls config built from the same certificate. Clients run on the other
//! core.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_workload_api::{client_config, server_config, Authorize, X509Source};

use crate::stats::{ratio_row, round, Figures};
use crate::workload::{me, setup};

pub async fn run(quick: bool) -> Figures {
    let secs = if quick { 3 } else { 8 };
    let (live, fixed) = handshakes(Duration::from_secs(secs)).await;
    ratio_row("mTLS handshakes/s on 1 core: source, static", live, fixed);
    vec![
        ("handshakes_per_s", json!(live.round())),
        ("handshakes_static_per_s", json!(fixed.round())),
        ("handshake_ratio", json!(round(live / fixed))),
    ]
}

/// Handshakes per second with the live config and with the static one.
async fn handshakes(duration: Duration) -> (f64, f64) {
    let (_dir, server, agent) = setup().await;
    server.create_entry("spiffe://example.org/hs-server", &agent.id, &[&me()], None).await;
    server.create_entry("spiffe://example.org/hs-client", &agent.id, &[&me()], None).await;
    let id = |s: &str| s.parse::<tessera_workload_api::SpiffeId>().unwrap();
    let server_source =
        X509Source::connect_as(&agent.endpoint(), Some(id("spiffe://example.org/hs-server")))
            .await
            .unwrap();
    let client_source =
        X509Source::connect_as(&agent.endpoint(), Some(id("spiffe://example.org/hs-client")))
            .await
            .unwrap();
    let client_tls = Arc::new(
        client_config(&client_source, Authorize::exact(id("spiffe://example.org/hs-server")))
            .unwrap(),
    );

    let live =
        server_config(&server_source, Authorize::exact(id("spiffe://example.org/hs-client")))
            .unwrap();
    let svid = server_source.svid().unwrap();
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for ca in server_source.context().unwrap().bundle.iter() {
            roots.add(ca.clone()).unwrap();
        }
        Arc::new(roots)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
    let mut fixed = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            svid.chain().to_vec(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key_pkcs8().to_vec().into()),
        )
        .unwrap();
    fixed.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    fixed.send_tls13_tickets = 0;

    // Alternate the two configs and keep each one's best run, so neither
    // gains from running first or last.
    let (mut live_rate, mut fixed_rate) = (0.0f64, 0.0f64);
    for _ in 0..2 {
        live_rate =
            live_rate.max(handshake_rate(live.clone(), client_tls.clone(), duration / 2).await);
        fixed_rate =
            fixed_rate.max(handshake_rate(fixed.clone(), client_tls.clone(), duration / 2).await);
    }
    drop((server_source, client_source));
    agent.stop().await;
    server.stop().await;
    (live_rate, fixed_rate)
}

/// Handshakes per second with `config` on one thread, 8 clients on `client`.
async fn handshake_rate(
    config: rustls::ServerConfig,
    client: Arc<rustls::ClientConfig>,
    duration: Duration,
) -> f64 {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (server_done, server_stop) = (done.clone(), stop.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // The server: one thread, one current-thread runtime.
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            while !server_stop.load(Ordering::Relaxed) {
                let Ok(Ok((tcp, _))) =
                    tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let done = server_done.clone();
                tokio::spawn(async move {
                    if acceptor.accept(tcp).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let connector = connector.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A full accept backlog can reset a connection: just retry.
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let name = rustls_pki_types::ServerName::try_from("bench").unwrap();
                let _ = connector.connect(name, tcp).await;
            }
        }));
    }
    tokio::time::sleep(duration).await;
    let count = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let _ = thread.join();
    count as f64 / elapsed.as_secs_f64()
}
