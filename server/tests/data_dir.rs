//! What a server leaves in its data dir is its own: every file 0600 and
//! every directory 0700 (the admin socket has its own documented mode),
//! whatever the umask it was started with; the sled store's files included,
//! which sled creates with the process umask.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

mod common;

use common::RunningServer;

/// Every path under `dir` whose mode is not private: files 0600, dirs 0700.
fn not_private(dir: &Path) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let kind = meta.file_type();
        if kind.is_dir() {
            if mode != 0o700 {
                wrong.push(format!("{} {mode:o}", path.display()));
            }
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        } else if kind.is_socket() {
            // The admin socket: 0600 by default, documented on its own.
        } else if mode != 0o600 {
            wrong.push(format!("{} {mode:o}", path.display()));
        }
    }
    wrong
}

#[test]
fn every_file_the_server_writes_in_its_data_dir_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = RunningServer::start_with_umask_022(&data);
    for i in 0..20 {
        let spiffe_id = format!("spiffe://example.org/w{i}");
        let out = server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &spiffe_id,
            "--parent-id",
            "spiffe://example.org/node/1",
            "--selector",
            &format!("unix:uid:{}", 1000 + i),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let token = server.cli(&["token", "generate"]);
    assert!(token.status.success());
    assert!(data.join("store").is_dir(), "the sled store is in the data dir");
    assert_eq!(not_private(&data), Vec::<String>::new(), "while running");
    // sled writes a snapshot as it closes; the next start restricts it.
    server.stop();
    let server = RunningServer::start_with_umask_022(&data);
    assert_eq!(not_private(&data), Vec::<String>::new(), "after a restart");
    server.stop();
}
