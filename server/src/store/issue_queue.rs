//! The queue of issuance's group commit: batches of signed SVIDs waiting
//! to be recorded (`issuance.rs` records them), each encoded by its caller
//! outside the writer lock.

use tessera_proto::types::Event;

use super::issued_index::{rows_of, Placed, Row};
use super::Signed;

/// What a batch's caller gets back: each signed SVID (its event moved
/// into the log) with what became of it, or why the commit failed.
pub(super) type IssueDone = Result<Vec<super::RecordedSvid>, String>;

/// A batch of signed SVIDs waiting to be recorded (see `record_issued`),
/// with its records encoded by the caller, outside the writer lock.
pub(super) struct IssueJob {
    pub(super) agent_id: String,
    pub(super) agent_serial: String,
    /// The SVIDs, their events taken out into `events`.
    pub(super) signed: Vec<Signed>,
    /// Each SVID's issuance event, moved into the log by the commit.
    pub(super) events: Vec<Event>,
    /// The rows of `issued_svids` that hold its records
    /// (`issued_index.rs`), and where each record went.
    pub(super) rows: Vec<Row>,
    pub(super) placed: Vec<Placed>,
    /// The revision its entries were read at (`EntriesRead::revision`).
    pub(super) read_at: u64,
    pub(super) now: i64,
    pub(super) done: std::sync::mpsc::SyncSender<IssueDone>,
}

impl IssueJob {
    pub(super) fn new(
        agent_id: &str,
        agent_serial: &str,
        read_at: u64,
        mut signed: Vec<Signed>,
        shared: bool,
        now: i64,
        done: std::sync::mpsc::SyncSender<IssueDone>,
    ) -> Self {
        let svids: Vec<_> = signed.iter().map(|item| &item.svid).collect();
        let (rows, placed) = rows_of(&svids, shared);
        let events = signed.iter_mut().map(|item| std::mem::take(&mut item.event)).collect();
        Self {
            agent_id: agent_id.to_string(),
            agent_serial: agent_serial.to_string(),
            signed,
            events,
            rows,
            placed,
            read_at,
            now,
            done,
        }
    }
}
