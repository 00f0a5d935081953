//! The Unix workload attestor: who is on the other end of a Workload API
//! connection. The kernel gives pid/uid/gid (SO_PEERCRED); the process is
//! pinned with a pidfd right after accept, `/proc` is read, and the pidfd
//! must still show the same live process afterwards, so a PID reused during
//! attestation is never given another process's identity.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
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
}

/// What the kernel told us about a connected peer, plus its pidfd.
pub struct PeerProcess {
    /// Process ID at connect time.
    pub pid: Option<i32>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The pinned process, opened right after accept.
    pub pidfd: Option<OwnedFd>,
}

impl fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerProcess")
            .field("pid", &self.pid)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

impl PeerProcess {
    /// Pins the peer's process with a pidfd.
    pub fn pin(pid: Option<i32>, uid: u32, gid: u32) -> Self {
        let pidfd =
            pid.and_then(Pid::from_raw).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok());
        Self { pid, uid, gid, pidfd }
    }
}

/// What attestation found: the selectors known at once, and possibly the
/// executable's SHA-256 still to be computed (off the attestation path, so
/// one caller's big executable delays no one else's attestation).
#[derive(Debug)]
pub struct Attestation {
    /// Selectors derived so far.
    pub selectors: Vec<Selector>,
    /// The executable's hash, when it is not known yet.
    pub pending_hash: Option<PendingHash>,
}

/// Derives a caller's selectors.
pub trait WorkloadAttestor: Send + Sync + fmt::Debug + 'static {
    /// The selectors of the process behind `peer`. Runs on a blocking
    /// thread; must not do slow I/O (leave that to [`PendingHash`]).
    fn attest(&self, peer: &PeerProcess) -> Result<Attestation, AttestError>;
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
    file: std::fs::File,
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
    pub async fn sha256(self) -> Option<String> {
        let Self { file, version, cell, hashes } = self;
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

/// Hashes an opened executable, reading at most `max` bytes, and checks it
/// is still the version it was when opened. Stops when `abandoned` is set.
fn hash_file(
    mut file: std::fs::File,
    version: ExeVersion,
    max: u64,
    abandoned: &AtomicBool,
) -> std::io::Result<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
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
    fn exe_hash(&self, pid: i32) -> std::io::Result<Result<String, Option<PendingHash>>> {
        let file = std::fs::File::open(format!("/proc/{pid}/exe"))?;
        let version = ExeVersion::of(&file.metadata()?);
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
            return Ok(Err(None));
        }
        let cell = {
            let mut known = self.hashes.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= MAX_KNOWN_VERSIONS && !known.contains_key(&version) {
                known.retain(|_, cell| !cell.initialized());
            }
            known.entry(version).or_default().clone()
        };
        if let Some(hash) = cell.get() {
            return Ok(Ok(hash.clone()));
        }
        Ok(Err(Some(PendingHash { file, version, cell, hashes: self.hashes.clone() })))
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
        // opened here, while the process is pinned: a hash computed later is
        // still of this process's executable.
        let mut pending_hash = None;
        if let Ok(path) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            if let Some(path) = path.to_str() {
                push("path", path.to_string());
            }
            match self.exe_hash(pid) {
                Ok(Ok(hash)) => push("sha256", hash),
                Ok(Err(pending)) => pending_hash = pending,
                Err(_) => {}
            }
        }
        // The process must still be the one pinned at accept: had it exited
        // (and its PID been reused), /proc would describe another process.
        ensure_alive(pidfd, pid)?;
        Ok(Attestation { selectors, pending_hash })
    }
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
        std::process::Command::new(path).arg("30").spawn().unwrap()
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
        let hashes = futures_join_all(pending.into_iter().map(PendingHash::sha256)).await;
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
            std::process::Command::new(&path).arg("30").spawn().unwrap()
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
