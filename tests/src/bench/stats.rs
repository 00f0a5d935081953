//! Statistics and reporting: percentiles, rates, rounding, the table's rows
//! and the JSON object printed as the last line. Uses no other bench file.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What a scenario reports: JSON keys and values, in the order measured.
pub type Figures = Vec<(&'static str, Value)>;

/// The JSON object of results, keys in sorted order.
#[derive(Debug)]
pub struct Results(BTreeMap<&'static str, Value>);

impl Results {
    /// The headline keys, `null` until a scenario measures them.
    pub fn new() -> Self {
        let mut results = BTreeMap::new();
        for key in [
            "issue_svids_per_s",
            "issue_limit_ratio",
            "entries_per_s",
            "restart_100k_s",
            "server_rss_mb",
            "agent_20k_rss_mb",
            "fetch_p99_ms",
            "streams_1000_p99_ms",
            "propagate_p99_ms",
            "revoke_p99_ms",
            "jwt_issue_ratio",
            "jwt_fetch_p99_ms",
            "jwt_validate_ratio",
            "jwt_revoke_p99_ms",
            "events_issue_ratio",
            "events_fetch_p99_ratio",
            "events_ingest_per_s",
            "ha_propagate_p99_ms",
            "ha_failover_resume_ms",
            "broker_policy_decide_p99_us",
        ] {
            results.insert(key, Value::Null);
        }
        Self(results)
    }

    /// A scenario's figures (a key measured twice keeps the later value).
    pub fn extend(&mut self, figures: Figures) {
        self.0.extend(figures);
    }

    /// A figure, if measured.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The last line of the output.
    pub fn print(&self) {
        println!("{}", serde_json::to_string(&self.0).unwrap_or_default());
    }
}

/// The first lines of the output: the scenario, the cores, the column heads.
pub fn header(scenario: &str) {
    println!(
        "tessera-bench {scenario} on {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<44} {:>12} {:>12} {:>12}", "measure", "p50", "p99", "n");
}

/// A row of two latencies (ms) and the number of samples.
pub fn row(name: &str, p50: f64, p99: f64, n: usize) {
    println!("{name:<44} {p50:>12.3} {p99:>12.3} {n:>12}");
}

/// A row of two rates and their ratio.
pub fn ratio_row(name: &str, measured: f64, reference: f64) {
    println!("{name:<44} {measured:>12.0} {reference:>12.0} {:>12.3}", measured / reference);
}

/// `v` to three decimals, as the JSON result carries figures.
pub fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// p50 and p99 of durations, in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i =
            ((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1);
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

/// The rate at which `done` grows over `duration` after a 0.5 s warm-up;
/// then stops the workers.
pub async fn measure_rate(
    done: &AtomicU64,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<()>>,
    duration: Duration,
) -> f64 {
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let (first, start) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(duration).await;
    let rate = (done.load(Ordering::Relaxed) - first) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    rate
}
