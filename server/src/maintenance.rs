//! The server's periodic work: the CA's rotation and the server's own SVID
//! (on the injected clock), task-scoped entries' and proposals' expiry,
//! pruning of expired records, CRLs re-signed before they go stale, and
//! publishing this server's CA records for the shared bundle.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::node::tls::{self, ServerSvid};
use crate::error::ServerError;
use crate::state::State;
use crate::store::StoreError;

/// Keeps the CA rotated and the server's own SVID fresh.
pub(crate) async fn rotation_loop(
    state: Arc<State>,
    svid: Arc<ServerSvid>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    loop {
        let now = state.clock().now();
        let svid_refresh = (svid.expires_at() - now) / 2;
        let wait = state.ca().next_rotation_in().min(svid_refresh).clamp(1, 3600);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = state.clock().sleep_until((now + wait) * 1000) => {}
        }
        let now = state.clock().now();
        match state.ca().rotate() {
            Ok(changed) => {
                if changed {
                    let e = crate::event_schema::event(crate::event_schema::kind::CA_ROTATE, "");
                    let e = crate::event_schema::EventExt::attr(
                        e,
                        "bundle_cas",
                        state.ca().bundle().len(),
                    );
                    let e = crate::event_schema::EventExt::attr(
                        e,
                        "active_ca_not_after",
                        state.ca().active_not_after(),
                    );
                    let kids: Vec<String> =
                        state.ca().jwt_authorities().into_iter().map(|k| k.kid).collect();
                    let e = crate::event_schema::EventExt::attr(e, "jwt_kids", kids.join(","));
                    state.events().record_durable(vec![e]).await;
                    let shared = state.clone();
                    match tokio::task::spawn_blocking(move || share_bundle(&shared)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => error!(error = %e, "publishing the bundle change failed"),
                        Err(e) => error!(error = %e, "publishing the bundle change failed"),
                    }
                    // One CRL per CA in the bundle: a new CA needs its own.
                    if let Err(e) = crate::revocation::refresh_crls(&state).await {
                        error!(error = %e.message(), "CRL refresh after CA rotation failed");
                    }
                }
                let half_life_passed =
                    svid.expires_at() - now <= i64::from(tls::SERVER_SVID_TTL) / 2;
                if changed || half_life_passed {
                    if let Err(e) = svid.renew(state.ca()) {
                        error!(error = %e, "server SVID renewal failed");
                    }
                }
            }
            Err(e) => error!(error = %e, "CA rotation failed"),
        }
    }
}

/// Keeps the change log to its newest `change_log_keep` changes, once at
/// least a tenth more (up to 1,000) have accumulated: deletions go in
/// chunks, not one commit per change.
async fn trim_change_log(state: &Arc<State>) {
    let keep = state.config().change_log_keep;
    let slack = (keep / 10).clamp(1, 1_000);
    let trimmed = state.store_op(move |store| store.trim_changes(keep, slack)).await;
    match trimmed {
        Ok(0) => {}
        Ok(n) => tracing::debug!(changes = n, keep, "change log trimmed"),
        Err(e) => error!(error = %e.message(), "trimming the change log failed"),
    }
}

/// Expires task-scoped entries the moment they reach `expires_at`, forgets
/// records of expired certificates, and re-signs the CRLs before they go stale.
pub(crate) async fn expiry_loop(
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let mut last_prune = state.clock().now();
    let mut last_crl = state.clock().now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = state.clock().sleep(Duration::from_millis(250)) => {}
        }
        if let Err(e) = crate::revocation::expire_entries(&state).await {
            error!(error = %e.message(), "expiring entries failed");
        }
        crate::api::admin::expire_proposals(&state).await;
        trim_change_log(&state).await;
        let now = state.clock().now();
        if now - last_prune >= 60 {
            last_prune = now;
            match state.store_op(move |store| store.prune_expired(now)).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(records = n, "forgot records of expired certificates");
                    let _ = crate::revocation::refresh_crls(&state).await;
                    last_crl = now;
                }
                Err(e) => error!(error = %e.message(), "pruning expired records failed"),
            }
        }
        if now - last_crl >= crate::revocation::CRL_VALIDITY_SECS / 2 {
            last_crl = now;
            if let Err(e) = crate::revocation::refresh_crls(&state).await {
                error!(error = %e.message(), "periodic CRL refresh failed");
            }
        }
    }
}

/// Publishes this server's CAs to the store and takes in every other
/// server's: the bundle agents and workloads receive is their union, and
/// the node API accepts agents whose SVIDs any of them signed. Publishing
/// logs a bundle change when this server's CAs changed.
pub(crate) fn share_bundle(state: &State) -> Result<bool, StoreError> {
    let own = state.ca().records(state.server_id());
    state.store().publish_cas(state.server_id(), &own)?;
    let changed = state.ca().set_peers(state.server_id(), state.store().cas()?);
    state.anchors().update(state.ca().bundle().to_vec());
    Ok(changed)
}
