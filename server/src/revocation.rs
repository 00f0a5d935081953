//! Revocation: stored durably before anyone is told, listed in signed CRLs
//! until the certificate's own expiry, and pushed to every agent at once.
//! Also the expiry of task-scoped (just-in-time) entries.

use std::sync::Arc;

use tessera_proto::types as pb;
use tonic::Status;
use tracing::{info, warn};

use crate::ca::CrlEntry;
use crate::state::{EntryEvent, State};

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

/// Re-signs the CRLs from the stored revocations and publishes them.
pub async fn refresh_crls(state: &State) -> Result<Arc<Vec<Vec<u8>>>, Status> {
    let (revocations, number) =
        state.store_op(|store| Ok((store.revocations()?, store.next_crl_number()?))).await?;
    let entries: Vec<CrlEntry> = revocations
        .iter()
        .map(|r| CrlEntry { serial: r.serial.clone(), revoked_at: r.revoked_at, ca_seq: r.ca_seq })
        .collect();
    let crls = state
        .ca
        .sign_crls(&entries, number, CRL_VALIDITY_SECS)
        .map_err(|e| Status::internal(format!("CRL signing failed: {e}")))?;
    let crls = Arc::new(crls);
    state.crls.send_replace(crls.clone());
    Ok(crls)
}

/// Revokes `issued` SVIDs: stored (durably) first, then CRLs re-signed, then
/// pushed to every agent. Returns the stored revocations.
pub async fn revoke_issued(
    state: &State,
    issued: Vec<pb::IssuedSvid>,
    reason: &str,
) -> Result<Vec<pb::Revocation>, Status> {
    if issued.is_empty() {
        return Ok(Vec::new());
    }
    let now = state.clock.now();
    let revocations: Vec<pb::Revocation> = issued
        .iter()
        .map(|svid| pb::Revocation {
            serial: svid.serial.clone(),
            reason: reason.to_string(),
            revoked_at: now,
            expires_at: svid.expires_at,
            spiffe_id: svid.spiffe_id.clone(),
            ca_seq: svid.ca_seq,
        })
        .collect();
    let stored = revocations.clone();
    state.store_op(move |store| store.revoke(&stored)).await?;
    for r in &revocations {
        info!(target: "tessera::audit", serial = %r.serial, spiffe_id = %r.spiffe_id, reason, "X509-SVID revoked");
    }
    let crls = refresh_crls(state).await?;
    let serials = Arc::new(revocations.iter().map(|r| r.serial.clone()).collect());
    state.publish(EntryEvent::Revoked { serials, crls });
    Ok(revocations)
}

/// Revokes every SVID issued for `entry_ids`: one store read, one
/// revocation write, one CRL signing and one push for the whole batch.
pub async fn revoke_for_entries(
    state: &State,
    entry_ids: Vec<String>,
    reason: &str,
) -> Result<Vec<pb::Revocation>, Status> {
    if entry_ids.is_empty() {
        return Ok(Vec::new());
    }
    let issued = state
        .store_op(move |store| {
            let mut issued = Vec::new();
            for id in &entry_ids {
                issued.extend(store.issued_for_entry(id)?);
            }
            Ok(issued)
        })
        .await?;
    revoke_issued(state, issued, reason).await
}

/// Deletes entries that reached their `expires_at` and revokes their SVIDs.
/// Returns how many entries expired.
pub async fn expire_entries(state: &State) -> Result<usize, Status> {
    let now = state.clock.now();
    let ids = state.store_op(move |store| store.expired_entries(now)).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let delete = ids.clone();
    let results = state.store_op(move |store| store.delete_entries(&delete)).await?;
    let mut expired = Vec::new();
    for result in results {
        let Ok(entry) = result else { continue };
        info!(target: "tessera::audit", entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "entry expired");
        state.publish(EntryEvent::Removed {
            id: entry.id.clone(),
            parent_id: entry.parent_id.clone(),
            revision: entry.revision,
        });
        expired.push(entry.id);
    }
    let count = expired.len();
    if let Err(e) = revoke_for_entries(state, expired, "entry expired").await {
        warn!(entries = count, error = %e.message(), "revoking SVIDs of expired entries failed");
    }
    Ok(count)
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
