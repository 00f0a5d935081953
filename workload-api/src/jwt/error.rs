//! Why a JWT-SVID, a JWT key or a JWT bundle is refused.

/// Longest piece of caller- or token-supplied text an error repeats, in
/// characters; the rest is cut (a 16 KiB `alg` makes no better message).
pub(crate) const MAX_ECHO_CHARS: usize = 100;

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

/// Input text as errors repeat it: at most 100 characters.
pub(crate) fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// A library's error text on one line.
pub(crate) fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
