//! `soak`: steady state over time. A server and an agent, each in a process
//! of its own, under a constant load for a long run (an hour by default):
//! 200 entries at a 20 s X509-SVID TTL for this process, 20 workloads
//! watching their FetchX509SVID streams, FetchJWTSVID and FetchX509SVID in
//! loops, and an entry created and the previous one deleted every half
//! second. Every 30 s a row of the two processes' RSS and open fds and of
//! the work done; at the end, how RSS and fds moved after the warm-up
//! (the target: RSS within 10 %, fds flat) and whether all 200 identities
//! are still served. Runs only when asked for (`tessera-bench soak
//! [--duration 60m] [--no-events]`), never as part of `all`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::types;
use tessera_proto::workload as pb;
use tessera_tests::entry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::children::{admin_at, bundle_of, join_token, AdminClient, Child};
use crate::stats::{round, Figures};
use crate::workload::me;

/// Entries for this process, each an identity of its own.
const ENTRIES: usize = 200;
/// Their X509-SVID lifetime, seconds.
const TTL: u32 = 20;
/// Workloads holding a FetchX509SVID stream open.
const WATCHERS: usize = 20;
/// The JWT-SVID audience every entry allows and the JWT loop asks for.
const AUDIENCE: &str = "soak";
/// The agent that parents every entry.
const AGENT_ID: &str = "spiffe://example.org/soak/agent";
/// An entry created (and the one before deleted) this often.
const CHURN_EVERY: Duration = Duration::from_millis(500);
/// A row this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// The run's length unless `--duration` says otherwise.
const DEFAULT_DURATION: Duration = Duration::from_secs(3600);
/// The warm-up of a run of an hour or more; a shorter run's is a sixth of it.
const FULL_WARM_UP: Duration = Duration::from_secs(600);
/// Samples averaged at each end of the run after the warm-up (5 minutes
/// at one every 30 s) for the RSS bound.
const WINDOW: usize = 10;
/// RSS and fds may grow this much after the warm-up.
const BOUND: f64 = 1.10;

/// The run's length from `--duration D` or `--duration=D` in `args`: `60m`,
/// `600s`, `2h`, or seconds (`90`); an hour when absent.
pub fn duration_from(args: &[String]) -> Result<Duration, String> {
    let mut value = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--duration" {
            value =
                Some(rest.next().ok_or("--duration needs a value, e.g. 60m, 600s or 90")?.as_str());
        } else if let Some(v) = arg.strip_prefix("--duration=") {
            value = Some(v);
        }
    }
    value.map_or(Ok(DEFAULT_DURATION), parse_duration)
}

/// `text` as the server's CLI reads durations (`90`, `600s`, `60m`, `2h`,
/// `1h30m`), at least a second.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match tessera_server::cli::parse_duration("--duration", text) {
        Ok(0) => Err("--duration must be at least 1 s".into()),
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(e) => Err(e.to_string()),
    }
}

