//! Whether the configured operators can reach the admin socket: every
//! directory on its path must be searchable by them and the socket
//! writable. The server warns at startup about each operator uid or gid
//! that cannot (a socket inside the 0700 data dir locks them all out).
//! Depends on nothing of ours.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a caller with `uid` and groups `gids` cannot use the socket at
/// `socket`: the first path on the way it may not pass. `None` when it can
/// (or when a path cannot be read: the server itself bound it, so that is
/// not the operator's problem to hear about here).
pub fn blocked_at(socket: &Path, uid: u32, gids: &[u32]) -> Option<PathBuf> {
    if uid == 0 {
        return None;
    }
    let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.to_owned());
    let mut dirs: Vec<&Path> = socket.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let meta = std::fs::metadata(dir).ok()?;
        if !allowed(&meta, uid, gids, 0o1) {
            return Some(dir.to_owned());
        }
    }
    let meta = std::fs::metadata(&socket).ok()?;
    (!allowed(&meta, uid, gids, 0o2)).then_some(socket)
}

/// Whether the permission bit `bit` (1 search, 2 write) of `meta` is
/// granted to `uid`/`gids` by owner, group or other (the owner's bits alone
/// decide for the owner, as the kernel does).
fn allowed(meta: &std::fs::Metadata, uid: u32, gids: &[u32], bit: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & (bit << 6) != 0
    } else if gids.contains(&meta.gid()) {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// The primary and supplementary groups of `uid`, from `/etc/passwd` and
/// `/etc/group` (empty when the uid has no name there).
pub fn groups_of(uid: u32) -> Vec<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some((name, primary)) = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid)).then(|| (f[0].to_string(), f[3].parse().ok()))
    }) else {
        return Vec::new();
    };
    let mut gids: Vec<u32> = primary.into_iter().collect();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[3].split(',').any(|member| member == name) {
            gids.extend(f[2].parse::<u32>().ok());
        }
    }
    gids
}

/// Logs one warning per operator uid and gid that cannot reach `socket`.
pub fn warn_unreachable(socket: &Path, uids: &[u32], gids: &[u32]) {
    for &uid in uids {
        if let Some(at) = blocked_at(socket, uid, &groups_of(uid)) {
            tracing::warn!(
                uid,
                socket = %socket.display(),
                blocked_at = %at.display(),
                "operator uid {uid} cannot reach the admin socket: {} is closed to it; set admin_socket to a path operators can reach (e.g. /run/tessera-server/admin.sock)",
                at.display()
            );
        }
    }
    for &gid in gids {
        // A member that is neither the owner of a directory nor root.
        if let Some(at) = blocked_at(socket, u32::MAX - 1, &[gid]) {
            tracing::warn!(
                gid,
                socket = %socket.display(),
                blocked_at = %at.display(),
                "operator group {gid} cannot reach the admin socket: {} is closed to it; set admin_socket to a path operators can reach (e.g. /run/tessera-server/admin.sock)",
                at.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_directory_on_the_path_blocks_everyone_but_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("data");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = private.join("admin.sock");
        std::fs::write(&socket, b"").unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(blocked_at(&socket, 4242, &[4242]), Some(private.clone()));
        assert_eq!(blocked_at(&socket, 0, &[]), None, "root passes");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(blocked_at(&socket, 4242, &[4242]), None);
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(blocked_at(&socket, 4242, &[4242]), Some(socket.clone()));
    }
}
