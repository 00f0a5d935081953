//! The agent's events (Workload API decisions): spooled durably in
//! `<data_dir>/events.spool` until the server has stored them (pushed in
//! batches by `node::event_push`). Nothing is dropped silently: when the
//! spool is full, new events are counted (by kind) instead of spooled, and
//! once there is room again an `agent.spool_overflow` event says how many
//! and which were lost.
//!
//! Refusals are folded per uid: in each [`FOLD_INTERVAL`], the first
//! [`REFUSALS_PER_INTERVAL`] Workload API refusals of one uid and kind are
//! recorded as they are; the rest are counted, and one event of that kind
//! (attr `folded` = how many, `folded_interval_ms`, the last reason) is
//! recorded for them when the interval ends. One local user cannot flood the
//! server's event stream (or this spool) however fast it is refused.
//!
//! Spool file: a header (`TSPOOL1\n` and a 16-byte spool ID), then records
//! of `[u32 length][u32 crc32][Event protobuf]`. A torn record at the end
//! (a crash mid-write) is cut off when the spool is opened. What the
//! server acknowledged is in `events.acked`; resending an acknowledged
//! event is harmless (the server skips sequence numbers it has).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use tessera_proto::types::Event;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::event_schema::{self as schema, kind, EventExt};
use crate::metrics::AgentMetrics;

const MAGIC: &[u8] = b"TSPOOL1\n";
const HEADER_LEN: u64 = 8 + 16;

/// Events sent per push, at most.
pub const PUSH_BATCH: usize = 500;

/// Encoded bytes of events per push, at most (a single larger event goes
/// alone): a quarter of what the server decodes in one request, so a push
/// of big events (a fetch serving hundreds of SVIDs names each) is never
/// refused for its size and retried forever while the spool fills.
pub const PUSH_BYTES: usize = tessera_common::rules::MAX_NODE_REQUEST_BYTES / 4;

/// How often spooled events are fsynced.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// Default spool size: 64 MiB of events not yet stored by the server.
pub const DEFAULT_SPOOL_BYTES: u64 = 64 * 1024 * 1024;

/// Refusals of one uid and kind recorded one by one per [`FOLD_INTERVAL`].
pub const REFUSALS_PER_INTERVAL: u64 = 10;

/// The interval refusals past [`REFUSALS_PER_INTERVAL`] are folded over.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(5);

/// (uid, kind) pairs tracked at once; past it, refusals of new uids are
/// tracked under [`ANY_UID`].
const MAX_FOLD_KEYS: usize = 4096;

/// The uid refusals are tracked under when the caller's is unknown or the
/// table is full.
const ANY_UID: u32 = u32::MAX;

/// Refusals of one uid and kind in the current interval.
#[derive(Debug)]
struct FoldWindow {
    started: tokio::time::Instant,
    recorded: u64,
    folded: u64,
    /// The last folded refusal (its reason, workload and attrs are kept).
    last: Option<Event>,
}

/// Per-uid refusal folding.
#[derive(Debug, Default)]
struct Folds {
    windows: HashMap<(u32, String), FoldWindow>,
}

impl Folds {
    /// Whether `e` is recorded as it is (`true`) or folded (`false`).
    fn admit(&mut self, e: &Event, now: tokio::time::Instant) -> bool {
        if e.decision != schema::DENY || !e.kind.starts_with("workload.") {
            return true;
        }
        let mut uid = e.workload.as_ref().map_or(ANY_UID, |w| w.uid);
        if self.windows.len() >= MAX_FOLD_KEYS && !self.windows.contains_key(&(uid, e.kind.clone()))
        {
            uid = ANY_UID;
        }
        let window = self.windows.entry((uid, e.kind.clone())).or_insert_with(|| FoldWindow {
            started: now,
            recorded: 0,
            folded: 0,
            last: None,
        });
        if window.recorded < REFUSALS_PER_INTERVAL {
            window.recorded += 1;
            return true;
        }
        window.folded += 1;
        window.last = Some(e.clone());
        false
    }

