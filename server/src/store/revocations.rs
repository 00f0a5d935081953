//! Revocations: stored once each, logged, with an event each and (for
//! X509-SVIDs) the CRLs re-signed in the same commit; read back, and pruned
//! with the issued records once their certificates expired.

use prost::Message;
use tessera_proto::types as pb;

use super::audit::Audit;
use super::commit::{Tx, TxResult};
use super::error::StoreError;
use super::issued_index::{decode_row, encode_batch};
use super::kv::scan_prefix;
use super::kv_store::KvStore;
use super::layout::{
    decode, index_key, owner_of, svid_key, t, CRLS_KEY, ISSUED, ISSUED_BY_OWNER, META, REVOCATIONS,
};
use super::{ChangeKind, RevokedJwt};
use crate::event_schema::{self as schema, kind, EventExt};

/// A revocation of `svid` at `now`.
pub fn revocation_of(svid: &pb::IssuedSvid, reason: &str, now: i64) -> pb::Revocation {
    pb::Revocation {
        serial: svid.serial.clone(),
        reason: reason.to_string(),
        revoked_at: now,
        expires_at: svid.expires_at,
        spiffe_id: svid.spiffe_id.clone(),
        ca_seq: svid.ca_seq,
        jti: svid.jti.clone(),
        agent_id: svid.agent_id.clone(),
        entry_id: svid.entry_id.clone(),
    }
}

/// The event of a stored revocation, made for `operator` (whose words are
/// the reason; the code is fixed) or by the server.
pub(super) fn revocation_event(r: &pb::Revocation, operator: Option<&pb::Operator>) -> pb::Event {
    let code = if operator.is_some() { schema::OPERATOR } else { "revoked" };
    let mut e = schema::denied(kind::REVOKE, r.reason.clone())
        .code(code)
        .agent(r.agent_id.clone())
        .spiffe_id(r.spiffe_id.clone())
        .operator(operator.cloned())
        .attr("type", if r.jti.is_empty() { "x509" } else { "jwt" })
        .attr("expires_at", r.expires_at);
    if !r.entry_id.is_empty() {
        e.entry_ids.push(r.entry_id.clone());
    }
    e.serial = r.serial.clone();
    e.jti = r.jti.clone();
    e
}

impl Tx<'_> {
    /// Stores revocations (skipping serials already revoked) and logs them.
    pub(super) fn revoke(&self, revocations: &[pb::Revocation]) -> TxResult<Vec<pb::Revocation>> {
        let mut stored = Vec::new();
        for revocation in revocations {
            let key = svid_key(&revocation.serial, &revocation.jti);
            if self.get(REVOCATIONS, key.as_bytes())?.is_some() {
                continue;
            }
            self.put(REVOCATIONS, key.as_bytes(), revocation.encode_to_vec());
            self.events.borrow_mut().push(revocation_event(revocation, self.operator.as_ref()));
            stored.push(revocation.clone());
        }
        if !stored.is_empty() {
            let (jwts, x509): (Vec<&pb::Revocation>, Vec<&pb::Revocation>) =
                stored.iter().partition(|r| !r.jti.is_empty());
            self.log(ChangeKind::Revoked {
                serials: x509.iter().map(|r| r.serial.clone()).collect(),
                jwts: jwts
                    .iter()
                    .map(|r| RevokedJwt { jti: r.jti.clone(), expires_at: r.expires_at })
                    .collect(),
            });
            // Only X509-SVIDs are listed in CRLs.
            if !x509.is_empty() {
                self.revoked.borrow_mut().extend(x509.into_iter().cloned());
                self.resign.set(true);
            }
        }
        Ok(stored)
    }
}

impl KvStore {
    pub(super) fn load_revocations(&self) -> Result<(), StoreError> {
        if !self.kv.shared() {
            let mut stored = Vec::new();
            super::commit::keep_sorted(&mut stored, self.revocations()?);
            self.lock().revocations = stored;
        }
        Ok(())
    }

    pub(super) fn resign_crls(&self) -> Result<u64, StoreError> {
        self.commit(&Audit::quiet(), |tx| {
            tx.resign.set(true);
            Ok(())
        })?;
        self.revision()
    }

    pub(super) fn crls(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        // Every server's: `crls` alone on sled, `crls/<server>` when shared.
        let mut out = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(META), CRLS_KEY.as_bytes())? {
            if key == CRLS_KEY.as_bytes() || key.starts_with(b"crls/") {
                out.extend(decode::<pb::Crls>(&key, &bytes)?.crls);
            }
        }
        Ok(out)
    }

    pub(super) fn revoke(
        &self,
        revocations: &[pb::Revocation],
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError> {
        self.commit(audit, |tx| tx.revoke(revocations).map(drop))
    }

    pub(super) fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError> {
        self.kv
            .get(t(REVOCATIONS), serial.as_bytes())?
            .map(|b| decode(serial.as_bytes(), &b))
            .transpose()
    }

    pub(super) fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError> {
        self.decode_tree(t(REVOCATIONS))
    }

    pub(super) fn prune_expired(&self, now: i64) -> Result<usize, StoreError> {
        // Expired records stay expired: find the rows holding any without
        // the lock, then prune them in one commit, which reads them again.
        let mut rows = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(ISSUED), b"")? {
            if decode_row(&key, &bytes)?.iter().any(|svid| svid.expires_at <= now) {
                rows.push(key);
            }
        }
        let mut revocations = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(REVOCATIONS), b"")? {
            if decode::<pb::Revocation>(&key, &bytes)?.expires_at <= now {
                revocations.push(key);
            }
        }
        if rows.is_empty() && revocations.is_empty() {
            return Ok(0);
        }
        let mut writer = self.lock();
        let shared = self.kv.shared();
        let gone = self.commit_locked(&mut writer, &Audit::quiet(), |tx| {
            tx.prefetch(ISSUED, rows.iter().cloned())?;
            let mut gone = Vec::new();
            for row in &rows {
                let Some(bytes) = tx.get(ISSUED, row)? else { continue };
                let (expired, kept): (Vec<_>, Vec<_>) =
                    decode_row(row, &bytes)?.into_iter().partition(|s| s.expires_at <= now);
                if expired.is_empty() {
                    continue;
                } else if kept.is_empty() {
                    tx.forget(ISSUED, row);
                } else {
                    tx.put(ISSUED, row, encode_batch(&kept));
                }
                for svid in expired {
                    let key = svid_key(&svid.serial, &svid.jti);
                    if shared {
                        tx.forget(ISSUED_BY_OWNER, index_key(&owner_of(&svid), &key));
                    }
                    gone.push((owner_of(&svid), key));
                }
            }
            for key in &revocations {
                tx.remove(REVOCATIONS, key)?;
            }
            Ok(gone)
        })?;
        writer.revocations.retain(|r| r.expires_at > now);
        if !shared {
            let mut index = self.index_mut();
            gone.iter().for_each(|(owner, key)| index.remove(owner, key));
        }
        Ok(gone.len() + revocations.len())
    }
}
