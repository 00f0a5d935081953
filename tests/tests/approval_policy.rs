//! The approval policy's rules one by one, on a real server: an entry a
//! rule matches is held for a second operator (not stored, not signed),
//! one it does not match is stored and signed at once, and the same
//! entry goes through on a server without the rule. Then the stale
//! approval: an update approved after its entry changed is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod operators;

use std::sync::Arc;

use common::root_or_skip;
use operators::{governed_server, open_tempdir, proposal_hash, Cli, OPERATOR_A, OPERATOR_B};
use tessera_proto::admin as admin_pb;
use tessera_proto::node as node_pb;
use tessera_proto::types;
use tessera_server::{ApprovalPolicy, SystemClock};
use tessera_tests::{entry, key_and_csr, test_config, TestAgent, TestServer};
use tonic::Code;

const AGENT_ID: &str = "spiffe://example.org/node/policy";
const PROGRAM: &str = "unix:path:/usr/bin/service";

/// A server with `policy` and an agent attested on it (before any entry).
async fn server_with(dir: &std::path::Path, policy: ApprovalPolicy) -> (TestServer, TestAgent) {
    let mut config = test_config(dir);
    config.approval = policy;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let token = server.join_token(AGENT_ID, 0).await.token;
    let agent = TestAgent::attest(&server, &token).await.unwrap();
    (server, agent)
}

/// An entry for the policy agent: `name` under the trust domain, `selectors`.
fn policy_entry(name: &str, selectors: &[&str], ttl: u32) -> types::Entry {
    entry(&format!("spiffe://example.org/{name}"), AGENT_ID, selectors, Some(ttl))
}

/// What a create did: held (the proposal's entry ID and reasons), or stored.
#[derive(Debug)]
enum Created {
    Held { id: String, reasons: Vec<String> },
    Stored(String),
}

async fn create(server: &TestServer, e: types::Entry) -> Created {
    let mut results = server
        .admin()
        .await
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![e.clone()] })
        .await
        .unwrap()
        .into_inner()
        .results;
    let result = results.remove(0);
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{e:?}: {:?}", result.status);
    let created = result.entry.unwrap();
    match created.pending {
        Some(p) => Created::Held { id: created.id, reasons: p.reasons },
        None => Created::Stored(created.id),
    }
}

