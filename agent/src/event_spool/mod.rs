//! The agent's events (Workload API decisions): spooled durably in
//! `<data_dir>/events.spool` until the server has stored them (pushed in
//! batches by `node::event_push`). Nothing is dropped silently: when the
//! spool is full, new events are counted (by kind) instead of spooled, and
//! once there is room again an `agent.spool_overflow` event says how many
//! and which were lost.
//!
//! Workload API decisions are folded (`fold`): refusals past a uid's
//! share of an interval, and answers that repeat one already recorded, are
//! counted into one event when the interval ends, so how often a process
//! calls does not decide how much is spooled.
//!
//! Memory holds only where each unacknowledged record is (sequence number,
//! offset, length); a push reads its records back from the file (the page
//! cache, or the bytes not yet written). A full spool costs disk, not RSS.
//!
//! Spool file: a header (`TSPOOL1\n` and a 16-byte spool ID), then records
//! of `[u32 length][u32 crc32][Event protobuf]`. A torn record at the end
//! (a crash mid-write) is cut off when the spool is opened. What the
//! server acknowledged is in `events.acked`; resending an acknowledged
//! event is harmless (the server skips sequence numbers it has).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use tessera_proto::types::Event;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::event_schema::{self as schema, kind, EventExt};
use crate::metrics::AgentMetrics;

mod fold;
#[cfg(test)]
mod tests;

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

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("event spool {path}: {source}")]
pub struct SpoolError {
    path: String,
    source: std::io::Error,
}

/// Events for one push.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The spool they belong to.
    pub spool_id: Vec<u8>,
    /// The events, in order.
    pub events: Vec<Event>,
    /// The last damaged record skipped, if any: given up (acknowledged
    /// locally) when nothing after it is pushed, so that it cannot hold
    /// the spool back.
    pub damaged: Option<u64>,
}

/// Where one unacknowledged record is.
#[derive(Debug, Clone, Copy)]
struct Queued {
    seq: u64,
    /// Offset of the record in the file (or, past what is written, in
    /// `Inner::unwritten`).
    offset: u64,
    /// The record's length: 8 bytes of length and CRC, then the event.
    len: u64,
}

#[derive(Debug)]
struct Inner {
    spool_id: [u8; 16],
    next_seq: u64,
    /// Records not yet acknowledged, oldest first: they are the file's
    /// last `bytes` bytes (the tail of which may still be `unwritten`).
    queue: VecDeque<Queued>,
    /// Length of `queue`'s records.
    bytes: u64,
    /// Records not yet written to the file: its last bytes.
    unwritten: Vec<u8>,
    /// Bytes in the file (header included), written or not.
    file_len: u64,
    /// Bytes of acknowledged records at the file's start (after the header).
    acked_bytes: u64,
    /// Events refused while the spool was full, by kind.
    dropped: BTreeMap<String, u64>,
}

impl Inner {
    /// Bytes of the file that are written (the rest is `unwritten`).
    fn written(&self) -> u64 {
        self.file_len - self.unwritten.len() as u64
    }
}

/// The agent's event spool.
#[derive(Debug)]
pub struct EventSpool {
    /// The spool file, open for reading and appending. Taken before
    /// `inner` when both are needed; writes, fsyncs and reads of records
    /// hold only this, so callers of [`Self::emit`] never wait for the
    /// disk. While it is held, what is written cannot change.
    file: Mutex<std::fs::File>,
    inner: Mutex<Inner>,
    dir: PathBuf,
    max_bytes: u64,
    enabled: bool,
    agent_id: String,
    /// Notified when an event is spooled.
    pub(crate) wake: Notify,
    pub(crate) metrics: AgentMetrics,
    folds: Mutex<fold::Folds>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError { path: path.display().to_string(), source }
}

fn new_spool_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    id
}

