//! The Unix workload attestor: who is on the other end of a Workload API
//! connection, decided once, when the connection is accepted.
//!
//! # What is pinned, and when
//!
//! At accept the agent takes, from the socket itself, the peer's uid/gid/pid
//! (`SO_PEERCRED`) and a pidfd of the peer process (`SO_PEERPIDFD`): both are
//! recorded by the kernel at `connect()`, so no PID lookup can be answered by
//! another process. Where the kernel lacks `SO_PEERPIDFD` (before Linux
//! 6.5), the process is pinned with `pidfd_open(pid)` and `/proc/<pid>/status`
//! must show the uid and gid `SO_PEERCRED` reported. Then `/proc/<pid>` is
//! read (supplementary groups, the executable's path) and the executable is
//! opened and `fstat`ed: its [`Executable`] identity is the device, inode,
//! size, mtime and ctime of the file the process runs. Finally the pidfd must
//! still show a live process: had it exited (and its PID been reused) while
//! `/proc` was read, the reads could describe another process, and the
//! connection is refused.
//!
//! Every request on the connection is served from that attestation: the
//! selectors (path and sha256 included) are derived from what was recorded at
//! accept, never looked up again. Before each request, [`WorkloadAttestor::verify`]
//! checks that the same process (pidfd alive) still runs the same executable
//! (same identity); a process that has exec'd something else since, or exited,
//! gets no answer on that connection. This is what stops the fork-then-exec
//! attack: code that connects, then execs (or has its parent exec) a trusted
//! binary while it keeps the connection, is still the program it was at accept.
//!
//! # What `unix:path` and `unix:sha256` prove, and what they do not
//!
//! They prove that, when the connection was accepted, the connecting process
//! was running the executable file with that path and content, and that it
//! still runs it at each request. They do **not** prove:
//!
//! - that the code making the request is that program's own code: a process
//!   of the same uid that may ptrace the workload (or read its memory through
//!   `/proc/<pid>/mem`, or take its socket with `pidfd_getfd`) can act as it;
//!   so can anyone who starts the trusted binary with their own arguments,
//!   environment, `LD_PRELOAD`, or a debugger. Use a distinct uid (or
//!   `unix:uid` plus a restrictive ptrace scope) for identities that matter;
//! - anything about a script: for an interpreter the path and hash name the
//!   interpreter (`/usr/bin/python3`), not the script it runs;
//! - which program connected, when the connecting process exec'd between its
//!   `connect()` and the agent's accept (microseconds, but a race that the
//!   connecting code controls): the agent records the program it finds at
//!   accept. The process then runs that program, so the requests come from
//!   it or from a process it shares the socket with (a child forked before
//!   the exec) — the reason `unix:path`/`unix:sha256` are selectors for
//!   programs, not a sandbox for the code that started them;
//! - that the file is still there: a running executable that was replaced on
//!   disk keeps the identity of the file it runs (its path then ends in
//!   ` (deleted)`).
//!
//! A change of the running file's metadata (`chmod`, `chown`, `touch`) moves
//! its ctime, so it counts as another executable: the open connections of its
//! processes are refused once and closed, and the clients' new connections
//! are attested (and the file hashed) afresh.
//!
//! `unix:uid`, `unix:gid` come from `SO_PEERCRED` (the credentials at
//! `connect()`); user and group names from `/etc/passwd` and `/etc/group`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use tessera_workload_api::Selector;
use tokio::sync::{OnceCell, Semaphore};
use tracing::{info, warn};

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel did not report the peer's PID.
    #[error("peer PID is unknown")]
    NoPid,
    /// The peer process could not be pinned (it may have exited).
    #[error("cannot pin peer process {pid}: {source}")]
    Pin {
        /// The PID.
        pid: i32,
        /// Why.
        source: std::io::Error,
    },
    /// The process exited (or was replaced) while it was being attested.
    #[error("peer process {0} exited during attestation")]
    Exited(i32),
    /// Reading `/proc` failed.
    #[error("cannot read /proc for process {pid}: {source}")]
    Proc {
        /// The PID.
        pid: i32,
        /// Why.
        source: std::io::Error,
    },
    /// The socket's peer credentials could not be read.
    #[error("cannot read the peer's credentials from the socket: {0}")]
    PeerCredentials(std::io::Error),
    /// Without `SO_PEERPIDFD`, the process pinned by PID does not have the
    /// uid/gid the socket reported: the PID was reused before it was pinned.
    #[error("process {pid} does not have the credentials of the connecting process (PID reused?)")]
    CredentialsMismatch {
        /// The PID.
        pid: i32,
    },
    /// The process that opened the connection runs another executable than
    /// it did when the connection was accepted (it exec'd since).
    #[error(
        "process {pid} runs another executable than when it connected (exec after connect); \
         connect again"
    )]
    ExecutableChanged {
        /// The PID.
        pid: i32,
    },
}

