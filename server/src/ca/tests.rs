//! The CA's rotation, bundle and signing, through `Ca`.

use super::*;
use tessera_common::clock::ManualClock;

fn policy(ttl: u64) -> CaPolicy {
    CaPolicy {
        ttl,
        prepare_at: 0.5,
        activate_at: 5.0 / 6.0,
        jwt_key_type: JwtKeyType::EcP256,
        jwt_issuer: None,
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[test]
fn ca_persists_across_restart_with_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let first = Ca::load_or_create(dir.path(), td(), policy(3600), clock.clone()).unwrap();
    let second = Ca::load_or_create(dir.path(), td(), policy(3600), clock).unwrap();
    assert_eq!(first.bundle(), second.bundle());
    use std::os::unix::fs::PermissionsExt;
    let mode =
        std::fs::metadata(dir.path().join("ca/ca-000001.key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn ca_of_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    Ca::load_or_create(dir.path(), td(), policy(3600), clock.clone()).unwrap();
    let other = TrustDomain::new("other.org").unwrap();
    let err = Ca::load_or_create(dir.path(), other, policy(3600), clock).unwrap_err();
    assert!(err.to_string().contains("not to trust domain other.org"), "{err}");
}

#[test]
fn rotation_prepares_then_activates_then_retires() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let ca = Ca::load_or_create(dir.path(), td(), policy(600), Arc::new(clock.clone())).unwrap();
    assert_eq!(ca.bundle().len(), 1);
    let first_not_after = ca.active_not_after();
    clock.advance(301);
    assert!(ca.rotate().unwrap());
    assert_eq!(ca.bundle().len(), 2, "next CA is published before use");
    assert_eq!(ca.active_not_after(), first_not_after, "but does not sign yet");
    clock.advance(200);
    ca.rotate().unwrap();
    assert!(ca.active_not_after() > first_not_after, "activated at 5/6");
    let first_cert = ca.bundle()[0].clone();
    clock.advance(110);
    ca.rotate().unwrap();
    assert!(!ca.bundle().contains(&first_cert), "expired CA leaves the bundle");
    // Restart picks up the same active CA.
    let again = Ca::load_or_create(dir.path(), td(), policy(600), Arc::new(clock)).unwrap();
    assert_eq!(again.bundle(), ca.bundle());
}

/// A server down for longer than a CA's life starts a new generation
/// with a new number: never an old key file, so never a retired JWT
/// key signing again.
#[test]
fn a_new_generation_after_every_ca_expired_gets_new_keys() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let ca = Ca::load_or_create(dir.path(), td(), policy(60), Arc::new(clock.clone())).unwrap();
    let old_kid = ca.jwt_authorities()[0].kid.clone();
    drop(ca);
    clock.advance(120);
    let ca = Ca::load_or_create(dir.path(), td(), policy(60), Arc::new(clock)).unwrap();
    let keys = ca.jwt_authorities();
    assert_eq!(keys.len(), 1);
    assert_ne!(keys[0].kid, old_kid, "a fresh JWT key");
    assert!(dir.path().join("ca/ca-000002.crt.pem").exists(), "numbering continues");
}

#[test]
fn svid_never_outlives_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let ca = Ca::load_or_create(dir.path(), td(), policy(100), clock).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let svid = ca.sign_svid(&key, &id, 3600, &[]).unwrap();
    assert_eq!(svid.expires_at, ca.active_not_after());
    let parsed =
        tessera_workload_api::validate_leaf_cert(&CertificateDer::from(svid.leaf)).unwrap();
    assert_eq!(parsed, id);
}
