//! mTLS interoperability of Tessera's rustls configs (`tessera_workload_api::
//! {server_config, client_config}` fed by its `X509Source`) with SPIFFE
//! implementations that share no code with it:
//!
//! - the `spiffe-rustls` crate (fed by the `spiffe` crate's `X509Source`), as
//!   client of a Tessera server and as server for a Tessera client;
//! - `openssl s_client`, with SVID files written from a Workload API fetch.
//!
//! A real server and agent run in this process; the agent attests this test
//! process by its uid, and every test registers several entries for that uid,
//! so the process is entitled to several SVIDs and each side must present the
//! one it was told to (Tessera: `X509Source::connect_as`; the `spiffe` crate:
//! an `SvidPicker`). A bystander ID that sorts first is registered too, so a
//! side that ignored its choice would present the wrong SVID.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, ServerName};
use spiffe::x509_source::SvidPicker;
use spiffe_rustls::{authorizer, mtls_client, mtls_server, LocalOnly};
use tessera_agent::{fetch_x509, FetchedSvid};
use tessera_tests::{my_uid, RunningAgent, TestServer, TRUST_DOMAIN};

mod common;
use common::{within, PROMPTLY};
use tessera_workload_api::{client_config, peer_spiffe_id, server_config, Authorize, SpiffeId};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{ClientConfig, CommonState, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

/// Registered for this process in every test and sorts before the others, so
/// it is the default SVID: whoever presents it did not pick.
const BYSTANDER: &str = "spiffe://example.org/bystander";
const TESSERA_ECHO: &str = "spiffe://example.org/tessera-echo";
const TESSERA_CLIENT: &str = "spiffe://example.org/tessera-client";
const SPIFFE_RUSTLS_CLIENT: &str = "spiffe://example.org/spiffe-rustls-client";
const SPIFFE_RUSTLS_ECHO: &str = "spiffe://example.org/spiffe-rustls-echo";
const OPENSSL_CLIENT: &str = "spiffe://example.org/openssl-client";

/// How long `openssl s_client` gets to print the echo, and then to exit.
const OPENSSL_PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// A `spiffe-rustls` client (presenting `SPIFFE_RUSTLS_CLIENT`, accepting only
/// `TESSERA_ECHO`) and a Tessera server (presenting `TESSERA_ECHO`, accepting
/// only `SPIFFE_RUSTLS_CLIENT`) complete a handshake, exchange a line, and each
/// sees the other's SPIFFE ID. A Tessera server that accepts only another ID
/// refuses that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_rustls_client_talks_to_tessera_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) =
        deploy(dir.path(), &[BYSTANDER, SPIFFE_RUSTLS_CLIENT, TESSERA_ECHO]).await;

    let tessera = tessera_source(&agent, TESSERA_ECHO).await;
    let spiffe = spiffe_source(&agent, SPIFFE_RUSTLS_CLIENT).await;
    let client = Arc::new(
        mtls_client(spiffe.clone())
            .authorize(authorizer::exact([TESSERA_ECHO]).unwrap())
            .trust_domain_policy(LocalOnly(TRUST_DOMAIN.try_into().unwrap()))
            .build()
            .unwrap(),
    );

    // Authorized both ways.
    let config = server_config(&tessera, Authorize::exact(id(SPIFFE_RUSTLS_CLIENT))).unwrap();
    let (addr, served) = serve_one(Arc::new(config)).await;
    let exchanged = within(PROMPTLY, "the spiffe-rustls client's exchange", async {
        exchange(addr, client.clone(), "hello from spiffe-rustls").await
    })
    .await
    .unwrap_or_else(|e| panic!("spiffe-rustls client -> Tessera server failed: {e}"));
    let served = within(PROMPTLY, "the Tessera server's side", served).await.unwrap();
    let served = served.unwrap_or_else(|e| panic!("the Tessera server refused the client: {e}"));
    assert_eq!(exchanged.echo, "hello from spiffe-rustls\n", "the line echoed to spiffe-rustls");
    assert_eq!(served.line, "hello from spiffe-rustls", "the line the Tessera server received");
    exchanged.peer.assert_is(TESSERA_ECHO, "the server, as the spiffe-rustls client sees it");
    served.peer.assert_is(SPIFFE_RUSTLS_CLIENT, "the client, as the Tessera server sees it");

    // The Tessera server accepts only the bystander: the client is refused.
    let config = server_config(&tessera, Authorize::exact(id(BYSTANDER))).unwrap();
    let (addr, served) = serve_one(Arc::new(config)).await;
    let refused = within(PROMPTLY, "the refused exchange", async {
        exchange(addr, client.clone(), "let me in").await
    })
    .await;
    let served = within(PROMPTLY, "the Tessera server's side", served).await.unwrap();
    if let Ok(exchanged) = refused {
        panic!(
            "a Tessera server authorizing only {BYSTANDER} let the spiffe-rustls client \
             ({SPIFFE_RUSTLS_CLIENT}) in: it echoed {:?}",
            exchanged.echo
        );
    }
    let error = served.expect_err("the Tessera server completed a handshake it must refuse");
    assert!(
        error.contains("not authorized") && error.contains(SPIFFE_RUSTLS_CLIENT),
        "the Tessera server refused the client, but not for its SPIFFE ID: {error}"
    );

    spiffe.shutdown_with_timeout(PROMPTLY).await.unwrap();
    drop(tessera);
    agent.stop().await;
    server.stop().await;
}