    /// One event for each window that ended with refusals folded; windows
    /// that ended are forgotten.
    fn flush(&mut self, now: tokio::time::Instant) -> Vec<Event> {
        let mut out = Vec::new();
        self.windows.retain(|(uid, _), window| {
            if now.duration_since(window.started) < FOLD_INTERVAL {
                return true;
            }
            if let Some(mut e) = window.last.take() {
                let interval = now.duration_since(window.started).as_millis() as u64;
                e.reason = format!(
                    "{} more refusals of uid {} folded into this event (last: {})",
                    window.folded,
                    if *uid == ANY_UID { "(any)".to_string() } else { uid.to_string() },
                    e.reason
                );
                e.attrs.retain(|a| a.key != "folded" && a.key != "folded_interval_ms");
                out.push(e.attr("folded", window.folded).attr("folded_interval_ms", interval));
            }
            false
        });
        out
    }
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("event spool {path}: {source}")]
pub struct SpoolError {
    path: String,
    source: std::io::Error,
}

#[derive(Debug)]
struct Inner {
    spool_id: [u8; 16],
    next_seq: u64,
    /// Events not yet acknowledged, oldest first, with their encoded size.
    queue: VecDeque<(Event, u64)>,
    /// Encoded size of `queue`.
    bytes: u64,
    /// Records not yet written to the file.
    unwritten: Vec<u8>,
    /// Bytes in the file (header included), written or not.
    file_len: u64,
    /// Bytes of acknowledged records at the file's start (after the header).
    acked_bytes: u64,
    /// Events refused while the spool was full, by kind.
    dropped: BTreeMap<String, u64>,
    dirty: bool,
}

/// The agent's event spool.
#[derive(Debug)]
pub struct EventSpool {
    /// The spool file. Taken before `inner` when both are needed; writes
    /// and fsyncs hold only this, so callers of [`Self::emit`] never wait
    /// for the disk.
    file: Mutex<std::fs::File>,
    inner: Mutex<Inner>,
    dir: PathBuf,
    max_bytes: u64,
    enabled: bool,
    agent_id: String,
    /// Notified when an event is spooled.
    pub(crate) wake: Notify,
    pub(crate) metrics: AgentMetrics,
    folds: Mutex<Folds>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError { path: path.display().to_string(), source }
}

fn new_spool_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    id
}

