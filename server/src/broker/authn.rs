//! Who is asking: the caller's SPIFFE credentials, checked against the
//! trust domain's keys and the store's revocations.
//!
//! - A JWT-SVID (as `subject_token`, `actor_token`, `client_assertion`
//!   with `client_assertion_type=...:jwt-spiffe`, or `Authorization:
//!   Bearer` at introspection) must be signed by a JWT authority of the
//!   trust domain, be a JWT-SVID (not an access token: `typ` other than
//!   `JWT`/`JOSE` is refused), carry the broker's issuer URL in `aud`
//!   (draft-ietf-oauth-spiffe-client-auth; the token endpoint URL is not
//!   accepted), be unexpired and not revoked.
//! - An X509-SVID on mutual TLS is verified by the TLS handshake against
//!   the trust bundle; here its serial is checked against revocations.

use tessera_workload_api::jwt::{self, JwtBundle};
use tessera_workload_api::SpiffeId;

use super::error::BrokerError;
use super::form::{Form, ASSERTION_JWT_SPIFFE, TOKEN_TYPE_JWT};
use crate::store::{svid_key, Store};

/// The client certificate of a mutual-TLS connection, as verified.
#[derive(Debug, Clone)]
pub struct PeerSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its serial, lowercase hex.
    pub serial: String,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// A credential that checked out.
#[derive(Debug, Clone)]
pub struct Proven {
    /// The SPIFFE ID it proves.
    pub spiffe_id: SpiffeId,
    /// When it stops proving it, Unix seconds.
    pub expires_at: i64,
    /// The store key of its issuance record (`serial` or `jwt:<jti>`).
    pub record: String,
}

/// The parties of a token exchange.
#[derive(Debug, Clone)]
pub struct Parties {
    /// Whose authority the token carries (`sub`).
    pub subject: Proven,
    /// Who acts for the subject, when not the subject itself (`act`).
    pub actor: Option<Proven>,
    /// Who authenticated (`client_id`).
    pub client: SpiffeId,
}

/// JWT-SVIDs whose signature and claims checked out, by the SHA-256 of
/// the token, for the bundle they were checked against: a workload that
/// presents the same JWT-SVID again (every exchange of its task) costs no
/// signature verification. Expiry and revocation are checked every time.
#[derive(Debug, Default)]
pub struct SvidCache {
    inner: std::sync::Mutex<(u64, std::collections::HashMap<[u8; 32], Proven>)>,
}

/// Most tokens the cache holds (it is emptied when full).
pub const SVID_CACHE_SIZE: usize = 10_000;

impl SvidCache {
    fn get(&self, bundle_seq: u64, key: &[u8; 32]) -> Option<Proven> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.0 == bundle_seq).then(|| inner.1.get(key).cloned()).flatten()
    }

    fn put(&self, bundle_seq: u64, key: [u8; 32], proven: Proven) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.0 != bundle_seq || inner.1.len() >= SVID_CACHE_SIZE {
            inner.1.clear();
            inner.0 = bundle_seq;
        }
        inner.1.insert(key, proven);
    }
}

/// What credentials are checked against.
#[derive(Debug)]
pub struct Verifier<'a> {
    /// The broker's issuer: the audience JWT-SVIDs must carry.
    pub issuer: &'a str,
    /// The trust domain's JWT authorities.
    pub bundle: &'a JwtBundle,
    /// Revocations.
    pub store: &'a dyn Store,
    /// Unix seconds.
    pub now: i64,
    /// Checked JWT-SVIDs, and the bundle sequence they were checked for.
    pub cache: Option<(&'a SvidCache, u64)>,
}

