#![allow(clippy::unwrap_used)]
use super::*;
use crate::event_schema::{kind, EventExt};
use crate::store::kv::Op;
use prost::Message;
use tessera_proto::types::Workload;

fn log(dir: &std::path::Path, config: EventConfig) -> EventLog {
    let kv = Arc::new(crate::store::sled::SledKv::open(dir, 1 << 24).unwrap());
    EventLog::open(kv, config, Metrics::new()).unwrap()
}

/// Stores (`true`) or deletes entries, as far as the event log sees them:
/// it learns baselines only for stored entries.
fn entries(log: &EventLog, ids: &[&str], stored: bool) {
    let tree = crate::store::entries_tree();
    let op = |id: &&str| match stored {
        true => Op::Put(tree, id.as_bytes().to_vec(), b"entry".to_vec()),
        false => Op::Delete(tree, id.as_bytes().to_vec()),
    };
    log.kv.apply(ids.iter().map(op).collect()).unwrap();
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
    assert!(pushed.iter().all(|e| e.agent_id == agent), "attributed to the authenticated agent");
    let last = pushed.last().unwrap();
    assert_eq!(last.kind, "agent.unknown", "an agent cannot report admin decisions");
    assert!(last.attrs.iter().any(|a| a.key == "claimed_kind" && a.value == kind::ENTRY_CREATE));
    assert!(log.verify().unwrap().ok);
}

#[test]
fn anomalies_are_recorded_as_their_own_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig { refusals_per_minute: 3, ..Default::default() };
    let log = log(dir.path(), config);
    entries(&log, &["entry-1"], true);
    // The first executable is the baseline; a second one is an anomaly, once.
    log.record(vec![served("aa", 1), served("aa", 1), served("bb", 1), served("bb", 1)]);
    // The first audience is the baseline; a new one is an anomaly.
    let jwt = |aud: &str| {
        let mut e = schema::event(kind::JWT_ISSUE, schema::ALLOW).agent("a").entry("entry-1");
        e.audience = vec![aud.into()];
        e
    };
    log.record(vec![jwt("api"), jwt("other"), jwt("api")]);
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
    // Each anomaly comes right after the event that revealed it.
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .take(5)
        .map(|e| (e.kind.as_str(), e.workload.as_ref().map_or("", |w| w.sha256.as_str())))
        .collect();
    let served_kind = kind::WORKLOAD_X509;
    assert_eq!(
        kinds,
        [
            (served_kind, "aa"),
            (served_kind, "aa"),
            (served_kind, "bb"),
            (kind::ANOMALY_NEW_EXECUTABLE, "bb"),
            (served_kind, "bb")
        ]
    );
    let audience: Vec<&str> = events.iter().skip(5).take(4).map(|e| e.kind.as_str()).collect();
    let jwt_kind = kind::JWT_ISSUE;
    assert_eq!(audience, [jwt_kind, jwt_kind, kind::ANOMALY_UNUSUAL_AUDIENCE, jwt_kind]);
    let aud = of(kind::ANOMALY_UNUSUAL_AUDIENCE);
    assert_eq!(aud.len(), 1);
    assert_eq!(aud[0].audience, vec!["other".to_string()]);
    let bursts = of(kind::ANOMALY_REFUSAL_BURST);
    assert_eq!(bursts.len(), 2, "one for the agent, one for the uid: {bursts:?}");
    assert!(bursts.iter().any(|b| b.attrs.iter().any(|a| a.key == "uid" && a.value == "7")));
    assert!(log.verify().unwrap().ok);
}

