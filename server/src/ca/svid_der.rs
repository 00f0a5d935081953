//! An X509-SVID's DER, written into one buffer. What depends on the CA
//! (its subject, copied byte for byte as the SVIDs' issuer, and the
//! authority key identifier) is encoded once, when the CA is made or
//! loaded ([`SvidTemplate`]); what no CA changes (the subject, the key
//! usages, the basic constraints) is constant; per SVID only the serial,
//! the validity, the key, its key identifier and the SANs are written,
//! with `der`'s encoders. The bytes are those rcgen writes for the same
//! parameters (`tests::the_same_bytes_as_rcgen`; rcgen re-encodes the
//! issuer's name from its parsed parts, the same bytes for the CAs rcgen
//! made), which did this before: its nested writers cost about 8 % of the
//! server's CPU when signing.
//!
//! The certificate (RFC 5280, SPIFFE X509-SVID profile):
//! version 3; the serial; ecdsa-with-SHA256; the CA's subject as issuer;
//! the validity (UTCTime before 2050, GeneralizedTime from then on);
//! subject `O=Tessera`; the P-256 key; then the extensions in rcgen's
//! order: authority key ID, SANs (the SPIFFE ID as a URI, then DNS names;
//! not critical, the subject is not empty), key usage (critical:
//! digitalSignature, keyEncipherment, keyAgreement), extended key usage
//! (serverAuth, clientAuth), subject key ID (SHA-256 of the key's
//! SubjectPublicKeyInfo, first 20 bytes), basic constraints (critical,
//! not a CA).

use std::time::Duration;

use der::asn1::{GeneralizedTime, UintRef, UtcTime};
use der::{Encode, Header, Tag, TagNumber};
use rcgen::{KeyPair, SigningKey, PKCS_ECDSA_P256_SHA256};
use x509_cert::time::Time;
use x509_parser::certificate::X509Certificate;

/// Why an SVID could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidDerError {
    /// A field does not fit its ASN.1 type (a name that is not ASCII, a
    /// time outside 1970–9999, a length past DER's bounds).
    #[error("SVID field cannot be encoded: {0}")]
    Encode(#[from] der::Error),
    /// The CA's key is not ECDSA P-256 (every SVID is signed
    /// ecdsa-with-SHA256).
    #[error("CA key must be ECDSA P-256")]
    UnsupportedCaKey,
    /// The lengths counted before writing are not what was written (a
    /// defect, refused rather than signed).
    #[error("SVID length miscounted: {counted} bytes counted, {written} written")]
    Miscounted {
        /// Counted.
        counted: usize,
        /// Written.
        written: usize,
    },
    /// The subject's key is not an uncompressed ECDSA P-256 point.
    #[error("SVID key must be ECDSA P-256")]
    UnsupportedKey,
    /// The CA key refused to sign.
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// `[0] EXPLICIT INTEGER 2`: version 3.
const VERSION: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
/// `AlgorithmIdentifier { ecdsa-with-SHA256 }`.
const ECDSA_SHA256: &[u8] =
    &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// `Name { O = UTF8String "Tessera" }`.
const SUBJECT: &[u8] = &[
    0x30, 0x12, 0x31, 0x10, 0x30, 0x0e, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x07, b'T', b'e', b's',
    b's', b'e', b'r', b'a',
];
/// `SubjectPublicKeyInfo { id-ecPublicKey prime256v1, BIT STRING` up to
/// the 65-byte point.
const P256_SPKI_HEAD: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// An uncompressed P-256 point's length.
const P256_POINT_LEN: usize = 65;
/// The subjectAltName extension's ID (2.5.29.17).
const OID_SAN: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];
/// The authorityKeyIdentifier extension's ID (2.5.29.35).
const OID_AKI: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x23];
/// keyUsage, critical: digitalSignature, keyEncipherment, keyAgreement.
const KEY_USAGE: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x03, 0xa8,
];
/// extKeyUsage: serverAuth, clientAuth.
const EXT_KEY_USAGE: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// subjectKeyIdentifier up to its 20 bytes.
const SKI_HEAD: &[u8] = &[0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14];
/// The key identifier's length: SHA-256 cut to 20 bytes, as rcgen does.
const KEY_ID_LEN: usize = 20;
/// basicConstraints, critical: not a CA.
const NOT_A_CA: &[u8] =
    &[0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00];
/// Tags of the SAN's GeneralNames (implicit, primitive).
const SAN_DNS: u8 = 2;
const SAN_URI: u8 = 6;

