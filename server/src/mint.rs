//! Minting SVIDs for identities outside a node (SPIRE's `x509 mint` and
//! `jwt mint`): the rules an operator's mint request must pass, and the
//! signing. The server generates nothing secret for the caller: an X.509
//! mint signs the caller's CSR (its key never leaves the CLI), and a JWT
//! mint returns only the token. Every minted SVID is an `IssuedSvid` with no
//! entry and no agent, so it is recorded and revocable like any other.
//!
//! What one operator may not mint alone: an identity the approval policy
//! protects (a protected path, a TTL above the policy's limit, a protected
//! JWT audience) or one that an entry the policy matches holds. A mint is
//! refused for those rather than held as a proposal: a proposal would have
//! to keep the CSR and hand the certificate out after approval, and the
//! route a second operator already reviews is the entry (§7 of
//! ARCHITECTURE.md), so the refusal names it.
//!
//! Depends on `ca`, `config`, `csr`, `entry`, `governance`, `jwt`.

use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;

use crate::ca::jwt::SignedJwt;
use crate::ca::{Ca, SignedSvid};
use crate::config::Config;
use crate::entry::{is_dns_name, is_reserved, valid_audience, Entry, MAX_JWT_AUDIENCES};
use crate::policy::governance::ApprovalPolicy;

/// Why a mint is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The SPIFFE ID does not parse.
    #[error("invalid SPIFFE ID: {0}")]
    InvalidId(String),
    /// The SPIFFE ID is in another trust domain.
    #[error("SPIFFE ID {0} is not in trust domain {1}")]
    OtherTrustDomain(String, String),
    /// The SPIFFE ID is reserved for Tessera (root, `/tessera/...`).
    #[error("SPIFFE ID {0} is reserved for Tessera's own components")]
    Reserved(String),
    /// The SPIFFE ID is an attested agent's.
    #[error("SPIFFE ID {0} is an attested agent's; agents get their SVIDs by attesting")]
    AgentIdentity(String),
    /// The TTL is above the server's limit.
    #[error("TTL {ttl}s is above the server's maximum {max}s")]
    Ttl {
        /// Asked for.
        ttl: u32,
        /// The limit.
        max: u32,
    },
    /// A DNS name is not valid.
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    /// No audience, too many, or an invalid one.
    #[error("{0}")]
    Audience(String),
    /// The CSR is not a valid P-256 request.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// The approval policy protects the identity: one operator cannot mint it.
    #[error(
        "minting {id} needs a second operator ({}): one operator cannot mint it alone; register it as an entry instead (`tessera-server entry create --spiffe-id {id} ...`), which waits for another operator's `tessera-server entry approve`, and fetch it through an agent",
        reasons.join("; ")
    )]
    NeedsApproval {
        /// The identity.
        id: String,
        /// The policy rules it matched.
        reasons: Vec<String>,
    },
    /// The CA could not sign.
    #[error("cannot sign: {0}")]
    Ca(String),
}

impl MintError {
    /// The gRPC status code for this refusal.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::AgentIdentity(_) | Self::NeedsApproval { .. } => tonic::Code::FailedPrecondition,
            Self::Ca(_) => tonic::Code::Internal,
            _ => tonic::Code::InvalidArgument,
        }
    }
}

/// The identity of a mint request: a SPIFFE ID of this trust domain that
/// is not reserved.
pub fn identity(config: &Config, spiffe_id: &str) -> Result<SpiffeId, MintError> {
    let id = SpiffeId::parse(spiffe_id).map_err(|e| MintError::InvalidId(e.to_string()))?;
    if id.trust_domain() != &config.trust_domain {
        return Err(MintError::OtherTrustDomain(id.to_string(), config.trust_domain.to_string()));
    }
    if is_reserved(&id) {
        return Err(MintError::Reserved(id.to_string()));
    }
    Ok(id)
}

/// What a mint asks for, as the approval policy judges it.
#[derive(Debug, Clone, Copy)]
pub enum Minted<'a> {
    /// An X509-SVID with this TTL.
    X509 {
        /// Seconds.
        ttl: u32,
    },
    /// A JWT-SVID for these audiences.
    Jwt {
        /// The audiences.
        audience: &'a [String],
    },
}

/// Why minting `id` needs a second operator: the policy's rules for the
/// identity and what is minted, and every entry with this SPIFFE ID that
/// the policy matches (`entries`). Empty when one operator may mint it.
pub fn approval_reasons(
    policy: &ApprovalPolicy,
    id: &SpiffeId,
    minted: Minted<'_>,
    entries: &[Entry],
) -> Vec<String> {
    let mut why = policy.agent_id_reasons(id);
    match minted {
        Minted::X509 { ttl } => {
            if let Some(max) = policy.max_x509_svid_ttl {
                if ttl > max {
                    why.push(format!("X509-SVID TTL {ttl}s is above {max}s"));
                }
            }
        }
        Minted::Jwt { audience } => {
            for aud in audience {
                if policy.protected_jwt_audiences.contains(aud) {
                    why.push(format!("JWT audience {aud} is protected"));
                }
            }
        }
    }
    if let Some(entry) = entries.iter().find(|e| !policy.reasons(e).is_empty()) {
        why.push(format!("entry {} with this SPIFFE ID needs approval", entry.id));
    }
    why
}