impl AttestError {
    /// A short, stable code for events and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoPid => "no_pid",
            Self::Pin { .. } => "pin_failed",
            Self::Exited(_) => "process_exited",
            Self::Proc { .. } => "proc_unreadable",
            Self::PeerCredentials(_) => "no_peer_credentials",
            Self::CredentialsMismatch { .. } => "credentials_mismatch",
            Self::ExecutableChanged { .. } => "executable_changed",
        }
    }
}

/// What the kernel told us about a connected peer, plus its pidfd.
pub struct PeerProcess {
    /// Process ID at connect time.
    pub pid: Option<i32>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The pinned process.
    pub pidfd: Option<OwnedFd>,
    /// How it was pinned.
    pub pinned_by: PinnedBy,
}

/// How a peer process was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinnedBy {
    /// `SO_PEERPIDFD`: the kernel's own reference to the connecting
    /// process, taken at `connect()`.
    PeerPidfd,
    /// `pidfd_open` of the `SO_PEERCRED` PID, checked against the
    /// credentials in `/proc/<pid>/status` (kernels without `SO_PEERPIDFD`).
    PidfdOpen,
}

impl fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerProcess")
            .field("pid", &self.pid)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("pinned_by", &self.pinned_by)
            .finish()
    }
}

impl PeerProcess {
    /// Pins a process by PID with `pidfd_open` (no credential check: for
    /// callers that know the PID is theirs, like tests).
    pub fn pin(pid: Option<i32>, uid: u32, gid: u32) -> Self {
        let pidfd =
            pid.and_then(Pid::from_raw).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok());
        Self { pid, uid, gid, pidfd, pinned_by: PinnedBy::PidfdOpen }
    }

    /// The peer of an accepted Unix socket: its credentials and a pidfd,
    /// both as the kernel recorded them at `connect()` (`SO_PEERCRED`,
    /// `SO_PEERPIDFD`). On kernels without `SO_PEERPIDFD`, the PID is pinned
    /// with `pidfd_open` and must show the reported uid/gid in `/proc`.
    pub fn of_socket(socket: &impl AsFd) -> Result<Self, AttestError> {
        let cred = rustix::net::sockopt::socket_peercred(socket)
            .map_err(|e| AttestError::PeerCredentials(e.into()))?;
        let (pid, uid, gid) =
            (cred.pid.as_raw_nonzero().get(), cred.uid.as_raw(), cred.gid.as_raw());
        match nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerPidfd) {
            Ok(pidfd) => Ok(Self {
                pid: Some(pid),
                uid,
                gid,
                pidfd: Some(pidfd),
                pinned_by: PinnedBy::PeerPidfd,
            }),
            Err(nix::errno::Errno::ENOPROTOOPT | nix::errno::Errno::EINVAL) => {
                Self::pin_checked(pid, uid, gid)
            }
            Err(e) => Err(AttestError::Pin { pid, source: e.into() }),
        }
    }

    /// Without `SO_PEERPIDFD`: pins `pid` with `pidfd_open`, then requires
    /// `/proc/<pid>/status` (read while pinned, the process still alive
    /// after) to show the effective `uid` and `gid` the socket reported. A
    /// PID reused by a process of another uid between `connect()` and here
    /// is refused; one reused by the same uid and gid is not detected
    /// (which is why `SO_PEERPIDFD` is used where the kernel has it).
    fn pin_checked(pid: i32, uid: u32, gid: u32) -> Result<Self, AttestError> {
        let peer = Self::pin(Some(pid), uid, gid);
        let pidfd = peer.pidfd.as_ref().ok_or_else(|| AttestError::Pin {
            pid,
            source: std::io::Error::other("pidfd_open failed (process gone?)"),
        })?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|source| AttestError::Proc { pid, source })?;
        ensure_alive(pidfd, pid)?;
        if effective_ids(&status) != Some((uid, gid)) {
            return Err(AttestError::CredentialsMismatch { pid });
        }
        Ok(peer)
    }
}

