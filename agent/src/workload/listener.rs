//! The Workload API socket: bound with mode 0777 (attestation decides who
//! gets what), each accepted connection attested once, before its first
//! request is read, and closed from the agent's side once its process is
//! found to run another program.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::event_schema::{self as schema, kind, EventExt};
use crate::event_spool::EventSpool;
use crate::metrics::AgentMetrics;
use crate::workload::attestor::{Attestation, WorkloadAttestor};
use crate::workload::authority::RewriteAuthority;
use crate::workload::h2_frames::goaway_frames;
use crate::workload::limits::{PerUid, UidSlot, WorkloadLimits};
use crate::workload::peer::{AttestError, PeerProcess, Pinned};
use crate::workload::shared::SharedAttestations;
use tessera_proto::types::Workload;

/// How long a connection whose process exec'd stays open after its refusal,
/// so the refusal reaches the client before the close.
pub const CLOSE_AFTER_REFUSAL: Duration = Duration::from_millis(500);

/// Attestations running at once.
pub const MAX_CONCURRENT_ATTESTATIONS: usize = 8;

/// What every request on a connection knows about it: the peer pinned at
/// accept and what its attestation found then.
#[derive(Debug, Clone)]
pub struct WorkloadPeer(pub(crate) Arc<Connection>);

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) process: Arc<PeerProcess>,
    pub(crate) attested: Result<Arc<Attestation>, Refusal>,
    pub(crate) closing: Closing,
}

/// An accepted connection's stream, its pinned peer, and what attestation
/// found.
type Attested = (UnixStream, Arc<PeerProcess>, Result<Arc<Attestation>, Refusal>);

/// Why a connection could not be attested at accept.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// A stable code (`AttestError::code`).
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl From<AttestError> for Refusal {
    fn from(e: AttestError) -> Self {
        Self { code: e.code(), message: e.to_string() }
    }
}

/// Closes a connection from the server side: once set, reads see the end
/// of the stream and the HTTP/2 server lets the connection go.
#[derive(Debug, Default)]
pub(crate) struct Closing {
    scheduled: AtomicBool,
    closed: AtomicBool,
    reader: Mutex<Option<Waker>>,
}

impl Closing {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(waker) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            waker.wake();
        }
    }
}

impl WorkloadPeer {
    /// Closes the connection after [`CLOSE_AFTER_REFUSAL`] (once).
    pub(crate) fn close_soon(&self) {
        if self.0.closing.scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let connection = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_AFTER_REFUSAL).await;
            connection.closing.close();
        });
    }
}

/// An accepted Workload API connection and its attested peer. What the
/// client sends goes through [`RewriteAuthority`], so clients that send the
/// socket path as `:authority` (gRPC C-core) are served.
#[derive(Debug)]
pub struct WorkloadConn {
    stream: RewriteAuthority<UnixStream>,
    peer: WorkloadPeer,
    _slot: UidSlot,
}

impl Connected for WorkloadConn {
    type ConnectInfo = WorkloadPeer;

    fn connect_info(&self) -> WorkloadPeer {
        self.peer.clone()
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let closing = &this.peer.0.closing;
        if closing.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(())); // the end of the stream
        }
        // The task reading is woken by `Closing::close` as well as by the socket.
        {
            let mut reader = closing.reader.lock().unwrap_or_else(|e| e.into_inner());
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
        }
        if closing.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Attestation work shared by the accept path and the requests: the
/// attestor, a bound on how many attestations (each reads `/proc` on a
/// blocking thread) run at once, so a burst of callers queues instead of
/// spawning hundreds of threads, and the attestations a process's next
/// connection may take instead ([`SharedAttestations`]). Executable hashing
/// happens outside the bound, on the attestor's own bounded pool.
#[derive(Debug, Clone)]
pub struct Attesting {
    attestor: Arc<dyn WorkloadAttestor>,
    permits: Arc<tokio::sync::Semaphore>,
    shared: Arc<SharedAttestations>,
    metrics: AgentMetrics,
}

impl Attesting {
    /// Attestation with `attestor`, [`MAX_CONCURRENT_ATTESTATIONS`] at a
    /// time, counted in `metrics`.
    pub fn new(attestor: Arc<dyn WorkloadAttestor>, metrics: AgentMetrics) -> Self {
        Self {
            attestor,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_ATTESTATIONS)),
            shared: Arc::default(),
            metrics,
        }
    }

    /// Whether the connection's process still runs what it was attested
    /// as: [`WorkloadAttestor::verify`], here on the caller's thread (it
    /// does no I/O that can wait), with no permit and no thread hop.
    pub(crate) fn verify(&self, connection: &Connection) -> Result<(), Refusal> {
        match &connection.attested {
            Ok(attestation) => {
                self.attestor.verify(&connection.process, attestation).map_err(Refusal::from)
            }
            Err(_) => Ok(()),
        }
    }

    /// The peer of `stream` and its attestation: that of an open
    /// connection of the same process attested in full, when the kernel
    /// pins the peer and the attestor finds that attestation still
    /// describes it (on this thread: two socket options, a `readlink` and
    /// a `statx` of `/proc/<pid>/exe`, no `/proc` file read); else its own,
    /// on a blocking thread under a permit, then offered to the process's
    /// next connections. `Err` when the peer could not be pinned.
    async fn attest(&self, stream: UnixStream) -> Result<Attested, Refusal> {
        let pinned = match PeerProcess::pinned_by_kernel(&stream)? {
            Pinned::ByKernel(peer) => match self.shared.for_peer(self.attestor.as_ref(), &peer) {
                Some(attestation) => {
                    self.metrics.attestation("shared");
                    return Ok((stream, Arc::new(peer), Ok(attestation)));
                }
                None => Pinned::ByKernel(peer),
            },
            by_pid => by_pid, // pinned (and checked) below
        };
        let (stream, process, attested) = self
            .run(move |attestor| {
                let process = pinned.pin()?;
                let attested = attestor.attest(&process).map(Arc::new).map_err(Refusal::from);
                Ok((stream, Arc::new(process), attested))
            })
            .await?;
        if let Ok(attestation) = &attested {
            self.metrics.attestation("full");
            self.shared.remember(&process, attestation);
        }
        Ok((stream, process, attested))
    }

    /// Runs `work` on a blocking thread, under a permit.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn WorkloadAttestor) -> Result<T, AttestError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let unavailable = |message: String| Refusal { code: "agent_unavailable", message };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unavailable("agent is shutting down".into()))?;
        let attestor = self.attestor.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(attestor.as_ref())
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(Refusal::from)
    }
}

