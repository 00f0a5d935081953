//! The trust domain's event log: every decision about a workload identity,
//! from this server and from its agents, stored in order in the store's
//! database with a hash chain, so that an edited, removed or inserted
//! event is found by [`EventLog::verify`].
//!
//! Writes are in-order appends under the database's event lock (which
//! keeps the chain and the sequence gapless, across every server sharing a
//! PostgreSQL store: each append reads the chain's head under the lock). Events that answer an operator or acknowledge an
//! agent's batch are flushed to disk before the answer; the rest are
//! flushed by [`EventLog::flush_loop`] within [`FLUSH_INTERVAL`].
//!
//! Changes the store commits carry their events in the same commit: the
//! store calls this log's [`EventSink`] inside its transaction. What is
//! appended here on its own (refusals, which change nothing; CA rotations;
//! backups; agents' pushed events) is best-effort for refusals and durable
//! before the answer for the rest.
//!
//! The folder: `mod.rs` (the chain, appends, listing, verification,
//! pruning), `stored.rs` (an event's bytes in the database: deflated
//! when large), `ingest.rs` (agents' pushed events), `background.rs` (the
//! lower-priority thread that stores them), `anomaly.rs` (anomalies the
//! stream reveals). Depends on the store's key-value layer and types
//! and on metrics; the APIs and the server depend on it.

mod anomaly;
mod background;
mod ingest;
mod stored;

use anomaly::Bursts;
use stored::decode_row;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::admin::{ListEventsRequest, VerifyEventsReport};
use tessera_proto::types::Event;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::event_schema as schema;
use crate::metrics::Metrics;
use crate::store::kv::{Kv, Lock, Txn};
use crate::store::{EventSink, StoreError};

/// Work done in an event commit before the events are stored (it may drop some).
type InCommit<'f> = dyn Fn(&Txn<'_>, &mut Vec<Event>) -> Result<(), StoreError> + 'f;

/// How long an event that answers nobody may wait for its fsync.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Largest batch an agent may push at once.
pub const MAX_PUSH_EVENTS: usize = 2_000;

/// Event log settings.
#[derive(Debug, Clone)]
pub struct EventConfig {
    /// Store events (false: they are only logged, and no anomaly is
    /// learned; for measuring the cost).
    pub enabled: bool,
    /// Seconds an event is kept; 0: forever.
    pub retention_secs: u64,
    /// A JSON-lines file every stored event is appended to (for a SIEM).
    pub file: Option<PathBuf>,
    /// Refusals per minute from one (agent, uid), or from one agent, above
    /// which an `anomaly.refusal_burst` event is recorded.
    pub refusals_per_minute: u32,
}

impl Default for EventConfig {
    fn default() -> Self {
        Self { enabled: true, retention_secs: 30 * 24 * 3600, file: None, refusals_per_minute: 30 }
    }
}

const ANCHOR_KEY: &[u8] = b"anchor";
const EVENTS: &str = "events";
const META: &str = "event_meta";
const BASELINES: &str = "event_baselines";
/// Rows of events read from the database at a time (each holds one
/// event or up to `stored::ROW_MAX`).
const PAGE: usize = 256;
const SPOOL_PREFIX: &str = "spool/";

/// The chain's end: the next sequence number and the last hash.
#[derive(Debug)]
struct Head {
    next_seq: u64,
    hash: Vec<u8>,
}

/// The chain's head as stored: the last event, or the pruning anchor.
fn read_head(tx: &Txn<'_>) -> Result<Head, StoreError> {
    if let Some((key, value)) = tx.last(EVENTS)? {
        let seq = seq_of(&key);
        let (n, last) = stored::last_of_row(&value, seq)?;
        return Ok(Head { next_seq: seq + n, hash: last.hash });
    }
    Ok(match tx.get(META, ANCHOR_KEY)? {
        // Everything was pruned: the chain continues from the anchor.
        Some(anchor) if anchor.len() > 8 => {
            Head { next_seq: seq_of(&anchor[..8]) + 1, hash: anchor[8..].to_vec() }
        }
        _ => Head { next_seq: 1, hash: Vec::new() },
    })
}