/// The effective uid and gid in a `/proc/<pid>/status`.
fn effective_ids(status: &str) -> Option<(u32, u32)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// What attestation found at accept: the selectors known at once, the
/// executable the process ran, and possibly the executable's SHA-256 still
/// to be computed (off the attestation path, so one caller's big executable
/// delays no one else's attestation).
#[derive(Debug)]
pub struct Attestation {
    /// Selectors derived so far.
    pub selectors: Vec<Selector>,
    /// The executable's hash, when it is not known yet: of the file opened
    /// at accept.
    pub pending_hash: Option<PendingHash>,
    /// The executable the process ran at accept (`None` when the agent could
    /// not open it: then there are no path/sha256 selectors either).
    pub executable: Option<Executable>,
}

/// The identity of an executable file a process runs: device, inode, size,
/// mtime and ctime (nanoseconds). Another file, or the same file rewritten
/// (content changes move mtime and ctime; resetting mtime still moves
/// ctime), has another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Executable(ExeVersion);

/// Derives a caller's selectors, once per connection, and checks before
/// each request that they still describe the caller.
pub trait WorkloadAttestor: Send + Sync + fmt::Debug + 'static {
    /// The selectors of the process behind `peer`, at accept. Runs on a
    /// blocking thread; must not do slow I/O (leave that to [`PendingHash`]).
    fn attest(&self, peer: &PeerProcess) -> Result<Attestation, AttestError>;

    /// Whether the process pinned in `peer` still lives and still runs the
    /// executable `attestation` recorded. Runs on a blocking thread before
    /// every request and stream update.
    fn verify(&self, peer: &PeerProcess, attestation: &Attestation) -> Result<(), AttestError>;
}

/// Limits on executable hashing.
#[derive(Debug, Clone, Copy)]
pub struct HashLimits {
    /// Executables larger than this get no `sha256` selector (logged once
    /// per executable version).
    pub max_bytes: u64,
    /// Hashes computed at once (each on a blocking thread).
    pub concurrency: usize,
}

impl Default for HashLimits {
    fn default() -> Self {
        Self { max_bytes: 256 * 1024 * 1024, concurrency: 2 }
    }
}

/// One version of an executable file: any change of its content changes
/// the inode, the size, or mtime/ctime (kept to the nanosecond; writing the
/// file, or resetting its mtime with `touch -d`, still moves ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ExeVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExeVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Executable hashes by version. Each version is hashed once: concurrent
/// callers of the same version share one computation (single flight).
#[derive(Debug)]
struct ExeHashes {
    known: Mutex<HashMap<ExeVersion, Arc<OnceCell<String>>>>,
    /// Versions too large to hash (remembered to log each one once).
    too_large: Mutex<HashSet<ExeVersion>>,
    pool: Arc<Semaphore>,
    limits: HashLimits,
    /// Hashes computed so far (for tests and benchmarks).
    computed: AtomicU64,
}

/// Versions remembered at most; past it, finished ones are forgotten.
const MAX_KNOWN_VERSIONS: usize = 4096;

/// An executable hash that is not known yet: [`PendingHash::sha256`]
/// computes it (or waits for the caller already computing it).
pub struct PendingHash {
    file: Arc<std::fs::File>,
    version: ExeVersion,
    cell: Arc<OnceCell<String>>,
    hashes: Arc<ExeHashes>,
}

impl fmt::Debug for PendingHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingHash").field("version", &self.version).finish_non_exhaustive()
    }
}

