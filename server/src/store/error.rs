//! Why storage failed: [`StoreError`]. The key-value layer (`kv.rs`,
//! `sled/`, `postgres.rs`) reports its failures with it, and depends on
//! nothing else of the store.

use sled::transaction::TransactionError;

/// Storage failures (not per-item refusals, which are
/// [`EntryError`](crate::entry::EntryError)s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption sled detected).
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("store: corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store is missing writes it acknowledged, or its records disagree
    /// with each other: it was damaged or rolled back.
    #[error(
        "store {path} is damaged: {reason}; restore a backup with `tessera-server store restore`"
    )]
    Damaged {
        /// The store directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The watermark file could not be read or written.
    #[error("store watermark {path}: {source}")]
    Watermark {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A commit shared by several callers failed (the reason, as text).
    #[error("store: {0}")]
    Group(String),
    /// A backup file is not a Tessera backup, or is truncated or altered.
    #[error("backup: {0}")]
    Backup(String),
    /// A file beside the database (the event sink) failed.
    #[error("{0}")]
    Io(String),
    /// Another process (a running server) holds the embedded store open.
    #[error("store {0} is in use by a running server")]
    InUse(String),
    /// Changes after `asked` were asked for, but the change log was trimmed
    /// and starts at `start`: the reader needs a snapshot.
    #[error(
        "the change log starts at revision {start}; revision {asked} is older (a snapshot is needed)"
    )]
    ChangesTrimmed {
        /// The revision the reader is at.
        asked: u64,
        /// The log's start: every change from it on is held.
        start: u64,
    },
    /// The PostgreSQL datastore failed or cannot be reached.
    #[error("datastore: {0}")]
    Database(String),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}
