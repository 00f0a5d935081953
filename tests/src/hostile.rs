//! What an attacker without credentials does to the node API, for the
//! tests and the benchmark's `hostile` scenario: idle sockets, certless TLS
//! connections sending large HTTP/2 frames, bogus attestations, each from
//! loopback addresses other than 127.0.0.1 (standing for other machines;
//! Linux routes all of 127.0.0.0/8 to `lo`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tessera_agent::node_tls_config;
use tessera_proto::admin::admin_client::AdminClient;
use tessera_proto::node::{self as node_pb, node_client::NodeClient};
use tessera_workload_api::{TrustAnchors, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::TRUST_DOMAIN;

/// `127.0.<net>.<host>`.
pub fn loopback(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 0, net, host])
}

/// A TCP connection to `addr` from the local address `source`.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `n` TCP connections that never send a byte, spread over `sources`.
pub async fn idle_sockets(addr: SocketAddr, sources: &[IpAddr], n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(connect_from(sources[i % sources.len()], addr).await.unwrap());
    }
    held
}

/// Whether the peer closed `stream` (end of file or reset) within `limit`.
pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Keeps `n` idle TCP connections open (spread over `sources`),
/// opening a new one whenever the server closes one, until `stop`.
/// Answers how many connections were opened in all.
pub fn hold_idle_sockets(
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    n: usize,
    stop: CancellationToken,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (source, stop) = (sources[i % sources.len()], stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut opened = 0u64;
                while !stop.is_cancelled() {
                    if let Ok(mut stream) = connect_from(source, addr).await {
                        opened += 1;
                        let mut buf = [0u8; 1024];
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = async { while let Ok(n) = stream.read(&mut buf).await { if n == 0 { break } } } => {}
                        }
                    }
                    // Closed by the server: open another shortly.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                opened
            }));
        }
        let mut opened = 0;
        for task in tasks {
            opened += task.await.unwrap_or(0);
        }
        opened
    })
}

fn certless_tls(bundle: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    node_tls_config(
        TrustAnchors::new(bundle.to_vec()),
        &TrustDomain::new(TRUST_DOMAIN).unwrap(),
        None,
    )
    .unwrap()
}

/// A node API client without a client certificate, connecting from `source`.
pub async fn certless_client_from(
    addr: SocketAddr,
    bundle: &[CertificateDer<'static>],
    source: IpAddr,
) -> Result<NodeClient<Channel>, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(certless_tls(bundle)));
    let channel = Endpoint::from_static("http://tessera-server.invalid")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = connect_from(source, addr).await?;
                let name = ServerName::try_from("tessera-server").map_err(io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(NodeClient::new(channel))
}

/// One attestation with a made-up join token and a valid CSR.
pub async fn bogus_attest(client: &mut NodeClient<Channel>, i: usize) -> tonic::Status {
    let request = node_pb::AttestRequest {
        join_token: format!("bogus-{i}-{}", uuid_like(i)),
        csr: super::key_and_csr().1,
    };
    match client.attest(request).await {
        Ok(_) => panic!("a bogus join token was accepted"),
        Err(status) => status,
    }
}

fn uuid_like(i: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:08x}{:08x}", nanos, i.wrapping_mul(2_654_435_761))
}