fn record(e: &Event) -> Vec<u8> {
    let body = e.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Writes a fresh spool file (header and `events`) at `path`, atomically.
fn write_spool(
    path: &Path,
    spool_id: &[u8; 16],
    events: &[Vec<u8>],
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("spool.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(MAGIC)?;
    file.write_all(spool_id)?;
    for e in events {
        file.write_all(e)?;
    }
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.seek(std::io::SeekFrom::End(0))?;
    Ok(file)
}

impl EventSpool {
    /// Opens (or creates) the spool in `dir`: events a previous run left
    /// unacknowledged are sent first.
    pub fn open(
        dir: &Path,
        agent_id: String,
        max_bytes: u64,
        enabled: bool,
        metrics: AgentMetrics,
    ) -> Result<Self, SpoolError> {
        let path = dir.join("events.spool");
        let acked = std::fs::read_to_string(dir.join("events.acked")).ok().and_then(|s| {
            let (id, seq) = s.trim().split_once(' ')?;
            Some((id.to_string(), seq.parse::<u64>().ok()?))
        });
        let mut spool_id = [0u8; 16];
        let mut queue = VecDeque::new();
        let mut last_seq = 0;
        let mut torn = false;
        if let Ok(mut file) = std::fs::File::open(&path) {
            let mut data = Vec::new();
            file.read_to_end(&mut data).map_err(io_err(&path))?;
            if data.len() as u64 >= HEADER_LEN && data.starts_with(MAGIC) {
                spool_id.copy_from_slice(&data[8..24]);
                let acked_seq = match &acked {
                    Some((id, seq)) if *id == hex::encode(spool_id) => *seq,
                    _ => 0,
                };
                let mut at = HEADER_LEN as usize;
                while at + 8 <= data.len() {
                    let len =
                        u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
                            as usize;
                    let crc = u32::from_be_bytes([
                        data[at + 4],
                        data[at + 5],
                        data[at + 6],
                        data[at + 7],
                    ]);
                    let Some(body) = data.get(at + 8..at + 8 + len) else { break };
                    if crc32fast::hash(body) != crc {
                        break;
                    }
                    let Ok(e) = Event::decode(body) else { break };
                    last_seq = e.agent_seq;
                    if e.agent_seq > acked_seq {
                        queue.push_back((e, (len + 8) as u64));
                    }
                    at += 8 + len;
                }
                torn = at != data.len();
            } else if !data.is_empty() {
                warn!(path = %path.display(), "event spool has no valid header; starting a new one");
            }
        }
        if queue.is_empty() {
            spool_id = new_spool_id();
            last_seq = 0;
        }
        if torn {
            warn!(path = %path.display(), "event spool ended in a torn record (a crash mid-write); cut it off");
        }
        if !queue.is_empty() {
            info!(
                events = queue.len(),
                "events spooled by the previous run will be sent to the server"
            );
        }
        let records: Vec<Vec<u8>> = queue.iter().map(|(e, _)| record(e)).collect();
        let file = write_spool(&path, &spool_id, &records).map_err(io_err(&path))?;
        let bytes: u64 = queue.iter().map(|(_, n)| n).sum();
        metrics.spool_depth(queue.len(), bytes);
        Ok(Self {
            file: Mutex::new(file),
            inner: Mutex::new(Inner {
                spool_id,
                next_seq: last_seq + 1,
                file_len: HEADER_LEN + bytes,
                queue,
                bytes,
                unwritten: Vec::new(),
                acked_bytes: 0,
                dropped: BTreeMap::new(),
                dirty: false,
            }),
            dir: dir.to_owned(),
            max_bytes,
            enabled,
            agent_id,
            wake: Notify::new(),
            metrics,
            folds: Mutex::new(Folds::default()),
        })
    }

    /// Records an event: logs it, counts it, and spools it for the server;
    /// a refusal past its uid's share of the interval is only counted, to
    /// be recorded folded (see the module doc).
    pub fn emit(&self, e: Event) {
        let now = tokio::time::Instant::now();
        let admitted = {
            let mut folds = self.folds.lock().unwrap_or_else(|e| e.into_inner());
            folds.admit(&e, now)
        };
        if !admitted {
            // Still counted by the metrics, one by one.
            self.metrics.event(&e);
            self.metrics.refusal_folded();
            return;
        }
        self.metrics.event(&e);
        self.record(e);
    }

    /// Records the folded refusals of every interval that has ended.
    pub fn flush_folded(&self) {
        self.flush_folded_at(tokio::time::Instant::now());
    }

    fn flush_folded_at(&self, now: tokio::time::Instant) {
        let folded = self.folds.lock().unwrap_or_else(|e| e.into_inner()).flush(now);
        for e in folded {
            // Its refusals were counted by the metrics as they came.
            self.record(e);
        }
    }

    /// Logs and spools `e` (already counted by the metrics).
    fn record(&self, mut e: Event) {
        e.source = "agent".into();
        if e.agent_id.is_empty() {
            e.agent_id = self.agent_id.clone();
        }
        schema::log(&e);
        if !self.enabled {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.dropped.is_empty() && inner.bytes < self.max_bytes / 2 {
            // Room again: first say what was lost.
            let dropped = std::mem::take(&mut inner.dropped);
            let total: u64 = dropped.values().sum();
            let mut overflow = schema::event(kind::SPOOL_OVERFLOW, "").agent(self.agent_id.clone());
            overflow.source = "agent".into();
            overflow.reason = format!("event spool was full: {total} events were not recorded");
            overflow = overflow.attr("dropped", total);
            for (k, n) in &dropped {
                overflow = overflow.attr(&format!("dropped.{k}"), n);
            }
            schema::log(&overflow);
            self.metrics.event(&overflow);
            self.push_locked(&mut inner, overflow);
        }
        let size = e.encoded_len() as u64 + 8;
        if inner.bytes + size > self.max_bytes {
            *inner.dropped.entry(e.kind.clone()).or_insert(0) += 1;
            self.metrics.spool_dropped();
            return;
        }
        self.push_locked(&mut inner, e);
        drop(inner);
        self.wake.notify_one();
    }

    fn push_locked(&self, inner: &mut Inner, mut e: Event) {
        e.agent_seq = inner.next_seq;
        inner.next_seq += 1;
        let rec = record(&e);
        let size = rec.len() as u64;
        inner.unwritten.extend_from_slice(&rec);
        inner.file_len += size;
        inner.bytes += size;
        inner.queue.push_back((e, size));
        inner.dirty = true;
        self.metrics.spool_depth(inner.queue.len(), inner.bytes);
    }

    /// Writes and fsyncs what was spooled since the last call.
    pub(crate) fn sync(&self) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let data = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.dirty {
                return;
            }
            inner.dirty = false;
            std::mem::take(&mut inner.unwritten)
        };
        let result = file.write_all(&data).and_then(|()| file.sync_data());
        if let Err(e) = result {
            warn!(error = %e, "writing the event spool failed; events stay in memory");
        }
    }

    /// The oldest unacknowledged events, up to `n` and [`PUSH_BYTES`]
    /// (always at least one), and the spool ID.
    pub(crate) fn batch(&self, n: usize) -> (Vec<u8>, Vec<Event>) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = 0u64;
        let events = inner
            .queue
            .iter()
            .take(n)
            .take_while(|(_, size)| {
                bytes += size;
                bytes == *size || bytes <= PUSH_BYTES as u64
            })
            .map(|(e, _)| e.clone())
            .collect();
        (inner.spool_id.to_vec(), events)
    }

    /// The server stored events of `spool_id` up to `seq`.
    pub(crate) fn ack(&self, spool_id: &[u8], seq: u64) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.spool_id.as_slice() != spool_id {
            return;
        }
        while inner.queue.front().is_some_and(|(e, _)| e.agent_seq <= seq) {
            if let Some((_, size)) = inner.queue.pop_front() {
                inner.bytes -= size;
                inner.acked_bytes += size;
            }
        }
        self.metrics.spool_depth(inner.queue.len(), inner.bytes);
        let path = self.dir.join("events.spool");
        let acked_path = self.dir.join("events.acked");
        // Compact when most of the file is acknowledged: rewrite it with
        // what is left (a new spool ID when nothing is).
        if inner.acked_bytes > 64 * 1024 && inner.acked_bytes * 2 > inner.file_len {
            // Everything written so far goes first, so the rewrite is complete.
            let data = std::mem::take(&mut inner.unwritten);
            let _ = file.write_all(&data);
            if inner.queue.is_empty() {
                inner.spool_id = new_spool_id();
                inner.next_seq = 1;
            }
            let records: Vec<Vec<u8>> = inner.queue.iter().map(|(e, _)| record(e)).collect();
            match write_spool(&path, &inner.spool_id, &records) {
                Ok(new) => {
                    *file = new;
                    inner.file_len = HEADER_LEN + inner.bytes;
                    inner.acked_bytes = 0;
                }
                Err(e) => warn!(error = %e, "compacting the event spool failed"),
            }
            let _ = std::fs::remove_file(&acked_path);
            return;
        }
        // The owner's only, like every file of the data dir (an older one too).
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&acked_path)
            .and_then(|mut f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(format!("{} {seq}\n", hex::encode(inner.spool_id)).as_bytes())
            });
    }

    /// Events waiting for the server.
    pub fn depth(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).queue.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spool(dir: &Path, max_bytes: u64) -> EventSpool {
        EventSpool::open(
            dir,
            "spiffe://example.org/agent".into(),
            max_bytes,
            true,
            AgentMetrics::new(),
        )
        .unwrap()
    }

    fn fetch(n: u32) -> Event {
        schema::event(kind::WORKLOAD_X509, schema::ALLOW).attr("n", n)
    }

    fn queued(spool: &EventSpool) -> Vec<(u64, String)> {
        let inner = spool.inner.lock().unwrap();
        inner
            .queue
            .iter()
            .map(|(e, _)| {
                (e.agent_seq, e.attrs.first().map(|a| a.value.clone()).unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn spooled_events_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let first = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        for n in 0..3 {
            first.emit(fetch(n));
        }
        first.sync();
        let before = queued(&first);
        let spool_id = first.batch(1).0;
        drop(first);
        // A crash in the middle of the next record.
        let mut file =
            std::fs::OpenOptions::new().append(true).open(dir.path().join("events.spool")).unwrap();
        file.write_all(&[0, 0, 0, 40, 1, 2, 3]).unwrap();
        drop(file);
        let second = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        assert_eq!(queued(&second), before);
        assert_eq!(second.batch(1).0, spool_id, "the same spool continues");
        second.emit(fetch(3));
        assert_eq!(queued(&second).last().unwrap().0, 4, "sequence numbers continue");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("events.spool")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn acknowledged_events_are_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        for n in 0..5 {
            first.emit(fetch(n));
        }
        first.sync();
        let (spool_id, batch) = first.batch(PUSH_BATCH);
        assert_eq!(batch.len(), 5);
        first.ack(&spool_id, 3);
        assert_eq!(queued(&first).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("events.acked")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "events.acked is the owner's only");
        // An answer for another spool changes nothing.
        first.ack(&[9; 16], 5);
        assert_eq!(first.depth(), 2);
        drop(first);
        let second = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        assert_eq!(queued(&second).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
        let (id, _) = second.batch(1);
        second.ack(&id, 5);
        assert_eq!(second.depth(), 0);
        drop(second);
        // Nothing left: the next run starts a new spool from 1.
        let third = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        assert_ne!(third.batch(1).0, spool_id);
        third.emit(fetch(9));
        assert_eq!(queued(&third)[0].0, 1);
    }

    fn refused(uid: u32, n: u32) -> Event {
        schema::denied(kind::WORKLOAD_REFUSED, format!("refusal {n}"))
            .workload(tessera_proto::types::Workload { uid, ..Default::default() })
    }

    #[test]
    fn refusals_past_a_uids_share_are_folded_into_one_event_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        for n in 0..1000 {
            spool.emit(refused(65534, n));
        }
        // Another uid, and allowed events, are not held back by it.
        spool.emit(refused(1000, 0));
        spool.emit(fetch(0));
        assert_eq!(spool.depth() as u64, REFUSALS_PER_INTERVAL + 2);
        spool.flush_folded();
        assert_eq!(spool.depth() as u64, REFUSALS_PER_INTERVAL + 2, "the interval has not ended");
        spool.flush_folded_at(tokio::time::Instant::now() + FOLD_INTERVAL);
        let inner = spool.inner.lock().unwrap();
        let folded = &inner.queue.back().unwrap().0;
        let attr = |k: &str| folded.attrs.iter().find(|a| a.key == k).map(|a| a.value.clone());
        assert_eq!(attr("folded").as_deref(), Some("990"), "{folded:?}");
        assert_eq!(folded.workload.as_ref().unwrap().uid, 65534);
        assert_eq!(folded.kind, kind::WORKLOAD_REFUSED);
        assert!(folded.reason.contains("refusal 999"), "{}", folded.reason);
        assert_eq!(inner.queue.len() as u64, REFUSALS_PER_INTERVAL + 3);
        drop(inner);
    }

    #[test]
    fn a_full_spool_counts_what_it_drops_and_reports_it_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let size = record(&fetch(0)).len() as u64 + 40;
        let spool = spool(dir.path(), size * 4);
        for n in 0..10 {
            spool.emit(fetch(n));
        }
        let kept = spool.depth();
        assert!((3..=4).contains(&kept), "{kept} events kept");
        let (id, _) = spool.batch(PUSH_BATCH);
        spool.ack(&id, 100);
        spool.emit(fetch(10));
        let inner = spool.inner.lock().unwrap();
        let overflow = &inner.queue[0].0;
        assert_eq!(overflow.kind, kind::SPOOL_OVERFLOW);
        let dropped = 10 - kept;
        assert!(overflow.reason.contains(&format!("{dropped} events")), "{}", overflow.reason);
        assert!(overflow
            .attrs
            .iter()
            .any(|a| a.key == "dropped.workload.x509" && a.value == dropped.to_string()));
        assert_eq!(inner.queue[1].0.kind, kind::WORKLOAD_X509);
    }

    /// A fetch that serves hundreds of SVIDs names each: 500 such events are
    /// larger than the server decodes in one request. A push takes what fits
    /// in PUSH_BYTES (one event at least, however large), so the spool drains
    /// instead of retrying a refused push while it fills.
    #[test]
    fn a_push_batch_stays_under_the_byte_budget_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let spooled = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        let big = |n: u32, svids: usize| {
            let mut e = fetch(n);
            for i in 0..svids {
                e = e.spiffe_id(format!("spiffe://example.org/soak/{i}")).entry(format!("{i:036}"));
            }
            e.serial = (0..svids).map(|i| format!("{i:032x}")).collect::<Vec<_>>().join(",");
            e
        };
        for n in 0..500 {
            spooled.emit(big(n, 200));
        }
        let (_, batch) = spooled.batch(PUSH_BATCH);
        let bytes: usize = batch.iter().map(|e| e.encoded_len() + 8).sum();
        assert!(!batch.is_empty() && batch.len() < 500, "{} events", batch.len());
        assert!(bytes <= PUSH_BYTES, "{bytes} bytes in one push");
        let all: usize =
            spooled.inner.lock().unwrap().queue.iter().map(|(e, _)| e.encoded_len()).sum();
        assert!(
            all > tessera_common::rules::MAX_NODE_REQUEST_BYTES,
            "the test needs {all} > the limit"
        );

        let dir = tempfile::tempdir().unwrap();
        let alone = spool(dir.path(), DEFAULT_SPOOL_BYTES);
        alone.emit(big(0, 20_000));
        alone.emit(fetch(1));
        let (_, batch) = alone.batch(PUSH_BATCH);
        assert_eq!(batch.len(), 1, "an event past the budget goes alone");
    }
}
