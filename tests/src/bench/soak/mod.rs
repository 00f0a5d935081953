//! `soak`: steady state over time. A server and an agent, each in a process
//! of its own, under a constant load for a long run (an hour by default):
//! 200 entries at a 20 s X509-SVID TTL for this process, 20 workloads
//! watching their FetchX509SVID streams, FetchJWTSVID and FetchX509SVID in
//! loops, and an entry created and the previous one deleted every half
//! second. Every 30 s a row of the two processes' RSS and open fds and of
//! the work done; at the end, how RSS and fds moved after the warm-up
//! (the target: RSS within 10 %, fds flat) and whether all 200 identities
//! are still served, with the server's RSS split into its parts
//! (`report.rs`). Runs only when asked for (`tessera-bench soak
//! [--duration 60m] [--no-events] [--change-log-keep N]`), never as part
//! of `all`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_agent::{cli_request, connect_workload_api, fetch_x509};
use tessera_proto::admin as admin_pb;
use tessera_proto::types;
use tessera_proto::workload as pb;
use tessera_tests::entry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::children::{admin_at, bundle_of, join_token, AdminClient, Child};
use crate::stats::Figures;
use crate::workload::me;

mod report;

use report::{report, Sample};

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

/// How a soak runs, from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `--duration D` or `--duration=D`: `60m`, `600s`, `2h`, or seconds
    /// (`90`); an hour when absent.
    pub duration: Duration,
    /// Off with `--no-events`: the server's event log off, for what the
    /// server holds without a growing event store.
    pub events: bool,
    /// `--change-log-keep N`: the server keeps its change log to the
    /// newest N changes instead of its default (100,000): a small N holds
    /// the log at its bound from early on, to compare with a run whose
    /// log is still filling.
    pub change_log_keep: Option<u64>,
}

/// The soak's options from `args` (those after the scenario's name).
pub fn options_from(args: &[String]) -> Result<Options, String> {
    let mut options = Options { duration: DEFAULT_DURATION, events: true, change_log_keep: None };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg.as_str(), None),
        };
        let mut value = |example: &str| match inline {
            Some(v) => Ok(v),
            None => rest
                .next()
                .map(String::as_str)
                .filter(|v| !v.starts_with("--"))
                .ok_or(format!("{flag} needs a value, e.g. {example}")),
        };
        match flag {
            "--duration" => options.duration = parse_duration(value("60m, 600s or 90")?)?,
            "--change-log-keep" => {
                let keep = value("2000")?;
                match keep.parse::<u64>() {
                    Ok(n) if n > 0 => options.change_log_keep = Some(n),
                    _ => return Err(format!("--change-log-keep must be a positive whole number, not {keep:?}")),
                }
            }
            "--no-events" if inline.is_none() => options.events = false,
            _ => return Err(format!("unknown soak flag {arg:?}; the soak takes --duration D, --no-events and --change-log-keep N")),
        }
    }
    Ok(options)
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

/// The soak, as `options` say.
pub async fn run(options: Options) -> Figures {
    let Options { duration, events, change_log_keep } = options;
    let (warm_up, warm_up_why) = if duration >= DEFAULT_DURATION {
        (FULL_WARM_UP, "the first 10 min".to_string())
    } else {
        let w = duration / 6;
        (w, format!("the first 1/6 of the run ({:.0} s; the run is under 60 min)", w.as_secs_f64()))
    };
    println!(
        "soak: {:.0} s; {ENTRIES} entries at a {TTL} s TTL, {WATCHERS} watchers, JWT and X509 \
         fetch loops, an entry created and one deleted every {} ms; warm-up: {warm_up_why}; \
         server event log {}; change log kept to {} changes",
        duration.as_secs_f64(),
        CHURN_EVERY.as_millis(),
        if events { "on" } else { "off (--no-events)" },
        change_log_keep.map_or("the default".to_string(), |n| n.to_string())
    );

    // A server and an agent in their own processes; the entries before the
    // agent starts, so it gets them all in its first sync.
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let heap_file = dir.path().join("server-heap");
    let heap_flag = format!("--heap-file={}", heap_file.display());
    let keep_flag = change_log_keep.map(|n| format!("--change-log-keep={n}"));
    let mut flags = vec![heap_flag.as_str()];
    if !events {
        flags.push("--no-events");
    }
    flags.extend(keep_flag.as_deref());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_soak_reads_its_flags_in_either_form_and_defaults_to_an_hour_with_events() {
        let none = options_from(&[]).unwrap();
        assert_eq!(
            none,
            Options { duration: DEFAULT_DURATION, events: true, change_log_keep: None }
        );
        let all = options_from(&args("--duration=90 --no-events --change-log-keep 2000")).unwrap();
        assert_eq!(
            all,
            Options {
                duration: Duration::from_secs(90),
                events: false,
                change_log_keep: Some(2000)
            }
        );
        let spaced = options_from(&args("--duration 2h --change-log-keep=5")).unwrap();
        assert_eq!((spaced.duration, spaced.change_log_keep), (Duration::from_secs(7200), Some(5)));
    }

    #[test]
    fn a_bad_soak_flag_is_a_one_line_error() {
        for (line, says) in [
            ("--change-log-keep 0", "positive whole number"),
            ("--change-log-keep=-3", "positive whole number"),
            ("--change-log-keep", "needs a value"),
            ("--duration", "needs a value"),
            ("--duration --no-events", "needs a value"),
            ("--duration 0", "at least 1 s"),
            ("--no-events=1", "unknown soak flag"),
            ("--quick", "unknown soak flag"),
        ] {
            let why = options_from(&args(line)).unwrap_err();
            assert!(why.contains(says) && !why.contains('\n'), "{line}: {why}");
        }
    }
}
