//! End-to-end tests of the Workload API as a real client sees it: a real
//! server, a real agent serving its Unix socket, and the `spiffe` crate
//! (`X509Source`, `WorkloadApiClient`) as the workload. The agent attests this
//! test process by its uid (SO_PEERCRED), so entries select `unix:uid:<ours>`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use spiffe::{TrustDomain, WorkloadApiError, X509Source, X509SourceError, X509Svid};
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use tessera_tests::{my_uid, to_pem, RunningAgent, TestServer, TRUST_DOMAIN};

mod common;
use common::{now_unix, raw_client, uid_selector, within, workload_client, x509_source, PROMPTLY};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

const WEB_ID: &str = "spiffe://example.org/web";
const AFTER_RESTART_ID: &str = "spiffe://example.org/after-restart";

/// Deadline for two rotations of a 10 s SVID (they are due within ~10 s).
const TWO_ROTATIONS: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_gets_svid_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], Some(600)).await;

    let source = x509_source(&agent).await;
    let svid = source.svid().expect("the source has an SVID after its initial sync");
    assert_eq!(svid.spiffe_id().to_string(), WEB_ID, "SPIFFE ID of the source's SVID");
    let leaf = LeafInfo::of(&svid);
    let now = now_unix();
    assert!(leaf.not_after > now, "the served SVID is expired: {leaf:?}, now {now}");
    assert!(leaf.not_before <= now, "the served SVID is not yet valid: {leaf:?}, now {now}");

    // The bundle the workload gets is the server's trust bundle.
    let trust_domain = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = source
        .bundle_set()
        .expect("the source has a bundle set")
        .get(&trust_domain)
        .unwrap_or_else(|| panic!("the source has no bundle for {TRUST_DOMAIN}"));
    let source_authorities: BTreeSet<Vec<u8>> =
        bundle.authorities().iter().map(|c| c.as_bytes().to_vec()).collect();
    let server_authorities: BTreeSet<Vec<u8>> =
        server.bundle().await.iter().map(|c| c.as_ref().to_vec()).collect();
    assert!(!source_authorities.is_empty(), "the workload's bundle has no authorities");
    assert_eq!(
        source_authorities,
        server_authorities,
        "the workload's bundle ({} certs) is not the server's bundle ({} certs)",
        source_authorities.len(),
        server_authorities.len()
    );

    // openssl accepts the chain against the bundle the workload was given.
    let authorities: Vec<Vec<u8>> = source_authorities.into_iter().collect();
    openssl_verify(dir.path(), "web", &svid, &authorities);

    // The private key is the leaf's key.
    assert_key_matches_leaf(&svid);

    // A one-shot fetch (a new stream of the same workload) gets the same cached SVID.
    let client = workload_client(&agent).await;
    let fetched =
        within(PROMPTLY, "one-shot FetchX509SVID", client.fetch_x509_svid()).await.unwrap();
    assert_eq!(fetched.spiffe_id().to_string(), WEB_ID, "SPIFFE ID of a one-shot fetch");
    assert_eq!(
        LeafInfo::of(&fetched).serial,
        leaf.serial,
        "a second stream of the same workload got a different leaf than the source's stream"
    );

    source.shutdown_with_timeout(PROMPTLY).await.unwrap();
    agent.stop().await;
    server.stop().await;
}

