//! JWT-SVID verification keys: from SPKI or JWK, the algorithms each may
//! verify, ECDSA low-S normalization, base64url.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::{Map, Value};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::error::*;

/// The JWK `use` of JWT authorities in a SPIFFE bundle.
pub(crate) const USE_JWT_SVID: &str = "jwt-svid";

/// The JWK `use` of X.509 authorities in a SPIFFE bundle.
pub(crate) const USE_X509_SVID: &str = "x509-svid";

/// Smallest and largest RSA modulus `ring` verifies with, in bits.
pub(crate) const RSA_MODULUS_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// What kind of key a [`JwtKey`] is, with its JWK coordinates in canonical
/// form (EC coordinates at full width, RSA integers without leading zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// EC on P-256; verifies ES256.
    EcP256 { x: Vec<u8>, y: Vec<u8> },
    /// EC on P-384; verifies ES384.
    EcP384 { x: Vec<u8>, y: Vec<u8> },
    /// RSA; verifies RS256/384/512 and PS256/384/512.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl KeyKind {
    /// Reads an SPKI already parsed by `x509_parser`.
    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        let oid = &spki.algorithm.algorithm;
        if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| "EC key has no named-curve parameter".to_string())?;
            let width = if curve == OID_EC_P256 {
                32
            } else if curve == OID_NIST_EC_P384 {
                48
            } else {
                return Err(format!(
                    "EC curve {curve} is not supported (only P-256 and P-384 are)"
                ));
            };
            let point: &[u8] = &spki.subject_public_key.data;
            match point.split_first() {
                Some((&0x04, xy)) if xy.len() == 2 * width => {
                    let (x, y) = xy.split_at(width);
                    Ok(Self::ec(width, x.to_vec(), y.to_vec()))
                }
                Some((&(0x02 | 0x03), _)) => {
                    Err("EC point is compressed (only uncompressed points are supported)".into())
                }
                _ => Err(format!(
                    "EC point is {} bytes long (an uncompressed point of this curve has {})",
                    point.len(),
                    1 + 2 * width
                )),
            }
        } else if *oid == OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => Self::rsa(rsa.modulus, rsa.exponent),
                _ => Err("RSA public key is not a DER RSAPublicKey".into()),
            }
        } else {
            Err(format!(
                "key algorithm {oid} is not supported (only EC P-256, EC P-384 and RSA are)"
            ))
        }
    }

    /// An EC key of coordinate `width` (32 or 48 bytes).
    pub(crate) fn ec(width: usize, x: Vec<u8>, y: Vec<u8>) -> Self {
        if width == 32 {
            Self::EcP256 { x, y }
        } else {
            Self::EcP384 { x, y }
        }
    }

    /// An RSA key from big-endian `n` and `e` (leading zeros allowed and
    /// dropped), checked against what `ring` verifies with.
    pub(crate) fn rsa(n: &[u8], e: &[u8]) -> Result<Self, String> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let bits = match n.first() {
            Some(first) => n.len() * 8 - first.leading_zeros() as usize,
            None => 0,
        };
        if !RSA_MODULUS_BITS.contains(&bits) {
            return Err(format!("RSA modulus is {bits} bits (2048 to 8192 are supported)"));
        }
        let e_value = if e.len() <= 8 {
            e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        } else {
            u64::MAX
        };
        if e_value < 3 || e_value % 2 == 0 || e_value >= 1 << 33 {
            return Err("RSA exponent must be odd, at least 3 and below 2^33".into());
        }
        Ok(Self::Rsa { n: n.to_vec(), e: e.to_vec() })
    }

    /// Reads the kty-specific fields of a JWK.
    pub(crate) fn from_jwk(jwk: &Map<String, Value>) -> Result<Self, String> {
        match jwk_str(jwk, "kty")? {
            Some("EC") => {
                let width = match jwk_str(jwk, "crv")? {
                    Some("P-256") => 32,
                    Some("P-384") => 48,
                    Some(other) => {
                        return Err(format!(
                            "EC crv {:?} is not supported (only P-256 and P-384 are)",
                            echo(other)
                        ))
                    }
                    None => return Err("EC JWK has no crv".into()),
                };
                let x = jwk_bytes(jwk, "x")?;
                let y = jwk_bytes(jwk, "y")?;
                if x.len() != width || y.len() != width {
                    return Err(format!(
                        "EC coordinates are {} and {} bytes long (this curve needs {width} each)",
                        x.len(),
                        y.len()
                    ));
                }
                Ok(Self::ec(width, x, y))
            }
            Some("RSA") => Self::rsa(&jwk_bytes(jwk, "n")?, &jwk_bytes(jwk, "e")?),
            Some(other) => {
                Err(format!("kty {:?} is not supported (only EC and RSA are)", echo(other)))
            }
            None => Err("JWK has no kty".into()),
        }
    }

    /// The kty-specific JWK fields.
    pub(crate) fn jwk_fields(&self) -> Map<String, Value> {
        let mut jwk = Map::new();
        match self {
            Self::EcP256 { x, y } | Self::EcP384 { x, y } => {
                let crv = if matches!(self, Self::EcP256 { .. }) { "P-256" } else { "P-384" };
                jwk.insert("kty".into(), "EC".into());
                jwk.insert("crv".into(), crv.into());
                jwk.insert("x".into(), b64url(x).into());
                jwk.insert("y".into(), b64url(y).into());
            }
            Self::Rsa { n, e } => {
                jwk.insert("kty".into(), "RSA".into());
                jwk.insert("n".into(), b64url(n).into());
                jwk.insert("e".into(), b64url(e).into());
            }
        }
        jwk
    }

    /// The key as `ring` verifies with it: the uncompressed point for EC, the
    /// PKCS#1 RSAPublicKey DER for RSA.
    pub(crate) fn verify_bytes(&self) -> Vec<u8> {
        match self {
            Self::EcP256 { x, y } | Self::EcP384 { x, y } => {
                let mut point = Vec::with_capacity(1 + x.len() + y.len());
                point.push(0x04);
                point.extend_from_slice(x);
                point.extend_from_slice(y);
                point
            }
            Self::Rsa { n, e } => rsa_public_key_der(n, e),
        }
    }

    /// The key type as errors name it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::EcP256 { .. } => "EC P-256",
            Self::EcP384 { .. } => "EC P-384",
            Self::Rsa { .. } => "RSA",
        }
    }

    /// The algs this key verifies, as errors list them.
    pub(crate) fn allowed_algs(&self) -> &'static str {
        match self {
            Self::EcP256 { .. } => "ES256",
            Self::EcP384 { .. } => "ES384",
            Self::Rsa { .. } => "RS256, RS384, RS512, PS256, PS384, PS512",
        }
    }

    /// The `ring` algorithm verifying `alg` with this key, if the key can.
    pub(crate) fn verification_alg(&self, alg: Alg) -> Option<&'static dyn VerificationAlgorithm> {
        Some(match (self, alg) {
            (Self::EcP256 { .. }, Alg::Es256) => &sig::ECDSA_P256_SHA256_FIXED,
            (Self::EcP384 { .. }, Alg::Es384) => &sig::ECDSA_P384_SHA384_FIXED,
            (Self::Rsa { .. }, Alg::Rs256) => &sig::RSA_PKCS1_2048_8192_SHA256,
            (Self::Rsa { .. }, Alg::Rs384) => &sig::RSA_PKCS1_2048_8192_SHA384,
            (Self::Rsa { .. }, Alg::Rs512) => &sig::RSA_PKCS1_2048_8192_SHA512,
            (Self::Rsa { .. }, Alg::Ps256) => &sig::RSA_PSS_2048_8192_SHA256,
            (Self::Rsa { .. }, Alg::Ps384) => &sig::RSA_PSS_2048_8192_SHA384,
            (Self::Rsa { .. }, Alg::Ps512) => &sig::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }
}