/// What every SVID one CA signs shares and depends on the CA: its name
/// (the SVIDs' issuer, byte for byte) and the authority key identifier
/// extension.
#[derive(Debug, Clone)]
pub struct SvidTemplate {
    issuer: Vec<u8>,
    authority_key_id: Vec<u8>,
}

impl SvidTemplate {
    /// The template of the CA `ca` whose key is `key`: its subject, and
    /// its subject key identifier (or, if it has none, the SHA-256 of its
    /// key cut to 20 bytes, as rcgen derives it). Only for a P-256 key.
    pub fn for_ca(ca: &X509Certificate<'_>, key: &KeyPair) -> Result<Self, SvidDerError> {
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(SvidDerError::UnsupportedCaKey);
        }
        let ca_key_id = ca
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(id.0.to_vec())
                }
                _ => None,
            })
            .unwrap_or_else(|| key_id(ca.public_key().raw).to_vec());
        // Extension { authorityKeyIdentifier, OCTET STRING { SEQUENCE { [0] keyId } } }
        let id_tlv = tlv_len(ca_key_id.len())?;
        let seq = tlv_len(id_tlv)?;
        let value = tlv_len(seq)?;
        let mut aki = Vec::with_capacity(tlv_len(OID_AKI.len() + value)?);
        header(&mut aki, Tag::Sequence, OID_AKI.len() + value)?;
        aki.extend_from_slice(OID_AKI);
        header(&mut aki, Tag::OctetString, seq)?;
        header(&mut aki, Tag::Sequence, id_tlv)?;
        header(&mut aki, context(0), ca_key_id.len())?;
        aki.extend_from_slice(&ca_key_id);
        Ok(Self { issuer: ca.subject().as_raw().to_vec(), authority_key_id: aki })
    }
}

/// What one SVID says.
#[derive(Debug, Clone, Copy)]
pub struct SvidFields<'a> {
    /// The serial's bytes, big-endian (a positive INTEGER).
    pub serial: &'a [u8],
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The subject's uncompressed P-256 point.
    pub public_key: &'a [u8],
    /// The SPIFFE ID, the URI SAN.
    pub spiffe_id: &'a str,
    /// DNS SANs, after the URI.
    pub dns_names: &'a [String],
}

/// The SVID's DER, signed by `key` (the CA's ECDSA P-256 key) with
/// `template` the CA's.
pub fn write_svid(
    template: &SvidTemplate,
    key: &KeyPair,
    fields: &SvidFields<'_>,
) -> Result<Vec<u8>, SvidDerError> {
    let tbs = write_tbs(template, fields)?;
    let signature = key.sign(&tbs)?;
    let bits = 1 + signature.len();
    let content = tbs.len() + ECDSA_SHA256.len() + tlv_len(bits)?;
    let mut cert = Vec::with_capacity(tlv_len(content)?);
    header(&mut cert, Tag::Sequence, content)?;
    cert.extend_from_slice(&tbs);
    cert.extend_from_slice(ECDSA_SHA256);
    header(&mut cert, Tag::BitString, bits)?;
    cert.push(0);
    cert.extend_from_slice(&signature);
    Ok(cert)
}

