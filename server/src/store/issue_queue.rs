//! The queue of issuance's group commit: batches of signed SVIDs waiting
//! to be recorded (`issuance.rs` records them), each encoded by its caller
//! outside the writer lock.

use prost::Message;

use super::layout::{owner_of, svid_key};
use super::{ItemRefused, Signed};

/// One issued SVID as written: the record's key, its encoding, its owner
/// (`owner_of`), and its entry's encoding as read for signing.
pub(super) type EncodedIssue = (String, Vec<u8>, String, Vec<u8>);

/// A batch of signed SVIDs waiting to be recorded (see `record_issued`),
/// with its records encoded by the caller, outside the writer lock.
pub(super) struct IssueJob {
    pub(super) agent_id: String,
    pub(super) agent_serial: String,
    pub(super) signed: Vec<Signed>,
    /// Per item: the record's key, its encoding, its owner, and the
    /// entry's encoding as it was read for signing.
    pub(super) encoded: Vec<EncodedIssue>,
    pub(super) now: i64,
    pub(super) done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
}

impl IssueJob {
    pub(super) fn new(
        agent_id: &str,
        agent_serial: &str,
        signed: &[Signed],
        now: i64,
        done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
    ) -> Self {
        let encoded = signed
            .iter()
            .map(|item| {
                let key = svid_key(&item.svid.serial, &item.svid.jti);
                let owner = owner_of(&item.svid);
                (key, item.svid.encode_to_vec(), owner, item.entry.to_proto().encode_to_vec())
            })
            .collect();
        Self {
            agent_id: agent_id.to_string(),
            agent_serial: agent_serial.to_string(),
            signed: signed.to_vec(),
            encoded,
            now,
            done,
        }
    }
}
