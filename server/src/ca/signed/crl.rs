//! A CRL's DER (RFC 5280 §5), written into one buffer. Every revocation
//! re-signs the CRL of each CA with every serial it revoked, so the
//! entries are the bulk of the work: each is written straight from the
//! stored hex serial (decoded through a table) and its date (encoded once
//! per distinct second, [`Dates`]), with `der`'s encoders. Written as
//! rcgen wrote them (a parameter per entry, `hex` and `der` per field),
//! the entries cost as much as rcgen did, most of the CRL's CPU. The
//! bytes are those rcgen writes for the same parameters
//! (`tests::the_same_bytes_as_rcgen`), the authority key ID the CA
//! certificate's.
//!
//! The list (v2): version; ecdsa-with-SHA256; the CA's subject as issuer;
//! thisUpdate, nextUpdate (UTCTime before 2050, GeneralizedTime from then
//! on); the revoked certificates (serial and revocation date, no entry
//! extensions: the reason is unspecified; the sequence left out when
//! empty); then the extensions: authority key ID (the CA certificate's
//! subject key ID, which is what OpenSSL matches it against), CRL number.
//!
//! A stored serial that is not 1–20 bytes of hex names no certificate a CA
//! here issued (serials are 16 random bytes, and operators' are checked as
//! they are given): it is left out with a warning naming it (the code
//! before this module left it out silently), rather than refuse every CRL,
//! and with them every commit that revokes, until the row expires. A
//! revocation date no CRL can hold (before 1970, after 9999) is written as
//! the nearest it can: the serial stays listed.

use der::asn1::UintRef;
use der::{Encode, Tag};
use rcgen::KeyPair;
use tracing::warn;

use crate::ca::signed::parts::{
    context_constructed, header, sequence, sign_tbs, time, tlv_len, DerError, IssuerTemplate,
    ECDSA_SHA256,
};

/// `INTEGER 1`: version 2.
const VERSION: &[u8] = &[0x02, 0x01, 0x01];
/// The cRLNumber extension's ID (2.5.29.20).
const OID_CRL_NUMBER: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x14];
/// RFC 5280 serials are at most 20 bytes.
const MAX_SERIAL: usize = 20;
/// An entry's most bytes: its header, the serial (a 0 before a high bit)
/// and a GeneralizedTime.
const MAX_ENTRY: usize = 2 + (2 + 1 + MAX_SERIAL) + 17;
/// The last second a GeneralizedTime can say (9999-12-31T23:59:59Z).
const LAST_SECOND: i64 = 253_402_300_799;

/// A serial to list in a CRL.
#[derive(Debug, Clone, Copy)]
pub struct CrlEntry<'a> {
    /// Lowercase hex serial, as the store keeps it (an even number of
    /// digits, at most 40).
    pub serial: &'a str,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Sequence number of the CA that issued the certificate.
    pub ca_seq: u32,
}

/// What one CRL says besides its entries.
#[derive(Debug, Clone, Copy)]
pub struct CrlFields {
    /// Unix seconds.
    pub this_update: i64,
    /// Unix seconds; after `this_update`.
    pub next_update: i64,
    /// The CRL number, increasing.
    pub number: u64,
}

/// Why a CRL could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// nextUpdate is not after thisUpdate.
    #[error("CRL nextUpdate must be after thisUpdate")]
    Validity,
    /// Encoding or signing failed.
    #[error(transparent)]
    Der(#[from] DerError),
}

impl From<der::Error> for CrlError {
    fn from(e: der::Error) -> Self {
        Self::Der(DerError::Encode(e))
    }
}

/// The CRL's DER, listing `revoked` in the order given, signed by `key`
/// (the CA's ECDSA P-256 key) with `template` the CA's.
pub fn write_crl<'a>(
    template: &IssuerTemplate,
    key: &KeyPair,
    fields: &CrlFields,
    revoked: impl Iterator<Item = &'a CrlEntry<'a>>,
) -> Result<Vec<u8>, CrlError> {
    if fields.next_update <= fields.this_update {
        return Err(CrlError::Validity);
    }
    let list = write_entries(revoked)?;
    let tbs = write_tbs(template, fields, &list)?;
    Ok(sign_tbs(&tbs, key)?)
}