/// The TBSCertificate.
fn write_tbs(template: &SvidTemplate, f: &SvidFields<'_>) -> Result<Vec<u8>, SvidDerError> {
    if f.public_key.len() != P256_POINT_LEN {
        return Err(SvidDerError::UnsupportedKey);
    }
    let serial = UintRef::new(f.serial)?;
    let not_before = time(f.not_before)?;
    let not_after = time(f.not_after)?;
    let validity = usize::try_from((not_before.encoded_len()? + not_after.encoded_len()?)?)?;
    // SANs: the URI, then the DNS names, each an implicitly tagged IA5String.
    let mut names = ia5_len(f.spiffe_id)?;
    for name in f.dns_names {
        names += ia5_len(name)?;
    }
    let san_value = tlv_len(names)?;
    let san = OID_SAN.len() + tlv_len(san_value)?;
    let extensions = template.authority_key_id.len()
        + tlv_len(san)?
        + KEY_USAGE.len()
        + EXT_KEY_USAGE.len()
        + SKI_HEAD.len()
        + KEY_ID_LEN
        + NOT_A_CA.len();
    let extensions_seq = tlv_len(extensions)?;
    let content = VERSION.len()
        + usize::try_from(serial.encoded_len()?)?
        + ECDSA_SHA256.len()
        + template.issuer.len()
        + tlv_len(validity)?
        + SUBJECT.len()
        + P256_SPKI_HEAD.len()
        + P256_POINT_LEN
        + tlv_len(extensions_seq)?;

    let counted = tlv_len(content)?;
    let mut out = Vec::with_capacity(counted);
    header(&mut out, Tag::Sequence, content)?;
    out.extend_from_slice(VERSION);
    serial.encode_to_vec(&mut out)?;
    out.extend_from_slice(ECDSA_SHA256);
    out.extend_from_slice(&template.issuer);
    header(&mut out, Tag::Sequence, validity)?;
    not_before.encode_to_vec(&mut out)?;
    not_after.encode_to_vec(&mut out)?;
    out.extend_from_slice(SUBJECT);
    let spki = out.len();
    out.extend_from_slice(P256_SPKI_HEAD);
    out.extend_from_slice(f.public_key);
    let subject_key_id = key_id(&out[spki..]);
    header(&mut out, context_constructed(3), extensions_seq)?;
    header(&mut out, Tag::Sequence, extensions)?;
    out.extend_from_slice(&template.authority_key_id);
    header(&mut out, Tag::Sequence, san)?;
    out.extend_from_slice(OID_SAN);
    header(&mut out, Tag::OctetString, san_value)?;
    header(&mut out, Tag::Sequence, names)?;
    header(&mut out, context(SAN_URI), f.spiffe_id.len())?;
    out.extend_from_slice(f.spiffe_id.as_bytes());
    for name in f.dns_names {
        header(&mut out, context(SAN_DNS), name.len())?;
        out.extend_from_slice(name.as_bytes());
    }
    out.extend_from_slice(KEY_USAGE);
    out.extend_from_slice(EXT_KEY_USAGE);
    out.extend_from_slice(SKI_HEAD);
    out.extend_from_slice(&subject_key_id);
    out.extend_from_slice(NOT_A_CA);
    if out.len() != counted {
        return Err(SvidDerError::Miscounted { counted, written: out.len() });
    }
    Ok(out)
}

/// A validity time as RFC 5280 wants it: UTCTime through 2049,
/// GeneralizedTime from 2050 (as rcgen writes it).
fn time(unix: i64) -> der::Result<Time> {
    let since = Duration::from_secs(
        u64::try_from(unix).map_err(|_| der::Error::from(der::ErrorKind::DateTime))?,
    );
    let generalized = GeneralizedTime::from_unix_duration(since)?;
    if generalized.to_date_time().year() < 2050 {
        Ok(Time::UtcTime(UtcTime::from_unix_duration(since)?))
    } else {
        Ok(Time::GeneralTime(generalized))
    }
}

/// SHA-256 of `spki`, its first 20 bytes (rcgen's key identifier).
fn key_id(spki: &[u8]) -> [u8; KEY_ID_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    let mut id = [0; KEY_ID_LEN];
    id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
    id
}

/// The TLV length of `s` as an IA5String: ASCII only.
fn ia5_len(s: &str) -> der::Result<usize> {
    if !s.is_ascii() {
        return Err(Tag::Ia5String.value_error());
    }
    tlv_len(s.len())
}

fn context(number: u8) -> Tag {
    Tag::ContextSpecific { constructed: false, number: TagNumber::new(number) }
}

fn context_constructed(number: u8) -> Tag {
    Tag::ContextSpecific { constructed: true, number: TagNumber::new(number) }
}

/// Appends a tag and a definite length.
fn header(out: &mut Vec<u8>, tag: Tag, len: usize) -> der::Result<()> {
    Header::new(tag, len)?.encode_to_vec(out)?;
    Ok(())
}

