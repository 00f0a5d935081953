#![allow(clippy::unwrap_used)]
use super::fold::{FOLD_INTERVAL, REFUSALS_PER_INTERVAL};
use super::*;
use crate::event_schema::EventExt;

fn spool(dir: &Path, max_bytes: u64) -> EventSpool {
    EventSpool::open(dir, "spiffe://example.org/agent".into(), max_bytes, true, AgentMetrics::new())
        .unwrap()
}

fn fetch(n: u32) -> Event {
    schema::event(kind::WORKLOAD_X509, schema::ALLOW).attr("n", n)
}

/// Every spooled event, read back as a push reads them.
fn events(spool: &EventSpool) -> Vec<Event> {
    spool.sync();
    let events = spool.batch(usize::MAX).events;
    assert_eq!(events.len(), spool.depth(), "the test's events fit in one push");
    events
}

fn queued(spool: &EventSpool) -> Vec<(u64, String)> {
    events(spool)
        .into_iter()
        .map(|e| (e.agent_seq, e.attrs.first().map(|a| a.value.clone()).unwrap_or_default()))
        .collect()
}

#[test]
fn spooled_events_survive_a_reopen_and_a_torn_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let first = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    for n in 0..3 {
        first.emit(fetch(n));
    }
    first.sync();
    let before = queued(&first);
    let spool_id = first.batch(1).spool_id;
    drop(first);
    // A crash in the middle of the next record.
    let mut file =
        std::fs::OpenOptions::new().append(true).open(dir.path().join("events.spool")).unwrap();
    file.write_all(&[0, 0, 0, 40, 1, 2, 3]).unwrap();
    drop(file);
    let second = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    assert_eq!(queued(&second), before);
    assert_eq!(second.batch(1).spool_id, spool_id, "the same spool continues");
    second.emit(fetch(3));
    assert_eq!(queued(&second).last().unwrap().0, 4, "sequence numbers continue");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("events.spool")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn acknowledged_events_are_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let first = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    for n in 0..5 {
        first.emit(fetch(n));
    }
    first.sync();
    let Batch { spool_id, events: batch, .. } = first.batch(PUSH_BATCH);
    assert_eq!(batch.len(), 5);
    first.ack(&spool_id, 3);
    assert_eq!(queued(&first).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("events.acked")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "events.acked is the owner's only");
    // An answer for another spool changes nothing.
    first.ack(&[9; 16], 5);
    assert_eq!(first.depth(), 2);
    drop(first);
    let second = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    assert_eq!(queued(&second).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5]);
    let id = second.batch(1).spool_id;
    second.ack(&id, 5);
    assert_eq!(second.depth(), 0);
    drop(second);
    // Nothing left: the next run starts a new spool from 1.
    let third = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    assert_ne!(third.batch(1).spool_id, spool_id);
    third.emit(fetch(9));
    assert_eq!(queued(&third)[0].0, 1);
}

fn refused(uid: u32, n: u32) -> Event {
    schema::denied(kind::WORKLOAD_REFUSED, format!("refusal {n}"))
        .workload(tessera_proto::types::Workload { uid, ..Default::default() })
}

#[test]
fn refusals_past_a_uids_share_are_folded_into_one_event_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    for n in 0..1000 {
        spool.emit(refused(65534, n));
    }
    // Another uid, and allowed events, are not held back by it.
    spool.emit(refused(1000, 0));
    spool.emit(fetch(0));
    assert_eq!(spool.depth() as u64, REFUSALS_PER_INTERVAL + 2);
    spool.flush_folded();
    assert_eq!(spool.depth() as u64, REFUSALS_PER_INTERVAL + 2, "the interval has not ended");
    spool.flush_folded_at(tokio::time::Instant::now() + FOLD_INTERVAL, false);
    let queue = events(&spool);
    let folded = queue.last().unwrap();
    let attr = |k: &str| folded.attrs.iter().find(|a| a.key == k).map(|a| a.value.clone());
    assert_eq!(attr("folded").as_deref(), Some("990"), "{folded:?}");
    assert_eq!(folded.workload.as_ref().unwrap().uid, 65534);
    assert_eq!(folded.kind, kind::WORKLOAD_REFUSED);
    assert!(folded.reason.contains("refusal 999"), "{}", folded.reason);
    assert_eq!(queue.len() as u64, REFUSALS_PER_INTERVAL + 3);
}

