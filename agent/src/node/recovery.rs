//! What the agent does when its identity is dead (see `standing` for how
//! it learns that): it says so in one log line naming the cause and the
//! fix, deletes the dead SVID and key from its data dir, and attests again
//! with the join token it was started with, or stops with that message
//! when it has none. A token given while a stored SVID was valid is spent
//! only here, when that identity turns out dead. Depends on `standing`,
//! the link, `svid::cache`, `node::attestation`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_workload_api::TrustDomain;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::node::attestation::{attest, AgentError};
use crate::node::link::NodeLink;
use crate::node::standing::IDENTITY_FILES;
use crate::schedule::Backoff;
use crate::svid::cache::Cache;

/// What the agent needs to attest again.
#[derive(Debug)]
pub struct Recovery {
    /// The data dir holding the identity files.
    pub data_dir: PathBuf,
    /// The servers.
    pub server_addresses: Vec<String>,
    /// The join token the agent was started with, not yet spent.
    pub join_token: Option<String>,
    /// Why a join token given could not be read.
    pub join_token_problem: Option<String>,
    /// A join token was given and spent when this agent started.
    pub token_spent: bool,
    /// The trust domain.
    pub trust_domain: TrustDomain,
}

/// Waits for the identity to die; then drops it and attests again with the
/// join token, or returns the error the agent exits with.
pub async fn recovery_loop(
    link: Arc<NodeLink>,
    cache: Cache,
    mut recovery: Recovery,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = link.standing.died() => {}
        }
        let Some(death) = link.standing.death() else { continue };
        let cause = death.cause();
        for name in IDENTITY_FILES {
            let path = recovery.data_dir.join(name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot delete the dead agent SVID");
                }
            }
        }
        let Some(token) = recovery.join_token.take() else {
            let why = match &recovery.join_token_problem {
                Some(problem) => format!("the join token given is unusable ({problem})"),
                None if recovery.token_spent => {
                    "the join token given was spent when this agent attested".to_string()
                }
                None => "no join token was given".to_string(),
            };
            let message = format!("{cause}: dropped it, and {why}: {}", death.fix());
            return Err(give_up(&cache, message));
        };
        warn!("{cause}: dropping it and attesting again with the join token given");
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let identity = loop {
            let attempt = attest(
                &recovery.data_dir,
                &recovery.server_addresses,
                &token,
                &recovery.trust_domain,
                &link.anchors,
            );
            let failure = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                result = attempt => match result {
                    Ok(identity) => break identity,
                    Err(e) => e,
                },
            };
            // No server reached: the token is unspent; try again.
            if let AgentError::Node(e) = &failure {
                warn!(error = %e, "cannot reach a server to attest again; retrying");
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = link.clock.sleep(delay) => continue,
                }
            }
            let message =
                format!("{cause}: dropped it, and attesting again with the join token given failed: {failure}");
            return Err(give_up(&cache, message));
        };
        info!(agent_id = %identity.spiffe_id, previous = %death.agent_id, "attested again with the join token given");
        // The entries of the new identity come in a fresh snapshot; the
        // SVIDs held meanwhile stay served where their entry stays.
        cache.update(|s| {
            s.revision = 0;
            false
        });
        link.standing.revive();
        link.set_identity(identity);
    }
}

/// The identity is dead for good and the agent stops: every workload is
/// told its identity is withdrawn before its stream ends (not left to see a
/// closed stream, which clients read as the agent restarting).
fn give_up(cache: &Cache, message: String) -> AgentError {
    error!("{message}");
    cache.withdraw_all();
    AgentError::IdentityDead(message)
}
