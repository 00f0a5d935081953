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
use der::{Reader, SliceReader, Tag, TagNumber, Tagged};
use rcgen::{PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
/// `attributes [0] IMPLICIT SET OF Attribute`.
const ATTRIBUTES: Tag = Tag::ContextSpecific { constructed: true, number: TagNumber::N0 };

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
    let key_algorithm = &csr.key.algorithm;
    let is_p256 = key_algorithm.oid == OID_EC_PUBLIC_KEY
        && key_algorithm.parameters.and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            == Some(OID_P256);
    if !is_p256 {
        return Err(CsrError::UnsupportedKey);
    }
    let key = csr.key.subject_public_key.as_bytes().ok_or(CsrError::UnsupportedKey)?;
    // ECDSA signature algorithms have no parameters (RFC 5758).
    let algorithm = match (csr.signature_algorithm.oid, csr.signature_algorithm.parameters) {
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
    key: SubjectPublicKeyInfoRef<'a>,
    signature_algorithm: AlgorithmIdentifierRef<'a>,
    signature: BitStringRef<'a>,
}

impl<'a> Request<'a> {
    /// `CertificationRequest ::= SEQUENCE { info, signatureAlgorithm,
    /// signature BIT STRING }`, nothing after it.
    fn decode(der: &'a [u8]) -> der::Result<Self> {
        let mut reader = SliceReader::new(der)?;
        let outer = reader.sequence(|r| Ok((r.tlv_bytes()?, r.decode()?, r.decode()?)))?;
        let (info, signature_algorithm, signature) = reader.finish(outer)?;
        // CertificationRequestInfo ::= SEQUENCE { version INTEGER (0),
        //   subject Name, subjectPKInfo SubjectPublicKeyInfo,
        //   attributes [0] IMPLICIT SET OF Attribute }
        let mut reader = SliceReader::new(info)?;
        let key = reader.sequence(|r| {
            if r.decode::<u8>()? != 0 {
                return Err(Tag::Integer.value_error());
            }
            // The subject: a Name (a SEQUENCE), not read further.
            r.decode::<AnyRef<'a>>()?.tag().assert_eq(Tag::Sequence)?;
            let key = r.decode()?;
            // The attributes, present even when empty: not read further.
            r.decode::<AnyRef<'a>>()?.tag().assert_eq(ATTRIBUTES)?;
            Ok(key)
        })?;
        let key = reader.finish(key)?;
        Ok(Self { info, key, signature_algorithm, signature })
    }
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

    /// The request info's parts (whole TLVs), re-assembled and signed by
    /// `key`: requests whose signature is good but whose shape is not.
    fn resigned(key: &KeyPair, parts: &[&[u8]], algorithm: &[u8]) -> Vec<u8> {
        use der::{Encode, Header};
        let tlv = |tag: Tag, content: &[u8]| {
            let mut out = Vec::new();
            Header::new(tag, content.len()).unwrap().encode_to_vec(&mut out).unwrap();
            out.extend_from_slice(content);
            out
        };
        let info = tlv(Tag::Sequence, &parts.concat());
        let mut signature = vec![0];
        signature.extend(rcgen::SigningKey::sign(key, &info).unwrap());
        tlv(Tag::Sequence, &[info.as_slice(), algorithm, &tlv(Tag::BitString, &signature)].concat())
    }

    #[test]
    fn a_good_signature_over_the_wrong_shape_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        let good = params.serialize_request(&key).unwrap().der().to_vec();
        // The info's four parts, and the signature algorithm, as rcgen wrote them.
        let mut reader = SliceReader::new(&good).unwrap();
        let (info, algorithm) = reader
            .sequence(|r| {
                let info = r.tlv_bytes()?;
                let algorithm = r.tlv_bytes()?;
                r.tlv_bytes()?;
                Ok((info, algorithm))
            })
            .unwrap();
        let mut info = SliceReader::new(info).unwrap();
        let parts: Vec<&[u8]> = info
            .sequence(|r| Ok([r.tlv_bytes()?, r.tlv_bytes()?, r.tlv_bytes()?, r.tlv_bytes()?]))
            .unwrap()
            .to_vec();
        let [version, subject, spki, attributes] = [parts[0], parts[1], parts[2], parts[3]];
        // Re-assembled as it was: accepted (the helper is right).
        let key_point = parse_csr(&good).unwrap();
        assert_eq!(parse_csr(&resigned(&key, &parts, algorithm)), Ok(key_point));
        let integer: &[u8] = &[0x02, 0x01, 0x00];
        let other_tag = [&[0xa1][..], &attributes[1..]].concat();
        let version_1: &[u8] = &[0x02, 0x01, 0x01];
        let malformed = [
            resigned(&key, &[version, integer, spki, attributes], algorithm),
            resigned(&key, &[version, subject, spki], algorithm),
            resigned(&key, &[version, subject, spki, &other_tag], algorithm),
            resigned(&key, &[version_1, subject, spki, attributes], algorithm),
            resigned(&key, &[version, subject, spki, attributes, integer], algorithm),
        ];
        for csr in malformed {
            assert!(matches!(parse_csr(&csr), Err(CsrError::Malformed(_))), "{csr:02x?}");
        }
        // The key's BIT STRING with an unused bit.
        let mut odd_key = spki.to_vec();
        let unused = odd_key.len() - 66;
        odd_key[unused] = 1;
        assert_eq!(
            parse_csr(&resigned(&key, &[version, subject, &odd_key, attributes], algorithm)),
            Err(CsrError::UnsupportedKey)
        );
        // ecdsa-with-SHA256 with NULL parameters (outside what is signed).
        let with_null = [&[0x30, algorithm[1] + 2][..], &algorithm[2..], &[0x05, 0x00]].concat();
        assert_eq!(parse_csr(&resigned(&key, &parts, &with_null)), Err(CsrError::BadSignature));
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