/// The revoked certificates' entries, each `SEQUENCE { serial, date }`,
/// back to back (the content of `revokedCertificates`).
fn write_entries<'a>(revoked: impl Iterator<Item = &'a CrlEntry<'a>>) -> Result<Vec<u8>, CrlError> {
    // A filter's lower bound is 0: room for all it may pass.
    let (fewest, most) = revoked.size_hint();
    let mut list = Vec::with_capacity(most.unwrap_or(fewest).saturating_mul(MAX_ENTRY));
    let mut bytes = [0u8; MAX_SERIAL];
    let mut dates = Dates::default();
    for entry in revoked {
        let Some(serial) = decode_serial(entry.serial, &mut bytes) else {
            warn!(
                serial = entry.serial,
                ca_seq = entry.ca_seq,
                "a stored revocation's serial is not 1 to 20 bytes of hex; \
                 it names no certificate this CA issued and is left out of its CRL"
            );
            continue;
        };
        let serial = UintRef::new(serial)?;
        let date = dates.der(entry.revoked_at.clamp(0, LAST_SECOND))?;
        let len = usize::try_from(serial.encoded_len()?)? + date.len();
        header(&mut list, Tag::Sequence, len)?;
        serial.encode_to_vec(&mut list)?;
        list.extend_from_slice(date);
    }
    Ok(list)
}

/// A GeneralizedTime's DER length, the longer of the two.
const DATE_MAX: usize = 17;

/// How many dates [`Dates`] keeps at hand.
const DATE_SLOTS: usize = 16;

/// Revocation dates' DER by second, for one CRL: a date costs more to
/// encode than the rest of its entry, and a commit revokes all it revokes
/// at one time, so a CRL's entries share few distinct seconds (one per
/// revoking commit still listed), each encoded once here. At hand, 16
/// slots direct-mapped by the second (a CRL made mostly of one bulk
/// revocation finds its date there every time); behind them, every second
/// encoded so far: entries come sorted by serial, so the dates of many
/// commits interleave and would miss the slots.
struct Dates {
    /// (second, DER, its length).
    slots: [(i64, [u8; DATE_MAX], usize); DATE_SLOTS],
    /// Each second's DER and its length.
    seen: foldhash::HashMap<i64, ([u8; DATE_MAX], usize)>,
}

impl Default for Dates {
    fn default() -> Self {
        // No date is negative: an empty slot matches none.
        Self { slots: [(-1, [0; DATE_MAX], 0); DATE_SLOTS], seen: Default::default() }
    }
}

impl Dates {
    /// The DER of `at` (Unix seconds, not negative).
    fn der(&mut self, at: i64) -> der::Result<&[u8]> {
        let slot = &mut self.slots[at.rem_euclid(DATE_SLOTS as i64) as usize];
        if slot.0 != at {
            let (bytes, len) = match self.seen.entry(at) {
                std::collections::hash_map::Entry::Occupied(seen) => *seen.get(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    let mut bytes = [0; DATE_MAX];
                    let len = time(at)?.encode_to_slice(&mut bytes)?.len();
                    *new.insert((bytes, len))
                }
            };
            *slot = (at, bytes, len);
        }
        Ok(&slot.1[..slot.2])
    }
}

/// Each byte's value as a hex digit, or `NOT_HEX`.
const HEX_DIGITS: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};
const NOT_HEX: u8 = 0xff;

/// `hex`'s bytes in `buf`, if it is an even number of hex digits, 2 to 40
/// (a table lookup per digit: a CRL decodes every serial it lists).
fn decode_serial<'b>(hex: &str, buf: &'b mut [u8; MAX_SERIAL]) -> Option<&'b [u8]> {
    let hex = hex.as_bytes();
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let out = buf.get_mut(..hex.len() / 2)?;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (HEX_DIGITS[usize::from(pair[0])], HEX_DIGITS[usize::from(pair[1])]);
        if high > 15 || low > 15 {
            return None;
        }
        *byte = high << 4 | low;
    }
    Some(out)
}

