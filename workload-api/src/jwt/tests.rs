use super::bundle::*;
use super::error::*;
use super::keys::*;
use super::*;
use crate::spiffe_id::TrustDomain;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use proptest::prelude::*;
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512, RSA_PSS_SHA256,
};
use serde_json::json;
use serde_json::Value;

/// A 2048-bit RSA test key, PKCS#8 DER in base64 (made with
/// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` and
/// `openssl pkcs8 -topk8 -nocrypt`).
const RSA_PKCS8: &str = "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC84ENc3OI55vTjttwkYSl7Jb60JAd+TxlOWyjv2mdP+UWf39eDFRmV4MR1uDAooBmCg+IYX1gLDpQQxIoRaZhSrHcDavZrk1cZYPe+iItccxWxZaAITWBYtOiis4brNbf+JaveaayeJL5eYyZyx4ywQub80fG5HYyrx/Y7mFy2WOPdgCJJECUDWMeKOgeAbBizpm5BGNOHtfV6+09GDnQZoChWAcsfOA04aLr1tBPKUWvXE4Vkz03rvEU30fp9/XRu2kd9oOWvbZDBrX/0F2EV2IArqheae6Ns2EhpF7JglM/0iTsAtYWOYM8nlNs1KohiJmgQAYskzHJMwag9NSlpAgMBAAECggEAIjvJqd61OEZ2s4FUxFlCAfqU5qSzIP8oOI4ITPT6jcHCD1isgKtF4GcFZMrWG77s8L2DsOQzGonxZ1qgJcjMXYu55IoyEMx7WHO9Y7DvBXosf+NKDscrg9iCY98DQMWTTEK6tIzVxzIkuQnikaI+i0INCNzqoaFL+mS7ahDTGQ+SwZtWnWv7Z1IKI/RKMbmU6v8Iv33cVMeENbgpA1P2OOE7aQZ45HLmow0ndqqddKf+DWVoJPbwLLFJC101Cq2woSmGN8sFQu0w2aSAFRyxPM/ljMKiDahzci69LbXE0Nwk1pBx5mHhFVQwTKLzsE6Lzc+zVYrZABZNAwufb/LmOwKBgQDey04nz770UEGflbVqsgNzyE4Rqjdfi2VWTLVq6JJd90UWQFhMm08bXn+qu7xGREiJ70lnIVw69eyb7Zt5ISRV/lePCenZBIoa04CkvlA0IZek9Xf4kBj+I68/s9RgaKEnUBzDVYLM+S96mo7l6iH9oYb1yRMRqCFFklTlHju1YwKBgQDZBtBgoiT7IzEoqp6JLCmtpWENbhTNrhuP6AoSG8vQuFg9u1IPtbAL+8W6s/g1rSQefT1U9sy29vGJA2OdXxLe0pEb10RqaDhIFUMdOxWl4/ff/iWlnOdFh4bGg3rj6a9/a6PbDrIR4Iqzppw9qFizWQvIadHPYc8Wllr+Sgm1wwKBgH1MpeXqBqDsyhtwXRlmiF6DlrSEoKPRh+qjNZystDS4rlg3U/GxnynrWa2x688w9ALvWr7vmilmye1gEoJrSz45zxCZKLVuwiUYMk904TKQefLCQvi+QfAcLaGMB7M45PlxKtwIqYmR00wGxLs1lGxKfdaZgWn6vsub4rcA69+1AoGAHswMvenEfa7cxvyPSr/tmiqhvxoj8ZwHZUB0TWWMYq4GN5xhZMFPniO4R2pKirNrMLhs/6WWH1CjreHBPQ/EycHvvZeqqb7oXbJGt9sukz/qaOrTxNCjMQauZXU69ySuNtK7idZoBolqpVu7SDSfgbPdLC94ConCrV3gw70V66kCgYBHWuYOV6hAW1/z2RXwXGyBUjZVQEA+NVR7o+/PLJk1bsJ7ChCLbYtagI3Wuna6TyTOKV2GLG6fbrsSMAVLnxSoBAmNp+X8Qi9Z0CjbsOpk6C0KoFn1pAJZzU8BG9jkBDkivDHvaGa7PHMRbh4sWE1N46LyeguW43OaIz3KhD3cPQ==";

/// The SubjectPublicKeyInfo DER of [`RSA_PKCS8`] (`openssl pkey -pubout`).
const RSA_SPKI: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvOBDXNziOeb047bcJGEpeyW+tCQHfk8ZTlso79pnT/lFn9/XgxUZleDEdbgwKKAZgoPiGF9YCw6UEMSKEWmYUqx3A2r2a5NXGWD3voiLXHMVsWWgCE1gWLToorOG6zW3/iWr3mmsniS+XmMmcseMsELm/NHxuR2Mq8f2O5hctljj3YAiSRAlA1jHijoHgGwYs6ZuQRjTh7X1evtPRg50GaAoVgHLHzgNOGi69bQTylFr1xOFZM9N67xFN9H6ff10btpHfaDlr22Qwa1/9BdhFdiAK6oXmnujbNhIaReyYJTP9Ik7ALWFjmDPJ5TbNSqIYiZoEAGLJMxyTMGoPTUpaQIDAQAB";

/// SPKI DER prefixes of EC keys (AlgorithmIdentifier and BIT STRING
/// header); the uncompressed point follows.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
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
                let prefix = if point.len() == 65 { P256_SPKI_PREFIX } else { P384_SPKI_PREFIX };
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
    assert!(JwtKey::from_spki_der("k", &trailing).unwrap_err().to_string().contains("trailing"));
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
    assert!(bundle.key("a").is_some() && bundle.key("b").is_some() && bundle.key("c").is_none());
    assert_eq!(bundle.trust_domain(), &td());

    let dup = json!({"keys": [a, a]}).to_string();
    assert_eq!(JwtBundle::from_jwks(td(), dup.as_bytes()), Err(JwtError::DuplicateKid("a".into())));
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
    assert_eq!(validate(&es256("k1", &c, &signer), "svc", &bundle, NOW).unwrap().audience, ["svc"]);
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
    assert_eq!(validate(&none, "svc", &bundle, NOW), Err(JwtError::AlgNotAllowed("none".into())));

    // An HMAC keyed with the public key's bytes: the classic confusion.
    let header = b64url(br#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
    let input = format!("{header}.{payload}");
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &bundle.keys()[0].verify_bytes);
    let tag = hmac::sign(&hmac_key, input.as_bytes());
    let hs = format!("{input}.{}", b64url(tag.as_ref()));
    assert_eq!(validate(&hs, "svc", &bundle, NOW), Err(JwtError::AlgNotAllowed("HS256".into())));
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
    let jwt_bundle = JwtBundle::new(td(), vec![Signer::p256().key("j1"), Signer::rsa().key("j2")]);

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
    let cert_key = JwtKey::from_spki_der("x", &ca_key.subject_public_key_info()).unwrap().to_jwk();
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