/// The typed refusal of a node API status (`tessera-refusal`), if any.
pub fn refusal(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(tessera_proto::REFUSAL_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What one [`large_frames`] connection did.
#[derive(Debug, Default, Clone, Copy)]
pub struct LargeFrames {
    /// Streams opened.
    pub streams: u64,
    /// Request bytes sent (DATA payloads).
    pub bytes: u64,
    /// The server ended the connection (not `stop`).
    pub closed_by_server: bool,
}

/// Flow-control state of a [`large_frames`] connection.
#[derive(Debug)]
struct Windows {
    connection: i64,
    initial: i64,
    streams: HashMap<u32, i64>,
    max_streams: u32,
    dead: bool,
}

type Writer =
    Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>>>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK: a literal header field without indexing, new name, no Huffman.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    for s in [name, value] {
        assert!(s.len() < 127);
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    }
}

/// One TLS connection without a client certificate that opens as many
/// Attest streams as the server allows and on each sends a gRPC message
/// announced as `message` bytes, all but its last byte, as fast as
/// HTTP/2 flow control lets it (a client that obeys the protocol, so
/// what the server buffers is what its settings allow), opening a new
/// stream whenever the server ends one (at most `streams` at once);
/// until `stop` or the server closes the connection. Connects from
/// `source`.
pub async fn large_frames(
    addr: SocketAddr,
    bundle: &[CertificateDer<'static>],
    source: IpAddr,
    message: usize,
    streams: u32,
    stop: CancellationToken,
) -> LargeFrames {
    let mut report = LargeFrames::default();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(certless_tls(bundle)));
    let Ok(tcp) = connect_from(source, addr).await else {
        report.closed_by_server = true;
        return report;
    };
    let name = ServerName::try_from("tessera-server").unwrap();
    let Ok(Ok(tls)) =
        tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await
    else {
        report.closed_by_server = true;
        return report;
    };
    let (mut reader, writer) = tokio::io::split(tls);
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
    let windows = Arc::new(std::sync::Mutex::new(Windows {
        connection: 65_535,
        initial: 65_535,
        streams: HashMap::new(),
        max_streams: 100,
        dead: false,
    }));
    let wake = Arc::new(tokio::sync::Notify::new());
    {
        let mut w = writer.lock().await;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(0x4, 0, 0, &[]));
        if w.write_all(&hello).await.is_err() {
            report.closed_by_server = true;
            return report;
        }
    }
    // Reads the server's frames: settings, window updates, stream ends.
    let reading = {
        let (windows, writer, wake) = (windows.clone(), writer.clone(), wake.clone());
        tokio::spawn(async move {
            let mut header = [0u8; 9];
            loop {
                if reader.read_exact(&mut header).await.is_err() {
                    break;
                }
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let (kind, flags) = (header[3], header[4]);
                let stream =
                    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if reader.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let mut reply = None;
                let mut ended = false;
                {
                    let mut w = windows.lock().unwrap();
                    match kind {
                        0x4 if flags & 1 == 0 => {
                            for setting in payload.chunks_exact(6) {
                                let id = u16::from_be_bytes([setting[0], setting[1]]);
                                let value = u32::from_be_bytes([
                                    setting[2], setting[3], setting[4], setting[5],
                                ]);
                                match id {
                                    3 => w.max_streams = value,
                                    4 => {
                                        let delta = i64::from(value) - w.initial;
                                        w.initial = i64::from(value);
                                        for window in w.streams.values_mut() {
                                            *window += delta;
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            reply = Some(frame(0x4, 1, 0, &[]));
                        }
                        0x8 if payload.len() == 4 => {
                            let inc = i64::from(
                                u32::from_be_bytes([
                                    payload[0], payload[1], payload[2], payload[3],
                                ]) & 0x7fff_ffff,
                            );
                            if stream == 0 {
                                w.connection += inc;
                            } else if let Some(window) = w.streams.get_mut(&stream) {
                                *window += inc;
                            }
                        }
                        0x3 => {
                            w.streams.remove(&stream);
                        }
                        0x0 | 0x1 if flags & 1 == 1 => {
                            ended = w.streams.remove(&stream).is_some();
                        }
                        0x6 if flags & 1 == 0 => reply = Some(frame(0x6, 1, 0, &payload)),
                        0x7 => {
                            w.dead = true;
                        }
                        _ => {}
                    }
                }
                if ended {
                    // Our side of a stream the server answered.
                    reply = Some(frame(0x3, 0, stream, &8u32.to_be_bytes()));
                }
                if let Some(bytes) = reply {
                    if writer.lock().await.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                wake.notify_one();
            }
            windows.lock().unwrap().dead = true;
            wake.notify_one();
        })
    };
    let zeros = vec![0u8; 16_384];
    let mut headers = Vec::new();
    literal(&mut headers, ":method", "POST");
    literal(&mut headers, ":scheme", "https");
    literal(&mut headers, ":path", "/tessera.node.v1.Node/Attest");
    literal(&mut headers, ":authority", "tessera-server");
    literal(&mut headers, "content-type", "application/grpc");
    literal(&mut headers, "te", "trailers");
    let mut next_id = 1u32;
    // Bytes still to send, per open stream.
    let mut open: HashMap<u32, usize> = HashMap::new();
    'attack: while !stop.is_cancelled() {
        let mut out = Vec::new();
        {
            let mut w = windows.lock().unwrap();
            if w.dead {
                report.closed_by_server = true;
                break 'attack;
            }
            open.retain(|id, _| w.streams.contains_key(id));
            while (open.len() as u32) < w.max_streams.min(streams) && w.connection >= 5 {
                let id = next_id;
                next_id += 2;
                out.extend(frame(0x1, 0x4, id, &headers));
                let mut prefix = vec![0u8];
                prefix.extend_from_slice(&(message as u32).to_be_bytes());
                out.extend(frame(0x0, 0, id, &prefix));
                let initial = w.initial;
                w.streams.insert(id, initial - 5);
                w.connection -= 5;
                open.insert(id, message.saturating_sub(1));
                report.streams += 1;
            }
            for (id, left) in open.iter_mut() {
                let window = w.streams.get(id).copied().unwrap_or(0);
                let n = (*left as i64).min(16_384).min(window).min(w.connection);
                if n <= 0 {
                    continue;
                }
                out.extend(frame(0x0, 0, *id, &zeros[..n as usize]));
                *left -= n as usize;
                w.connection -= n;
                if let Some(window) = w.streams.get_mut(id) {
                    *window -= n;
                }
                report.bytes += n as u64;
                if out.len() > 256 * 1024 {
                    break;
                }
            }
        }
        if out.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break 'attack,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        if writer.lock().await.write_all(&out).await.is_err() {
            report.closed_by_server = true;
            break;
        }
    }
    reading.abort();
    report
}

/// A `tessera-server run` process on loopback with its own data dir.
#[derive(Debug)]
pub struct ServerProcess {
    /// Node API address.
    pub addr: SocketAddr,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
    child: std::process::Child,
}

impl ServerProcess {
    /// Starts `bin` (the `tessera-server` binary) with a config file made
    /// of the basics and `extra` (TOML lines); returns once it serves.
    pub async fn start(bin: &Path, data_dir: &Path, extra: &str) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = data_dir.join("server.toml");
        let store = data_dir.join("data");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nbind = \"{addr}\"\nlog_level = \"warn\"\n{extra}\n",
                store.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let admin_socket = store.join("admin.sock");
        let server = Self { addr, data_dir: store, admin_socket, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut admin) = tessera_server::connect_admin(&server.admin_socket).await {
                if admin.get_bundle(tessera_proto::admin::GetBundleRequest {}).await.is_ok() {
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "tessera-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory, MiB.
    pub fn rss_mb(&self) -> f64 {
        rss_mb(self.child.id())
    }

    /// An admin API client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        tessera_server::connect_admin(&self.admin_socket).await.unwrap()
    }

    /// The trust bundle.
    pub async fn bundle(&self) -> Vec<CertificateDer<'static>> {
        let bundle = self
            .admin()
            .await
            .get_bundle(tessera_proto::admin::GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        bundle.authorities.into_iter().map(CertificateDer::from).collect()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, MiB (`VmRSS`).
pub fn rss_mb(pid: u32) -> f64 {
    let [rss] = status_mb(pid, ["VmRSS:"]);
    rss
}

/// `/proc/<pid>/status` figures in kB (each `fields` with its colon, e.g.
/// `RssAnon:`), in MiB, from one read of the file; 0 for a field (or a
/// process) that is gone.
pub fn status_mb<const N: usize>(pid: u32, fields: [&str; N]) -> [f64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    fields.map(|field| {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    })
}

/// The store's write sequence (one per commit), from the watermark file
/// the sled store keeps in `<data_dir>/store`.
pub fn write_seq(data_dir: &Path) -> u64 {
    let bytes = std::fs::read(data_dir.join("store/tessera.watermark")).unwrap();
    u64::from_be_bytes(bytes[8..16].try_into().unwrap())
}

/// Stored events of `kind`.
pub async fn events_of_kind(
    admin: &mut AdminClient<Channel>,
    kind: &str,
) -> Vec<tessera_proto::types::Event> {
    let mut stream = admin
        .list_events(tessera_proto::admin::ListEventsRequest {
            kind: kind.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        out.push(e);
    }
    out
}

/// An event's attribute.
pub fn attr<'a>(e: &'a tessera_proto::types::Event, key: &str) -> Option<&'a str> {
    e.attrs.iter().find(|a| a.key == key).map(|a| a.value.as_str())
}
