#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};

struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn ca_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri(id)];
    params
}

fn self_signed_ca(params: CertificateParams) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = params.self_signed(&key).unwrap().der().clone();
    Ca { der, issuer: Issuer::new(params, key) }
}

fn root_ca() -> Ca {
    self_signed_ca(ca_params("spiffe://example.org"))
}

fn intermediate(parent: &Ca, params: CertificateParams) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = params.signed_by(&key, &parent.issuer).unwrap().der().clone();
    Ca { der, issuer: Issuer::new(params, key) }
}

fn leaf_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![uri(id)];
    params
}

/// A leaf signed by `ca`, as DER, with its PKCS#8 key.
fn leaf(ca: &Ca, params: &CertificateParams) -> (CertificateDer<'static>, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = params.signed_by(&key, &ca.issuer).unwrap().der().clone();
    (der, key.serialize_der())
}

fn leaf_err(params: CertificateParams) -> X509Error {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &params);
    validate_leaf_cert(&der).unwrap_err()
}

#[test]
fn good_leaf_validates() {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &leaf_params("spiffe://example.org/billing/api"));
    let id = validate_leaf_cert(&der).unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/billing/api");
}

#[test]
fn leaf_without_basic_constraints_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.is_ca = IsCa::NoCa;
    assert_eq!(leaf_err(params), X509Error::MissingBasicConstraints);
}

#[test]
fn leaf_with_ca_true_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(leaf_err(params), X509Error::LeafIsCa);
}

#[test]
fn leaf_without_key_usage_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages.clear();
    assert_eq!(leaf_err(params), X509Error::MissingKeyUsage);
}

#[test]
fn leaf_with_non_critical_key_usage_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages.clear();
    // KeyUsage (2.5.29.15) = BIT STRING digitalSignature, not critical.
    params.custom_extensions =
        vec![CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80])];
    assert_eq!(leaf_err(params), X509Error::KeyUsageNotCritical);
}

#[test]
fn leaf_with_key_cert_sign_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    assert_eq!(leaf_err(params), X509Error::LeafCanSign);
}

#[test]
fn leaf_with_crl_sign_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages.push(KeyUsagePurpose::CrlSign);
    assert_eq!(leaf_err(params), X509Error::LeafCanSign);
}

#[test]
fn leaf_without_digital_signature_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert_eq!(leaf_err(params), X509Error::NoDigitalSignature);
}

#[test]
fn leaf_may_have_key_encipherment_and_agreement() {
    let ca = root_ca();
    let mut params = leaf_params("spiffe://example.org/a");
    params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    params.key_usages.push(KeyUsagePurpose::KeyAgreement);
    let (der, _) = leaf(&ca, &params);
    assert!(validate_leaf_cert(&der).is_ok());
}

#[test]
fn leaf_without_eku_is_accepted() {
    let ca = root_ca();
    let mut params = leaf_params("spiffe://example.org/a");
    params.extended_key_usages.clear();
    let (der, _) = leaf(&ca, &params);
    assert!(validate_leaf_cert(&der).is_ok());
}

#[test]
fn leaf_with_eku_useless_for_tls_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    assert_eq!(leaf_err(params), X509Error::EkuNotForTls);
}

#[test]
fn leaf_without_uri_san_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.subject_alt_names = vec![SanType::DnsName("a.example.org".try_into().unwrap())];
    assert_eq!(leaf_err(params), X509Error::UriSanCount(0));
    let mut params = leaf_params("spiffe://example.org/a");
    params.subject_alt_names.clear();
    assert_eq!(leaf_err(params), X509Error::UriSanCount(0));
}

#[test]
fn leaf_with_dns_san_besides_the_uri_is_accepted() {
    let ca = root_ca();
    let mut params = leaf_params("spiffe://example.org/a");
    params.subject_alt_names.push(SanType::DnsName("a.example.org".try_into().unwrap()));
    let (der, _) = leaf(&ca, &params);
    assert_eq!(validate_leaf_cert(&der).unwrap().as_str(), "spiffe://example.org/a");
}

#[test]
fn leaf_with_two_uri_sans_fails() {
    let mut params = leaf_params("spiffe://example.org/a");
    params.subject_alt_names.push(uri("spiffe://example.org/b"));
    assert_eq!(leaf_err(params), X509Error::UriSanCount(2));
}

#[test]
fn leaf_with_root_id_fails() {
    let params = leaf_params("spiffe://example.org");
    assert_eq!(leaf_err(params), X509Error::RootIdInLeaf);
}

#[test]
fn leaf_with_invalid_spiffe_id_fails() {
    let params = leaf_params("spiffe://example.org/a/../b");
    assert_eq!(
        leaf_err(params),
        X509Error::InvalidSpiffeId(SpiffeIdError::DotSegment("..".into()))
    );
    let params = leaf_params("https://example.org/a");
    assert_eq!(leaf_err(params), X509Error::InvalidSpiffeId(SpiffeIdError::WrongScheme));
}