/// An entry's baselines are forgotten once its deletion or expiry is
/// committed (its ID is never reused); another entry's stay, and neither a
/// refused deletion nor an agent's pushed event claiming one forgets
/// anything.
#[tokio::test]
async fn an_entrys_baselines_go_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path(), EventConfig::default());
    let of = |entry: &str, exe: &str| {
        schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .agent("a")
            .entry(entry)
            .workload(Workload { uid: 1, sha256: exe.into(), ..Default::default() })
    };
    let jwt = |entry: &str, aud: &str| {
        let mut e = schema::event(kind::JWT_ISSUE, schema::ALLOW).agent("a").entry(entry);
        e.audience = vec![aud.into()];
        e
    };
    // The forgetting runs on the ingestion thread, in order: a job queued
    // after it has seen it done.
    let settled = || async { log.ingest.run(|| ()).await.unwrap() };
    let baselines = || log.kv.range(BASELINES, b"", None, 100, false).unwrap().len();
    entries(&log, &["entry-1", "entry-2", "entry-3"], true);
    log.record(vec![of("entry-1", "aa"), jwt("entry-1", "https://api")]);
    log.record(vec![of("entry-2", "aa"), jwt("entry-2", "https://api"), of("entry-3", "aa")]);
    assert_eq!(baselines(), 5);
    // A refused deletion names whatever was asked for, here a prefix of
    // entry-2's audiences: it forgets nothing.
    log.record(vec![schema::denied(kind::ENTRY_DELETE, "no such entry").entry("entry-2/https:")]);
    log.record(vec![schema::denied(kind::ENTRY_DELETE, "no such entry").entry("entry-2")]);
    // Nor can an agent: its pushed event claiming a deletion is stored as
    // `agent.unknown`.
    let mut forged = schema::event(kind::ENTRY_DELETE, schema::ALLOW).entry("entry-2");
    forged.agent_seq = 1;
    log.store_pushed("spiffe://example.org/agent", b"spool", vec![forged]).unwrap();
    settled().await;
    assert_eq!(baselines(), 5);
    // The store deletes the entries and records the events in one commit.
    entries(&log, &["entry-1", "entry-3"], false);
    log.record(vec![
        schema::event(kind::ENTRY_DELETE, schema::ALLOW).entry("entry-1"),
        schema::event(kind::ENTRY_EXPIRE, "").entry("entry-3"),
    ]);
    settled().await;
    assert_eq!(baselines(), 2, "only entry-2's executable and audience are left");
    // What the agent served entry-1 just before its deletion arrives after
    // it: nothing is learned for an entry that is gone (nothing is usual
    // for it any more, so nothing is unusual either); entry-2's baseline
    // still holds, and grows.
    let mut late = of("entry-1", "bb");
    late.agent_seq = 2;
    log.store_pushed("spiffe://example.org/agent", b"spool", vec![late]).unwrap();
    log.record(vec![of("entry-1", "cc"), jwt("entry-3", "https://other"), of("entry-2", "bb")]);
    settled().await;
    let anomalies: Vec<Event> =
        all(&log).into_iter().filter(|e| e.kind == kind::ANOMALY_NEW_EXECUTABLE).collect();
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert_eq!(anomalies[0].entry_ids, vec!["entry-2".to_string()]);
    let left: Vec<String> = log
        .kv
        .range(BASELINES, b"", None, 100, false)
        .unwrap()
        .into_iter()
        .map(|(key, _)| String::from_utf8(key).unwrap())
        .collect();
    assert_eq!(left, ["aud/entry-2/https://api", "exe/entry-2/aa", "exe/entry-2/bb"]);
    let known = log.known.lock().unwrap();
    assert!(
        !known.contains(anomaly::EXE, "entry-1", "bb")
            && !known.contains(anomaly::AUD, "entry-3", "https://other")
    );
}

/// An agent folds a uid's excess refusals into one event with
/// `folded=N`: the burst detector counts it as N.
#[test]
fn a_folded_refusal_counts_as_many_for_the_burst_detector() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig { refusals_per_minute: 30, ..Default::default() };
    let log = log(dir.path(), config);
    let mut folded =
        schema::denied(kind::WORKLOAD_X509, "no identity issued").agent("a").attr("folded", 4990);
    folded.workload = Some(Workload { uid: 65534, ..Default::default() });
    log.record(vec![folded]);
    let bursts = all(&log).into_iter().filter(|e| e.kind == kind::ANOMALY_REFUSAL_BURST).count();
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

