//! The process on the other end of a Workload API connection, pinned as
//! the kernel recorded it at `connect()` (`SO_PEERCRED`, `SO_PEERPIDFD`; a
//! checked `pidfd_open` on older kernels), and why a caller could not be
//! attested. Depends on nothing in the crate.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};

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

/// What [`PeerProcess::pinned_by_kernel`] found.
#[derive(Debug)]
pub enum Pinned {
    /// The kernel pinned the peer (`SO_PEERPIDFD`).
    ByKernel(PeerProcess),
    /// This kernel has no `SO_PEERPIDFD`: the peer's credentials as
    /// `SO_PEERCRED` reported them, to be pinned by PID and checked.
    NotByThisKernel {
        /// The PID.
        pid: i32,
        /// The effective uid.
        uid: u32,
        /// The effective gid.
        gid: u32,
    },
}

impl Pinned {
    /// The peer, pinned: as the kernel pinned it, or (without
    /// `SO_PEERPIDFD`) by its PID, checked against the reported
    /// credentials. The latter reads `/proc`: on a blocking thread.
    pub fn pin(self) -> Result<PeerProcess, AttestError> {
        match self {
            Self::ByKernel(peer) => Ok(peer),
            Self::NotByThisKernel { pid, uid, gid } => PeerProcess::pin_checked(pid, uid, gid),
        }
    }
}

/// Whether this kernel has `SO_PEERPIDFD` (Linux 6.5 and later): asked
/// once, of a socket pair whose peer is this process, alive.
fn kernel_has_peer_pidfd() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::os::unix::net::UnixStream::pair().is_ok_and(|(ours, _theirs)| {
            nix::sys::socket::getsockopt(&ours, nix::sys::socket::sockopt::PeerPidfd).is_ok()
        })
    })
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
        Self::pinned_by_kernel(socket)?.pin()
    }

    /// [`Self::of_socket`] where the kernel pins the peer itself
    /// (`SO_PEERPIDFD`): two socket options, nothing read from `/proc`, so
    /// it may run on an async thread. A PID the agent cannot see (0: the
    /// peer's PID namespace is not the agent's, nor below it) is refused.
    /// Where the kernel has `SO_PEERPIDFD` (asked once, of a socket pair of
    /// the agent's own), a peer it cannot pin has exited (Linux 6.5–6.8 say
    /// `EINVAL` for that), and is refused: never pinned again by a PID
    /// that may have been reused.
    pub fn pinned_by_kernel(socket: &impl AsFd) -> Result<Pinned, AttestError> {
        use nix::sys::socket::{getsockopt, sockopt};
        let cred = getsockopt(socket, sockopt::PeerCredentials)
            .map_err(|e| AttestError::PeerCredentials(e.into()))?;
        let (pid, uid, gid) = (cred.pid(), cred.uid(), cred.gid());
        if pid <= 0 {
            return Err(AttestError::NoPid);
        }
        match getsockopt(socket, sockopt::PeerPidfd) {
            Ok(pidfd) => Ok(Pinned::ByKernel(Self {
                pid: Some(pid),
                uid,
                gid,
                pidfd: Some(pidfd),
                pinned_by: PinnedBy::PeerPidfd,
            })),
            Err(_) if !kernel_has_peer_pidfd() => Ok(Pinned::NotByThisKernel { pid, uid, gid }),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ESRCH) => {
                Err(AttestError::Exited(pid))
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

/// A pidfd becomes readable when its process exits.
pub(crate) fn ensure_alive(pidfd: &OwnedFd, pid: i32) -> Result<(), AttestError> {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&zero)) {
        Ok(0) => Ok(()),
        Ok(_) => Err(AttestError::Exited(pid)),
        Err(e) => Err(AttestError::Pin { pid, source: e.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback pin (kernels without `SO_PEERPIDFD`) accepts a process
    /// with the reported credentials and refuses one without them.
    #[test]
    fn the_fallback_pin_checks_the_reported_credentials() {
        let pid = std::process::id() as i32;
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata("/proc/self").unwrap();
        let peer = PeerProcess::pin_checked(pid, meta.uid(), meta.gid()).unwrap();
        assert_eq!(peer.pinned_by, PinnedBy::PidfdOpen);
        let err = PeerProcess::pin_checked(pid, meta.uid() + 1, meta.gid()).unwrap_err();
        assert!(matches!(err, AttestError::CredentialsMismatch { pid: p } if p == pid), "{err}");
        assert_eq!(err.code(), "credentials_mismatch");
    }

    /// A peer that connected and has exited (and been reaped) since: on a
    /// kernel with `SO_PEERPIDFD` it is refused as exited, never pinned by
    /// its PID (which another process may hold by now).
    #[test]
    fn a_peer_gone_before_accept_is_refused_not_pinned_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let connect = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])";
        let status =
            match std::process::Command::new("python3").args(["-c", connect]).arg(&path).status() {
                Ok(status) => status,
                Err(e) => {
                    eprintln!("SKIPPED: no python3 to connect and exit ({e})");
                    return;
                }
            };
        assert!(status.success());
        let (accepted, _) = listener.accept().unwrap();
        assert!(kernel_has_peer_pidfd(), "this kernel has SO_PEERPIDFD");
        match PeerProcess::pinned_by_kernel(&accepted) {
            // Linux 6.5 to 6.x: no pidfd for a reaped peer.
            Err(AttestError::Exited(_)) => {}
            // Later kernels pin exited processes too; the pidfd says so.
            Ok(Pinned::ByKernel(peer)) => {
                let (pidfd, pid) = (peer.pidfd.as_ref().unwrap(), peer.pid.unwrap());
                assert!(matches!(ensure_alive(pidfd, pid), Err(AttestError::Exited(_))));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn effective_ids_are_read_from_status() {
        let status = "Name:\tx\nUid:\t1000\t65534\t65534\t65534\nGid:\t10\t20\t20\t20\n";
        assert_eq!(effective_ids(status), Some((65534, 20)));
        assert_eq!(effective_ids("Name:\tx\n"), None);
    }
}