/// A Tessera client (presenting `TESSERA_CLIENT`, accepting only
/// `SPIFFE_RUSTLS_ECHO`) and a `spiffe-rustls` server (presenting
/// `SPIFFE_RUSTLS_ECHO`, accepting only `TESSERA_CLIENT`) complete a handshake,
/// exchange a line, and each sees the other's SPIFFE ID. A Tessera client that
/// expects another server ID refuses the server, and a `spiffe-rustls` server
/// that accepts only another client ID refuses the Tessera client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tessera_client_talks_to_spiffe_rustls_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) =
        deploy(dir.path(), &[BYSTANDER, SPIFFE_RUSTLS_ECHO, TESSERA_CLIENT]).await;

    let tessera = tessera_source(&agent, TESSERA_CLIENT).await;
    let spiffe = spiffe_source(&agent, SPIFFE_RUSTLS_ECHO).await;
    let spiffe_server = |allowed: &str| {
        Arc::new(
            mtls_server(spiffe.clone())
                .authorize(authorizer::exact([allowed]).unwrap())
                .trust_domain_policy(LocalOnly(TRUST_DOMAIN.try_into().unwrap()))
                .build()
                .unwrap(),
        )
    };
    let client =
        Arc::new(client_config(&tessera, Authorize::exact(id(SPIFFE_RUSTLS_ECHO))).unwrap());

    // Authorized both ways.
    let (addr, served) = serve_one(spiffe_server(TESSERA_CLIENT)).await;
    let exchanged = within(PROMPTLY, "the Tessera client's exchange", async {
        exchange(addr, client.clone(), "hello from tessera").await
    })
    .await
    .unwrap_or_else(|e| panic!("Tessera client -> spiffe-rustls server failed: {e}"));
    let served = within(PROMPTLY, "the spiffe-rustls server's side", served).await.unwrap();
    let served =
        served.unwrap_or_else(|e| panic!("the spiffe-rustls server refused the client: {e}"));
    assert_eq!(exchanged.echo, "hello from tessera\n", "the line echoed to the Tessera client");
    assert_eq!(served.line, "hello from tessera", "the line the spiffe-rustls server received");
    exchanged.peer.assert_is(SPIFFE_RUSTLS_ECHO, "the server, as the Tessera client sees it");
    served.peer.assert_is(TESSERA_CLIENT, "the client, as the spiffe-rustls server sees it");

    // The Tessera client expects the bystander: it refuses the server.
    let picky = Arc::new(client_config(&tessera, Authorize::exact(id(BYSTANDER))).unwrap());
    let (addr, served) = serve_one(spiffe_server(TESSERA_CLIENT)).await;
    let refused = within(PROMPTLY, "the refused exchange", async {
        exchange(addr, picky.clone(), "are you the bystander?").await
    })
    .await;
    let served = within(PROMPTLY, "the spiffe-rustls server's side", served).await.unwrap();
    let error = match refused {
        Ok(exchanged) => panic!(
            "a Tessera client expecting {BYSTANDER} talked to {SPIFFE_RUSTLS_ECHO}: it got {:?}",
            exchanged.echo
        ),
        Err(error) => error,
    };
    assert!(
        error.starts_with("handshake")
            && error.contains("not authorized")
            && error.contains(SPIFFE_RUSTLS_ECHO),
        "the Tessera client refused the server, but not at the handshake for its SPIFFE ID: {error}"
    );
    assert!(served.is_err(), "the spiffe-rustls server completed a handshake the client aborted");

    // The spiffe-rustls server accepts only the bystander: it refuses the Tessera client.
    let (addr, served) = serve_one(spiffe_server(BYSTANDER)).await;
    let refused = within(PROMPTLY, "the refused exchange", async {
        exchange(addr, client.clone(), "let me in").await
    })
    .await;
    let served = within(PROMPTLY, "the spiffe-rustls server's side", served).await.unwrap();
    if let Ok(exchanged) = refused {
        panic!(
            "a spiffe-rustls server authorizing only {BYSTANDER} let the Tessera client \
             ({TESSERA_CLIENT}) in: it echoed {:?}",
            exchanged.echo
        );
    }
    assert!(
        served.is_err(),
        "the spiffe-rustls server completed a handshake it must refuse: {served:?}"
    );

    spiffe.shutdown_with_timeout(PROMPTLY).await.unwrap();
    drop(tessera);
    agent.stop().await;
    server.stop().await;
}