/// A JWT signing authority's public key, identified by kid.
///
/// Two keys are equal when kid and key are; a key read from SPKI DER equals
/// the same key read from its JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    pub(crate) kid: String,
    pub(crate) kind: KeyKind,
    /// `kind` as `ring` verifies with it, computed once.
    pub(crate) verify_bytes: Vec<u8>,
}

impl JwtKey {
    /// Reads a SubjectPublicKeyInfo DER (as the server sends JWT authorities)
    /// of an EC P-256, EC P-384 or RSA (2048 to 8192 bits) key.
    pub fn from_spki_der(kid: &str, spki_der: &[u8]) -> Result<Self, JwtError> {
        if kid.is_empty() {
            return Err(JwtError::BadKey("kid is empty".into()));
        }
        let spki = match SubjectPublicKeyInfo::from_der(spki_der) {
            Ok(([], spki)) => spki,
            Ok(_) => {
                return Err(JwtError::BadKey("SubjectPublicKeyInfo DER has trailing bytes".into()))
            }
            Err(e) => {
                return Err(JwtError::BadKey(format!(
                    "not a SubjectPublicKeyInfo DER: {}",
                    one_line(&e.to_string())
                )))
            }
        };
        let kind = KeyKind::from_spki(&spki).map_err(JwtError::BadKey)?;
        Ok(Self::new(kid.to_string(), kind))
    }

