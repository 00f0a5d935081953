//! PKCS#10 certificate signing requests: the server takes only the public
//! key from a CSR, after checking its self-signature. The names a CSR asks
//! for are ignored; the entry decides the SPIFFE ID.
//!
//! Read with `der`'s borrowing decoders: the request's outer fields, and
//! of the request info only the version and the key; the subject and the
//! attributes are skipped as whole TLVs (nothing allocates; x509-parser,
//! which parsed every attribute and extension, cost ~3 % of the server's
//! CPU when signing). The signature is verified with ring.

use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier};
use der::{Reader, SliceReader};
use rcgen::{PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1};

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");

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
    let csr = Request::decode(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let is_p256 = csr.key_algorithm == OID_EC_PUBLIC_KEY
        && csr.key_parameters.and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            == Some(OID_P256);
    if !is_p256 {
        return Err(CsrError::UnsupportedKey);
    }
    let key = csr.key.as_bytes().ok_or(CsrError::UnsupportedKey)?;
    // ECDSA signature algorithms have no parameters (RFC 5758).
    let algorithm = match (csr.signature_algorithm, csr.signature_parameters) {
        (oid, None) if oid == OID_ECDSA_SHA256 => &ECDSA_P256_SHA256_ASN1,
        (oid, None) if oid == OID_ECDSA_SHA384 => &ECDSA_P256_SHA384_ASN1,
        _ => return Err(CsrError::BadSignature),
    };
    let signature = csr.signature.as_bytes().ok_or(CsrError::BadSignature)?;
    UnparsedPublicKey::new(algorithm, key)
        .verify(csr.info, signature)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(CsrPublicKey { raw: key.to_vec() })
}

/// What the server reads of a CSR (RFC 2986), borrowed from its bytes.
struct Request<'a> {
    /// `certificationRequestInfo`, its whole TLV: what is signed.
    info: &'a [u8],
    key_algorithm: ObjectIdentifier,
    key_parameters: Option<AnyRef<'a>>,
    key: BitStringRef<'a>,
    signature_algorithm: ObjectIdentifier,
    signature_parameters: Option<AnyRef<'a>>,
    signature: BitStringRef<'a>,
}

impl<'a> Request<'a> {
    /// `CertificationRequest ::= SEQUENCE { info, signatureAlgorithm,
    /// signature BIT STRING }`, nothing after it.
    fn decode(der: &'a [u8]) -> der::Result<Self> {
        let mut reader = SliceReader::new(der)?;
        let outer = reader
            .sequence(|r| Ok((r.tlv_bytes()?, algorithm(r)?, r.decode::<BitStringRef<'a>>()?)))?;
        let (info, (signature_algorithm, signature_parameters), signature) =
            reader.finish(outer)?;
        // CertificationRequestInfo ::= SEQUENCE { version INTEGER (0),
        //   subject Name, subjectPKInfo SubjectPublicKeyInfo,
        //   attributes [0] IMPLICIT SET OF Attribute }
        let mut reader = SliceReader::new(info)?;
        let spki = reader.sequence(|r| {
            if r.decode::<u8>()? != 0 {
                return Err(der::Tag::Integer.value_error());
            }
            r.decode::<AnyRef<'a>>()?;
            let key =
                r.sequence(|spki| Ok((algorithm(spki)?, spki.decode::<BitStringRef<'a>>()?)))?;
            r.decode::<Option<AnyRef<'a>>>()?;
            Ok(key)
        })?;
        let ((key_algorithm, key_parameters), key) = reader.finish(spki)?;
        Ok(Self {
            info,
            key_algorithm,
            key_parameters,
            key,
            signature_algorithm,
            signature_parameters,
            signature,
        })
    }
}

/// `AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }`.
fn algorithm<'a, R: Reader<'a>>(r: &mut R) -> der::Result<(ObjectIdentifier, Option<AnyRef<'a>>)> {
    r.sequence(|a| Ok((a.decode()?, a.decode()?)))
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

    /// `openssl req -new -key k.pem -subj "/O=Example/CN=workload"
    /// -addext "subjectAltName=URI:spiffe://example.org/asked,DNS:ignored.example"
    /// -sha256 -outform DER | base64`: an independent encoder, with an
    /// extension request among the attributes.
    const OPENSSL_SHA256: &str = "MIIBKjCB0AIBADAlMRAwDgYDVQQKDAdFeGFtcGxlMREwDwYDVQQDDAh3b3JrbG9hZDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABIZDOUWHBNBwK8ItN8hQgqJD/ZTFbbh5hS+/kleQA6Jf/qb+dK5sWAc4BuesYpEfk8ceSA9yeXy3JMNG/wURpYGgSTBHBgkqhkiG9w0BCQ4xOjA4MDYGA1UdEQQvMC2GGnNwaWZmZTovL2V4YW1wbGUub3JnL2Fza2Vkgg9pZ25vcmVkLmV4YW1wbGUwCgYIKoZIzj0EAwIDSQAwRgIhAPAxtDM33NgGpOUY+5FWMBjdje/0YRwGl5m7SzB/Uy37AiEArwlCyPJA4podtnZtFTJjgD9XBFdH7W2fQwBSVu+KsnY=";
    /// The same key, `-subj "/CN=x" -sha384`, no attributes.
    const OPENSSL_SHA384: &str = "MIHHMG4CAQAwDDEKMAgGA1UEAwwBeDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABIZDOUWHBNBwK8ItN8hQgqJD/ZTFbbh5hS+/kleQA6Jf/qb+dK5sWAc4BuesYpEfk8ceSA9yeXy3JMNG/wURpYGgADAKBggqhkjOPQQDAwNJADBGAiEAitYb6TZEbCkk6b14ojhcjAonhLCutibtwXAu+uKpHwkCIQCZds4gpVpW1+/VvE0hzKZwI5Xqg/lskfBEsj9oK0B+5g==";
    /// Their key's point (`openssl ec -pubout`, the last 65 bytes).
    const OPENSSL_POINT: &str = "04864339458704d0702bc22d37c85082a243fd94c56db879852fbf92579003a25ffea6fe74ae6c58073806e7ac62911f93c71e480f72797cb724c346ff0511a581";

    fn base64(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn openssls_csrs_yield_their_key() {
        for csr in [OPENSSL_SHA256, OPENSSL_SHA384] {
            let key = parse_csr(&base64(csr)).unwrap();
            assert_eq!(hex::encode(key.raw()), OPENSSL_POINT);
        }
    }

    #[test]
    fn every_changed_byte_and_every_truncation_is_refused() {
        for good in [csr(), base64(OPENSSL_SHA256), base64(OPENSSL_SHA384)] {
            assert!(parse_csr(&good).is_ok());
            for i in 0..good.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = good.clone();
                    bad[i] ^= flip;
                    assert!(parse_csr(&bad).is_err(), "byte {i} ^ {flip:#x} accepted");
                }
            }
            for len in 1..good.len() {
                assert!(
                    matches!(parse_csr(&good[..len]), Err(CsrError::Malformed(_))),
                    "truncated to {len} accepted"
                );
            }
        }
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
