//! X509-SVIDs and X.509 bundles: splitting DER chains and checking
//! certificates against the SPIFFE X509-SVID profile.
//!
//! What is checked here is what independent Workload API clients check: a
//! leaf must *have* BasicConstraints (CA=false) and a critical KeyUsage with
//! digitalSignature and no signing bits, exactly one URI SAN holding a
//! non-root SPIFFE ID; a chain holds at most 16 certificates; the private key
//! belongs to the leaf. Signature and validity checks belong to the TLS
//! verifiers, not here.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Most certificates an X509-SVID chain may hold (leaf included).
const MAX_CHAIN_LEN: usize = 16;

/// DER tag of a constructed SEQUENCE, which every certificate is.
const DER_SEQUENCE: u8 = 0x30;

/// Why bytes are not a valid X509-SVID, chain, CA certificate or bundle.
///
/// Each variant names the rule of the X509-SVID profile (or of DER) broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// A chain or bundle was given no bytes at all.
    #[error("certificate chain is empty (at least one DER certificate is required)")]
    EmptyChain,

    /// The bytes at `offset` are not the start of a DER SEQUENCE: the input is
    /// not concatenated DER certificates (PEM, say) or has trailing garbage.
    #[error(
        "bytes at offset {offset} are not a DER certificate header (expected concatenated DER certificates)"
    )]
    BadDerHeader {
        /// Byte offset of the bad header in the input.
        offset: usize,
    },

    /// The DER element at `offset` is longer than the bytes that remain.
    #[error(
        "DER certificate at offset {offset} is truncated: it needs {needed} bytes but {available} remain"
    )]
    TruncatedDer {
        /// Byte offset of the truncated element in the input.
        offset: usize,
        /// Bytes the element's header announces (header included).
        needed: usize,
        /// Bytes left in the input from `offset`.
        available: usize,
    },

    /// An X509-SVID chain holds more than 16 certificates.
    #[error("certificate chain has {0} certificates (at most 16 are allowed)")]
    ChainTooLong(usize),

    /// A certificate is not parseable X.509 DER, or has a malformed or
    /// duplicated extension.
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),

    /// The certificate has no BasicConstraints extension (a leaf must say
    /// CA=false explicitly; a CA must say CA=true).
    #[error("certificate has no BasicConstraints extension (the X509-SVID profile requires it)")]
    MissingBasicConstraints,

    /// The leaf's BasicConstraints says CA=true.
    #[error(
        "leaf certificate has BasicConstraints CA=true (an X509-SVID leaf must have CA=false)"
    )]
    LeafIsCa,

    /// The certificate has no KeyUsage extension.
    #[error("certificate has no KeyUsage extension (the X509-SVID profile requires it)")]
    MissingKeyUsage,

    /// The leaf's KeyUsage extension is not marked critical.
    #[error("leaf certificate's KeyUsage extension is not critical (the X509-SVID profile requires it to be)")]
    KeyUsageNotCritical,

    /// The leaf's KeyUsage has keyCertSign or cRLSign.
    #[error(
        "leaf certificate's KeyUsage has keyCertSign or cRLSign (an X509-SVID leaf must not sign)"
    )]
    LeafCanSign,

    /// The leaf's KeyUsage lacks digitalSignature.
    #[error("leaf certificate's KeyUsage lacks digitalSignature (an X509-SVID leaf requires it)")]
    NoDigitalSignature,

    /// The leaf has an ExtendedKeyUsage extension that allows neither
    /// serverAuth nor clientAuth, so it is useless for mTLS.
    #[error("leaf certificate's ExtendedKeyUsage allows neither serverAuth nor clientAuth")]
    EkuNotForTls,

    /// The leaf does not have exactly one URI SAN (or a CA has more than one).
    #[error("certificate has {0} URI SANs (an X509-SVID leaf has exactly one, a CA at most one)")]
    UriSanCount(usize),

    /// The URI SAN is not a valid SPIFFE ID.
    #[error("certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(SpiffeIdError),

    /// The leaf's SPIFFE ID is a trust domain's root ID (no path).
    #[error("leaf certificate's SPIFFE ID has no path (an X509-SVID leaf's ID must not be the trust domain root)")]
    RootIdInLeaf,

    /// A CA certificate's BasicConstraints says CA=false.
    #[error("certificate is not a CA (BasicConstraints CA=false)")]
    NotCa,

    /// A CA certificate's KeyUsage lacks keyCertSign.
    #[error("CA certificate's KeyUsage lacks keyCertSign")]
    CaCannotSign,

    /// A CA certificate's URI SAN is a SPIFFE ID with a path.
    #[error("CA certificate's SPIFFE ID {0} has a path (a CA's ID must be the trust domain root)")]
    NonRootIdInCa(SpiffeId),

    /// A CA certificate names another trust domain than the leaf or bundle.
    #[error("CA certificate belongs to trust domain {found}, expected {expected}")]
    TrustDomainMismatch {
        /// The trust domain of the leaf or bundle.
        expected: TrustDomain,
        /// The trust domain in the CA certificate's SPIFFE ID.
        found: TrustDomain,
    },

    /// An intermediate certificate of an X509-SVID chain is not a valid CA.
    #[error("intermediate certificate {index} of the chain is not a valid CA: {source}")]
    Intermediate {
        /// Position in the chain (the leaf is 0).
        index: usize,
        /// Which CA rule it broke.
        source: Box<X509Error>,
    },

    /// A certificate of a bundle is not a valid CA.
    #[error("bundle certificate {index} is not a valid CA: {source}")]
    Authority {
        /// Position in the bundle.
        index: usize,
        /// Which CA rule it broke.
        source: Box<X509Error>,
    },

    /// The private key is not an unencrypted ECDSA P-256 PKCS#8 key.
    #[error("private key is not an ECDSA P-256 PKCS#8 key: {0}")]
    InvalidKey(String),

    /// The private key's public key differs from the leaf's.
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid`
/// field: leaf first) into one `CertificateDer` each, checking that each
/// parses as X.509 and that at most 16 are given.
pub fn split_der_chain(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, X509Error> {
    split_der(bytes, Some(MAX_CHAIN_LEN))
}

/// Checks an X509-SVID leaf certificate against the profile and returns the
/// SPIFFE ID in its URI SAN.
pub fn validate_leaf_cert(der: &[u8]) -> Result<SpiffeId, X509Error> {
    let cert = parse_cert(der)?;
    check_leaf(&cert)
}

/// Checks a CA certificate (BasicConstraints CA=true, KeyUsage keyCertSign)
/// and returns the SPIFFE ID in its URI SAN, which if present must be a
/// trust domain's root ID.
pub fn validate_ca_cert(der: &[u8]) -> Result<Option<SpiffeId>, X509Error> {
    let cert = parse_cert(der)?;
    check_ca(&cert)
}

/// An X509-SVID: a validated chain (leaf first) and the leaf's private key.
pub struct X509Svid {
    spiffe_id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    serial_hex: String,
    not_after_unix: i64,
}

impl X509Svid {
    /// Builds an SVID from concatenated DER certificates (leaf first) and an
    /// ECDSA P-256 PKCS#8 private key, checking the leaf profile, that every
    /// other certificate is a CA of the same trust domain, and that the key
    /// belongs to the leaf.
    pub fn from_der(chain: &[u8], key_pkcs8: &[u8]) -> Result<Self, X509Error> {
        let certs = split_der_chain(chain)?;
        let Some((leaf_der, intermediates)) = certs.split_first() else {
            // split_der_chain never returns an empty chain.
            return Err(X509Error::EmptyChain);
        };
        let leaf = parse_cert(leaf_der)?;
        let spiffe_id = check_leaf(&leaf)?;

        for (i, der) in intermediates.iter().enumerate() {
            let index = i + 1;
            let wrap = |e: X509Error| X509Error::Intermediate { index, source: Box::new(e) };
            let ca_id = validate_ca_cert(der).map_err(wrap)?;
            check_same_trust_domain(spiffe_id.trust_domain(), ca_id.as_ref()).map_err(wrap)?;
        }

        let key_pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            key_pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| X509Error::InvalidKey(e.to_string()))?;
        if key_pair.public_key().as_ref() != leaf.public_key().subject_public_key.data.as_ref() {
            return Err(X509Error::KeyMismatch);
        }

        let serial_hex = serial_to_hex(leaf.raw_serial());
        let not_after_unix = leaf.validity().not_after.timestamp();
        Ok(Self {
            spiffe_id,
            chain: certs,
            key: PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()),
            serial_hex,
            not_after_unix,
        })
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The whole chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_der` only builds an SVID from a non-empty chain, so the
        // first element always exists; indexing keeps the getter infallible.
        &self.chain[0]
    }

    /// The private key, PKCS#8 DER (the Workload API's `x509_svid_key`).
    pub fn key_pkcs8(&self) -> &[u8] {
        self.key.secret_pkcs8_der()
    }

    /// The private key in the form rustls takes.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The chain concatenated as DER (the Workload API's `x509_svid`).
    pub fn chain_der_concat(&self) -> Vec<u8> {
        concat_der(&self.chain)
    }

    /// The leaf's serial number as lowercase hex, leading zero bytes removed
    /// (a serial of zero is `00`).
    pub fn serial_hex(&self) -> String {
        self.serial_hex.clone()
    }

    /// The leaf's NotAfter, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        Self {
            spiffe_id: self.spiffe_id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            serial_hex: self.serial_hex.clone(),
            not_after_unix: self.not_after_unix,
        }
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("serial", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// A trust domain's X.509 bundle: the CA certificates its SVIDs chain to.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Bundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
}