/// `[u32 length][u32 crc32][event]`.
fn record(e: &Event) -> Vec<u8> {
    let body = e.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The event of a whole record, when its length and CRC hold.
fn decode_record(record: &[u8]) -> Option<Event> {
    let (head, body) = record.split_at_checked(8)?;
    let len = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(head[4..].try_into().ok()?);
    if body.len() != len || crc32fast::hash(body) != crc {
        return None;
    }
    Event::decode(body).ok()
}

/// What [`read_record`] found.
enum Found {
    /// A whole record and its event.
    Record(Vec<u8>, Box<Event>),
    /// A whole record (its length held) whose CRC or event does not: it is
    /// skipped, and reading goes on after it. Its length.
    Damaged(u64),
    /// The end of the file, or a record cut short (a torn write).
    End,
}

/// The next record of `input`; an error only when the file cannot be read.
fn read_record(input: &mut impl BufRead) -> std::io::Result<Found> {
    let mut head = [0u8; 8];
    match input.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Found::End),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64;
    let mut record = head.to_vec();
    input.take(len).read_to_end(&mut record)?;
    if record.len() as u64 != 8 + len {
        return Ok(Found::End);
    }
    // A record is never empty and is numbered from 1: zeros are not a record.
    Ok(match decode_record(&record).filter(|e| len > 0 && e.agent_seq > 0) {
        Some(e) => Found::Record(record, Box::new(e)),
        None => Found::Damaged(record.len() as u64),
    })
}

/// Creates `path`'s replacement beside it (`.spool.tmp`) with the header
/// and nothing else, ready for records to be appended.
fn new_spool_file(path: &Path, spool_id: &[u8; 16]) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("spool.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(MAGIC)?;
    file.write_all(spool_id)?;
    Ok((tmp, file))
}

/// Makes the replacement `tmp` the spool at `path`, durably.
fn install_spool(
    tmp: &Path,
    mut file: std::fs::File,
    path: &Path,
) -> std::io::Result<std::fs::File> {
    file.sync_data()?;
    std::fs::rename(tmp, path)?;
    file.seek(std::io::SeekFrom::End(0))?;
    Ok(file)
}

