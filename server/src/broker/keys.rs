//! The broker's signing keys: ES256 keys (PKCS#8, 0600) in
//! `<data_dir>/broker/`, one made every `key_rotation`; tokens are signed
//! with the newest, and a key stays published until the last token it
//! could have signed has expired. Each server publishes its keys to the
//! store, so the JWKS of any server (and introspection on any server)
//! knows the keys of all of them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;
use tessera_workload_api::jwt::JwtKey;

use super::error::BrokerError;
use super::records::PublishedKey;
use crate::ca::jwt::{JwtKeyType, JwtSigningKey};

/// The `typ` of every access token (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

struct Current {
    key: Arc<JwtSigningKey>,
    /// Its public half, as `verify` and the JWKS use it.
    public: Option<Public>,
    created_at: i64,
}

/// A key's public half, decoded once: its JWK form and its EC point.
#[derive(Debug, Clone)]
struct Public {
    kid: String,
    jwk: JwtKey,
    /// The uncompressed P-256 point `ring` verifies with.
    point: Vec<u8>,
}

impl Public {
    /// From a kid and a SubjectPublicKeyInfo DER (`None` unless P-256).
    fn of(kid: &str, spki_der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::FromDer;
        let jwk = JwtKey::from_spki_der(kid, spki_der).ok()?;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).ok()?;
        let point = spki.subject_public_key.data.to_vec();
        (jwk.default_alg() == "ES256" && point.len() == 65 && point[0] == 4).then(|| Self {
            kid: kid.to_string(),
            jwk,
            point,
        })
    }
}

impl Current {
    fn new(key: JwtSigningKey, created_at: i64) -> Self {
        let public = Public::of(key.kid(), key.spki_der());
        Self { key: Arc::new(key), public, created_at }
    }
}

/// This server's broker keys, and the keys of every server (for the JWKS
/// and for verifying tokens at introspection).
pub struct BrokerKeys {
    dir: PathBuf,
    rotation: i64,
    /// How long after its last use a key stays published (the longest token lifetime).
    overlap: i64,
    current: RwLock<Current>,
    /// Every server's published keys, as verification keys.
    published: RwLock<Vec<Public>>,
}

impl std::fmt::Debug for BrokerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerKeys").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn key_path(dir: &Path, created_at: i64) -> PathBuf {
    dir.join(format!("key-{created_at:012}.pem"))
}

/// Keys on disk, newest first: (created_at, path).
fn on_disk(dir: &Path) -> std::io::Result<Vec<(i64, PathBuf)>> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(stamp) = name.strip_prefix("key-").and_then(|n| n.strip_suffix(".pem")) {
            if let Ok(at) = stamp.parse::<i64>() {
                keys.push((at, path));
            }
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.0));
    Ok(keys)
}