/// Whether entry `id` is stored (listed by the server).
async fn stored(server: &TestServer, id: &str) -> bool {
    server
        .admin()
        .await
        .list_entries(admin_pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .any(|e| e.id == id)
}

/// The status code of signing an X509-SVID for entry `id` as the agent.
async fn sign_code(agent: &TestAgent, id: &str) -> i32 {
    let item = node_pb::SignX509Item { entry_id: id.into(), csr: key_and_csr().1 };
    let response =
        agent.connect().await.sign_x509(node_pb::SignX509Request { items: vec![item] }).await;
    response.unwrap().into_inner().results[0].status.as_ref().unwrap().code
}

/// `e` is held for a reason containing `why`: not stored, not signed.
async fn assert_held(server: &TestServer, agent: &TestAgent, e: types::Entry, why: &str) {
    let what = format!("{} {:?}", e.spiffe_id, e.selectors);
    match create(server, e).await {
        Created::Held { id, reasons } => {
            assert!(reasons.iter().any(|r| r.contains(why)), "{what}: held for {reasons:?}");
            assert!(!stored(server, &id).await, "{what}: held, yet stored");
            assert_eq!(sign_code(agent, &id).await, Code::NotFound as i32, "{what}: signed");
        }
        Created::Stored(id) => panic!("{what}: the policy matches it, yet it was stored ({id})"),
    }
}

/// `e` is stored at once and signed.
async fn assert_not_held(server: &TestServer, agent: &TestAgent, e: types::Entry) {
    let what = format!("{} {:?} ttl {:?}", e.spiffe_id, e.selectors, e.x509_svid_ttl);
    match create(server, e).await {
        Created::Stored(id) => {
            assert!(stored(server, &id).await, "{what}");
            assert_eq!(sign_code(agent, &id).await, 0, "{what}: not signed");
        }
        Created::Held { reasons, .. } => panic!("{what}: held for {reasons:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_selectors_hold_entries_for_uid_or_gid_0_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy = ApprovalPolicy { root_selectors: true, ..Default::default() };
    let (server, agent) = server_with(&dir.path().join("server"), policy).await;
    let why = "uid or gid 0";
    assert_held(&server, &agent, policy_entry("r1", &["unix:uid:0", PROGRAM], 600), why).await;
    assert_held(&server, &agent, policy_entry("r2", &["unix:gid:0", PROGRAM], 600), why).await;
    assert_not_held(&server, &agent, policy_entry("n1", &["unix:uid:1000", PROGRAM], 600)).await;
    assert_not_held(&server, &agent, policy_entry("n2", &["unix:gid:10", PROGRAM], 600)).await;
    server.stop().await;

    // Without the rule, the same root entry is stored at once.
    let (server, agent) = server_with(&dir.path().join("plain"), ApprovalPolicy::default()).await;
    assert_not_held(&server, &agent, policy_entry("r1", &["unix:uid:0", PROGRAM], 600)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_x509_svid_ttl_holds_entries_and_updates_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let policy = ApprovalPolicy { max_x509_svid_ttl: Some(3600), ..Default::default() };
    let (server, agent) = server_with(&dir.path().join("server"), policy).await;
    let selectors = ["unix:uid:1000", PROGRAM];
    let why = "is above 3600s";
    assert_held(&server, &agent, policy_entry("long", &selectors, 3601), why).await;
    assert_held(&server, &agent, policy_entry("longer", &selectors, 86_400), why).await;
    assert_not_held(&server, &agent, policy_entry("at-max", &selectors, 3600)).await;
    assert_not_held(&server, &agent, policy_entry("short", &selectors, 600)).await;

    // Raising a stored entry's TTL above the maximum is held too: the
    // entry keeps its TTL.
    let Created::Stored(id) = create(&server, policy_entry("raised", &selectors, 600)).await else {
        panic!("a short TTL was held");
    };
    let mut admin = server.admin().await;
    let mut raised = admin.get_entry(admin_pb::GetEntryRequest { id: id.clone() }).await.unwrap();
    raised.get_mut().x509_svid_ttl = Some(7200);
    let updated = admin
        .batch_update_entry(admin_pb::BatchUpdateEntryRequest {
            entries: vec![raised.into_inner()],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let pending = updated.entry.unwrap().pending.expect("the raise is held");
    assert!(pending.reasons.iter().any(|r| r.contains(why)), "{pending:?}");
    let now = admin.get_entry(admin_pb::GetEntryRequest { id }).await.unwrap().into_inner();
    assert_eq!(now.x509_svid_ttl, Some(600), "a held update was applied");
    server.stop().await;

    let (server, agent) = server_with(&dir.path().join("plain"), ApprovalPolicy::default()).await;
    assert_not_held(&server, &agent, policy_entry("long", &selectors, 86_400)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_path_prefixes_hold_entries_at_and_under_the_path_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy = ApprovalPolicy {
        protected_path_prefixes: vec!["/prod/payments".into()],
        ..Default::default()
    };
    let (server, agent) = server_with(&dir.path().join("server"), policy).await;
    let selectors = ["unix:uid:1000", PROGRAM];
    let why = "protected path /prod/payments";
    assert_held(&server, &agent, policy_entry("prod/payments", &selectors, 600), why).await;
    assert_held(&server, &agent, policy_entry("prod/payments/api", &selectors, 600), why).await;
    // A path that merely starts with the same letters is not under it.
    assert_not_held(&server, &agent, policy_entry("prod/paymentsx", &selectors, 600)).await;
    assert_not_held(&server, &agent, policy_entry("prod/ledger", &selectors, 600)).await;
    assert_not_held(&server, &agent, policy_entry("payments", &selectors, 600)).await;
    server.stop().await;

    let (server, agent) = server_with(&dir.path().join("plain"), ApprovalPolicy::default()).await;
    assert_not_held(&server, &agent, policy_entry("prod/payments/api", &selectors, 600)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_jwt_audiences_hold_entries_that_may_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let policy =
        ApprovalPolicy { protected_jwt_audiences: vec!["payments".into()], ..Default::default() };
    let (server, agent) = server_with(&dir.path().join("server"), policy).await;
    let with_audiences = |name: &str, audiences: &[&str]| {
        let mut e = policy_entry(name, &["unix:uid:1000", PROGRAM], 600);
        e.jwt_audiences = audiences.iter().map(|a| a.to_string()).collect();
        e
    };
    let protected = "JWT audience payments is protected";
    assert_held(&server, &agent, with_audiences("only", &["payments"]), protected).await;
    assert_held(&server, &agent, with_audiences("among", &["ledger", "payments"]), protected).await;
    // An entry allowed any audience may get the protected one.
    assert_held(&server, &agent, with_audiences("any", &[]), "any audience").await;
    assert_not_held(&server, &agent, with_audiences("other", &["ledger"])).await;
    assert_not_held(&server, &agent, with_audiences("near", &["payments-v2"])).await;
    server.stop().await;

    let (server, agent) = server_with(&dir.path().join("plain"), ApprovalPolicy::default()).await;
    assert_not_held(&server, &agent, with_audiences("only", &["payments"])).await;
    assert_not_held(&server, &agent, with_audiences("any", &[])).await;
    server.stop().await;
}

/// An update is proposed against the entry's revision; if the entry
/// changes (or is deleted) before a second operator approves, the approval
/// is refused and nothing is written. A proposal made against the entry as
/// it now stands is then approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approving_an_update_whose_entry_changed_since_it_was_proposed_is_refused() {
    if !root_or_skip("approval by a second operator (two uids)") {
        return;
    }
    let dir = open_tempdir();
    let server = governed_server(dir.path(), |config| {
        config.approval = ApprovalPolicy { max_x509_svid_ttl: Some(3600), ..Default::default() };
    })
    .await;
    let cli = Cli::new(&server);
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let mut admin = server.admin().await;
    let make = |name: &str| policy_entry(name, &["unix:uid:1000", PROGRAM], 600);
    let Created::Stored(id) = create(&server, make("stale")).await else { panic!("held") };

    // Operator A proposes raising the TTL: held.
    let raise = ["entry", "update", "--id", &id, "--x509-svid-ttl", "7200"];
    let out = cli.run(Some(OPERATOR_A), &raise);
    assert!(out.status.success() && stderr(&out).contains("pending approval"), "{}", stderr(&out));
    let hash = proposal_hash(&cli, &id);

    // The entry changes meanwhile (a change no rule matches: applied at once).
    let mut current =
        admin.get_entry(admin_pb::GetEntryRequest { id: id.clone() }).await.unwrap().into_inner();
    current.hint = "changed meanwhile".into();
    let updated = admin
        .batch_update_entry(admin_pb::BatchUpdateEntryRequest { entries: vec![current] })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(updated.status.as_ref().unwrap().code, 0, "{:?}", updated.status);
    assert!(updated.entry.unwrap().pending.is_none(), "the hint change was held");

    // Operator B approves what A proposed, naming its hash: refused.
    let approve = ["entry", "approve", "--id", &id, "--hash", &hash];
    let out = cli.run(Some(OPERATOR_B), &approve);
    assert!(!out.status.success(), "an update proposed against an old revision was approved");
    assert!(
        stderr(&out).contains("changed (or was deleted) after this update was proposed"),
        "{}",
        stderr(&out)
    );
    let now = admin.get_entry(admin_pb::GetEntryRequest { id: id.clone() }).await.unwrap();
    let now = now.into_inner();
    assert_eq!((now.x509_svid_ttl, now.hint.as_str()), (Some(600), "changed meanwhile"));

    // The stale proposal (never approvable) was dropped with the refusal,
    // with its event: proposed again against the entry as it stands, it is
    // held, then approved and applied.
    let events = tessera_tests::hostile::events_of_kind(&mut admin, "admin.entry.reject").await;
    assert!(
        events.iter().any(|e| e.entry_ids.contains(&id) && e.reason.contains("changed after")),
        "no event for the dropped proposal: {events:?}"
    );
    let out = cli.run(Some(OPERATOR_A), &raise);
    assert!(stderr(&out).contains("pending approval"), "{}", stderr(&out));
    let hash = proposal_hash(&cli, &id);
    cli.ok(Some(OPERATOR_B), &["entry", "approve", "--id", &id, "--hash", &hash]);
    let now = admin.get_entry(admin_pb::GetEntryRequest { id: id.clone() }).await.unwrap();
    let now = now.into_inner();
    assert_eq!((now.x509_svid_ttl, now.hint.as_str()), (Some(7200), "changed meanwhile"));

    // An update whose entry was deleted before the approval: refused too,
    // and the entry is not re-created.
    let Created::Stored(gone) = create(&server, make("gone")).await else { panic!("held") };
    let out =
        cli.run(Some(OPERATOR_A), &["entry", "update", "--id", &gone, "--x509-svid-ttl", "7200"]);
    assert!(stderr(&out).contains("pending approval"), "{}", stderr(&out));
    let hash = proposal_hash(&cli, &gone);
    admin
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![gone.clone()] })
        .await
        .unwrap();
    let out = cli.run(Some(OPERATOR_B), &["entry", "approve", "--id", &gone, "--hash", &hash]);
    assert!(!out.status.success(), "an update of a deleted entry was approved");
    // (The delete dropped the proposal with the entry, or the approval
    // finds the entry gone.)
    let said = stderr(&out);
    assert!(said.contains("no proposal") || said.contains("changed (or was deleted)"), "{said}");
    assert!(!stored(&server, &gone).await, "the approval re-created a deleted entry");
    server.stop().await;
}
