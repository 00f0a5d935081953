//! Folding of Workload API decisions, so that how often a process calls
//! does not decide how many events the agent spools and the server stores.
//! Two rules, both over windows of [`FOLD_INTERVAL`]:
//!
//! - **Refusals** (`decision = deny`): the first [`REFUSALS_PER_INTERVAL`]
//!   of one uid and kind are recorded as they are; the rest are counted,
//!   and one event of that kind (attr `folded` = how many,
//!   `folded_interval_ms`, the last reason) is recorded when the window
//!   ends. One local user cannot flood the event stream however fast it
//!   is refused.
//! - **Repeats** (`decision = allow`): an answer identical to one recorded
//!   in the window (same process, same kind, same identities, serials,
//!   JWT IDs and audiences: everything but the time) is counted, and the
//!   last one is recorded with `folded` and `folded_interval_ms` when the
//!   window ends. The first answer to a process, and every answer that
//!   differs (a new SVID, another audience, another process), is recorded
//!   at once; a repeat only says again what its first said.
//!
//! Nothing is dropped: every call is in exactly one event, alone or counted
//! in `folded`.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use tessera_proto::types::Event;

use crate::event_schema::{self as schema, EventExt};

/// Refusals of one uid and kind recorded one by one per [`FOLD_INTERVAL`].
pub const REFUSALS_PER_INTERVAL: u64 = 10;

/// The window refusals and repeats are folded over.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(5);

/// Refusal windows tracked at once; past it, refusals of new uids are
/// tracked under [`ANY_UID`].
const MAX_REFUSAL_WINDOWS: usize = 4096;

/// Repeat windows tracked at once (each holds its last event); past it,
/// answers that would open a new one are recorded as they are. Apart from
/// the refusals' table, so that many processes of one uid cannot push
/// other uids' refusals under [`ANY_UID`].
const MAX_REPEAT_WINDOWS: usize = 1024;

/// The uid refusals are tracked under when the caller's is unknown or the
/// table is full.
pub(super) const ANY_UID: u32 = u32::MAX;

/// One window.
#[derive(Debug)]
struct FoldWindow {
    started: tokio::time::Instant,
    recorded: u64,
    folded: u64,
    /// The last folded event (its reason, workload and attrs are kept).
    last: Option<Event>,
}

impl FoldWindow {
    fn new(started: tokio::time::Instant) -> Self {
        Self { started, recorded: 0, folded: 0, last: None }
    }

    /// `e` back if it is one of the first `recorded_per_window`; else
    /// counted and kept as the last.
    fn admit(&mut self, e: Event, recorded_per_window: u64) -> Option<Event> {
        if self.recorded < recorded_per_window {
            self.recorded += 1;
            return Some(e);
        }
        self.folded += 1;
        self.last = Some(e);
        None
    }

    /// The event that closes the window, if anything was folded into it.
    fn close(&mut self, now: tokio::time::Instant) -> Option<Event> {
        let mut e = self.last.take()?;
        let interval = now.duration_since(self.started).as_millis() as u64;
        e.attrs.retain(|a| a.key != "folded" && a.key != "folded_interval_ms");
        Some(e.attr("folded", self.folded).attr("folded_interval_ms", interval))
    }
}

/// The open windows.
#[derive(Debug, Default)]
pub(super) struct Folds {
    /// By uid and kind.
    refusals: HashMap<(u32, String), FoldWindow>,
    /// By the SHA-256 of the answer with its time left out (it names the
    /// kind, the process and everything served).
    repeats: HashMap<[u8; 32], FoldWindow>,
}

impl Folds {
    /// `e` back when it is to be recorded as it is; `None` when it was
    /// folded into its window.
    pub(super) fn admit(&mut self, mut e: Event, now: tokio::time::Instant) -> Option<Event> {
        if !e.kind.starts_with("workload.") {
            return Some(e);
        }
        if e.decision == schema::DENY {
            let mut key = (e.workload.as_ref().map_or(ANY_UID, |w| w.uid), e.kind.clone());
            if self.refusals.len() >= MAX_REFUSAL_WINDOWS && !self.refusals.contains_key(&key) {
                key.0 = ANY_UID;
            }
            let window = self.refusals.entry(key).or_insert_with(|| FoldWindow::new(now));
            return window.admit(e, REFUSALS_PER_INTERVAL);
        }
        if e.decision == schema::ALLOW {
            let key = timeless_digest(&mut e);
            if self.repeats.len() >= MAX_REPEAT_WINDOWS && !self.repeats.contains_key(&key) {
                return Some(e);
            }
            let window = self.repeats.entry(key).or_insert_with(|| FoldWindow::new(now));
            return window.admit(e, 1);
        }
        Some(e)
    }