/// Asserts, for a 10 s SVID rotated twice:
/// - the source sees ≥ 2 rotations (3 distinct leaves), and at every update the
///   SVID it serves is usable (`state().svid()` is `Ok`), has the entry's SPIFFE
///   ID, and is not expired (`not_after > now`) nor not yet valid;
/// - a second, raw FetchX509SVID stream (opened before the source, so it starts
///   no later than the source's first response) receives the same leaves: the
///   source's sequence of distinct leaves is an order-preserving subsequence of
///   the raw stream's (the source's `watch` may coalesce two quick updates, so
///   the raw stream may hold extra leaves, never fewer), leaves with equal serial
///   are byte-identical, every raw response is unexpired and for the entry's
///   SPIFFE ID, and a replaced leaf never comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_seen_by_every_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], Some(10)).await;

    // The raw stream first, up to its first response.
    let client = workload_client(&agent).await;
    let (mut raw_stream, first_raw) =
        within(PROMPTLY, "a raw FetchX509SVID stream's first SVID", async {
            loop {
                match client.stream_x509_svids().await {
                    Ok(mut stream) => match stream.next().await {
                        Some(Ok(svid)) => break (stream, Observed::now(&svid)),
                        // Denied until the agent has the new entry: retry.
                        Some(Err(WorkloadApiError::NoIdentityIssued)) => {}
                        Some(Err(e)) => panic!("raw FetchX509SVID stream failed: {e}"),
                        None => panic!("raw FetchX509SVID stream ended before its first response"),
                    },
                    Err(WorkloadApiError::NoIdentityIssued) => {}
                    Err(e) => panic!("opening a raw FetchX509SVID stream failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Result<Observed, String>>();
    raw_tx.send(Ok(first_raw)).unwrap();
    let raw_task = tokio::spawn(async move {
        while let Some(item) = raw_stream.next().await {
            let item = item.map(|svid| Observed::now(&svid)).map_err(|e| e.to_string());
            if raw_tx.send(item).is_err() {
                return;
            }
        }
        let _ = raw_tx.send(Err("the raw FetchX509SVID stream ended".into()));
    });

    // The source: follow its updates until it has seen two rotations.
    let source = x509_source(&agent).await;
    let mut updates = source.updated();
    let mut source_seen = vec![observe_source(&source, "initial sync")];
    within(TWO_ROTATIONS, "two rotations of a 10 s SVID seen by the X509Source", async {
        let mut update = 0;
        while distinct(&source_seen).len() < 3 {
            updates.changed().await.expect("the source's update handle stays open");
            update += 1;
            source_seen.push(observe_source(&source, &format!("update {update}")));
        }
    })
    .await;
    let source_leaves = distinct(&source_seen);

    // The raw stream, up to the last leaf the source saw.
    let last = source_leaves.last().unwrap().serial.clone();
    let mut raw_seen: Vec<Observed> = Vec::new();
    within(PROMPTLY, "the raw stream delivering the source's latest leaf", async {
        while !raw_seen.iter().any(|o| o.leaf.serial == last) {
            match raw_rx.recv().await {
                Some(Ok(observed)) => raw_seen.push(observed),
                Some(Err(e)) => panic!(
                    "raw stream failed after {} responses: {e}; source saw {}",
                    raw_seen.len(),
                    serials(&source_leaves)
                ),
                None => panic!("raw stream task ended"),
            }
        }
    })
    .await;
    raw_task.abort();
    for (i, observed) in raw_seen.iter().enumerate() {
        observed.assert_valid(&format!("raw stream response {i}"));
    }
    let raw_leaves = distinct(&raw_seen);
    println!(
        "source leaves: {} ({} updates); raw stream leaves: {} ({} responses)",
        serials(&source_leaves),
        source_seen.len() - 1,
        serials(&raw_leaves),
        raw_seen.len()
    );

    let mut unique = BTreeSet::new();
    for leaf in &raw_leaves {
        assert!(
            unique.insert(&leaf.serial),
            "leaf {} came back on the raw stream after it had been replaced: {}",
            leaf.serial,
            serials(&raw_leaves)
        );
    }
    let mut raw_iter = raw_leaves.iter();
    for leaf in &source_leaves {
        let Some(same) = raw_iter.find(|raw| raw.serial == leaf.serial) else {
            panic!(
                "the source was served leaf {} which the second stream never got (in that \
                 order): streams of one workload must get the same cached SVIDs; source {}, \
                 raw stream {}",
                leaf.serial,
                serials(&source_leaves),
                serials(&raw_leaves)
            );
        };
        assert!(
            same.der == leaf.der,
            "leaf {} differs in bytes between the source's stream and the raw stream",
            leaf.serial
        );
    }

    source.shutdown_with_timeout(PROMPTLY).await.unwrap();
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_uid_gets_permission_denied_and_header_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    // An entry exists, but for another uid.
    let other_uid = my_uid().wrapping_add(1);
    server.create_entry(WEB_ID, &agent.id, &[&format!("unix:uid:{other_uid}")], None).await;

    // The spiffe crate recognises the denial (it matches the message text).
    let client = workload_client(&agent).await;
    match within(PROMPTLY, "one-shot FetchX509SVID", client.fetch_x509_svid()).await {
        Err(WorkloadApiError::NoIdentityIssued) => {}
        Err(e) => panic!("expected NoIdentityIssued from the spiffe client, got: {e} ({e:?})"),
        Ok(svid) => panic!("a workload no entry matches was issued {}", svid.spiffe_id()),
    }
    match within(PROMPTLY, "one-shot FetchX509SVID (context)", client.fetch_x509_context()).await {
        Err(WorkloadApiError::NoIdentityIssued) => {}
        Err(e) => panic!("expected NoIdentityIssued from fetch_x509_context, got: {e} ({e:?})"),
        Ok(context) => {
            panic!("a workload no entry matches was issued {} SVIDs", context.svids().len())
        }
    }

    // On the wire: PermissionDenied with exactly "no identity issued".
    let mut raw = raw_client(&agent.socket).await;
    let status =
        within(PROMPTLY, "FetchX509SVID with the header", x509_svid_status(&mut raw, true)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "code for an unmatched caller: {status:?}");
    assert_eq!(status.message(), "no identity issued", "message for an unmatched caller");

    // Without the security header every RPC is refused with InvalidArgument,
    // before attestation (so even the denial above is not reached).
    let mut wrong = Vec::new();
    for (rpc, status) in [
        ("FetchX509SVID", x509_svid_status(&mut raw, false).await),
        (
            "FetchX509Bundles",
            first_status(raw.fetch_x509_bundles(X509BundlesRequest {}).await).await,
        ),
        ("FetchJWTBundles", first_status(raw.fetch_jwt_bundles(JwtBundlesRequest {}).await).await),
        (
            "FetchJWTSVID",
            unary_status(
                raw.fetch_jwtsvid(JwtsvidRequest {
                    audience: vec!["test".into()],
                    spiffe_id: String::new(),
                })
                .await,
            ),
        ),
        (
            "ValidateJWTSVID",
            unary_status(
                raw.validate_jwtsvid(ValidateJwtsvidRequest {
                    audience: "test".into(),
                    svid: "x.y.z".into(),
                })
                .await,
            ),
        ),
    ] {
        if status.code() != Code::InvalidArgument {
            wrong.push(format!("{rpc}: {:?} {:?}", status.code(), status.message()));
        }
    }
    assert!(
        wrong.is_empty(),
        "RPCs without the `workload.spiffe.io: true` header must get InvalidArgument; got {wrong:?}"
    );

    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outage_does_not_disturb_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], None).await;

    let source = x509_source(&agent).await;
    let svid_a = source.svid().expect("the source has an SVID after its initial sync");
    assert_eq!(svid_a.spiffe_id().to_string(), WEB_ID, "SPIFFE ID before the outage");
    let leaf_a = LeafInfo::of(&svid_a);

    // Watch the source through the outage: at every update and every 50 ms it
    // must hold a usable, unexpired SVID.
    let stop_monitor = CancellationToken::new();
    let monitor = tokio::spawn(monitor_source(source.clone(), stop_monitor.clone()));

    let server = server.restart().await;
    server.create_entry(AFTER_RESTART_ID, &agent.id, &[&uid_selector()], None).await;

    // The agent reconnects and learns the new entry: the source gets both SVIDs.
    let mut updates = source.updated();
    within(PROMPTLY, "the source getting the entry created after the server restart", async {
        loop {
            let ids = svid_ids(
                source
                    .x509_context()
                    .expect("the source has a context")
                    .svids()
                    .iter()
                    .map(|s| &**s),
            );
            if ids.contains(AFTER_RESTART_ID) {
                break;
            }
            updates.changed().await.expect("the source's update handle stays open");
        }
    })
    .await;
    let context = source.x509_context().unwrap();
    assert_eq!(
        svid_ids(context.svids().iter().map(|s| &**s)),
        BTreeSet::from([WEB_ID.to_string(), AFTER_RESTART_ID.to_string()]),
        "the source's SVIDs after the restart"
    );

    // A fresh one-shot fetch gets both too, and both verify against the bundle.
    let client = workload_client(&agent).await;
    let svids = within(PROMPTLY, "one-shot fetch of all SVIDs", client.fetch_all_x509_svids())
        .await
        .expect("a fresh fetch after the restart succeeds");
    assert_eq!(
        svid_ids(svids.iter()),
        BTreeSet::from([WEB_ID.to_string(), AFTER_RESTART_ID.to_string()]),
        "the SVIDs a fresh fetch gets after the restart"
    );
    let authorities: Vec<Vec<u8>> =
        server.bundle().await.iter().map(|c| c.as_ref().to_vec()).collect();
    for (i, svid) in svids.iter().enumerate() {
        openssl_verify(dir.path(), &format!("after-restart-{i}"), svid, &authorities);
        assert_key_matches_leaf(svid);
    }
    let web_now = svids.iter().find(|s| s.spiffe_id().to_string() == WEB_ID).unwrap();
    println!(
        "web leaf before the outage {}, after {}",
        leaf_a.serial,
        LeafInfo::of(web_now).serial
    );

    stop_monitor.cancel();
    let (checks, problems) =
        within(PROMPTLY, "the source monitor stopping", monitor).await.unwrap();
    assert!(checks > 0, "the source monitor never ran");
    assert!(
        problems.is_empty(),
        "the workload's SVID was disturbed by the server outage ({} of {checks} checks): {problems:#?}",
        problems.len()
    );

    source.shutdown_with_timeout(PROMPTLY).await.unwrap();
    agent.stop().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The status FetchX509SVID ends with, with or without the security header.
async fn x509_svid_status(client: &mut SpiffeWorkloadApiClient<Channel>, header: bool) -> Status {
    let mut request = tonic::Request::new(X509svidRequest {});
    if header {
        request.metadata_mut().insert("workload.spiffe.io", MetadataValue::from_static("true"));
    }
    first_status(client.fetch_x509svid(request).await).await
}

/// The error a server-streaming call fails with, whether it comes as the
/// response status or as the stream's first item.
async fn first_status<T>(
    response: Result<tonic::Response<tonic::codec::Streaming<T>>, Status>,
) -> Status {
    match response {
        Err(status) => status,
        Ok(response) => {
            match within(PROMPTLY, "a stream's first message", response.into_inner().message())
                .await
            {
                Err(status) => status,
                Ok(Some(_)) => Status::ok("the call succeeded with a message"),
                Ok(None) => Status::ok("the stream ended without a message or an error"),
            }
        }
    }
}

fn unary_status<T>(response: Result<tonic::Response<T>, Status>) -> Status {
    match response {
        Err(status) => status,
        Ok(_) => Status::ok("the call succeeded"),
    }
}

/// Writes the SVID and `authorities` as PEM and runs `openssl verify` on them.
fn openssl_verify(dir: &Path, name: &str, svid: &X509Svid, authorities: &[Vec<u8>]) {
    let chain = svid.cert_chain();
    let bundle_path = dir.join(format!("{name}-bundle.pem"));
    let leaf_path = dir.join(format!("{name}-svid.pem"));
    std::fs::write(&bundle_path, to_pem(authorities)).unwrap();
    std::fs::write(&leaf_path, to_pem(&chain[..1])).unwrap();
    let mut command = Command::new("openssl");
    command.args(["verify", "-CAfile"]).arg(&bundle_path);
    if chain.len() > 1 {
        let intermediates_path = dir.join(format!("{name}-intermediates.pem"));
        std::fs::write(&intermediates_path, to_pem(&chain[1..])).unwrap();
        command.arg("-untrusted").arg(&intermediates_path);
    }
    let out = command.arg(&leaf_path).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl verify rejected the SVID {} against the bundle: {}{}",
        svid.spiffe_id(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PKCS#8 key is a P-256 key whose public half is the leaf's, and it signs
/// what the leaf's key verifies.
fn assert_key_matches_leaf(svid: &X509Svid) {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        svid.private_key().as_bytes(),
        &rng,
    )
    .unwrap_or_else(|e| {
        panic!("the SVID key of {} is not a P-256 PKCS#8 key: {e}", svid.spiffe_id())
    });
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    let leaf_key = leaf.public_key().subject_public_key.data.to_vec();
    assert_eq!(
        key.public_key().as_ref(),
        leaf_key.as_slice(),
        "the private key of {} does not match its leaf certificate",
        svid.spiffe_id()
    );
    let message = b"tessera workload api test";
    let signature = key.sign(&rng, message).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &leaf_key)
        .verify(message, signature.as_ref())
        .unwrap_or_else(|_| {
            panic!("the leaf of {} does not verify its key's signature", svid.spiffe_id())
        });
}

fn svid_ids<'a>(svids: impl IntoIterator<Item = &'a X509Svid>) -> BTreeSet<String> {
    svids.into_iter().map(|s| s.spiffe_id().to_string()).collect()
}

/// What the tests compare in a leaf certificate.
#[derive(Clone, PartialEq, Eq)]
struct LeafInfo {
    der: Vec<u8>,
    serial: String,
    not_before: i64,
    not_after: i64,
}

impl LeafInfo {
    fn of(svid: &X509Svid) -> Self {
        let der = svid.leaf().as_bytes();
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("the leaf parses");
        Self {
            der: der.to_vec(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        }
    }
}

impl fmt::Debug for LeafInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "leaf {} valid {}..{}", self.serial, self.not_before, self.not_after)
    }
}

