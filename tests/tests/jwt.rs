//! JWT-SVIDs end to end, against a real server and agents on real sockets:
//! the `spiffe` crate's JWT APIs (`WorkloadApiClient`, `JwtSource`,
//! `JwtSvid::parse_and_validate`), an independent JWT library
//! (`jsonwebtoken`) with the JWKS the agent serves, the refusals
//! `ValidateJWTSVID` must make, the audience policy (agent and server),
//! revocation pushed to a second agent, and rotation of the JWT keys with
//! the CA.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{now_unix, raw_client, uid_selector, within, workload_client, PROMPTLY};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use spiffe::{JwtSource, JwtSvid, SpiffeId, TrustDomain};
use tessera_proto::admin::{self as admin_pb};
use tessera_proto::node as node_pb;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, ValidateJwtsvidResponse,
};
use tessera_server::SystemClock;
use tessera_tests::{entry, test_config, RunningAgent, TestAgent, TestServer};
use tessera_workload_api::jwt::{b64url, b64url_decode};
use tessera_workload_api::with_header;
use tonic::Code;

const API_ID: &str = "spiffe://example.org/api-client";

/// Creates an entry for this test process on `agent` with JWT settings.
async fn jwt_entry(
    server: &TestServer,
    agent: &str,
    spiffe_id: &str,
    ttl: Option<u32>,
    audiences: &[&str],
) -> String {
    let mut e = entry(spiffe_id, agent, &[&uid_selector()], None);
    e.jwt_svid_ttl = ttl;
    e.jwt_audiences = audiences.iter().map(|a| a.to_string()).collect();
    create(server, e).await
}

/// Creates an entry through the admin API; returns its ID.
async fn create(server: &TestServer, e: tessera_proto::types::Entry) -> String {
    let result = server
        .admin()
        .await
        .batch_create_entry(admin_pb::BatchCreateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{:?}", result.status);
    result.entry.unwrap().id
}

/// A token for `audience` through the raw Workload API (retrying while the
/// agent has not synced the entry yet).
async fn fetch_token(agent: &RunningAgent, audience: &[&str]) -> String {
    let mut client = raw_client(&agent.socket).await;
    within(PROMPTLY, "a JWT-SVID", async {
        loop {
            let request = JwtsvidRequest {
                audience: audience.iter().map(|a| a.to_string()).collect(),
                spiffe_id: String::new(),
            };
            match client.fetch_jwtsvid(with_header(request)).await {
                Ok(response) => return response.into_inner().svids.remove(0).svid,
                Err(status)
                    if status.code() == Code::PermissionDenied
                        && status.message() == "no identity issued" =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("FetchJWTSVID failed: {status:?}"),
            }
        }
    })
    .await
}

async fn validate(
    agent: &RunningAgent,
    audience: &str,
    token: &str,
) -> Result<ValidateJwtsvidResponse, tonic::Status> {
    let mut client = raw_client(&agent.socket).await;
    let request = ValidateJwtsvidRequest { audience: audience.into(), svid: token.into() };
    client.validate_jwtsvid(with_header(request)).await.map(|r| r.into_inner())
}

/// The JWKS the agent serves for the trust domain (first stream message).
async fn jwks(agent: &RunningAgent) -> Value {
    let mut client = raw_client(&agent.socket).await;
    let mut stream =
        client.fetch_jwt_bundles(with_header(JwtBundlesRequest {})).await.unwrap().into_inner();
    let response = within(PROMPTLY, "the JWT bundle", stream.message()).await.unwrap().unwrap();
    serde_json::from_slice(&response.bundles["spiffe://example.org"]).unwrap()
}

fn parts(token: &str) -> (Value, Value) {
    let mut it = token.split('.');
    let header = serde_json::from_slice(&b64url_decode(it.next().unwrap()).unwrap()).unwrap();
    let claims = serde_json::from_slice(&b64url_decode(it.next().unwrap()).unwrap()).unwrap();
    (header, claims)
}

/// A token with this header and claims, signed by `sign` (over the JWS signing input).
fn craft(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = sign(input.as_bytes());
    format!("{input}.{}", b64url(&signature))
}

fn es256_signer() -> impl Fn(&[u8]) -> Vec<u8> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    move |input| {
        let mut sig = key.sign(&SystemRandom::new(), input).unwrap().as_ref().to_vec();
        tessera_workload_api::jwt::ecdsa_to_low_s(&mut sig);
        sig
    }
}

