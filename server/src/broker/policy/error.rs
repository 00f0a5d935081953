//! What can be wrong with a policy directory or a resources file: one
//! variant per kind of fault, each a one-line message that starts with the
//! file and, when known, the line (`policies/tools.cedar:12: ...`).

use std::fmt;
use std::path::{Path, PathBuf};

/// A file and, when known, a line in it (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as the operator named it (the directory joined with its name).
    pub file: PathBuf,
    /// The line, when the parser said where.
    pub line: Option<usize>,
}

impl Location {
    /// The line of byte `offset` in `text`.
    pub(super) fn at(file: &Path, text: &str, offset: Option<usize>) -> Self {
        let line = offset.map(|o| {
            let end = o.min(text.len());
            text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
        });
        Self { file: file.to_path_buf(), line }
    }

    /// The file only.
    pub(super) fn file(file: &Path) -> Self {
        Self { file: file.to_path_buf(), line: None }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// Why a policy set (or its resources file) was not loaded. Each message
/// is one line and names the file (and line) at fault; a reload that fails
/// leaves the set in force untouched.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file or the directory could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The file or directory.
        path: String,
        /// The operating system's reason.
        message: String,
    },
    /// The directory has no `*.cedarschema` file, or more than one.
    #[error("{dir}: {found} *.cedarschema files; exactly one is required")]
    SchemaCount {
        /// The policy directory.
        dir: String,
        /// How many there are.
        found: usize,
    },
    /// The schema does not parse or is not a valid schema.
    #[error("{at}: schema: {message}")]
    Schema {
        /// Where.
        at: Location,
        /// Cedar's reason.
        message: String,
    },
    /// A policy file does not parse.
    #[error("{at}: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// Cedar's reason.
        message: String,
    },
    /// A policy does not validate against the schema (strict mode).
    #[error("{at}: policy {policy} does not validate: {message}")]
    Validation {
        /// Where.
        at: Location,
        /// The policy's `@id` (or Cedar's id).
        policy: String,
        /// Cedar's reason.
        message: String,
    },
    /// Two policies carry the same `@id`.
    #[error("{at}: duplicate policy id {id:?} (also in {other})")]
    DuplicateId {
        /// The second one.
        at: Location,
        /// The id.
        id: String,
        /// The first one.
        other: Location,
    },
    /// The resources file is malformed (TOML, a field, a duplicate id, a
    /// parent cycle).
    #[error("{at}: {message}")]
    Resources {
        /// Where.
        at: Location,
        /// What is wrong.
        message: String,
    },
}

impl PolicyError {
    /// An I/O error on `path`.
    pub(super) fn io(path: &Path, e: &std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), message: e.to_string() }
    }
}

/// Cedar's message on one line (its errors may span several).
pub(super) fn one_line(message: impl fmt::Display) -> String {
    message.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The byte offset of the first labelled span of a Cedar diagnostic (parse,
/// schema and validation errors carry one when Cedar knows where).
pub(super) fn first_offset(d: &dyn miette::Diagnostic) -> Option<usize> {
    d.labels().and_then(|mut labels| labels.next()).map(|l| l.offset())
}