impl X509Bundle {
    /// Parses concatenated DER CA certificates (the Workload API's `bundle`
    /// field), each of which must be a CA of `trust_domain`.
    pub fn from_der(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, X509Error> {
        let authorities = split_der(bytes, None)?;
        for (index, der) in authorities.iter().enumerate() {
            let wrap = |e: X509Error| X509Error::Authority { index, source: Box::new(e) };
            let ca_id = validate_ca_cert(der).map_err(wrap)?;
            check_same_trust_domain(&trust_domain, ca_id.as_ref()).map_err(wrap)?;
        }
        Ok(Self { trust_domain, authorities })
    }

    /// A bundle from certificates the caller vouches for; nothing is checked.
    pub fn new(trust_domain: TrustDomain, authorities: Vec<CertificateDer<'static>>) -> Self {
        Self { trust_domain, authorities }
    }

    /// The trust domain whose CAs these are.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// The CA certificates concatenated as DER (the Workload API form).
    pub fn to_der_concat(&self) -> Vec<u8> {
        concat_der(&self.authorities)
    }

    /// The CA certificates as PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        let mut pem = String::new();
        for der in &self.authorities {
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            let encoded = base64_encode(der.as_ref());
            // Base64 output is ASCII, so splitting bytes keeps valid UTF-8.
            for line in encoded.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(line));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        pem
    }
}

