//! JWT-SVIDs and JWT bundles, per the SPIFFE JWT-SVID and Trust Domain and
//! Bundle standards.
//!
//! A JWT-SVID is a JWS in compact serialization whose header holds only
//! `alg`, `kid` and optionally `typ` (`JWT` or `JOSE`), signed with one of
//! RS256/384/512, ES256/384 or PS256/384/512, and whose claims hold a `sub`
//! (the SPIFFE ID), an `aud` and an `exp`. [`validate`] checks all of that
//! against a trust domain's [`JwtBundle`]; [`UnverifiedJwt::decode`] reads a
//! token without checking its signature (to learn its `exp` or `jti`, say).
//!
//! Keys arrive as SubjectPublicKeyInfo DER ([`JwtKey::from_spki_der`]) or as
//! JWKs ([`JwtKey::from_jwk`], [`JwtBundle::from_jwks`]); both become the
//! form `ring` verifies with, so a key reads the same whichever way it came.
//!
//! ```
//! use tessera_workload_api::jwt::{self, JwtBundle, JwtError};
//! use tessera_workload_api::TrustDomain;
//!
//! let td = TrustDomain::new("example.org").unwrap();
//! let bundle = JwtBundle::from_jwks(td, br#"{"keys":[]}"#).unwrap();
//! // An unsigned token is refused before any key is looked at.
//! let token = format!(
//!     "{}.{}.",
//!     jwt::b64url(br#"{"alg":"none"}"#),
//!     jwt::b64url(br#"{"sub":"spiffe://example.org/w","aud":"a","exp":9999999999}"#),
//! );
//! let err = jwt::validate(&token, "a", &bundle, 1_700_000_000).unwrap_err();
//! assert_eq!(err, JwtError::AlgNotAllowed("none".into()));
//! ```

