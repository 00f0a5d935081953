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
//! `connect()`); user and group names from `/etc/passwd` and `/etc/group`
//! (parsed once per version of each file, see [`super::names`]).

use std::fmt;
use std::sync::Arc;

use tessera_workload_api::Selector;

use crate::workload::executable::{
    open_exe, running_exe, ExeHashes, Executable, HashLimits, PendingHash,
};
use crate::workload::names::Names;
use crate::workload::peer::{ensure_alive, AttestError, PeerProcess, PinnedBy};

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
    /// Its path then, as `/proc/<pid>/exe` showed it (the `path` selector).
    pub path: Option<String>,
}

/// Derives a caller's selectors, once per connection, and checks before
/// each request that they still describe the caller.
pub trait WorkloadAttestor: Send + Sync + fmt::Debug + 'static {
    /// The selectors of the process behind `peer`, at accept. Runs on a
    /// blocking thread; must not do slow I/O (leave that to [`PendingHash`]).
    fn attest(&self, peer: &PeerProcess) -> Result<Attestation, AttestError>;

    /// Whether the process pinned in `peer` still lives and still runs the
    /// executable `attestation` recorded. Runs on the async worker before
    /// every request and stream update, so it must not wait on I/O (the
    /// Unix attestor's is one `statx` of cached attributes and one `poll`
    /// of the pidfd).
    fn verify(&self, peer: &PeerProcess, attestation: &Attestation) -> Result<(), AttestError>;

    /// Whether `attestation`, made at the accept of `first`'s connection,
    /// may stand for `peer`'s own (another connection of the same process):
    /// then the new connection takes it instead of reading `/proc` again.
    /// What the attestor does not check again here is served as it was
    /// found for `first` (as `first`'s connection is served with it); an
    /// attestor that adds a selector must check what it depends on here.
    /// Runs on the async worker, so, like [`Self::verify`], it must not
    /// wait on I/O. Never, unless the attestor says so.
    fn shares(
        &self,
        _first: &PeerProcess,
        _attestation: &Attestation,
        _peer: &PeerProcess,
    ) -> bool {
        false
    }
}

/// Attests local processes by uid, gid, user and group names, supplementary
/// groups, executable path and the executable's SHA-256.
#[derive(Debug)]
pub struct UnixAttestor {
    hashes: Arc<ExeHashes>,
    users: Names,
    groups: Names,
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
            hashes: Arc::new(ExeHashes::new(limits)),
            users: Names::new("/etc/passwd"),
            groups: Names::new("/etc/group"),
        }
    }

    /// How many executable hashes this attestor has computed.
    pub fn hashes_computed(&self) -> u64 {
        self.hashes.computed()
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
        if let Some(user) = self.users.name_of(peer.uid) {
            push("user", user);
        }
        if let Some(group) = self.groups.name_of(peer.gid) {
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
        let mut exe_path = None;
        if let Ok((file, version)) = open_exe(pid) {
            executable = Some(Executable(version));
            if let Ok(path) = std::fs::read_link(format!("/proc/{pid}/exe")) {
                if let Some(path) = path.to_str() {
                    push("path", path.to_string());
                    exe_path = Some(path.to_string());
                }
            }
            match self.hashes.lookup(pid, file, version) {
                Ok(hash) => push("sha256", hash),
                Err(pending) => pending_hash = pending,
            }
        }
        // The process must still be the one pinned at accept: had it exited
        // (and its PID been reused), /proc would describe another process.
        ensure_alive(pidfd, pid)?;
        // And it must still run what was opened: an exec while the path was
        // read would pair this file with another's path.
        let attestation = Attestation { selectors, pending_hash, executable, path: exe_path };
        self.verify(peer, &attestation)?;
        Ok(attestation)
    }

    fn verify(&self, peer: &PeerProcess, attestation: &Attestation) -> Result<(), AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoPid)?;
        let pidfd = peer.pidfd.as_ref().ok_or_else(|| AttestError::Pin {
            pid,
            source: std::io::Error::other("pidfd_open failed (process gone?)"),
        })?;
        let now = match running_exe(pid) {
            Ok(version) => Some(Executable(version)),
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

    /// Shared when the kernel pins both peers (`SO_PEERPIDFD`), with the
    /// same PID, uid and gid at `connect()`; `peer` still runs the
    /// executable `attestation` recorded, under the same path; and both
    /// pinned processes live, `peer`'s checked first. `first` was pinned
    /// before `peer` was checked, so if it still lives now it held its PID
    /// all along, and a live `peer` with that PID is the same process
    /// (a PID names one process at a time; it is reused only after its
    /// process exited and was reaped). Not checked again: user and group
    /// names and the supplementary groups, which are those found at
    /// `first`'s attestation, as `first`'s connection is served with them
    /// while it runs the same executable (a process that changes only its
    /// supplementary groups, which needs `CAP_SETGID`, keeps the old ones
    /// on new connections while that connection is open). Every other
    /// selector follows from the uid, the gid and the executable.
    fn shares(&self, first: &PeerProcess, attestation: &Attestation, peer: &PeerProcess) -> bool {
        let (Some(pid), Some(first_pidfd)) = (peer.pid, first.pidfd.as_ref()) else {
            return false;
        };
        let kernel_pinned = [first, peer].iter().all(|p| p.pinned_by == PinnedBy::PeerPidfd);
        if !kernel_pinned
            || first.pid != Some(pid)
            || (first.uid, first.gid) != (peer.uid, peer.gid)
        {
            return false;
        }
        let path = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        if attestation.executable.is_none()
            || path.as_deref().and_then(|p| p.to_str()) != attestation.path.as_deref()
        {
            return false;
        }
        // The same executable, then (statx), `peer` alive (its pidfd) ...
        self.verify(peer, attestation).is_ok()
            // ... and, after it, `first`.
            && ensure_alive(first_pidfd, pid).is_ok()
    }
}

fn supplementary_gids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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

    /// The check before each request (a `statx` of cached attributes, not
    /// an open) sees the same identity as the attestation's `fstat`, and a
    /// metadata change of the running file (ctime) as another executable.
    #[test]
    fn verify_sees_a_chmod_of_the_running_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog");
        let mut child = run_copy_of_sleep(&path);
        let peer = peer_of(&child);
        let attestor = UnixAttestor::new();
        let attestation = attestor.attest(&peer).unwrap();
        attestor.verify(&peer, &attestation).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = attestor.verify(&peer, &attestation).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(err, AttestError::ExecutableChanged { .. }), "{err}");
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
        use crate::workload::exec_on_cue::{cue_and_wait, shell_then};
        let mut child = shell_then(std::path::Path::new("/bin/sh"), "/bin/sleep 30");
        let pid = child.id() as i32;
        let peer = PeerProcess::pin(Some(pid), 0, 0);
        let attestor = UnixAttestor::new();
        let attestation = attestor.attest(&peer).unwrap();
        assert!(attestation.executable.is_some());
        attestor.verify(&peer, &attestation).unwrap();
        let shell = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        cue_and_wait(&mut child, |now| now != shell);
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
    }
}