#[test]
fn a_full_spool_counts_what_it_drops_and_reports_it_when_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let size = record(&fetch(0)).len() as u64 + 40;
    let spool = spool(dir.path(), size * 4);
    for n in 0..10 {
        spool.emit(fetch(n));
    }
    let kept = spool.depth();
    assert!((3..=4).contains(&kept), "{kept} events kept");
    let id = spool.batch(PUSH_BATCH).spool_id;
    spool.ack(&id, 100);
    spool.emit(fetch(10));
    let queue = events(&spool);
    let overflow = &queue[0];
    assert_eq!(overflow.kind, kind::SPOOL_OVERFLOW);
    let dropped = 10 - kept;
    assert!(overflow.reason.contains(&format!("{dropped} events")), "{}", overflow.reason);
    assert!(overflow
        .attrs
        .iter()
        .any(|a| a.key == "dropped.workload.x509" && a.value == dropped.to_string()));
    assert_eq!(queue[1].kind, kind::WORKLOAD_X509);
}

/// A fetch that serves hundreds of SVIDs names each: 500 such events are
/// larger than the server decodes in one request. A push takes what fits
/// in PUSH_BYTES (one event at least, however large), so the spool drains
/// instead of retrying a refused push while it fills.
#[test]
fn a_push_batch_stays_under_the_byte_budget_and_never_empty() {
    let dir = tempfile::tempdir().unwrap();
    let spooled = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    let big = |n: u32, svids: usize| {
        let mut e = fetch(n);
        for i in 0..svids {
            e = e.spiffe_id(format!("spiffe://example.org/soak/{i}")).entry(format!("{i:036}"));
        }
        e.serial = (0..svids).map(|i| format!("{i:032x}")).collect::<Vec<_>>().join(",");
        e
    };
    for n in 0..500 {
        spooled.emit(big(n, 200));
    }
    spooled.sync();
    let batch = spooled.batch(PUSH_BATCH).events;
    let bytes: usize = batch.iter().map(|e| e.encoded_len() + 8).sum();
    assert!(!batch.is_empty() && batch.len() < 500, "{} events", batch.len());
    assert!(bytes <= PUSH_BYTES, "{bytes} bytes in one push");
    let all = spooled.inner.lock().unwrap().bytes as usize;
    assert!(
        all > tessera_common::rules::MAX_NODE_REQUEST_BYTES,
        "the test needs {all} > the limit"
    );

    let dir = tempfile::tempdir().unwrap();
    let alone = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    alone.emit(big(0, 20_000));
    alone.emit(fetch(1));
    alone.sync();
    let batch = alone.batch(PUSH_BATCH).events;
    assert_eq!(batch.len(), 1, "an event past the budget goes alone");
}

/// Memory holds where records are, not the events: a push reads them back
/// from the file, only once they are on disk (a sequence number the server
/// stored is never given again after a crash), and after a compaction
/// that moved them while more were spooled; a restart finds the same events.
#[test]
fn events_are_read_back_from_the_file_across_writes_compactions_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let spooled = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    for n in 0..2000 {
        spooled.emit(fetch(n));
    }
    spooled.sync();
    for n in 2000..2010 {
        spooled.emit(fetch(n)); // not written yet
    }
    let pushed =
        |s: &EventSpool| s.batch(usize::MAX).events.iter().map(|e| e.agent_seq).collect::<Vec<_>>();
    assert_eq!(pushed(&spooled), (1..=2000).collect::<Vec<_>>(), "only what is on disk");
    let file_len = std::fs::metadata(dir.path().join("events.spool")).unwrap().len();
    let id = spooled.batch(1).spool_id;
    // Most of the file acknowledged: it is compacted (the 10 unwritten
    // records go with it), the rest moves.
    spooled.ack(&id, 1500);
    let compacted = std::fs::metadata(dir.path().join("events.spool")).unwrap().len();
    assert!(compacted < file_len / 2, "{compacted} bytes after compaction, {file_len} before");
    assert_eq!(pushed(&spooled), (1501..=2010).collect::<Vec<_>>());
    spooled.emit(fetch(2010));
    assert_eq!(pushed(&spooled), (1501..=2010).collect::<Vec<_>>());
    spooled.sync();
    assert_eq!(pushed(&spooled), (1501..=2011).collect::<Vec<_>>());
    assert_eq!(queued(&spooled).last().unwrap(), &(2011, "2010".to_string()));
    assert_eq!(spooled.batch(1).spool_id, id, "a compaction keeps the spool and its numbering");
    drop(spooled);
    let again = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    assert_eq!(pushed(&again), (1501..=2011).collect::<Vec<_>>());
    again.emit(fetch(2011));
    assert_eq!(queued(&again).last().unwrap().0, 2012, "numbering goes on after a restart");
}