#[test]
fn ca_validates_and_returns_its_id() {
    let ca = root_ca();
    let id = validate_ca_cert(&ca.der).unwrap();
    assert_eq!(id.unwrap().as_str(), "spiffe://example.org");

    let mut params = ca_params("spiffe://example.org");
    params.subject_alt_names.clear();
    let ca = self_signed_ca(params);
    assert_eq!(validate_ca_cert(&ca.der).unwrap(), None);
}

#[test]
fn ca_rules_are_enforced() {
    let mut params = ca_params("spiffe://example.org");
    params.is_ca = IsCa::ExplicitNoCa;
    assert_eq!(validate_ca_cert(&self_signed_ca(params).der), Err(X509Error::NotCa));

    let mut params = ca_params("spiffe://example.org");
    params.is_ca = IsCa::NoCa;
    assert_eq!(
        validate_ca_cert(&self_signed_ca(params).der),
        Err(X509Error::MissingBasicConstraints)
    );

    let mut params = ca_params("spiffe://example.org");
    params.key_usages = vec![KeyUsagePurpose::CrlSign];
    assert_eq!(validate_ca_cert(&self_signed_ca(params).der), Err(X509Error::CaCannotSign));

    let mut params = ca_params("spiffe://example.org");
    params.key_usages.clear();
    assert_eq!(validate_ca_cert(&self_signed_ca(params).der), Err(X509Error::MissingKeyUsage));

    let params = ca_params("spiffe://example.org/ca");
    assert!(matches!(
        validate_ca_cert(&self_signed_ca(params).der),
        Err(X509Error::NonRootIdInCa(_))
    ));
}

#[test]
fn leaf_is_not_a_ca_and_ca_is_not_a_leaf() {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &leaf_params("spiffe://example.org/a"));
    assert_eq!(validate_ca_cert(&der), Err(X509Error::NotCa));
    assert_eq!(validate_leaf_cert(&ca.der), Err(X509Error::LeafIsCa));
}

#[test]
fn split_two_certificates() {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &leaf_params("spiffe://example.org/a"));
    let bytes = [der.as_ref(), ca.der.as_ref()].concat();
    let certs = split_der_chain(&bytes).unwrap();
    assert_eq!(certs, vec![der, ca.der]);
}

#[test]
fn split_rejects_empty_input() {
    assert_eq!(split_der_chain(&[]), Err(X509Error::EmptyChain));
}

#[test]
fn split_rejects_truncated_input() {
    let ca = root_ca();
    let bytes = [ca.der.as_ref(), ca.der.as_ref()].concat();
    let cut = &bytes[..bytes.len() - 1];
    assert!(matches!(
        split_der_chain(cut),
        Err(X509Error::TruncatedDer { offset, .. }) if offset == ca.der.len()
    ));
    assert!(matches!(
        split_der_chain(&ca.der[..3]),
        Err(X509Error::TruncatedDer { offset: 0, .. })
    ));
    assert!(matches!(split_der_chain(&[0x30]), Err(X509Error::TruncatedDer { offset: 0, .. })));
}

#[test]
fn split_rejects_trailing_garbage() {
    let ca = root_ca();
    let bytes = [ca.der.as_ref(), b"garbage"].concat();
    assert_eq!(split_der_chain(&bytes), Err(X509Error::BadDerHeader { offset: ca.der.len() }));
    // A well-formed DER SEQUENCE that is no certificate.
    let bytes = [ca.der.as_ref(), &[0x30, 0x03, 0x02, 0x01, 0x01]].concat();
    assert!(matches!(split_der_chain(&bytes), Err(X509Error::Parse(_))));
}

#[test]
fn split_rejects_pem() {
    assert_eq!(
        split_der_chain(b"-----BEGIN CERTIFICATE-----\n"),
        Err(X509Error::BadDerHeader { offset: 0 })
    );
}

#[test]
fn split_rejects_more_than_16() {
    let ca = root_ca();
    let sixteen: Vec<u8> = std::iter::repeat_n(ca.der.as_ref(), 16).flatten().copied().collect();
    assert_eq!(split_der_chain(&sixteen).unwrap().len(), 16);
    let seventeen = [sixteen.as_slice(), ca.der.as_ref()].concat();
    assert_eq!(split_der_chain(&seventeen), Err(X509Error::ChainTooLong(17)));
}

#[test]
fn svid_from_der() {
    let root = root_ca();
    let inter = intermediate(&root, ca_params("spiffe://example.org"));
    let mut params = leaf_params("spiffe://example.org/billing/api");
    params.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x01, 0xab, 0xcd]));
    let (der, key) = leaf(&inter, &params);
    let chain = [der.as_ref(), inter.der.as_ref()].concat();

    let svid = X509Svid::from_der(&chain, &key).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/billing/api");
    assert_eq!(svid.chain().len(), 2);
    assert_eq!(svid.leaf(), &der);
    assert_eq!(svid.key_pkcs8(), key.as_slice());
    assert_eq!(svid.chain_der_concat(), chain);
    assert_eq!(svid.serial_hex(), "01abcd");
    // rcgen's default NotAfter is 4096-01-01T00:00:00Z.
    assert_eq!(svid.not_after_unix(), 67_090_118_400);

    let debug = format!("{svid:?}");
    assert!(debug.contains("spiffe://example.org/billing/api"));
    assert!(debug.contains("01abcd"));
    assert!(!debug.contains("key"));
}

