//! Several servers on one PostgreSQL database.

use super::*;

fn two() -> (Place, KvStore, KvStore) {
    let place = Place::postgres();
    let (a, b) = (place.open_as("server-a"), place.open_as("server-b"));
    (place, a, b)
}

/// Runs `work(store, i)` for `i` in `0..n` on as many threads at
/// once, even `i` on server A and odd on B; the results in order.
fn at_once<T: Send + 'static>(
    a: &Arc<KvStore>,
    b: &Arc<KvStore>,
    n: usize,
    work: fn(&KvStore, usize) -> T,
) -> Vec<T> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || work(&store, i))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Writers on two servers at once: the log has every change once,
/// numbered without holes, and both servers read the same log.
#[test]
fn two_servers_share_one_change_log_without_holes() {
    let (_place, a, b) = two();
    let (a, b) = (Arc::new(a), Arc::new(b));
    at_once(&a, &b, 4, |store, w| {
        for i in 0..25 {
            let e = entry(&format!("e{w}-{i}"), &format!("w{w}-{i}"), "agent", 1);
            assert!(store.create_entries(&[e], &Audit::quiet()).unwrap()[0].is_ok());
        }
    });
    for store in [&a, &b] {
        let revisions: Vec<u64> =
            store.changes_since(0, 1000).unwrap().iter().map(|c| c.revision).collect();
        assert_eq!(revisions, (1..=100).collect::<Vec<_>>());
        assert_eq!(store.revision().unwrap(), 100);
        assert_eq!(store.entry_count(), 100);
    }
}

/// A commit on one server wakes the other's change feed (NOTIFY).
#[test]
fn a_commit_on_one_server_wakes_the_other() {
    let (_place, a, b) = two();
    let mut woken = b.subscribe();
    // The listener connects in the background: commit until it hears.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        a.create_entries(&[entry(&format!("e{n}"), &format!("w{n}"), "agent", 1)], &Audit::quiet())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        if woken.has_changed().unwrap() && *woken.borrow_and_update() >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "server B never heard of A's commits");
    }
    assert_eq!(b.changes_since(0, 100).unwrap().len(), n);
}

/// A join token is taken once, whichever servers race for it.
#[test]
fn a_join_token_is_taken_once_across_servers() {
    let (_place, a, b) = two();
    let (a, b) = (Arc::new(a), Arc::new(b));
    for i in 0..20 {
        let token = pb::JoinToken {
            token: format!("t{i}"),
            spiffe_id: "spiffe://example.org/a".into(),
            expires_at: 5,
            pending: None,
            approved: false,
        };
        a.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
    }
    let takers: Vec<_> = [a.clone(), b.clone(), a, b]
        .into_iter()
        .map(|store| {
            std::thread::spawn(move || {
                (0..20)
                    .filter(|i| {
                        store.take_join_token(&format!("t{i}"), &Audit::quiet()).unwrap().is_some()
                    })
                    .count()
            })
        })
        .collect();
    let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(taken, 20, "every token taken exactly once");
}

/// Two servers rotating their CAs at once: each publishes only its
/// own records, so the bundle is always the union of both latest sets.
#[test]
fn two_servers_rotating_at_once_keep_one_whole_bundle() {
    let (_place, a, b) = two();
    let (a, b) = (Arc::new(a), Arc::new(b));
    at_once(&a, &b, 2, |store, i| {
        let name = ["a", "b"][i];
        for seq in 1..=30 {
            store.publish_cas(name, &[ca_record(name, seq), ca_record(name, seq + 1)]).unwrap();
        }
    });
    for store in [&a, &b] {
        let mut held: Vec<(String, u32)> =
            store.cas().unwrap().into_iter().map(|r| (r.server_id, r.seq)).collect();
        held.sort();
        assert_eq!(held, [("a".into(), 30), ("a".into(), 31), ("b".into(), 30), ("b".into(), 31)]);
    }
}

/// An agent's signing budget is one across servers: what it took
/// on A is gone on B; time refills it.
#[test]
fn a_signing_budget_is_shared_across_servers() {
    let (_place, a, b) = two();
    let (rate, burst) = (100, 1000);
    assert_eq!(a.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(true));
    assert_eq!(b.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(false));
    assert_eq!(b.take_shared_budget("agent", 400, rate, burst, 0).unwrap(), Some(true));
    assert_eq!(a.take_shared_budget("agent", 1, rate, burst, 0).unwrap(), Some(false));
    assert_eq!(a.take_shared_budget("other", 1000, rate, burst, 0).unwrap(), Some(true));
    // One second later: 100 more, no more.
    assert_eq!(a.take_shared_budget("agent", 100, rate, burst, 1000).unwrap(), Some(true));
    assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 1000).unwrap(), Some(false));
    // A server whose clock is behind does not refill it.
    assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 500).unwrap(), Some(false));
}

/// Eight callers on two servers at once never take more than the
/// bucket holds.
#[test]
fn concurrent_takes_on_two_servers_never_exceed_the_budget() {
    let (_place, a, b) = two();
    let (a, b) = (Arc::new(a), Arc::new(b));
    let taken: usize = at_once(&a, &b, 8, |store, _| {
        (0..40)
            .filter(|_| store.take_shared_budget("agent", 10, 0, 1000, 0).unwrap() == Some(true))
            .count()
    })
    .into_iter()
    .sum();
    assert_eq!(taken * 10, 1000, "exactly the burst, no more, no less");
}

/// A ban on one server is enforced by the other, and a renewal
/// racing it on the other server cannot undo it.
#[test]
fn a_ban_on_one_server_holds_on_the_other() {
    let (_place, a, b) = two();
    let id = "spiffe://example.org/agent";
    a.register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
        .unwrap()
        .unwrap();
    b.ban_agent(id, "test", 1, &Audit::quiet()).unwrap().unwrap();
    assert_eq!(a.check_agent(id, "s0").unwrap(), Err(AgentRefusal::Banned(id.into())));
    let refused = a.renew_agent(id, "s0", &agent_svid("agent", "s1"), 2, &Audit::quiet()).unwrap();
    assert_eq!(refused.err(), Some(AgentRefusal::Banned(id.into())));
}
