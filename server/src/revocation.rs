//! Revocation: stored durably (and logged for every agent) in the commit
//! that decides it, listed in signed CRLs until the certificate's own
//! expiry. Sync streams push both from the change log.
//! Also the expiry of task-scoped (just-in-time) entries.

use std::sync::Arc;

use tessera_proto::types as pb;
use tonic::Status;
use tracing::warn;

use crate::ca::{Ca, CrlEntry};
use crate::event_schema::{self as schema, kind, EventExt};
use crate::state::State;
use crate::store::{revocation_of, Audit, CrlSigner, EntryWrite};

/// CRLs are valid this long and re-signed at half of it.
pub const CRL_VALIDITY_SECS: i64 = 24 * 3600;

/// Normalizes an operator-given serial (hex, any case, optional colons or
/// leading zero bytes) to the server's form.
pub fn normalize_serial(input: &str) -> Result<String, String> {
    let hex: String = input.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid serial {input:?}: want hex digits, e.g. 4f3a..."));
    }
    let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    let mut trimmed = hex.as_str();
    while trimmed.len() > 2 && trimmed.starts_with("00") {
        trimmed = &trimmed[2..];
    }
    if trimmed.len() > 40 {
        return Err(format!("invalid serial {input:?}: longer than 20 bytes"));
    }
    Ok(trimmed.to_string())
}

/// The CA as the store's CRL signer: one CRL per CA in the bundle.
#[derive(Debug)]
pub struct CaCrlSigner(pub Arc<Ca>);

impl CrlSigner for CaCrlSigner {
    fn sign_crls(
        &self,
        revocations: &[&pb::Revocation],
        number: u64,
    ) -> Result<Vec<Vec<u8>>, String> {
        let entries: Vec<CrlEntry<'_>> = revocations
            .iter()
            .filter(|r| r.jti.is_empty())
            .map(|r| CrlEntry { serial: &r.serial, revoked_at: r.revoked_at, ca_seq: r.ca_seq })
            .collect();
        self.0
            .sign_crls(&entries, number, CRL_VALIDITY_SECS)
            .map_err(|e| format!("CRL signing failed: {e}"))
    }
}

/// Re-signs the CRLs (the store logs the change every Sync stream sends)
/// and hands them to the node API's TLS verifier.
pub async fn refresh_crls(state: &State) -> Result<(), Status> {
    state.store_op(|store| store.resign_crls()).await?;
    update_verifier_crls(state).await
}

/// Gives the node API's TLS verifier the CRLs in force.
pub async fn update_verifier_crls(state: &State) -> Result<(), Status> {
    let crls = state.store_op(|store| store.crls()).await?;
    if let Err(e) = state.anchors().update_crls(&crls) {
        warn!(error = %e, "node API verifier refused the new CRLs");
    }
    Ok(())
}

/// After a commit that revoked (it stored CRLs listing what it revoked,
/// and the revocations' events): hands the CRLs to the node API's verifier.
pub async fn revoked(state: &State, revocations: &[pb::Revocation]) -> Result<(), Status> {
    if revocations.is_empty() {
        return Ok(());
    }
    update_verifier_crls(state).await
}

/// Revokes `issued` SVIDs: stored (durably, with the change logged for
/// every agent and an event per revocation, made for `operator`) first,
/// then CRLs re-signed. Returns the revocations.
pub async fn revoke_issued(
    state: &State,
    issued: Vec<pb::IssuedSvid>,
    reason: &str,
    operator: Option<&pb::Operator>,
) -> Result<Vec<pb::Revocation>, Status> {
    let now = state.clock().now();
    let revocations: Vec<pb::Revocation> =
        issued.iter().map(|svid| revocation_of(svid, reason, now)).collect();
    let (stored, operator) = (revocations.clone(), operator.copied());
    state
        .store_op(move |store| store.revoke(&stored, &Audit::new(operator, |_| Vec::new())))
        .await?;
    revoked(state, &revocations).await?;
    Ok(revocations)
}

/// Deletes entries that reached their `expires_at` and revokes their SVIDs
/// (one commit, with the events). Returns how many entries expired.
pub async fn expire_entries(state: &State) -> Result<usize, Status> {
    let now = state.clock().now();
    let ids = state.store_op(move |store| store.expired_entries(now)).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let describe = |write: &EntryWrite| -> Vec<pb::Event> {
        write
            .results
            .iter()
            .flatten()
            .map(|entry| {
                let mut e = schema::event(kind::ENTRY_EXPIRE, "")
                    .agent(entry.parent_id.to_string())
                    .spiffe_id(entry.spiffe_id.to_string())
                    .entry(entry.id.clone());
                e.before = crate::events::entry_json(&entry.to_proto());
                e
            })
            .collect()
    };
    let write = state
        .store_op(move |store| {
            store.delete_entries(&ids, now, "entry expired", &Audit::new(None, describe))
        })
        .await?;
    revoked(state, &write.revoked).await?;
    Ok(write.results.iter().flatten().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalized() {
        assert_eq!(normalize_serial("4F:3A:00").unwrap(), "4f3a00");
        assert_eq!(normalize_serial("00004f").unwrap(), "4f");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert!(normalize_serial(&"ab".repeat(21)).is_err());
    }
}
