//! Renewal of the agent's own SVID: at half-life ± 10 %, at once when a
//! call was refused as superseded, from the new schedule when the identity
//! changed (attested again). A refusal of the renewal itself is judged by
//! the recovery rule. Depends on `identity`, `schedule`, the link and
//! `standing`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_proto::node as pb;
use tessera_proto::Refusal;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::identity::{new_key_and_csr, AgentIdentity};
use crate::node::link::{CallFailure, Next, NodeLink};
use crate::node::standing::{Call, Death};
use crate::schedule::{renew_point, Backoff, BACKDATE_SECS};

/// Renews the agent's own SVID at half-life ± 10 %, at once when a call
/// was refused as superseded, and from the new schedule when the identity
/// changed (attested again).
pub async fn agent_renewal_loop(
    link: Arc<NodeLink>,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut changes = link.identity_changes();
    let schedule = |link: &NodeLink| {
        let id = link.identity();
        renew_point(id.not_before + BACKDATE_SECS, id.not_after)
    };
    let now = || link.clock.now();
    let mut renew_at = schedule(&link);
    loop {
        // Never spin: at least a second between renewals.
        let wait = renew_at.max(now() + 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = link.clock.sleep_until(wait.saturating_mul(1000)) => {}
            _ = link.standing.renew_now.notified() => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                renew_at = schedule(&link);
                continue;
            }
        }
        if link.standing.death().is_some() {
            // The recovery task attests again; nothing to renew.
            renew_at = now() + backoff.next_delay().as_secs().max(1) as i64;
            continue;
        }
        match renew_agent(&link, &data_dir).await {
            Ok(identity) => {
                changes.mark_unchanged();
                info!(agent_id = %identity.spiffe_id, not_after = identity.not_after, "agent SVID renewed");
                renew_at = renew_point(identity.not_before + BACKDATE_SECS, identity.not_after);
                backoff.reset();
            }
            Err(failure) => {
                let identity = link.identity();
                match link.after_failure(Call::Renew, &failure).await {
                    // The recovery task says why.
                    Next::Dead => {}
                    // The identity changed meanwhile (attested again): its
                    // own schedule.
                    Next::Now => {
                        renew_at = schedule(&link);
                        continue;
                    }
                    Next::BackOff if identity.not_after <= now() => {
                        link.standing.die(Death {
                            refusal: Refusal::Expired,
                            agent_id: identity.spiffe_id.to_string(),
                        });
                    }
                    Next::BackOff => {
                        warn!(error = %failure.message, "agent SVID renewal failed; will retry");
                    }
                }
                link.fail_over();
                renew_at = now() + backoff.next_delay().as_secs().max(1) as i64;
            }
        }
    }
}

async fn renew_agent(
    link: &NodeLink,
    data_dir: &std::path::Path,
) -> Result<AgentIdentity, CallFailure> {
    let (key, csr) = new_key_and_csr().map_err(|e| CallFailure::local(link.serial(), e))?;
    let conn = link.connect().await.map_err(|e| CallFailure::local(link.serial(), e))?;
    let (mut client, used) = (conn.client, conn.serial);
    // From here until the new SVID is in place (or the renewal failed) the
    // other node clients wait: the server may refuse the SVID being
    // replaced from any moment on.
    let _under_way = link.renewing();
    let response = client
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .map_err(|s| CallFailure::status(used.clone(), s))?
        .into_inner();
    let local = |e: &dyn std::fmt::Display| CallFailure::local(used.clone(), e);
    let identity = AgentIdentity::new(response.x509_svid, key).map_err(|e| local(&e))?;
    identity.save(data_dir).map_err(|e| local(&e))?;
    let bundle: Vec<CertificateDer<'static>> =
        response.bundle.into_iter().map(Into::into).collect();
    if !bundle.is_empty() {
        link.set_bundle(&bundle);
    }
    link.set_identity(identity.clone());
    Ok(identity)
}