impl PendingHash {
    /// The executable's SHA-256 (hex), computed at most once per version on
    /// the bounded hashing pool; `None` if it could not be read.
    pub async fn sha256(&self) -> Option<String> {
        let Self { file, version, cell, hashes } = self;
        let (file, version) = (file.clone(), *version);
        let result = cell
            .get_or_try_init(|| async {
                let _permit = hashes
                    .pool
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| std::io::Error::other(format!("hashing pool closed: {e}")))?;
                let max = hashes.limits.max_bytes;
                // If every caller waiting for this hash goes away, this
                // future is dropped and the hashing thread stops early.
                let abandoned = AbandonOnDrop(Arc::new(AtomicBool::new(false)));
                let stop = abandoned.0.clone();
                let hash =
                    tokio::task::spawn_blocking(move || hash_file(file, version, max, &stop))
                        .await
                        .map_err(std::io::Error::other)??;
                drop(abandoned); // finished: setting the flag now changes nothing
                hashes.computed.fetch_add(1, Ordering::Relaxed);
                Ok::<_, std::io::Error>(hash)
            })
            .await;
        match result {
            Ok(hash) => Some(hash.clone()),
            Err(e) => {
                warn!(error = %e, "cannot hash the caller's executable; no sha256 selector");
                None
            }
        }
    }
}

/// Sets its flag when dropped.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Hashes an opened executable (positional reads: the file is shared),
/// reading at most `max` bytes, and checks it is still the version it was
/// when opened. Stops when `abandoned` is set.
fn hash_file(
    file: Arc<std::fs::File>,
    version: ExeVersion,
    max: u64,
    abandoned: &AtomicBool,
) -> std::io::Result<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read_at(&mut buf, total)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if abandoned.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("no caller waits for this hash any more"));
        }
        if total > max {
            return Err(std::io::Error::other("executable grew past the hashing limit"));
        }
        context.update(&buf[..n]);
    }
    if ExeVersion::of(&file.metadata()?) != version {
        return Err(std::io::Error::other("executable changed while it was hashed"));
    }
    Ok(hex::encode(context.finish()))
}

