//! The SPIFFE Workload API calls (`FetchX509SVID`, `FetchX509Bundles`,
//! `FetchJWTSVID`, `FetchJWTBundles`, `ValidateJWTSVID`) over the agent's
//! cache, each answered from its caller's attestation and recorded as an
//! event, refusals included.

use std::collections::HashMap;
use std::time::Duration;

use tessera_proto::workload::{self as pb, spiffe_workload_api_server::SpiffeWorkloadApi};
use tessera_workload_api::{jwt, Selector, SpiffeId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::event_schema::{self as schema, kind, EventExt};
use crate::workload::service::{
    fingerprint, peer_of, workload_of, Caller, Stream_, WorkloadService, FIRST_RESPONSE_WAIT,
    REPLACEMENT_WAIT,
};

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = Stream_<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let Caller { conn, peer, selectors, slot } = self.caller("FetchX509SVID", &request).await?;
        let mut updates = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_WAIT;
        // Wait (briefly) for the first sync and for SVIDs still being signed.
        let (state, svids) = loop {
            let state = updates.borrow_and_update().clone();
            let now = self.clock.now();
            let svids = state.svids_for(&selectors, now);
            if !svids.is_empty() || (state.ready && !state.has_entries_for(&selectors, now)) {
                break (state, svids);
            }
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                break (state, svids);
            }
        };
        const METHOD: &str = "FetchX509SVID";
        if svids.is_empty() {
            let caller = Some((peer.as_ref(), selectors.as_slice()));
            if !state.ready {
                return Err(self.refuse(
                    METHOD,
                    kind::WORKLOAD_X509,
                    caller,
                    Status::unavailable("agent has not synced with the server yet; retry"),
                ));
            }
            if state.has_entries_for(&selectors, self.clock.now()) {
                // Entitled, but the SVID could not be signed yet (the server
                // may be unreachable): a retryable answer, not a denial.
                return Err(self.refuse(
                    METHOD,
                    kind::WORKLOAD_X509,
                    caller,
                    Status::unavailable("identity not issued yet; retry"),
                ));
            }
            return Err(self.refuse(
                METHOD,
                kind::WORKLOAD_X509,
                caller,
                Status::permission_denied("no identity issued"),
            ));
        }
        let mut served = schema::event(kind::WORKLOAD_X509, schema::ALLOW)
            .workload(workload_of(&peer, &selectors));
        for svid in &svids {
            served = served.spiffe_id(svid.spiffe_id.to_string()).entry(svid.entry_id.clone());
        }
        served.serial = svids.iter().map(|s| s.serial.as_str()).collect::<Vec<_>>().join(",");
        self.record(METHOD, served);
        debug!(pid = ?peer.pid, uid = peer.uid, svids = svids.len(), "X509-SVIDs served");
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = fingerprint(&state, &svids);
            if tx.send(Ok(service.x509_response(&state, &svids))).await.is_err() {
                return;
            }
            let mut defer_until: Option<tokio::time::Instant> = None;
            loop {
                // Wake for cache changes, and for an SVID expiring on its own.
                let next_expiry = updates
                    .borrow()
                    .svids_for(&selectors, service.clock.now())
                    .iter()
                    .map(|s| s.expires_at)
                    .min();
                let expiry = match next_expiry {
                    Some(at) => service.clock.sleep_until((at + 1).saturating_mul(1000)),
                    None => service.clock.sleep(Duration::from_secs(3600)),
                };
                let deferred = async move {
                    match defer_until {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                };
                // A change seen before shutdown is delivered first: an
                // agent that stops because its identity is dead withdraws
                // every identity, then shuts down.
                tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                    _ = service.shutdown.cancelled() => return,
                    _ = expiry => {}
                    _ = deferred => {}
                }
                let state = updates.borrow_and_update().clone();
                let now = service.clock.now();
                let svids = state.svids_for(&selectors, now);
                if svids.is_empty() {
                    if state.has_entries_for(&selectors, now) {
                        continue; // being re-signed: the next change brings it
                    }
                    let status = service.refuse(
                        METHOD,
                        kind::WORKLOAD_X509,
                        Some((&peer, &selectors)),
                        Status::permission_denied("no identity issued"),
                    );
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                // An SVID being replaced (revoked, or its entry changed) is
                // missing for the moment its successor is signed: wait for
                // it (briefly) rather than announce the identity's withdrawal.
                let replacing = last.0.iter().any(|(entry_id, _)| {
                    !svids.iter().any(|s| &s.entry_id == entry_id)
                        && state.entries.get(entry_id).is_some_and(|e| {
                            Selector::all_present(&e.selectors, &selectors)
                                && (e.expires_at == 0 || e.expires_at > now)
                        })
                });
                if replacing {
                    let until = *defer_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + REPLACEMENT_WAIT);
                    if tokio::time::Instant::now() < until {
                        continue;
                    }
                }
                defer_until = None;
                let current = fingerprint(&state, &svids);
                if current != last {
                    // Only to the program the connection was attested as.
                    if let Err(status) = service.verify(METHOD, &conn) {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    last = current;
                    if tx.send(Ok(service.x509_response(&state, &svids))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchX509BundlesStream = Stream_<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let Caller { peer, selectors, slot, .. } =
            self.caller("FetchX509Bundles", &request).await?;
        self.record(
            "FetchX509Bundles",
            schema::event(kind::WORKLOAD_BUNDLE, schema::ALLOW)
                .workload(workload_of(&peer, &selectors)),
        );
        let stream = self
            .bundle_stream(
                slot,
                "agent has no trust bundle yet",
                |state| {
                    (!state.bundle.is_empty()).then(|| (state.bundle.clone(), state.crls.clone()))
                },
                |service, state| {
                    let mut bundles = HashMap::new();
                    bundles.insert(service.trust_domain.id_string(), service.bundle_bytes(state));
                    pb::X509BundlesResponse { crl: state.crls.as_ref().clone(), bundles }
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let Caller { peer, selectors, slot: _slot, .. } =
            self.caller("FetchJWTSVID", &request).await?;
        const METHOD: &str = "FetchJWTSVID";
        let req = request.into_inner();
        let refuse = |status: Status| {
            let mut e = schema::refused(kind::WORKLOAD_JWT, &status)
                .workload(workload_of(&peer, &selectors));
            e.audience = req.audience.clone();
            if !req.spiffe_id.is_empty() {
                e.spiffe_ids.push(req.spiffe_id.clone());
            }
            self.record(METHOD, e);
            status
        };
        let audience = requested_audience(&req.audience).map_err(refuse)?;
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            id => Some(SpiffeId::parse(id).map_err(|e| {
                refuse(Status::invalid_argument(format!(
                    "invalid spiffe_id {:?}: {e}",
                    tessera_common::rules::shortened(id)
                )))
            })?),
        };
        let state = self.ready_state().await.map_err(refuse)?;
        let mut entries = state.entries_for(&selectors, self.clock.now());
        if let Some(wanted) = &wanted {
            entries.retain(|e| &e.spiffe_id == wanted);
        }
        // One token per identity: the first entry (in a stable order) of each.
        entries.dedup_by(|b, a| a.spiffe_id == b.spiffe_id);
        if entries.is_empty() {
            return Err(refuse(Status::permission_denied("no identity issued")));
        }
        // The entries' audience policy, enforced here and again by the server.
        let mut denied = Vec::new();
        entries.retain(|e| match audience.iter().find(|a| !e.allows_audience(a)) {
            None => true,
            Some(a) => {
                denied.push(format!("{} may not get JWT-SVIDs for audience {a:?}", e.spiffe_id));
                false
            }
        });
        if entries.is_empty() {
            return Err(refuse(Status::permission_denied(format!(
                "audience not allowed: {}",
                denied.join("; ")
            ))));
        }
        for why in &denied {
            // Some of the caller's identities were left out for their audience policy.
            warn!(target: "tessera::audit", pid = ?peer.pid, uid = peer.uid, audience = ?audience, reason = %why, "JWT-SVID identity left out by audience policy");
        }
        let tokens = self.jwt.fetch(&entries, &audience, peer.uid).await.map_err(refuse)?;
        let mut served = schema::event(kind::WORKLOAD_JWT, schema::ALLOW)
            .workload(workload_of(&peer, &selectors));
        for (entry, token) in entries.iter().zip(&tokens) {
            served = served.spiffe_id(entry.spiffe_id.to_string()).entry(entry.id.clone());
            if !served.jti.is_empty() {
                served.jti.push(',');
            }
            served.jti.push_str(&token.jti);
        }
        served.audience = audience.clone();
        self.record(METHOD, served);
        debug!(pid = ?peer.pid, uid = peer.uid, jtis = ?tokens.iter().map(|t| t.jti.as_str()).collect::<Vec<_>>(), "JWT-SVIDs served");
        let svids = entries
            .iter()
            .zip(tokens)
            .map(|(e, t)| pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: t.token,
                hint: e.hint.clone(),
            })
            .collect();
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = Stream_<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let Caller { peer, selectors, slot, .. } = self.caller("FetchJWTBundles", &request).await?;
        self.record(
            "FetchJWTBundles",
            schema::event(kind::WORKLOAD_BUNDLE, schema::ALLOW)
                .workload(workload_of(&peer, &selectors)),
        );
        let stream = self
            .bundle_stream(
                slot,
                "agent has no JWT bundle yet",
                |state| state.jwt_bundle.clone(),
                |service, state| {
                    let mut bundles = HashMap::new();
                    if let Some(bundle) = &state.jwt_bundle {
                        bundles.insert(service.trust_domain.id_string(), bundle.to_jwks());
                    }
                    pb::JwtBundlesResponse { bundles }
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        // Anyone local may validate a token: no attestation, but the
        // header and the caller's connection limit apply.
        const METHOD: &str = "ValidateJWTSVID";
        self.check_header(METHOD, &request)?;
        let peer = peer_of(&request);
        let req = request.into_inner();
        let caller = peer.as_ref().map(|p| workload_of(&p.0.process, &[]));
        let refuse = |reason: String| {
            let mut e = schema::denied(kind::WORKLOAD_VALIDATE, reason.clone())
                .code(schema::grpc_code(tonic::Code::InvalidArgument));
            e.workload = caller.clone();
            e.audience = vec![req.audience.clone()];
            self.record(METHOD, e);
            Status::invalid_argument(reason)
        };
        if req.audience.is_empty() {
            return Err(refuse("audience must be specified".into()));
        }
        if req.svid.is_empty() {
            return Err(refuse("svid must be specified".into()));
        }
        let state = self.cache.state();
        let Some(bundle) = state.jwt_bundle.clone() else {
            return Err(Status::unavailable("agent has no JWT bundle yet; retry"));
        };
        let valid = jwt::validate(&req.svid, &req.audience, &bundle, self.clock.now())
            .map_err(|e| refuse(format!("invalid JWT-SVID: {e}")))?;
        if let Some(jti) = &valid.jti {
            if self.jwt.is_revoked(jti) {
                return Err(refuse(format!("JWT-SVID {jti} has been revoked")));
            }
        }
        let mut e = schema::event(kind::WORKLOAD_VALIDATE, schema::ALLOW)
            .spiffe_id(valid.spiffe_id.to_string());
        e.workload = caller.clone();
        e.audience = vec![req.audience.clone()];
        e.jti = valid.jti.clone().unwrap_or_default();
        self.record(METHOD, e);
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(to_struct(valid.claims)),
        }))
    }
}

/// The requested audiences, checked, sorted and deduplicated by the rule
/// the server applies too.
fn requested_audience(audience: &[String]) -> Result<Vec<String>, Status> {
    tessera_common::rules::requested_audiences(audience)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// JSON claims as a `google.protobuf.Struct`.
fn to_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: claims.into_iter().map(|(k, v)| (k, to_value(v))).collect() }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}
