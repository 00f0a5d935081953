//! The workload SVIDs the agent holds: the cache of entries, X509-SVIDs and
//! bundles that the Workload API serves from, the X.509 signer that keeps
//! an SVID for every entry (rotated at half-life), and the JWT-SVID cache.
//!
//! Dependencies: `cache` depends on nothing in the crate; the signers reach
//! the server only through `node::link`. Nothing here uses `workload/`.

pub mod cache;
pub mod jwt;
pub mod x509;

/// Most items sent in one `SignX509` or `SignJWT` call.
pub const SIGN_BATCH: usize = 500;

/// What the agent does with one item of a signing answer, decided by its
/// status code and typed refusal (`types.Status.refusal`), never by the
/// words of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Signed.
    Signed,
    /// Refused because the agent's SVID was renewed while the server
    /// signed (`agent-svid-changed`): sign it again with the new SVID.
    SignAgain,
    /// Refused for good (for now): retry later.
    Refused,
}

impl ItemOutcome {
    /// The outcome of an item with `status` (none: signed).
    pub fn of(status: Option<&tessera_proto::types::Status>) -> Self {
        match status {
            None => Self::Signed,
            Some(s) if s.code == 0 => Self::Signed,
            Some(s) if s.refusal.parse() == Ok(tessera_proto::Refusal::AgentSvidChanged) => {
                Self::SignAgain
            }
            Some(_) => Self::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ItemOutcome;
    use tessera_proto::types::Status;

    /// The typed refusal decides, whatever the message says: an item
    /// refused as `agent-svid-changed` in other words is signed again, and
    /// one with the old words but no code is not.
    #[test]
    fn a_renewal_during_signing_is_recognised_by_its_code_not_its_words() {
        let refused = |message: &str, refusal: &str| Status {
            code: tonic::Code::PermissionDenied as i32,
            message: message.into(),
            refusal: refusal.into(),
        };
        assert_eq!(
            ItemOutcome::of(Some(&refused("anything at all", "agent-svid-changed"))),
            ItemOutcome::SignAgain
        );
        assert_eq!(
            ItemOutcome::of(Some(&refused(tessera_proto::AGENT_SVID_CHANGED, ""))),
            ItemOutcome::Refused
        );
        assert_eq!(
            ItemOutcome::of(Some(&refused("entry deleted while signing", "banned"))),
            ItemOutcome::Refused
        );
        assert_eq!(ItemOutcome::of(Some(&Status::default())), ItemOutcome::Signed);
        assert_eq!(ItemOutcome::of(None), ItemOutcome::Signed);
    }
}