/// One SVID as a stream delivered it.
#[derive(Debug, Clone)]
struct Observed {
    spiffe_id: String,
    leaf: LeafInfo,
    at_unix: i64,
}

impl Observed {
    fn now(svid: &X509Svid) -> Self {
        Self {
            spiffe_id: svid.spiffe_id().to_string(),
            leaf: LeafInfo::of(svid),
            at_unix: now_unix(),
        }
    }

    /// The SVID was for the entry and within its validity when delivered.
    fn assert_valid(&self, when: &str) {
        assert_eq!(self.spiffe_id, WEB_ID, "SPIFFE ID at {when}");
        assert!(
            self.leaf.not_after > self.at_unix,
            "at {when} the SVID served was already expired: {:?}, delivered at {}",
            self.leaf,
            self.at_unix
        );
        assert!(
            self.leaf.not_before <= self.at_unix,
            "at {when} the SVID served was not yet valid: {:?}, delivered at {}",
            self.leaf,
            self.at_unix
        );
    }
}

/// The source's current SVID; fails the test if it has none usable.
fn observe_source(source: &X509Source, when: &str) -> Observed {
    let state = source.state();
    let svid = state.svid().unwrap_or_else(|e| {
        panic!(
            "at source {when} (revision {}) the source had no usable SVID: {e}",
            state.revision()
        )
    });
    let observed = Observed::now(&svid);
    observed.assert_valid(&format!("source {when}"));
    observed
}