    /// Reads a JWK: `kid` and `kty` are required, `use` if present must be
    /// `jwt-svid`; EC keys need `crv` (P-256 or P-384) and full-width `x` and
    /// `y`, RSA keys `n` and `e`. Other members (`alg`, `x5c`, ...) are
    /// ignored.
    pub fn from_jwk(jwk: &Value) -> Result<Self, JwtError> {
        let jwk =
            jwk.as_object().ok_or_else(|| JwtError::BadKey("JWK is not a JSON object".into()))?;
        let kid = match jwk_str(jwk, "kid").map_err(JwtError::BadKey)? {
            Some("") => return Err(JwtError::BadKey("JWK kid is empty".into())),
            Some(kid) => kid,
            None => return Err(JwtError::BadKey("JWK has no kid".into())),
        };
        match jwk_str(jwk, "use").map_err(JwtError::BadKey)? {
            None | Some(USE_JWT_SVID) => {}
            Some(other) => {
                return Err(JwtError::BadKey(format!(
                    "JWK {:?} has use {:?} (a JWT authority's use is \"jwt-svid\")",
                    echo(kid),
                    echo(other)
                )))
            }
        }
        let kind = KeyKind::from_jwk(jwk)
            .map_err(|reason| JwtError::BadKey(format!("JWK {:?}: {reason}", echo(kid))))?;
        Ok(Self::new(kid.to_string(), kind))
    }

    pub(crate) fn new(kid: String, kind: KeyKind) -> Self {
        let verify_bytes = kind.verify_bytes();
        Self { kid, kind, verify_bytes }
    }

    /// The key ID tokens name this key by.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK: kty/crv/x/y or kty/n/e, plus "kid" and "use":"jwt-svid".
    pub fn to_jwk(&self) -> Value {
        let mut jwk = self.kind.jwk_fields();
        jwk.insert("kid".into(), self.kid.clone().into());
        jwk.insert("use".into(), USE_JWT_SVID.into());
        Value::Object(jwk)
    }

    /// The JWS alg this key signs with by default: "ES256", "ES384" or "RS256".
    pub fn default_alg(&self) -> &'static str {
        match self.kind {
            KeyKind::EcP256 { .. } => "ES256",
            KeyKind::EcP384 { .. } => "ES384",
            KeyKind::Rsa { .. } => "RS256",
        }
    }

    /// Checks `signature` over `message` made with `alg`; refuses an `alg`
    /// this kind of key cannot make.
    pub(crate) fn verify(
        &self,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), JwtError> {
        let verification =
            self.kind.verification_alg(alg).ok_or_else(|| JwtError::KeyAlgMismatch {
                kid: echo(&self.kid),
                key_type: self.kind.name(),
                alg: alg.as_str().to_string(),
                allowed: self.kind.allowed_algs(),
            })?;
        if matches!(self.kind, KeyKind::EcP256 { .. } | KeyKind::EcP384 { .. })
            && !ecdsa_is_low_s(signature)
        {
            return Err(JwtError::HighS);
        }
        UnparsedPublicKey::new(verification, &self.verify_bytes)
            .verify(message, signature)
            .map_err(|_| JwtError::BadSignature)
    }
}