// The command (run from the directory holding the files the agent CLI writes
// with `tessera-agent api fetch --write DIR`):
//
//   openssl s_client -connect 127.0.0.1:7443 -cert svid.pem -key svid.key -CAfile bundle.pem -verify_return_error -brief
//
// The test feeds it "hello\n" on stdin and closes stdin once the echo is
// back; from a shell: (echo hello; sleep 2) | openssl s_client ... (same flags).
/// `openssl s_client`, given an SVID, its key and the bundle as PEM files,
/// completes a verified mTLS handshake with a Tessera server (configured as
/// the echo_server example: it presents `TESSERA_ECHO` and accepts only
/// `OPENSSL_CLIENT`), and its "hello" comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_completes_handshake_with_echo_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = deploy(dir.path(), &[BYSTANDER, OPENSSL_CLIENT, TESSERA_ECHO]).await;

    // SVID files for the client identity, as `tessera-agent api fetch --write` writes them.
    let svids = fetch_x509(&agent.endpoint()).await.unwrap();
    let svid = svids
        .iter()
        .find(|s| s.spiffe_id == OPENSSL_CLIENT)
        .unwrap_or_else(|| panic!("no {OPENSSL_CLIENT} SVID in {svids:?}"));
    let files = dir.path().join("openssl");
    write_svid_files(&files, svid);

    let tessera = tessera_source(&agent, TESSERA_ECHO).await;
    let config = server_config(&tessera, Authorize::exact(id(OPENSSL_CLIENT))).unwrap();
    let (addr, served) = serve_one(Arc::new(config)).await;
    let run = tokio::task::spawn_blocking(move || s_client(&files, addr.port())).await.unwrap();
    let served = within(PROMPTLY, "the Tessera server's side", served).await.unwrap();

    assert!(
        run.echoed,
        "openssl s_client did not get its \"hello\" back; {run}\nthe server saw: {served:?}"
    );
    assert!(
        run.stderr.contains("CONNECTION ESTABLISHED") && run.stderr.contains("Verification: OK"),
        "openssl s_client did not report a verified handshake; {run}"
    );
    assert!(
        run.status.is_some_and(|s| s.success()),
        "openssl s_client did not exit cleanly after stdin closed; {run}"
    );
    let served = served.unwrap_or_else(|e| panic!("the Tessera server refused openssl: {e}"));
    assert_eq!(served.line, "hello", "the line the Tessera server received from openssl");
    served.peer.assert_is(OPENSSL_CLIENT, "the client, as the Tessera server sees it");

    drop(tessera);
    agent.stop().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn id(spiffe_id: &str) -> SpiffeId {
    spiffe_id.parse().unwrap()
}

