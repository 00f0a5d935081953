//! Every server's CA records: the trust bundle is their union, and a
//! server's change to its own is a bundle change in the log.

use prost::Message;
use tessera_proto::types as pb;

use super::audit::Audit;
use super::error::StoreError;
use super::kv::Pairs;
use super::kv_store::KvStore;
use super::layout::{t, CAS};
use super::ChangeKind;

impl KvStore {
    pub(super) fn publish_cas(
        &self,
        server_id: &str,
        cas: &[pb::CaRecord],
    ) -> Result<bool, StoreError> {
        let prefix = format!("{server_id}\0");
        self.commit(&Audit::quiet(), |tx| {
            let before = tx.txn.scan_prefix(t(CAS), prefix.as_bytes())?;
            let after: Pairs = cas
                .iter()
                .map(|ca| {
                    let key = format!("{prefix}{:010}", ca.seq).into_bytes();
                    (key, ca.encode_to_vec())
                })
                .collect();
            if before == after {
                return Ok(false);
            }
            for (key, _) in &before {
                tx.remove(CAS, key)?;
            }
            for (key, value) in after {
                tx.put(CAS, key, value);
            }
            tx.log(ChangeKind::Bundle);
            Ok(true)
        })
    }

    pub(super) fn cas(&self) -> Result<Vec<pb::CaRecord>, StoreError> {
        self.decode_tree(t(CAS))
    }
}