/// Order of the P-256 group, big-endian.
pub(crate) const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// Order of the P-384 group, big-endian.
pub(crate) const P384_ORDER: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// The curve order for a fixed-size (`r || s`) signature of this length.
pub(crate) fn ecdsa_order(signature_len: usize) -> Option<&'static [u8]> {
    match signature_len {
        64 => Some(&P256_ORDER),
        96 => Some(&P384_ORDER),
        _ => None,
    }
}

/// Whether the `s` half of a fixed-size ECDSA signature is at most n/2
/// (a signature of another length is not judged here: it fails to verify).
pub fn ecdsa_is_low_s(signature: &[u8]) -> bool {
    let Some(order) = ecdsa_order(signature.len()) else { return true };
    let s = &signature[order.len()..];
    // floor(n / 2), big-endian: s <= n >> 1 (on the stack: every JWT
    // signed and every JWT validated asks).
    let mut buf = [0u8; P384_ORDER.len()];
    let half = &mut buf[..order.len()];
    let mut carry = 0u8;
    for (h, n) in half.iter_mut().zip(order) {
        *h = (n >> 1) | carry;
        carry = (n & 1) << 7;
    }
    s <= &*half
}

/// Rewrites a fixed-size ECDSA signature into its low-s form (`s` := n - s
/// when s > n/2), which verifies the same; every signer of JWTs in Tessera
/// calls this, and [`ecdsa_is_low_s`] is what validators require.
pub fn ecdsa_to_low_s(signature: &mut [u8]) {
    if !ecdsa_is_low_s(signature) {
        negate_s(signature);
    }
}

/// `s` := n - s in a fixed-size ECDSA signature (the other signature of the
/// same message under the same key).
pub(crate) fn negate_s(signature: &mut [u8]) {
    let Some(order) = ecdsa_order(signature.len()) else { return };
    let s = &mut signature[order.len()..];
    let mut borrow = 0i16;
    for (s, n) in s.iter_mut().zip(order).rev() {
        let mut d = i16::from(*n) - i16::from(*s) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        *s = d as u8;
    }
}

/// The JWS algs a JWT-SVID may be verified with here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Ps256,
    Ps384,
    Ps512,
}

impl Alg {
    /// Reads a header's `alg`, refusing what is off the JWT-SVID list and
    /// ES512 (on it, but P-521 cannot be verified with `ring`).
    pub(crate) fn parse(alg: &str) -> Result<Self, JwtError> {
        Ok(match alg {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES512" => return Err(JwtError::UnsupportedAlg(alg.to_string())),
            other => return Err(JwtError::AlgNotAllowed(echo(other))),
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
        }
    }
}

/// base64url without padding (helpers the server's signer reuses).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding; padding, the standard alphabet and
/// non-zero trailing bits are refused.
pub fn b64url_decode(s: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD.decode(s).map_err(|e| JwtError::Base64(one_line(&e.to_string())))
}

/// Reads an optional string member of a JWK; a non-string is an error.
pub(crate) fn jwk_str<'a>(
    jwk: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("JWK {name} is not a string")),
    }
}

/// Reads a required base64url member of a JWK.
pub(crate) fn jwk_bytes(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = jwk_str(jwk, name)?.ok_or_else(|| format!("JWK has no {name}"))?;
    b64url_decode(s).map_err(|e| format!("JWK {name}: {e}"))
}

/// DER of a PKCS#1 RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }, from
/// big-endian magnitudes without leading zeros.
pub(crate) fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    der_unsigned_integer(&mut body, n);
    der_unsigned_integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(0x30);
    der_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Appends a DER INTEGER holding the non-negative big-endian `magnitude`
/// (given without leading zeros): a 0x00 goes first when the high bit is
/// set, so the number does not read as negative.
pub(crate) fn der_unsigned_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
    let pad = magnitude.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    der_length(out, magnitude.len() + usize::from(pad));
    if pad {
        out.push(0x00);
    }
    out.extend_from_slice(magnitude);
}

/// Appends a DER length: short form below 128, else long form.
pub(crate) fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let significant = strip_leading_zeros(&bytes);
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

pub(crate) fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}