/// A server and an agent, with an entry per SPIFFE ID in `ids` for this
/// process's uid; returns once the agent serves all of them to this process.
async fn deploy(dir: &Path, ids: &[&str]) -> (TestServer, RunningAgent) {
    let server = TestServer::start(&dir.join("server")).await;
    let agent = RunningAgent::start(&server, &dir.join("agent")).await;
    let selector = format!("unix:uid:{}", my_uid());
    for spiffe_id in ids {
        server.create_entry(spiffe_id, &agent.id, &[&selector], Some(3600)).await;
    }
    let wanted: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let got = fetch_x509(&agent.endpoint()).await;
        let ids: BTreeSet<String> = match &got {
            Ok(svids) => svids.iter().map(|s| s.spiffe_id.clone()).collect(),
            Err(_) => BTreeSet::new(),
        };
        if ids == wanted {
            return (server, agent);
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not serve {wanted:?} to this process within {PROMPTLY:?}; last: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tessera's `X509Source`, presenting the SVID for `spiffe_id`.
async fn tessera_source(agent: &RunningAgent, spiffe_id: &str) -> tessera_workload_api::X509Source {
    let source =
        tessera_workload_api::X509Source::connect_as(&agent.endpoint(), Some(id(spiffe_id)))
            .await
            .unwrap_or_else(|e| panic!("Tessera X509Source as {spiffe_id}: {e}"));
    let presented = source.svid().map(|s| s.spiffe_id().to_string());
    assert_eq!(presented.as_deref(), Some(spiffe_id), "the Tessera source's default SVID");
    source
}

/// Picks the `spiffe` crate's SVID by SPIFFE ID.
struct PickById(String);

impl SvidPicker for PickById {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id().to_string() == self.0)
    }
}

/// The `spiffe` crate's `X509Source`, presenting the SVID for `spiffe_id`
/// (this is the SVID spiffe-rustls presents: it uses the source's selected SVID).
async fn spiffe_source(agent: &RunningAgent, spiffe_id: &str) -> spiffe::X509Source {
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .picker(PickById(spiffe_id.to_string()))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(1))
        .initial_sync_timeout(PROMPTLY)
        .build()
        .await
        .unwrap_or_else(|e| panic!("spiffe X509Source as {spiffe_id}: {e}"));
    let presented = source.svid().map(|s| s.spiffe_id().to_string()).ok();
    assert_eq!(presented.as_deref(), Some(spiffe_id), "the spiffe source's selected SVID");
    source
}

/// Who the other side of a TLS session is, read two ways: by Tessera's
/// `peer_spiffe_id`, and independently from the leaf's URI SANs.
#[derive(Debug)]
struct Peer {
    tessera: Option<String>,
    uri_sans: Vec<String>,
}

impl Peer {
    fn of(session: &CommonState) -> Self {
        let leaf: Option<&CertificateDer<'_>> = session.peer_certificates().and_then(|c| c.first());
        Self {
            tessera: peer_spiffe_id(session).map(|id| id.to_string()),
            uri_sans: leaf.map(|der| uri_sans(der)).unwrap_or_default(),
        }
    }

