//! Which executable a process runs, and its SHA-256: the identity of the
//! file (device, inode, size, mtime, ctime) and its hash, computed once per
//! version on a bounded pool of blocking threads, off the attestation path.
//! Depends on nothing in the crate.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OnceCell, Semaphore};
use tracing::{info, warn};

/// The identity of an executable file a process runs: device, inode, size,
/// mtime and ctime (nanoseconds). Another file, or the same file rewritten
/// (content changes move mtime and ctime; resetting mtime still moves
/// ctime), has another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Executable(pub(crate) ExeVersion);

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
pub(crate) struct ExeVersion {
    /// Its size, bytes.
    pub(crate) size: u64,
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExeVersion {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
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
pub(crate) struct ExeHashes {
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

impl ExeHashes {
    /// No hash known yet; hashing within `limits`.
    pub(crate) fn new(limits: HashLimits) -> Self {
        Self {
            known: Mutex::new(HashMap::new()),
            too_large: Mutex::new(HashSet::new()),
            pool: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            limits,
            computed: AtomicU64::new(0),
        }
    }

    /// How many hashes have been computed.
    pub(crate) fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// The executable's hash if known, else what computing it needs; `None`
    /// (no sha256 selector) when it is too big to hash.
    pub(crate) fn lookup(
        self: &Arc<Self>,
        pid: i32,
        file: std::fs::File,
        version: ExeVersion,
    ) -> Result<String, Option<PendingHash>> {
        if version.size > self.limits.max_bytes {
            let mut too_large = self.too_large.lock().unwrap_or_else(|e| e.into_inner());
            if too_large.len() >= MAX_KNOWN_VERSIONS {
                too_large.clear();
            }
            if too_large.insert(version) {
                info!(
                    pid,
                    size = version.size,
                    limit = self.limits.max_bytes,
                    "executable larger than the hashing limit: its callers get no sha256 selector"
                );
            }
            return Err(None);
        }
        let cell = {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= MAX_KNOWN_VERSIONS && !known.contains_key(&version) {
                known.retain(|_, cell| !cell.initialized());
            }
            known.entry(version).or_default().clone()
        };
        if let Some(hash) = cell.get() {
            return Ok(hash.clone());
        }
        Err(Some(PendingHash { file: Arc::new(file), version, cell, hashes: self.clone() }))
    }
}

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

/// Opens the executable a process runs, and takes its identity.
pub(crate) fn open_exe(pid: i32) -> std::io::Result<(std::fs::File, ExeVersion)> {
    let file = std::fs::File::open(format!("/proc/{pid}/exe"))?;
    let version = ExeVersion::of(&file.metadata()?);
    Ok((file, version))
}

/// The identity of the executable process `pid` runs now, without opening
/// it: one `statx` of `/proc/<pid>/exe` with `AT_STATX_DONT_SYNC`, so a
/// network filesystem answers from its cached attributes and the call never
/// waits on I/O. Cheap enough for the async workers, before every request.
/// An exec shows as another device or inode, which no attribute cache
/// hides; a running executable cannot be written (`ETXTBSY`), and a
/// `chmod`/`touch` seen late only refuses a request later.
pub(crate) fn running_exe(pid: i32) -> std::io::Result<ExeVersion> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let x =
        statx(CWD, format!("/proc/{pid}/exe"), AtFlags::STATX_DONT_SYNC, StatxFlags::BASIC_STATS)?;
    Ok(ExeVersion {
        dev: rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor),
        ino: x.stx_ino,
        size: x.stx_size,
        mtime: (x.stx_mtime.tv_sec, i64::from(x.stx_mtime.tv_nsec)),
        ctime: (x.stx_ctime.tv_sec, i64::from(x.stx_ctime.tv_nsec)),
    })
}
