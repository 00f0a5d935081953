//! Anomaly signals of the broker, per workload, kept in memory (a server
//! restart forgets them): a workload's first request for a tool, a burst
//! of denials, a blast radius far above its usual. Each becomes an
//! `anomaly.broker_*` event when it happens, and policy sees the recent
//! ones as `context.anomalies` (names, for ten minutes).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use tessera_common::event_schema::kind;

/// Denials within [`BURST_WINDOW`] seconds that make a burst.
pub const BURST_DENIALS: usize = 5;
/// The burst window, seconds.
pub const BURST_WINDOW: i64 = 60;
/// A blast radius this many times the workload's usual (and at least
/// [`FAR_MIN`]) is far above it.
pub const FAR_FACTOR: i64 = 4;
/// Smallest blast radius ever called far above usual.
pub const FAR_MIN: i64 = 10;
/// How long policy sees an anomaly, seconds.
pub const RECENT: i64 = 600;
/// Most workloads tracked (the oldest is forgotten past it).
pub const MAX_WORKLOADS: usize = 100_000;
/// Most tools remembered per workload.
const MAX_TOOLS: usize = 1_000;

#[derive(Debug, Default)]
struct Seen {
    tools: BTreeSet<String>,
    denials: VecDeque<i64>,
    /// Requests seen and the mean blast radius (×1 integer, running).
    requests: i64,
    mean_blast: i64,
    /// (kind, when).
    recent: Vec<(&'static str, i64)>,
}

/// The per-workload signals.
#[derive(Debug, Default)]
pub struct Tracker {
    seen: Mutex<HashMap<String, Seen>>,
}

impl Tracker {
    /// The anomalies policy should see for `workload` now.
    pub fn recent(&self, workload: &str, now: i64) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = seen.get(workload) else { return Vec::new() };
        let names: BTreeSet<&str> =
            s.recent.iter().filter(|(_, at)| now - at < RECENT).map(|(k, _)| *k).collect();
        names.into_iter().map(str::to_string).collect()
    }

    /// A request for `tool` with `blast` was decided: the anomaly kinds it
    /// raises (first tool, far above usual).
    pub fn observe(&self, workload: &str, tool: &str, blast: i64, now: i64) -> Vec<&'static str> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_WORKLOADS && !seen.contains_key(workload) {
            if let Some(k) = seen.keys().next().cloned() {
                seen.remove(&k);
            }
        }
        let s = seen.entry(workload.to_string()).or_default();
        let mut raised = Vec::new();
        if !s.tools.contains(tool) {
            if s.tools.len() < MAX_TOOLS {
                s.tools.insert(tool.to_string());
            }
            raised.push(kind::ANOMALY_BROKER_FIRST_TOOL);
        }
        if s.requests >= 3 && blast >= FAR_MIN && blast > FAR_FACTOR * s.mean_blast.max(1) {
            raised.push(kind::ANOMALY_BROKER_BLAST_RADIUS);
        }
        s.requests += 1;
        s.mean_blast += (blast - s.mean_blast) / s.requests.min(20);
        s.recent.retain(|(_, at)| now - at < RECENT);
        s.recent.extend(raised.iter().map(|k| (*k, now)));
        raised
    }

    /// A request was denied: true when this makes a burst.
    pub fn denied(&self, workload: &str, now: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let s = seen.entry(workload.to_string()).or_default();
        s.denials.retain(|at| now - at < BURST_WINDOW);
        s.denials.push_back(now);
        if s.denials.len() == BURST_DENIALS {
            s.recent.push((kind::ANOMALY_BROKER_DENIAL_BURST, now));
            return true;
        }
        false
    }
}

/// When each held request was last polled, to tell a caller that polls
/// sooner than its interval to slow down (RFC 8628 §3.5: 5 s more each
/// time). In memory: a restart forgets it, which costs nothing.
#[derive(Debug, Default)]
pub struct Polls {
    last: Mutex<HashMap<String, (i64, u32)>>,
}

impl Polls {
    /// Records a poll of `request` at `now_ms` whose interval is
    /// `interval` s; the interval to use from now on when it came too soon.
    pub fn too_soon(&self, request: &str, now_ms: i64, interval: u32) -> Option<u32> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_WORKLOADS {
            last.clear();
        }
        let Some((at, wait)) = last.get(request).copied() else {
            last.insert(request.to_string(), (now_ms, interval));
            return None;
        };
        // A little slack: clocks and schedulers are not exact.
        if now_ms.saturating_sub(at).saturating_add(200) < i64::from(wait) * 1000 {
            let slower = wait.saturating_add(5);
            last.insert(request.to_string(), (now_ms, slower));
            return Some(slower);
        }
        last.insert(request.to_string(), (now_ms, wait));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_tool_burst_and_far_blast_radius_are_raised_once() {
        let t = Tracker::default();
        assert_eq!(t.observe("w", "crm", 2, 0), vec![kind::ANOMALY_BROKER_FIRST_TOOL]);
        assert!(t.observe("w", "crm", 2, 1).is_empty());
        t.observe("w", "crm", 2, 2);
        assert_eq!(t.observe("w", "crm", 50, 3), vec![kind::ANOMALY_BROKER_BLAST_RADIUS]);
        assert!((0..4).all(|_| !t.denied("w", 10)));
        assert!(t.denied("w", 10));
        assert!(!t.denied("w", 10));
        let recent = t.recent("w", 11);
        assert_eq!(recent.len(), 3, "{recent:?}");
        assert!(t.recent("w", 10_000).is_empty());
    }

    #[test]
    fn a_poll_sooner_than_its_interval_is_told_to_slow_down_by_five_seconds() {
        let p = Polls::default();
        assert_eq!(p.too_soon("r", 0, 2), None);
        assert_eq!(p.too_soon("r", 500, 2), Some(7));
        assert_eq!(p.too_soon("r", 3_000, 2), Some(12), "the slower interval holds");
        assert_eq!(p.too_soon("r", 16_000, 2), None);
    }
}
