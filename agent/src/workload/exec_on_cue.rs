//! For the attestation tests: a process that execs another program when
//! told to (a line on its standard input), and a bounded wait for the exec.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `shell -c "read line; exec THEN"`: runs `shell` until a line arrives on
/// its standard input, then `then`.
pub(crate) fn shell_then(shell: &Path, then: &str) -> Child {
    Command::new(shell)
        .args(["-c", &format!("read line; exec {then}")])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `child` its line, then waits (at most 30 s) until the path of its
/// executable, as `/proc/<pid>/exe` shows it, satisfies `done`; that path.
pub(crate) fn cue_and_wait(child: &mut Child, done: impl Fn(&Path) -> bool) -> PathBuf {
    let exe = format!("/proc/{}/exe", child.id());
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    for _ in 0..3000 {
        let path = std::fs::read_link(&exe).unwrap();
        if done(&path) {
            return path;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::read_link(&exe).unwrap()
}
