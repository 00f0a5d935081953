//! Conformance: the token broker's records — tasks, access tokens, held
//! requests and keys — and a task ended on one server seen by another.

use super::*;
use crate::broker::records::{
    AccessToken, BrokerRefusal, PendingRequest, PublishedKey, RequestState, Task, TokenToRecord,
};

const W: &str = "spiffe://example.org/agent/w";
const OTHER: &str = "spiffe://example.org/agent/other";

pub(super) fn task(id: &str, spiffe_id: &str, created_at: i64, expires_at: i64) -> Task {
    Task {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        labels: [("ticket".to_string(), "T-1".to_string())].into(),
        parent: String::new(),
        started_by: "uid:1000".into(),
        created_at,
        expires_at,
        ended_at: 0,
        ended_by: String::new(),
        tokens_issued: 0,
        done: Vec::new(),
    }
}

fn sub_task(id: &str, parent: &str, spiffe_id: &str) -> Task {
    Task { parent: parent.into(), started_by: spiffe_id.into(), ..task(id, spiffe_id, 10, 500) }
}

pub(super) fn token(jti: &str, task: &str, sub: &str, exp: i64) -> AccessToken {
    AccessToken {
        jti: jti.into(),
        sub: sub.into(),
        aud: "https://payments.example".into(),
        task: task.into(),
        scope: "read".into(),
        authorization_details: String::new(),
        actor: String::new(),
        client_id: sub.into(),
        iat: 10,
        exp,
        request: String::new(),
        revoked_at: 0,
    }
}

fn held(id: &str, task: &str, created_at: i64, expires_at: i64) -> PendingRequest {
    PendingRequest {
        id: id.into(),
        content_hash: format!("hash-of-{id}"),
        spiffe_id: W.into(),
        agent_id: "spiffe://example.org/node".into(),
        task: task.into(),
        tool: "https://payments.example".into(),
        actions: vec!["transfer".into()],
        targets: vec!["acct:*".into()],
        content: "{}".into(),
        blast_radius: 50,
        policies: vec!["big-transfer".into()],
        why: "blast radius 50 > 20".into(),
        excluded_uids: vec![1000],
        created_at,
        expires_at,
        state: RequestState::Pending,
        decided_by: String::new(),
        reason: String::new(),
    }
}

fn start(store: &KvStore, task: &Task) -> Result<(), BrokerRefusal> {
    store.start_task(task, &Audit::quiet()).unwrap()
}

fn record(store: &KvStore, token: &AccessToken, now: i64) -> Result<(), BrokerRefusal> {
    store.record_access_token(token, &["read acct:1".into()], now, &Audit::quiet()).unwrap()
}

fn decide(
    store: &KvStore,
    id: &str,
    hash: &str,
    approve: bool,
    uid: u32,
    now: i64,
) -> Result<PendingRequest, BrokerRefusal> {
    store.decide_request(id, hash, approve, uid, "checked", now, &Audit::quiet()).unwrap()
}

fn active(store: &KvStore, jti: &str, now: i64) -> bool {
    let token = store.access_token(jti).unwrap().unwrap();
    token.is_active(store.task(&token.task).unwrap().as_ref(), now)
}

