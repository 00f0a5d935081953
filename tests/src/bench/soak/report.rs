//! The soak's rows and its end summary: how each process's RSS and fds
//! moved after the warm-up, and of what the server's RSS is made (pages
//! backed by files against anonymous memory, beside the allocator's own
//! figures), so that growth is placed, not only measured.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Counters, Served, BOUND, ENTRIES, WINDOW};
use crate::stats::{round, Figures};

/// One row.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: f64,
    server_rss: f64,
    /// The server's resident pages backed by files (its binary's, read in
    /// as its code runs, and its libraries') and anonymous ones (heap,
    /// stacks), MiB.
    server_file: f64,
    server_anon: f64,
    /// What the server's allocator says, from the file the server child
    /// rewrites every 5 s (`--heap-file`).
    server_heap: Option<Allocator>,
    agent_rss: f64,
    /// The agent's event spool file (events not yet stored by the server,
    /// and acknowledged ones until the file is compacted).
    spool_mb: f64,
    /// The server's database directory (events are most of it).
    store_mb: f64,
    server_fds: usize,
    agent_fds: usize,
    updates: u64,
    jwt: u64,
    x509: u64,
    errors: u64,
}

/// The server's allocator's figures, MiB (`tessera_common::heap::HeapStats`).
#[derive(Debug, Clone, Copy)]
struct Allocator {
    /// Its live heap.
    allocated: f64,
    /// The pages it counts as resident: live heap, metadata and free
    /// pages not yet returned (an upper bound: untouched pages count).
    resident: f64,
    /// Its own bookkeeping.
    metadata: f64,
}

impl Allocator {
    /// The line the server child writes: allocated, resident and metadata
    /// bytes.
    fn parse(line: &str) -> Option<Self> {
        let mut mib = line.split_whitespace().map(|w| w.parse::<f64>().ok().map(|b| b / MIB));
        Some(Self { allocated: mib.next()??, resident: mib.next()??, metadata: mib.next()?? })
    }
}

/// Bytes in a MiB, as `rss_mb` counts.
const MIB: f64 = (1u32 << 20) as f64;

impl Sample {
    pub(super) fn take(
        start: Instant,
        (server, agent): (u32, u32),
        (spool, store, heap): (&std::path::Path, &std::path::Path, &std::path::Path),
        counters: &Counters,
    ) -> Self {
        let store_bytes: u64 = std::fs::read_dir(store).map_or(0, |files| {
            files.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
        });
        let fds =
            |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        // One read of the server's status for its three figures.
        let [server_rss, server_file, server_anon] =
            tessera_tests::hostile::status_mb(server, ["VmRSS:", "RssFile:", "RssAnon:"]);
        Self {
            at: start.elapsed().as_secs_f64(),
            server_rss,
            server_file,
            server_anon,
            server_heap: std::fs::read_to_string(heap).ok().and_then(|l| Allocator::parse(&l)),
            agent_rss: tessera_tests::hostile::rss_mb(agent),
            spool_mb: std::fs::metadata(spool).map_or(0.0, |m| m.len() as f64 / 1e6),
            store_mb: store_bytes as f64 / 1e6,
            server_fds: fds(server),
            agent_fds: fds(agent),
            updates: counters.updates.load(Ordering::Relaxed),
            jwt: counters.jwt.load(Ordering::Relaxed),
            x509: counters.x509.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
        }
    }

    pub(super) fn print(&self, warm_up_end: bool) {
        println!(
            "{:>9.0} {:>10.1} {:>11} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>8} {:>12} {:>12} {:>12} {:>8}{}",
            self.at,
            self.server_rss,
            self.server_heap.map_or("-".to_string(), |h| format!("{:.1}", h.allocated)),
            self.agent_rss,
            self.spool_mb,
            self.store_mb,
            self.server_fds,
            self.agent_fds,
            self.updates,
            self.jwt,
            self.x509,
            self.errors,
            if warm_up_end { "  <- end of warm-up" } else { "" }
        );
    }
}

/// Least-squares slope of `y` over the samples' time, per hour.
fn per_hour(samples: &[Sample], y: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let mean_y = samples.iter().map(&y).sum::<f64>() / n;
    let cov: f64 = samples.iter().map(|s| (s.at - mean_t) * (y(s) - mean_y)).sum();
    let var: f64 = samples.iter().map(|s| (s.at - mean_t).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var * 3600.0
    }
}