    /// One event for each window that ended (every window when `all`: the
    /// agent is stopping) with events folded into it; windows that ended
    /// are forgotten.
    pub(super) fn flush(&mut self, now: tokio::time::Instant, all: bool) -> Vec<Event> {
        let ended = |w: &FoldWindow| all || now.duration_since(w.started) >= FOLD_INTERVAL;
        let mut out = Vec::new();
        self.refusals.retain(|(uid, _), window| {
            if !ended(window) {
                return true;
            }
            if let Some(mut e) = window.close(now) {
                e.reason = format!(
                    "{} more refusals of uid {} folded into this event (last: {})",
                    window.folded,
                    if *uid == ANY_UID { "(any)".to_string() } else { uid.to_string() },
                    e.reason
                );
                out.push(e);
            }
            false
        });
        self.repeats.retain(|_, window| {
            if !ended(window) {
                return true;
            }
            out.extend(window.close(now));
            false
        });
        out
    }
}

/// SHA-256 of `e`'s encoding with its time left out (put back before it
/// returns).
fn timeless_digest(e: &mut Event) -> [u8; 32] {
    let time = std::mem::take(&mut e.time_ms);
    let digest = ring::digest::digest(&ring::digest::SHA256, &e.encode_to_vec());
    e.time_ms = time;
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::event_schema::kind;
    use tessera_proto::types::Workload;

    fn served(pid: i32, serial: &str) -> Event {
        let mut e = schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .workload(Workload { pid, uid: 1000, ..Default::default() })
            .spiffe_id("spiffe://example.org/app".to_string());
        e.serial = serial.into();
        e
    }

    #[test]
    fn a_repeated_answer_is_counted_and_what_differs_is_recorded_at_once() {
        let mut folds = Folds::default();
        let t0 = tokio::time::Instant::now();
        let mut recorded = Vec::new();
        for n in 0..100u64 {
            let mut e = served(7, "aa");
            e.time_ms += n as i64; // a later call: only the time differs
            recorded.extend(folds.admit(e, t0));
        }
        assert_eq!(recorded.len(), 1, "the first answer, alone");
        // A new SVID, another process, another kind: each recorded at once.
        recorded.extend(folds.admit(served(7, "bb"), t0));
        recorded.extend(folds.admit(served(8, "aa"), t0));
        let mut jwt = served(7, "aa");
        jwt.kind = kind::WORKLOAD_JWT.into();
        recorded.extend(folds.admit(jwt, t0));
        assert_eq!(recorded.len(), 4);
        assert!(folds.flush(t0 + FOLD_INTERVAL / 2, false).is_empty(), "the window is open");
        let folded = folds.flush(t0 + FOLD_INTERVAL, false);
        assert_eq!(folded.len(), 1, "{folded:?}");
        let attr = |k: &str| folded[0].attrs.iter().find(|a| a.key == k).map(|a| a.value.clone());
        assert_eq!(attr("folded").as_deref(), Some("99"));
        assert_eq!(attr("folded_interval_ms").as_deref(), Some("5000"));
        assert_eq!(folded[0].serial, "aa");
        assert_eq!(folded[0].workload.as_ref().unwrap().pid, 7);
        assert!(folded[0].reason.is_empty(), "an answer has no reason");
        // The next window starts over: its first answer is recorded.
        assert!(folds.admit(served(7, "aa"), t0 + FOLD_INTERVAL).is_some());
    }

    #[test]
    fn a_full_table_records_answers_as_they_are() {
        let mut folds = Folds::default();
        let t0 = tokio::time::Instant::now();
        for pid in 0..MAX_REPEAT_WINDOWS as i32 {
            assert!(folds.admit(served(pid, "aa"), t0).is_some());
        }
        let pid = MAX_REPEAT_WINDOWS as i32;
        assert!(folds.admit(served(pid, "aa"), t0).is_some());
        assert!(folds.admit(served(pid, "aa"), t0).is_some(), "no window: recorded again");
        assert!(folds.admit(served(0, "aa"), t0).is_none(), "its window is open");
    }
}