pub(super) fn a_task_ends_once_with_its_sub_tasks_and_its_tokens_go_inactive(place: Place) {
    let store = place.open();
    start(&store, &task("task-1", W, 0, 1000)).unwrap();
    assert!(
        matches!(start(&store, &task("task-1", W, 0, 1000)), Err(BrokerRefusal::TaskExists(_))),
        "an ID is never taken twice"
    );
    start(&store, &sub_task("task-1a", "task-1", W)).unwrap();
    start(&store, &sub_task("task-1a-i", "task-1a", W)).unwrap();
    assert_eq!(
        start(&store, &sub_task("task-x", "task-1", OTHER)),
        Err(BrokerRefusal::TaskNotYours { task: "task-1".into(), owner: W.into() })
    );
    assert_eq!(
        start(&store, &sub_task("task-y", "task-none", W)),
        Err(BrokerRefusal::UnknownTask("task-none".into()))
    );
    start(&store, &task("task-2", W, 5, 1000)).unwrap();
    for (jti, task) in
        [("j1", "task-1"), ("j1a", "task-1a"), ("j1ai", "task-1a-i"), ("j2", "task-2")]
    {
        record(&store, &token(jti, task, W, 900), 20).unwrap();
        assert!(active(&store, jti, 20), "{jti}");
    }

    let ended = store.end_task("task-1", 30, "uid:0: done", &Audit::quiet()).unwrap().unwrap();
    assert_eq!((ended.ended_at, ended.ended_by.as_str()), (30, "uid:0: done"));
    for jti in ["j1", "j1a", "j1ai"] {
        assert!(!active(&store, jti, 31), "{jti}: inactive once its task (or an ancestor) ended");
    }
    assert!(active(&store, "j2", 31), "another task's token is untouched");
    let sub = store.task("task-1a-i").unwrap().unwrap();
    assert_eq!(sub.ended_at, 30);
    assert!(sub.ended_by.contains("task-1a"), "{}", sub.ended_by);
    assert_eq!(
        store.end_task("task-1", 40, "uid:0: again", &Audit::quiet()).unwrap(),
        Err(BrokerRefusal::TaskEnded("task-1".into()))
    );
    assert_eq!(store.task("task-1").unwrap().unwrap().ended_by, "uid:0: done", "unchanged");
    assert_eq!(
        store.end_task("task-none", 40, "uid:0", &Audit::quiet()).unwrap(),
        Err(BrokerRefusal::UnknownTask("task-none".into()))
    );
    // A sub-task of an ended task cannot be started.
    assert_eq!(
        start(&store, &Task { created_at: 35, ..sub_task("task-1b", "task-1", W) }),
        Err(BrokerRefusal::TaskEnded("task-1".into()))
    );

    let ids: Vec<String> = store.tasks().unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["task-1", "task-2", "task-1a", "task-1a-i"], "by created_at");
    assert!(store.expired_tasks(999).unwrap().is_empty());
    assert_eq!(store.expired_tasks(1000).unwrap(), ["task-2"], "ended ones are not listed");
    // The expiry loop ends it like an operator would.
    store.end_task("task-2", 1000, "expired", &Audit::quiet()).unwrap().unwrap();
    assert!(!active(&store, "j2", 1000));
    // Everything survives a restart.
    drop(store);
    let store = place.open();
    assert_eq!(store.tasks().unwrap().len(), 4);
    assert!(!active(&store, "j1", 31));
}