/// Chains `events` after the head of the log and stores them in `tx`
/// (which holds the event lock).
fn chain(tx: &Txn<'_>, events: &mut [Event]) -> Result<(), StoreError> {
    let stored_ms = schema::now_ms();
    let head = read_head(tx)?;
    let (mut seq, mut hash) = (head.next_seq, head.hash);
    let mut plain = Vec::with_capacity(events.len());
    for e in events.iter_mut() {
        e.seq = seq;
        e.stored_ms = stored_ms;
        e.prev_hash = hash;
        plain.push(schema::seal(e));
        hash = e.hash.clone();
        seq += 1;
    }
    for (first, row) in stored::rows(events, plain) {
        tx.put(EVENTS, first.to_be_bytes(), row);
    }
    Ok(())
}

/// The store's commits chain their events here, in the same commit as the
/// change they describe.
impl EventSink for EventLog {
    fn chain_in(&self, tx: &Txn<'_>, events: Vec<Event>) -> Result<Vec<Event>, StoreError> {
        let mut events = self.prepare(events);
        if !self.config.enabled {
            return Ok(Vec::new());
        }
        chain(tx, &mut events)?;
        Ok(events)
    }

    fn committed(&self, stored: &[Event]) {
        EventLog::committed(self, stored);
    }
}

/// The event log.
pub struct EventLog {
    kv: Arc<dyn Kv>,
    /// The highest sequence this server stored.
    written: std::sync::atomic::AtomicU64,
    stored: watch::Sender<u64>,
    sink: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    dirty: AtomicBool,
    bursts: Mutex<Bursts>,
    /// Baseline values known to be stored (`anomaly.rs`).
    known: Mutex<anomaly::Known>,
    config: EventConfig,
    metrics: Metrics,
    /// Stores agents' pushes, below the request threads' priority.
    ingest: background::Background,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").field("kv", &self.kv).finish_non_exhaustive()
    }
}