/// Accepts connections, closes those past their uid's connection limit at
/// once (before reading anything from them), and attests each of the others
/// (pinning its process, recording its executable) before its first request
/// is read. Attestation runs in a task per connection, so one slow peer
/// does not hold up the accept loop.
pub fn incoming(
    listener: UnixListener,
    limits: WorkloadLimits,
    attesting: Attesting,
    events: Arc<EventSpool>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<WorkloadConn>> {
    let connections = PerUid::default();
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "Workload API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let cred = match stream.peer_cred() {
                Ok(cred) => cred,
                Err(e) => {
                    warn!(error = %e, "cannot read Workload API peer credentials; closing");
                    continue;
                }
            };
            let Some(slot) = connections.try_take(cred.uid(), limits.connections_per_uid) else {
                let why = format!(
                    "too many Workload API connections for uid {} (limit {}); close some and retry",
                    cred.uid(),
                    limits.connections_per_uid
                );
                let _ = stream.try_write(&goaway_frames(&why));
                drop(stream);
                let caller = Workload {
                    pid: cred.pid().unwrap_or(0),
                    uid: cred.uid(),
                    gid: cred.gid(),
                    ..Default::default()
                };
                events.emit(
                    schema::denied(kind::WORKLOAD_REFUSED, why)
                        .code("connection_limit")
                        .workload(caller)
                        .attr("refusal", "connection_limit")
                        .attr("limit", limits.connections_per_uid),
                );
                continue;
            };
            let attesting = attesting.clone();
            let tx = tx.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let (stream, process, attested) = match attesting.attest(stream).await {
                    Ok(attested) => attested,
                    Err(refusal) => {
                        // Not pinned (it exited already, or, without
                        // SO_PEERPIDFD, its PID now names another process):
                        // nothing to answer; closed.
                        debug!(code = refusal.code, error = %refusal.message, "Workload API peer could not be pinned; closing");
                        let caller = Workload {
                            pid: cred.pid().unwrap_or(0),
                            uid: cred.uid(),
                            gid: cred.gid(),
                            ..Default::default()
                        };
                        events.emit(
                            schema::denied(
                                kind::WORKLOAD_REFUSED,
                                format!("caller could not be pinned: {}", refusal.message),
                            )
                            .code(refusal.code)
                            .workload(caller)
                            .attr("refusal", refusal.code),
                        );
                        return;
                    }
                };
                let peer = WorkloadPeer(Arc::new(Connection {
                    process,
                    attested,
                    closing: Closing::default(),
                }));
                let _ = tx
                    .send(Ok(WorkloadConn {
                        stream: RewriteAuthority::new(stream),
                        peer,
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds the Workload API socket with mode 0777 (anyone may ask;
/// attestation decides). Directories missing on the way are created with
/// mode 0755 so every local uid can reach the socket; a directory that
/// already exists keeps its mode (the agent never changes what it did not
/// create), but one that another non-root user owns is refused, since its
/// owner could replace the socket. A stale socket file is replaced; a
/// socket another agent serves, or a file that is not a socket, is not.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        let mut missing = Vec::new();
        let mut existing = dir;
        while !existing.as_os_str().is_empty() && !existing.exists() {
            missing.push(existing);
            existing = existing.parent().unwrap_or(Path::new(""));
        }
        for created in missing.into_iter().rev() {
            match std::fs::DirBuilder::new().mode(0o755).create(created) {
                Ok(()) => {
                    // The umask may have narrowed the mode given to mkdir.
                    std::fs::set_permissions(created, std::fs::Permissions::from_mode(0o755))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {} // created meanwhile
                Err(e) => return Err(e),
            }
        }
        // Checked after creating: a directory someone else made first counts.
        if let Ok(meta) = std::fs::metadata(dir) {
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me && meta.uid() != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "socket directory {} is owned by uid {}, not by the agent (uid {me}) or root; \
                         its owner could replace the socket",
                        dir.display(),
                        meta.uid()
                    ),
                ));
            }
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another agent is serving this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}
