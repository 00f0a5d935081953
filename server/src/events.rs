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

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tessera_proto::admin::{ListEventsRequest, VerifyEventsReport};
use tessera_proto::types::Event;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::event_schema::{self as schema, kind, EventExt};
use crate::metrics::Metrics;
use crate::store::kv::{Kv, Lock, Op, Txn};
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
    /// Store events (false: they are only logged; for measuring the cost).
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
/// Events read from the database at a time.
const PAGE: usize = 1000;
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
        return Ok(Head { next_seq: seq + 1, hash: decode(&value, seq)?.hash });
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
    for e in events.iter_mut() {
        e.seq = seq;
        e.stored_ms = stored_ms;
        e.prev_hash = hash;
        e.hash = schema::chain_hash(&e.prev_hash, e);
        hash = e.hash.clone();
        tx.put(EVENTS, seq.to_be_bytes(), e.encode_to_vec());
        seq += 1;
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

/// Refusal counts in the current minute, per key, and whether the burst
/// was reported.
#[derive(Debug, Default)]
struct Bursts {
    minute: i64,
    counts: HashMap<String, (u32, bool)>,
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
    config: EventConfig,
    metrics: Metrics,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").field("kv", &self.kv).finish_non_exhaustive()
    }
}

fn decode(bytes: &[u8], seq: u64) -> Result<Event, StoreError> {
    Event::decode(bytes)
        .map_err(|e| StoreError::Corrupt { key: format!("event {seq}"), reason: e.to_string() })
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
            config,
            metrics,
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

    /// Stores an agent's pushed events (those after what was already stored
    /// from the same spool), fsynced, and returns the spool position stored.
    /// The CPU work runs on a blocking thread, off the async workers.
    pub async fn ingest(
        self: &Arc<Self>,
        agent_id: &str,
        spool_id: &[u8],
        events: Vec<Event>,
    ) -> Result<u64, StoreError> {
        let (log, agent_id, spool_id) = (self.clone(), agent_id.to_string(), spool_id.to_vec());
        let acked =
            tokio::task::spawn_blocking(move || log.store_pushed(&agent_id, &spool_id, events))
                .await
                .map_err(|e| StoreError::Io(format!("event ingestion task failed: {e}")))??;
        self.flush().await?;
        Ok(acked)
    }

    fn store_pushed(
        &self,
        agent_id: &str,
        spool_id: &[u8],
        events: Vec<Event>,
    ) -> Result<u64, StoreError> {
        let key = format!("{SPOOL_PREFIX}{agent_id}");
        let position_of = |position: Option<Vec<u8>>| match position {
            Some(p) if p.len() == spool_id.len() + 8 && &p[8..] == spool_id => seq_of(&p[..8]),
            _ => 0,
        };
        let mut acked = position_of(self.kv.get(META, key.as_bytes())?);
        let mut fresh = Vec::new();
        for mut e in events {
            if e.agent_seq <= acked {
                continue; // a retry of a batch whose answer was lost
            }
            acked = e.agent_seq;
            // The sender is the authenticated agent, whatever the event says,
            // and it reports only its own kinds of decision.
            e.agent_id = agent_id.to_string();
            e.source = "agent".into();
            if !(e.kind.starts_with("workload.") || e.kind.starts_with("agent.")) {
                let claimed = std::mem::replace(&mut e.kind, "agent.unknown".into());
                e = e.attr("claimed_kind", claimed);
            }
            e.operator = None;
            e.seq = 0;
            e.hash.clear();
            e.prev_hash.clear();
            fresh.push(e);
        }
        let mut position = acked.to_be_bytes().to_vec();
        position.extend_from_slice(spool_id);
        let count = fresh.len();
        // The position is stored with the events, in one commit; a batch
        // another server stored meanwhile (an agent that failed over) is
        // not stored twice.
        let stored = self.append_with(fresh, &|tx, events| {
            let now = position_of(tx.get(META, key.as_bytes())?);
            events.retain(|e| e.agent_seq == 0 || e.agent_seq > now);
            tx.put(META, key.as_bytes(), position.clone());
            Ok(())
        })?;
        if count > 0 {
            self.metrics.events_ingested().inc_by(stored as u64);
        }
        Ok(acked)
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
    fn prepare(&self, events: Vec<Event>) -> Vec<Event> {
        let mut all = Vec::with_capacity(events.len());
        for mut e in events {
            if e.source.is_empty() {
                e.source = "server".into();
            }
            schema::log(&e);
            self.metrics.event(&e);
            let anomalies = self.detect(&e);
            all.push(e);
            for a in anomalies {
                schema::log(&a);
                self.metrics.event(&a);
                all.push(a);
            }
        }
        all
    }

    /// After the commit that stored `chained`: the SIEM file, the metrics,
    /// and everyone waiting for the sequence.
    fn committed(&self, chained: &[Event]) {
        let Some(last) = chained.last().map(|e| e.seq) else { return };
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

    /// Anomalies `e` reveals, updating what is usual.
    fn detect(&self, e: &Event) -> Vec<Event> {
        let mut found = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            if e.decision == schema::DENY {
                self.count_refusal(e, &mut found);
            }
            if e.decision != schema::ALLOW {
                return Ok(());
            }
            let exe = e.workload.as_ref().map(|w| w.sha256.as_str()).unwrap_or("");
            if (e.kind == kind::WORKLOAD_X509 || e.kind == kind::WORKLOAD_JWT) && !exe.is_empty() {
                for entry in &e.entry_ids {
                    if self.learn(&format!("exe/{entry}/"), exe)? {
                        let mut a = schema::event(kind::ANOMALY_NEW_EXECUTABLE, "")
                            .agent(e.agent_id.clone())
                            .entry(entry.clone())
                            .attr("sha256", exe)
                            .attr(
                                "reason",
                                "identity served to an executable never seen before for this entry",
                            );
                        a.spiffe_ids = e.spiffe_ids.clone();
                        a.workload = e.workload.clone();
                        found.push(a);
                    }
                }
            }
            if e.kind == kind::JWT_ISSUE {
                for entry in &e.entry_ids {
                    for aud in &e.audience {
                        if self.learn(&format!("aud/{entry}/"), aud)? {
                            let mut a = schema::event(kind::ANOMALY_UNUSUAL_AUDIENCE, "")
                                .agent(e.agent_id.clone())
                                .entry(entry.clone())
                                .attr(
                                    "reason",
                                    "JWT-SVID for an audience outside the entry's usual set",
                                );
                            a.spiffe_ids = e.spiffe_ids.clone();
                            a.audience = vec![aud.clone()];
                            found.push(a);
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(err) = result {
            warn!(error = %err, "anomaly detection failed");
        }
        found
    }

    /// Remembers `value` under `prefix`; true when it is new and the prefix
    /// already had a value (the first one seen sets the baseline).
    fn learn(&self, prefix: &str, value: &str) -> Result<bool, StoreError> {
        let key = format!("{prefix}{value}");
        if self.kv.get(BASELINES, key.as_bytes())?.is_some() {
            return Ok(false);
        }
        let end = crate::store::kv::prefix_end(prefix.as_bytes());
        let known =
            !self.kv.range(BASELINES, prefix.as_bytes(), end.as_deref(), 1, false)?.is_empty();
        self.kv.apply(vec![Op::Put(BASELINES, key.into_bytes(), Vec::new())])?;
        Ok(known)
    }

    fn count_refusal(&self, e: &Event, found: &mut Vec<Event>) {
        let limit = self.config.refusals_per_minute;
        if limit == 0 || e.agent_id.is_empty() {
            return;
        }
        let minute = e.time_ms.div_euclid(60_000);
        let mut bursts = self.bursts.lock().unwrap_or_else(|e| e.into_inner());
        if bursts.minute != minute {
            bursts.minute = minute;
            bursts.counts.clear();
        }
        let mut keys = vec![(format!("agent {}", e.agent_id), None)];
        if let Some(w) = &e.workload {
            keys.push((format!("agent {} uid {}", e.agent_id, w.uid), Some(w.uid)));
        }
        // An agent folds a uid's excess refusals into one event that says
        // how many it stands for (`folded`): each counts.
        let weight = e
            .attrs
            .iter()
            .find(|a| a.key == "folded")
            .and_then(|a| a.value.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        for (key, uid) in keys {
            let (count, reported) = bursts.counts.entry(key).or_insert((0, false));
            *count = count.saturating_add(weight);
            if *count > limit && !*reported {
                *reported = true;
                let mut a = schema::event(kind::ANOMALY_REFUSAL_BURST, "")
                    .agent(e.agent_id.clone())
                    .attr("refusals_per_minute", *count)
                    .attr("limit", limit)
                    .attr("reason", "refusals above the configured rate");
                if let Some(uid) = uid {
                    a = a.attr("uid", uid);
                    a.workload = e.workload.clone();
                }
                found.push(a);
            }
        }
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
        loop {
            let page = self.kv.range(EVENTS, &(last + 1).to_be_bytes(), None, PAGE, false)?;
            let full = page.len() == PAGE;
            for (key, value) in page {
                last = seq_of(&key);
                let e = decode(&value, last)?;
                if matches(filter, &e) {
                    out.push(e);
                    if limit != 0 && out.len() >= limit {
                        return Ok((out, last));
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
        let (mut expect_seq, mut prev) = match self.kv.get(META, ANCHOR_KEY)? {
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
        let mut events = self.pages();
        while let Some((key, value)) = events.next().transpose()? {
            let seq = seq_of(&key);
            if report.first_seq == 0 {
                report.first_seq = seq;
            }
            report.last_seq = seq;
            report.checked += 1;
            if seq != expect_seq {
                broken(
                    &mut report,
                    expect_seq,
                    format!("event {expect_seq} is missing (next stored is {seq})"),
                );
            }
            expect_seq = seq + 1;
            let e = match Event::decode(value.as_ref()) {
                Ok(e) => e,
                Err(err) => {
                    broken(&mut report, seq, format!("event {seq} cannot be decoded: {err}"));
                    prev = Vec::new();
                    continue;
                }
            };
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
        let mut events = self.pages();
        while let Some((key, value)) = events.next().transpose()? {
            let seq = seq_of(&key);
            let e = decode(&value, seq)?;
            if e.stored_ms >= cutoff {
                break;
            }
            anchor = Some((seq, e.hash));
            dropped += 1;
            if dropped >= 10_000 {
                break;
            }
        }
        if let Some((seq, hash)) = anchor {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&hash);
            let old =
                self.kv.range(EVENTS, b"", Some(&(seq + 1).to_be_bytes()), usize::MAX, false)?;
            self.kv.transaction(Lock::Events, &mut |tx| {
                tx.put(META, ANCHOR_KEY, value.clone());
                for (key, _) in &old {
                    tx.delete(EVENTS, key)?;
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
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_proto::types::Workload;

    fn log(dir: &std::path::Path, config: EventConfig) -> EventLog {
        let kv = Arc::new(crate::store::sled::SledKv::open(dir, 1 << 24).unwrap());
        EventLog::open(kv, config, Metrics::new()).unwrap()
    }

    fn all(log: &EventLog) -> Vec<Event> {
        log.list(&ListEventsRequest::default(), 0, 0).unwrap().0
    }

    fn served(exe: &str, uid: u32) -> Event {
        schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .agent("spiffe://example.org/agent")
            .entry("entry-1")
            .workload(Workload { uid, sha256: exe.into(), ..Default::default() })
    }

    #[tokio::test]
    async fn pushed_events_are_stored_once_and_attributed_to_their_agent() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(log(dir.path(), EventConfig::default()));
        let batch = |from: u64, to: u64| -> Vec<Event> {
            (from..=to)
                .map(|seq| {
                    let mut e = served("aa", 1).agent("spiffe://example.org/someone-else");
                    e.agent_seq = seq;
                    e
                })
                .collect()
        };
        let agent = "spiffe://example.org/agent";
        assert_eq!(log.ingest(agent, b"spool-1", batch(1, 3)).await.unwrap(), 3);
        // The answer was lost: the agent sends 1..3 again, and 4.
        assert_eq!(log.ingest(agent, b"spool-1", batch(1, 4)).await.unwrap(), 4);
        // A new spool starts from 1 again.
        assert_eq!(log.ingest(agent, b"spool-2", batch(1, 1)).await.unwrap(), 1);
        let mut forged = schema::event(kind::ENTRY_CREATE, schema::ALLOW);
        forged.agent_seq = 2;
        log.ingest(agent, b"spool-2", vec![forged]).await.unwrap();
        let events = all(&log);
        let pushed: Vec<&Event> = events.iter().filter(|e| e.source == "agent").collect();
        assert_eq!(pushed.len(), 6, "each event once");
        assert!(
            pushed.iter().all(|e| e.agent_id == agent),
            "attributed to the authenticated agent"
        );
        let last = pushed.last().unwrap();
        assert_eq!(last.kind, "agent.unknown", "an agent cannot report admin decisions");
        assert!(last
            .attrs
            .iter()
            .any(|a| a.key == "claimed_kind" && a.value == kind::ENTRY_CREATE));
        assert!(log.verify().unwrap().ok);
    }

    #[test]
    fn anomalies_are_recorded_as_their_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let config = EventConfig { refusals_per_minute: 3, ..Default::default() };
        let log = log(dir.path(), config);
        // The first executable is the baseline; a second one is an anomaly, once.
        log.record(vec![served("aa", 1), served("aa", 1), served("bb", 1), served("bb", 1)]);
        // The first audience is the baseline; a new one is an anomaly.
        let jwt = |aud: &str| {
            let mut e = schema::event(kind::JWT_ISSUE, schema::ALLOW).agent("a").entry("entry-1");
            e.audience = vec![aud.into()];
            e
        };
        log.record(vec![jwt("api"), jwt("api"), jwt("other")]);
        // Four refusals in a minute from one uid, limit 3: one burst per key.
        let refused = || {
            let mut e = schema::denied(kind::WORKLOAD_X509, "no identity issued").agent("a");
            e.workload = Some(Workload { uid: 7, ..Default::default() });
            e.time_ms = 60_000 * 1000 + 5;
            e
        };
        log.record((0..6).map(|_| refused()).collect());
        let events = all(&log);
        let of = |k: &str| events.iter().filter(|e| e.kind == k).collect::<Vec<_>>();
        let exe = of(kind::ANOMALY_NEW_EXECUTABLE);
        assert_eq!(exe.len(), 1);
        assert!(exe[0].attrs.iter().any(|a| a.key == "sha256" && a.value == "bb"));
        let aud = of(kind::ANOMALY_UNUSUAL_AUDIENCE);
        assert_eq!(aud.len(), 1);
        assert_eq!(aud[0].audience, vec!["other".to_string()]);
        let bursts = of(kind::ANOMALY_REFUSAL_BURST);
        assert_eq!(bursts.len(), 2, "one for the agent, one for the uid: {bursts:?}");
        assert!(bursts.iter().any(|b| b.attrs.iter().any(|a| a.key == "uid" && a.value == "7")));
        assert!(log.verify().unwrap().ok);
    }

    /// An agent folds a uid's excess refusals into one event with
    /// `folded=N`: the burst detector counts it as N.
    #[test]
    fn a_folded_refusal_counts_as_many_for_the_burst_detector() {
        let dir = tempfile::tempdir().unwrap();
        let config = EventConfig { refusals_per_minute: 30, ..Default::default() };
        let log = log(dir.path(), config);
        let mut folded = schema::denied(kind::WORKLOAD_X509, "no identity issued")
            .agent("a")
            .attr("folded", 4990);
        folded.workload = Some(Workload { uid: 65534, ..Default::default() });
        log.record(vec![folded]);
        let bursts =
            all(&log).into_iter().filter(|e| e.kind == kind::ANOMALY_REFUSAL_BURST).count();
        assert_eq!(bursts, 2, "one folded event of 4,990 refusals is a burst (agent and uid)");
    }

    #[test]
    fn pruning_moves_the_anchor_and_the_chain_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let config = EventConfig { retention_secs: 60, ..Default::default() };
        {
            let log = log(dir.path(), config.clone());
            log.record((0..5).map(|_| schema::event(kind::JOIN_TOKEN, schema::ALLOW)).collect());
            // Two minutes later, everything is past its retention.
            assert_eq!(log.prune(schema::now_ms() + 120_000).unwrap(), 5);
            assert!(all(&log).is_empty());
            log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
            let report = log.verify().unwrap();
            assert!(report.ok, "{report:?}");
            assert_eq!((report.first_seq, report.last_seq), (6, 6));
        }
        // Reopened, the chain continues from the anchor.
        let log = log(dir.path(), config);
        log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
        let report = log.verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.last_seq, 7);
    }
}
