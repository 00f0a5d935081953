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
mod tests;