impl fmt::Debug for X509Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Bundle")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

/// Splits concatenated DER certificates, with an optional count limit.
fn split_der(bytes: &[u8], max: Option<usize>) -> Result<Vec<CertificateDer<'static>>, X509Error> {
    if bytes.is_empty() {
        return Err(X509Error::EmptyChain);
    }
    let mut pieces = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let len = der_element_len(bytes, offset)?;
        let end = offset + len;
        pieces.push(bytes.get(offset..end).ok_or(X509Error::TruncatedDer {
            offset,
            needed: len,
            available: bytes.len() - offset,
        })?);
        offset = end;
    }
    if let Some(max) = max {
        if pieces.len() > max {
            return Err(X509Error::ChainTooLong(pieces.len()));
        }
    }
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, der)| {
            parse_cert(der).map_err(|e| match e {
                X509Error::Parse(msg) => X509Error::Parse(format!("certificate {i}: {msg}")),
                other => other,
            })?;
            Ok(CertificateDer::from(der.to_vec()))
        })
        .collect()
}

/// Total length (header included) of the DER SEQUENCE starting at `offset`;
/// `offset` is less than `bytes.len()`.
fn der_element_len(bytes: &[u8], offset: usize) -> Result<usize, X509Error> {
    let rest = bytes.get(offset..).unwrap_or_default();
    let truncated =
        |needed: usize| X509Error::TruncatedDer { offset, needed, available: rest.len() };
    if rest.first() != Some(&DER_SEQUENCE) {
        return Err(X509Error::BadDerHeader { offset });
    }
    let first_len = *rest.get(1).ok_or_else(|| truncated(2))?;
    let (header_len, content_len) = if first_len < 0x80 {
        (2, usize::from(first_len))
    } else {
        // Long form: the low bits count the length bytes. Zero would be the
        // (non-DER) indefinite form; more than 4 is no certificate we accept.
        let count = usize::from(first_len & 0x7f);
        if count == 0 || count > 4 {
            return Err(X509Error::BadDerHeader { offset });
        }
        let len_bytes = rest.get(2..2 + count).ok_or_else(|| truncated(2 + count))?;
        let len = len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (2 + count, len)
    };
    let total = header_len.checked_add(content_len).ok_or(X509Error::BadDerHeader { offset })?;
    if total > rest.len() {
        return Err(truncated(total));
    }
    Ok(total)
}

/// Parses exactly one DER certificate.
fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::Parse(format!("{} bytes after the certificate", rest.len())));
    }
    Ok(cert)
}