impl BrokerKeys {
    /// Loads the newest key in `<data_dir>/broker`, or makes one.
    pub fn open(
        data_dir: &Path,
        rotation: u64,
        overlap: u32,
        now: i64,
    ) -> Result<Self, BrokerError> {
        let dir = data_dir.join("broker");
        crate::fsutil::create_private_dir(&dir)
            .map_err(|e| BrokerError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let rotation = i64::try_from(rotation).unwrap_or(i64::MAX / 4);
        let existing = on_disk(&dir)
            .map_err(|e| BrokerError::Internal(format!("cannot read {}: {e}", dir.display())))?;
        let (created_at, key) = match existing.first() {
            Some((at, path)) if now < at + rotation => (*at, load(path)?),
            _ => (now, create(&dir, now)?),
        };
        let keys = Self {
            dir,
            rotation,
            overlap: i64::from(overlap) + 60,
            current: RwLock::new(Current::new(key, created_at)),
            published: RwLock::new(Vec::new()),
        };
        Ok(keys)
    }

    /// The key new tokens are signed with.
    pub fn signer(&self) -> Arc<JwtSigningKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).key.clone()
    }

    /// Makes a new key if the current one is due; true if it did.
    pub fn rotate_if_due(&self, now: i64) -> Result<bool, BrokerError> {
        let due = {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            now >= current.created_at + self.rotation
        };
        if !due {
            return Ok(false);
        }
        let key = create(&self.dir, now)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current::new(key, now);
        // Keys whose every token has expired are removed from disk.
        if let Ok(keys) = on_disk(&self.dir) {
            for (i, (at, path)) in keys.iter().enumerate() {
                let successor = if i == 0 { None } else { Some(keys[i - 1].0) };
                if successor.is_some_and(|next| next + self.overlap < now) && *at < now {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(true)
    }

    /// This server's keys as published: each until its successor was made
    /// plus the longest token lifetime.
    pub fn own(&self) -> Result<Vec<PublishedKey>, BrokerError> {
        let keys = on_disk(&self.dir).map_err(|e| {
            BrokerError::Internal(format!("cannot read {}: {e}", self.dir.display()))
        })?;
        let mut out = Vec::new();
        let mut successor: Option<i64> = None;
        for (at, path) in keys {
            let key = load(&path)?;
            out.push(PublishedKey {
                kid: key.kid().to_string(),
                alg: key.alg().to_string(),
                public_key_der_b64: STANDARD.encode(key.spki_der()),
                expires_at: successor.map_or(i64::MAX, |next| next + self.overlap),
            });
            successor = Some(at);
        }
        Ok(out)
    }

    /// Replaces the keys known of every server (from the store).
    pub fn set_published(&self, keys: Vec<PublishedKey>, now: i64) {
        let mut parsed: Vec<Public> = keys
            .into_iter()
            .filter(|k| k.expires_at > now)
            .filter_map(|k| Public::of(&k.kid, &STANDARD.decode(&k.public_key_der_b64).ok()?))
            .collect();
        parsed.sort_by(|a, b| a.kid.cmp(&b.kid));
        parsed.dedup_by(|a, b| a.kid == b.kid);
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = parsed;
    }

    /// The EC point of the key with this kid (this server's current key
    /// always, others once published).
    fn point(&self, kid: &str) -> Option<Vec<u8>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        if let Some(public) = current.public.as_ref().filter(|p| p.kid == kid) {
            return Some(public.point.clone());
        }
        let published = self.published.read().unwrap_or_else(|e| e.into_inner());
        published.iter().find(|p| p.kid == kid).map(|p| p.point.clone())
    }

    /// The JWKS document (RFC 7517) of every published key.
    pub fn jwks(&self) -> Value {
        let mut keys: Vec<Value> = Vec::new();
        let mut kids = Vec::new();
        if let Some(public) = &self.current.read().unwrap_or_else(|e| e.into_inner()).public {
            keys.push(access_token_jwk(&public.jwk));
            kids.push(public.kid.clone());
        }
        for public in self.published.read().unwrap_or_else(|e| e.into_inner()).iter() {
            if !kids.contains(&public.kid) {
                keys.push(access_token_jwk(&public.jwk));
            }
        }
        serde_json::json!({ "keys": keys })
    }
}

/// A JWK for access tokens: `use: sig`, `alg` named.
fn access_token_jwk(key: &JwtKey) -> Value {
    let mut jwk = key.to_jwk();
    jwk["use"] = "sig".into();
    jwk["alg"] = key.default_alg().into();
    jwk
}

/// A JWK for JWT-SVIDs in an OIDC discovery document's JWKS (`use: sig`,
/// `alg` named, which OIDC libraries look for).
pub fn jwt_svid_jwk(key: &JwtKey) -> Value {
    access_token_jwk(key)
}

fn load(path: &Path) -> Result<JwtSigningKey, BrokerError> {
    JwtSigningKey::load_or_create(path, JwtKeyType::EcP256)
        .map(|k| k.with_typ(ACCESS_TOKEN_TYP))
        .map_err(|e| BrokerError::Internal(format!("broker key {}: {e}", path.display())))
}

fn create(dir: &Path, now: i64) -> Result<JwtSigningKey, BrokerError> {
    let path = key_path(dir, now);
    JwtSigningKey::create(&path, JwtKeyType::EcP256)
        .map(|k| k.with_typ(ACCESS_TOKEN_TYP))
        .map_err(|e| BrokerError::Internal(format!("broker key {}: {e}", path.display())))
}

/// Why an access token did not verify: a kid this server has not seen
/// (read every server's keys and try again), or anything else (the token
/// is not one of ours, or not intact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// Signed with a key not known here (yet).
    UnknownKid,
    /// Not an intact access token of this broker: why.
    Invalid(&'static str),
}

impl BrokerKeys {
    /// Checks an access token's signature and header (`typ: at+jwt`,
    /// ES256, a known kid) and returns its claims. Expiry and revocation
    /// are the caller's to check.
    pub fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, Unverified> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use Unverified::Invalid;
        if token.len() > tessera_workload_api::jwt::MAX_TOKEN_LEN {
            return Err(Invalid("token too large"));
        }
        let (signing_input, signature) = token.rsplit_once('.').ok_or(Invalid("not a JWS"))?;
        let (header, claims) = signing_input.split_once('.').ok_or(Invalid("not a JWS"))?;
        let object = |part: &str| -> Result<serde_json::Map<String, Value>, Unverified> {
            let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| Invalid("not base64url"))?;
            match serde_json::from_slice(&bytes) {
                Ok(Value::Object(map)) => Ok(map),
                _ => Err(Invalid("not a JSON object")),
            }
        };
        let header = object(header)?;
        if header.get("typ").and_then(Value::as_str) != Some(ACCESS_TOKEN_TYP) {
            return Err(Invalid("not an access token (typ is not at+jwt)"));
        }
        if header.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err(Invalid("alg is not ES256"));
        }
        let kid = header.get("kid").and_then(Value::as_str).ok_or(Invalid("no kid"))?;
        let point = self.point(kid).ok_or(Unverified::UnknownKid)?;
        let signature =
            URL_SAFE_NO_PAD.decode(signature).map_err(|_| Invalid("signature not base64url"))?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| Invalid("bad signature"))?;
        object(claims)
    }
}