/// The leaves in order of first delivery, consecutive repeats collapsed.
fn distinct(seen: &[Observed]) -> Vec<LeafInfo> {
    let mut leaves: Vec<LeafInfo> = Vec::new();
    for observed in seen {
        if leaves.last().is_none_or(|last| last.serial != observed.leaf.serial) {
            leaves.push(observed.leaf.clone());
        }
    }
    leaves
}

fn serials(leaves: &[LeafInfo]) -> String {
    let serials: Vec<&str> = leaves.iter().map(|l| l.serial.as_str()).collect();
    format!("[{}]", serials.join(", "))
}

/// Checks the source every 50 ms and at every update until `stop`; returns the
/// number of checks and what was wrong.
async fn monitor_source(source: X509Source, stop: CancellationToken) -> (u64, Vec<String>) {
    let started = Instant::now();
    let mut updates = source.updated();
    let mut checks = 0;
    let mut problems = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = updates.changed() => {
                if let Err(e) = changed {
                    problems.push(format!("{:?}: the update handle closed: {e}", started.elapsed()));
                    break;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        checks += 1;
        match source.svid() {
            Ok(svid) => {
                let leaf = LeafInfo::of(&svid);
                let now = now_unix();
                if leaf.not_after <= now {
                    problems
                        .push(format!("{:?}: the SVID was expired: {leaf:?}", started.elapsed()));
                }
            }
            Err(e @ (X509SourceError::Withdrawn(_) | X509SourceError::NoSuitableSvid)) => {
                problems
                    .push(format!("{:?}: the source had no usable SVID: {e}", started.elapsed()));
            }
            Err(e) => problems.push(format!("{:?}: the source failed: {e}", started.elapsed())),
        }
    }
    (checks, problems)
}