/// The claims of `token` as `jsonwebtoken` verifies it with `jwk` (as served
/// by FetchJWTBundles), for audience "api", with exp, aud and sub required.
fn independently_verified(
    token: &str,
    jwk: &jsonwebtoken::jwk::Jwk,
    alg: jsonwebtoken::Algorithm,
) -> Result<Value, jsonwebtoken::errors::Error> {
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_audience(&["api"]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|data| data.claims)
}

fn assert_refused(result: Result<ValidateJwtsvidResponse, tonic::Status>, what: &str, why: &str) {
    match result {
        Ok(ok) => panic!("{what} was accepted: {ok:?}"),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(
                status.message().to_lowercase().contains(why),
                "{what}: the refusal {:?} does not say {why:?}",
                status.message()
            );
        }
    }
}

/// The `spiffe` crate's JWT APIs work unchanged against the agent, and a
/// token also verifies with `jsonwebtoken` and the JWKS from
/// `FetchJWTBundles`: its header is only alg/kid/typ and its claims only
/// sub/aud/exp/iat/jti, with the default 5-minute lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_jwt_apis_and_an_independent_verifier_accept_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    jwt_entry(&server, &agent.id, API_ID, None, &[]).await;
    let token = fetch_token(&agent, &["api"]).await;

    // spiffe::WorkloadApiClient
    let client = workload_client(&agent).await;
    let svid = client.fetch_jwt_svid(["api"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), API_ID);
    assert_eq!(svid.token(), token, "the agent serves its cached token");
    assert_eq!(svid.audience(), ["api"]);
    let id = SpiffeId::new(API_ID).unwrap();
    let by_id = client.fetch_jwt_svid(["api"], Some(&id)).await.unwrap();
    assert_eq!(by_id.token(), token);
    let other = SpiffeId::new("spiffe://example.org/not-mine").unwrap();
    let err = client.fetch_jwt_svid(["api"], Some(&other)).await.unwrap_err();
    assert!(err.to_string().contains("no identity issued"), "{err}");
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    assert!(bundles.get(&td).is_some(), "the trust domain's JWT bundle");
    let parsed = JwtSvid::parse_and_validate(svid.token(), &bundles, &["api"]).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), API_ID);
    assert!(JwtSvid::parse_and_validate(svid.token(), &bundles, &["other"]).is_err());
    let validated = client.validate_jwt_token("api", svid.token()).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), API_ID);
    let err = client.validate_jwt_token("other", svid.token()).await.unwrap_err();
    assert!(format!("{err:?}").contains("InvalidArgument"), "{err:?}");

    // spiffe::JwtSource
    let source =
        within(PROMPTLY, "a JwtSource", JwtSource::builder().endpoint(agent.endpoint()).build())
            .await
            .unwrap();
    assert!(source.bundle_set().unwrap().get(&td).is_some());
    let from_source = source.fetch_jwt_svid(["api"]).await.unwrap();
    assert_eq!(from_source.spiffe_id().to_string(), API_ID);
    JwtSvid::parse_and_validate(from_source.token(), &*source.bundle_set().unwrap(), &["api"])
        .unwrap();
    source.shutdown().await;

    // jsonwebtoken, with the JWKS as served.
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks(&agent).await).unwrap();
    let (header, claims) = parts(&token);
    assert_eq!(header.as_object().unwrap().len(), 3, "{header}");
    assert_eq!((header["alg"].as_str(), header["typ"].as_str()), (Some("ES256"), Some("JWT")));
    let kid = header["kid"].as_str().unwrap();
    let jwk = set.find(kid).expect("the token's kid is in the served JWKS");
    let es256 = jsonwebtoken::Algorithm::ES256;
    assert_eq!(independently_verified(&token, jwk, es256).unwrap()["sub"], API_ID);
    let mut names: Vec<&String> = claims.as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["aud", "exp", "iat", "jti", "sub"]);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 300, "the default JWT-SVID TTL is SPIRE's 5 minutes");
    // Forged: same header, signed by another key.
    let forged = craft(&header, &claims, es256_signer());
    assert!(independently_verified(&forged, jwk, es256).is_err());
    agent.stop().await;
    server.stop().await;
}