/// The TBSCertList around `list`.
fn write_tbs(template: &IssuerTemplate, f: &CrlFields, list: &[u8]) -> Result<Vec<u8>, CrlError> {
    let this_update = time(f.this_update)?;
    let next_update = time(f.next_update)?;
    let number_bytes = f.number.to_be_bytes();
    let number = UintRef::new(&number_bytes)?;
    let number_len = usize::try_from(number.encoded_len()?)?;
    // Extension { cRLNumber, OCTET STRING { INTEGER } }
    let crl_number = OID_CRL_NUMBER.len() + tlv_len(number_len)?;
    let extensions = template.authority_key_id.len() + tlv_len(crl_number)?;
    let extensions_seq = tlv_len(extensions)?;
    let revoked = if list.is_empty() { 0 } else { tlv_len(list.len())? };
    let content = VERSION.len()
        + ECDSA_SHA256.len()
        + template.issuer.len()
        + usize::try_from((this_update.encoded_len()? + next_update.encoded_len()?)?)?
        + revoked
        + tlv_len(extensions_seq)?;
    sequence(content, |out| {
        out.extend_from_slice(VERSION);
        out.extend_from_slice(ECDSA_SHA256);
        out.extend_from_slice(&template.issuer);
        this_update.encode_to_vec(out)?;
        next_update.encode_to_vec(out)?;
        if !list.is_empty() {
            header(out, Tag::Sequence, list.len())?;
            out.extend_from_slice(list);
        }
        header(out, context_constructed(0), extensions_seq)?;
        header(out, Tag::Sequence, extensions)?;
        out.extend_from_slice(&template.authority_key_id);
        header(out, Tag::Sequence, crl_number)?;
        out.extend_from_slice(OID_CRL_NUMBER);
        header(out, Tag::OctetString, number_len)?;
        number.encode_to_vec(out)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::signed::parts::test_ca::{ca, template_of};
    use rcgen::{IsCa, Issuer, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};

    fn datetime(t: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    /// The parameters `Ca::sign_crls` gave rcgen before this module, the
    /// authority key ID taken as `key_id`.
    fn rcgen_crl(
        issuer: &Issuer<'_, KeyPair>,
        key_id: &KeyIdMethod,
        f: &CrlFields,
        revoked: &[CrlEntry<'_>],
    ) -> Vec<u8> {
        let revoked_certs = revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&hex::decode(r.serial).unwrap()),
                revocation_time: datetime(r.revoked_at),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: datetime(f.this_update),
            next_update: datetime(f.next_update),
            crl_number: SerialNumber::from_slice(&f.number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: key_id.clone(),
        };
        params.signed_by(issuer).unwrap().der().to_vec()
    }

    /// The TBSCertList's bytes as written; the CRL must parse whole.
    fn tbs_of(crl: &[u8]) -> Vec<u8> {
        let (rest, list) = x509_parser::parse_x509_crl(crl).unwrap();
        assert!(rest.is_empty());
        list.tbs_cert_list.as_ref().to_vec()
    }

    fn entry(serial: &str, revoked_at: i64) -> CrlEntry<'_> {
        CrlEntry { serial, revoked_at, ca_seq: 1 }
    }

    /// Serials (no high bit, no leading zero) whose entries' lengths sum to
    /// exactly `len` bytes of `revokedCertificates` content (an entry with
    /// an `s`-byte serial and a UTCTime is 19 + `s` bytes).
    fn serials_filling(len: usize) -> Vec<String> {
        let n = len.div_ceil(39);
        (0..n).map(|i| "11".repeat(len / n + usize::from(i < len % n) - 19)).collect()
    }

    /// A CA whose subject key ID is not its key's SHA-256 (as another
    /// issuer's CA may be): the CRL's authority key ID must be it.
    fn ca_with_key_id(id: &[u8]) -> (rustls_pki_types::CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_identifier_method = KeyIdMethod::PreSpecified(id.to_vec());
        (params.self_signed(&key).unwrap().der().clone(), key)
    }

    #[test]
    fn the_same_bytes_as_rcgen() {
        // 2026.
        let now = 1_796_000_000;
        // 3,000 serials shaped as issued ones (16 bytes, the high bit clear).
        let many: Vec<String> =
            (0u32..3_000).map(|i| format!("4{:031x}", u128::from(i) * 0x9e37_79b9)).collect();
        let many_dates: Vec<CrlEntry<'_>> = many
            .iter()
            .enumerate()
            .map(|(i, s)| entry(s, now - (i as i64 * 7919) % 1_000))
            .collect();
        let many: Vec<CrlEntry<'_>> = many.iter().map(|s| entry(s, now - 5)).collect();
        let odd = [
            // high bit set; a single byte; zero; 20 bytes; leading zero bytes
            entry("80010203040506070809", now),
            entry("01", now - 1),
            entry("00", now - 2),
            entry("7fffffffffffffffffffffffffffffffffffffff", now - 3),
            entry("0000ff", now - 4),
            // across 2050: UTCTime, then GeneralizedTime
            entry("0a0b", 2_524_607_999),
            entry("0a0c", 2_524_608_000),
            // dates seen before, between others; upper case
            entry("0d0e", now + 16),
            entry("0d0f", now),
            entry("0D1E", now + 32),
            entry("ABCDEF", now + 16),
        ];
        // The list's content at DER's length boundaries.
        let fills: Vec<(usize, Vec<String>)> = [127, 128, 255, 256, 65_535, 65_536]
            .into_iter()
            .map(|len| (len, serials_filling(len)))
            .collect();
        let fills: Vec<(usize, Vec<CrlEntry<'_>>)> = fills
            .iter()
            .map(|(len, serials)| (*len, serials.iter().map(|s| entry(s, now)).collect()))
            .collect();
        let day = CrlFields { this_update: now - 10, next_update: now + 86_400, number: 1 };
        let mut cases: Vec<(CrlFields, &[CrlEntry<'_>])> = vec![
            (day, &[]),
            (CrlFields { this_update: now, next_update: now + 1, number: 0 }, &odd),
            (CrlFields { this_update: now, next_update: now + 60, number: u64::MAX }, &odd[..1]),
            (CrlFields { this_update: now, next_update: 2_600_000_000, number: 1 << 40 }, &many),
            // 1,000 commits' dates, interleaved as serial order has them
            (day, &many_dates),
            (CrlFields { this_update: 2_524_608_000, next_update: 2_524_608_001, number: 7 }, &[]),
        ];
        cases.extend(fills.iter().map(|(_, list)| (day, &list[..])));
        let (with_id, key) = ca(IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        same_bytes_as_rcgen(&with_id, key, &KeyIdMethod::Sha256, &cases);
        // A CA without a subject key ID: its key's SHA-256, as rcgen.
        let (without_id, key) = ca(IsCa::NoCa);
        same_bytes_as_rcgen(&without_id, key, &KeyIdMethod::Sha256, &cases[..3]);
        // A CA whose subject key ID is something else: that ID.
        let id = [0xab; 8];
        let (other_id, key) = ca_with_key_id(&id);
        same_bytes_as_rcgen(&other_id, key, &KeyIdMethod::PreSpecified(id.to_vec()), &cases[..3]);
        // The fills are what they say.
        for (len, list) in &fills {
            let sum: usize = list.iter().map(|e| 19 + e.serial.len() / 2).sum();
            assert_eq!(sum, *len);
        }
    }

    fn same_bytes_as_rcgen(
        ca_der: &rustls_pki_types::CertificateDer<'static>,
        ca_key: KeyPair,
        key_id: &KeyIdMethod,
        cases: &[(CrlFields, &[CrlEntry<'_>])],
    ) {
        let template = template_of(ca_der, &ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_der, ca_key).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der).unwrap();
        for (fields, revoked) in cases {
            let ours = write_crl(&template, issuer.key(), fields, revoked.iter()).unwrap();
            let theirs = rcgen_crl(&issuer, key_id, fields, revoked);
            assert_eq!(tbs_of(&ours), tbs_of(&theirs), "{fields:?}, {} entries", revoked.len());
            // The signature verifies with the CA's key, and the list reads back.
            let (_, crl) = x509_parser::parse_x509_crl(&ours).unwrap();
            crl.verify_signature(ca_cert.public_key()).unwrap();
            assert_eq!(crl.iter_revoked_certificates().count(), revoked.len());
        }
    }

    #[test]
    fn what_no_crl_can_hold_is_left_out_or_bounded() {
        let (ca_der, ca_key) = ca(IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        let template = template_of(&ca_der, &ca_key).unwrap();
        let fields =
            CrlFields { this_update: 1_796_000_000, next_update: 1_796_086_400, number: 3 };
        let listed = |entries: &[CrlEntry<'_>]| -> Vec<(String, i64)> {
            let crl = write_crl(&template, &ca_key, &fields, entries.iter()).unwrap();
            let (_, crl) = x509_parser::parse_x509_crl(&crl).unwrap();
            crl.iter_revoked_certificates()
                .map(|r| (hex::encode(r.raw_serial()), r.revocation_date.timestamp()))
                .collect()
        };
        // Serials that are not 1 to 20 bytes of hex are left out; the rest stay.
        let too_long = "01".repeat(21);
        let mut entries = vec![entry("0102", 1_796_000_000)];
        for bad in ["", "1", "012", "zz", "0g", too_long.as_str()] {
            entries.push(entry(bad, 1_796_000_000));
        }
        entries.push(entry("0304", 1_796_000_001));
        let expected = [("0102".to_string(), 1_796_000_000), ("0304".to_string(), 1_796_000_001)];
        assert_eq!(listed(&entries), expected);
        // A date outside what a CRL can say is bounded; the serial stays listed.
        assert_eq!(
            listed(&[entry("05", -1), entry("06", i64::MAX)]),
            // 9999-12-31T23:59:59Z
            [("05".to_string(), 0), ("06".to_string(), 253_402_300_799)]
        );
        let backwards = CrlFields { next_update: fields.this_update, ..fields };
        let one = [entry("01", 1_796_000_000)];
        assert!(matches!(
            write_crl(&template, &ca_key, &backwards, one.iter()),
            Err(CrlError::Validity)
        ));
    }
}