use std::collections::HashSet;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::{Map, Value};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Longest token accepted, in bytes (16 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The JWK `use` of JWT authorities in a SPIFFE bundle.
const USE_JWT_SVID: &str = "jwt-svid";

/// The JWK `use` of X.509 authorities in a SPIFFE bundle.
const USE_X509_SVID: &str = "x509-svid";

/// Header fields a JWT-SVID may carry.
const HEADER_FIELDS: [&str; 3] = ["alg", "kid", "typ"];

/// Longest piece of caller- or token-supplied text an error repeats, in
/// characters; the rest is cut (a 16 KiB `alg` makes no better message).
const MAX_ECHO_CHARS: usize = 100;

/// Smallest and largest RSA modulus `ring` verifies with, in bits.
const RSA_MODULUS_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// Why a token, key or bundle was refused.
///
/// Each variant names the rule broken; every message is one line, and text
/// taken from the input is quoted and cut to 100 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is longer than 16 KiB.
    #[error("JWT is {0} bytes long (at most 16384 are allowed)")]
    TooLarge(usize),

    /// The token is not three base64url (no padding) parts separated by
    /// dots, or its header or claims are not a JSON object.
    #[error("JWT is malformed: {0}")]
    Malformed(String),

    /// Text is not base64url without padding (see [`b64url_decode`]).
    #[error("not base64url without padding: {0}")]
    Base64(String),

    /// The header has a field other than `alg`, `kid` and `typ` (`crit`,
    /// `jku` and `x5u` included).
    #[error(
        "JWT header field {0:?} is not allowed (a JWT-SVID header holds only alg, kid and typ)"
    )]
    HeaderField(String),

    /// The header's `typ` is neither `JWT` nor `JOSE`.
    #[error("JWT header typ {0:?} is not allowed (only \"JWT\" and \"JOSE\" are)")]
    BadTyp(String),

    /// The header's `alg` is `none`, an HMAC or anything else off the
    /// JWT-SVID list.
    #[error("JWT alg {0:?} is not allowed (allowed: RS256, RS384, RS512, ES256, ES384, PS256, PS384, PS512)")]
    AlgNotAllowed(String),

    /// The header's `alg` is on the JWT-SVID list but cannot be verified here
    /// (ES512: P-521 is not supported by `ring`).
    #[error("JWT alg {0:?} is not supported (P-521 keys cannot be verified here)")]
    UnsupportedAlg(String),

    /// The header has no `kid`, so no key of the bundle can be chosen.
    #[error("JWT header has no kid (a JWT-SVID must name its signing key)")]
    MissingKid,

    /// The header's `kid` is not in the bundle.
    #[error("JWT kid {kid:?} is not among the JWT authorities of trust domain {trust_domain:?}")]
    UnknownKid {
        /// The `kid` of the token.
        kid: String,
        /// The trust domain whose bundle was searched.
        trust_domain: String,
    },

    /// The key the `kid` names cannot make signatures of the token's `alg`
    /// (an EC key and RS256, a P-256 key and ES384).
    #[error("JWT alg {alg:?} cannot be verified with key {kid:?}, a {key_type} key (it verifies only {allowed})")]
    KeyAlgMismatch {
        /// The `kid` of the token.
        kid: String,
        /// The key type: `EC P-256`, `EC P-384` or `RSA`.
        key_type: &'static str,
        /// The `alg` of the token.
        alg: String,
        /// The algs the key verifies.
        allowed: &'static str,
    },

    /// The signature does not verify with the key the `kid` names (forged,
    /// or the header or claims changed after signing).
    #[error("JWT signature does not verify with the key its kid names")]
    BadSignature,

    /// An ECDSA signature whose `s` is in the upper half of the curve
    /// order. `(r, s)` and `(r, n - s)` both verify, so one token could be
    /// sent as two strings; Tessera signs and accepts only the low-s form.
    #[error(
        "JWT ECDSA signature is not in low-s form (s > n/2); only low-s signatures are accepted"
    )]
    HighS,

    /// A required claim (`sub`, `aud` or `exp`) is missing.
    #[error("JWT claim {0:?} is missing (a JWT-SVID requires sub, aud and exp)")]
    MissingClaim(&'static str),

    /// A claim has the wrong JSON type (`exp` not a number, `aud` not a
    /// string or array of strings, an empty `aud` array).
    #[error("JWT claim {claim:?} is invalid: {reason}")]
    BadClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The `sub` claim is not a SPIFFE ID.
    #[error("JWT sub is not a SPIFFE ID: {0}")]
    BadSubject(String),

    /// The `sub` claim is a SPIFFE ID of another trust domain than the
    /// bundle's.
    #[error("JWT sub {subject:?} is not in trust domain {expected:?} (the bundle's)")]
    WrongTrustDomain {
        /// The `sub` of the token.
        subject: String,
        /// The bundle's trust domain.
        expected: String,
    },

    /// The caller asked to validate for an empty audience.
    #[error("audience to validate for is empty")]
    EmptyAudience,

    /// The audience asked for is not among the token's `aud`.
    #[error("JWT aud {got:?} does not contain the audience {wanted:?}")]
    AudienceMismatch {
        /// The audience the caller validates for.
        wanted: String,
        /// The token's audiences.
        got: Vec<String>,
    },

    /// The token's `exp` is at or before `now`.
    #[error("JWT expired: exp {exp} is not after now {now}")]
    Expired {
        /// The token's `exp`, in Unix seconds.
        exp: i64,
        /// The time validated at, in Unix seconds.
        now: i64,
    },

    /// The token's `nbf` is after `now`.
    #[error("JWT is not yet valid: nbf {nbf} is after now {now}")]
    NotYetValid {
        /// The token's `nbf`, in Unix seconds (rounded up).
        nbf: i64,
        /// The time validated at, in Unix seconds.
        now: i64,
    },

    /// A key (SPKI DER or JWK) is malformed or of a kind not supported here
    /// (only EC P-256, EC P-384 and RSA of 2048 to 8192 bits are).
    #[error("JWT authority key is invalid: {0}")]
    BadKey(String),

    /// A JWK Set is not JSON, has no `keys` array, or a key in it is invalid.
    #[error("JWT bundle is invalid: {0}")]
    BadBundle(String),

    /// Two keys of a JWK Set have the same `kid`.
    #[error("JWT bundle has two keys with kid {0:?} (kids must be unique)")]
    DuplicateKid(String),

    /// An X.509 authority given to [`spiffe_bundle_document`] cannot be
    /// parsed or has a key that has no JWK form here.
    #[error("X.509 authority {index} cannot go in the bundle document: {reason}")]
    BadAuthority {
        /// Position of the certificate in the list given.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// What kind of key a [`JwtKey`] is, with its JWK coordinates in canonical
/// form (EC coordinates at full width, RSA integers without leading zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyKind {
    /// EC on P-256; verifies ES256.
    EcP256 { x: Vec<u8>, y: Vec<u8> },
    /// EC on P-384; verifies ES384.
    EcP384 { x: Vec<u8>, y: Vec<u8> },
    /// RSA; verifies RS256/384/512 and PS256/384/512.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl KeyKind {
    /// Reads an SPKI already parsed by `x509_parser`.
    fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
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
    fn ec(width: usize, x: Vec<u8>, y: Vec<u8>) -> Self {
        if width == 32 {
            Self::EcP256 { x, y }
        } else {
            Self::EcP384 { x, y }
        }
    }

    /// An RSA key from big-endian `n` and `e` (leading zeros allowed and
    /// dropped), checked against what `ring` verifies with.
    fn rsa(n: &[u8], e: &[u8]) -> Result<Self, String> {
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
    fn from_jwk(jwk: &Map<String, Value>) -> Result<Self, String> {
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
    fn jwk_fields(&self) -> Map<String, Value> {
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
    fn verify_bytes(&self) -> Vec<u8> {
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
    fn name(&self) -> &'static str {
        match self {
            Self::EcP256 { .. } => "EC P-256",
            Self::EcP384 { .. } => "EC P-384",
            Self::Rsa { .. } => "RSA",
        }
    }

    /// The algs this key verifies, as errors list them.
    fn allowed_algs(&self) -> &'static str {
        match self {
            Self::EcP256 { .. } => "ES256",
            Self::EcP384 { .. } => "ES384",
            Self::Rsa { .. } => "RS256, RS384, RS512, PS256, PS384, PS512",
        }
    }

    /// The `ring` algorithm verifying `alg` with this key, if the key can.
    fn verification_alg(&self, alg: Alg) -> Option<&'static dyn VerificationAlgorithm> {
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
    kid: String,
    kind: KeyKind,
    /// `kind` as `ring` verifies with it, computed once.
    verify_bytes: Vec<u8>,
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

    fn new(kid: String, kind: KeyKind) -> Self {
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
    fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), JwtError> {
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
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
/// Order of the P-384 group, big-endian.
const P384_ORDER: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// The curve order for a fixed-size (`r || s`) signature of this length.
fn ecdsa_order(signature_len: usize) -> Option<&'static [u8]> {
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
    // floor(n / 2), big-endian: s <= n >> 1.
    let mut half = vec![0u8; order.len()];
    let mut carry = 0u8;
    for (h, n) in half.iter_mut().zip(order) {
        *h = (n >> 1) | carry;
        carry = (n & 1) << 7;
    }
    s <= half.as_slice()
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
fn negate_s(signature: &mut [u8]) {
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

/// A trust domain's JWT authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: Vec<JwtKey>,
}

impl JwtBundle {
    /// A bundle of `keys`. Kids should be unique; if two keys share one,
    /// [`JwtBundle::key`] finds the first.
    pub fn new(trust_domain: TrustDomain, keys: Vec<JwtKey>) -> Self {
        Self { trust_domain, keys }
    }

    /// Parses a JWK Set ({"keys":[...]}, as FetchJWTBundles sends it). Keys
    /// whose `use` is "x509-svid" are skipped (a full SPIFFE bundle may be
    /// passed); a JWT key without kid, malformed JSON, or duplicate kids →
    /// error. Any other key [`JwtKey::from_jwk`] refuses (an unsupported
    /// curve, say) fails the whole set too, naming its index.
    pub fn from_jwks(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, JwtError> {
        let doc: Value = serde_json::from_slice(json)
            .map_err(|e| JwtError::BadBundle(format!("not JSON: {}", one_line(&e.to_string()))))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwtError::BadBundle("no \"keys\" array".into()))?;
        let mut keys = Vec::new();
        let mut kids = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            if entry.get("use").and_then(Value::as_str) == Some(USE_X509_SVID) {
                continue;
            }
            let key = JwtKey::from_jwk(entry)
                .map_err(|e| JwtError::BadBundle(format!("key {index}: {e}")))?;
            if !kids.insert(key.kid.clone()) {
                return Err(JwtError::DuplicateKid(echo(&key.kid)));
            }
            keys.push(key);
        }
        Ok(Self { trust_domain, keys })
    }

    /// JWK Set JSON bytes holding only the jwt-svid keys: {"keys":[...]}.
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys: Vec<Value> = self.keys.iter().map(JwtKey::to_jwk).collect();
        serde_json::json!({ "keys": keys }).to_string().into_bytes()
    }

    /// The trust domain these authorities sign for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// All the authorities' keys.
    pub fn keys(&self) -> &[JwtKey] {
        &self.keys
    }

    /// The key with this kid, if any.
    pub fn key(&self, kid: &str) -> Option<&JwtKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// The JWS algs a JWT-SVID may be verified with here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
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
    fn parse(alg: &str) -> Result<Self, JwtError> {
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

    fn as_str(self) -> &'static str {
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

/// A token's parts, decoded but NOT verified.
#[derive(Debug, Clone)]
pub struct UnverifiedJwt {
    /// The header's `alg`, one of the JWT-SVID algs.
    pub alg: String,
    /// The header's `kid`, if any.
    pub kid: Option<String>,
    /// All the claims, unchecked.
    pub claims: Map<String, Value>,
}

impl UnverifiedJwt {
    /// Decodes header and claims (header allowlist and alg allowlist checked; size limit: tokens over 16 KiB refused).
    pub fn decode(token: &str) -> Result<Self, JwtError> {
        decode_parts(token).map(|parts| parts.jwt)
    }

    /// The `jti` claim, if it is a string.
    pub fn jti(&self) -> Option<&str> {
        self.claims.get("jti").and_then(Value::as_str)
    }

    /// The `exp` claim in Unix seconds (a fraction rounded down), if it is a
    /// number.
    pub fn expires_at(&self) -> Option<i64> {
        self.claims.get("exp").and_then(|v| numeric_date(v, f64::floor))
    }
}

/// A token that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The `sub` claim: the workload's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The `aud` claim, as a list even when the token held one string.
    pub audience: Vec<String>,
    /// The `exp` claim in Unix seconds (a fraction rounded down).
    pub expires_at: i64,
    /// The `jti` claim, if any.
    pub jti: Option<String>,
    /// All the claims.
    pub claims: Map<String, Value>,
}

/// A decoded token and what its signature covers.
struct Parts<'a> {
    jwt: UnverifiedJwt,
    alg: Alg,
    /// `header.claims` as in the token: the signed bytes.
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Splits and decodes a token, checking its size, its header against the
/// JWT-SVID allowlists and that its claims are a JSON object.
fn decode_parts(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge(token.len()));
    }
    let (signing_input, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| JwtError::Malformed("not three dot-separated parts".into()))?;
    let (header, claims) = signing_input
        .split_once('.')
        .filter(|(_, claims)| !claims.contains('.'))
        .ok_or_else(|| {
            JwtError::Malformed(
                "not three dot-separated parts (only JWS compact serialization is accepted)".into(),
            )
        })?;

    let header = json_object(header, "header")?;
    if let Some(field) = header.keys().find(|k| !HEADER_FIELDS.contains(&k.as_str())) {
        return Err(JwtError::HeaderField(echo(field)));
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        Some(_) => return Err(JwtError::Malformed("header alg is not a string".into())),
        None => return Err(JwtError::Malformed("header has no alg".into())),
    };
    let parsed_alg = Alg::parse(&alg)?;
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(Value::String(typ)) => return Err(JwtError::BadTyp(echo(typ))),
        Some(other) => return Err(JwtError::BadTyp(echo(&other.to_string()))),
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("header kid is not a string".into())),
    };

    let claims = json_object(claims, "claims")?;
    let signature =
        b64url_decode(signature).map_err(|e| JwtError::Malformed(format!("signature: {e}")))?;
    Ok(Parts { jwt: UnverifiedJwt { alg, kid, claims }, alg: parsed_alg, signing_input, signature })
}

