//! JWT bundles: the keys of a trust domain, and the SPIFFE bundle
//! document (JWKS) they are read from and written to.

use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;

use super::error::*;
use super::keys::*;
use crate::spiffe_id::TrustDomain;

/// A trust domain's JWT authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) keys: Vec<JwtKey>,
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
