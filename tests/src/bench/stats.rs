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

/// The cores this machine offers (what the limits run on).
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// The first lines of the output: the scenario, the cores, the column heads.
pub fn header(scenario: &str) {
    println!("tessera-bench {scenario} on {} cores", cores());
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

/// A row of CPU per operation (µs): the server's, the limit loop's (the
/// same signatures alone, from its rate `limit_per_s`: its wall time per
/// operation times the cores, as nothing else runs then), and the
/// difference.
pub fn cpu_row(name: &str, server_us: f64, limit_per_s: f64) {
    let limit_us = cores() / limit_per_s * 1e6;
    println!(
        "{name:<44} {server_us:>12.1} {limit_us:>12.1} {:>12}",
        format!("{:+.1}", server_us - limit_us)
    );
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
    measure_rate_and_cpu(done, stop, workers, duration, None).await.0
}

/// [`measure_rate`], and the CPU process `pid` used per operation over the
/// same window (µs, user and system), when a `pid` is given.
pub async fn measure_rate_and_cpu(
    done: &AtomicU64,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<()>>,
    duration: Duration,
    pid: Option<u32>,
) -> (f64, Option<f64>) {
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let cpu = || pid.and_then(cpu_secs);
    let (first, start, cpu_then) = (done.load(Ordering::Relaxed), Instant::now(), cpu());
    tokio::time::sleep(duration).await;
    let (ops, cpu_now) = (done.load(Ordering::Relaxed) - first, cpu());
    let rate = ops as f64 / start.elapsed().as_secs_f64();
    let per_op = cpu_then.zip(cpu_now).map(|(then, now)| (now - then) * 1e6 / ops.max(1) as f64);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    (rate, per_op)
}

/// The CPU time process `pid` has used (user and system, seconds), from
/// `/proc/<pid>/stat`; `None` if it cannot be read.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: state is the first, utime the 12th, stime the 13th.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // Linux reports them in USER_HZ, 100 on every architecture it runs on.
    Some(ticks as f64 / 100.0)
}