/// Decodes one base64url part of a token holding a JSON object.
fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = b64url_decode(part).map_err(|e| JwtError::Malformed(format!("{what}: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        Err(e) => {
            Err(JwtError::Malformed(format!("{what} is not JSON: {}", one_line(&e.to_string()))))
        }
    }
}

/// Validates a JWT-SVID for `audience` at `now` (Unix seconds) against `bundle`: header allowlist, alg allowlist, kid lookup, key/alg match, signature, sub (SPIFFE ID of the bundle's trust domain), aud contains audience, exp > now, nbf.
///
/// The claims are read only once the signature has verified.
pub fn validate(
    token: &str,
    audience: &str,
    bundle: &JwtBundle,
    now: i64,
) -> Result<ValidatedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    let Parts { jwt, alg, signing_input, signature } = decode_parts(token)?;
    let kid = jwt.kid.as_deref().ok_or(JwtError::MissingKid)?;
    let key = bundle.key(kid).ok_or_else(|| JwtError::UnknownKid {
        kid: echo(kid),
        trust_domain: bundle.trust_domain.as_str().to_string(),
    })?;
    key.verify(alg, signing_input.as_bytes(), &signature)?;

    let claims = jwt.claims;
    let spiffe_id = match claims.get("sub") {
        None => return Err(JwtError::MissingClaim("sub")),
        Some(Value::String(sub)) => {
            SpiffeId::parse(sub).map_err(|e| JwtError::BadSubject(e.to_string()))?
        }
        Some(_) => return Err(JwtError::BadClaim { claim: "sub", reason: "not a string".into() }),
    };
    if spiffe_id.trust_domain() != bundle.trust_domain() {
        return Err(JwtError::WrongTrustDomain {
            subject: echo(spiffe_id.as_str()),
            expected: bundle.trust_domain.as_str().to_string(),
        });
    }

    let got = audiences(claims.get("aud"))?;
    if !got.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            wanted: echo(audience),
            got: got.iter().map(|a| echo(a)).collect(),
        });
    }

    let exp = match claims.get("exp") {
        None => return Err(JwtError::MissingClaim("exp")),
        Some(v) => numeric_date(v, f64::floor).ok_or_else(|| not_a_number("exp"))?,
    };
    if exp <= now {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(v) = claims.get("nbf") {
        let nbf = numeric_date(v, f64::ceil).ok_or_else(|| not_a_number("nbf"))?;
        if nbf > now {
            return Err(JwtError::NotYetValid { nbf, now });
        }
    }
    if let Some(v) = claims.get("iat") {
        numeric_date(v, f64::floor).ok_or_else(|| not_a_number("iat"))?;
    }
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(jti)) => Some(jti.clone()),
        Some(_) => return Err(JwtError::BadClaim { claim: "jti", reason: "not a string".into() }),
    };
    Ok(ValidatedJwt { spiffe_id, audience: got, expires_at: exp, jti, claims })
}

/// Reads `aud`: a string, or a non-empty array of strings.
fn audiences(aud: Option<&Value>) -> Result<Vec<String>, JwtError> {
    let bad = |reason: &str| JwtError::BadClaim { claim: "aud", reason: reason.into() };
    match aud {
        None => Err(JwtError::MissingClaim("aud")),
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) if items.is_empty() => Err(bad("empty array")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| bad("array holds a non-string"))
            })
            .collect(),
        Some(_) => Err(bad("neither a string nor an array of strings")),
    }
}

/// A JSON number as Unix seconds, a fraction rounded by `round`; numbers
/// beyond `i64` saturate.
fn numeric_date(v: &Value, round: fn(f64) -> f64) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    // `as` saturates for out-of-range floats; JSON has no NaN or infinity.
    v.as_f64().map(|f| round(f) as i64)
}