pub(super) fn an_access_token_is_recorded_only_under_a_live_task_of_its_workload(place: Place) {
    let store = place.open();
    start(&store, &task("task-1", W, 0, 100)).unwrap();
    start(&store, &task("task-2", W, 0, 100)).unwrap();
    store.end_task("task-2", 5, "uid:0: stop", &Audit::quiet()).unwrap().unwrap();
    let refused = [
        (token("j", "task-none", W, 90), 10, BrokerRefusal::UnknownTask("task-none".into())),
        (token("j", "task-2", W, 90), 10, BrokerRefusal::TaskEnded("task-2".into())),
        (token("j", "task-1", W, 90), 100, BrokerRefusal::TaskEnded("task-1".into())),
        (
            token("j", "task-1", OTHER, 90),
            10,
            BrokerRefusal::TaskNotYours { task: "task-1".into(), owner: W.into() },
        ),
    ];
    for (token, now, refusal) in refused {
        assert_eq!(record(&store, &token, now), Err(refusal));
        assert!(store.access_token("j").unwrap().is_none(), "nothing stored");
    }
    assert_eq!(store.task("task-1").unwrap().unwrap().tokens_issued, 0);

    record(&store, &token("j1", "task-1", W, 90), 10).unwrap();
    store
        .record_access_token(
            &token("j2", "task-1", W, 90),
            &["read acct:1".into(), "write acct:2".into()],
            11,
            &Audit::quiet(),
        )
        .unwrap()
        .unwrap();
    let noted = store.task("task-1").unwrap().unwrap();
    assert_eq!(noted.tokens_issued, 2);
    assert_eq!(noted.done, ["read acct:1", "write acct:2"], "each pair once, oldest first");
    assert_eq!(store.access_token("j1").unwrap(), Some(token("j1", "task-1", W, 90)));
    assert!(active(&store, "j1", 89));
    assert!(!active(&store, "j1", 90), "expired");

    // A token issued on an approval uses it, once.
    let approved = |id: &str, expires_at| PendingRequest {
        state: RequestState::Approved,
        ..held(id, "task-1", 10, expires_at)
    };
    store.put_request(&held("req-pending", "task-1", 10, 50), &Audit::quiet()).unwrap().unwrap();
    store.put_request(&approved("req-ok", 50), &Audit::quiet()).unwrap().unwrap();
    store.put_request(&approved("req-old", 20), &Audit::quiet()).unwrap().unwrap();
    let on = |jti: &str, request: &str| AccessToken {
        request: request.into(),
        ..token(jti, "task-1", W, 90)
    };
    assert_eq!(
        record(&store, &on("j3", "req-none"), 30),
        Err(BrokerRefusal::UnknownRequest("req-none".into()))
    );
    assert_eq!(
        record(&store, &on("j3", "req-pending"), 30),
        Err(BrokerRefusal::RequestState {
            id: "req-pending".into(),
            state: RequestState::Pending,
            wanted: "approved"
        })
    );
    assert_eq!(
        record(&store, &on("j3", "req-old"), 30),
        Err(BrokerRefusal::RequestExpired("req-old".into()))
    );
    record(&store, &on("j3", "req-ok"), 30).unwrap();
    assert_eq!(store.request("req-ok").unwrap().unwrap().state, RequestState::Issued);
    assert!(matches!(
        record(&store, &on("j4", "req-ok"), 31),
        Err(BrokerRefusal::RequestState { state: RequestState::Issued, .. })
    ));
    assert!(store.access_token("j4").unwrap().is_none());
}

pub(super) fn a_decision_binds_the_content_and_never_the_workloads_own_uid(place: Place) {
    let store = place.open();
    store.put_request(&held("req-1", "task-1", 10, 100), &Audit::quiet()).unwrap().unwrap();
    store.put_request(&held("req-2", "task-1", 5, 100), &Audit::quiet()).unwrap().unwrap();
    assert!(
        matches!(
            store.put_request(&held("req-1", "task-1", 10, 100), &Audit::quiet()).unwrap(),
            Err(BrokerRefusal::RequestState { wanted: "new", .. })
        ),
        "an ID is held once"
    );
    let ids: Vec<String> = store.requests().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["req-2", "req-1"], "by created_at");

    let hash = "hash-of-req-1";
    assert_eq!(
        decide(&store, "req-1", "hash-of-something-else", true, 2000, 20),
        Err(BrokerRefusal::ContentChanged {
            id: "req-1".into(),
            expected: "hash-of-something-else".into(),
            actual: hash.into(),
        })
    );
    assert_eq!(decide(&store, "req-1", hash, true, 1000, 20), Err(BrokerRefusal::OwnUid(1000)));
    assert_eq!(
        decide(&store, "req-1", hash, true, 2000, 100),
        Err(BrokerRefusal::RequestExpired("req-1".into()))
    );
    assert_eq!(
        decide(&store, "req-none", hash, true, 2000, 20),
        Err(BrokerRefusal::UnknownRequest("req-none".into()))
    );
    assert_eq!(store.request("req-1").unwrap().unwrap().state, RequestState::Pending, "unchanged");

    let approved = decide(&store, "req-1", hash, true, 2000, 20).unwrap();
    assert_eq!(approved.state, RequestState::Approved);
    assert_eq!((approved.decided_by.as_str(), approved.reason.as_str()), ("uid:2000", "checked"));
    assert_eq!(approved.expires_at, 100, "an approval keeps the request's expiry");
    assert_eq!(store.request("req-1").unwrap(), Some(approved));
    assert_eq!(
        decide(&store, "req-1", hash, false, 2001, 21),
        Err(BrokerRefusal::RequestState {
            id: "req-1".into(),
            state: RequestState::Approved,
            wanted: "pending"
        }),
        "decided once"
    );
    let denied = decide(&store, "req-2", "hash-of-req-2", false, 0, 21).unwrap();
    assert_eq!((denied.state, denied.decided_by.as_str()), (RequestState::Denied, "uid:0"));
}