#[test]
fn svid_with_mismatched_key_fails() {
    let ca = root_ca();
    let params = leaf_params("spiffe://example.org/a");
    let (der, _) = leaf(&ca, &params);
    let (_, other_key) = leaf(&ca, &params);
    assert_eq!(X509Svid::from_der(&der, &other_key).unwrap_err(), X509Error::KeyMismatch);
}

#[test]
fn svid_with_garbage_key_fails() {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &leaf_params("spiffe://example.org/a"));
    assert!(matches!(X509Svid::from_der(&der, b"not a key"), Err(X509Error::InvalidKey(_))));
}

#[test]
fn svid_with_non_ca_intermediate_fails() {
    let ca = root_ca();
    let params = leaf_params("spiffe://example.org/a");
    let (der, key) = leaf(&ca, &params);
    let (other, _) = leaf(&ca, &params);
    let chain = [der.as_ref(), other.as_ref()].concat();
    assert_eq!(
        X509Svid::from_der(&chain, &key).unwrap_err(),
        X509Error::Intermediate { index: 1, source: Box::new(X509Error::NotCa) }
    );
}

#[test]
fn svid_with_foreign_intermediate_fails() {
    let root = root_ca();
    let inter = intermediate(&root, ca_params("spiffe://other.org"));
    let (der, key) = leaf(&inter, &leaf_params("spiffe://example.org/a"));
    let chain = [der.as_ref(), inter.der.as_ref()].concat();
    assert!(matches!(
        X509Svid::from_der(&chain, &key),
        Err(X509Error::Intermediate { index: 1, source })
            if matches!(*source, X509Error::TrustDomainMismatch { .. })
    ));
}

#[test]
fn svid_with_bad_leaf_fails() {
    let ca = root_ca();
    let (der, key) = leaf(&ca, &leaf_params("spiffe://example.org"));
    assert_eq!(X509Svid::from_der(&der, &key).unwrap_err(), X509Error::RootIdInLeaf);
}

#[test]
fn bundle_from_der() {
    let a = root_ca();
    let b = root_ca();
    let td = TrustDomain::new("example.org").unwrap();
    let bytes = [a.der.as_ref(), b.der.as_ref()].concat();
    let bundle = X509Bundle::from_der(td.clone(), &bytes).unwrap();
    assert_eq!(bundle.trust_domain(), &td);
    assert_eq!(bundle.authorities(), &[a.der.clone(), b.der.clone()]);
    assert_eq!(bundle.to_der_concat(), bytes);
    assert_eq!(X509Bundle::new(td, vec![a.der, b.der]), bundle);
}

#[test]
fn bundle_rejects_non_ca_and_foreign_ca() {
    let ca = root_ca();
    let (der, _) = leaf(&ca, &leaf_params("spiffe://example.org/a"));
    let td = TrustDomain::new("example.org").unwrap();
    let bytes = [ca.der.as_ref(), der.as_ref()].concat();
    assert_eq!(
        X509Bundle::from_der(td.clone(), &bytes).unwrap_err(),
        X509Error::Authority { index: 1, source: Box::new(X509Error::NotCa) }
    );
    let other = TrustDomain::new("other.org").unwrap();
    assert!(matches!(
        X509Bundle::from_der(other, &ca.der),
        Err(X509Error::Authority { index: 0, .. })
    ));
    assert_eq!(X509Bundle::from_der(td, &[]).unwrap_err(), X509Error::EmptyChain);
}

#[test]
fn bundle_to_pem_round_trips_through_rustls_pki_types() {
    use rustls_pki_types::pem::PemObject;

    let a = root_ca();
    let b = root_ca();
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = X509Bundle::new(td, vec![a.der.clone(), b.der.clone()]);
    let pem = bundle.to_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(pem.ends_with("-----END CERTIFICATE-----\n"));
    assert!(pem.lines().all(|l| l.len() <= 64));
    let parsed: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert_eq!(parsed, vec![a.der, b.der]);
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, output) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(input.as_bytes()), output);
    }
}

#[test]
fn serial_hex_strips_leading_zero_bytes() {
    assert_eq!(serial_to_hex(&[0x00, 0x8f, 0x01]), "8f01");
    assert_eq!(serial_to_hex(&[0x01, 0x00]), "0100");
    assert_eq!(serial_to_hex(&[0x00]), "00");
    assert_eq!(serial_to_hex(&[]), "");
}
