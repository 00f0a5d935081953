//! JWT-SVID signing keys: one per CA generation (so they are prepared,
//! activated and retired on the CA's schedule), private PKCS#8 files (0600)
//! beside the CA's, never sent anywhere. Tokens follow the SPIFFE JWT-SVID
//! standard: header `alg`, `kid`, `typ: JWT`; claims `sub`, `aud`, `exp`,
//! `iat`, `jti`, and `iss` when the server is configured with a JWT-SVID
//! issuer (the broker's OIDC discovery for JWT-SVIDs).

use std::fmt;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};

use crate::fsutil::write_private;

/// The kind of key new JWT signing keys are (config `jwt_key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtKeyType {
    /// ECDSA P-256, tokens signed ES256 (the default).
    #[default]
    EcP256,
    /// RSA 2048, tokens signed RS256, for relying parties that need RSA.
    Rsa2048,
}

impl std::str::FromStr for JwtKeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "rsa-2048" => Ok(Self::Rsa2048),
            other => Err(format!("unknown JWT key type {other:?}: want ec-p256 or rsa-2048")),
        }
    }
}

/// JWT key errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtKeyError {
    /// Generating a key failed.
    #[error("JWT key generation failed: {0}")]
    Generate(String),
    /// A stored key does not parse.
    #[error("JWT key is unusable: {0}")]
    Corrupt(String),
    /// Writing the key file failed.
    #[error("JWT key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The signature could not be made.
    #[error("JWT signing failed")]
    Sign,
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// One JWT signing key.
pub struct JwtSigningKey {
    kid: String,
    /// The encoded header (the same for every token this key signs), with
    /// the '.' that follows it.
    header: String,
    signer: Signer,
    spki_der: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigningKey").field("kid", &self.kid).field("alg", &self.alg()).finish()
    }
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct SignedJwt {
    /// JWS compact serialization.
    pub token: String,
    /// Its unique `jti`.
    pub jti: String,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
}

impl JwtSigningKey {
    /// Loads the key in `path` (PKCS#8 PEM), or generates one of `kind` and
    /// stores it there (mode 0600).
    pub fn load_or_create(path: &Path, kind: JwtKeyType) -> Result<Self, JwtKeyError> {
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|source| JwtKeyError::Io { path: path.display().to_string(), source })?;
            let pem = pem::parse(text).map_err(|e| JwtKeyError::Corrupt(e.to_string()))?;
            return Self::from_pkcs8(pem.contents());
        }
        Self::create(path, kind)
    }

    /// Generates a key of `kind` and stores it in `path` (mode 0600),
    /// replacing whatever was there.
    pub fn create(path: &Path, kind: JwtKeyType) -> Result<Self, JwtKeyError> {
        let pkcs8 = generate(kind)?;
        let key = Self::from_pkcs8(&pkcs8)?;
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
        write_private(path, pem.as_bytes())
            .map_err(|source| JwtKeyError::Io { path: path.display().to_string(), source })?;
        Ok(key)
    }

    /// A key from its PKCS#8 DER (ECDSA P-256 or RSA).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtKeyError> {
        let rng = SystemRandom::new();
        let (signer, spki_der) =
            match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
                Ok(pair) => {
                    let spki = ec_p256_spki(pair.public_key().as_ref());
                    (Signer::Ec(pair), spki)
                }
                Err(_) => {
                    let pair = RsaKeyPair::from_pkcs8(der).map_err(|e| {
                        JwtKeyError::Corrupt(format!("not a P-256 or RSA key: {e}"))
                    })?;
                    let spki = rsa_spki(pair.public().as_ref());
                    (Signer::Rsa(pair), spki)
                }
            };
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki_der);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24]);
        let alg = match signer {
            Signer::Ec(_) => "ES256",
            Signer::Rsa(_) => "RS256",
        };
        let header = serde_json::json!({ "alg": alg, "kid": kid, "typ": "JWT" });
        let header = format!("{}.", URL_SAFE_NO_PAD.encode(header.to_string()));
        Ok(Self { kid, header, signer, spki_der, rng })
    }

    /// The key ID tokens carry in their header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWS algorithm.
    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Ec(_) => "ES256",
            Signer::Rsa(_) => "RS256",
        }
    }

    /// The public key, SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The same key, signing tokens whose header says `typ` (the broker's
    /// access tokens say `at+jwt`, so that one can never pass as the other).
    pub fn with_typ(mut self, typ: &str) -> Self {
        let header = serde_json::json!({ "alg": self.alg(), "kid": self.kid, "typ": typ });
        self.header = format!("{}.", URL_SAFE_NO_PAD.encode(header.to_string()));
        self
    }

    /// Signs a JWT-SVID for `subject` with `audience`, valid from `now`
    /// until `expires_at`, with an `iss` claim when `issuer` is given.
    pub fn sign(
        &self,
        subject: &str,
        audience: &[String],
        now: i64,
        expires_at: i64,
        issuer: Option<&str>,
    ) -> Result<SignedJwt, JwtKeyError> {
        let jti = new_jti(now);
        // Written by hand (strings escaped by serde_json, straight into the
        // claims): this runs once per token, and a JSON tree would cost
        // more than the rest.
        let mut claims = Vec::with_capacity(160 + subject.len());
        claims.push(b'{');
        if let Some(issuer) = issuer {
            claims.extend_from_slice(b"\"iss\":");
            json_string(&mut claims, issuer);
            claims.push(b',');
        }
        claims.extend_from_slice(b"\"sub\":");
        json_string(&mut claims, subject);
        claims.extend_from_slice(b",\"aud\":[");
        for (i, audience) in audience.iter().enumerate() {
            if i > 0 {
                claims.push(b',');
            }
            json_string(&mut claims, audience);
        }
        // Numbers and hex: nothing to escape. Writing to a Vec cannot fail.
        let _ = write!(claims, "],\"exp\":{expires_at},\"iat\":{now},\"jti\":\"{jti}\"}}");
        let token = self.sign_payload(&claims)?;
        Ok(SignedJwt { token, jti, issued_at: now, expires_at })
    }

    /// Signs `claims` (a serialized JSON object) under this key's header:
    /// the JWS compact serialization.
    pub fn sign_claims(&self, claims: &str) -> Result<String, JwtKeyError> {
        self.sign_payload(claims.as_bytes())
    }

    /// Signs the JWS payload `claims` (serialized JSON) under this key's
    /// header: the JWS compact serialization.
    fn sign_payload(&self, claims: &[u8]) -> Result<String, JwtKeyError> {
        // Room for an ES256 signature's 86 characters; RS256 grows it once.
        let mut token = String::with_capacity(self.header.len() + claims.len() * 4 / 3 + 96);
        token.push_str(&self.header);
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        match &self.signer {
            Signer::Ec(pair) => {
                let signed =
                    pair.sign(&self.rng, token.as_bytes()).map_err(|_| JwtKeyError::Sign)?;
                // r || s, at most P-384's 96 bytes, rewritten on the stack.
                let mut buf = [0u8; 96];
                let sig = buf.get_mut(..signed.as_ref().len()).ok_or(JwtKeyError::Sign)?;
                sig.copy_from_slice(signed.as_ref());
                tessera_workload_api::jwt::ecdsa_to_low_s(sig);
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(&*sig, &mut token);
            }
            Signer::Rsa(pair) => {
                let mut sig = vec![0u8; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &self.rng, token.as_bytes(), &mut sig)
                    .map_err(|_| JwtKeyError::Sign)?;
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(&sig, &mut token);
            }
        }
        Ok(token)
    }
}