pub(super) fn lapsed_requests_are_dropped_and_returned_for_their_events(place: Place) {
    let store = place.open();
    let with =
        |id: &str, state, expires_at| PendingRequest { state, ..held(id, "t", 0, expires_at) };
    for request in [
        with("pending-lapsed", RequestState::Pending, 100_000),
        with("pending-live", RequestState::Pending, 100_001),
        with("approved-lapsed", RequestState::Approved, 50),
        with("denied-recent", RequestState::Denied, 100_000),
        with("denied-old", RequestState::Denied, 100_000 - 86_400),
        with("issued-old", RequestState::Issued, 10),
    ] {
        store.put_request(&request, &Audit::quiet()).unwrap().unwrap();
    }
    let before = store.revision().unwrap();
    let mut lapsed: Vec<String> = store
        .expire_requests(100_000, &Audit::quiet())
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    lapsed.sort();
    assert_eq!(lapsed, ["approved-lapsed", "pending-lapsed"], "only the unanswered or unused");
    let left: Vec<String> = store.requests().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&"pending-live".into()) && left.contains(&"denied-recent".into()));
    assert!(store.expire_requests(100_000, &Audit::quiet()).unwrap().is_empty());
    assert_eq!(store.revision().unwrap(), before, "no change is logged for agents");
}

pub(super) fn old_tokens_and_tasks_are_pruned_and_keys_are_every_servers(place: Place) {
    let store = place.open();
    start(&store, &task("task-live", W, 0, 10_000_000)).unwrap();
    start(&store, &task("task-expired", W, 0, 100)).unwrap();
    start(&store, &task("task-ended", W, 0, 10_000_000)).unwrap();
    record(&store, &token("j-old", "task-live", W, 1000), 10).unwrap();
    record(&store, &token("j-new", "task-live", W, 200_000), 10).unwrap();
    store.end_task("task-ended", 90_000, "uid:0: done", &Audit::quiet()).unwrap().unwrap();
    // 100_000: j-old is long expired, task-expired a day past, task-ended not yet.
    assert_eq!(store.prune_access_tokens(100_000).unwrap(), 2);
    assert!(store.access_token("j-old").unwrap().is_none());
    assert!(store.access_token("j-new").unwrap().is_some());
    let ids: Vec<String> = store.tasks().unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["task-ended", "task-live"], "same created_at: by ID");
    assert_eq!(store.prune_access_tokens(100_000).unwrap(), 0);
    assert_eq!(store.prune_access_tokens(90_000 + 86_401).unwrap(), 1, "task-ended");

    let key = |kid: &str| PublishedKey {
        kid: kid.into(),
        alg: "ES256".into(),
        public_key_der_b64: "MFkw".into(),
        expires_at: 99,
    };
    store.publish_broker_keys("server-a", &[key("a1"), key("a2")]).unwrap();
    store.publish_broker_keys("server-b", &[key("b1")]).unwrap();
    store.publish_broker_keys("server-a", &[key("a2"), key("a3")]).unwrap();
    let mut kids: Vec<String> = store.broker_keys().unwrap().into_iter().map(|k| k.kid).collect();
    kids.sort();
    assert_eq!(kids, ["a2", "a3", "b1"], "each server's latest set, together");
}

