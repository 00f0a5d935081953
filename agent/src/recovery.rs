//! What the agent does when the server says its identity is dead: a typed
//! refusal (`banned`, `revoked`, `unknown-agent`, `evicted`, `expired`;
//! `superseded` only when `RenewAgent` refuses the SVID the agent holds)
//! in a call's metadata, or the `certificate_revoked` TLS alert of a
//! handshake. The agent says so in one log line naming the cause and the
//! fix, deletes the dead SVID and key from its data dir, and attests again
//! with the join token it was started with, or stops with that message
//! when it has none. A token given while a stored SVID was valid is spent
//! only here, when that identity turns out dead.
//!
//! [`Standing`] also keeps what health reports: since when no server could
//! be reached. Depends on `node_client` (the alert slot), `manager` (the
//! link), `cache`, `agent` (attestation).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::Refusal;
use tessera_workload_api::TrustDomain;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::agent::{attest, AgentError};
use crate::cache::Cache;
use crate::manager::{Backoff, NodeLink};
use crate::node_client::AlertSlot;

/// The stored identity's files, deleted when it is dead.
pub const IDENTITY_FILES: [&str; 2] = ["agent_svid.pem", "agent_key.pem"];

/// The calls whose refusals judge the agent's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The Sync stream.
    Sync,
    /// Signing workload SVIDs.
    Sign,
    /// Renewing the agent's own SVID.
    Renew,
}

/// Why the agent's identity is dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The server's typed refusal.
    pub refusal: Refusal,
    /// The identity it refused.
    pub agent_id: String,
}

impl Death {
    /// The cause, for the log line, the exit message and health.
    pub fn cause(&self) -> String {
        let id = &self.agent_id;
        match self.refusal {
            Refusal::Banned => format!("this agent ({id}) is banned"),
            Refusal::Revoked => {
                format!("this agent's SVID ({id}) was revoked (agent evicted or banned)")
            }
            Refusal::UnknownAgent | Refusal::Evicted => {
                format!("this agent ({id}) was evicted: the server has no record of it")
            }
            Refusal::Expired => format!("this agent's SVID ({id}) has expired"),
            Refusal::Superseded => format!(
                "this agent's SVID ({id}) was superseded and the server refuses to renew it"
            ),
            other => format!("the server refuses this agent ({id}): {other}"),
        }
    }

    /// What the operator does about it when the agent has no join token.
    pub fn fix(&self) -> &'static str {
        match self.refusal {
            Refusal::Banned => {
                "a banned agent cannot come back: lift the ban (tessera-server agent evict --id ID --unban), then restart with --join-token (tessera-server token generate)"
            }
            _ => "restart with --join-token (tessera-server token generate)",
        }
    }
}

/// The agent's standing with the server: whether its identity is dead,
/// and since when no server could be reached.
#[derive(Debug, Default)]
pub struct Standing {
    death: Mutex<Option<Death>>,
    died: Notify,
    unreachable_since: Mutex<Option<i64>>,
    /// Refusals carried by TLS alerts on the agent's connections.
    pub alerts: AlertSlot,
    /// Asks the renewal loop to renew at once (the server called the SVID
    /// superseded: `RenewAgent` decides whether it is dead).
    pub renew_now: Notify,
}

impl Standing {
    /// Why the identity is dead, if it is.
    pub fn death(&self) -> Option<Death> {
        self.death.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records that the identity is dead (the first cause is kept).
    pub fn die(&self, death: Death) {
        let mut slot = self.death.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(death);
            self.died.notify_one();
        }
    }

    fn revive(&self) {
        *self.death.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// No server answered at `now` (kept from the first failure on).
    pub fn unreachable(&self, now: i64) {
        self.unreachable_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
    }

    /// A server answered.
    pub fn reached(&self) {
        *self.unreachable_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Since when no server could be reached.
    pub fn unreachable_since(&self) -> Option<i64> {
        *self.unreachable_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a refusal of a call that presented the SVID with serial `used`
/// ends the identity whose current serial is `current`: a refusal of an
/// SVID the agent no longer holds says nothing; `superseded` ends it only
/// when `RenewAgent` says it (elsewhere it means a renewal is due).
pub fn ends_identity(refusal: Refusal, call: Call, used: &str, current: &str) -> bool {
    used == current
        && (refusal.ends_identity() || (refusal == Refusal::Superseded && call == Call::Renew))
}

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
            _ = link.standing.died.notified() => {}
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
                None => "no join token was given".to_string(),
            };
            let message = format!("{cause}: dropped it, and {why}: {}", death.fix());
            error!("{message}");
            return Err(AgentError::IdentityDead(message));
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
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
            let message =
                format!("{cause}: dropped it, and attesting again with the join token given failed: {failure}");
            error!("{message}");
            return Err(AgentError::IdentityDead(message));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superseded_ends_an_identity_only_when_renewal_refuses_the_one_held() {
        assert!(!ends_identity(Refusal::Superseded, Call::Sync, "a", "a"));
        assert!(!ends_identity(Refusal::Superseded, Call::Sign, "a", "a"));
        assert!(ends_identity(Refusal::Superseded, Call::Renew, "a", "a"));
        assert!(!ends_identity(Refusal::Superseded, Call::Renew, "old", "new"));
        for dead in [Refusal::Banned, Refusal::Revoked, Refusal::UnknownAgent, Refusal::Evicted] {
            assert!(ends_identity(dead, Call::Sync, "a", "a"), "{dead}");
            assert!(!ends_identity(dead, Call::Sync, "old", "new"), "{dead}: renewed since");
        }
        assert!(!ends_identity(Refusal::RateLimited, Call::Sync, "a", "a"));
    }
}
