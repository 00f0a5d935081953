//! End-to-end tests of CA rotation and revocation as workloads and operators
//! see them: a real server (with a short CA lifetime where rotation is under
//! test), a real agent serving its Unix socket, the `spiffe` crate's
//! `X509Source` / `WorkloadApiClient` or a raw generated client as the
//! workload, the admin API as the operator, and `openssl` as an independent
//! verifier of chains and CRLs. The agent attests this test process by its uid
//! (SO_PEERCRED), so entries select `unix:uid:<ours>`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use spiffe::{TrustDomain, WorkloadApiError, X509Source, X509Svid};
use tessera_proto::admin::{GetBundleRequest, ListRevocationsRequest, RevokeSvidRequest};
use tessera_proto::types::Revocation;
use tessera_proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tessera_server::SystemClock;
use tessera_tests::{test_config, to_pem, RunningAgent, TestServer, TRUST_DOMAIN};
use tessera_workload_api::with_header;

mod common;
use common::{
    now_unix, raw_client, serial_hex, trimmed_hex, uid_selector, within, workload_client,
    x509_source, PROMPTLY,
};
use tonic::codec::Streaming;
use tonic::Code;

const WEB_ID: &str = "spiffe://example.org/web";
const DB_ID: &str = "spiffe://example.org/db";