fn not_a_number(claim: &'static str) -> JwtError {
    JwtError::BadClaim { claim, reason: "not a number".into() }
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

/// Whether `audience` may be a JWT-SVID audience (in a request or an
/// entry's policy): 1 to 256 characters, no control characters or spaces.
pub fn valid_audience(audience: &str) -> bool {
    !audience.is_empty()
        && audience.len() <= 256
        && audience.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

/// Whether an entry's audience policy (`policy`; empty: any audience)
/// allows a JWT-SVID for `audience`.
pub fn audience_allowed(policy: &[String], audience: &str) -> bool {
    policy.is_empty() || policy.iter().any(|a| a == audience)
}

/// The SPIFFE bundle document (SPIFFE Trust Domain and Bundle standard):
/// `{"keys": [...], "spiffe_sequence": N, "spiffe_refresh_hint": S}`. Each
/// X.509 authority is an `x509-svid` key with its certificate as the one
/// `x5c` value (standard base64) and no `kid`; each JWT key is a `jwt-svid`
/// key with its `kid`.
///
/// `x509_authorities` are DER certificates; one that cannot be parsed, or
/// whose key is not EC P-256, EC P-384 or RSA, is an error naming its index.
pub fn spiffe_bundle_document(
    x509_authorities: &[Vec<u8>],
    jwt: &JwtBundle,
    sequence: u64,
    refresh_hint_secs: u64,
) -> Result<Value, JwtError> {
    let mut keys = Vec::with_capacity(x509_authorities.len() + jwt.keys.len());
    for (index, der) in x509_authorities.iter().enumerate() {
        let bad = |reason: String| JwtError::BadAuthority { index, reason };
        let cert = match x509_parser::parse_x509_certificate(der) {
            Ok(([], cert)) => cert,
            Ok(_) => return Err(bad("certificate DER has trailing bytes".into())),
            Err(e) => {
                return Err(bad(format!("not a DER certificate: {}", one_line(&e.to_string()))))
            }
        };
        let kind = KeyKind::from_spki(cert.public_key()).map_err(bad)?;
        let mut jwk = kind.jwk_fields();
        jwk.insert("use".into(), USE_X509_SVID.into());
        jwk.insert("x5c".into(), Value::Array(vec![STANDARD.encode(der).into()]));
        keys.push(Value::Object(jwk));
    }
    keys.extend(jwt.keys.iter().map(JwtKey::to_jwk));
    Ok(serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    }))
}

/// Reads an optional string member of a JWK; a non-string is an error.
fn jwk_str<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("JWK {name} is not a string")),
    }
}

/// Reads a required base64url member of a JWK.
fn jwk_bytes(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = jwk_str(jwk, name)?.ok_or_else(|| format!("JWK has no {name}"))?;
    b64url_decode(s).map_err(|e| format!("JWK {name}: {e}"))
}

/// DER of a PKCS#1 RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }, from
/// big-endian magnitudes without leading zeros.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
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
fn der_unsigned_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
    let pad = magnitude.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    der_length(out, magnitude.len() + usize::from(pad));
    if pad {
        out.push(0x00);
    }
    out.extend_from_slice(magnitude);
}

