//! The typed refusals of the node API: what the server sends in the
//! [`REFUSAL_METADATA`] metadata of a refused call, and what the agent acts
//! on. Decided here once, for both sides: the server attaches a code with
//! [`Refusal::attach`], the agent reads it with [`Refusal::of`]; neither
//! ever matches message text.

use std::fmt;
use std::str::FromStr;

/// Metadata key of a node API refusal that the agent acts on; its value is
/// a [`Refusal`] code (`banned`, `revoked`, ...).
pub const REFUSAL_METADATA: &str = "tessera-refusal";

/// Why the server refused an agent (or an attestation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The agent is banned (`tessera-server agent ban`).
    Banned,
    /// The SVID the agent presented is revoked (banned or evicted agent,
    /// or `svid revoke`).
    Revoked,
    /// The SVID the agent presented is not its current one (a renewal
    /// replaced it).
    Superseded,
    /// No agent of that ID is on record (never attested, or evicted).
    UnknownAgent,
    /// The agent was evicted while its Sync stream was open.
    Evicted,
    /// The SVID the agent presented has expired.
    Expired,
    /// Too many refused attestations from the caller's address
    /// (`ResourceExhausted`).
    RateLimited,
    /// The join token needs a second operator's approval.
    ApprovalRequired,
    /// A token or attestation for the ID of an agent on record.
    AgentExists,
    /// A token or attestation for the SPIFFE ID of an entry.
    EntryIdentity,
    /// A signing item refused because the agent's SVID was renewed while
    /// the server signed (in the item's status, not the call's): the agent
    /// signs again at once with its new SVID.
    AgentSvidChanged,
    /// A signing item whose entry was deleted, or changed so that it no
    /// longer authorizes the SVID, while the server signed (in the item's
    /// status): the SVID was revoked as it was recorded.
    EntryChanged,
}

impl Refusal {
    /// Every code, for tests and documentation.
    pub const ALL: [Refusal; 12] = [
        Self::Banned,
        Self::Revoked,
        Self::Superseded,
        Self::UnknownAgent,
        Self::Evicted,
        Self::Expired,
        Self::RateLimited,
        Self::ApprovalRequired,
        Self::AgentExists,
        Self::EntryIdentity,
        Self::AgentSvidChanged,
        Self::EntryChanged,
    ];

    /// The code on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Banned => "banned",
            Self::Revoked => "revoked",
            Self::Superseded => "superseded",
            Self::UnknownAgent => "unknown-agent",
            Self::Evicted => "evicted",
            Self::Expired => "expired",
            Self::RateLimited => "rate-limited",
            Self::ApprovalRequired => "approval-required",
            Self::AgentExists => "agent-exists",
            Self::EntryIdentity => "entry-identity",
            Self::AgentSvidChanged => "agent-svid-changed",
            Self::EntryChanged => "entry-changed",
        }
    }

    /// The refusal a status carries, if the server attached one.
    pub fn of(status: &tonic::Status) -> Option<Self> {
        status.metadata().get(REFUSAL_METADATA)?.to_str().ok()?.parse().ok()
    }

    /// Attaches this code to `status`.
    pub fn attach(self, mut status: tonic::Status) -> tonic::Status {
        status
            .metadata_mut()
            .insert(REFUSAL_METADATA, tonic::metadata::MetadataValue::from_static(self.as_str()));
        status
    }

    /// Whether the agent identity the refused call presented can never
    /// work again, so the agent must drop it and attest anew. `Superseded`
    /// is not: it normally means the agent renewed; the agent treats it
    /// as dead only when `RenewAgent` itself refuses the SVID it holds.
    pub const fn ends_identity(self) -> bool {
        matches!(
            self,
            Self::Banned | Self::Revoked | Self::UnknownAgent | Self::Evicted | Self::Expired
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code this version does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRefusal(pub String);

impl fmt::Display for UnknownRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown refusal code {:?}", self.0)
    }
}

impl std::error::Error for UnknownRefusal {}

impl FromStr for Refusal {
    type Err = UnknownRefusal;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRefusal(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_a_status() {
        for refusal in Refusal::ALL {
            assert_eq!(refusal.as_str().parse::<Refusal>(), Ok(refusal));
            let status = refusal.attach(tonic::Status::permission_denied("whatever the text"));
            assert_eq!(Refusal::of(&status), Some(refusal));
        }
        assert_eq!(Refusal::of(&tonic::Status::permission_denied("agent x is banned")), None);
        assert!("Banned".parse::<Refusal>().is_err());
    }
}
