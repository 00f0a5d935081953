//! Request rules the server and the agent both apply, written once: the
//! agent checks a workload's request with them before asking the server,
//! and the server checks the agent's request with the same functions.

use std::fmt;

/// Largest node API request the server decodes (`SignX509`, `SignJWT`,
/// `PushEvents`): a full `SignX509` batch of 1,000 P-256 CSRs is about
/// 300 KB. The agent sizes its event pushes to stay under it.
pub const MAX_NODE_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Largest gRPC message a server or an agent accepts or sends (the
/// admin API, Sync messages, answers).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Most audiences one JWT-SVID request may name.
pub const MAX_REQUEST_AUDIENCES: usize = 16;

/// Whether `audience` may be a JWT-SVID audience (in a request or an
/// entry's policy): 1 to 256 characters, no control characters or spaces.
pub use tessera_workload_api::jwt::valid_audience;

/// Why a JWT-SVID request's audiences are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudienceError {
    /// No audience.
    Missing,
    /// More than [`MAX_REQUEST_AUDIENCES`] distinct audiences.
    TooMany,
    /// An audience that is empty, too long, or has spaces or control
    /// characters (its first 64 characters).
    Invalid(String),
}

impl fmt::Display for AudienceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "audience must be specified"),
            Self::TooMany => {
                write!(f, "a JWT-SVID needs 1 to {MAX_REQUEST_AUDIENCES} audiences")
            }
            Self::Invalid(a) => {
                write!(f, "invalid audience {a:?}: want 1-256 printable characters, no spaces")
            }
        }
    }
}

impl std::error::Error for AudienceError {}

/// A JWT-SVID request's audiences, checked, sorted and deduplicated.
pub fn requested_audiences(audience: &[String]) -> Result<Vec<String>, AudienceError> {
    if audience.is_empty() {
        return Err(AudienceError::Missing);
    }
    let mut out = audience.to_vec();
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_REQUEST_AUDIENCES {
        return Err(AudienceError::TooMany);
    }
    if let Some(bad) = out.iter().find(|a| !valid_audience(a)) {
        return Err(AudienceError::Invalid(shortened(bad)));
    }
    Ok(out)
}

/// At most the first 64 characters of what a caller sent, for a refusal
/// message (which travels back in a header and into the event stream).
pub fn shortened(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Whether an entry with `expires_at` (0: never) has expired at `now`.
pub fn entry_expired(expires_at: i64, now: i64) -> bool {
    expires_at != 0 && now >= expires_at
}

/// What of an entry goes into, or authorizes, an X509-SVID signed for it.
#[derive(Debug, Clone, Copy)]
pub struct SvidBasis<'a> {
    /// The SPIFFE ID.
    pub spiffe_id: &'a str,
    /// The agent it is issued through.
    pub parent_id: &'a str,
    /// DNS SANs.
    pub dns_names: &'a [String],
    /// The entry's expiry (0: none).
    pub expires_at: i64,
    /// The X509-SVID lifetime.
    pub x509_svid_ttl: u32,
}

impl SvidBasis<'_> {
    /// Whether this (current) entry still authorizes an SVID signed for
    /// `signed_for` and valid until `svid_expires_at`: same SPIFFE ID, same
    /// parent, same DNS names, not valid past the entry's expiry. The rule
    /// that decides which entry changes revoke issued SVIDs.
    pub fn authorizes_svid_of(&self, signed_for: &SvidBasis<'_>, svid_expires_at: i64) -> bool {
        self.spiffe_id == signed_for.spiffe_id
            && self.parent_id == signed_for.parent_id
            && self.dns_names == signed_for.dns_names
            && (self.expires_at == 0 || svid_expires_at <= self.expires_at)
    }

    /// Whether an SVID signed for `signed_for` is still right to serve for
    /// this entry: still authorized (above, for any SVID it could hold), and
    /// signed with the same lifetime and expiry, so that the agent re-issues
    /// on every change that the certificate reflects and keeps no SVID the
    /// server revoked.
    pub fn serves_svid_of(&self, signed_for: &SvidBasis<'_>) -> bool {
        self.authorizes_svid_of(signed_for, signed_for.expires_at)
            && self.x509_svid_ttl == signed_for.x509_svid_ttl
            && self.expires_at == signed_for.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basis<'a>(dns: &'a [String], expires_at: i64, ttl: u32) -> SvidBasis<'a> {
        SvidBasis {
            spiffe_id: "spiffe://td/w",
            parent_id: "spiffe://td/agent",
            dns_names: dns,
            expires_at,
            x509_svid_ttl: ttl,
        }
    }

    #[test]
    fn audiences_are_sorted_deduplicated_and_bounded() {
        let aud = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(requested_audiences(&aud(&["b", "a", "b"])), Ok(aud(&["a", "b"])));
        assert_eq!(requested_audiences(&[]), Err(AudienceError::Missing));
        let many: Vec<String> = (0..=MAX_REQUEST_AUDIENCES).map(|i| i.to_string()).collect();
        assert_eq!(requested_audiences(&many), Err(AudienceError::TooMany));
        let repeated = vec!["x".to_string(); 100];
        assert!(requested_audiences(&repeated).is_ok(), "the limit counts distinct audiences");
        assert!(matches!(requested_audiences(&aud(&["a b"])), Err(AudienceError::Invalid(_))));
    }

    #[test]
    fn an_entry_expires_at_its_time_and_never_without_one() {
        assert!(!entry_expired(0, i64::MAX));
        assert!(!entry_expired(100, 99));
        assert!(entry_expired(100, 100));
    }

    #[test]
    fn a_ttl_change_keeps_authorization_but_not_what_is_served() {
        let dns = vec!["a.example".to_string()];
        let (old, new) = (basis(&dns, 0, 60), basis(&dns, 0, 120));
        assert!(new.authorizes_svid_of(&old, 1_000));
        assert!(!new.serves_svid_of(&old));
        let other_dns = vec!["b.example".to_string()];
        assert!(!basis(&other_dns, 0, 60).authorizes_svid_of(&old, 1_000));
        assert!(!basis(&dns, 500, 60).authorizes_svid_of(&old, 1_000), "SVID outlives the entry");
    }
}