/// Appends a DER length: short form below 128, else long form.
fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let significant = strip_leading_zeros(&bytes);
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// Input text as errors repeat it: at most 100 characters.
fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// A library's error text on one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::hmac;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512, RSA_PSS_SHA256,
    };
    use serde_json::json;

    /// A 2048-bit RSA test key, PKCS#8 DER in base64 (made with
    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` and
    /// `openssl pkcs8 -topk8 -nocrypt`).
    const RSA_PKCS8: &str = "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC84ENc3OI55vTjttwkYSl7Jb60JAd+TxlOWyjv2mdP+UWf39eDFRmV4MR1uDAooBmCg+IYX1gLDpQQxIoRaZhSrHcDavZrk1cZYPe+iItccxWxZaAITWBYtOiis4brNbf+JaveaayeJL5eYyZyx4ywQub80fG5HYyrx/Y7mFy2WOPdgCJJECUDWMeKOgeAbBizpm5BGNOHtfV6+09GDnQZoChWAcsfOA04aLr1tBPKUWvXE4Vkz03rvEU30fp9/XRu2kd9oOWvbZDBrX/0F2EV2IArqheae6Ns2EhpF7JglM/0iTsAtYWOYM8nlNs1KohiJmgQAYskzHJMwag9NSlpAgMBAAECggEAIjvJqd61OEZ2s4FUxFlCAfqU5qSzIP8oOI4ITPT6jcHCD1isgKtF4GcFZMrWG77s8L2DsOQzGonxZ1qgJcjMXYu55IoyEMx7WHO9Y7DvBXosf+NKDscrg9iCY98DQMWTTEK6tIzVxzIkuQnikaI+i0INCNzqoaFL+mS7ahDTGQ+SwZtWnWv7Z1IKI/RKMbmU6v8Iv33cVMeENbgpA1P2OOE7aQZ45HLmow0ndqqddKf+DWVoJPbwLLFJC101Cq2woSmGN8sFQu0w2aSAFRyxPM/ljMKiDahzci69LbXE0Nwk1pBx5mHhFVQwTKLzsE6Lzc+zVYrZABZNAwufb/LmOwKBgQDey04nz770UEGflbVqsgNzyE4Rqjdfi2VWTLVq6JJd90UWQFhMm08bXn+qu7xGREiJ70lnIVw69eyb7Zt5ISRV/lePCenZBIoa04CkvlA0IZek9Xf4kBj+I68/s9RgaKEnUBzDVYLM+S96mo7l6iH9oYb1yRMRqCFFklTlHju1YwKBgQDZBtBgoiT7IzEoqp6JLCmtpWENbhTNrhuP6AoSG8vQuFg9u1IPtbAL+8W6s/g1rSQefT1U9sy29vGJA2OdXxLe0pEb10RqaDhIFUMdOxWl4/ff/iWlnOdFh4bGg3rj6a9/a6PbDrIR4Iqzppw9qFizWQvIadHPYc8Wllr+Sgm1wwKBgH1MpeXqBqDsyhtwXRlmiF6DlrSEoKPRh+qjNZystDS4rlg3U/GxnynrWa2x688w9ALvWr7vmilmye1gEoJrSz45zxCZKLVuwiUYMk904TKQefLCQvi+QfAcLaGMB7M45PlxKtwIqYmR00wGxLs1lGxKfdaZgWn6vsub4rcA69+1AoGAHswMvenEfa7cxvyPSr/tmiqhvxoj8ZwHZUB0TWWMYq4GN5xhZMFPniO4R2pKirNrMLhs/6WWH1CjreHBPQ/EycHvvZeqqb7oXbJGt9sukz/qaOrTxNCjMQauZXU69ySuNtK7idZoBolqpVu7SDSfgbPdLC94ConCrV3gw70V66kCgYBHWuYOV6hAW1/z2RXwXGyBUjZVQEA+NVR7o+/PLJk1bsJ7ChCLbYtagI3Wuna6TyTOKV2GLG6fbrsSMAVLnxSoBAmNp+X8Qi9Z0CjbsOpk6C0KoFn1pAJZzU8BG9jkBDkivDHvaGa7PHMRbh4sWE1N46LyeguW43OaIz3KhD3cPQ==";

    /// The SubjectPublicKeyInfo DER of [`RSA_PKCS8`] (`openssl pkey -pubout`).
    const RSA_SPKI: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvOBDXNziOeb047bcJGEpeyW+tCQHfk8ZTlso79pnT/lFn9/XgxUZleDEdbgwKKAZgoPiGF9YCw6UEMSKEWmYUqx3A2r2a5NXGWD3voiLXHMVsWWgCE1gWLToorOG6zW3/iWr3mmsniS+XmMmcseMsELm/NHxuR2Mq8f2O5hctljj3YAiSRAlA1jHijoHgGwYs6ZuQRjTh7X1evtPRg50GaAoVgHLHzgNOGi69bQTylFr1xOFZM9N67xFN9H6ff10btpHfaDlr22Qwa1/9BdhFdiAK6oXmnujbNhIaReyYJTP9Ik7ALWFjmDPJ5TbNSqIYiZoEAGLJMxyTMGoPTUpaQIDAQAB";

    /// SPKI DER prefixes of EC keys (AlgorithmIdentifier and BIT STRING
    /// header); the uncompressed point follows.
    const P256_SPKI_PREFIX: &[u8] = &[
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    const P384_SPKI_PREFIX: &[u8] = &[
        0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05,
        0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
    ];

    const NOW: i64 = 1_700_000_000;

    enum Signer {
        Ec(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }

    impl Signer {
        fn p256() -> Self {
            Self::ec(&ECDSA_P256_SHA256_FIXED_SIGNING)
        }

        fn p384() -> Self {
            Self::ec(&ECDSA_P384_SHA384_FIXED_SIGNING)
        }

        fn ec(alg: &'static ring::signature::EcdsaSigningAlgorithm) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Self::Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
        }

        fn rsa() -> Self {
            let der = STANDARD.decode(RSA_PKCS8).unwrap();
            Self::Rsa(RsaKeyPair::from_pkcs8(&der).unwrap())
        }

        fn spki(&self) -> Vec<u8> {
            match self {
                Self::Ec(k) => {
                    let point = k.public_key().as_ref();
                    let prefix =
                        if point.len() == 65 { P256_SPKI_PREFIX } else { P384_SPKI_PREFIX };
                    let mut der = prefix.to_vec();
                    der.extend_from_slice(point);
                    der
                }
                Self::Rsa(_) => STANDARD.decode(RSA_SPKI).unwrap(),
            }
        }

        fn key(&self, kid: &str) -> JwtKey {
            JwtKey::from_spki_der(kid, &self.spki()).unwrap()
        }

        fn sign(&self, alg: &str, message: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Self::Ec(k) => {
                    let mut sig = k.sign(&rng, message).unwrap().as_ref().to_vec();
                    ecdsa_to_low_s(&mut sig);
                    sig
                }
                Self::Rsa(k) => {
                    let padding: &dyn ring::signature::RsaEncoding = match alg {
                        "RS256" => &RSA_PKCS1_SHA256,
                        "RS512" => &RSA_PKCS1_SHA512,
                        "PS256" => &RSA_PSS_SHA256,
                        other => panic!("test signer has no {other}"),
                    };
                    let mut sig = vec![0; k.public().modulus_len()];
                    k.sign(padding, &rng, message, &mut sig).unwrap();
                    sig
                }
            }
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn claims() -> Value {
        json!({
            "sub": "spiffe://example.org/workload",
            "aud": ["svc"],
            "exp": NOW + 300,
            "iat": NOW - 10,
            "jti": "token-1",
        })
    }

    fn token(header: &Value, claims: &Value, signer: &Signer) -> String {
        let alg = header["alg"].as_str().unwrap_or("ES256");
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = signer.sign(alg, input.as_bytes());
        format!("{input}.{}", b64url(&sig))
    }

    fn es256(kid: &str, claims: &Value, signer: &Signer) -> String {
        token(&json!({"alg": "ES256", "kid": kid, "typ": "JWT"}), claims, signer)
    }

    /// A P-256 signer and a bundle holding its key as kid "k1".
    fn ec_setup() -> (Signer, JwtBundle) {
        let signer = Signer::p256();
        let bundle = JwtBundle::new(td(), vec![signer.key("k1")]);
        (signer, bundle)
    }

    #[test]
    fn es256_token_passes() {
        let (signer, bundle) = ec_setup();
        let jwt = validate(&es256("k1", &claims(), &signer), "svc", &bundle, NOW).unwrap();
        assert_eq!(jwt.spiffe_id.as_str(), "spiffe://example.org/workload");
        assert_eq!(jwt.audience, vec!["svc".to_string()]);
        assert_eq!(jwt.expires_at, NOW + 300);
        assert_eq!(jwt.jti.as_deref(), Some("token-1"));
        assert_eq!(jwt.claims.get("iat"), Some(&json!(NOW - 10)));
    }

    #[test]
    fn es384_token_passes() {
        let signer = Signer::p384();
        let key = signer.key("k384");
        assert_eq!(key.default_alg(), "ES384");
        let bundle = JwtBundle::new(td(), vec![key]);
        let t = token(&json!({"alg": "ES384", "kid": "k384"}), &claims(), &signer);
        validate(&t, "svc", &bundle, NOW).unwrap();
    }

    #[test]
    fn rsa_tokens_pass_with_pkcs1_and_pss() {
        let signer = Signer::rsa();
        let key = signer.key("r1");
        assert_eq!(key.default_alg(), "RS256");
        let bundle = JwtBundle::new(td(), vec![key]);
        for alg in ["RS256", "RS512", "PS256"] {
            let t = token(&json!({"alg": alg, "kid": "r1"}), &claims(), &signer);
            let jwt = validate(&t, "svc", &bundle, NOW).unwrap();
            assert_eq!(jwt.spiffe_id.as_str(), "spiffe://example.org/workload", "{alg}");
        }
        // A PKCS#1 signature does not pass as PSS.
        let header = json!({"alg": "RS256", "kid": "r1"});
        let t = token(&header, &claims(), &signer);
        let pss = t.replacen(
            &b64url(header.to_string().as_bytes()),
            &b64url(br#"{"alg":"PS256","kid":"r1"}"#),
            1,
        );
        assert_eq!(validate(&pss, "svc", &bundle, NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn rsa_verify_bytes_are_ring_pkcs1_der() {
        let Signer::Rsa(pair) = Signer::rsa() else { unreachable!() };
        let key = Signer::rsa().key("r1");
        assert_eq!(key.verify_bytes, pair.public_key().as_ref());
    }

    #[test]
    fn der_integers_and_lengths() {
        let mut out = Vec::new();
        der_unsigned_integer(&mut out, &[0x7f]);
        der_unsigned_integer(&mut out, &[0x80]);
        der_unsigned_integer(&mut out, &[0x01, 0x00, 0x01]);
        assert_eq!(out, [0x02, 1, 0x7f, 0x02, 2, 0x00, 0x80, 0x02, 3, 1, 0, 1]);
        let mut len = Vec::new();
        der_length(&mut len, 127);
        der_length(&mut len, 128);
        der_length(&mut len, 257);
        assert_eq!(len, [0x7f, 0x81, 0x80, 0x82, 0x01, 0x01]);
    }

    #[test]
    fn jwk_round_trips_from_spki() {
        for signer in [Signer::p256(), Signer::p384(), Signer::rsa()] {
            let key = signer.key("kid-a");
            let jwk = key.to_jwk();
            assert_eq!(jwk["kid"], "kid-a");
            assert_eq!(jwk["use"], "jwt-svid");
            let again = JwtKey::from_jwk(&jwk).unwrap();
            assert_eq!(again, key);
            assert_eq!(again.to_jwk(), jwk);

            // The key read back from its JWK verifies what the original does.
            let alg = key.default_alg();
            let t = token(&json!({"alg": alg, "kid": "kid-a"}), &claims(), &signer);
            let bundle = JwtBundle::new(td(), vec![again]);
            validate(&t, "svc", &bundle, NOW).unwrap();

            // And through a JWK Set.
            let parsed = JwtBundle::from_jwks(td(), &bundle.to_jwks()).unwrap();
            assert_eq!(parsed, bundle);
            validate(&t, "svc", &parsed, NOW).unwrap();
        }
    }

    #[test]
    fn ec_jwk_fields_have_fixed_width() {
        let key = Signer::p256().key("k");
        let jwk = key.to_jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(b64url_decode(jwk["x"].as_str().unwrap()).unwrap().len(), 32);
        assert_eq!(b64url_decode(jwk["y"].as_str().unwrap()).unwrap().len(), 32);
        let mut short = jwk.clone();
        short["x"] = json!(b64url(&[1; 31]));
        assert!(
            matches!(JwtKey::from_jwk(&short), Err(JwtError::BadKey(m)) if m.contains("31 and 32"))
        );
    }

    #[test]
    fn rsa_jwk_has_no_leading_zeros() {
        let jwk = Signer::rsa().key("r").to_jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["e"], "AQAB");
        let n = b64url_decode(jwk["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256);
        assert_ne!(n[0], 0);
    }

    #[test]
    fn jwk_refusals_name_the_problem() {
        let good = Signer::p256().key("k").to_jwk();
        let with = |field: &str, value: Value| {
            let mut jwk = good.clone();
            jwk[field] = value;
            JwtKey::from_jwk(&jwk).unwrap_err().to_string()
        };
        let without = |field: &str| {
            let mut jwk = good.clone();
            jwk.as_object_mut().unwrap().remove(field);
            JwtKey::from_jwk(&jwk).unwrap_err().to_string()
        };
        assert!(without("kid").contains("no kid"));
        assert!(without("kty").contains("no kty"));
        assert!(with("use", json!("x509-svid")).contains("use \"x509-svid\""));
        assert!(with("crv", json!("P-521")).contains("\"P-521\" is not supported"));
        assert!(with("kty", json!("OKP")).contains("\"OKP\" is not supported"));
        assert!(with("x", json!("a+b/")).contains("JWK x: not base64url"));
        assert!(JwtKey::from_jwk(&json!("k")).is_err());
        let small = json!({"kty": "RSA", "kid": "r", "n": b64url(&[0xc1; 128]), "e": "AQAB"});
        assert!(JwtKey::from_jwk(&small).unwrap_err().to_string().contains("1024 bits"));
    }

    #[test]
    fn spki_refusals() {
        let spki = Signer::p256().spki();
        assert!(JwtKey::from_spki_der("", &spki).is_err());
        assert!(JwtKey::from_spki_der("k", &spki[..40]).is_err());
        let mut trailing = spki.clone();
        trailing.push(0);
        assert!(JwtKey::from_spki_der("k", &trailing)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let mut compressed = P256_SPKI_PREFIX.to_vec();
        compressed[1] -= 32;
        compressed[24] -= 32;
        compressed.push(0x02);
        compressed.extend_from_slice(&[7; 32]);
        assert!(JwtKey::from_spki_der("k", &compressed)
            .unwrap_err()
            .to_string()
            .contains("compressed"));
    }

    #[test]
    fn jwks_skips_x509_keys_and_refuses_bad_sets() {
        let a = Signer::p256().key("a").to_jwk();
        let b = Signer::p256().key("b").to_jwk();
        let x509 = json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["AA=="]});
        let set = json!({"keys": [x509, a, b]}).to_string();
        let bundle = JwtBundle::from_jwks(td(), set.as_bytes()).unwrap();
        assert_eq!(bundle.keys().len(), 2);
        assert!(
            bundle.key("a").is_some() && bundle.key("b").is_some() && bundle.key("c").is_none()
        );
        assert_eq!(bundle.trust_domain(), &td());

        let dup = json!({"keys": [a, a]}).to_string();
        assert_eq!(
            JwtBundle::from_jwks(td(), dup.as_bytes()),
            Err(JwtError::DuplicateKid("a".into()))
        );
        let mut no_kid = b.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        let set = json!({"keys": [a, no_kid]}).to_string();
        let err = JwtBundle::from_jwks(td(), set.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("key 1") && err.contains("no kid"), "{err}");
        assert!(matches!(JwtBundle::from_jwks(td(), b"{\"keys\":"), Err(JwtError::BadBundle(_))));
        assert!(matches!(JwtBundle::from_jwks(td(), b"{}"), Err(JwtError::BadBundle(_))));
        // No use at all (as SPIRE's FetchJWTBundles sends keys): a JWT key.
        let mut no_use = a.clone();
        no_use.as_object_mut().unwrap().remove("use");
        let set = json!({"keys": [no_use]}).to_string();
        assert_eq!(JwtBundle::from_jwks(td(), set.as_bytes()).unwrap().keys().len(), 1);
    }

    #[test]
    fn audience_as_string_or_array() {
        let (signer, bundle) = ec_setup();
        let mut c = claims();
        c["aud"] = json!("svc");
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap().audience,
            ["svc"]
        );
        c["aud"] = json!(["other", "svc"]);
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap().audience,
            ["other", "svc"]
        );
        assert_eq!(
            validate(&es256("k1", &c, &signer), "nope", &bundle, NOW),
            Err(JwtError::AudienceMismatch {
                wanted: "nope".into(),
                got: vec!["other".into(), "svc".into()]
            })
        );
        for (aud, reason) in
            [(json!([]), "empty array"), (json!(["svc", 1]), "non-string"), (json!(5), "neither")]
        {
            c["aud"] = aud;
            let err = validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap_err();
            assert!(
                matches!(&err, JwtError::BadClaim { claim: "aud", reason: r } if r.contains(reason)),
                "{err}"
            );
        }
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::MissingClaim("aud"))
        );
        assert_eq!(
            validate(&es256("k1", &claims(), &signer), "", &bundle, NOW),
            Err(JwtError::EmptyAudience)
        );
    }

    #[test]
    fn forged_signature_is_refused() {
        let (_, bundle) = ec_setup();
        let other = Signer::p256();
        assert_eq!(
            validate(&es256("k1", &claims(), &other), "svc", &bundle, NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn altered_claims_are_refused() {
        let (signer, bundle) = ec_setup();
        let t = es256("k1", &claims(), &signer);
        let (header, rest) = t.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let mut c = claims();
        c["sub"] = json!("spiffe://example.org/admin");
        let altered = format!("{header}.{}.{sig}", b64url(c.to_string().as_bytes()));
        assert_eq!(validate(&altered, "svc", &bundle, NOW), Err(JwtError::BadSignature));
        // So is a signature with one bit flipped.
        let mut raw = b64url_decode(sig).unwrap();
        raw[10] ^= 1;
        let flipped = format!("{header}.{}.{}", rest.split_once('.').unwrap().0, b64url(&raw));
        assert_eq!(validate(&flipped, "svc", &bundle, NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn exp_must_be_after_now() {
        let (signer, bundle) = ec_setup();
        let mut c = claims();
        c["exp"] = json!(NOW);
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::Expired { exp: NOW, now: NOW })
        );
        c["exp"] = json!(NOW + 1);
        validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap();
        c["exp"] = json!(NOW as f64 + 60.5);
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap().expires_at,
            NOW + 60
        );
        c["exp"] = json!("soon");
        assert!(matches!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::BadClaim { claim: "exp", .. })
        ));
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::MissingClaim("exp"))
        );
    }

    #[test]
    fn nbf_in_the_future_is_refused() {
        let (signer, bundle) = ec_setup();
        let mut c = claims();
        c["nbf"] = json!(NOW + 1);
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::NotYetValid { nbf: NOW + 1, now: NOW })
        );
        c["nbf"] = json!(NOW as f64 + 0.5);
        assert!(matches!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::NotYetValid { .. })
        ));
        c["nbf"] = json!(NOW);
        validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap();
    }

    #[test]
    fn kid_must_be_present_and_known() {
        let (signer, bundle) = ec_setup();
        assert_eq!(
            validate(&es256("k2", &claims(), &signer), "svc", &bundle, NOW),
            Err(JwtError::UnknownKid { kid: "k2".into(), trust_domain: "example.org".into() })
        );
        let t = token(&json!({"alg": "ES256"}), &claims(), &signer);
        assert_eq!(validate(&t, "svc", &bundle, NOW), Err(JwtError::MissingKid));
        assert_eq!(UnverifiedJwt::decode(&t).unwrap().kid, None);
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let (_, bundle) = ec_setup();
        let payload = b64url(claims().to_string().as_bytes());
        let none = format!("{}.{payload}.", b64url(br#"{"alg":"none","kid":"k1"}"#));
        assert_eq!(
            validate(&none, "svc", &bundle, NOW),
            Err(JwtError::AlgNotAllowed("none".into()))
        );

        // An HMAC keyed with the public key's bytes: the classic confusion.
        let header = b64url(br#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
        let input = format!("{header}.{payload}");
        let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &bundle.keys()[0].verify_bytes);
        let tag = hmac::sign(&hmac_key, input.as_bytes());
        let hs = format!("{input}.{}", b64url(tag.as_ref()));
        assert_eq!(
            validate(&hs, "svc", &bundle, NOW),
            Err(JwtError::AlgNotAllowed("HS256".into()))
        );
        assert!(UnverifiedJwt::decode(&hs).is_err());

        let es512 = format!("{}.{payload}.AAAA", b64url(br#"{"alg":"ES512","kid":"k1"}"#));
        let err = validate(&es512, "svc", &bundle, NOW).unwrap_err();
        assert_eq!(err, JwtError::UnsupportedAlg("ES512".into()));
        assert!(err.to_string().contains("not supported"));
        let err = UnverifiedJwt::decode(&format!("{}.{payload}.", b64url(br#"{"alg":"EdDSA"}"#)));
        assert!(err.unwrap_err().to_string().contains("\"EdDSA\" is not allowed"));
    }

    #[test]
    fn key_type_must_match_alg() {
        let (_, bundle) = ec_setup();
        let rsa = Signer::rsa();
        let t = token(&json!({"alg": "RS256", "kid": "k1"}), &claims(), &rsa);
        let err = validate(&t, "svc", &bundle, NOW).unwrap_err();
        assert!(
            matches!(&err, JwtError::KeyAlgMismatch { key_type: "EC P-256", alg, .. } if alg == "RS256"),
            "{err}"
        );

        let p384 = Signer::p384();
        let t = token(&json!({"alg": "ES384", "kid": "k1"}), &claims(), &p384);
        assert!(matches!(validate(&t, "svc", &bundle, NOW), Err(JwtError::KeyAlgMismatch { .. })));

        let rsa_bundle = JwtBundle::new(td(), vec![rsa.key("k1")]);
        let t = es256("k1", &claims(), &Signer::p256());
        assert!(matches!(
            validate(&t, "svc", &rsa_bundle, NOW),
            Err(JwtError::KeyAlgMismatch { key_type: "RSA", .. })
        ));
    }

    #[test]
    fn header_allows_only_alg_kid_typ() {
        let (signer, bundle) = ec_setup();
        for typ in ["JWT", "JOSE"] {
            let t = token(&json!({"alg": "ES256", "kid": "k1", "typ": typ}), &claims(), &signer);
            validate(&t, "svc", &bundle, NOW).unwrap();
        }
        let t = token(&json!({"alg": "ES256", "kid": "k1", "typ": "foo"}), &claims(), &signer);
        assert_eq!(validate(&t, "svc", &bundle, NOW), Err(JwtError::BadTyp("foo".into())));
        for extra in ["crit", "jku", "x5u", "cty"] {
            let mut header = json!({"alg": "ES256", "kid": "k1"});
            header[extra] = json!("x");
            let t = token(&header, &claims(), &signer);
            assert_eq!(validate(&t, "svc", &bundle, NOW), Err(JwtError::HeaderField(extra.into())));
        }
    }

    #[test]
    fn sub_must_be_a_spiffe_id_of_the_bundles_trust_domain() {
        let (signer, bundle) = ec_setup();
        let mut c = claims();
        c["sub"] = json!("spiffe://other.org/workload");
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::WrongTrustDomain {
                subject: "spiffe://other.org/workload".into(),
                expected: "example.org".into()
            })
        );
        c["sub"] = json!("user@example.org");
        assert!(matches!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::BadSubject(_))
        ));
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            validate(&es256("k1", &c, &signer), "svc", &bundle, NOW),
            Err(JwtError::MissingClaim("sub"))
        );
    }

    #[test]
    fn decode_reads_without_verifying() {
        let t = es256("k1", &claims(), &Signer::p256());
        let jwt = UnverifiedJwt::decode(&t).unwrap();
        assert_eq!(jwt.alg, "ES256");
        assert_eq!(jwt.kid.as_deref(), Some("k1"));
        assert_eq!(jwt.jti(), Some("token-1"));
        assert_eq!(jwt.expires_at(), Some(NOW + 300));
    }

    #[test]
    fn oversized_and_malformed_tokens_are_refused() {
        let big = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(UnverifiedJwt::decode(&big).unwrap_err(), JwtError::TooLarge(MAX_TOKEN_LEN + 1));
        let t = es256("k1", &claims(), &Signer::p256());
        assert!(matches!(UnverifiedJwt::decode(&format!("{t}.x")), Err(JwtError::Malformed(_))));
        let padded = t.replacen('.', "=.", 1);
        assert!(matches!(UnverifiedJwt::decode(&padded), Err(JwtError::Malformed(_))));
        assert!(b64url_decode("YQ==").is_err());
        assert_eq!(b64url_decode("YQ").unwrap(), b"a");
    }

    #[test]
    fn every_truncation_is_refused_without_panic() {
        let (signer, bundle) = ec_setup();
        let t = es256("k1", &claims(), &signer);
        for cut in 0..t.len() {
            let err = validate(&t[..cut], "svc", &bundle, NOW).unwrap_err();
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn bundle_document_holds_both_kinds_of_key() {
        use rcgen::{
            BasicConstraints, CertificateParams, IsCa, KeyPair as RcKeyPair, PublicKeyData,
            PKCS_ECDSA_P256_SHA256,
        };
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = RcKeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = params.self_signed(&ca_key).unwrap().der().to_vec();
        let jwt_bundle =
            JwtBundle::new(td(), vec![Signer::p256().key("j1"), Signer::rsa().key("j2")]);

        let doc = spiffe_bundle_document(std::slice::from_ref(&ca), &jwt_bundle, 7, 300).unwrap();
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        let x509 = &keys[0];
        assert_eq!(x509["use"], "x509-svid");
        assert!(x509.get("kid").is_none());
        assert_eq!(x509["kty"], "EC");
        assert_eq!(x509["x5c"], json!([STANDARD.encode(&ca)]));
        // The JWK is the certificate's key.
        let cert_key =
            JwtKey::from_spki_der("x", &ca_key.subject_public_key_info()).unwrap().to_jwk();
        assert_eq!((&x509["x"], &x509["y"]), (&cert_key["x"], &cert_key["y"]));
        assert_eq!(keys[1]["kid"], "j1");
        assert_eq!(keys[2]["kid"], "j2");
        assert!(keys[1..].iter().all(|k| k["use"] == "jwt-svid"));

        // The whole document reads back as the JWT bundle.
        let parsed = JwtBundle::from_jwks(td(), doc.to_string().as_bytes()).unwrap();
        assert_eq!(parsed, jwt_bundle);

        let err = spiffe_bundle_document(&[ca, vec![0x30, 0x03]], &jwt_bundle, 1, 1).unwrap_err();
        assert!(matches!(err, JwtError::BadAuthority { index: 1, .. }));
    }

    #[test]
    fn errors_are_one_line_and_cut() {
        let long_alg = "X\n".repeat(500);
        let header = b64url(json!({"alg": long_alg}).to_string().as_bytes());
        let err = UnverifiedJwt::decode(&format!("{header}.e30.")).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'));
        assert!(text.len() < 400, "{text}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in any::<String>()) {
            let (_, bundle) = ec_setup();
            if let Err(e) = validate(&s, "svc", &bundle, NOW) {
                prop_assert!(!e.to_string().contains('\n'));
            }
            let _ = UnverifiedJwt::decode(&s);
            let _ = b64url_decode(&s);
            let _ = JwtBundle::from_jwks(td(), s.as_bytes());
            let _ = JwtKey::from_spki_der("k", s.as_bytes());
        }

        #[test]
        fn random_parts_never_panic(
            header in proptest::collection::vec(any::<u8>(), 0..64),
            claims in proptest::collection::vec(any::<u8>(), 0..64),
            signature in proptest::collection::vec(any::<u8>(), 0..100),
            alg in prop::sample::select(vec!["ES256", "ES384", "RS256", "PS512", "none", "HS256"]),
        ) {
            let (_, bundle) = ec_setup();
            let rsa_bundle = JwtBundle::new(td(), vec![Signer::rsa().key("k1")]);
            let json_header = json!({"alg": alg, "kid": "k1"}).to_string();
            for h in [b64url(&header), b64url(json_header.as_bytes())] {
                let t = format!("{h}.{}.{}", b64url(&claims), b64url(&signature));
                for b in [&bundle, &rsa_bundle] {
                    if let Err(e) = validate(&t, "svc", b, NOW) {
                        prop_assert!(!e.to_string().contains('\n'));
                    }
                }
            }
        }

        #[test]
        fn random_jwks_never_panic(n in proptest::collection::vec(any::<u8>(), 0..300), x in proptest::collection::vec(any::<u8>(), 0..50)) {
            let _ = JwtKey::from_jwk(&json!({"kty": "RSA", "kid": "k", "n": b64url(&n), "e": b64url(&x)}));
            let _ = JwtKey::from_jwk(&json!({"kty": "EC", "crv": "P-256", "kid": "k", "x": b64url(&x), "y": b64url(&x)}));
        }
    }

    /// Issue 19 (11): `(r, n - s)` verifies as well as `(r, s)`; only the
    /// low-s form is accepted, so a token has one string.
    #[test]
    fn only_low_s_ecdsa_signatures_are_accepted() {
        for (signer, alg) in [(Signer::p256(), "ES256"), (Signer::p384(), "ES384")] {
            let bundle = JwtBundle::new(td(), vec![signer.key("k")]);
            let header = json!({"alg": alg, "kid": "k", "typ": "JWT"});
            let claims = json!({"sub": "spiffe://example.org/w", "aud": ["svc"], "exp": NOW + 60});
            let token = token(&header, &claims, &signer);
            assert!(validate(&token, "svc", &bundle, NOW).is_ok());
            let (input, sig) = token.rsplit_once('.').unwrap();
            let mut sig = b64url_decode(sig).unwrap();
            assert!(ecdsa_is_low_s(&sig));
            negate_s(&mut sig);
            assert!(!ecdsa_is_low_s(&sig));
            let twin = format!("{input}.{}", b64url(&sig));
            assert_eq!(validate(&twin, "svc", &bundle, NOW), Err(JwtError::HighS));
            ecdsa_to_low_s(&mut sig);
            assert_eq!(format!("{input}.{}", b64url(&sig)), token);
        }
    }
}