fn seq_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl EventLog {
    /// Opens the log in the store's database.
    pub fn open(
        kv: Arc<dyn Kv>,
        config: EventConfig,
        metrics: Metrics,
    ) -> Result<Self, StoreError> {
        let mut head = Head { next_seq: 1, hash: Vec::new() };
        kv.transaction(Lock::Events, &mut |tx| {
            head = read_head(tx)?;
            Ok(())
        })?;
        let sink = match &config.file {
            Some(path) => {
                let file =
                    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(
                        |e| StoreError::Io(format!("event file {}: {e}", path.display())),
                    )?;
                Some(Mutex::new(std::io::BufWriter::new(file)))
            }
            None => None,
        };
        let last = head.next_seq - 1;
        Ok(Self {
            kv,
            written: std::sync::atomic::AtomicU64::new(last),
            stored: watch::channel(last).0,
            sink,
            dirty: AtomicBool::new(false),
            bursts: Mutex::new(Bursts::default()),
            known: Mutex::default(),
            config,
            metrics,
            ingest: background::Background::start(),
        })
    }

    /// The sequence number of the last stored event, updated on every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.stored.subscribe()
    }

    /// Records server events: logs each, stores it (with any anomaly it
    /// reveals) in the chain. Not yet fsynced: see [`Self::record_durable`].
    pub fn record(&self, events: Vec<Event>) {
        if let Err(e) = self.append(events) {
            error!(error = %e, "storing events failed");
        }
    }

    /// Records server events and waits until they are on disk.
    pub async fn record_durable(&self, events: Vec<Event>) {
        self.record(events);
        if self.config.enabled {
            if let Err(e) = self.flush().await {
                error!(error = %e, "flushing events failed");
            }
        }
    }

    /// Fsyncs the database, on a blocking thread. (sled's `flush_async`
    /// was seen to never resolve under concurrent callers.)
    async fn flush(&self) -> Result<(), StoreError> {
        let kv = self.kv.clone();
        tokio::task::spawn_blocking(move || kv.flush())
            .await
            .map_err(|e| StoreError::Io(format!("flush task failed: {e}")))??;
        Ok(())
    }

    /// Logs, chains and stores events, with the anomalies they reveal.
    fn append(&self, events: Vec<Event>) -> Result<(), StoreError> {
        self.append_with(events, &|_, _| Ok(())).map(drop)
    }

    /// [`Self::append`], with `also` run first in the same commit (it may
    /// drop events); returns how many were stored.
    fn append_with(&self, events: Vec<Event>, also: &InCommit) -> Result<usize, StoreError> {
        let all = self.prepare(events);
        if !self.config.enabled {
            return Ok(0);
        }
        let mut chained = Vec::new();
        self.kv.transaction(Lock::Events, &mut |tx| {
            let mut events = all.clone();
            also(tx, &mut events)?;
            chain(tx, &mut events)?;
            chained = events;
            Ok(())
        })?;
        self.committed(&chained);
        Ok(chained.len())
    }

    /// Logs and counts `events` and adds the anomalies they reveal.
    /// Events stay where they are (a signing batch's hundreds are not
    /// moved into a new list); the rare anomaly is put in after the event
    /// that revealed it.
    fn prepare(&self, mut events: Vec<Event>) -> Vec<Event> {
        let mut found: Vec<(usize, Vec<Event>)> = Vec::new();
        for (i, e) in events.iter_mut().enumerate() {
            if e.source.is_empty() {
                e.source = "server".into();
            }
            schema::log(e);
            // Anomalies are events: with the stream off (a cost
            // measurement) there is nothing to learn them for.
            if self.config.enabled {
                let anomalies = self.detect(e);
                if !anomalies.is_empty() {
                    anomalies.iter().for_each(schema::log);
                    found.push((i, anomalies));
                }
            }
        }
        if !found.is_empty() {
            let extra: usize = found.iter().map(|(_, a)| a.len()).sum();
            let mut all = Vec::with_capacity(events.len() + extra);
            let mut found = found.into_iter().peekable();
            for (i, e) in events.into_iter().enumerate() {
                all.push(e);
                while let Some((_, anomalies)) = found.next_if(|(at, _)| *at == i) {
                    all.extend(anomalies);
                }
            }
            events = all;
        }
        self.metrics.events(&events);
        events
    }

    /// After the commit that stored `chained`: the SIEM file, the metrics,
    /// and everyone waiting for the sequence.
    fn committed(&self, chained: &[Event]) {
        let Some(last) = chained.last().map(|e| e.seq) else { return };
        let removed = anomaly::removed_entries(chained);
        if !removed.is_empty() {
            self.known.lock().unwrap_or_else(|e| e.into_inner()).forget(&removed);
            // On the ingestion thread, in order with the pushes that learn
            // (outside the commit's locks; a crash before it leaves keys
            // that nothing reads again, not a wrong verdict).
            let kv = self.kv.clone();
            self.ingest.spawn(move || {
                if let Err(e) = anomaly::forget_entries(&*kv, &removed) {
                    warn!(error = %e, "forgetting deleted entries' baselines failed");
                }
            });
        }
        self.metrics.stored(chained.len());
        if let Some(sink) = &self.sink {
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            for e in chained {
                let _ = writeln!(sink, "{}", schema::to_json(e));
            }
        }
        self.written.fetch_max(last, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
        self.stored.send_if_modified(|current| {
            let newer = last > *current;
            if newer {
                *current = last;
            }
            newer
        });
    }

    /// Stored events matching `filter`, oldest first, after `after_seq`, at
    /// most `limit` (0: all). Returns them and the last sequence looked at.
    pub fn list(
        &self,
        filter: &ListEventsRequest,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<Event>, u64), StoreError> {
        let mut out = Vec::new();
        let mut last = after_seq;
        // The row holding the next event may start before it: the greatest
        // key at most `next`.
        let next = after_seq.saturating_add(1);
        let end = next.saturating_add(1).to_be_bytes();
        let mut from = match self.kv.range(EVENTS, &[], Some(&end), 1, true)?.pop() {
            Some((key, _)) => seq_of(&key),
            None => next,
        };
        loop {
            let page = self.kv.range(EVENTS, &from.to_be_bytes(), None, PAGE, false)?;
            let full = page.len() == PAGE;
            for (key, value) in page {
                let first = seq_of(&key);
                from = first + 1;
                for (seq, e) in (first..).zip(decode_row(&value, first)?) {
                    if seq <= after_seq {
                        continue;
                    }
                    last = seq;
                    if matches(filter, &e) {
                        out.push(e);
                        if limit != 0 && out.len() >= limit {
                            return Ok((out, last));
                        }
                    }
                }
            }
            if !full {
                return Ok((out, last));
            }
        }
    }

    /// Recomputes the chain: every event's hash, and each event's link to
    /// the one before (and the first to the pruning anchor).
    pub fn verify(&self) -> Result<VerifyEventsReport, StoreError> {
        let mut report = VerifyEventsReport { ok: true, ..Default::default() };
        let (expect_seq, mut prev) = match self.kv.get(META, ANCHOR_KEY)? {
            Some(anchor) if anchor.len() > 8 => (seq_of(&anchor[..8]) + 1, anchor[8..].to_vec()),
            _ => (1, Vec::new()),
        };
        let broken = |report: &mut VerifyEventsReport, seq: u64, problem: String| {
            if report.ok {
                report.ok = false;
                report.broken_at = seq;
                report.problem = problem;
            }
        };
        // None after a row that does not decode: how many it held is unknown.
        let mut expect = Some(expect_seq);
        let mut rows = self.pages();
        while let Some((key, value)) = rows.next().transpose()? {
            let first = seq_of(&key);
            if report.first_seq == 0 {
                report.first_seq = first;
            }
            if let Some(expect_seq) = expect.filter(|seq| *seq != first) {
                broken(
                    &mut report,
                    expect_seq,
                    format!("event {expect_seq} is missing (next stored is {first})"),
                );
            }
            let row = match decode_row(value.as_ref(), first) {
                Ok(row) => row,
                Err(err) => {
                    let why = match err {
                        StoreError::Corrupt { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    broken(&mut report, first, format!("event {first} cannot be decoded: {why}"));
                    (report.last_seq, report.checked) = (first, report.checked + 1);
                    (expect, prev) = (None, Vec::new());
                    continue;
                }
            };
            for (seq, e) in (first..).zip(row) {
                (report.last_seq, report.checked) = (seq, report.checked + 1);
                expect = Some(seq + 1);
                if e.seq != seq {
                    broken(&mut report, seq, format!("event {seq} says it is event {}", e.seq));
                }
                if e.prev_hash != prev {
                    broken(
                        &mut report,
                        seq,
                        format!(
                            "event {seq} does not follow the event before it (previous hash differs)"
                        ),
                    );
                }
                if schema::chain_hash(&e.prev_hash, &e) != e.hash {
                    broken(
                        &mut report,
                        seq,
                        format!("event {seq} was altered (its hash does not match its content)"),
                    );
                }
                prev = e.hash;
            }
        }
        let expect_seq = expect.unwrap_or(report.last_seq + 1);
        let written = self.written.load(Ordering::Acquire);
        if report.ok && written >= expect_seq {
            broken(
                &mut report,
                expect_seq,
                format!("the log ends at event {} but {written} were written", expect_seq - 1),
            );
        }
        report.head_hash = prev;
        Ok(report)
    }

    /// Every stored event, oldest first, read a page at a time.
    fn pages(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        let mut next = 0u64;
        let mut page = std::collections::VecDeque::new();
        let mut done = false;
        std::iter::from_fn(move || {
            if page.is_empty() && !done {
                match self.kv.range(EVENTS, &next.to_be_bytes(), None, PAGE, false) {
                    Ok(items) => {
                        done = items.len() < PAGE;
                        if let Some((key, _)) = items.last() {
                            next = seq_of(key) + 1;
                        }
                        page.extend(items);
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                }
            }
            page.pop_front().map(Ok)
        })
    }

    /// Drops events older than the retention, moving the chain's anchor to
    /// the last one dropped.
    pub fn prune(&self, now_ms: i64) -> Result<usize, StoreError> {
        if self.config.retention_secs == 0 {
            return Ok(0);
        }
        let cutoff = now_ms - (self.config.retention_secs as i64) * 1000;
        let mut dropped = 0;
        let mut anchor = None;
        let mut keys = Vec::new();
        let mut rows = self.pages();
        while let Some((key, value)) = rows.next().transpose()? {
            let first = seq_of(&key);
            // A commit's events share a row and its time: the last one says.
            let (n, last) = stored::last_of_row(&value, first)?;
            if last.stored_ms >= cutoff {
                break;
            }
            anchor = Some((first + n - 1, last.hash));
            dropped += n as usize;
            keys.push(key);
            if dropped >= 10_000 {
                break;
            }
        }
        if let Some((seq, hash)) = anchor {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&hash);
            self.kv.transaction(Lock::Events, &mut |tx| {
                tx.put(META, ANCHOR_KEY, value.clone());
                for key in &keys {
                    tx.forget(EVENTS, key.clone());
                }
                Ok(())
            })?;
            self.dirty.store(true, Ordering::Release);
        }
        Ok(dropped)
    }

    /// Flushes events that answered nobody, and the file sink, every
    /// [`FLUSH_INTERVAL`]; prunes by retention every minute.
    pub async fn flush_loop(&self, shutdown: CancellationToken) {
        let mut ticks = 0u64;
        loop {
            let stop = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
            };
            if self.dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = self.flush().await {
                    error!(error = %e, "flushing events failed");
                }
            }
            if let Some(sink) = &self.sink {
                let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = sink.flush() {
                    error!(error = %e, "writing the event file failed");
                }
            }
            ticks += 1;
            if ticks % 1200 == 1 {
                match self.prune(schema::now_ms()) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(events = n, "dropped events past their retention"),
                    Err(e) => error!(error = %e, "pruning events failed"),
                }
            }
            if stop {
                return;
            }
        }
    }
}

/// Whether `e` passes the request's filters.
pub fn matches(filter: &ListEventsRequest, e: &Event) -> bool {
    (filter.since_ms == 0 || e.time_ms >= filter.since_ms)
        && (filter.kind.is_empty()
            || e.kind == filter.kind
            || e.kind.starts_with(&format!("{}.", filter.kind)))
        && (filter.decision.is_empty() || e.decision == filter.decision)
        && (filter.agent_id.is_empty() || e.agent_id == filter.agent_id)
        && (filter.spiffe_id.is_empty() || e.spiffe_ids.contains(&filter.spiffe_id))
}

/// The event of an operator's entry change: before and after as JSON.
pub fn entry_json(entry: &tessera_proto::types::Entry) -> String {
    let selectors: Vec<String> =
        entry.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect();
    serde_json::json!({
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": selectors,
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "jwt_audiences": entry.jwt_audiences,
        "dns_names": entry.dns_names,
        "expires_at": entry.expires_at,
        "hint": entry.hint,
        "revision": entry.revision,
        "require_approval": entry.require_approval,
        "labels": entry.labels,
    })
    .to_string()
}

#[cfg(test)]
mod tests;
