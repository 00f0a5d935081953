//! Whether the agent's identity still stands, from typed signals only: a
//! refusal (`banned`, `revoked`, `unknown-agent`, `evicted`, `expired`;
//! `superseded` only when `RenewAgent` refuses the SVID the agent holds)
//! in a call's metadata, or the `certificate_revoked` TLS alert of a
//! handshake — and since when no server could be reached, for health.
//! The rule ([`ends_identity`]) is decided here once; the link, the
//! renewal and `recovery` act on it. Depends on `node::client` (the alert
//! slot) only.

use std::sync::Mutex;

use tessera_proto::Refusal;
use tokio::sync::Notify;

use crate::node::client::AlertSlot;

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
    /// Pushing events.
    Push,
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
                "a banned agent cannot come back: lift the ban (tessera-server agent evict --id ID --unban), then restart with a new join token (--join-token-file F; tessera-server token generate)"
            }
            _ => "restart with a new join token (--join-token-file F; tessera-server token generate)",
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

    /// Waits until [`Self::die`] records a death.
    pub async fn died(&self) {
        self.died.notified().await;
    }

    /// A new identity stands (attested again).
    pub fn revive(&self) {
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
