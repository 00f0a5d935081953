//! Attestations shared by the connections of one process: for each PID,
//! the newest attestation made in full (read from `/proc`) whose process
//! and connection are still there, so that the process's next connections
//! can take it (when the attestor finds it still describes the new peer:
//! [`WorkloadAttestor::shares`]) instead of reading `/proc` on a blocking
//! thread again. A shared attestation is never offered on: once the
//! connection attested in full closes, the process's next connection is
//! attested in full. Holds nothing alive (no pidfd, no open executable):
//! entries whose connection closed are swept as new ones come. Depends on
//! `attestor` and `peer`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::workload::attestor::{Attestation, WorkloadAttestor};
use crate::workload::peer::PeerProcess;

/// Entries kept before dead ones are swept (then twice what is left).
const FIRST_SWEEP_AT: usize = 64;

/// The newest attestation of each PID, while a connection holds it.
#[derive(Debug, Default)]
pub(crate) struct SharedAttestations {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_pid: HashMap<i32, (Weak<PeerProcess>, Weak<Attestation>)>,
    sweep_at: usize,
}

impl SharedAttestations {
    /// Records `attestation`, made in full for `process`, as its PID's
    /// newest.
    pub(crate) fn remember(&self, process: &Arc<PeerProcess>, attestation: &Arc<Attestation>) {
        let Some(pid) = process.pid else { return };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let threshold = inner.sweep_at.max(FIRST_SWEEP_AT);
        if inner.by_pid.len() >= threshold {
            inner.by_pid.retain(|_, (p, a)| p.strong_count() > 0 && a.strong_count() > 0);
            inner.sweep_at = 2 * inner.by_pid.len();
        }
        inner.by_pid.insert(pid, (Arc::downgrade(process), Arc::downgrade(attestation)));
    }

    /// The attestation of another connection of `peer`'s process, if the
    /// attestor finds that it describes `peer` as well.
    pub(crate) fn for_peer(
        &self,
        attestor: &dyn WorkloadAttestor,
        peer: &PeerProcess,
    ) -> Option<Arc<Attestation>> {
        let (first, attestation) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (first, attestation) = inner.by_pid.get(&peer.pid?)?;
            (first.upgrade()?, attestation.upgrade()?)
        };
        attestor.shares(&first, &attestation, peer).then_some(attestation)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().by_pid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::attestor::UnixAttestor;
    use crate::workload::exec_on_cue::{cue_and_wait, shell_then};
    use crate::workload::peer::PinnedBy;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// `child` as `SO_PEERPIDFD` would give it (the kernel's pin), with
    /// `pid` as the PID the socket reported.
    fn kernel_pinned(pid: u32, pidfd_of: &std::process::Child) -> PeerProcess {
        let meta = std::fs::metadata(format!("/proc/{}", pidfd_of.id())).unwrap();
        let pinned = rustix::process::Pid::from_raw(pidfd_of.id() as i32).unwrap();
        let pidfd: OwnedFd =
            rustix::process::pidfd_open(pinned, rustix::process::PidfdFlags::empty()).unwrap();
        PeerProcess {
            pid: Some(pid as i32),
            uid: meta.uid(),
            gid: meta.gid(),
            pidfd: Some(pidfd),
            pinned_by: PinnedBy::PeerPidfd,
        }
    }

    /// `child`'s first connection: attested in full and remembered (the
    /// peer returned, so that the registry's weak reference holds).
    fn first_connection(
        attestor: &UnixAttestor,
        shared: &SharedAttestations,
        child: &std::process::Child,
    ) -> (Arc<PeerProcess>, Arc<Attestation>) {
        let first = Arc::new(kernel_pinned(child.id(), child));
        let attestation = Arc::new(attestor.attest(&first).unwrap());
        shared.remember(&first, &attestation);
        (first, attestation)
    }

    struct Killed(Vec<std::process::Child>);
    impl Drop for Killed {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// A second connection of the same process takes the first one's
    /// attestation; one whose uid differs, or that was not pinned by the
    /// kernel, does not.
    #[test]
    fn only_the_same_process_with_the_same_credentials_shares() {
        let attestor = UnixAttestor::new();
        let shared = SharedAttestations::default();
        let children = Killed(vec![sleeper()]);
        let pid = children.0[0].id();
        let (_first, attestation) = first_connection(&attestor, &shared, &children.0[0]);
        let again = kernel_pinned(pid, &children.0[0]);
        let got = shared.for_peer(&attestor, &again).expect("the same process shares");
        assert!(Arc::ptr_eq(&got, &attestation));

        // Another uid or gid at connect (a setuid or setgid between the two
        // connections).
        let mut other_uid = kernel_pinned(pid, &children.0[0]);
        other_uid.uid += 1;
        assert!(shared.for_peer(&attestor, &other_uid).is_none());
        let mut other_gid = kernel_pinned(pid, &children.0[0]);
        other_gid.gid += 1;
        assert!(shared.for_peer(&attestor, &other_gid).is_none());
        // Pinned from the PID (older kernels): never shared.
        let mut by_pid = kernel_pinned(pid, &children.0[0]);
        by_pid.pinned_by = PinnedBy::PidfdOpen;
        assert!(shared.for_peer(&attestor, &by_pid).is_none());
    }