/// A TLV's whole length with `len` bytes of content.
fn tlv_len(len: usize) -> der::Result<usize> {
    let header = Header::new(Tag::Sequence, len)?.encoded_len()?;
    usize::try_from(header)?.checked_add(len).ok_or_else(|| der::ErrorKind::Overflow.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
    };
    use rustls_pki_types::CertificateDer;

    /// The parameters `Ca::sign_svid` gave rcgen before this module.
    fn rcgen_svid(issuer: &Issuer<'_, KeyPair>, subject: &KeyPair, f: &SvidFields<'_>) -> Vec<u8> {
        let datetime = |t| time::OffsetDateTime::from_unix_timestamp(t).unwrap();
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(f.serial));
        params.not_before = datetime(f.not_before);
        params.not_after = datetime(f.not_after);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI(f.spiffe_id.try_into().unwrap()));
        for name in f.dns_names {
            params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into().unwrap()));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.signed_by(subject, issuer).unwrap().der().to_vec()
    }

    /// A CA as `Ca` makes them; `is_ca` `NoCa` makes one without a
    /// subject key identifier (rcgen writes it only with the CA flags).
    fn ca(is_ca: IsCa) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::CommonName, "Tessera CA example.org #1");
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::URI("spiffe://example.org".try_into().unwrap()));
        params.is_ca = is_ca;
        (params.self_signed(&key).unwrap().der().clone(), key)
    }

    fn template_of(ca_der: &[u8], key: &KeyPair) -> Result<SvidTemplate, SvidDerError> {
        SvidTemplate::for_ca(&x509_parser::parse_x509_certificate(ca_der).unwrap().1, key)
    }

    fn has_key_id(ca_der: &[u8]) -> bool {
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
        let found = ca.iter_extensions().any(|e| {
            matches!(
                e.parsed_extension(),
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)
            )
        });
        found
    }

    fn tbs_of(der: &[u8]) -> Vec<u8> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(rest.is_empty());
        cert.tbs_certificate.as_ref().to_vec()
    }

    #[test]
    fn the_same_bytes_as_rcgen() {
        // A CA with a subject key identifier, and one without (its key's
        // SHA-256 is the authority key identifier then).
        let with_id = ca(IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        let without_id = ca(IsCa::NoCa);
        assert!(has_key_id(&with_id.0) && !has_key_id(&without_id.0));
        for (ca_der, ca_key) in [with_id, without_id] {
            same_bytes_as_rcgen(&ca_der, ca_key);
        }
    }

    fn same_bytes_as_rcgen(ca_der: &CertificateDer<'static>, ca_key: KeyPair) {
        let template = template_of(ca_der, &ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_der, ca_key).unwrap();
        let subject = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let point = &subject.public_key_raw().to_vec();
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2000));
        let dns: Vec<String> = vec!["a.example.org".into(), "b.example.org".into()];
        let many_dns: Vec<String> = (0..40).map(|i| format!("host-{i}.example.org")).collect();
        let now = 1_796_000_000; // 2026
        let cases = [
            // serial: high bit set; leading zeros; a single byte; zero
            (
                &[0x80, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15][..],
                now,
                now + 3600,
                "spiffe://example.org/w",
                &[][..],
            ),
            (&[0, 0, 0x7f, 1][..], now, now + 60, "spiffe://example.org/w", &dns[..]),
            (&[1][..], now - 10, now + 86_400, long_id.as_str(), &many_dns[..]),
            (&[0][..], now, now + 3600, "spiffe://example.org/x", &dns[..1]),
            // across 2050: UTCTime, then GeneralizedTime
            (&[7; 16][..], 2_524_607_990, 2_524_608_000, "spiffe://example.org/y", &[][..]),
            (&[7; 16][..], 2_524_608_000, 2_600_000_000, "spiffe://example.org/z", &[][..]),
        ];
        for (serial, not_before, not_after, spiffe_id, dns_names) in cases {
            let fields = SvidFields {
                serial,
                not_before,
                not_after,
                public_key: point,
                spiffe_id,
                dns_names,
            };
            let ours = write_svid(&template, issuer.key(), &fields).unwrap();
            let theirs = rcgen_svid(&issuer, &subject, &fields);
            assert_eq!(tbs_of(&ours), tbs_of(&theirs), "serial {serial:?}, not after {not_after}");
            // The signature verifies with the CA's key.
            let (_, cert) = x509_parser::parse_x509_certificate(&ours).unwrap();
            let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der).unwrap();
            cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        }
    }

    #[test]
    fn what_cannot_be_encoded_is_refused() {
        let (ca_der, ca_key) = ca(IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        let template = template_of(&ca_der, &ca_key).unwrap();
        let subject = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let point = subject.public_key_raw().to_vec();
        let good = SvidFields {
            serial: &[1],
            not_before: 1_796_000_000,
            not_after: 1_796_003_600,
            public_key: &point,
            spiffe_id: "spiffe://example.org/w",
            dns_names: &[],
        };
        assert!(write_svid(&template, &ca_key, &good).is_ok());
        let not_ascii = vec!["bücher.example".to_string()];
        for bad in [
            SvidFields { dns_names: &not_ascii, ..good },
            SvidFields { spiffe_id: "spiffe://example.org/ü", ..good },
            SvidFields { not_before: -1, ..good },
            SvidFields { not_after: 400_000_000_000, ..good },
        ] {
            assert!(matches!(write_svid(&template, &ca_key, &bad), Err(SvidDerError::Encode(_))));
        }
        assert!(matches!(
            write_svid(&template, &ca_key, &SvidFields { public_key: &point[1..], ..good }),
            Err(SvidDerError::UnsupportedKey)
        ));
        // A CA whose key is not P-256 gets no template.
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let p384_ca = params.self_signed(&p384).unwrap().der().clone();
        assert!(matches!(template_of(&p384_ca, &p384), Err(SvidDerError::UnsupportedCaKey)));
    }
}