/// `ValidateJWTSVID` refuses, with `InvalidArgument` and the reason: the
/// wrong audience, a forged signature, altered claims, an expired token, an
/// unknown kid, `alg: none`, HS256, an extra header field, a subject of
/// another trust domain. The `spiffe` crate's offline validation refuses
/// the forged and altered ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_refuses_bad_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    jwt_entry(&server, &agent.id, API_ID, Some(2), &[]).await;
    let token = fetch_token(&agent, &["api"]).await;
    let ok = validate(&agent, "api", &token).await.unwrap();
    assert_eq!(ok.spiffe_id, API_ID);
    let claims = ok.claims.unwrap();
    assert!(claims.fields.contains_key("jti") && claims.fields.contains_key("exp"));

    let (header, claims) = parts(&token);
    let signature = token.rsplit('.').next().unwrap().to_string();
    assert_refused(validate(&agent, "other", &token).await, "wrong audience", "audience");
    assert_refused(
        validate(&agent, "api", &craft(&header, &claims, es256_signer())).await,
        "a forged signature",
        "signature",
    );
    let mut altered = claims.clone();
    altered["sub"] = json!("spiffe://example.org/admin");
    let (input, _) = craft(&header, &altered, |_| Vec::new())
        .rsplit_once('.')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let altered_token = format!("{input}.{signature}");
    assert_refused(validate(&agent, "api", &altered_token).await, "altered claims", "signature");
    let mut unknown = header.clone();
    unknown["kid"] = json!("no-such-key");
    assert_refused(
        validate(&agent, "api", &craft(&unknown, &claims, es256_signer())).await,
        "an unknown kid",
        "no-such-key",
    );
    let none = json!({"alg": "none", "kid": header["kid"], "typ": "JWT"});
    assert_refused(
        validate(&agent, "api", &craft(&none, &claims, |_| Vec::new())).await,
        "alg none",
        "none",
    );
    let hs256 = json!({"alg": "HS256", "kid": header["kid"], "typ": "JWT"});
    let hmac = |input: &[u8]| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"guessable");
        ring::hmac::sign(&key, input).as_ref().to_vec()
    };
    assert_refused(validate(&agent, "api", &craft(&hs256, &claims, hmac)).await, "HS256", "hs256");
    let mut extra = header.clone();
    extra["jku"] = json!("https://evil.example/keys");
    assert_refused(
        validate(&agent, "api", &craft(&extra, &claims, es256_signer())).await,
        "an extra header field",
        "jku",
    );
    assert_refused(validate(&agent, "api", "not.a.token").await, "garbage", "");
    assert_refused(validate(&agent, "api", "").await, "an empty token", "svid");

    // The spiffe crate's offline validation agrees on the forged and altered tokens.
    let bundles = workload_client(&agent).await.fetch_jwt_bundles().await.unwrap();
    assert!(JwtSvid::parse_and_validate(&altered_token, &bundles, &["api"]).is_err());
    assert!(JwtSvid::parse_and_validate(
        &craft(&header, &claims, es256_signer()),
        &bundles,
        &["api"]
    )
    .is_err());

    // The entry's 2 s lifetime passes: the genuine token is now expired.
    let exp = claims["exp"].as_i64().unwrap();
    assert!(exp - claims["iat"].as_i64().unwrap() <= 2, "per-entry --jwt-svid-ttl");
    while now_unix() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_refused(validate(&agent, "api", &token).await, "an expired token", "expired");
    agent.stop().await;
    server.stop().await;
}

