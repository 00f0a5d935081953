//! An X509-SVID's DER, written into one buffer. What depends on the CA
//! (its subject, copied byte for byte as the SVIDs' issuer, and the
//! authority key identifier) is encoded once, when the CA is made or
//! loaded ([`IssuerTemplate`]); what no CA changes (the subject, the key
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

use der::asn1::UintRef;
use der::{Encode, Tag};
use rcgen::KeyPair;

use crate::ca::signed::parts::{
    context, context_constructed, header, key_id, sequence, sign_tbs, time, tlv_len, DerError,
    IssuerTemplate, ECDSA_SHA256, KEY_ID_LEN,
};

/// `[0] EXPLICIT INTEGER 2`: version 3.
const VERSION: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
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
/// basicConstraints, critical: not a CA.
const NOT_A_CA: &[u8] =
    &[0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00];
/// Tags of the SAN's GeneralNames (implicit, primitive).
const SAN_DNS: u8 = 2;
const SAN_URI: u8 = 6;

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
    template: &IssuerTemplate,
    key: &KeyPair,
    fields: &SvidFields<'_>,
) -> Result<Vec<u8>, DerError> {
    sign_tbs(&write_tbs(template, fields)?, key)
}

/// The TBSCertificate.
fn write_tbs(template: &IssuerTemplate, f: &SvidFields<'_>) -> Result<Vec<u8>, DerError> {
    if f.public_key.len() != P256_POINT_LEN {
        return Err(DerError::UnsupportedKey);
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
    sequence(content, |out| {
        out.extend_from_slice(VERSION);
        serial.encode_to_vec(out)?;
        out.extend_from_slice(ECDSA_SHA256);
        out.extend_from_slice(&template.issuer);
        header(out, Tag::Sequence, validity)?;
        not_before.encode_to_vec(out)?;
        not_after.encode_to_vec(out)?;
        out.extend_from_slice(SUBJECT);
        let spki = out.len();
        out.extend_from_slice(P256_SPKI_HEAD);
        out.extend_from_slice(f.public_key);
        let subject_key_id = key_id(&out[spki..]);
        header(out, context_constructed(3), extensions_seq)?;
        header(out, Tag::Sequence, extensions)?;
        out.extend_from_slice(&template.authority_key_id);
        header(out, Tag::Sequence, san)?;
        out.extend_from_slice(OID_SAN);
        header(out, Tag::OctetString, san_value)?;
        header(out, Tag::Sequence, names)?;
        header(out, context(SAN_URI), f.spiffe_id.len())?;
        out.extend_from_slice(f.spiffe_id.as_bytes());
        for name in f.dns_names {
            header(out, context(SAN_DNS), name.len())?;
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(KEY_USAGE);
        out.extend_from_slice(EXT_KEY_USAGE);
        out.extend_from_slice(SKI_HEAD);
        out.extend_from_slice(&subject_key_id);
        out.extend_from_slice(NOT_A_CA);
        Ok(())
    })
}

/// The TLV length of `s` as an IA5String: ASCII only.
fn ia5_len(s: &str) -> der::Result<usize> {
    if !s.is_ascii() {
        return Err(Tag::Ia5String.value_error());
    }
    tlv_len(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::signed::parts::test_ca::{ca, template_of};
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
            assert!(matches!(write_svid(&template, &ca_key, &bad), Err(DerError::Encode(_))));
        }
        assert!(matches!(
            write_svid(&template, &ca_key, &SvidFields { public_key: &point[1..], ..good }),
            Err(DerError::UnsupportedKey)
        ));
        // A CA whose key is not P-256 gets no template.
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let p384_ca = params.self_signed(&p384).unwrap().der().clone();
        assert!(matches!(template_of(&p384_ca, &p384), Err(DerError::UnsupportedCaKey)));
    }
}