/// The end summary and warnings; the figures.
pub(super) fn report(
    samples: &[Sample],
    warm_up: Duration,
    counters: &Counters,
    served: &Served,
) -> Figures {
    let warm = samples.iter().find(|s| s.at >= warm_up.as_secs_f64()).unwrap();
    let end = samples.last().unwrap();
    let after: Vec<Sample> =
        samples.iter().filter(|s| s.at >= warm_up.as_secs_f64()).copied().collect();
    let mut warnings = Vec::new();
    let mut grew = |what: &str, warm: f64, end: f64, warned: bool| {
        let ratio = end / warm;
        println!(
            "{:<44} {warm:>12.1} {end:>12.1} {ratio:>12.3}",
            format!("soak: {what}, warm-up end; end; ratio")
        );
        if warned && ratio > BOUND {
            warnings.push(format!("{what} grew {ratio:.3} after warm-up (bound {BOUND:.2})"));
        }
    };
    // RSS swings between samples as the allocator returns pages (a 60 MB
    // agent by ±8 MB): one sample against one is noise. The bound is on
    // the mean of the first and of the last WINDOW after the warm-up.
    let window = |from_end: bool, y: fn(&Sample) -> f64| {
        if after.is_empty() {
            return 0.0;
        }
        let n = after.len().clamp(1, WINDOW);
        let picked = if from_end { &after[after.len() - n..] } else { &after[..n] };
        picked.iter().map(y).sum::<f64>() / n as f64
    };
    grew("server RSS MB", warm.server_rss, end.server_rss, false);
    grew("agent RSS MB", warm.agent_rss, end.agent_rss, false);
    grew(
        &format!("server RSS MB, mean of {WINDOW} samples"),
        window(false, |s| s.server_rss),
        window(true, |s| s.server_rss),
        true,
    );
    grew(
        &format!("agent RSS MB, mean of {WINDOW} samples"),
        window(false, |s| s.agent_rss),
        window(true, |s| s.agent_rss),
        true,
    );
    // The server child rewrites its allocator's figures every 5 s; a run
    // without them says so rather than printing a flat zero.
    let heap = |s: &Sample| s.server_heap.map_or(f64::NAN, |h| h.allocated);
    grew(
        &format!("server live heap MB, mean of {WINDOW} samples"),
        window(false, heap),
        window(true, heap),
        false,
    );
    print_parts(|y| (window(false, y), window(true, y)));
    grew("server fds", warm.server_fds as f64, end.server_fds as f64, true);
    grew("agent fds", warm.agent_fds as f64, end.agent_fds as f64, true);
    if after.iter().any(|s| s.server_heap.is_none()) {
        warnings.push("the server's allocator figures were missing from some samples".into());
    }
    let peak = |y: fn(&Sample) -> f64| after.iter().map(y).fold(0.0, f64::max);
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "soak: RSS MB peak after warm-up, server; agent",
        peak(|s| s.server_rss),
        peak(|s| s.agent_rss)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "soak: RSS MB/h trend after warm-up, srv; agt",
        per_hour(&after, |s| s.server_rss),
        per_hour(&after, |s| s.agent_rss)
    );
    let issued = counters.issued.load(Ordering::Relaxed);
    let churned = counters.churned.load(Ordering::Relaxed);
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "soak: X509-SVIDs seen; churned; updates", issued, churned, end.updates
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "soak: JWT fetches; X509 fetches; errors", end.jwt, end.x509, end.errors
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        format!("soak: final fetch: of {ENTRIES}; others; expired"),
        served.ours,
        served.others,
        served.expired
    );
    println!("{:<44} {:>12.1}", "soak: churn over to exactly those served (s)", served.settle_s);
    for (why, n) in counters.reasons.lock().unwrap().iter() {
        println!("  error x{n}: {why}");
    }
    if served.ours != ENTRIES || served.others != 0 || served.expired != 0 {
        warnings.push(format!(
            "the final FetchX509SVID served {} of the {ENTRIES} identities, {} others, {} expired",
            served.ours, served.others, served.expired
        ));
    }
    let errors = counters.errors.load(Ordering::Relaxed);
    if errors > 0 {
        warnings.push(format!("{errors} errors during the soak (see above)"));
    }
    for warning in &warnings {
        println!("WARNING: {warning}");
    }
    vec![
        ("soak_seconds", json!(end.at.round())),
        ("soak_server_rss_warm_mb", json!(round(warm.server_rss))),
        ("soak_server_rss_end_mb", json!(round(end.server_rss))),
        ("soak_agent_rss_warm_mb", json!(round(warm.agent_rss))),
        ("soak_agent_rss_end_mb", json!(round(end.agent_rss))),
        (
            "soak_server_rss_window_ratio",
            json!(round(window(true, |s| s.server_rss) / window(false, |s| s.server_rss))),
        ),
        (
            "soak_agent_rss_window_ratio",
            json!(round(window(true, |s| s.agent_rss) / window(false, |s| s.agent_rss))),
        ),
        ("soak_server_heap_window_ratio", json!(round(window(true, heap) / window(false, heap)))),
        ("soak_server_fds_warm", json!(warm.server_fds)),
        ("soak_server_fds_end", json!(end.server_fds)),
        ("soak_agent_fds_warm", json!(warm.agent_fds)),
        ("soak_agent_fds_end", json!(end.agent_fds)),
        ("soak_issued", json!(issued)),
        ("soak_errors", json!(errors)),
        ("soak_served", json!(served.ours)),
        ("soak_warnings", json!(warnings.len())),
    ]
}

/// One figure of a sample.
type Figure = fn(&Sample) -> f64;

/// Of what the server's RSS is made, at each end of the run after the
/// warm-up (`window(y)`: the means of the first and of the last samples),
/// and how each part moved: pages backed by files (the binary's, read in
/// as more of its code runs, and the libraries') against anonymous memory
/// (heap, stacks), and beside them the allocator's own figures. Those are
/// not parts of the RSS: memory handed out and never touched counts in
/// them and not in the RSS (the soak server's live heap is above its
/// anonymous RSS).
fn print_parts(window: impl Fn(Figure) -> (f64, f64)) {
    let parts: [(&str, Figure); 6] = [
        ("RSS", |s| s.server_rss),
        ("  file-backed (binary, libraries)", |s| s.server_file),
        ("  anonymous (heap, stacks)", |s| s.server_anon),
        ("allocator: live heap", |s| s.server_heap.map_or(f64::NAN, |h| h.allocated)),
        ("  its metadata", |s| s.server_heap.map_or(f64::NAN, |h| h.metadata)),
        ("  its resident pages (upper bound)", |s| s.server_heap.map_or(f64::NAN, |h| h.resident)),
    ];
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        format!("soak: server memory MB, mean of {WINDOW} samples"),
        "warm-up end",
        "end",
        "change"
    );
    for (what, y) in parts {
        let (warm, end) = window(y);
        println!("  {what:<42} {warm:>12.1} {end:>12.1} {:>+12.1}", end - warm);
    }
}
