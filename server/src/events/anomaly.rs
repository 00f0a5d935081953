//! Anomalies the stream reveals, recorded as events of their own: an
//! executable never seen for an entry, an audience outside its usual set,
//! a burst of refusals from one agent or uid.

use std::collections::HashMap;

use tessera_proto::types::Event;
use tracing::warn;

use super::{EventLog, BASELINES};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::store::kv::{Kv, Op};
use crate::store::StoreError;

/// The baselines: executables seen per entry, audiences asked per entry.
pub(super) const EXE: &str = "exe";
pub(super) const AUD: &str = "aud";
/// Baselines forgotten per write.
const FORGET_PAGE: usize = 1_000;

/// Where the values of baseline `what` for `entry` are remembered.
fn baseline_prefix(what: &str, entry: &str) -> String {
    format!("{what}/{entry}/")
}

/// The entries whose baselines go once the commit that stored `events`
/// is durable: those the server deleted or expired. What was usual for an
/// entry goes with it (entry IDs are never reused; entries created and
/// deleted all day, task-scoped ones, would otherwise grow the baselines
/// forever). A refused deletion names whatever ID was asked for, and an
/// agent's pushed event is renamed before it gets here: neither counts.
/// An ID with a `/` is no entry's and could reach into another's prefix.
pub(super) fn removed_entries(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == kind::ENTRY_DELETE || e.kind == kind::ENTRY_EXPIRE)
        .filter(|e| e.decision != schema::DENY && e.source == "server")
        .flat_map(|e| e.entry_ids.iter())
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .cloned()
        .collect()
}

/// Forgets every baseline of `entries`.
pub(super) fn forget_entries(kv: &dyn Kv, entries: &[String]) -> Result<(), StoreError> {
    for entry in entries {
        for what in [EXE, AUD] {
            let prefix = baseline_prefix(what, entry);
            let end = crate::store::kv::prefix_end(prefix.as_bytes());
            loop {
                let keys =
                    kv.range(BASELINES, prefix.as_bytes(), end.as_deref(), FORGET_PAGE, false)?;
                let done = keys.len() < FORGET_PAGE;
                let ops: Vec<Op> =
                    keys.into_iter().map(|(k, _)| Op::Delete(BASELINES, k)).collect();
                if !ops.is_empty() {
                    kv.apply(ops)?;
                }
                if done {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Baseline values known to be stored, per entry and kind of baseline,
/// so that `learn` reads the store only for a value it has not seen: entry
/// IDs are never reused, so a value stays known while its entry lives. An
/// entry's go when it is deleted or expires (`committed`), and all of them
/// past [`KNOWN_MAX`] entries (another server's deletes are not seen here).
/// Keyed by the entry ID itself: a lookup, which every issued JWT-SVID
/// and every served workload makes, formats no key.
#[derive(Debug, Default)]
pub(super) struct Known(foldhash::HashMap<String, [foldhash::HashSet<String>; 2]>);

/// Entries remembered at most, and values per entry and kind of baseline
/// (past it, a new value is read from the store each time).
const KNOWN_MAX: usize = 20_000;
const KNOWN_PER_SET: usize = 256;

/// Which of an entry's two sets holds baseline `what` ([`EXE`] or [`AUD`]).
fn set_of(what: &str) -> usize {
    debug_assert!(what == EXE || what == AUD, "no baseline {what:?}");
    usize::from(what == AUD)
}

impl Known {
    pub(super) fn contains(&self, what: &str, entry: &str, value: &str) -> bool {
        self.0.get(entry).is_some_and(|sets| sets[set_of(what)].contains(value))
    }

    fn insert(&mut self, what: &str, entry: &str, value: &str) {
        if self.0.len() >= KNOWN_MAX && !self.0.contains_key(entry) {
            self.0.clear();
        }
        let values = &mut self.0.entry(entry.to_string()).or_default()[set_of(what)];
        if values.len() < KNOWN_PER_SET {
            values.insert(value.to_string());
        }
    }

    /// Forgets what was known of `entries`.
    pub(super) fn forget(&mut self, entries: &[String]) {
        for entry in entries {
            self.0.remove(entry);
        }
    }
}

/// Refusal counts in the current minute, per key, and whether the burst
/// was reported.
#[derive(Debug, Default)]
pub(super) struct Bursts {
    minute: i64,
    counts: HashMap<String, (u32, bool)>,
}

impl EventLog {
    /// Anomalies `e` reveals, updating what is usual.
    pub(super) fn detect(&self, e: &Event) -> Vec<Event> {
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
                    if self.learn(EXE, entry, exe)? {
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
                        if self.learn(AUD, entry, aud)? {
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

    /// Remembers `value` in `entry`'s baseline `what`; true when it is new
    /// and the baseline already had a value (the first one seen sets it).
    /// Nothing is learned for an entry no longer stored: an agent pushes
    /// what it served a moment before a deletion after the deletion has
    /// forgotten the entry's baselines, and learning them again would keep
    /// them (and their rows) for good. The entry is read again after the
    /// row is written: a deletion committed in between (by another server
    /// sharing the database, whose forgetting may already have run) leaves
    /// no row behind, and one committed after it forgets the row itself.
    pub(super) fn learn(&self, what: &str, entry: &str, value: &str) -> Result<bool, StoreError> {
        let remembered = || self.known.lock().unwrap_or_else(|e| e.into_inner());
        if remembered().contains(what, entry, value) {
            return Ok(false);
        }
        let prefix = &baseline_prefix(what, entry);
        let key = format!("{prefix}{value}");
        if self.kv.get(BASELINES, key.as_bytes())?.is_some() {
            remembered().insert(what, entry, value);
            return Ok(false);
        }
        if !crate::store::entry_stored(&*self.kv, entry)? {
            return Ok(false);
        }
        let end = crate::store::kv::prefix_end(prefix.as_bytes());
        let known =
            !self.kv.range(BASELINES, prefix.as_bytes(), end.as_deref(), 1, false)?.is_empty();
        self.kv.apply(vec![Op::Put(BASELINES, key.clone().into_bytes(), Vec::new())])?;
        if !crate::store::entry_stored(&*self.kv, entry)? {
            self.kv.apply(vec![Op::Delete(BASELINES, key.into_bytes())])?;
            return Ok(false);
        }
        remembered().insert(what, entry, value);
        Ok(known)
    }

    pub(super) fn count_refusal(&self, e: &Event, found: &mut Vec<Event>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is known of an entry goes with it, and the set is bounded.
    #[test]
    fn known_values_go_with_their_entry_and_are_bounded() {
        let mut known = Known::default();
        known.insert(AUD, "e1", "a");
        known.insert(EXE, "e1", "x");
        known.insert(AUD, "e2", "a");
        assert!(known.contains(AUD, "e1", "a"));
        assert!(!known.contains(AUD, "e1", "b"));
        // The two baselines of one entry are apart.
        assert!(!known.contains(EXE, "e1", "a") && !known.contains(AUD, "e1", "x"));
        known.forget(&["e1".to_string()]);
        assert!(!known.contains(AUD, "e1", "a"));
        assert!(!known.contains(EXE, "e1", "x"));
        assert!(known.contains(AUD, "e2", "a"));
        for i in 0..KNOWN_PER_SET + 10 {
            known.insert(AUD, "e2", &format!("v{i}"));
        }
        assert_eq!(known.0["e2"][set_of(AUD)].len(), KNOWN_PER_SET);
        for i in 0..KNOWN_MAX + 10 {
            known.insert(AUD, &format!("n{i}"), "a");
        }
        assert!(known.0.len() <= KNOWN_MAX);
    }
}
