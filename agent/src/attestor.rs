//! The Unix workload attestor: who is on the other end of a Workload API
//! connection. The kernel gives pid/uid/gid (SO_PEERCRED); the process is
//! pinned with a pidfd right after accept, `/proc` is read, and the pidfd
//! must still show the same live process afterwards, so a PID reused during
//! attestation is never given another process's identity.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use tessera_workload_api::Selector;

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

/// Derives a caller's selectors.
pub trait WorkloadAttestor: Send + Sync + fmt::Debug + 'static {
    /// The selectors of the process behind `peer`.
    fn attest(&self, peer: &PeerProcess) -> Result<Vec<Selector>, AttestError>;
}

/// Attests local processes by uid, gid, user and group names, supplementary
/// groups, executable path and the executable's SHA-256.
#[derive(Debug, Default)]
pub struct UnixAttestor {
    /// Executable hashes by (device, inode, mtime, size).
    hashes: Mutex<HashMap<(u64, u64, i64, u64), String>>,
}

impl UnixAttestor {
    /// A new attestor with an empty hash cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn exe_hash(&self, pid: i32) -> std::io::Result<String> {
        let mut file = std::fs::File::open(format!("/proc/{pid}/exe"))?;
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino(), meta.mtime(), meta.size());
        if let Some(hash) = self.hashes.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(hash.clone());
        }
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            context.update(&buf[..n]);
        }
        let hash = hex::encode(context.finish());
        let mut cache = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, hash.clone());
        Ok(hash)
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn attest(&self, peer: &PeerProcess) -> Result<Vec<Selector>, AttestError> {
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
        // not read it, those selectors are simply absent.
        if let Ok(path) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            if let Some(path) = path.to_str() {
                push("path", path.to_string());
            }
            if let Ok(hash) = self.exe_hash(pid) {
                push("sha256", hash);
            }
        }
        // The process must still be the one pinned at accept: had it exited
        // (and its PID been reused), /proc would describe another process.
        ensure_alive(pidfd, pid)?;
        Ok(selectors)
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

    #[test]
    fn attests_own_process_with_path_and_hash() {
        let selectors = UnixAttestor::new().attest(&me()).unwrap();
        let text: Vec<String> = selectors.iter().map(|s| s.to_string()).collect();
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        assert!(text.contains(&format!("unix:uid:{uid}")), "{text:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(text.contains(&format!("unix:path:{}", exe.display())), "{text:?}");
        let hash = text.iter().find(|s| s.starts_with("unix:sha256:")).unwrap();
        assert_eq!(hash.len(), "unix:sha256:".len() + 64);
    }

    #[test]
    fn exited_process_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let peer = PeerProcess::pin(Some(pid), 0, 0);
        child.wait().unwrap();
        let err = UnixAttestor::new().attest(&peer).unwrap_err();
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
