//! What SVIDs and CRLs share: the issuer's template (its name and the
//! authority key identifier, encoded once per CA), the error, the
//! signature's wrapping (a `Certificate` and a `CertificateList` are both
//! `SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING }`), times as RFC 5280
//! wants them, and DER's headers and lengths.

use std::time::Duration;

use der::asn1::{GeneralizedTime, UtcTime};
use der::{DateTime, Encode, Header, Tag, TagNumber};
use rcgen::{KeyPair, SigningKey, PKCS_ECDSA_P256_SHA256};
use x509_cert::time::Time;
use x509_parser::certificate::X509Certificate;

/// Why an SVID or a CRL could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DerError {
    /// A field does not fit its ASN.1 type (a name that is not ASCII, a
    /// time outside 1970–9999, a length past DER's bounds).
    #[error("field cannot be encoded: {0}")]
    Encode(#[from] der::Error),
    /// The CA's key is not ECDSA P-256 (every SVID and CRL is signed
    /// ecdsa-with-SHA256).
    #[error("CA key must be ECDSA P-256")]
    UnsupportedCaKey,
    /// The lengths counted before writing are not what was written (a
    /// defect, refused rather than signed).
    #[error("length miscounted: {counted} bytes counted, {written} written")]
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

/// `AlgorithmIdentifier { ecdsa-with-SHA256 }`.
pub const ECDSA_SHA256: &[u8] =
    &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// The authorityKeyIdentifier extension's ID (2.5.29.35).
const OID_AKI: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x23];
/// The key identifier's length: SHA-256 cut to 20 bytes, as rcgen does.
pub const KEY_ID_LEN: usize = 20;

/// What everything one CA signs shares and depends on the CA: its name
/// (the SVIDs' and CRLs' issuer, byte for byte) and the authority key
/// identifier extension.
#[derive(Debug, Clone)]
pub struct IssuerTemplate {
    /// The CA's subject, DER.
    pub(crate) issuer: Vec<u8>,
    /// The whole authorityKeyIdentifier `Extension`, DER.
    pub(crate) authority_key_id: Vec<u8>,
}

impl IssuerTemplate {
    /// The template of the CA `ca` whose key is `key`: its subject, and
    /// its subject key identifier (or, if it has none, the SHA-256 of its
    /// key cut to 20 bytes, as rcgen derives it). Only for a P-256 key.
    pub fn for_ca(ca: &X509Certificate<'_>, key: &KeyPair) -> Result<Self, DerError> {
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(DerError::UnsupportedCaKey);
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

/// `SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }`: `tbs`
/// signed by `key`, the CA's ECDSA P-256 key.
pub fn sign_tbs(tbs: &[u8], key: &KeyPair) -> Result<Vec<u8>, DerError> {
    let signature = key.sign(tbs)?;
    let bits = 1 + signature.len();
    let content = tbs.len() + ECDSA_SHA256.len() + tlv_len(bits)?;
    sequence(content, |out| {
        out.extend_from_slice(tbs);
        out.extend_from_slice(ECDSA_SHA256);
        header(out, Tag::BitString, bits)?;
        out.push(0);
        out.extend_from_slice(&signature);
        Ok(())
    })
}

/// A SEQUENCE of `content` bytes, counted before writing: its header, then
/// what `write` appends, in one buffer of that size. What writes another
/// length is refused ([`DerError::Miscounted`], a defect), never signed.
pub fn sequence<E: From<DerError>>(
    content: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let counted = tlv_len(content).map_err(DerError::from)?;
    let mut out = Vec::with_capacity(counted);
    header(&mut out, Tag::Sequence, content).map_err(DerError::from)?;
    write(&mut out)?;
    if out.len() != counted {
        return Err(DerError::Miscounted { counted, written: out.len() }.into());
    }
    Ok(out)
}

/// A time as RFC 5280 wants it in certificates and CRLs: UTCTime through
/// 2049, GeneralizedTime from 2050 (as rcgen writes it).
pub fn time(unix: i64) -> der::Result<Time> {
    let since = Duration::from_secs(
        u64::try_from(unix).map_err(|_| der::Error::from(der::ErrorKind::DateTime))?,
    );
    let date = DateTime::from_unix_duration(since)?;
    if date.year() < 2050 {
        Ok(Time::UtcTime(UtcTime::from_date_time(date)?))
    } else {
        Ok(Time::GeneralTime(GeneralizedTime::from_date_time(date)))
    }
}

/// SHA-256 of `spki`, its first 20 bytes (rcgen's key identifier).
pub fn key_id(spki: &[u8]) -> [u8; KEY_ID_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    let mut id = [0; KEY_ID_LEN];
    id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
    id
}

/// A primitive context-specific tag, `[number] IMPLICIT`.
pub fn context(number: u8) -> Tag {
    Tag::ContextSpecific { constructed: false, number: TagNumber::new(number) }
}

/// A constructed context-specific tag, `[number] EXPLICIT`.
pub fn context_constructed(number: u8) -> Tag {
    Tag::ContextSpecific { constructed: true, number: TagNumber::new(number) }
}

/// Appends a tag and a definite length.
pub fn header(out: &mut Vec<u8>, tag: Tag, len: usize) -> der::Result<()> {
    Header::new(tag, len)?.encode_to_vec(out)?;
    Ok(())
}

/// A TLV's whole length with `len` bytes of content.
pub fn tlv_len(len: usize) -> der::Result<usize> {
    let header = Header::new(Tag::Sequence, len)?.encoded_len()?;
    usize::try_from(header)?.checked_add(len).ok_or_else(|| der::ErrorKind::Overflow.into())
}

#[cfg(test)]
pub(crate) mod test_ca {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, SanType};
    use rustls_pki_types::CertificateDer;

    /// A CA as `Ca` makes them; `is_ca` `NoCa` makes one without a
    /// subject key identifier (rcgen writes it only with the CA flags).
    pub fn ca(is_ca: IsCa) -> (CertificateDer<'static>, KeyPair) {
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

    pub fn template_of(ca_der: &[u8], key: &KeyPair) -> Result<IssuerTemplate, DerError> {
        IssuerTemplate::for_ca(&x509_parser::parse_x509_certificate(ca_der).unwrap().1, key)
    }
}