/// Attests local processes by uid, gid, user and group names, supplementary
/// groups, executable path and the executable's SHA-256.
#[derive(Debug)]
pub struct UnixAttestor {
    hashes: Arc<ExeHashes>,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl UnixAttestor {
    /// A new attestor with an empty hash cache and default limits.
    pub fn new() -> Self {
        Self::with_limits(HashLimits::default())
    }

    /// A new attestor with an empty hash cache.
    pub fn with_limits(limits: HashLimits) -> Self {
        Self {
            hashes: Arc::new(ExeHashes {
                known: Mutex::new(HashMap::new()),
                too_large: Mutex::new(HashSet::new()),
                pool: Arc::new(Semaphore::new(limits.concurrency.max(1))),
                limits,
                computed: AtomicU64::new(0),
            }),
        }
    }

    /// How many executable hashes this attestor has computed.
    pub fn hashes_computed(&self) -> u64 {
        self.hashes.computed.load(Ordering::Relaxed)
    }

    /// The executable's hash if known, else what computing it needs; `None`
    /// (no sha256 selector) when it is too big to hash.
    fn exe_hash(
        &self,
        pid: i32,
        file: std::fs::File,
        version: ExeVersion,
    ) -> Result<String, Option<PendingHash>> {
        if version.size > self.hashes.limits.max_bytes {
            let mut too_large = self.hashes.too_large.lock().unwrap_or_else(|e| e.into_inner());
            if too_large.len() >= MAX_KNOWN_VERSIONS {
                too_large.clear();
            }
            if too_large.insert(version) {
                info!(
                    pid,
                    size = version.size,
                    limit = self.hashes.limits.max_bytes,
                    "executable larger than the hashing limit: its callers get no sha256 selector"
                );
            }
            return Err(None);
        }
        let cell = {
            let mut known = self.hashes.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= MAX_KNOWN_VERSIONS && !known.contains_key(&version) {
                known.retain(|_, cell| !cell.initialized());
            }
            known.entry(version).or_default().clone()
        };
        if let Some(hash) = cell.get() {
            return Ok(hash.clone());
        }
        Err(Some(PendingHash { file: Arc::new(file), version, cell, hashes: self.hashes.clone() }))
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn attest(&self, peer: &PeerProcess) -> Result<Attestation, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let pidfd = peer.pidfd.as_ref().ok_or_else(|| AttestError::Pin {
            pid,
            source: std::io::Error::other("pidfd_open failed (process gone?)"),
        })?;
        ensure_alive(pidfd, pid)?;
        let proc_err = |source| AttestError::Proc { pid, source };
        let mut selectors = Vec::new();
        let mut push = |key: &str, value: String| {
            if let Ok(s) = Selector::new("unix", format!("{key}:{value}")) {
                selectors.push(s);
            }
        };
        push("uid", peer.uid.to_string());
        push("gid", peer.gid.to_string());
        if let Some(user) = name_of("/etc/passwd", peer.uid) {
            push("user", user);
        }
        if let Some(group) = name_of("/etc/group", peer.gid) {
            push("group", group);
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(proc_err)?;
        for gid in supplementary_gids(&status) {
            push("supplementary_gid", gid.to_string());
        }
        // Path and hash need access to the executable; when the agent may
        // not read it, those selectors are simply absent. The executable is
        // opened (and its identity taken) before its path is read, both while
        // the process is pinned: a hash computed later is of this file, and
        // a path read after an exec is caught by `verify` on every request.
        let mut pending_hash = None;
        let mut executable = None;
        if let Ok((file, version)) = open_exe(pid) {
            executable = Some(Executable(version));
            if let Ok(path) = std::fs::read_link(format!("/proc/{pid}/exe")) {
                if let Some(path) = path.to_str() {
                    push("path", path.to_string());
                }
            }
            match self.exe_hash(pid, file, version) {
                Ok(hash) => push("sha256", hash),
                Err(pending) => pending_hash = pending,
            }
        }
        // The process must still be the one pinned at accept: had it exited
        // (and its PID been reused), /proc would describe another process.
        ensure_alive(pidfd, pid)?;
        // And it must still run what was opened: an exec while the path was
        // read would pair this file with another's path.
        let attestation = Attestation { selectors, pending_hash, executable };
        self.verify(peer, &attestation)?;
        Ok(attestation)
    }

    fn verify(&self, peer: &PeerProcess, attestation: &Attestation) -> Result<(), AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let pidfd = peer.pidfd.as_ref().ok_or_else(|| AttestError::Pin {
            pid,
            source: std::io::Error::other("pidfd_open failed (process gone?)"),
        })?;
        let now = match open_exe(pid) {
            Ok((_, version)) => Some(Executable(version)),
            // The executable may be unreadable to the agent (then it was at
            // accept too), or the process gone (caught below).
            Err(_) => None,
        };
        ensure_alive(pidfd, pid)?;
        if let Some(then) = attestation.executable {
            if now != Some(then) {
                return Err(AttestError::ExecutableChanged { pid });
            }
        }
        Ok(())
    }
}

/// Opens the executable a process runs, and takes its identity.
fn open_exe(pid: i32) -> std::io::Result<(std::fs::File, ExeVersion)> {
    let file = std::fs::File::open(format!("/proc/{pid}/exe"))?;
    let version = ExeVersion::of(&file.metadata()?);
    Ok((file, version))
}

/// A pidfd becomes readable when its process exits.
fn ensure_alive(pidfd: &OwnedFd, pid: i32) -> Result<(), AttestError> {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&zero)) {
        Ok(0) => Ok(()),
        Ok(_) => Err(AttestError::Exited(pid)),
        Err(e) => Err(AttestError::Pin { pid, source: e.into() }),
    }
}