/// An entry that lists audiences gets tokens only for them: the agent
/// refuses other audiences with `PermissionDenied` naming the audience, and
/// the server refuses to sign them for an agent that asks anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_policy_is_enforced_by_agent_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    jwt_entry(&server, &agent.id, API_ID, None, &["db", "queue"]).await;
    let token = fetch_token(&agent, &["db"]).await;
    assert_eq!(parts(&token).1["aud"], json!(["db"]));
    let mut client = raw_client(&agent.socket).await;
    let refused = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into(), "payments".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("\"payments\""), "{refused:?}");
    let missing = client
        .fetch_jwtsvid(with_header(JwtsvidRequest { audience: vec![], spiffe_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");

    // The server checks the policy itself: a (simulated) agent asking for
    // an audience the entry does not list gets a per-item refusal.
    let token = server.join_token("", 600).await;
    let simulated = TestAgent::attest(&server, &token.token).await.unwrap();
    let mut e = entry(API_ID, &simulated.id, &["unix:uid:4242"], None);
    e.jwt_audiences = vec!["db".into()];
    let entry_id = create(&server, e).await;
    let mut node = simulated.connect().await;
    let sign = |audience: &str| node_pb::SignJwtRequest {
        items: vec![node_pb::SignJwtItem {
            entry_id: entry_id.clone(),
            audience: vec![audience.into()],
        }],
    };
    let results = node.sign_jwt(sign("payments")).await.unwrap().into_inner().results;
    let status = results[0].status.clone().unwrap();
    assert_eq!(status.code, Code::PermissionDenied as i32, "{status:?}");
    assert!(status.message.contains("\"payments\""), "{status:?}");
    assert!(results[0].token.is_empty());
    let results = node.sign_jwt(sign("db")).await.unwrap().into_inner().results;
    assert_eq!(results[0].status.clone().unwrap().code, 0, "{:?}", results[0].status);
    agent.stop().await;
    server.stop().await;
}

/// Revoking a token by jti reaches every agent: another agent's
/// `ValidateJWTSVID` refuses it within moments, and so does an agent that
/// starts after the revocation. Deleting the entry revokes its other
/// tokens too, and the workload's next fetch gets no token for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let issuer = RunningAgent::start(&server, &dir.path().join("a")).await;
    let other = RunningAgent::start(&server, &dir.path().join("b")).await;
    let entry_id = jwt_entry(&server, &issuer.id, API_ID, None, &[]).await;
    let token = fetch_token(&issuer, &["api"]).await;
    let second = fetch_token(&issuer, &["billing"]).await;
    validate(&other, "api", &token).await.unwrap();
    validate(&other, "billing", &second).await.unwrap();

    let jti = parts(&token).1["jti"].as_str().unwrap().to_string();
    let mut admin = server.admin().await;
    let revoked = admin
        .revoke_svid(admin_pb::RevokeSvidRequest {
            jti: jti.clone(),
            reason: "leaked in a log".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((revoked.jti.as_str(), revoked.spiffe_id.as_str()), (jti.as_str(), API_ID));
    let started = Instant::now();
    within(PROMPTLY, "the other agent to refuse the revoked token", async {
        while validate(&other, "api", &token).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    println!("revoked token refused on another agent after {:?}", started.elapsed());
    assert_refused(validate(&other, "api", &token).await, "a revoked token", "revoked");
    assert_refused(validate(&issuer, "api", &token).await, "a revoked token (issuer)", "revoked");
    validate(&other, "billing", &second).await.expect("other tokens stay valid");
    // The issuing agent dropped it from its cache: a new token is served.
    let fresh = fetch_token(&issuer, &["api"]).await;
    assert_ne!(fresh, token);
    validate(&other, "api", &fresh).await.unwrap();
    let unknown = admin
        .revoke_svid(admin_pb::RevokeSvidRequest { jti: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // An agent that starts now learns the revocations in force.
    let late = RunningAgent::start(&server, &dir.path().join("c")).await;
    within(PROMPTLY, "the late agent's JWT bundle", jwks(&late)).await;
    assert_refused(validate(&late, "api", &token).await, "a revoked token (late agent)", "revoked");
    validate(&late, "billing", &second).await.unwrap();

    // Deleting the entry revokes every token issued for it.
    admin
        .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![entry_id] })
        .await
        .unwrap();
    within(PROMPTLY, "the entry's tokens to be refused", async {
        while validate(&other, "billing", &second).await.is_ok()
            || validate(&other, "api", &fresh).await.is_ok()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let listed = admin
        .list_revocations(admin_pb::ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .revocations;
    assert!(listed.iter().filter(|r| !r.jti.is_empty()).count() >= 3, "{listed:?}");
    for agent in [issuer, other, late] {
        agent.stop().await;
    }
    server.stop().await;
}

/// The server's clock in the rotation test: `ahead` seconds ahead of the
/// system clock, and stopped at `stop_at`.
#[derive(Debug)]
struct SteeredClock {
    ahead: i64,
    stop_at: Arc<AtomicI64>,
}

/// Milliseconds on a clock `ahead` seconds ahead of the system's, stopped
/// at `stop_at` (Unix seconds).
fn steered_ms(ahead: i64, stop_at: &AtomicI64) -> i64 {
    let system = tessera_server::Clock::now_ms(&SystemClock);
    (system + ahead * 1000).min(stop_at.load(SeqCst).saturating_mul(1000))
}

impl tessera_server::Clock for SteeredClock {
    fn now_ms(&self) -> i64 {
        steered_ms(self.ahead, &self.stop_at)
    }

    fn sleep_until(&self, unix_ms: i64) -> tessera_common::clock::Sleep {
        let (ahead, stop_at) = (self.ahead, self.stop_at.clone());
        Box::pin(async move {
            // A stopped clock never reaches a time past its stop.
            while steered_ms(ahead, &stop_at) < unix_ms {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}

/// JWT keys rotate with the CA (20 s here): the next key reaches
/// `FetchJWTBundles` by push before it signs, tokens signed after the
/// switch carry it, and a token signed by the previous key still validates
/// until it expires (which is never after that key leaves the bundle).
///
/// The old token's check must always run, however slow the machine: the
/// server's clock runs 8 s ahead (its certificates are backdated 10 s), so
/// the old token, capped at its key's expiry, expires 8 s later by the
/// agent's clock than by the server's; and it stops between the next key's
/// activation (at 5/6 of the CA's life) and the old key's expiry, so the
/// old key stays in the bundle until the check ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_rotate_with_the_ca() {
    const CA_TTL: i64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.ca_ttl = CA_TTL as u64;
    let clock = Arc::new(SteeredClock { ahead: 8, stop_at: Arc::new(AtomicI64::new(i64::MAX)) });
    let started = tessera_server::Clock::now(&*clock);
    // The first CA is made at `started` or a second later: its successor
    // is active by `started + 18`, and it expires at `started + 20` at the earliest.
    clock.stop_at.store(started + CA_TTL * 5 / 6 + 2, SeqCst);
    let server = TestServer::start_with(config, clock.clone()).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    jwt_entry(&server, &agent.id, API_ID, None, &[]).await;
    let old = fetch_token(&agent, &["api"]).await;
    let (old_header, old_claims) = parts(&old);
    let old_kid = old_header["kid"].as_str().unwrap().to_string();

    let mut client = raw_client(&agent.socket).await;
    let mut stream =
        client.fetch_jwt_bundles(with_header(JwtBundlesRequest {})).await.unwrap().into_inner();
    let kids = |message: &tessera_proto::workload::JwtBundlesResponse| -> Vec<String> {
        let set: Value = serde_json::from_slice(&message.bundles["spiffe://example.org"]).unwrap();
        set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(kids(&first), std::slice::from_ref(&old_kid));
    let pushed = within(Duration::from_secs(25), "the next JWT key to be pushed", async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if kids(&message).len() > 1 {
                return kids(&message);
            }
        }
    })
    .await;
    let new_kid = pushed.iter().find(|k| **k != old_kid).unwrap().clone();
    // Wait for the new key to sign: a fresh audience is a cache miss.
    let rotated = within(Duration::from_secs(25), "a token signed by the next key", async {
        let mut n = 0;
        loop {
            n += 1;
            let token = fetch_token(&agent, &[&format!("probe-{n}")]).await;
            if parts(&token).0["kid"] == json!(new_kid) {
                return token;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    validate(&agent, parts(&rotated).1["aud"][0].as_str().unwrap(), &rotated).await.unwrap();
    let exp = old_claims["exp"].as_i64().unwrap();
    // Always checked: a late check fails instead of being skipped.
    assert!(
        now_unix() < exp,
        "the previous key's token expired (exp {exp}) before the check ran (now {})",
        now_unix()
    );
    assert!(jwks_kids(&agent).await.contains(&old_kid), "the previous key left the bundle early");
    validate(&agent, "api", &old).await.expect("the previous key's token until it expires");
    assert!(exp <= old_claims["iat"].as_i64().unwrap() + CA_TTL, "capped at the old key's expiry");
    agent.stop().await;
    server.stop().await;
}

/// The kids of the JWT bundle the agent serves now.
async fn jwks_kids(agent: &RunningAgent) -> Vec<String> {
    jwks(agent).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

/// With `jwt_key_type = "rsa-2048"` tokens are RS256: the agent validates
/// them, and the `spiffe` crate and `jsonwebtoken` verify them with the RSA
/// JWK from `FetchJWTBundles`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_keys_for_relying_parties_that_need_rsa() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("server"));
    config.jwt_key_type = "rsa-2048".parse().unwrap();
    let server = TestServer::start_with(config, Arc::new(SystemClock)).await;
    let agent = RunningAgent::start(&server, &dir.path().join("agent")).await;
    jwt_entry(&server, &agent.id, API_ID, None, &[]).await;
    let token = fetch_token(&agent, &["api"]).await;
    let (header, _) = parts(&token);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(validate(&agent, "api", &token).await.unwrap().spiffe_id, API_ID);

    let bundles = workload_client(&agent).await.fetch_jwt_bundles().await.unwrap();
    let parsed = JwtSvid::parse_and_validate(&token, &bundles, &["api"]).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), API_ID);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks(&agent).await).unwrap();
    let jwk = set.find(header["kid"].as_str().unwrap()).expect("the kid is served");
    assert_eq!(serde_json::to_value(jwk).unwrap()["kty"], "RSA");
    let rs256 = jsonwebtoken::Algorithm::RS256;
    assert_eq!(independently_verified(&token, jwk, rs256).unwrap()["sub"], API_ID);
    agent.stop().await;
    server.stop().await;
}