fn check_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509Error> {
    let basic = cert
        .basic_constraints()
        .map_err(|e| X509Error::Parse(e.to_string()))?
        .ok_or(X509Error::MissingBasicConstraints)?;
    if basic.value.ca {
        return Err(X509Error::LeafIsCa);
    }

    let key_usage = cert
        .key_usage()
        .map_err(|e| X509Error::Parse(e.to_string()))?
        .ok_or(X509Error::MissingKeyUsage)?;
    if !key_usage.critical {
        return Err(X509Error::KeyUsageNotCritical);
    }
    if key_usage.value.key_cert_sign() || key_usage.value.crl_sign() {
        return Err(X509Error::LeafCanSign);
    }
    if !key_usage.value.digital_signature() {
        return Err(X509Error::NoDigitalSignature);
    }

    if let Some(eku) = cert.extended_key_usage().map_err(|e| X509Error::Parse(e.to_string()))? {
        let eku = eku.value;
        if !(eku.server_auth || eku.client_auth || eku.any) {
            return Err(X509Error::EkuNotForTls);
        }
    }

    let uris = uri_sans(cert)?;
    let [uri] = uris.as_slice() else {
        return Err(X509Error::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(X509Error::InvalidSpiffeId)?;
    if id.is_root() {
        return Err(X509Error::RootIdInLeaf);
    }
    Ok(id)
}

fn check_ca(cert: &X509Certificate<'_>) -> Result<Option<SpiffeId>, X509Error> {
    let basic = cert
        .basic_constraints()
        .map_err(|e| X509Error::Parse(e.to_string()))?
        .ok_or(X509Error::MissingBasicConstraints)?;
    if !basic.value.ca {
        return Err(X509Error::NotCa);
    }
    let key_usage = cert
        .key_usage()
        .map_err(|e| X509Error::Parse(e.to_string()))?
        .ok_or(X509Error::MissingKeyUsage)?;
    if !key_usage.value.key_cert_sign() {
        return Err(X509Error::CaCannotSign);
    }
    match uri_sans(cert)?.as_slice() {
        [] => Ok(None),
        [uri] => {
            let id = SpiffeId::parse(uri).map_err(X509Error::InvalidSpiffeId)?;
            if !id.is_root() {
                return Err(X509Error::NonRootIdInCa(id));
            }
            Ok(Some(id))
        }
        more => Err(X509Error::UriSanCount(more.len())),
    }
}

/// Rejects a CA whose SPIFFE ID names a trust domain other than `expected`.
fn check_same_trust_domain(
    expected: &TrustDomain,
    ca_id: Option<&SpiffeId>,
) -> Result<(), X509Error> {
    match ca_id {
        Some(id) if id.trust_domain() != expected => Err(X509Error::TrustDomainMismatch {
            expected: expected.clone(),
            found: id.trust_domain().clone(),
        }),
        _ => Ok(()),
    }
}

/// The URI SANs of a certificate.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, X509Error> {
    let san = cert.subject_alternative_name().map_err(|e| X509Error::Parse(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The serial number of a DER certificate as lowercase hex, leading zero
/// bytes removed: the form Tessera uses for serials everywhere (CLI,
/// revocations, agent records).
pub fn certificate_serial_hex(der: &[u8]) -> Result<String, X509Error> {
    Ok(serial_to_hex(parse_cert(der)?.raw_serial()))
}

/// Lowercase hex of a DER serial's bytes, leading zero bytes removed (but
/// at least one byte kept).
fn serial_to_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|&b| b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw.get(first..).unwrap_or_default().iter().map(|b| format!("{b:02x}")).collect()
}

fn concat_der(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(certs.iter().map(|c| c.len()).sum());
    for cert in certs {
        out.extend_from_slice(cert.as_ref());
    }
    out
}

/// Standard base64 (RFC 4648, with padding).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = u32::from(chunk.first().copied().unwrap_or(0));
        let b1 = u32::from(chunk.get(1).copied().unwrap_or(0));
        let b2 = u32::from(chunk.get(2).copied().unwrap_or(0));
        let n = (b0 << 16) | (b1 << 8) | b2;
        out.push(sextet(n, 18));
        out.push(sextet(n, 12));
        out.push(if chunk.len() > 1 { sextet(n, 6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(n, 0) } else { '=' });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
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
        let sixteen: Vec<u8> =
            std::iter::repeat_n(ca.der.as_ref(), 16).flatten().copied().collect();
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
}
