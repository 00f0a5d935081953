//! User and group names for `unix:user` and `unix:group`, read from
//! `/etc/passwd` and `/etc/group` once per version of each file instead of
//! once per connection. A version is the file's identity as `stat` reports
//! it (device, inode, size, mtime and ctime to the nanosecond): any write,
//! rename over it or `touch` moves one of them, and the next attestation
//! reads the file again. Depends on `executable` (a file's version).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::workload::executable::ExeVersion;

/// One version of a names file: what `stat` says of it (the same
/// identity an executable's version has).
fn version_of(path: &Path) -> Option<ExeVersion> {
    std::fs::metadata(path).ok().map(|meta| ExeVersion::of(&meta))
}

/// The ids → names of one `/etc/passwd`-style file, as of one version.
#[derive(Debug)]
struct Parsed {
    version: ExeVersion,
    names: HashMap<u32, String>,
}

/// Names by id from one file, parsed again only when the file changes.
#[derive(Debug)]
pub(crate) struct Names {
    path: PathBuf,
    parsed: Mutex<Option<Parsed>>,
}

impl Names {
    /// Names from `path` (`/etc/passwd` or `/etc/group`).
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), parsed: Mutex::new(None) }
    }

    /// The name of `id`: the first line that gives it one, as of the file's
    /// version now. `None` if the file cannot be read or has no such id.
    /// The version is taken before the file is read, so a file changed
    /// while it is read is read again at the next call.
    pub(crate) fn name_of(&self, id: u32) -> Option<String> {
        let version = version_of(&self.path)?;
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if parsed.as_ref().is_none_or(|p| p.version != version) {
            let text = std::fs::read_to_string(&self.path).ok()?;
            *parsed = Some(Parsed { version, names: parse(&text) });
        }
        parsed.as_ref().and_then(|p| p.names.get(&id).cloned())
    }
}

/// Every id's name in an `/etc/passwd`-style text (the first line wins).
fn parse(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_password), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else { continue };
        if !name.is_empty() {
            names.entry(id).or_insert_with(|| name.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_passwd_lines_and_the_first_line_wins() {
        let names =
            parse("root:x:0:0::/root:/bin/sh\n:x:5:5\nbad line\nalice:x:1000:1000\nbob:x:1000:1\n");
        assert_eq!(names.get(&0).map(String::as_str), Some("root"));
        assert_eq!(names.get(&1000).map(String::as_str), Some("alice"));
        assert_eq!(names.get(&5), None);
        assert_eq!(Names::new("/etc/passwd").name_of(0).as_deref(), Some("root"));
    }

    /// A file rewritten (even to the same size) is read again; an unchanged
    /// one is not (a second lookup sees the version it cached).
    #[test]
    fn a_changed_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "alice:x:1000:1000\n").unwrap();
        let names = Names::new(&path);
        assert_eq!(names.name_of(1000).as_deref(), Some("alice"));
        assert_eq!(names.name_of(1001), None);
        // Same size, new content: ctime moves.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&path, "carol:x:1000:1000\n").unwrap();
        assert_eq!(names.name_of(1000).as_deref(), Some("carol"));
        // Replaced by rename: another inode.
        let next = dir.path().join("passwd.new");
        std::fs::write(&next, "dave:x:1000:1000\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(names.name_of(1000).as_deref(), Some("dave"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(names.name_of(1000), None, "a missing file names no one");
    }
}