    /// PID reuse: the first connection's process had PID `b` and exited;
    /// process B, now `b`, connects (same executable, same uid). B does not
    /// get the first process's attestation, though everything but the
    /// first process's pidfd matches (the control shares while it lives).
    #[test]
    fn a_pid_reused_after_the_first_process_exited_shares_nothing() {
        let attestor = UnixAttestor::new();
        let shared = SharedAttestations::default();
        let mut children = Killed(vec![sleeper(), sleeper()]);
        let b = children.0[1].id();
        let attestation = Arc::new(attestor.attest(&kernel_pinned(b, &children.0[1])).unwrap());
        // The first process: the socket said PID `b`; its pidfd is A's.
        let first = Arc::new(kernel_pinned(b, &children.0[0]));
        shared.remember(&first, &attestation);
        assert!(shared.for_peer(&attestor, &kernel_pinned(b, &children.0[1])).is_some());
        let _ = children.0[0].kill();
        let _ = children.0[0].wait();
        let reused = kernel_pinned(b, &children.0[1]);
        assert!(shared.for_peer(&attestor, &reused).is_none(), "shared from an exited process");
    }

    /// A process that exec'd another program since its first connection
    /// does not get that connection's attestation.
    #[test]
    fn a_process_that_execd_since_does_not_share() {
        let mut child = shell_then(Path::new("/bin/sh"), "/bin/sleep 30");
        let pid = child.id();
        let (attestor, shared) = (UnixAttestor::new(), SharedAttestations::default());
        let _first = first_connection(&attestor, &shared, &child);
        assert!(shared.for_peer(&attestor, &kernel_pinned(pid, &child)).is_some());
        let shell = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        cue_and_wait(&mut child, |now| now != shell);
        let after = shared.for_peer(&attestor, &kernel_pinned(pid, &child));
        let _ = child.kill();
        let _ = child.wait();
        assert!(after.is_none(), "shared across an exec");
    }

    /// The same path, another file: the process execs its own path again
    /// after another file was renamed over it. Only the executable's
    /// identity (`statx`) tells them apart, and nothing is shared.
    #[test]
    fn another_file_at_the_same_path_does_not_share() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        std::fs::copy(std::fs::canonicalize("/bin/sh").unwrap(), &prog).unwrap();
        let mut child = shell_then(&prog, &format!("{} -c 'read line; sleep 30'", prog.display()));
        let pid = child.id();
        let (attestor, shared) = (UnixAttestor::new(), SharedAttestations::default());
        let (_first, attestation) = first_connection(&attestor, &shared, &child);
        // A copy of the same shell renamed over the path (another inode).
        let copy = dir.path().join("prog.new");
        std::fs::copy(&prog, &copy).unwrap();
        std::fs::rename(&copy, &prog).unwrap();
        let path = cue_and_wait(&mut child, |now| now == prog);
        let after = shared.for_peer(&attestor, &kernel_pinned(pid, &child));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(path, prog, "the process runs its path again");
        assert_eq!(attestation.path.as_deref(), prog.to_str());
        assert!(after.is_none(), "shared with another file at the same path");
    }

    /// Entries of closed connections are swept: the map stays within
    /// twice the live ones (and a first threshold).
    #[test]
    fn closed_connections_leave_no_entries() {
        let shared = SharedAttestations::default();
        let attestation = Arc::new(Attestation {
            selectors: Vec::new(),
            pending_hash: None,
            executable: None,
            path: None,
        });
        for pid in 1..10_000 {
            let process = Arc::new(PeerProcess {
                pid: Some(pid),
                uid: 0,
                gid: 0,
                pidfd: None,
                pinned_by: PinnedBy::PeerPidfd,
            });
            shared.remember(&process, &attestation);
        }
        assert!(shared.len() <= FIRST_SWEEP_AT, "{}", shared.len());
    }
}
