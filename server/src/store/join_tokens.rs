//! Join tokens: stored by their hash (never in the clear), for an agent ID
//! no agent or entry has, and taken once.

use prost::Message;
use tessera_proto::types as pb;

use super::audit::Audit;
use super::error::StoreError;
use super::kv_store::KvStore;
use super::layout::{decode, t, JOIN_TOKENS};
use super::AgentRefusal;

/// A join token's key in the store: its SHA-256, so the tokens that are
/// still usable cannot be read back from the datastore or a backup.
pub fn join_token_key(token: &str) -> Vec<u8> {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes())).into_bytes()
}

impl KvStore {
    pub(super) fn put_join_token(
        &self,
        token: &pb::JoinToken,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError> {
        let key = join_token_key(&token.token);
        let bytes = pb::JoinToken { token: String::new(), ..token.clone() }.encode_to_vec();
        self.commit(audit, |tx| {
            if let Err(refusal) = tx.agent_id_free(&token.spiffe_id)? {
                return Ok(Err(refusal));
            }
            tx.put(JOIN_TOKENS, &key, bytes.as_slice());
            Ok(Ok(()))
        })
    }

    pub(super) fn take_join_token(
        &self,
        token: &str,
        audit: &Audit<'_, Option<pb::JoinToken>>,
    ) -> Result<Option<pb::JoinToken>, StoreError> {
        let key = join_token_key(token);
        self.commit(audit, |tx| {
            tx.remove(JOIN_TOKENS, &key)?.map(|bytes| decode(b"join token", &bytes)).transpose()
        })
    }

    pub(super) fn join_token_exists(&self, token: &str) -> Result<bool, StoreError> {
        Ok(self.kv.get(t(JOIN_TOKENS), &join_token_key(token))?.is_some())
    }
}