fn supplementary_gids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// Looks up the name for an id in an /etc/passwd-style file.
fn name_of(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let value: u32 = fields.next()?.parse().ok()?;
        (value == id && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> PeerProcess {
        let meta = std::fs::metadata("/proc/self").unwrap();
        PeerProcess::pin(Some(std::process::id() as i32), meta.uid(), meta.gid())
    }

    /// Selectors, with the pending hash (if any) resolved.
    async fn attest_fully(attestor: &UnixAttestor, peer: &PeerProcess) -> Vec<String> {
        let attestation = attestor.attest(peer).unwrap();
        let mut text: Vec<String> = attestation.selectors.iter().map(|s| s.to_string()).collect();
        if let Some(pending) = attestation.pending_hash {
            if let Some(hash) = pending.sha256().await {
                text.push(format!("unix:sha256:{hash}"));
            }
        }
        text
    }

    #[tokio::test]
    async fn attests_own_process_with_path_and_hash() {
        let attestor = UnixAttestor::new();
        let text = attest_fully(&attestor, &me()).await;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        assert!(text.contains(&format!("unix:uid:{uid}")), "{text:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(text.contains(&format!("unix:path:{}", exe.display())), "{text:?}");
        let hash = text.iter().find(|s| s.starts_with("unix:sha256:")).unwrap();
        assert_eq!(hash.len(), "unix:sha256:".len() + 64);
        // Known now: the next attestation has it at once, without hashing.
        let again = attestor.attest(&me()).unwrap();
        assert!(again.pending_hash.is_none());
        assert!(again.selectors.iter().any(|s| &s.to_string() == hash));
        assert_eq!(attestor.hashes_computed(), 1);
    }

    /// A child process running a copy of `sleep` at `path`.
    fn run_copy_of_sleep(path: &std::path::Path) -> std::process::Child {
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        std::fs::copy(&sleep, path).unwrap();
        spawn_sleep(path)
    }

    /// Runs `path 30`. Another test's fork can briefly hold the write
    /// descriptor of a just-written copy (ETXTBSY until that child execs):
    /// retry, as a shell would.
    fn spawn_sleep(path: &std::path::Path) -> std::process::Child {
        for _ in 0..100 {
            match std::process::Command::new(path).arg("30").spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                spawned => return spawned.unwrap(),
            }
        }
        panic!("{} stayed busy", path.display());
    }

    fn peer_of(child: &std::process::Child) -> PeerProcess {
        PeerProcess::pin(Some(child.id() as i32), 0, 0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_of_one_executable_share_one_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut children = vec![run_copy_of_sleep(&dir.path().join("sleepy"))];
        // Five more processes of the same file (same version).
        for _ in 0..5 {
            children.push(
                std::process::Command::new(dir.path().join("sleepy")).arg("30").spawn().unwrap(),
            );
        }
        let attestor = Arc::new(UnixAttestor::new());
        let pending: Vec<PendingHash> = children
            .iter()
            .map(|c| attestor.attest(&peer_of(c)).unwrap().pending_hash.expect("not known yet"))
            .collect();
        let hashes =
            futures_join_all(pending.into_iter().map(|p| async move { p.sha256().await })).await;
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(hashes.iter().all(|h| h.is_some() && *h == hashes[0]), "{hashes:?}");
        assert_eq!(attestor.hashes_computed(), 1, "one hash for six callers");
    }

    async fn futures_join_all<F: std::future::Future + Send + 'static>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output>
    where
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = futures.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for handle in handles {
            out.push(handle.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn executables_over_the_limit_get_no_hash_and_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge");
        let mut child = {
            let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
            std::fs::copy(&sleep, &path).unwrap();
            // Trailing bytes past the ELF contents: it still runs.
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8 << 30).unwrap();
            spawn_sleep(&path)
        };
        let attestor = UnixAttestor::new();
        let attestation = attestor.attest(&peer_of(&child)).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(attestation.pending_hash.is_none(), "nothing left to hash");
        let text: Vec<String> = attestation.selectors.iter().map(|s| s.to_string()).collect();
        assert!(!text.iter().any(|s| s.starts_with("unix:sha256:")), "{text:?}");
        assert!(text.contains(&format!("unix:path:{}", path.display())), "{text:?}");
        assert_eq!(attestor.hashes_computed(), 0);
    }

    #[tokio::test]
    async fn a_changed_ctime_is_a_new_version() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog");
        let mut first = run_copy_of_sleep(&path);
        let attestor = UnixAttestor::new();
        assert!(!attest_fully(&attestor, &peer_of(&first)).await.is_empty());
        // Only ctime moves (same size, same mtime, same inode).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut second = std::process::Command::new(&path).arg("30").spawn().unwrap();
        let attestation = attestor.attest(&peer_of(&second)).unwrap();
        for child in [&mut first, &mut second] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(attestation.pending_hash.is_some(), "a new ctime is not the cached version");
    }

    #[test]
    fn exited_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let peer = PeerProcess::pin(Some(pid), 0, 0);
        child.wait().unwrap();
        let err = UnixAttestor::new().attest(&peer).map(|_| ()).unwrap_err();
        assert!(matches!(err, AttestError::Exited(p) if p == pid), "{err}");
    }

    /// A process that exec's another program after it was attested is
    /// refused by `verify`; one that still runs its program is not.
    #[test]
    fn an_exec_after_attestation_is_caught_by_verify() {
        use std::io::Write;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read line; exec /bin/sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let peer = PeerProcess::pin(Some(pid), 0, 0);
        let attestor = UnixAttestor::new();
        let attestation = attestor.attest(&peer).unwrap();
        assert!(attestation.executable.is_some());
        attestor.verify(&peer, &attestation).unwrap();
        let shell = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        // Wait (bounded) until the shell has exec'd sleep.
        for _ in 0..3000 {
            if std::fs::read_link(format!("/proc/{pid}/exe")).unwrap() != shell {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let err = attestor.verify(&peer, &attestation).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(err, AttestError::ExecutableChanged { pid: p } if p == pid), "{err}");
        assert_eq!(err.code(), "executable_changed");
        let err = attestor.verify(&peer, &attestation).unwrap_err();
        assert!(matches!(err, AttestError::Exited(_)), "{err}");
    }

    /// The peer of a socket pair is this process, pinned by `SO_PEERPIDFD`.
    #[test]
    fn a_socket_peer_is_pinned_by_its_peer_pidfd() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerProcess::of_socket(&ours).unwrap();
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.pinned_by, PinnedBy::PeerPidfd, "this kernel has SO_PEERPIDFD");
        let attestation = UnixAttestor::new().attest(&peer).unwrap();
        UnixAttestor::new().verify(&peer, &attestation).unwrap();
    }

    /// The fallback pin (kernels without `SO_PEERPIDFD`) accepts a process
    /// with the reported credentials and refuses one without them.
    #[test]
    fn the_fallback_pin_checks_the_reported_credentials() {
        let pid = std::process::id() as i32;
        let meta = std::fs::metadata("/proc/self").unwrap();
        let peer = PeerProcess::pin_checked(pid, meta.uid(), meta.gid()).unwrap();
        assert_eq!(peer.pinned_by, PinnedBy::PidfdOpen);
        let err = PeerProcess::pin_checked(pid, meta.uid() + 1, meta.gid()).unwrap_err();
        assert!(matches!(err, AttestError::CredentialsMismatch { pid: p } if p == pid), "{err}");
        assert_eq!(err.code(), "credentials_mismatch");
    }

    #[test]
    fn effective_ids_are_read_from_status() {
        let status = "Name:\tx\nUid:\t1000\t65534\t65534\t65534\nGid:\t10\t20\t20\t20\n";
        assert_eq!(effective_ids(status), Some((65534, 20)));
        assert_eq!(effective_ids("Name:\tx\n"), None);
    }

    #[test]
    fn unknown_pid_is_refused() {
        assert!(matches!(
            UnixAttestor::new().attest(&PeerProcess::pin(None, 0, 0)),
            Err(AttestError::NoPid)
        ));
    }

    #[test]
    fn parses_groups_and_passwd_lines() {
        assert_eq!(supplementary_gids("Name:\tx\nGroups:\t4 24 27 \n"), [4, 24, 27]);
        assert!(supplementary_gids("Groups:\n").is_empty());
        assert_eq!(name_of("/etc/passwd", 0).as_deref(), Some("root"));
    }
}
