//! How the store lays its records out in the key-value database: the
//! trees, the keys of the `meta` tree, the index keys, and the decoding of
//! stored records (a record that does not decode is [`StoreError::Corrupt`]).

use std::fmt;

use prost::Message;
use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;

use super::error::StoreError;
use crate::entry::Entry;

/// The trees, in the order of a backup.
pub(super) const TREE_NAMES: [&str; 17] = [
    "entries",
    "entries_by_parent",
    "entries_by_identity",
    "entries_by_expiry",
    "changes",
    "meta",
    "join_tokens",
    "agents",
    "issued_svids",
    "issued_by_owner",
    "revocations",
    "crls",
    "cas",
    // The token broker's records (JSON), appended: older backups restore.
    "broker_tasks",
    "broker_tokens",
    "broker_requests",
    "broker_keys",
];

pub(super) const ENTRIES: usize = 0;
pub(super) const BY_PARENT: usize = 1;
pub(super) const BY_IDENTITY: usize = 2;
pub(super) const BY_EXPIRY: usize = 3;
pub(super) const CHANGES: usize = 4;
pub(super) const META: usize = 5;
pub(super) const JOIN_TOKENS: usize = 6;
pub(super) const AGENTS: usize = 7;
pub(super) const ISSUED: usize = 8;
pub(super) const ISSUED_BY_OWNER: usize = 9;
pub(super) const REVOCATIONS: usize = 10;
pub(super) const CAS: usize = 12;
pub(super) const BROKER_TASKS: usize = 13;
pub(super) const BROKER_TOKENS: usize = 14;
pub(super) const BROKER_REQUESTS: usize = 15;
pub(super) const BROKER_KEYS: usize = 16;

pub(super) fn t(i: usize) -> &'static str {
    TREE_NAMES[i]
}

/// The tree of entries, by ID: the event log (in the same database)
/// reads it to learn baselines only for entries that exist.
pub(crate) fn entries_tree() -> &'static str {
    t(ENTRIES)
}

/// Whether entry `id` is stored in `kv`.
pub(crate) fn entry_stored(kv: &dyn super::kv::Kv, id: &str) -> Result<bool, StoreError> {
    Ok(kv.get(entries_tree(), id.as_bytes())?.is_some())
}

pub(super) const REVISION_KEY: &[u8] = b"revision";
pub(super) const WRITE_SEQ_KEY: &[u8] = b"write_seq";
/// The change log's start (absent: 1): the changes before it may be gone
/// (a row reaching past it is kept whole).
pub(super) const CHANGES_START_KEY: &[u8] = b"changes_start";

pub(super) const CRL_NUMBER_KEY: &str = "crl_number";
pub(super) const CRLS_KEY: &str = "crls";

/// The key an issued SVID or its revocation is stored under: an
/// X509-SVID's serial, or `jwt:<jti>` for a JWT-SVID (no hex serial has a
/// colon, so the two never collide).
pub fn svid_key(serial: &str, jti: &str) -> String {
    if jti.is_empty() {
        serial.to_string()
    } else {
        format!("jwt:{jti}")
    }
}

pub(super) fn parent_key(parent: &SpiffeId, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(parent.as_str().len() + 1 + id.len());
    key.extend_from_slice(parent.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub(super) fn expiry_key(expires_at: i64, id: &str) -> Vec<u8> {
    let mut key = expires_at.max(0).to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// The index owner of an issued SVID: its entry, or for an agent SVID
/// (no entry) the agent, under a prefix no entry ID can have.
pub(super) fn owner_of(svid: &pb::IssuedSvid) -> String {
    if svid.entry_id.is_empty() {
        agent_owner(&svid.agent_id)
    } else {
        svid.entry_id.clone()
    }
}

pub(super) fn agent_owner(agent_id: &str) -> String {
    format!("agent:{agent_id}")
}

pub(super) fn index_key(owner: &str, serial: &str) -> Vec<u8> {
    let mut key = owner.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(serial.as_bytes());
    key
}

pub(super) fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// A record stored as JSON (the broker's).
pub(super) fn decode_json<T: serde::de::DeserializeOwned>(
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// A record's JSON for storing.
pub(super) fn encode_json<T: serde::Serialize>(
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| corrupt(key, e))
}

pub(super) fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let p = pb::Entry::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    Entry::from_stored(p).map_err(|e| corrupt(e.to_string()))
}

/// A stored entry's SPIFFE ID alone (field 2 of `types.Entry`; prost skips
/// the other fields): for scans that compare only it, without decoding and
/// validating the whole entry. Stored IDs are written from parsed ones, so
/// they are already in canonical form.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredSpiffeId {
    #[prost(string, tag = "2")]
    spiffe_id: String,
}

/// A stored entry's SPIFFE ID (see [`StoredSpiffeId`]).
pub(super) fn entry_spiffe_id(key: &[u8], bytes: &[u8]) -> Result<String, StoreError> {
    decode::<StoredSpiffeId>(key, bytes).map(|e| e.spiffe_id)
}

pub(super) fn read_u64(value: Option<&[u8]>) -> u64 {
    value.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

pub(super) fn corrupt(key: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.into(), reason: e.to_string() }
}