/// On PostgreSQL (shared by several servers) as on sled: an edited event,
/// a removed one, and a cut-off tail are each found — the first two by
/// `verify` itself, the last by the head hash recorded before.
#[test]
fn a_tampered_or_truncated_chain_on_postgresql_is_found() {
    let url = crate::pg_cluster::PgCluster::shared().database();
    let kv: Arc<dyn Kv> = Arc::new(crate::store::postgres::PgKv::connect(&url).unwrap());
    let log = EventLog::open(kv.clone(), EventConfig::default(), Metrics::new()).unwrap();
    // One commit each: one row each (a commit's events share a row).
    for _ in 0..6 {
        log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
    }
    let whole = log.verify().unwrap();
    assert!(whole.ok && whole.checked == 6, "{whole:?}");

    // An edited event: its hash no longer matches.
    let key = 3u64.to_be_bytes().to_vec();
    let mut third = Event::decode(kv.get(EVENTS, &key).unwrap().unwrap().as_slice()).unwrap();
    third.reason = "edited".into();
    kv.apply(vec![Op::Put(EVENTS, key.clone(), third.encode_to_vec())]).unwrap();
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 3, "{report:?}");

    // A removed event: the sequence has a hole.
    kv.apply(vec![Op::Delete(EVENTS, key)]).unwrap();
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 3, "{report:?}");
    assert!(report.problem.contains("missing"), "{report:?}");

    // A cut-off tail: the chain left is whole, but its head is not the one
    // recorded before.
    let url = crate::pg_cluster::PgCluster::shared().database();
    let kv: Arc<dyn Kv> = Arc::new(crate::store::postgres::PgKv::connect(&url).unwrap());
    let log = EventLog::open(kv.clone(), EventConfig::default(), Metrics::new()).unwrap();
    for _ in 0..4 {
        log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
    }
    let recorded = log.verify().unwrap().head_hash;
    kv.apply(vec![Op::Delete(EVENTS, 4u64.to_be_bytes().to_vec())]).unwrap();
    // The server that wrote event 4 knows it is gone.
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 4, "{report:?}");
    // A server started afresh (or another one) sees a whole, shorter
    // chain: only the head recorded before tells.
    let fresh = EventLog::open(kv, EventConfig::default(), Metrics::new()).unwrap();
    let report = fresh.verify().unwrap();
    assert!(report.ok && report.last_seq == 3, "{report:?}");
    assert_ne!(report.head_hash, recorded, "a cut-off tail changes the head");
}

/// An agent's answer naming 200 SVIDs is stored deflated (at least halved),
/// listed as it was recorded, and the chain over it verifies; damaged
/// stored bytes are found by `verify` as an event that cannot be decoded.
#[test]
fn large_events_are_stored_deflated_and_damage_to_them_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(crate::store::sled::SledKv::open(dir.path(), 1 << 24).unwrap());
    let log = EventLog::open(kv.clone(), EventConfig::default(), Metrics::new()).unwrap();
    let mut answer = served("aa", 1);
    for i in 0..200 {
        answer = answer
            .spiffe_id(format!("spiffe://example.org/soak/workload/{i}"))
            .entry(uuid::Uuid::new_v4().to_string());
    }
    for e in [schema::event(kind::JOIN_TOKEN, schema::ALLOW), answer.clone(), answer] {
        log.record(vec![e]);
    }
    let listed = all(&log);
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[1].spiffe_ids.len(), 200);
    assert_eq!(
        (&listed[1].entry_ids, &listed[1].spiffe_ids),
        (&listed[2].entry_ids, &listed[2].spiffe_ids)
    );
    let key = 2u64.to_be_bytes();
    let mut bytes = kv.get(EVENTS, &key).unwrap().unwrap();
    assert!(bytes.len() * 2 < listed[1].encode_to_vec().len(), "{} bytes stored", bytes.len());
    assert!(log.verify().unwrap().ok);

    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    kv.apply(vec![Op::Put(EVENTS, key.to_vec(), bytes)]).unwrap();
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 2, "{report:?}");
    assert!(report.problem.contains("cannot be decoded"), "{report:?}");
    assert!(log.list(&ListEventsRequest::default(), 0, 0).is_err(), "listing says so too");
}