impl EventSpool {
    /// Opens (or creates) the spool in `dir`: events a previous run left
    /// unacknowledged are sent first. The file is read one record at a
    /// time and rewritten with those events only.
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
        let old_len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let mut old = std::fs::File::open(&path).ok().map(std::io::BufReader::new);
        let mut spool_id = new_spool_id();
        let mut header = [0u8; HEADER_LEN as usize];
        let mut had_header = false;
        if let Some(input) = old.as_mut() {
            match input.read_exact(&mut header) {
                Ok(()) if header.starts_with(MAGIC) => {
                    spool_id.copy_from_slice(&header[8..]);
                    had_header = true;
                }
                _ if old_len > 0 => {
                    warn!(path = %path.display(), "event spool has no valid header; starting a new one");
                }
                _ => {}
            }
        }
        let acked_seq = match &acked {
            Some((id, seq)) if had_header && *id == hex::encode(spool_id) => *seq,
            _ => 0,
        };
        let (tmp, mut file) = new_spool_file(&path, &spool_id).map_err(io_err(&path))?;
        let mut queue = VecDeque::new();
        let (mut last_seq, mut offset, mut read, mut damaged) = (0, HEADER_LEN, HEADER_LEN, 0u64);
        if let Some(input) = old.as_mut().filter(|_| had_header) {
            loop {
                let (record, e) = match read_record(input).map_err(io_err(&path))? {
                    Found::Record(record, e) => (record, e),
                    Found::Damaged(len) => {
                        read += len;
                        damaged += 1;
                        continue;
                    }
                    Found::End => break,
                };
                read += record.len() as u64;
                last_seq = last_seq.max(e.agent_seq);
                if e.agent_seq > acked_seq {
                    file.write_all(&record).map_err(io_err(&path))?;
                    let len = record.len() as u64;
                    queue.push_back(Queued { seq: e.agent_seq, offset, len });
                    offset += len;
                }
            }
        }
        let torn = had_header && read != old_len;
        if queue.is_empty() && had_header {
            // Everything was acknowledged: a new spool, numbered from 1.
            spool_id = new_spool_id();
            file.seek(std::io::SeekFrom::Start(8)).map_err(io_err(&path))?;
            file.write_all(&spool_id).map_err(io_err(&path))?;
            last_seq = 0;
        }
        if torn {
            warn!(path = %path.display(), "event spool ended in a torn record (a crash mid-write); cut it off");
        }
        if damaged > 0 {
            warn!(path = %path.display(), damaged, "damaged records in the event spool were dropped");
            metrics.spool_dropped_n(damaged);
        }
        if !queue.is_empty() {
            info!(
                events = queue.len(),
                "events spooled by the previous run will be sent to the server"
            );
        }
        let file = install_spool(&tmp, file, &path).map_err(io_err(&path))?;
        let bytes = offset - HEADER_LEN;
        metrics.spool_depth(queue.len(), bytes);
        Ok(Self {
            file: Mutex::new(file),
            inner: Mutex::new(Inner {
                spool_id,
                next_seq: last_seq + 1,
                file_len: offset,
                queue,
                bytes,
                unwritten: Vec::new(),
                acked_bytes: 0,
                dropped: BTreeMap::new(),
            }),
            dir: dir.to_owned(),
            max_bytes,
            enabled,
            agent_id,
            wake: Notify::new(),
            metrics,
            folds: Mutex::new(fold::Folds::default()),
        })
    }

    /// Records an event: logs it, counts it, and spools it for the server;
    /// a refusal past its uid's share of the interval, or an answer that
    /// repeats one already recorded, is only counted, to be recorded
    /// folded (see `fold`).
    pub fn emit(&self, e: Event) {
        self.metrics.event(&e);
        let now = tokio::time::Instant::now();
        let refusal = e.decision == schema::DENY;
        let admitted = self.folds.lock().unwrap_or_else(|e| e.into_inner()).admit(e, now);
        match admitted {
            Some(e) => self.record(e),
            // Still counted by the metrics, one by one.
            None if refusal => self.metrics.refusal_folded(),
            None => self.metrics.repeat_folded(),
        }
    }

    /// Records the folded events of every interval that has ended.
    pub fn flush_folded(&self) {
        self.flush_folded_at(tokio::time::Instant::now(), false);
    }

    /// Records the folded events of every interval, ended or not: the
    /// agent is stopping, and the counts live only in memory.
    pub fn flush_all_folded(&self) {
        self.flush_folded_at(tokio::time::Instant::now(), true);
    }

    fn flush_folded_at(&self, now: tokio::time::Instant, all: bool) {
        let folded = self.folds.lock().unwrap_or_else(|e| e.into_inner()).flush(now, all);
        for e in folded {
            // Its calls were counted by the metrics as they came.
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
        let len = rec.len() as u64;
        inner.unwritten.extend_from_slice(&rec);
        inner.queue.push_back(Queued { seq: e.agent_seq, offset: inner.file_len, len });
        inner.file_len += len;
        inner.bytes += len;
        self.metrics.spool_depth(inner.queue.len(), inner.bytes);
    }

    /// Writes and fsyncs what was spooled since the last call, then wakes
    /// the pusher: only records on disk are pushed, so a sequence number
    /// the server has stored is never given again after a crash.
    pub(crate) fn sync(&self) {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        match self.write_unwritten(&file) {
            Ok(false) => {}
            Ok(true) => match file.sync_data() {
                Ok(()) => self.wake.notify_one(),
                Err(e) => warn!(error = %e, "fsyncing the event spool failed; retrying"),
            },
            Err(e) => {
                warn!(error = %e, "writing the event spool failed; its events stay in memory")
            }
        }
    }

    /// Writes the bytes not written yet at the end of `file` (whose lock
    /// the caller holds); false when there were none. On an error nothing
    /// moved: a partial write is cut off and the bytes stay unwritten.
    fn write_unwritten(&self, file: &std::fs::File) -> std::io::Result<bool> {
        let (data, at) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.unwritten.is_empty() {
                return Ok(false);
            }
            let at = inner.written();
            (std::mem::take(&mut inner.unwritten), at)
        };
        if let Err(e) = file.write_all_at(&data, at) {
            let _ = file.set_len(at);
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let newer = std::mem::replace(&mut inner.unwritten, data);
            inner.unwritten.extend_from_slice(&newer);
            return Err(e);
        }
        Ok(true)
    }

    /// The oldest unacknowledged events on disk, up to `n` and
    /// [`PUSH_BYTES`] (at least one when there is one). Reads the file:
    /// call it from a blocking thread.
    pub(crate) fn batch(&self, n: usize) -> Batch {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (spool_id, picked) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let written = inner.written();
            let mut bytes = 0u64;
            let picked: Vec<Queued> = inner
                .queue
                .iter()
                .take_while(|q| q.offset + q.len <= written)
                .take(n)
                .take_while(|q| {
                    bytes += q.len;
                    bytes == q.len || bytes <= PUSH_BYTES as u64
                })
                .copied()
                .collect();
            (inner.spool_id.to_vec(), picked)
        };
        // What is written cannot change while the file lock is held.
        let mut batch = Batch { spool_id, events: Vec::with_capacity(picked.len()), damaged: None };
        let mut buf = Vec::new();
        for q in &picked {
            buf.resize(q.len as usize, 0);
            if let Err(e) = file.read_exact_at(&mut buf, q.offset) {
                warn!(error = %e, "cannot read the event spool; retrying later");
                break;
            }
            match decode_record(&buf) {
                Some(e) if e.agent_seq == q.seq => batch.events.push(e),
                _ => {
                    warn!(seq = q.seq, "an event in the spool is damaged; dropping it");
                    self.metrics.spool_dropped();
                    batch.damaged = Some(q.seq);
                }
            }
        }
        batch
    }

    /// The server stored events of `spool_id` up to `seq` (or they were
    /// damaged, and are given up). Compacts the file when most of it is
    /// acknowledged: its unacknowledged tail is copied into a new file
    /// while events go on being spooled. Call it from a blocking thread.
    pub(crate) fn ack(&self, spool_id: &[u8], seq: u64) {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let compact = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.spool_id.as_slice() != spool_id {
                return;
            }
            while inner.queue.front().is_some_and(|q| q.seq <= seq) {
                if let Some(q) = inner.queue.pop_front() {
                    inner.bytes -= q.len;
                    inner.acked_bytes += q.len;
                }
            }
            self.metrics.spool_depth(inner.queue.len(), inner.bytes);
            inner.acked_bytes > 64 * 1024 && inner.acked_bytes * 2 > inner.file_len
        };
        self.write_acked(spool_id, seq);
        if compact {
            self.compact(file);
        }
    }

    /// Records in `events.acked` that the server has `spool_id` up to `seq`.
    fn write_acked(&self, spool_id: &[u8], seq: u64) {
        // The owner's only, like every file of the data dir (an older one too).
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.dir.join("events.acked"))
            .and_then(|mut f| {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                f.write_all(format!("{} {seq}\n", hex::encode(spool_id)).as_bytes())
            });
    }

    /// Replaces the file with its unacknowledged records. Only the file
    /// lock is held while the disk works; the spool ID and its numbering
    /// go on (the server skips only sequence numbers it has).
    fn compact(&self, mut file: std::sync::MutexGuard<'_, std::fs::File>) {
        let path = self.dir.join("events.spool");
        // Everything so far goes into the old file first; then the copy
        // reads only the file.
        if let Err(e) = self.write_unwritten(&file) {
            warn!(error = %e, "compacting the event spool failed");
            return;
        }
        let (spool_id, from, to) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let to = inner.written();
            (inner.spool_id, inner.queue.front().map_or(to, |q| q.offset), to)
        };
        match copy_tail(&file, &path, &spool_id, from, to) {
            Ok(new) => {
                *file = new;
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let shift = from - HEADER_LEN;
                for q in inner.queue.iter_mut() {
                    q.offset -= shift;
                }
                inner.file_len -= shift;
                inner.acked_bytes = 0;
                drop(inner);
                // Every record in the new file is unacknowledged.
                let _ = std::fs::remove_file(self.dir.join("events.acked"));
            }
            Err(e) => {
                let _ = std::fs::remove_file(path.with_extension("spool.tmp"));
                // Tried again once as many bytes again are acknowledged.
                self.inner.lock().unwrap_or_else(|e| e.into_inner()).acked_bytes = 0;
                warn!(error = %e, "compacting the event spool failed");
            }
        }
    }

    /// Events waiting for the server.
    pub fn depth(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).queue.len()
    }
}

/// A new spool file at `path`: the header for `spool_id`, then bytes
/// `from..to` of `old` (its unacknowledged records), copied in pieces.
fn copy_tail(
    old: &std::fs::File,
    path: &Path,
    spool_id: &[u8; 16],
    from: u64,
    to: u64,
) -> std::io::Result<std::fs::File> {
    let (tmp, mut new) = new_spool_file(path, spool_id)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = buf.len().min((to - at) as usize);
        old.read_exact_at(&mut buf[..n], at)?;
        new.write_all(&buf[..n])?;
        at += n as u64;
    }
    install_spool(&tmp, new, path)
}
