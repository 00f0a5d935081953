//! mTLS between two workloads through `tessera-workload-api`: each side's
//! `X509Source` follows a real agent; handshakes authorize by SPIFFE ID,
//! refuse revoked peers, and pick up rotated SVIDs with no restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tessera_proto::admin as admin_pb;
use tessera_tests::{my_uid, RunningAgent, TestServer};
use tessera_workload_api::{
    client_config, peer_spiffe_id, server_config, Authorize, SpiffeId, X509Source,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

mod common;
use common::trimmed_hex;

const SERVER_ID: &str = "spiffe://example.org/orders";
const CLIENT_ID: &str = "spiffe://example.org/billing";
const DEADLINE: Duration = Duration::from_secs(30);

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// Accepts connections forever; reports each peer's SPIFFE ID (or the
/// handshake error) and echoes one line.
async fn serve(
    config: rustls::ServerConfig,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<String, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let peer = peer_spiffe_id(tls.get_ref().1)
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let _ = tx.send(Ok(peer));
                        let (read, mut write) = tokio::io::split(&mut tls);
                        let mut line = String::new();
                        if BufReader::new(read).read_line(&mut line).await.is_ok() {
                            let _ = write.write_all(line.as_bytes()).await;
                            let _ = write.flush().await;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// One round trip; returns the server's SPIFFE ID and leaf certificate.
async fn call(config: rustls::ClientConfig, addr: SocketAddr) -> Result<(String, Vec<u8>), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("ignored").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let server = peer_spiffe_id(tls.get_ref().1).map(|p| p.to_string()).unwrap_or_default();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line != "ping\n" {
            return Err(format!("no echo (got {line:?}): refused by the server"));
        }
        Ok((server, leaf))
    };
    tokio::time::timeout(DEADLINE, attempt).await.map_err(|_| "timed out".to_string())?
}

struct Setup {
    _dir: tempfile::TempDir,
    server: TestServer,
    agent: RunningAgent,
}

async fn setup(server_ttl: Option<u32>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    let me = format!("unix:uid:{}", my_uid());
    server.create_entry(SERVER_ID, &agent.id, &[&me], server_ttl).await;
    server.create_entry(CLIENT_ID, &agent.id, &[&me], None).await;
    Setup { _dir: dir, server, agent }
}

async fn source(setup: &Setup, as_id: &str) -> X509Source {
    X509Source::connect_as(&setup.agent.endpoint(), Some(id(as_id))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_authorize_by_spiffe_id() {
    let setup = setup(None).await;
    let (server_source, client_source) =
        (source(&setup, SERVER_ID).await, source(&setup, CLIENT_ID).await);
    let (addr, mut accepted) =
        serve(server_config(&server_source, Authorize::exact(id(CLIENT_ID))).unwrap()).await;

    let (server_seen, _) =
        call(client_config(&client_source, Authorize::exact(id(SERVER_ID))).unwrap(), addr)
            .await
            .unwrap();
    assert_eq!(server_seen, SERVER_ID, "the client sees the server's SPIFFE ID");
    assert_eq!(
        accepted.recv().await.unwrap().unwrap(),
        CLIENT_ID,
        "the server sees the client's SPIFFE ID"
    );

    // A client expecting another server refuses this one.
    let wrong_server =
        client_config(&client_source, Authorize::exact(id("spiffe://example.org/payments")))
            .unwrap();
    let err = call(wrong_server, addr).await.unwrap_err();
    assert!(err.contains("not authorized"), "{err}");
    let _ = accepted.recv().await;

    // Trust-domain and predicate policies.
    let td = client_config(&client_source, Authorize::trust_domain("example.org".parse().unwrap()))
        .unwrap();
    call(td, addr).await.unwrap();
    let _ = accepted.recv().await;
    let nope = client_config(
        &client_source,
        Authorize::predicate(|id| id.path().starts_with("/payments")),
    )
    .unwrap();
    call(nope, addr).await.unwrap_err();
    setup.agent.stop().await;
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_a_client_outside_its_policy() {
    let setup = setup(None).await;
    let (server_source, client_source) =
        (source(&setup, SERVER_ID).await, source(&setup, CLIENT_ID).await);
    let only_other =
        Authorize::one_of([id("spiffe://example.org/reporting"), id("spiffe://example.org/audit")]);
    let (addr, mut accepted) = serve(server_config(&server_source, only_other).unwrap()).await;
    let err = call(client_config(&client_source, Authorize::exact(id(SERVER_ID))).unwrap(), addr)
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    let refusal = accepted.recv().await.unwrap().unwrap_err();
    assert!(refusal.contains("not authorized"), "{refusal}");
    setup.agent.stop().await;
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_is_refused_by_the_next_handshake() {
    let setup = setup(None).await;
    let (server_source, client_source) =
        (source(&setup, SERVER_ID).await, source(&setup, CLIENT_ID).await);
    let (addr, mut accepted) =
        serve(server_config(&server_source, Authorize::exact(id(CLIENT_ID))).unwrap()).await;

    // A client that keeps presenting the SVID it has now (as a stolen copy would).
    let stolen = client_source.svid().unwrap();
    let static_client = || {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = tessera_workload_api::SpiffeServerCertVerifier::new(
            client_source.trust(),
            Arc::new(|id: &SpiffeId| id.as_str() == SERVER_ID),
        );
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                stolen.chain().to_vec(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(stolen.key_pkcs8().to_vec())),
            )
            .unwrap()
    };
    call(static_client(), addr).await.expect("accepted before revocation");
    assert_eq!(accepted.recv().await.unwrap().unwrap(), CLIENT_ID);

    setup
        .server
        .admin()
        .await
        .revoke_svid(admin_pb::RevokeSvidRequest {
            serial: stolen.serial_hex(),
            reason: "stolen".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The server's source learns of it by push.
    let mut changes = server_source.changes();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let listed = server_source.trust().crls().iter().any(|crl| {
                let (_, crl) = x509_parser::parse_x509_crl(crl).unwrap();
                let found = crl
                    .iter_revoked_certificates()
                    .any(|r| trimmed_hex(r.raw_serial()) == stolen.serial_hex());
                found
            });
            if listed {
                return;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the revocation reaches the server's source");

    call(static_client(), addr).await.unwrap_err();
    let refusal = accepted.recv().await.unwrap().unwrap_err();
    assert!(refusal.to_lowercase().contains("revoked"), "{refusal}");
    // The live client has its replacement and still gets in.
    tokio::time::timeout(DEADLINE, async {
        while client_source.svid().unwrap().serial_hex() == stolen.serial_hex() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    call(client_config(&client_source, Authorize::exact(id(SERVER_ID))).unwrap(), addr)
        .await
        .unwrap();
    setup.agent.stop().await;
    setup.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_svid_is_presented_by_the_next_handshake_without_restart() {
    let setup = setup(Some(4)).await;
    let (server_source, client_source) =
        (source(&setup, SERVER_ID).await, source(&setup, CLIENT_ID).await);
    let server_tls = server_config(&server_source, Authorize::exact(id(CLIENT_ID))).unwrap();
    let client_tls = client_config(&client_source, Authorize::exact(id(SERVER_ID))).unwrap();
    let (addr, _accepted) = serve(server_tls).await;

    let (_, first_leaf) = call(client_tls.clone(), addr).await.unwrap();
    let mut changes = server_source.changes();
    let first_serial = server_source.svid().unwrap().serial_hex();
    tokio::time::timeout(DEADLINE, async {
        while server_source.svid().unwrap().serial_hex() == first_serial {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the server's 4 s SVID rotates");
    let (_, next_leaf) = call(client_tls, addr).await.unwrap();
    assert_ne!(first_leaf, next_leaf, "the same configs present the rotated certificate");
    setup.agent.stop().await;
    setup.server.stop().await;
}