/// The X509-SVID TTL of a mint: `ttl`, or the server's default for 0.
pub fn x509_ttl(config: &Config, ttl: u32) -> Result<u32, MintError> {
    ttl_within(if ttl == 0 { config.default_x509_svid_ttl } else { ttl }, config.max_x509_svid_ttl)
}

/// The JWT-SVID TTL of a mint: `ttl`, or the server's default for 0.
pub fn jwt_ttl(config: &Config, ttl: u32) -> Result<u32, MintError> {
    ttl_within(if ttl == 0 { config.default_jwt_svid_ttl } else { ttl }, config.max_jwt_svid_ttl)
}

fn ttl_within(ttl: u32, max: u32) -> Result<u32, MintError> {
    if ttl > max {
        return Err(MintError::Ttl { ttl, max });
    }
    Ok(ttl)
}

/// Signs an X509-SVID for `id` over the key of `csr` (DER PKCS#10), with
/// `dns_names`; returns it and its issuance record (no entry, no agent).
pub fn mint_x509(
    ca: &Ca,
    id: &SpiffeId,
    csr: &[u8],
    ttl: u32,
    dns_names: &[String],
) -> Result<(SignedSvid, pb::IssuedSvid), MintError> {
    if let Some(bad) = dns_names.iter().find(|n| !is_dns_name(n)) {
        return Err(MintError::DnsName(bad.clone()));
    }
    let key = crate::ca::csr::parse_csr(csr).map_err(|e| MintError::Csr(e.to_string()))?;
    let svid = ca.sign_svid(&key, id, ttl, dns_names).map_err(|e| MintError::Ca(e.to_string()))?;
    let record = pb::IssuedSvid {
        serial: svid.serial.clone(),
        spiffe_id: id.to_string(),
        entry_id: String::new(),
        agent_id: String::new(),
        expires_at: svid.expires_at,
        ca_seq: svid.ca_seq,
        jti: String::new(),
    };
    Ok((svid, record))
}

/// Checks the audiences of a JWT mint.
pub fn check_audience(audience: &[String]) -> Result<(), MintError> {
    if audience.is_empty() || audience.len() > MAX_JWT_AUDIENCES {
        return Err(MintError::Audience(format!(
            "a JWT-SVID needs 1 to {MAX_JWT_AUDIENCES} audiences"
        )));
    }
    if let Some(bad) = audience.iter().find(|a| !valid_audience(a)) {
        return Err(MintError::Audience(format!("invalid audience {bad:?}")));
    }
    Ok(())
}

/// Signs a JWT-SVID for `id` and `audience`; returns it and its issuance
/// record (no entry, no agent; keyed by its `jti`).
pub fn mint_jwt(
    ca: &Ca,
    id: &SpiffeId,
    audience: &[String],
    ttl: u32,
) -> Result<(SignedJwt, pb::IssuedSvid), MintError> {
    check_audience(audience)?;
    let (jwt, ca_seq) = ca.sign_jwt(id, audience, ttl).map_err(|e| MintError::Ca(e.to_string()))?;
    let record = pb::IssuedSvid {
        serial: String::new(),
        spiffe_id: id.to_string(),
        entry_id: String::new(),
        agent_id: String::new(),
        expires_at: jwt.expires_at,
        ca_seq,
        jti: jwt.jti.clone(),
    };
    Ok((jwt, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protected_identity_needs_a_second_operator() {
        let policy = ApprovalPolicy {
            protected_path_prefixes: vec!["/prod".into()],
            protected_jwt_audiences: vec!["bank".into()],
            max_x509_svid_ttl: Some(3600),
            ..Default::default()
        };
        let id = |p: &str| SpiffeId::parse(&format!("spiffe://example.org{p}")).unwrap();
        let free = approval_reasons(&policy, &id("/batch"), Minted::X509 { ttl: 60 }, &[]);
        assert!(free.is_empty(), "{free:?}");
        assert!(
            !approval_reasons(&policy, &id("/prod/db"), Minted::X509 { ttl: 60 }, &[]).is_empty()
        );
        assert!(
            !approval_reasons(&policy, &id("/batch"), Minted::X509 { ttl: 7200 }, &[]).is_empty()
        );
        let aud = ["bank".to_string()];
        assert!(!approval_reasons(&policy, &id("/batch"), Minted::Jwt { audience: &aud }, &[])
            .is_empty());
    }
}
