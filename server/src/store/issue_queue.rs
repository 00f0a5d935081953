//! The queue of issuance's group commit: batches of signed SVIDs waiting
//! to be recorded (`issuance.rs` records them), each encoded by its caller
//! outside the writer lock.

use super::issued_index::{rows_of, Placed, Row};
use super::{ItemRefused, Signed};

/// A batch of signed SVIDs waiting to be recorded (see `record_issued`),
/// with its records encoded by the caller, outside the writer lock.
pub(super) struct IssueJob {
    pub(super) agent_id: String,
    pub(super) agent_serial: String,
    pub(super) signed: Vec<Signed>,
    /// The rows of `issued_svids` that hold its records
    /// (`issued_index.rs`), and where each record went.
    pub(super) rows: Vec<Row>,
    pub(super) placed: Vec<Placed>,
    /// The revision its entries were read at (`EntriesRead::revision`).
    pub(super) read_at: u64,
    pub(super) now: i64,
    pub(super) done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
}

impl IssueJob {
    pub(super) fn new(
        agent_id: &str,
        agent_serial: &str,
        read_at: u64,
        signed: &[Signed],
        shared: bool,
        now: i64,
        done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
    ) -> Self {
        let svids: Vec<_> = signed.iter().map(|item| &item.svid).collect();
        let (rows, placed) = rows_of(&svids, shared);
        Self {
            agent_id: agent_id.to_string(),
            agent_serial: agent_serial.to_string(),
            signed: signed.to_vec(),
            rows,
            placed,
            read_at,
            now,
            done,
        }
    }
}
