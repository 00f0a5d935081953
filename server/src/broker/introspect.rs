//! Introspection (RFC 7662) at `POST /introspect`: the relying party
//! proves its own SPIFFE identity (client certificate, a jwt-spiffe
//! `client_assertion`, or `Authorization: Bearer <JWT-SVID>` with the
//! broker's issuer as audience) and learns whether an access token is
//! active now: signed by a broker key, on record, unexpired, not revoked,
//! its task live. Anything else is `{"active": false}`, read from the
//! store at that moment, so a task ended on any server is seen at once.

use serde_json::{json, Value};

use super::authn::PeerSvid;
use super::error::BrokerError;
use super::form::Form;
use super::keys::Unverified;
use super::Broker;

impl Broker {
    /// Answers an introspection form (blocking: reads the store).
    pub fn introspect(
        &self,
        form: &Form,
        peer: Option<&PeerSvid>,
        bearer: Option<&str>,
    ) -> Result<Value, BrokerError> {
        let now = self.now();
        let store = self.state.store().as_ref();
        let bundle = self.jwt_bundle();
        let verifier = self.verifier(&bundle, store, now);
        let caller = match verifier.client(form, peer)? {
            Some(c) => c,
            None => match bearer {
                Some(token) => verifier
                    .jwt_svid(token, "the bearer JWT-SVID")
                    .map_err(|e| BrokerError::InvalidClient(e.to_string()))?,
                None => {
                    return Err(BrokerError::InvalidClient(
                        "introspection needs the caller's SPIFFE credential (client certificate, client_assertion or Bearer JWT-SVID)".into(),
                    ))
                }
            },
        };
        let token = form.require("token")?;
        let inactive = json!({ "active": false });
        let claims = match self.keys.verify(token) {
            Ok(claims) => claims,
            // Signed by another server's key not yet seen here: read every
            // server's keys from the store once, and try again.
            Err(Unverified::UnknownKid) => {
                self.refresh_keys()?;
                match self.keys.verify(token) {
                    Ok(claims) => claims,
                    Err(_) => return Ok(inactive),
                }
            }
            Err(_) => return Ok(inactive),
        };
        let Some(jti) = claims.get("jti").and_then(Value::as_str) else { return Ok(inactive) };
        let Some(record) = store.access_token(jti)? else { return Ok(inactive) };
        let task = store.task(&record.task)?;
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        if !record.is_active(task.as_ref(), now) || exp <= now || sub != record.sub {
            return Ok(inactive);
        }
        tracing::debug!(caller = %caller.spiffe_id, jti, "introspected an active token");
        let mut answer = json!({
            "active": true,
            "iss": self.config.issuer,
            "sub": record.sub,
            "aud": record.aud,
            "client_id": record.client_id,
            "scope": record.scope,
            "exp": exp,
            "iat": record.iat,
            "jti": record.jti,
            "token_type": "Bearer",
            "task": record.task,
        });
        if !record.actor.is_empty() {
            answer["act"] = json!({ "sub": record.actor });
        }
        if let Ok(details) = serde_json::from_str::<Value>(&record.authorization_details) {
            answer["authorization_details"] = details;
        }
        Ok(answer)
    }
}
