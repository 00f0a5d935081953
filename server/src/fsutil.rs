//! Small file helpers: private files written atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` with mode 0600, atomically (temp file, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A pre-existing temp file keeps its old mode: force it.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(data)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates `dir` (and parents) and restricts it to the owner (0700).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Restricts everything under `dir` (and `dir` itself) to the owner:
/// directories 0700, regular files 0600. For files a library creates with
/// the process umask (sled's database, snapshots and blobs); symlinks and
/// sockets are left alone, and a file removed meanwhile is no error.
pub fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    let ignore_gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let restrict = |path: &Path, mode: u32| -> std::io::Result<bool> {
        let meta = fs::symlink_metadata(path)?;
        let (is_dir, is_file) = (meta.file_type().is_dir(), meta.file_type().is_file());
        if (is_dir || is_file) && meta.permissions().mode() & 0o7777 != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
        Ok(is_dir)
    };
    ignore_gone(restrict(dir, 0o700).map(drop))?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            let is_dir = match fs::symlink_metadata(&path) {
                Ok(meta) => meta.file_type().is_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match restrict(&path, if is_dir { 0o700 } else { 0o600 }) {
                Ok(true) => pending.push(path),
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// This server's stable ID, in `<data_dir>/server-id`, created on first
/// use: it names the server's CAs and CRLs in a shared datastore.
pub fn server_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("server-id");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) => Err(std::io::Error::other(format!("{} is empty", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            write_private(&path, id.as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// Checks that only this process's user (or root) can change what `dir`
/// holds, so that a socket bound in it cannot be replaced or redirected
/// by another local user: every directory on its real path is owned by
/// root or the effective uid and writable by no one else (unless sticky,
/// like `/tmp`, where others cannot rename or remove what is not theirs),
/// and every symlink on the path as given is owned by root or the
/// effective uid. `dir` itself must not be sticky-shared: it is the
/// server's own. Returns why not, naming the path.
pub fn check_trusted_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let given = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for path in given.ancestors() {
        let meta = fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.file_type().is_symlink() && !trusted(meta.uid()) {
            return Err(format!(
                "{} is a symlink owned by uid {}, not by root or uid {me}",
                path.display(),
                meta.uid()
            ));
        }
    }
    let real = fs::canonicalize(&given).map_err(|e| format!("{}: {e}", given.display()))?;
    for path in real.ancestors() {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", path.display()));
        }
        if !trusted(meta.uid()) {
            return Err(format!(
                "{} is owned by uid {}, not by root or uid {me}",
                path.display(),
                meta.uid()
            ));
        }
        let sticky = meta.mode() & 0o1000 != 0 && path != real;
        if meta.mode() & 0o022 != 0 && !sticky {
            return Err(format!(
                "{} is writable by other users (mode {:o})",
                path.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrict_tree_leaves_only_the_owner_in() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("blobs");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        for file in [dir.path().join("db"), sub.join("1")] {
            fs::write(&file, b"x").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        }
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        fs::write(&target, b"y").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        restrict_tree(dir.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&dir.path().join("db")), 0o600);
        assert_eq!(mode(&sub.join("1")), 0o600);
        assert_eq!(mode(&target), 0o644, "a symlink's target is not touched");
    }
}