/// A commit's events share rows (up to `stored::ROW_MAX` a row, and
/// `sled::ROW_BYTES`): a listing
/// that starts inside a row gets exactly the events after it, the chain
/// verifies across rows and a reopen, an event edited inside a row is
/// found as itself, and pruning drops whole rows and moves the anchor to
/// the last event of the last one.
#[test]
fn a_commits_events_share_rows_and_each_is_listed_checked_and_pruned_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let kv: Arc<dyn Kv> = Arc::new(crate::store::sled::SledKv::open(dir.path(), 1 << 24).unwrap());
    let n = stored::ROW_MAX as u64 + 6;
    {
        let log = EventLog::open(kv.clone(), EventConfig::default(), Metrics::new()).unwrap();
        log.record((0..n).map(|_| schema::event(kind::JOIN_TOKEN, schema::ALLOW)).collect());
        let rows = kv.range(EVENTS, &[], None, 100, false).unwrap();
        let firsts: Vec<u64> = rows.iter().map(|(k, _)| seq_of(k)).collect();
        assert!(firsts.len() >= 2 && firsts[0] == 1, "rows from 1: {firsts:?}");
        for (key, bytes) in &rows {
            let held = stored::decode_row(bytes, seq_of(key)).unwrap().len();
            assert!(held <= stored::ROW_MAX, "{held} events in a row");
            let limit = crate::store::sled::ROW_BYTES;
            assert!(held == 1 || bytes.len() <= limit, "a row of {} bytes", bytes.len());
        }
        let end_of_first = firsts[1] - 1;
        for after in [0, 3, end_of_first, end_of_first + 1, n - 1, n] {
            let (listed, _) = log.list(&ListEventsRequest::default(), after, 0).unwrap();
            let seqs: Vec<u64> = listed.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (after + 1..=n).collect::<Vec<_>>(), "after {after}");
        }
        let (two, last) = log.list(&ListEventsRequest::default(), 5, 2).unwrap();
        assert_eq!((two.iter().map(|e| e.seq).collect::<Vec<_>>(), last), (vec![6, 7], 7));
    }
    // Reopened: the chain goes on from the last row's last event.
    let log = EventLog::open(kv.clone(), EventConfig::default(), Metrics::new()).unwrap();
    log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
    let report = log.verify().unwrap();
    assert!(report.ok && report.checked == n + 1 && report.last_seq == n + 1, "{report:?}");

    // Event 5 edited inside its row: found as event 5.
    let key = 1u64.to_be_bytes();
    let mut row = stored::decode_row(&kv.get(EVENTS, &key).unwrap().unwrap(), 1).unwrap();
    row[4].reason = "edited".into();
    let (_, bytes) = stored::encode_rows(&row).pop().unwrap();
    kv.apply(vec![Op::Put(EVENTS, key.to_vec(), bytes.clone())]).unwrap();
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 5, "{report:?}");
    assert!(report.problem.contains("altered"), "{report:?}");
    // A row cut short does not decode, and says where.
    kv.apply(vec![Op::Put(EVENTS, key.to_vec(), bytes[..bytes.len() - 3].to_vec())]).unwrap();
    let report = log.verify().unwrap();
    assert!(!report.ok && report.broken_at == 1, "{report:?}");
    assert!(report.problem.contains("cannot be decoded"), "{report:?}");
    row[4].reason.clear();
    let (_, bytes) = stored::encode_rows(&row).pop().unwrap();
    kv.apply(vec![Op::Put(EVENTS, key.to_vec(), bytes)]).unwrap();
    assert!(log.verify().unwrap().ok);

    // Pruned: whole rows go, the anchor is the last event of the last.
    let config = EventConfig { retention_secs: 1, ..EventConfig::default() };
    let log = EventLog::open(kv.clone(), config, Metrics::new()).unwrap();
    assert_eq!(log.prune(schema::now_ms() + 60_000).unwrap(), n as usize + 1);
    assert!(kv.range(EVENTS, &[], None, 10, false).unwrap().is_empty());
    log.record(vec![schema::event(kind::JOIN_TOKEN, schema::ALLOW)]);
    let report = log.verify().unwrap();
    assert!(report.ok && report.first_seq == n + 2 && report.checked == 1, "{report:?}");
}