/// A unique `jti`: a strictly increasing 64-bit issuance stamp (in
/// microseconds from `now_secs`, the injected clock's time, then counting
/// up) and 64 random bits, in hex. Increasing IDs make the server's
/// issuance records append at the end of their tree instead of landing
/// anywhere.
fn new_jti(now_secs: i64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(now_secs).unwrap_or(0).saturating_mul(1_000_000);
    let stamp = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)))
        .map_or(now, |last| now.max(last + 1));
    // Without an entropy source, clock bits: the stamp alone is still
    // unique on this server.
    let mut random = [0u8; 8];
    super::serial::random_or_clock(&mut random);
    let mut jti = String::with_capacity(32);
    let _ = write!(jti, "{stamp:016x}{:016x}", u64::from_be_bytes(random));
    jti
}

/// Appends `s` to `out` as a JSON string literal.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

fn generate(kind: JwtKeyType) -> Result<Vec<u8>, JwtKeyError> {
    match kind {
        JwtKeyType::EcP256 => {
            let doc = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|e| JwtKeyError::Generate(e.to_string()))?;
            Ok(doc.as_ref().to_vec())
        }
        JwtKeyType::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| JwtKeyError::Generate(e.to_string()))?;
            let doc = key.to_pkcs8_der().map_err(|e| JwtKeyError::Generate(e.to_string()))?;
            Ok(doc.as_bytes().to_vec())
        }
    }
}

/// SubjectPublicKeyInfo of a P-256 public key (uncompressed point).
fn ec_p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// SubjectPublicKeyInfo of an RSA public key (PKCS#1 RSAPublicKey DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALGORITHM: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = ALGORITHM.to_vec();
    body.extend(der_tlv(0x03, &bits));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo};

    fn parts(token: &str) -> Vec<serde_json::Value> {
        token
            .split('.')
            .take(2)
            .map(|p| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn es256_tokens_verify_with_the_published_key_and_carry_only_standard_claims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key.pem");
        let key = JwtSigningKey::load_or_create(&path, JwtKeyType::EcP256).unwrap();
        let signed =
            key.sign("spiffe://example.org/w", &["db".to_string()], 1000, 1300, None).unwrap();
        let p = parts(&signed.token);
        assert_eq!(p[0], serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"}));
        let claims = p[1].as_object().unwrap();
        let mut names: Vec<&str> = claims.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["aud", "exp", "iat", "jti", "sub"]);
        let (signing_input, sig) = signed.token.rsplit_once('.').unwrap();
        let (_, spki) = SubjectPublicKeyInfo::from_der(key.spki_der()).unwrap();
        let point = spki.subject_public_key.data.to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signing_input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        // The key survives a restart, with the same kid; its file is 0600.
        let again = JwtSigningKey::load_or_create(&path, JwtKeyType::Rsa2048).unwrap();
        assert_eq!(again.kid(), key.kid());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn rs256_keys_sign_verifiable_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let key =
            JwtSigningKey::load_or_create(&dir.path().join("k.pem"), JwtKeyType::Rsa2048).unwrap();
        assert_eq!(key.alg(), "RS256");
        let signed = key.sign("spiffe://example.org/w", &["a".into()], 1, 2, None).unwrap();
        let (signing_input, sig) = signed.token.rsplit_once('.').unwrap();
        let (_, spki) = SubjectPublicKeyInfo::from_der(key.spki_der()).unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            spki.subject_public_key.data.to_vec(),
        )
        .verify(signing_input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
        .unwrap();
    }
}