/// A damaged record is skipped and named, so that the pusher can give it
/// up when nothing after it can be pushed; it never holds the spool back.
/// A tail of zeros (a file extended but not written) is not a record.
#[test]
fn a_damaged_record_is_given_up_and_zeros_are_not_records() {
    let dir = tempfile::tempdir().unwrap();
    let spooled = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    spooled.emit(fetch(0));
    spooled.emit(fetch(1));
    spooled.sync();
    // Flip a byte inside the first record's event.
    let path = dir.path().join("events.spool");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = HEADER_LEN as usize + 10;
    bytes[at] ^= 0xff;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&bytes[at..=at], at as u64).unwrap();
    let first = spooled.batch(1);
    assert!(first.events.is_empty());
    assert_eq!(first.damaged, Some(1));
    spooled.ack(&first.spool_id, 1);
    assert_eq!(
        spooled.batch(usize::MAX).events.iter().map(|e| e.agent_seq).collect::<Vec<_>>(),
        [2]
    );
    drop(spooled);

    // At the next start the damaged record is skipped, what follows it is
    // kept, and zeros after the last record are cut off; numbering goes on.
    let file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    (&file).write_all(&[0u8; 64]).unwrap();
    let again = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    assert_eq!(queued(&again), [(2, "1".to_string())]);
    again.emit(fetch(2));
    assert_eq!(queued(&again).last().unwrap().0, 3);
}

/// A fetch loop answered with the same SVIDs thousands of times in an
/// interval spools two events: the first answer, and one that counts the
/// rest when the interval ends.
#[test]
fn repeated_answers_spool_two_events_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let spooled = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    let answer = || {
        schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .workload(tessera_proto::types::Workload { pid: 42, uid: 1000, ..Default::default() })
            .spiffe_id("spiffe://example.org/app".to_string())
    };
    for _ in 0..5000 {
        spooled.emit(answer());
    }
    assert_eq!(spooled.depth(), 1);
    spooled.flush_folded_at(tokio::time::Instant::now() + FOLD_INTERVAL, false);
    let queue = events(&spooled);
    assert_eq!(queue.len(), 2);
    let folded = queue[1].attrs.iter().find(|a| a.key == "folded").map(|a| a.value.as_str());
    assert_eq!(folded, Some("4999"));
}

#[test]
fn a_write_that_fails_keeps_its_events_until_a_later_write_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool(dir.path(), DEFAULT_SPOOL_BYTES);
    spool.emit(fetch(0));
    spool.sync();
    // Every write to the spool fails from now on (a handle that cannot
    // write stands in for a full or failing disk; reads still work).
    let read_only = std::fs::File::open(dir.path().join("events.spool")).unwrap();
    let real = std::mem::replace(&mut *spool.file.lock().unwrap(), read_only);
    for n in 1..4 {
        spool.emit(fetch(n));
    }
    spool.sync();
    spool.sync();
    assert_eq!(spool.depth(), 4, "the events whose writes failed are still queued");
    {
        let inner = spool.inner.lock().unwrap();
        assert!(!inner.unwritten.is_empty(), "and still waiting to be written");
        assert_eq!(inner.written() + inner.unwritten.len() as u64, inner.file_len);
    }
    let pushed = spool.batch(usize::MAX).events;
    assert_eq!(pushed.len(), 1, "only what is on disk is pushed");
    let on_disk = std::fs::metadata(dir.path().join("events.spool")).unwrap().len();
    // The disk has room again: the next sync writes them, in order, after
    // the first, and a restart finds them all.
    *spool.file.lock().unwrap() = real;
    spool.emit(fetch(4));
    let expected: Vec<(u64, String)> = (0..5).map(|n| (n + 1, n.to_string())).collect();
    assert_eq!(queued(&spool), expected);
    assert!(std::fs::metadata(dir.path().join("events.spool")).unwrap().len() > on_disk);
    drop(spool);
    assert_eq!(queued(&self::spool(dir.path(), DEFAULT_SPOOL_BYTES)), expected);
}