/// CA lifetime for the rotation test (the smallest the server allows is 10 s).
const SHORT_CA_TTL: u64 = 20;
/// How long the rotation test follows the workload: three CA lifetimes and a bit.
const THREE_CA_LIFETIMES: Duration = Duration::from_secs(3 * SHORT_CA_TTL + 5);
/// How often the rotation test polls the source between updates.
const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// With a 20 s CA (next CA prepared at half-life, activated at 5/6, dropped at
/// expiry), a workload following an `X509Source` for three CA lifetimes always
/// holds an unexpired SVID whose issuer is in the bundle it was delivered
/// with (checked at every update and every 200 ms: issuer name and signature;
/// at every new SVID or bundle also by `openssl verify` at that instant). Over
/// the run the workload sees at least 3 CA certificates and its SVID's issuer
/// changes at least twice. At the end the workload's bundle is the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_stay_valid_through_three_ca_lifetimes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.ca_ttl = SHORT_CA_TTL;
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    // 60 s asked for; every SVID is cut at its CA's NotAfter.
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], Some(60)).await;

    let source = x509_source(&agent).await;
    let mut updates = source.updated();
    let mut admin = server.admin().await;
    let mut tracker = RotationTracker::new(dir.path().join("openssl"));
    let mut agent_serials = BTreeSet::new();
    let started = Instant::now();
    tracker.observe(&source, "initial sync").await;
    let mut update = 0;
    while started.elapsed() < THREE_CA_LIFETIMES {
        let when = tokio::select! {
            changed = updates.changed() => {
                if let Err(e) = changed {
                    panic!("the source's update handle closed after {:?}: {e}", started.elapsed());
                }
                update += 1;
                format!("update {update} at {:?}", started.elapsed())
            }
            () = tokio::time::sleep(POLL) => format!("poll at {:?}", started.elapsed()),
        };
        tracker.observe(&source, &when).await;
        // For the report: how often the agent's own SVID changes.
        if let Ok(found) = admin
            .get_agent(tessera_proto::admin::GetAgentRequest { spiffe_id: agent.id.clone() })
            .await
        {
            agent_serials.insert(found.into_inner().x509_svid_serial);
        }
    }
    println!(
        "followed the source for {:?}: {} checks ({update} updates), {} openssl verifications, \
         {} CA certificates seen, SVID issuers in order {:?}, {} distinct leaves, {} distinct \
         agent SVID serials",
        started.elapsed(),
        tracker.checks,
        tracker.openssl_runs,
        tracker.cas_seen.len(),
        tracker.issuer_names,
        tracker.leaves_seen.len(),
        agent_serials.len()
    );
    assert!(
        tracker.problems.is_empty(),
        "the workload was not always holding a valid SVID that chains to its bundle \
         ({} problems in {} checks): {:#?}",
        tracker.problems.len(),
        tracker.checks,
        tracker.problems
    );
    assert!(
        tracker.cas_seen.len() >= 3,
        "over three CA lifetimes the workload's bundle held only {} distinct CA certificates",
        tracker.cas_seen.len()
    );
    assert!(
        tracker.issuers.len() >= 3,
        "over three CA lifetimes the SVID's issuer changed only {} times: {:?}",
        tracker.issuers.len().saturating_sub(1),
        tracker.issuer_names
    );

    // The workload's bundle is the server's (retried: a rotation may fall
    // between the two reads).
    let trust_domain = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let converged = tokio::time::timeout(PROMPTLY, async {
        loop {
            let server_bundle: BTreeSet<Vec<u8>> =
                server.bundle().await.iter().map(|c| c.as_ref().to_vec()).collect();
            let source_bundle: BTreeSet<Vec<u8>> = source
                .bundle_set()
                .ok()
                .and_then(|set| set.get(&trust_domain))
                .map(|b| b.authorities().iter().map(|c| c.as_bytes().to_vec()).collect())
                .unwrap_or_default();
            if !server_bundle.is_empty() && server_bundle == source_bundle {
                return;
            }
            last = (server_bundle, source_bundle);
            tokio::select! {
                _ = updates.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    })
    .await;
    assert!(
        converged.is_ok(),
        "the workload's bundle ({} certs) never equalled the server's ({} certs) within {PROMPTLY:?}",
        last.1.len(),
        last.0.len()
    );

    source.shutdown_with_timeout(PROMPTLY).await.unwrap();
    agent.stop().await;
    server.stop().await;
}

/// Revoking an SVID through the admin API: the server's CRLs are signed by the
/// bundle's CAs (openssl `crl -CAfile` says "verify OK"), list the serial
/// (`crl -text`), make `openssl verify -crl_check` reject the revoked SVID and
/// accept a sibling SVID that was not revoked; bad serials get InvalidArgument,
/// unknown ones NotFound, revoking twice returns the same revocation; and all
/// of it survives a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_restart_and_crls_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("openssl");
    std::fs::create_dir_all(&work).unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], None).await;
    server.create_entry(DB_ID, &agent.id, &[&uid_selector()], None).await;

    // Both SVIDs, from one one-shot fetch.
    let client = workload_client(&agent).await;
    let svids = within(PROMPTLY, "a fetch with both SVIDs", async {
        loop {
            match client.fetch_all_x509_svids().await {
                Ok(svids) if svid_ids(&svids) == BTreeSet::from([WEB_ID.into(), DB_ID.into()]) => {
                    break svids
                }
                Ok(_) | Err(WorkloadApiError::NoIdentityIssued) => {}
                Err(e) => panic!("fetching all X509-SVIDs failed: {e} ({e:?})"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let web = svids.iter().find(|s| s.spiffe_id().to_string() == WEB_ID).unwrap();
    let db = svids.iter().find(|s| s.spiffe_id().to_string() == DB_ID).unwrap();
    let web_serial = serial_hex(web.leaf().as_bytes());
    let db_serial = serial_hex(db.leaf().as_bytes());
    let web_pem = work.join("web.pem");
    let db_pem = work.join("db.pem");
    std::fs::write(&web_pem, to_pem(&[web.leaf().as_bytes()])).unwrap();
    std::fs::write(&db_pem, to_pem(&[db.leaf().as_bytes()])).unwrap();

    // Revoke the web SVID only.
    let mut admin = server.admin().await;
    let revocation = admin
        .revoke_svid(RevokeSvidRequest {
            serial: web_serial.clone(),
            reason: "key compromise (test)".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("revoking the web SVID {web_serial} failed: {s:?}"))
        .into_inner();
    assert_eq!(revocation.serial, web_serial, "serial of the revocation returned");
    assert_eq!(revocation.spiffe_id, WEB_ID, "SPIFFE ID of the revocation returned");
    assert_eq!(revocation.reason, "key compromise (test)", "reason of the revocation returned");

    // Revoking again, in uppercase with colons, is idempotent.
    let again = admin
        .revoke_svid(RevokeSvidRequest {
            serial: colon_upper(&web_serial),
            reason: "second time".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("revoking {web_serial} a second time failed: {s:?}"))
        .into_inner();
    assert_eq!(again, revocation, "revoking twice must return the first revocation");

    // Bad and unknown serials.
    for (serial, code) in [
        ("not-a-serial", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("12:zz:34", Code::InvalidArgument),
        ("7fedcba9876543210fedcba987654321", Code::NotFound),
    ] {
        match admin
            .revoke_svid(RevokeSvidRequest {
                serial: serial.into(),
                reason: String::new(),
                ..Default::default()
            })
            .await
        {
            Err(status) => assert_eq!(
                status.code(),
                code,
                "revoking serial {serial:?}: {:?} {:?}",
                status.code(),
                status.message()
            ),
            Ok(r) => panic!("revoking serial {serial:?} succeeded: {:?}", r.into_inner()),
        }
    }

    // The CRLs: one per CA, signed by it, listing the web serial only.
    let before = check_crls_with_openssl(
        &server,
        &work,
        "before-restart",
        &web_serial,
        &db_serial,
        &web_pem,
        &db_pem,
    )
    .await;
    assert_revocation_listed(&server, &revocation, &db_serial).await;

    // Restart: the same revocations, in the CRLs and in ListRevocations.
    let server = server.restart().await;
    let after = check_crls_with_openssl(
        &server,
        &work,
        "after-restart",
        &web_serial,
        &db_serial,
        &web_pem,
        &db_pem,
    )
    .await;
    assert_eq!(
        after, before,
        "the serials revoked in the CRLs after the restart differ from before"
    );
    assert_revocation_listed(&server, &revocation, &db_serial).await;
    let mut admin = server.admin().await;
    let after_restart = admin
        .revoke_svid(RevokeSvidRequest {
            serial: web_serial.clone(),
            reason: "third time".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("revoking {web_serial} after the restart failed: {s:?}"))
        .into_inner();
    assert_eq!(
        after_restart, revocation,
        "revoking after a restart must return the stored revocation"
    );

    agent.stop().await;
    server.stop().await;
}

/// A workload following FetchX509SVID on a raw stream: once its live SVID is
/// revoked, the next response carries a new SVID (another serial) and CRLs
/// that list the old serial (and that openssl accepts, rejecting the old leaf
/// and accepting the new one). FetchX509Bundles delivers the CRL too: on a
/// stream opened before the revocation, and on one opened after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_svid_is_replaced_and_crl_reaches_workload() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("openssl");
    std::fs::create_dir_all(&work).unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    server.create_entry(WEB_ID, &agent.id, &[&uid_selector()], None).await;

    let mut raw = raw_client(&agent.socket).await;
    let (mut svid_stream, first) = within(PROMPTLY, "the first X509-SVID response", async {
        loop {
            match raw.fetch_x509svid(with_header(X509svidRequest {})).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match stream.message().await {
                        Ok(Some(first)) => break (stream, first),
                        Ok(None) => panic!("FetchX509SVID ended before its first response"),
                        Err(s) if s.code() == Code::PermissionDenied => {}
                        Err(s) => panic!("FetchX509SVID failed: {s:?}"),
                    }
                }
                Err(s) if s.code() == Code::PermissionDenied => {}
                Err(s) => panic!("FetchX509SVID failed: {s:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (old_leaf, old_serial) = only_web_leaf(&first, "the first response");
    let mut bundles_before = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_or_else(|s| panic!("FetchX509Bundles failed: {s:?}"))
        .into_inner();
    let first_bundles =
        within(PROMPTLY, "the first X509 bundles response", bundles_before.message())
            .await
            .unwrap_or_else(|s| panic!("FetchX509Bundles stream failed: {s:?}"))
            .expect("FetchX509Bundles ended before its first response");
    assert!(
        !crls_list(&first_bundles.crl, &old_serial),
        "a CRL lists {old_serial} before it was revoked"
    );

    server
        .admin()
        .await
        .revoke_svid(RevokeSvidRequest {
            serial: old_serial.clone(),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("revoking the live SVID {old_serial} failed: {s:?}"));

    // The very next X509-SVID response: a new SVID and a CRL naming the old one.
    let next =
        within(PROMPTLY, "the X509-SVID response after the revocation", svid_stream.message())
            .await
            .unwrap_or_else(|s| panic!("FetchX509SVID stream failed after the revocation: {s:?}"))
            .expect("FetchX509SVID stream ended after the revocation");
    let (new_leaf, new_serial) = only_web_leaf(&next, "the response after the revocation");
    assert_ne!(
        new_serial, old_serial,
        "the response after the revocation still has the revoked SVID"
    );
    let listed: Vec<BTreeSet<String>> = next.crl.iter().map(|c| crl_serials(c)).collect();
    assert!(
        listed.iter().any(|s| s.contains(&old_serial)),
        "no CRL in the response after the revocation lists {old_serial}: {} CRLs listing {listed:?}",
        next.crl.len()
    );
    assert!(
        !listed.iter().any(|s| s.contains(&new_serial)),
        "a CRL lists the replacement SVID {new_serial}"
    );

    // openssl agrees, with the bundle and CRLs the workload was given.
    let bundle = split_certs(&next.svids[0].bundle);
    let bundle_pem = work.join("bundle.pem");
    let crls_pem = work.join("crls.pem");
    let old_pem = work.join("old.pem");
    let new_pem = work.join("new.pem");
    std::fs::write(&bundle_pem, to_pem(&bundle)).unwrap();
    std::fs::write(&crls_pem, crls_to_pem(&next.crl)).unwrap();
    std::fs::write(&old_pem, to_pem(&[&old_leaf])).unwrap();
    std::fs::write(&new_pem, to_pem(&[&new_leaf])).unwrap();
    for (i, crl) in next.crl.iter().enumerate() {
        let crl_pem = work.join(format!("crl-{i}.pem"));
        std::fs::write(&crl_pem, crls_to_pem(std::slice::from_ref(crl))).unwrap();
        openssl_crl_verifies(&crl_pem, &bundle_pem, &format!("workload CRL {i}"));
    }
    let out = openssl_crl_check(&bundle_pem, &crls_pem, &old_pem);
    assert!(
        !out.status.success() && output_text(&out).contains("certificate revoked"),
        "openssl verify -crl_check with the workload's CRLs did not reject the revoked SVID: {}",
        output_text(&out)
    );
    let out = openssl_crl_check(&bundle_pem, &crls_pem, &new_pem);
    assert!(
        out.status.success(),
        "openssl verify -crl_check with the workload's CRLs rejected the replacement SVID: {}",
        output_text(&out)
    );

    // FetchX509Bundles delivers the CRL: to a new stream, and to the stream
    // that was open during the revocation.
    let mut problems = Vec::new();
    let mut bundles_after = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_or_else(|s| panic!("FetchX509Bundles after the revocation failed: {s:?}"))
        .into_inner();
    match within(
        PROMPTLY,
        "the first X509 bundles response after the revocation",
        bundles_after.message(),
    )
    .await
    {
        Ok(Some(response)) => {
            if !crls_list(&response.crl, &old_serial) {
                problems.push(format!(
                    "a FetchX509Bundles stream opened after the revocation got a first response \
                     whose {} CRLs do not list {old_serial}",
                    response.crl.len()
                ));
            }
        }
        Ok(None) => problems.push("FetchX509Bundles after the revocation ended at once".into()),
        Err(s) => problems.push(format!("FetchX509Bundles after the revocation failed: {s:?}")),
    }
    match tokio::time::timeout(PROMPTLY, bundle_listing(&mut bundles_before, &old_serial)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(e),
        Err(_) => problems.push(format!(
            "the FetchX509Bundles stream open during the revocation delivered no response whose \
             CRLs list {old_serial} within {PROMPTLY:?}"
        )),
    }
    assert!(
        problems.is_empty(),
        "CRLs did not reach the workload through FetchX509Bundles: {problems:#?}"
    );

    agent.stop().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Rotation tracking
// ---------------------------------------------------------------------------

/// What the workload held over a run, and what was wrong with it.
struct RotationTracker {
    dir: PathBuf,
    checks: u64,
    openssl_runs: u64,
    problems: Vec<String>,
    /// Every CA certificate (DER) seen in the workload's bundle.
    cas_seen: BTreeSet<Vec<u8>>,
    /// Every leaf serial seen.
    leaves_seen: BTreeSet<String>,
    /// The issuing CA certificates in order, consecutive repeats collapsed.
    issuers: Vec<Vec<u8>>,
    issuer_names: Vec<String>,
    /// (leaf, bundle) last checked by openssl.
    last_verified: Option<(Vec<u8>, Vec<Vec<u8>>)>,
}

impl RotationTracker {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            checks: 0,
            openssl_runs: 0,
            problems: Vec::new(),
            cas_seen: BTreeSet::new(),
            leaves_seen: BTreeSet::new(),
            issuers: Vec::new(),
            issuer_names: Vec::new(),
            last_verified: None,
        }
    }

    /// Checks the source's current SVID and bundle (one coherent snapshot).
    async fn observe(&mut self, source: &X509Source, when: &str) {
        self.checks += 1;
        let state = source.state();
        // Whole seconds, rounded down: `not_after` is whole seconds too, so
        // `now < not_after` is exactly "not expired".
        let now = now_unix();
        let svid = match state.svid() {
            Ok(svid) => svid,
            Err(e) => {
                self.problems.push(format!("{when}: the source had no usable SVID: {e}"));
                return;
            }
        };
        let context = match state.context() {
            Ok(context) => context,
            Err(e) => {
                self.problems.push(format!("{when}: the source had no context: {e}"));
                return;
            }
        };
        let trust_domain = TrustDomain::new(TRUST_DOMAIN).unwrap();
        let bundle: Vec<Vec<u8>> = context
            .bundle_set()
            .get(&trust_domain)
            .map(|b| b.authorities().iter().map(|c| c.as_bytes().to_vec()).collect())
            .unwrap_or_default();
        if bundle.is_empty() {
            self.problems.push(format!("{when}: the source had no bundle for {TRUST_DOMAIN}"));
            return;
        }
        self.cas_seen.extend(bundle.iter().cloned());

        let leaf_der = svid.leaf().as_bytes().to_vec();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("the leaf parses");
        let serial = serial_hex(&leaf_der);
        self.leaves_seen.insert(serial.clone());
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        if svid.spiffe_id().to_string() != WEB_ID {
            self.problems.push(format!("{when}: the SVID is for {}", svid.spiffe_id()));
        }
        if now >= not_after {
            self.problems.push(format!(
                "{when}: the SVID {serial} was expired: valid {not_before}..{not_after}, now {now}"
            ));
        }
        if not_before > now {
            self.problems.push(format!(
                "{when}: the SVID {serial} was not yet valid: valid {not_before}..{not_after}, now {now}"
            ));
        }

        // The issuer is in the bundle delivered with it: same name, and its key
        // verifies the leaf's signature.
        let issuer = bundle.iter().find(|ca| {
            let (_, ca) = x509_parser::parse_x509_certificate(ca).expect("a bundle CA parses");
            ca.subject().as_raw() == leaf.issuer().as_raw()
                && UnparsedPublicKey::new(
                    &ECDSA_P256_SHA256_ASN1,
                    &ca.public_key().subject_public_key.data,
                )
                .verify(leaf.tbs_certificate.as_ref(), &leaf.signature_value.data)
                .is_ok()
        });
        let Some(issuer) = issuer else {
            self.problems.push(format!(
                "{when}: the SVID {serial} (issuer {}) does not chain to any of the {} CAs in \
                 the bundle delivered with it",
                leaf.issuer(),
                bundle.len()
            ));
            return;
        };
        if self.issuers.last() != Some(issuer) {
            self.issuers.push(issuer.clone());
            self.issuer_names.push(leaf.issuer().to_string());
        }

        // openssl, at the instant observed, for every new (leaf, bundle).
        let material = (leaf_der.clone(), bundle.clone());
        if self.last_verified.as_ref() == Some(&material) {
            return;
        }
        self.last_verified = Some(material);
        self.openssl_runs += 1;
        let n = self.openssl_runs;
        let bundle_path = self.dir.join(format!("bundle-{n}.pem"));
        let leaf_path = self.dir.join(format!("svid-{n}.pem"));
        std::fs::write(&bundle_path, to_pem(&bundle)).unwrap();
        std::fs::write(&leaf_path, to_pem(&[&leaf_der])).unwrap();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("openssl")
                .args(["verify", "-attime", &now.to_string(), "-CAfile"])
                .arg(&bundle_path)
                .arg(&leaf_path)
                .output()
                .expect("openssl runs")
        })
        .await
        .unwrap();
        if !out.status.success() {
            self.problems.push(format!(
                "{when}: openssl verify (at {now}) rejected the SVID {serial} against the bundle \
                 delivered with it: {}",
                output_text(&out)
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Revocation helpers
// ---------------------------------------------------------------------------

/// Checks the server's CRLs with openssl (each verifies against the bundle;
/// the one listing `revoked` is found by `crl -text`; `verify -crl_check`
/// rejects `revoked_pem` and accepts `kept_pem`); returns every serial the
/// CRLs list (parsed with x509-parser).
async fn check_crls_with_openssl(
    server: &TestServer,
    work: &Path,
    name: &str,
    revoked: &str,
    kept: &str,
    revoked_pem: &Path,
    kept_pem: &Path,
) -> BTreeSet<String> {
    let bundle = server.admin().await.get_bundle(GetBundleRequest {}).await.unwrap().into_inner();
    assert!(!bundle.authorities.is_empty(), "{name}: the bundle has no CAs");
    assert_eq!(
        bundle.crls.len(),
        bundle.authorities.len(),
        "{name}: GetBundle must return one CRL per CA in the bundle"
    );
    let bundle_pem = work.join(format!("{name}-bundle.pem"));
    let crls_pem = work.join(format!("{name}-crls.pem"));
    std::fs::write(&bundle_pem, to_pem(&bundle.authorities)).unwrap();
    std::fs::write(&crls_pem, crls_to_pem(&bundle.crls)).unwrap();

    let mut text_serials = BTreeSet::new();
    for (i, crl) in bundle.crls.iter().enumerate() {
        let crl_pem = work.join(format!("{name}-crl-{i}.pem"));
        std::fs::write(&crl_pem, crls_to_pem(std::slice::from_ref(crl))).unwrap();
        openssl_crl_verifies(&crl_pem, &bundle_pem, &format!("{name}: CRL {i}"));
        let out = Command::new("openssl")
            .args(["crl", "-noout", "-text", "-in"])
            .arg(&crl_pem)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "{name}: openssl crl -text failed: {}", output_text(&out));
        text_serials.extend(openssl_text_serials(&String::from_utf8_lossy(&out.stdout)));
    }
    assert!(
        text_serials.contains(revoked),
        "{name}: `openssl crl -text` of the CRLs does not list the revoked serial {revoked}; it lists {text_serials:?}"
    );
    assert!(
        !text_serials.contains(kept),
        "{name}: `openssl crl -text` lists the serial {kept}, which was not revoked"
    );

    let out = openssl_crl_check(&bundle_pem, &crls_pem, revoked_pem);
    assert!(
        !out.status.success() && output_text(&out).contains("certificate revoked"),
        "{name}: openssl verify -crl_check did not reject the revoked SVID {revoked}: {}",
        output_text(&out)
    );
    let out = openssl_crl_check(&bundle_pem, &crls_pem, kept_pem);
    assert!(
        out.status.success(),
        "{name}: openssl verify -crl_check rejected the SVID {kept}, which was not revoked: {}",
        output_text(&out)
    );

    let parsed: BTreeSet<String> = bundle.crls.iter().flat_map(|c| crl_serials(c)).collect();
    assert_eq!(
        parsed, text_serials,
        "{name}: x509-parser and openssl read different serials from the CRLs"
    );
    parsed
}

/// ListRevocations has `revocation` (exactly as returned when it was made) and
/// nothing for `kept`.
async fn assert_revocation_listed(server: &TestServer, revocation: &Revocation, kept: &str) {
    let listed = server
        .admin()
        .await
        .list_revocations(ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .revocations;
    let found: Vec<&Revocation> = listed.iter().filter(|r| r.serial == revocation.serial).collect();
    assert_eq!(
        found,
        vec![revocation],
        "ListRevocations entries for {}: {listed:?}",
        revocation.serial
    );
    assert!(
        !listed.iter().any(|r| r.serial == kept),
        "ListRevocations lists {kept}, which was not revoked: {listed:?}"
    );
}

fn openssl_crl_verifies(crl_pem: &Path, bundle_pem: &Path, what: &str) {
    let out = Command::new("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(crl_pem)
        .arg("-CAfile")
        .arg(bundle_pem)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success() && output_text(&out).contains("verify OK"),
        "{what}: `openssl crl -CAfile <bundle>` did not verify the CRL: {}",
        output_text(&out)
    );
}

fn openssl_crl_check(bundle_pem: &Path, crls_pem: &Path, leaf_pem: &Path) -> Output {
    Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(bundle_pem)
        .arg("-CRLfile")
        .arg(crls_pem)
        .arg(leaf_pem)
        .output()
        .expect("openssl runs")
}

/// The serials in `openssl crl -text` output, normalized to lowercase hex
/// without colons or leading zero bytes.
fn openssl_text_serials(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Serial Number:"))
        .map(|serial| normalize_hex(serial.trim()))
        .collect()
}

/// Lowercase hex without colons and without leading zero bytes.
fn normalize_hex(serial: &str) -> String {
    let hex: String = serial.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let mut hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    while hex.len() > 2 && hex.starts_with("00") {
        hex.drain(..2);
    }
    hex
}

/// The revoked serials a DER CRL lists.
fn crl_serials(der: &[u8]) -> BTreeSet<String> {
    let (_, crl) = x509_parser::parse_x509_crl(der).expect("the CRL parses");
    crl.iter_revoked_certificates().map(|r| trimmed_hex(r.raw_serial())).collect()
}

fn crls_list(crls: &[Vec<u8>], serial: &str) -> bool {
    crls.iter().any(|c| crl_serials(c).contains(serial))
}

fn crls_to_pem(crls: &[Vec<u8>]) -> String {
    crls.iter().map(|c| pem::encode(&pem::Pem::new("X509 CRL", c.clone()))).collect()
}

/// Reads a FetchX509Bundles stream until a response's CRLs list `serial`.
async fn bundle_listing(
    stream: &mut Streaming<X509BundlesResponse>,
    serial: &str,
) -> Result<(), String> {
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                if crls_list(&response.crl, serial) {
                    return Ok(());
                }
            }
            Ok(None) => {
                return Err("the FetchX509Bundles stream open during the revocation ended".into())
            }
            Err(s) => {
                return Err(format!(
                    "the FetchX509Bundles stream open during the revocation failed: {s:?}"
                ))
            }
        }
    }
}

/// The response's only SVID (for WEB_ID): its leaf DER and serial.
fn only_web_leaf(response: &X509svidResponse, what: &str) -> (Vec<u8>, String) {
    assert_eq!(response.svids.len(), 1, "{what}: number of SVIDs");
    let svid = &response.svids[0];
    assert_eq!(svid.spiffe_id, WEB_ID, "{what}: SPIFFE ID");
    let chain = split_certs(&svid.x509_svid);
    assert!(!chain.is_empty(), "{what}: empty chain");
    let serial = serial_hex(&chain[0]);
    (chain[0].clone(), serial)
}

// ---------------------------------------------------------------------------
// Common helpers
// ---------------------------------------------------------------------------

fn svid_ids(svids: &[X509Svid]) -> BTreeSet<String> {
    svids.iter().map(|s| s.spiffe_id().to_string()).collect()
}

/// Splits concatenated DER certificates.
fn split_certs(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).expect("a certificate parses");
        certs.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    certs
}

/// `4a3b…` as `4A:3B:…`.
fn colon_upper(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