/// The soak, for `duration`; with the server's event log off when
/// `events` is false (`--no-events`: what the server holds without a
/// growing event store).
pub async fn run(duration: Duration, events: bool) -> Figures {
    let (warm_up, warm_up_why) = if duration >= DEFAULT_DURATION {
        (FULL_WARM_UP, "the first 10 min".to_string())
    } else {
        let w = duration / 6;
        (w, format!("the first 1/6 of the run ({:.0} s; the run is under 60 min)", w.as_secs_f64()))
    };
    println!(
        "soak: {:.0} s; {ENTRIES} entries at a {TTL} s TTL, {WATCHERS} watchers, JWT and X509 \
         fetch loops, an entry created and one deleted every {} ms; warm-up: {warm_up_why}; \
         server event log {}",
        duration.as_secs_f64(),
        CHURN_EVERY.as_millis(),
        if events { "on" } else { "off (--no-events)" }
    );

    // A server and an agent in their own processes; the entries before the
    // agent starts, so it gets them all in its first sync.
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let heap_file = dir.path().join("server-heap");
    let heap_flag = format!("--heap-file={}", heap_file.display());
    let mut flags = vec![heap_flag.as_str()];
    if !events {
        flags.push("--no-events");
    }
    let server = Child::server(&server_dir, &flags);
    let mut admin = admin_at(&server_dir).await;
    let bundle = bundle_of(&mut admin).await;
    let token = join_token(&mut admin, AGENT_ID).await;
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, tessera_tests::to_pem(&bundle)).unwrap();
    let ids: Vec<String> =
        (0..ENTRIES).map(|i| format!("spiffe://example.org/soak/workload/{i}")).collect();
    let created = admin
        .batch_create_entry(admin_pb::BatchCreateEntryRequest {
            entries: ids.iter().map(|id| soak_entry(id)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.results.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
    let agent = Child::agent(&dir.path().join("agent"), &server.ready, &token, &bundle_path, &[]);
    let endpoint = format!("unix://{}", agent.ready);
    let deadline = Instant::now() + Duration::from_secs(120);
    while fetch_x509(&endpoint).await.map_or(0, |s| s.len()) < ENTRIES {
        assert!(Instant::now() < deadline, "the agent did not serve all {ENTRIES} SVIDs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The load.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let mut tasks: Vec<JoinHandle<()>> = (0..WATCHERS)
        .map(|i| tokio::spawn(watch(endpoint.clone(), counters.clone(), stop.clone(), i == 0)))
        .collect();
    for kind in [Fetch::Jwt, Fetch::X509] {
        tasks.push(tokio::spawn(fetch_loop(
            endpoint.clone(),
            counters.clone(),
            stop.clone(),
            kind,
        )));
    }
    let churn = tokio::spawn(churn(admin_at(&server_dir).await, counters.clone(), stop.clone()));

    // The rows: every 30 s, at the end of the warm-up, and at the end.
    let pids = (server.process.id(), agent.process.id());
    let spool = dir.path().join("agent/events.spool");
    let store = server_dir.join("store");
    let start = Instant::now();
    println!(
        "{:>9} {:>10} {:>11} {:>10} {:>10} {:>10} {:>8} {:>8} {:>12} {:>12} {:>12} {:>8}",
        "elapsed_s",
        "srv_rss_mb",
        "srv_heap_mb",
        "agt_rss_mb",
        "spool_mb",
        "store_mb",
        "srv_fds",
        "agt_fds",
        "x509_updates",
        "jwt_fetches",
        "x509_fetches",
        "errors"
    );
    let mut samples = Vec::new();
    for at in sample_times(duration, warm_up) {
        tokio::time::sleep_until((start + at).into()).await;
        let sample = Sample::take(start, pids, (&spool, &store, &heap_file), &counters);
        sample.print(at == warm_up);
        samples.push(sample);
    }
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let leftovers = churn.await.unwrap();

    // What is served once the churn is over: exactly the 200 identities.
    if !leftovers.is_empty() {
        admin
            .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: leftovers })
            .await
            .unwrap();
    }
    let served = final_fetch(&endpoint, &ids).await;

    let figures = report(&samples, warm_up, &counters, &served);
    drop(admin);
    agent.stop();
    server.stop();
    figures
}

/// A soak entry for this process: `TTL`, and `AUDIENCE` allowed.
fn soak_entry(spiffe_id: &str) -> types::Entry {
    let mut new = entry(spiffe_id, AGENT_ID, &[&me()], Some(TTL));
    new.jwt_audiences = vec![AUDIENCE.into()];
    new
}

/// When to take rows, from the start: every `SAMPLE_EVERY`, at the end of
/// the warm-up and at the end.
fn sample_times(duration: Duration, warm_up: Duration) -> Vec<Duration> {
    let mut times: Vec<Duration> = (1..)
        .map(|k| SAMPLE_EVERY * k)
        .take_while(|t| *t < duration)
        .chain([warm_up, duration])
        .collect();
    times.sort();
    times.dedup();
    times
}

/// The load's work and failures, shared by its tasks.
#[derive(Debug, Default)]
struct Counters {
    /// Messages on the watchers' streams after the first of each stream.
    updates: AtomicU64,
    /// New X509-SVIDs (certificates not in the previous message) seen by
    /// the first watcher.
    issued: AtomicU64,
    jwt: AtomicU64,
    x509: AtomicU64,
    /// Entries created by the churn.
    churned: AtomicU64,
    errors: AtomicU64,
    /// Errors by where and why (the first 40 reasons; then "other").
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// An error of `what`: counted, and its reason kept, entry IDs (UUIDs)
    /// and churn entry numbers left out so that like reasons add up.
    fn error(&self, what: &str, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let is_uuid = |w: &str| {
            w.len() == 36
                && w.chars().filter(|c| *c == '-').count() == 4
                && w.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
        };
        let why = why
            .split(' ')
            .map(|w| match w.find("/churn/") {
                _ if is_uuid(w) => "<id>".to_string(),
                Some(at) => format!("{}/churn/<n>", &w[..at]),
                None => w.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        let why: String = why.chars().take(240).collect();
        let mut reasons = self.reasons.lock().unwrap();
        let key = format!("{what}: {why}");
        let key = if reasons.len() < 40 || reasons.contains_key(&key) {
            key
        } else {
            format!("{what}: other")
        };
        *reasons.entry(key).or_default() += 1;
    }
}

/// One row.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    server_rss: f64,
    /// What the server's allocator says it holds (its live heap), from
    /// the file the server child rewrites every 5 s (`--heap-file`).
    server_heap: Option<f64>,
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

impl Sample {
    fn take(
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
        Self {
            at: start.elapsed().as_secs_f64(),
            server_rss: tessera_tests::hostile::rss_mb(server),
            // MiB, as `rss_mb`.
            server_heap: std::fs::read_to_string(heap)
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
                .map(|b| b / f64::from(1u32 << 20)),
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

    fn print(&self, warm_up_end: bool) {
        println!(
            "{:>9.0} {:>10.1} {:>11} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>8} {:>12} {:>12} {:>12} {:>8}{}",
            self.at,
            self.server_rss,
            self.server_heap.map_or("-".to_string(), |h| format!("{h:.1}")),
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

/// A workload holding a FetchX509SVID stream open and reading every
/// update, reopening it a second after it fails or ends (an error each
/// time); the first watcher also counts the new certificates it sees.
async fn watch(endpoint: String, counters: Arc<Counters>, stop: CancellationToken, first: bool) {
    let mut certs = HashMap::new();
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            why = watch_once(&endpoint, &counters, first.then_some(&mut certs)) => why,
        };
        counters.error("watch", &why);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One stream of `watch`, to why it ended. `certs`: each identity's
/// certificate in the last message, when counting new ones.
async fn watch_once(
    endpoint: &str,
    counters: &Counters,
    mut certs: Option<&mut HashMap<String, Vec<u8>>>,
) -> String {
    let mut client = match connect_workload_api(endpoint).await {
        Ok(client) => client,
        Err(e) => return e.to_string(),
    };
    let mut stream = match client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await {
        Ok(response) => response.into_inner(),
        Err(status) => return why(&status),
    };
    let mut opened = false;
    loop {
        let update = match stream.message().await {
            Ok(Some(update)) => update,
            Ok(None) => return "the agent ended the stream".into(),
            Err(status) => return why(&status),
        };
        if opened {
            counters.updates.fetch_add(1, Ordering::Relaxed);
        }
        opened = true;
        if let Some(certs) = certs.as_deref_mut() {
            let now: HashMap<String, Vec<u8>> =
                update.svids.into_iter().map(|s| (s.spiffe_id, s.x509_svid)).collect();
            let new = now.iter().filter(|(id, cert)| certs.get(*id) != Some(*cert)).count();
            counters.issued.fetch_add(new as u64, Ordering::Relaxed);
            *certs = now;
        }
    }
}

/// Why a call failed: the status's message and, when it came from the
/// transport, its innermost cause (an HTTP/2 GOAWAY says which side sent
/// it and why only there).
fn why(status: &tonic::Status) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(next) = cause.and_then(std::error::Error::source) {
        cause = Some(next);
    }
    match cause {
        Some(cause) => format!("{} ({cause:?})", status.message()),
        None => status.message().to_string(),
    }
}

/// Which Workload API call a fetch loop makes.
#[derive(Debug, Clone, Copy)]
enum Fetch {
    /// FetchJWTSVID for `AUDIENCE`, every identity.
    Jwt,
    /// The first message of a new FetchX509SVID stream.
    X509,
}

/// `kind` back to back on one connection until `stop`. A call counts when
/// it carries at least `ENTRIES` SVIDs; else it is an error (then a pause
/// of 100 ms).
async fn fetch_loop(
    endpoint: String,
    counters: Arc<Counters>,
    stop: CancellationToken,
    kind: Fetch,
) {
    let mut client = connect_workload_api(&endpoint).await.unwrap();
    let (what, done) = match kind {
        Fetch::Jwt => ("jwt fetch", &counters.jwt),
        Fetch::X509 => ("x509 fetch", &counters.x509),
    };
    while !stop.is_cancelled() {
        let call = async {
            match kind {
                Fetch::Jwt => {
                    let request = pb::JwtsvidRequest {
                        audience: vec![AUDIENCE.into()],
                        spiffe_id: String::new(),
                    };
                    let response = client.fetch_jwtsvid(cli_request(request)).await?;
                    Ok(response.into_inner().svids.len())
                }
                Fetch::X509 => {
                    let response =
                        client.fetch_x509svid(cli_request(pb::X509svidRequest {})).await?;
                    let first = response.into_inner().message().await?;
                    Ok::<_, tonic::Status>(first.map_or(0, |m| m.svids.len()))
                }
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = call => outcome,
        };
        match outcome {
            Ok(n) if n >= ENTRIES => {
                done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(n) => counters.error(what, &format!("{n} SVIDs, not {ENTRIES}")),
            Err(status) => counters.error(what, &why(&status)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every `CHURN_EVERY`, creates an entry and deletes the one created
/// before, until `stop`; returns the entries left to delete (the last one,
/// and any whose delete failed).
async fn churn(
    mut admin: AdminClient,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Vec<String> {
    let mut tick = tokio::time::interval(CHURN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live: Vec<String> = Vec::new();
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let new = soak_entry(&format!("spiffe://example.org/soak/churn/{n}"));
        let request = admin_pb::BatchCreateEntryRequest { entries: vec![new] };
        let created = match admin.batch_create_entry(request).await {
            Ok(response) => response.into_inner().results.into_iter().next(),
            Err(status) => {
                counters.error("create", status.message());
                None
            }
        };
        let created = created.and_then(|r| match (r.status, r.entry) {
            (Some(s), _) if s.code != 0 => {
                counters.error("create", &s.message);
                None
            }
            (_, entry) => entry.map(|e| e.id),
        });
        // Delete all the earlier ones (normally one).
        if !live.is_empty() {
            let request = admin_pb::BatchDeleteEntryRequest { ids: live.clone() };
            match admin.batch_delete_entry(request).await {
                Ok(response) => {
                    for result in response.into_inner().results {
                        match result.status {
                            Some(s) if s.code != 0 => counters.error("delete", &s.message),
                            _ => live.retain(|id| *id != result.id),
                        }
                    }
                }
                Err(status) => counters.error("delete", status.message()),
            }
        }
        if let Some(id) = created {
            counters.churned.fetch_add(1, Ordering::Relaxed);
            live.push(id);
        }
    }
    live
}

/// What a fresh FetchX509SVID serves at the end.
#[derive(Debug)]
struct Served {
    /// Of the `ENTRIES` identities.
    ours: usize,
    /// Any other identity (a churn entry still there).
    others: usize,
    /// Served certificates already expired.
    expired: usize,
    /// How long until exactly the `ENTRIES` identities were served (or the
    /// 30 s given up after).
    settle_s: f64,
}

/// Fetches until a fresh FetchX509SVID serves exactly `ids` (the churn
/// entries deleted), for up to 30 s, then checks the last answer: which
/// identities, and whether each certificate is still valid.
async fn final_fetch(endpoint: &str, ids: &[String]) -> Served {
    let start = Instant::now();
    loop {
        let svids = fetch_x509(endpoint).await.unwrap_or_default();
        let ours = ids.iter().filter(|id| svids.iter().any(|s| s.spiffe_id == **id)).count();
        let others = svids.iter().filter(|s| !ids.contains(&s.spiffe_id)).count();
        if (ours == ids.len() && others == 0) || start.elapsed() > Duration::from_secs(30) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let expired = svids.iter().filter(|s| s.expires_at <= now).count();
            return Served { ours, others, expired, settle_s: start.elapsed().as_secs_f64() };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
fn report(samples: &[Sample], warm_up: Duration, counters: &Counters, served: &Served) -> Figures {
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
    let heap = |s: &Sample| s.server_heap.unwrap_or(f64::NAN);
    grew(
        &format!("server live heap MB, mean of {WINDOW} samples"),
        window(false, heap),
        window(true, heap),
        false,
    );
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