    fn assert_is(&self, expected: &str, who: &str) {
        assert_eq!(self.uri_sans, [expected], "URI SANs of {who}");
        assert_eq!(self.tessera.as_deref(), Some(expected), "peer_spiffe_id of {who}");
    }
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let Some(san) = cert.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// What a server saw of one connection.
#[derive(Debug)]
struct Served {
    peer: Peer,
    /// The first line the client sent.
    line: String,
}

/// Listens on loopback and serves one connection with `config`: echoes every
/// line until the client closes. The task ends with what it saw, or with why
/// the handshake (or the first read) failed.
async fn serve_one(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<Result<Served, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
        let tls =
            TlsAcceptor::from(config).accept(tcp).await.map_err(|e| format!("handshake: {e}"))?;
        let peer = Peer::of(tls.get_ref().1);
        let (read, mut write) = tokio::io::split(tls);
        let mut lines = BufReader::new(read).lines();
        let mut first = None;
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                    first.get_or_insert(line);
                }
                Ok(None) => break,
                Err(e) if first.is_none() => return Err(format!("first read: {e}")),
                Err(_) => break,
            }
        }
        let line = first.ok_or("the client sent nothing")?;
        Ok(Served { peer, line })
    });
    (addr, task)
}

/// What a client got from one exchange.
#[derive(Debug)]
struct Exchanged {
    peer: Peer,
    /// The server's answer, with its newline.
    echo: String,
}

/// Connects to `addr` with `config`, sends `message` as a line and reads one
/// line back. Errors say which step failed: handshake, write, or read (an
/// alert from the server, or the connection closed without an answer).
async fn exchange(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    message: &str,
) -> Result<Exchanged, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    // Servers are authenticated by SPIFFE ID; the name is not checked.
    let name = ServerName::try_from("anything").unwrap();
    let mut tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let peer = Peer::of(tls.get_ref().1);
    tls.write_all(format!("{message}\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut echo = String::new();
    let read = BufReader::new(&mut tls).read_line(&mut echo).await;
    match read {
        Err(e) => return Err(format!("read: {e}")),
        Ok(0) => return Err("read: the server closed the connection without answering".into()),
        Ok(_) => {}
    }
    let _ = tls.shutdown().await;
    Ok(Exchanged { peer, echo })
}

/// Writes `svid.pem` (the chain), `svid.key` (PKCS#8 "PRIVATE KEY") and
/// `bundle.pem` into `dir`, as `tessera-agent api fetch --write` does.
fn write_svid_files(dir: &Path, svid: &FetchedSvid) {
    let pem_of = |label: &str, ders: &[Vec<u8>]| -> String {
        ders.iter().map(|der| pem::encode(&pem::Pem::new(label, der.clone()))).collect()
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("svid.pem"), pem_of("CERTIFICATE", &svid.chain)).unwrap();
    std::fs::write(dir.join("svid.key"), pem_of("PRIVATE KEY", std::slice::from_ref(&svid.key)))
        .unwrap();
    std::fs::write(dir.join("bundle.pem"), pem_of("CERTIFICATE", &svid.bundle)).unwrap();
}

/// How an `openssl s_client` run went.
#[derive(Debug)]
struct SClientRun {
    /// `None`: it had not exited `OPENSSL_PATIENCE` after stdin closed, and was killed.
    status: Option<ExitStatus>,
    /// Whether a "hello" line came back on stdout.
    echoed: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for SClientRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `openssl s_client` against 127.0.0.1:`port` with the files in `dir`,
/// sends "hello\n", and closes stdin once the echo is back (or after
/// `OPENSSL_PATIENCE`); kills it if it has not exited `OPENSSL_PATIENCE` later.
fn s_client(dir: &Path, port: u16) -> SClientRun {
    let mut child = Command::new("openssl")
        .current_dir(dir)
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-cert", "svid.pem", "-key", "svid.key", "-CAfile", "bundle.pem"])
        .args(["-verify_return_error", "-brief"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();

    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr_pipe.read_to_string(&mut all);
        all
    });

    let deadline = Instant::now() + OPENSSL_PATIENCE;
    let mut echoed = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line == "hello" => {
                echoed = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(stdin);

    let deadline = Instant::now() + OPENSSL_PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    SClientRun { status, echoed, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}
