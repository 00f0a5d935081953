//! PKCS#10 certificate signing requests: the server takes only the public
//! key from a CSR, after checking its self-signature. The names a CSR asks
//! for are ignored; the entry decides the SPIFFE ID.

use rcgen::{PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsrError {
    /// The request carried no CSR.
    #[error("CSR is empty")]
    Empty,
    /// The CSR is bigger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes, more than the {MAX_CSR_LEN} allowed")]
    TooLarge(usize),
    /// The bytes are not a DER PKCS#10 request (or have bytes after it).
    #[error("CSR is not a DER PKCS#10 certification request: {0}")]
    Malformed(String),
    /// The CSR's signature does not verify with its own public key.
    #[error("CSR signature does not verify with its public key")]
    BadSignature,
    /// The key is not ECDSA P-256.
    #[error("CSR public key must be ECDSA P-256")]
    UnsupportedKey,
}

/// The public key of a verified CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPublicKey {
    raw: Vec<u8>,
}

impl CsrPublicKey {
    /// The uncompressed EC point.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a DER CSR, verifies its signature and returns its P-256 public key.
pub fn parse_csr(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!("{} bytes after the request", rest.len())));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256);
    if !is_p256 {
        return Err(CsrError::UnsupportedKey);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(CsrPublicKey { raw: spki.subject_public_key.data.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr() -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn good_csr_yields_its_key() {
        let key = parse_csr(&csr()).unwrap();
        assert_eq!(key.raw().len(), 65);
    }

    #[test]
    fn bad_csrs_are_refused_with_reason() {
        assert_eq!(parse_csr(&[]), Err(CsrError::Empty));
        assert_eq!(
            parse_csr(&vec![0u8; MAX_CSR_LEN + 1]),
            Err(CsrError::TooLarge(MAX_CSR_LEN + 1))
        );
        let good = csr();
        assert!(matches!(parse_csr(&good[..good.len() - 5]), Err(CsrError::Malformed(_))));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(parse_csr(&trailing), Err(CsrError::Malformed(_))));
        // Flip a bit of the signature (the last bytes).
        let mut tampered = good;
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert_eq!(parse_csr(&tampered), Err(CsrError::BadSignature));
    }

    #[test]
    fn non_p256_keys_are_refused() {
        // Another algorithm; and an EC key on another curve.
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = KeyPair::generate_for(alg).unwrap();
            let params = CertificateParams::new(Vec::<String>::new()).unwrap();
            let der = params.serialize_request(&key).unwrap().der().to_vec();
            assert_eq!(parse_csr(&der), Err(CsrError::UnsupportedKey));
        }
    }
}
