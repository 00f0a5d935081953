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
//!
//! The module: `mod.rs` (decoding and validating a token, the audience
//! rules), `keys.rs` (verification keys), `bundle.rs` (JWT bundles and the
//! bundle document), `error.rs`. `error` depends on nothing here, `keys`
//! on `error`, `bundle` on both, `mod.rs` on all.

mod bundle;
mod error;
mod keys;

pub use bundle::{spiffe_bundle_document, JwtBundle};
pub use error::JwtError;
pub use keys::{b64url, b64url_decode, ecdsa_is_low_s, ecdsa_to_low_s, JwtKey};

use serde_json::{Map, Value};

use crate::spiffe_id::SpiffeId;
use error::*;
use keys::*;

/// Longest token accepted, in bytes (16 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Header fields a JWT-SVID may carry.
const HEADER_FIELDS: [&str; 3] = ["alg", "kid", "typ"];

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

#[cfg(test)]
mod tests;