pub(super) fn broker_records_are_checked_and_survive_a_backup(place: Place) {
    let store = place.open();
    start(&store, &task("task-1", W, 0, 1000)).unwrap();
    record(&store, &token("j1", "task-1", W, 900), 10).unwrap();
    store.put_request(&held("req-1", "task-1", 10, 100), &Audit::quiet()).unwrap().unwrap();
    store
        .publish_broker_keys(
            "server-a",
            &[PublishedKey {
                kid: "k".into(),
                alg: String::new(),
                public_key_der_b64: "MFkw".into(),
                expires_at: 5,
            }],
        )
        .unwrap();
    let report = store.check().unwrap();
    let mut backup = Vec::new();
    store.backup(&mut backup).unwrap();
    let target = tempfile::tempdir().unwrap();
    let restored = KvStore::restore(&target.path().join("store"), &mut backup.as_slice()).unwrap();
    assert_eq!(restored, report);
    let copy = KvStore::open(&target.path().join("store")).unwrap();
    assert_eq!(copy.task("task-1").unwrap(), store.task("task-1").unwrap());
    assert_eq!(copy.access_token("j1").unwrap(), store.access_token("j1").unwrap());
    assert_eq!(copy.request("req-1").unwrap(), store.request("req-1").unwrap());
    assert_eq!(copy.broker_keys().unwrap().len(), 1);

    // A record that does not decode fails the check, naming it.
    store
        .kv()
        .apply(vec![kv::Op::Put(
            layout::t(layout::BROKER_TASKS),
            b"task-bad".to_vec(),
            b"{".to_vec(),
        )])
        .unwrap();
    let err = store.check().unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { ref key, .. } if key == "task-bad"), "{err}");
}

/// Two servers on one PostgreSQL database: a task ended through A makes
/// a token recorded through B inactive, read on B at once.
#[test]
fn a_task_ended_on_one_server_makes_a_token_recorded_on_the_other_inactive() {
    let place = Place::postgres();
    let (a, b) = (place.open_as("server-a"), place.open_as("server-b"));
    start(&a, &task("task-1", W, 0, 1000)).unwrap();
    record(&b, &token("j1", "task-1", W, 900), 10).unwrap();
    assert!(active(&b, "j1", 20));
    a.end_task("task-1", 20, "uid:0: done", &Audit::quiet()).unwrap().unwrap();
    assert!(!active(&b, "j1", 21), "B reads A's end at once");
    assert_eq!(
        record(&b, &token("j2", "task-1", W, 900), 21),
        Err(BrokerRefusal::TaskEnded("task-1".into())),
        "and records nothing more under it"
    );
}

/// The broker's group commit: each token in one commit is checked on its
/// own (one refused does not refuse the others), in order (the task's
/// progress counts every recorded token).
pub(super) fn tokens_recorded_together_are_each_checked_on_their_own(place: Place) {
    let store = place.open();
    start(&store, &task("task-1", W, 0, 100)).unwrap();
    let item = |jti: &str, task: &str, sub: &str| TokenToRecord {
        token: token(jti, task, sub, 90),
        done: vec![format!("read {jti}")],
        now: 10,
    };
    let batch = [
        item("a", "task-1", W),
        item("b", "task-none", W),
        item("c", "task-1", OTHER),
        item("d", "task-1", W),
    ];
    let results = store.record_access_tokens(&batch, &Audit::quiet()).unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
    assert_eq!(results[1], Err(BrokerRefusal::UnknownTask("task-none".into())));
    assert!(matches!(results[2], Err(BrokerRefusal::TaskNotYours { .. })));
    for (jti, stored) in [("a", true), ("b", false), ("c", false), ("d", true)] {
        assert_eq!(store.access_token(jti).unwrap().is_some(), stored, "{jti}");
    }
    let task = store.task("task-1").unwrap().unwrap();
    assert_eq!(task.tokens_issued, 2);
    assert_eq!(task.done, ["read a", "read d"]);
}