impl Verifier<'_> {
    /// Checks a JWT-SVID; `what` names it in the error.
    pub fn jwt_svid(&self, token: &str, what: &str) -> Result<Proven, BrokerError> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let cached = self.cache.and_then(|(cache, seq)| cache.get(seq, &key));
        let proven = match cached {
            Some(proven) if proven.expires_at > self.now => proven,
            _ => {
                let valid =
                    jwt::validate(token, self.issuer, self.bundle, self.now).map_err(|e| {
                        BrokerError::InvalidGrant(format!(
                            "{what} is not a valid JWT-SVID for this broker: {e}"
                        ))
                    })?;
                let Some(jti) = valid.jti else {
                    return Err(BrokerError::InvalidGrant(format!(
                        "{what} has no jti, so it cannot be checked for revocation"
                    )));
                };
                let proven = Proven {
                    spiffe_id: valid.spiffe_id,
                    expires_at: valid.expires_at,
                    record: svid_key("", &jti),
                };
                if let Some((cache, seq)) = self.cache {
                    cache.put(seq, key, proven.clone());
                }
                proven
            }
        };
        if self.store.revocation(&proven.record)?.is_some() {
            return Err(BrokerError::InvalidGrant(format!(
                "{what} ({}) is revoked",
                proven.record
            )));
        }
        Ok(proven)
    }

    /// Checks a mutual-TLS client's X509-SVID for revocation.
    pub fn peer(&self, peer: &PeerSvid) -> Result<Proven, BrokerError> {
        if peer.spiffe_id.trust_domain() != self.bundle.trust_domain() {
            return Err(BrokerError::InvalidClient(format!(
                "client certificate {} is not of trust domain {}",
                peer.spiffe_id,
                self.bundle.trust_domain()
            )));
        }
        if self.store.revocation(&peer.serial)?.is_some() {
            return Err(BrokerError::InvalidClient(format!(
                "client certificate (serial {}) is revoked",
                peer.serial
            )));
        }
        Ok(Proven {
            spiffe_id: peer.spiffe_id.clone(),
            expires_at: peer.not_after,
            record: peer.serial.clone(),
        })
    }

    /// The authenticated client: its mutual-TLS certificate and/or its
    /// `client_assertion` (which must agree); `None` when neither is given.
    pub fn client(
        &self,
        form: &Form,
        peer: Option<&PeerSvid>,
    ) -> Result<Option<Proven>, BrokerError> {
        let by_tls = peer.map(|p| self.peer(p)).transpose()?;
        let by_assertion = match (form.get("client_assertion_type"), form.get("client_assertion")) {
            (None, None) => None,
            (Some(ASSERTION_JWT_SPIFFE), Some(assertion)) => Some(
                self.jwt_svid(assertion, "client_assertion")
                    .map_err(|e| BrokerError::InvalidClient(e.to_string()))?,
            ),
            (Some(other), Some(_)) if other != ASSERTION_JWT_SPIFFE => {
                return Err(BrokerError::InvalidClient(format!(
                    "client_assertion_type {other:?} is not supported: use {ASSERTION_JWT_SPIFFE}"
                )))
            }
            _ => {
                return Err(BrokerError::InvalidRequest(
                    "client_assertion and client_assertion_type go together".into(),
                ))
            }
        };
        let client = match (by_tls, by_assertion) {
            (Some(a), Some(b)) if a.spiffe_id != b.spiffe_id => {
                return Err(BrokerError::InvalidClient(format!(
                    "client certificate ({}) and client_assertion ({}) name different workloads",
                    a.spiffe_id, b.spiffe_id
                )))
            }
            (a, b) => a.or(b),
        };
        if let (Some(client), Some(id)) = (&client, form.get("client_id")) {
            if client.spiffe_id.as_str() != id {
                return Err(BrokerError::InvalidClient(format!(
                    "client_id {id:?} is not the authenticated workload {}",
                    client.spiffe_id
                )));
            }
        }
        Ok(client)
    }

    /// The parties of a token exchange: subject (the `subject_token`, or
    /// the client itself), actor (the `actor_token`, or a client that is
    /// not the subject) and client.
    pub fn exchange(&self, form: &Form, peer: Option<&PeerSvid>) -> Result<Parties, BrokerError> {
        let client = self.client(form, peer)?;
        let subject = match form.get("subject_token") {
            Some(token) => {
                typed(form, "subject_token_type")?;
                Some(self.jwt_svid(token, "subject_token")?)
            }
            None => None,
        };
        let actor = match form.get("actor_token") {
            Some(token) => {
                typed(form, "actor_token_type")?;
                Some(self.jwt_svid(token, "actor_token")?)
            }
            None if form.get("actor_token_type").is_some() => {
                return Err(BrokerError::InvalidRequest(
                    "actor_token_type without actor_token".into(),
                ))
            }
            None => None,
        };
        let Some(subject) = subject.or_else(|| client.clone()) else {
            return Err(BrokerError::InvalidClient(
                "no SPIFFE credential: give subject_token (a JWT-SVID), a jwt-spiffe client_assertion, or a client certificate".into(),
            ));
        };
        // Who acts: the actor token's workload, else an authenticated
        // client that is not the subject.
        let actor = match (actor, &client) {
            (Some(actor), Some(client)) if client.spiffe_id != actor.spiffe_id => {
                return Err(BrokerError::InvalidClient(format!(
                    "the authenticated client {} is not the actor {}",
                    client.spiffe_id, actor.spiffe_id
                )))
            }
            (Some(actor), _) => Some(actor),
            (None, Some(client)) if client.spiffe_id != subject.spiffe_id => Some(client.clone()),
            (None, _) => None,
        };
        let actor = actor.filter(|a| a.spiffe_id != subject.spiffe_id);
        let client_id = actor.as_ref().map_or(&subject, |a| a).spiffe_id.clone();
        Ok(Parties { subject, actor, client: client_id })
    }
}

/// A `*_token_type` must say JWT.
fn typed(form: &Form, key: &str) -> Result<(), BrokerError> {
    match form.get(key) {
        Some(TOKEN_TYPE_JWT) => Ok(()),
        Some(other) => Err(BrokerError::InvalidRequest(format!(
            "{key} {other:?} is not supported: a JWT-SVID is {TOKEN_TYPE_JWT}"
        ))),
        None => Err(BrokerError::InvalidRequest(format!("{key} is required"))),
    }
}
