//! Durable storage: the `Store` trait the server needs, and its sled
//! implementation.
//!
//! Every write is one atomic commit, serialized with every other write, and
//! on disk before the method returns. A commit that changes anything an
//! agent must hear appends to the **change log** with the next revision, so
//! revision order is commit order and the log is the one source of truth
//! for Sync streams: a stream (live or resumed) sends exactly the changes
//! after the agent's revision, in order. Decisions that must not race
//! (a ban against a renewal, an entry delete against a signing batch) are
//! made inside the commit, never read-modify-written across two.
//!
//! Integrity: each commit bumps a write sequence, and a watermark file
//! beside the database records the last sequence acknowledged. A store
//! that opens behind its watermark (sled's recovery drops what follows a
//! damaged record, a restored old copy) is refused instead of being served
//! as if it were whole.

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;
use tessera_proto::types as pb;
use tessera_proto::Refusal;
use tessera_workload_api::SpiffeId;
use tokio::sync::watch;

use crate::approval::{self, ApprovalRefusal};
use crate::entry::{Entry, EntryError};
use crate::event_schema::{self as schema, kind, EventExt};
use kv::{prefix_end, scan_prefix, Kv, Lock, Op, Pairs, SledKv, Txn};

pub mod kv;
mod operator;
pub(crate) mod postgres;

/// The store's page cache.
pub const STORE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest number of items in one batch write.
pub const MAX_BATCH: usize = 1000;

/// Storage failures (not per-item refusals, which are [`EntryError`]s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption sled detected).
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("store: corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store is missing writes it acknowledged, or its records disagree
    /// with each other: it was damaged or rolled back.
    #[error(
        "store {path} is damaged: {reason}; restore a backup with `tessera-server store restore`"
    )]
    Damaged {
        /// The store directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The watermark file could not be read or written.
    #[error("store watermark {path}: {source}")]
    Watermark {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A commit shared by several callers failed (the reason, as text).
    #[error("store: {0}")]
    Group(String),
    /// A backup file is not a Tessera backup, or is truncated or altered.
    #[error("backup: {0}")]
    Backup(String),
    /// A file beside the database (the event sink) failed.
    #[error("{0}")]
    Io(String),
    /// Another process (a running server) holds the embedded store open.
    #[error("store {0} is in use by a running server")]
    InUse(String),
    /// The PostgreSQL datastore failed or cannot be reached.
    #[error("datastore: {0}")]
    Database(String),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

/// What changed at one revision of the change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChangeKind {
    /// An entry was created, updated or deleted. `parents` are the agents
    /// concerned (the old and the new parent of an update that moved it):
    /// each re-reads the entry and keeps it or drops it.
    Entry {
        /// The entry.
        entry_id: String,
        /// The parent IDs before and after the change.
        parents: Vec<String>,
    },
    /// SVIDs were revoked (every agent drops them; JWT-SVIDs are refused
    /// by every agent's validation until they expire).
    Revoked {
        /// Lowercase hex serials of X509-SVIDs.
        serials: Vec<String>,
        /// JWT-SVIDs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        jwts: Vec<RevokedJwt>,
    },
    /// The CRLs were re-signed ([`Store::crls`] has them).
    Crls,
    /// The trust bundle changed (CA prepared, activated or retired).
    Bundle,
    /// An agent was banned.
    AgentBanned {
        /// The agent.
        agent_id: String,
        /// The operator's reason.
        reason: String,
    },
    /// An agent was evicted: it must attest again.
    AgentEvicted {
        /// The agent.
        agent_id: String,
    },
}

/// A revoked JWT-SVID in the change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedJwt {
    /// The token's `jti`.
    pub jti: String,
    /// The token's `exp`: validators keep the revocation until then.
    pub expires_at: i64,
}

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

/// One record of the change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its revision: commit order, no gaps.
    pub revision: u64,
    /// What changed.
    pub kind: ChangeKind,
}

/// Filters for listing entries.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
}

/// The outcome of an entry update or delete batch.
#[derive(Debug, Default)]
pub struct EntryWrite {
    /// Per-item results, in request order (a delete's carries the deleted entry).
    pub results: Vec<Result<Entry, EntryError>>,
    /// The entries as they were before, per item (`None` when refused).
    pub previous: Vec<Option<Entry>>,
    /// SVIDs the batch revoked, in the same commit.
    pub revoked: Vec<pb::Revocation>,
}

/// What a renewal of an agent's SVID did: the agent as renewed and what
/// it revoked (the SVID of a lost reply), or its refusal.
pub type RenewOutcome = Result<(pb::Agent, Vec<pb::Revocation>), AgentRefusal>;

/// Why the store refused an agent operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentRefusal {
    /// No such agent (never attested, or evicted).
    #[error("{0} is not an attested agent")]
    Unknown(String),
    /// The agent is banned.
    #[error("agent {0} is banned")]
    Banned(String),
    /// The presented agent SVID was revoked.
    #[error("agent SVID {0} is revoked")]
    Revoked(String),
    /// The presented agent SVID is not the agent's current one.
    #[error("agent SVID {0} is not the agent's current SVID (superseded by a renewal)")]
    Superseded(String),
    /// A join token (or attestation) for the ID of an agent on record, live
    /// or banned: re-attesting a node is `agent evict` first.
    #[error("agent {0} is already attested (or banned); evict it first: tessera-server agent evict --id {0}")]
    Exists(String),
    /// A join token (or attestation) for the SPIFFE ID of an entry.
    #[error("{0} is the SPIFFE ID of a registration entry; an agent cannot have it")]
    EntryIdentity(String),
}

/// Why an SVID signed for an item was revoked as it was recorded: the
/// words, and the typed refusal the agent acts on, when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRefused {
    /// The typed refusal (`agent-svid-changed`: sign again at once).
    pub refusal: Option<Refusal>,
    /// Why, in words.
    pub why: String,
}

impl ItemRefused {
    fn typed(refusal: Refusal, why: String) -> Self {
        Self { refusal: Some(refusal), why }
    }
}

impl From<String> for ItemRefused {
    fn from(why: String) -> Self {
        Self { refusal: None, why }
    }
}

impl AgentRefusal {
    /// The typed refusal sent to agents (the code shared with the agent).
    pub fn kind(&self) -> tessera_proto::Refusal {
        use tessera_proto::Refusal;
        match self {
            Self::Unknown(_) => Refusal::UnknownAgent,
            Self::Banned(_) => Refusal::Banned,
            Self::Revoked(_) => Refusal::Revoked,
            Self::Superseded(_) => Refusal::Superseded,
            Self::Exists(_) => Refusal::AgentExists,
            Self::EntryIdentity(_) => Refusal::EntryIdentity,
        }
    }
}

/// What an approval wrote.
#[derive(Debug)]
pub struct Approved {
    /// The proposal approved (now removed).
    pub proposal: pb::Entry,
    /// The entry write (empty for a join token).
    pub write: EntryWrite,
}

/// The tree of proposals waiting for approval (shared by every server).
pub const PENDING: &str = "pending_entries";

/// A join token's key in the store: its SHA-256, so the tokens that are
/// still usable cannot be read back from the datastore or a backup.
pub fn join_token_key(token: &str) -> Vec<u8> {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes())).into_bytes()
}

/// A signed SVID to record, with the entry it was signed for.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The record.
    pub svid: pb::IssuedSvid,
    /// The entry as it was read for signing.
    pub entry: Entry,
    /// The issuance's event: stored with the record, or, if the commit
    /// revokes the SVID, stored as a denial with the reason.
    pub event: pb::Event,
}

/// Builds a commit's events from its outcome.
type Describe<'a, T> = Box<dyn Fn(&T) -> Vec<pb::Event> + Send + 'a>;

/// Who a commit acts for, and the events that describe its outcome: they
/// are chained into the event log inside the same commit as the change
/// (with an event per revocation the commit makes), so that no committed
/// change exists without its event, whatever happens after the commit.
pub struct Audit<'a, T> {
    /// The operator the change is made for (`None`: the server or an agent).
    pub operator: Option<pb::Operator>,
    /// The events describing the commit's outcome (not its revocations).
    describe: Describe<'a, T>,
}

impl<'a, X, Y> Audit<'a, Result<X, Y>> {
    /// These events if the commit does what was asked (none if it refuses).
    pub fn if_ok(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(
            operator,
            move |r: &Result<X, Y>| if r.is_ok() { events.clone() } else { Vec::new() },
        )
    }
}

impl<'a> Audit<'a, bool> {
    /// These events if the commit did it (true).
    pub fn if_done(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(operator, move |done: &bool| if *done { events.clone() } else { Vec::new() })
    }
}

impl<T> fmt::Debug for Audit<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit").field("operator", &self.operator).finish_non_exhaustive()
    }
}

impl<'a, T> Audit<'a, T> {
    /// Events `describe` builds from the commit's outcome, made for `operator`.
    pub fn new(
        operator: Option<pb::Operator>,
        describe: impl Fn(&T) -> Vec<pb::Event> + Send + 'a,
    ) -> Self {
        Self { operator, describe: Box::new(describe) }
    }

    /// These events, whatever the outcome (a change that cannot be refused).
    pub fn events(operator: Option<pb::Operator>, events: Vec<pb::Event>) -> Self {
        Self::new(operator, move |_| events.clone())
    }

    /// A commit with no event of its own (its revocations still get theirs).
    pub fn quiet() -> Self {
        Self::new(None, |_| Vec::new())
    }

    /// The events of the commit's outcome.
    fn describe(&self, outcome: &T) -> Vec<pb::Event> {
        (self.describe)(outcome)
    }
}

/// Where commits chain their events: the event log, written inside the
/// commit's transaction (which holds the event lock too).
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Chains `events` (and what they reveal) into the log in `tx`; returns
    /// them as stored (none when the log is off).
    fn chain_in(&self, tx: &Txn<'_>, events: Vec<pb::Event>) -> Result<Vec<pb::Event>, StoreError>;
    /// Called once the commit that chained `stored` is durable.
    fn committed(&self, stored: &[pb::Event]);
}

/// Signs the CRLs for a set of revocations: given to the store so that a
/// commit that revokes also stores CRLs listing what it revoked (agents
/// and workloads never see a revocation without its CRL).
pub trait CrlSigner: Send + Sync + fmt::Debug {
    /// One DER CRL per CA in the bundle, numbered `crl_number`.
    fn sign_crls(
        &self,
        revocations: &[pb::Revocation],
        crl_number: u64,
    ) -> Result<Vec<Vec<u8>>, String>;
}

/// What [`Store::check`] found in a healthy store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReport {
    /// The change log's revision.
    pub revision: u64,
    /// The write sequence (and the watermark's).
    pub write_seq: u64,
    /// Entries.
    pub entries: usize,
    /// Agents.
    pub agents: usize,
    /// Issued-SVID records.
    pub issued: usize,
    /// Revocations.
    pub revocations: usize,
}

/// What the server needs from storage.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Stores new entries (IDs already assigned); per-item results. Items
    /// that duplicate an existing entry (or an earlier item) are refused.
    fn create_entries(
        &self,
        entries: &[Entry],
        audit: &Audit<'_, Vec<Result<Entry, EntryError>>>,
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError>;
    /// Replaces entries by ID; SVIDs the new version no longer authorizes
    /// are revoked in the same commit.
    fn update_entries(
        &self,
        entries: &[Entry],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError>;
    /// Deletes entries by ID and revokes their SVIDs, in one commit.
    fn delete_entries(
        &self,
        ids: &[String],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError>;
    /// One entry.
    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;
    /// Entries by ID, in the order asked (`None` where absent), read at once.
    fn entries(&self, ids: &[String]) -> Result<Vec<Option<Entry>>, StoreError>;
    /// Every entry whose parent ID is `parent` (an index lookup, no scan).
    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError>;
    /// The entries of `parent` and the revision they are current to, read
    /// with no write in between.
    fn snapshot(&self, parent: &SpiffeId) -> Result<(u64, Vec<Entry>), StoreError>;
    /// A page of entries ordered by ID, starting after `after`.
    fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Number of entries.
    fn entry_count(&self) -> usize;
    /// IDs of entries whose `expires_at` is at or before `now`.
    fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` changes after `revision`, in revision order.
    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// The latest revision.
    fn revision(&self) -> Result<u64, StoreError>;
    /// The latest revision, updated after every commit that logged a change.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Logs a trust bundle change.
    fn log_bundle_change(&self, audit: &Audit<'_, u64>) -> Result<u64, StoreError>;
    /// Replaces `server_id`'s CA records (the trust bundle is the union of
    /// every server's) and logs a bundle change if they changed.
    fn publish_cas(&self, server_id: &str, cas: &[pb::CaRecord]) -> Result<bool, StoreError>;
    /// Every server's CA records.
    fn cas(&self) -> Result<Vec<pb::CaRecord>, StoreError>;
    /// Takes `n` from agent `agent`'s signing budget (a token bucket of
    /// `burst`, refilled at `rate` per second; `now_ms` is Unix time in
    /// milliseconds) when several servers share this store, so that the
    /// limit holds across them: `Some(taken)`. `None` when the store is
    /// not shared (the server keeps budgets in memory).
    fn take_shared_budget(
        &self,
        agent: &str,
        n: u64,
        rate: u32,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError>;
    /// Sets who signs CRLs; until then commits store no CRLs.
    fn set_crl_signer(&self, signer: std::sync::Arc<dyn CrlSigner>);
    /// Sets the event log every commit chains its events into; until then
    /// commits store no events (unit tests of the store alone).
    fn set_event_sink(&self, sink: std::sync::Arc<dyn EventSink>);
    /// Re-signs the CRLs (CA rotation, before they go stale), stores them
    /// and logs the change.
    fn resign_crls(&self) -> Result<u64, StoreError>;
    /// The CRLs in force (DER, one per CA).
    fn crls(&self) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Stores a join token.
    /// Stores a join token (keyed by its SHA-256; the token itself is not
    /// kept), in one commit with the checks that its agent ID is neither an
    /// agent's on record (live or banned) nor an entry's.
    fn put_join_token(
        &self,
        token: &pb::JoinToken,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError>;
    /// Removes and returns a join token: a token can be taken once.
    fn take_join_token(
        &self,
        token: &str,
        audit: &Audit<'_, Option<pb::JoinToken>>,
    ) -> Result<Option<pb::JoinToken>, StoreError>;
    /// Whether a join token is stored, read without writing anything (an
    /// unknown token must cost no commit).
    fn join_token_exists(&self, token: &str) -> Result<bool, StoreError>;

    /// Records a newly attested agent and its first SVID; refused for the
    /// ID of an agent on record (live or banned) or of an entry.
    fn register_agent(
        &self,
        agent: &pb::Agent,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError>;
    /// Stores a proposal under its key (the entry ID; a join token's
    /// proposal ID), refused while another waits under that key.
    fn propose(
        &self,
        proposal: &pb::Entry,
        audit: &Audit<'_, Result<(), ApprovalRefusal>>,
    ) -> Result<Result<(), ApprovalRefusal>, StoreError>;
    /// Removes the proposal under `key` if it is still the one with ID
    /// `proposal_id` (any, when `None`): a reject or an expiry never removes
    /// a newer proposal made under the same key meanwhile. True for the one
    /// caller (of every server) that removed it.
    fn remove_proposal(
        &self,
        key: &str,
        proposal_id: Option<&str>,
        audit: &Audit<'_, bool>,
    ) -> Result<bool, StoreError>;
    /// Approves the proposal under `key` (or with that proposal ID) if its
    /// content hash is `content_hash`, and writes what it proposed, in one
    /// commit with every check of [`crate::approval::check`] and, for an
    /// update, that the entry is still at the proposed-against revision.
    fn approve(
        &self,
        key: &str,
        content_hash: &str,
        approver_uid: u32,
        now: i64,
        audit: &Audit<'_, Result<Approved, ApprovalRefusal>>,
    ) -> Result<Result<Approved, ApprovalRefusal>, StoreError>;
    /// Checks that `serial` may act for `agent_id`: a known, unbanned
    /// agent's current SVID, not revoked.
    fn check_agent(
        &self,
        agent_id: &str,
        serial: &str,
    ) -> Result<Result<pb::Agent, AgentRefusal>, StoreError>;
    /// Replaces the agent's SVID with `svid`, in one commit with the
    /// checks: the agent is known and unbanned, and `presented` is its
    /// current SVID or, when the reply to the last renewal was lost, the one
    /// before it (the lost one is then revoked, and returned).
    fn renew_agent(
        &self,
        agent_id: &str,
        presented: &str,
        svid: &pb::IssuedSvid,
        now: i64,
        audit: &Audit<'_, RenewOutcome>,
    ) -> Result<Result<(pb::Agent, Vec<pb::Revocation>), AgentRefusal>, StoreError>;
    /// Bans an agent and revokes every SVID issued to or through it, in one
    /// commit. Banning a banned agent revokes what is left.
    fn ban_agent(
        &self,
        agent_id: &str,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError>;
    /// Forgets an agent (it must attest again) and revokes its own SVIDs.
    /// A banned agent stays banned unless `unban`.
    fn evict_agent(
        &self,
        agent_id: &str,
        unban: bool,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError>;
    /// The agent used its current SVID `serial`: the reply to its last
    /// renewal arrived, so the SVID before it may no longer renew.
    fn confirm_agent_svid(&self, agent_id: &str, serial: &str) -> Result<(), StoreError>;
    /// One agent.
    fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError>;
    /// All agents.
    fn agents(&self) -> Result<Vec<pb::Agent>, StoreError>;

    /// Records SVIDs signed for `agent_id`'s entries. Each is checked, in
    /// the commit, against the agent (still current and unbanned) and the
    /// entry as it is now; one no longer authorized is revoked at once and
    /// its item says why.
    fn record_issued(
        &self,
        agent_id: &str,
        agent_serial: &str,
        signed: &[Signed],
        now: i64,
    ) -> Result<Vec<Result<(), ItemRefused>>, StoreError>;
    /// Records an SVID an operator minted outside any node (no entry, no
    /// agent), durable before it returns (`store/operator.rs`).
    fn record_minted(&self, svid: &pb::IssuedSvid, audit: &Audit<'_, ()>)
        -> Result<(), StoreError>;
    /// Evicts an unbanned agent whose SVID expired at or before
    /// `expired_before`, checked in the commit; `None` when it stays.
    fn purge_agent(
        &self,
        agent_id: &str,
        expired_before: i64,
        now: i64,
        audit: &Audit<'_, Option<Vec<pb::Revocation>>>,
    ) -> Result<Option<Vec<pb::Revocation>>, StoreError>;
    /// An unexpired SVID by serial.
    fn issued(&self, serial: &str) -> Result<Option<pb::IssuedSvid>, StoreError>;
    /// Number of issued SVIDs on record (unexpired or not yet pruned).
    fn issued_count(&self) -> usize;
    /// Stores revocations and logs them.
    fn revoke(
        &self,
        revocations: &[pb::Revocation],
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError>;
    /// A revocation by serial.
    fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError>;
    /// Every revocation whose certificate has not expired yet.
    fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError>;
    /// Forgets issued SVIDs and revocations of certificates expired at `now`.
    fn prune_expired(&self, now: i64) -> Result<usize, StoreError>;

    /// Reads every record and checks the indexes and the watermark.
    fn check(&self) -> Result<StoreReport, StoreError>;
    /// Writes a consistent copy of every record to `out`.
    fn backup(&self, out: &mut dyn Write) -> Result<(), StoreError>;
    /// Whether the database answers, and what it is.
    fn health(&self) -> Result<String, StoreError>;
}

// ---------------------------------------------------------------------------
// The store over a key-value database (sled or PostgreSQL)

/// Sees one key and value of a page; false stops the paging.
type Visit<'f> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'f;

const REVISION_KEY: &[u8] = b"revision";
const WRITE_SEQ_KEY: &[u8] = b"write_seq";
const CRL_NUMBER_KEY: &str = "crl_number";
const CRLS_KEY: &str = "crls";

/// The trees, in the order of a backup.
pub const TREE_NAMES: [&str; 13] = [
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
];

const ENTRIES: usize = 0;
const BY_PARENT: usize = 1;
const BY_IDENTITY: usize = 2;
const BY_EXPIRY: usize = 3;
const CHANGES: usize = 4;
const META: usize = 5;
const JOIN_TOKENS: usize = 6;
const AGENTS: usize = 7;
const ISSUED: usize = 8;
const ISSUED_BY_OWNER: usize = 9;
const REVOCATIONS: usize = 10;
const CAS: usize = 12;

fn t(i: usize) -> &'static str {
    TREE_NAMES[i]
}

type TxResult<T> = Result<T, StoreError>;

/// The store: every record in a [`Kv`] database, `<data_dir>/store` (sled)
/// or PostgreSQL shared by several servers.
pub struct KvStore {
    kv: Arc<dyn Kv>,
    /// Serializes this process's commits (the database's lock serializes
    /// them across servers): reads made while holding it are consistent
    /// with the commit that follows them.
    writer: Mutex<Writer>,
    /// Issuance batches waiting for a commit (group commit).
    issue_queue: Mutex<Vec<IssueJob>>,
    /// sled only: PostgreSQL keeps its own durability.
    watermark: Option<Watermark>,
    revision: Arc<watch::Sender<u64>>,
    crl_signer: std::sync::OnceLock<std::sync::Arc<dyn CrlSigner>>,
    /// The event log every commit chains its events into.
    event_sink: std::sync::OnceLock<std::sync::Arc<dyn EventSink>>,
    /// This server's ID, naming its CRLs in a shared database ("" on sled).
    server_id: String,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore").field("kv", &self.kv).finish_non_exhaustive()
    }
}

/// State only commits touch, under the writer lock.
#[derive(Debug, Default)]
struct Writer {
    /// On sled, every stored X509-SVID revocation, what the CRLs are signed
    /// from (kept in memory rather than scanned per commit). A shared
    /// database reads them in the commit: other servers add to them.
    revocations: Vec<pb::Revocation>,
}
/// The last write sequence the store acknowledged, in a small file beside
/// the database, overwritten in place and synced after every commit.
#[derive(Debug)]
struct Watermark {
    path: PathBuf,
    file: fs::File,
}

const WATERMARK_MAGIC: &[u8; 8] = b"TSRAWM01";

impl Watermark {
    fn open(path: PathBuf) -> Result<(Self, Option<u64>), StoreError> {
        let err = |source| StoreError::Watermark { path: path.display().to_string(), source };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(err)?;
        let seq = match bytes.len() {
            0 => None,
            24 if &bytes[..8] == WATERMARK_MAGIC => {
                let seq = read_u64(Some(&bytes[8..16]));
                let check = read_u64(Some(&bytes[16..24]));
                if check != !seq {
                    return Err(StoreError::Damaged {
                        path: path.display().to_string(),
                        reason: "the watermark file does not check out".into(),
                    });
                }
                Some(seq)
            }
            _ => {
                return Err(StoreError::Damaged {
                    path: path.display().to_string(),
                    reason: "the watermark file is not a Tessera watermark".into(),
                })
            }
        };
        Ok((Self { path, file }, seq))
    }

    fn write(&self, seq: u64) -> Result<(), StoreError> {
        let mut record = [0u8; 24];
        record[..8].copy_from_slice(WATERMARK_MAGIC);
        record[8..16].copy_from_slice(&seq.to_be_bytes());
        record[16..24].copy_from_slice(&(!seq).to_be_bytes());
        self.file.write_all_at(&record, 0).and_then(|()| self.file.sync_data()).map_err(|source| {
            StoreError::Watermark { path: self.path.display().to_string(), source }
        })
    }
}

/// One commit's view of every tree.
struct Tx<'a> {
    txn: &'a Txn<'a>,
    revision: Cell<u64>,
    /// Revocations stored by this commit: the CRLs are re-signed in it.
    revoked: std::cell::RefCell<Vec<pb::Revocation>>,
    resign: Cell<bool>,
    /// Who the commit acts for (named in its revocations' events).
    operator: Option<pb::Operator>,
    /// Events the commit's own steps add (revocations, issuance).
    events: std::cell::RefCell<Vec<pb::Event>>,
}

impl Tx<'_> {
    fn get(&self, i: usize, key: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        self.txn.get(t(i), key.as_ref())
    }

    fn put(&self, i: usize, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        self.txn.put(t(i), key, value);
    }

    fn remove(&self, i: usize, key: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        self.txn.delete(t(i), key)
    }

    fn log(&self, kind: ChangeKind) -> TxResult<u64> {
        let revision = self.revision.get() + 1;
        let change = Change { revision, kind };
        let bytes = serde_json::to_vec(&change).map_err(|e| corrupt("change", e))?;
        self.put(CHANGES, revision.to_be_bytes(), bytes);
        self.revision.set(revision);
        Ok(revision)
    }

    fn entry(&self, id: &str) -> TxResult<Option<Entry>> {
        match self.get(ENTRIES, id)? {
            None => Ok(None),
            Some(bytes) => decode_entry(id.as_bytes(), &bytes).map(Some),
        }
    }

    fn put_entry(&self, entry: &Entry) {
        self.put(ENTRIES, entry.id.as_bytes(), entry.to_proto().encode_to_vec());
        self.put(BY_PARENT, parent_key(&entry.parent_id, &entry.id), []);
        self.put(BY_IDENTITY, entry.identity_key(), entry.id.as_bytes());
        if entry.expires_at != 0 {
            self.put(BY_EXPIRY, expiry_key(entry.expires_at, &entry.id), []);
        }
    }

    fn remove_entry(&self, entry: &Entry) -> TxResult<()> {
        self.remove(ENTRIES, entry.id.as_bytes())?;
        self.remove(BY_PARENT, parent_key(&entry.parent_id, &entry.id))?;
        self.remove(BY_IDENTITY, entry.identity_key())?;
        if entry.expires_at != 0 {
            self.remove(BY_EXPIRY, expiry_key(entry.expires_at, &entry.id))?;
        }
        Ok(())
    }

    fn duplicate_of(&self, entry: &Entry) -> TxResult<Option<String>> {
        Ok(self
            .get(BY_IDENTITY, entry.identity_key())?
            .map(|id| String::from_utf8_lossy(&id).into_owned())
            .filter(|id| *id != entry.id))
    }

    /// Creates `entry` (refused as a duplicate, or when its SPIFFE ID is an
    /// agent's).
    fn create_one(&self, entry: &Entry) -> TxResult<Result<Entry, EntryError>> {
        if let Some(existing) = self.duplicate_of(entry)? {
            return Ok(Err(EntryError::Duplicate(existing)));
        }
        if self.agent(entry.spiffe_id.as_str())?.is_some() {
            return Ok(Err(EntryError::AgentIdentity(entry.spiffe_id.to_string())));
        }
        let mut entry = entry.clone();
        entry.revision = self.log(ChangeKind::Entry {
            entry_id: entry.id.clone(),
            parents: vec![entry.parent_id.to_string()],
        })?;
        self.put_entry(&entry);
        Ok(Ok(entry))
    }

    /// Replaces the stored entry with `entry`, adds its result and the
    /// version it replaced to `write`, and what it no longer authorizes to
    /// `revoke`; returns the result too.
    fn update_one(
        &self,
        entry: &Entry,
        now: i64,
        reason: &str,
        write: &mut EntryWrite,
        revoke: &mut Vec<pb::Revocation>,
    ) -> TxResult<Result<Entry, EntryError>> {
        let refuse = |write: &mut EntryWrite, e: EntryError| {
            write.results.push(Err(e.clone()));
            write.previous.push(None);
            Ok(Err(e))
        };
        let Some(old) = self.entry(&entry.id)? else {
            return refuse(write, EntryError::NotFound(entry.id.clone()));
        };
        // An update decided against a revision (`entry.revision`; 0: none)
        // replaces only that revision.
        if entry.revision != 0 && entry.revision != old.revision {
            return refuse(write, EntryError::Changed(entry.id.clone()));
        }
        if let Some(existing) = self.duplicate_of(entry)? {
            return refuse(write, EntryError::Duplicate(existing));
        }
        if entry.spiffe_id != old.spiffe_id && self.agent(entry.spiffe_id.as_str())?.is_some() {
            return refuse(write, EntryError::AgentIdentity(entry.spiffe_id.to_string()));
        }
        // Read in the commit: nothing can be issued for the entry between
        // this read and the revocation.
        let issued = self.issued_by_owner(&entry.id)?;
        self.remove_entry(&old)?;
        let mut entry = entry.clone();
        entry.created_at = old.created_at;
        let mut parents = vec![old.parent_id.to_string()];
        if entry.parent_id != old.parent_id {
            parents.push(entry.parent_id.to_string());
        }
        entry.revision = self.log(ChangeKind::Entry { entry_id: entry.id.clone(), parents })?;
        self.put_entry(&entry);
        revoke.extend(
            issued
                .iter()
                .filter(|svid| !entry.authorizes_svid_of(&old, svid.expires_at))
                .map(|svid| revocation_of(svid, reason, now)),
        );
        write.results.push(Ok(entry.clone()));
        write.previous.push(Some(old));
        Ok(Ok(entry))
    }

    /// Whether `agent_id` may become an agent's: no agent on record (live
    /// or banned) and no entry has it. Reads every entry, unless the ID is
    /// reserved (default join-token IDs are: no entry can have them), so
    /// only an operator-named agent ID costs the scan (a bogus token never
    /// gets here).
    fn agent_id_free(&self, agent_id: &str) -> TxResult<Result<(), AgentRefusal>> {
        if self.agent(agent_id)?.is_some() {
            return Ok(Err(AgentRefusal::Exists(agent_id.to_string())));
        }
        if SpiffeId::parse(agent_id).is_ok_and(|id| crate::entry::is_reserved(&id)) {
            return Ok(Ok(()));
        }
        for (key, bytes) in self.txn.scan_prefix(t(ENTRIES), b"")? {
            if decode_entry(&key, &bytes)?.spiffe_id.as_str() == agent_id {
                return Ok(Err(AgentRefusal::EntryIdentity(agent_id.to_string())));
            }
        }
        Ok(Ok(()))
    }

    fn agent(&self, id: &str) -> TxResult<Option<pb::Agent>> {
        self.get(AGENTS, id)?.map(|bytes| decode(id.as_bytes(), &bytes)).transpose()
    }

    fn put_agent(&self, agent: &pb::Agent) {
        self.put(AGENTS, agent.spiffe_id.as_bytes(), agent.encode_to_vec());
    }

    fn record(&self, svid: &pb::IssuedSvid) {
        let key = svid_key(&svid.serial, &svid.jti);
        self.put(ISSUED, key.as_bytes(), svid.encode_to_vec());
        self.put(ISSUED_BY_OWNER, index_key(&owner_of(svid), &key), []);
    }

    /// Stores revocations (skipping serials already revoked) and logs them.
    fn revoke(&self, revocations: &[pb::Revocation]) -> TxResult<Vec<pb::Revocation>> {
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
            })?;
            // Only X509-SVIDs are listed in CRLs.
            if !x509.is_empty() {
                self.revoked.borrow_mut().extend(x509.into_iter().cloned());
                self.resign.set(true);
            }
        }
        Ok(stored)
    }

    /// The unexpired-or-unpruned SVIDs issued for an entry or an agent.
    fn issued_by_owner(&self, owner: &str) -> TxResult<Vec<pb::IssuedSvid>> {
        let prefix = index_key(owner, "");
        let mut out = Vec::new();
        for (key, _) in self.txn.scan_prefix(t(ISSUED_BY_OWNER), &prefix)? {
            if let Some(bytes) = self.get(ISSUED, &key[prefix.len()..])? {
                out.push(decode(&key, &bytes)?);
            }
        }
        Ok(out)
    }

    /// SVIDs issued to or through an agent (its own and its entries').
    fn issued_through_agent(&self, agent_id: &str) -> TxResult<Vec<pb::IssuedSvid>> {
        // An entry's SVIDs are revoked when it moves to another parent or is
        // deleted, so these are all SVIDs still valid through this agent.
        let mut out = self.issued_by_owner(&agent_owner(agent_id))?;
        if let Ok(parent) = SpiffeId::parse(agent_id) {
            let prefix = parent_key(&parent, "");
            for (key, _) in self.txn.scan_prefix(t(BY_PARENT), &prefix)? {
                let entry_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                out.extend(self.issued_by_owner(&entry_id)?);
            }
        }
        Ok(out)
    }

    /// Every record of every tree, read under the lock.
    fn dump(&self) -> TxResult<Vec<Pairs>> {
        TREE_NAMES.iter().map(|name| self.txn.scan_prefix(name, b"")).collect()
    }
}

/// One issued SVID as written: the record's key, its encoding, its
/// owner-index key, and its entry's encoding as read for signing.
type EncodedIssue = (String, Vec<u8>, Vec<u8>, Vec<u8>);

/// A batch of signed SVIDs waiting to be recorded (see `record_issued`),
/// with its records encoded by the caller, outside the writer lock.
struct IssueJob {
    agent_id: String,
    agent_serial: String,
    signed: Vec<Signed>,
    /// Per item: the record's key, its encoding, its owner-index key, and
    /// the entry's encoding as it was read for signing.
    encoded: Vec<EncodedIssue>,
    now: i64,
    done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
}

impl IssueJob {
    fn new(
        agent_id: &str,
        agent_serial: &str,
        signed: &[Signed],
        now: i64,
        done: std::sync::mpsc::SyncSender<Result<Vec<Result<(), ItemRefused>>, String>>,
    ) -> Self {
        let encoded = signed
            .iter()
            .map(|item| {
                let key = svid_key(&item.svid.serial, &item.svid.jti);
                let index = index_key(&owner_of(&item.svid), &key);
                (key, item.svid.encode_to_vec(), index, item.entry.to_proto().encode_to_vec())
            })
            .collect();
        Self {
            agent_id: agent_id.to_string(),
            agent_serial: agent_serial.to_string(),
            signed: signed.to_vec(),
            encoded,
            now,
            done,
        }
    }
}

fn corrupt(key: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.into(), reason: e.to_string() }
}

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
pub fn revocation_event(r: &pb::Revocation, operator: Option<&pb::Operator>) -> pb::Event {
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

impl KvStore {
    /// Opens (or creates) the sled store in `dir`, refusing one that is
    /// damaged or behind its watermark.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let (store, acked) = Self::open_unchecked(dir)?;
        let meta_seq = read_u64(store.kv.get(t(META), WRITE_SEQ_KEY)?.as_deref());
        let damaged =
            |reason: String| StoreError::Damaged { path: dir.display().to_string(), reason };
        match acked {
            Some(acked) if meta_seq < acked => {
                return Err(damaged(format!(
                    "it holds writes up to #{meta_seq} but #{acked} were acknowledged (data was lost or an old copy was put back)"
                )))
            }
            None if store.kv.len(t(ENTRIES))? > 0 || store.kv.len(t(AGENTS))? > 0 => {
                // A store from before watermarks, or one whose watermark was removed.
                tracing::warn!(store = %dir.display(), "store has no watermark; starting one at its current write sequence");
            }
            _ => {}
        }
        store.check().map_err(|e| match e {
            StoreError::Corrupt { key, reason } => damaged(format!("record {key}: {reason}")),
            other => other,
        })?;
        if let Some(watermark) = &store.watermark {
            watermark.write(meta_seq)?;
        }
        store.load_revocations()?;
        Ok(store)
    }

    /// Connects to the PostgreSQL store at `url`, shared with the other
    /// servers of the trust domain; `server_id` names this server's CRLs.
    pub fn open_postgres(url: &str, server_id: &str) -> Result<Self, StoreError> {
        let kv: Arc<dyn Kv> = Arc::new(postgres::PgKv::connect(url)?);
        let store = Self::with_kv(kv, None, server_id)?;
        let revision = store.revision.clone();
        store.kv.on_remote_change(Box::new(move |remote| {
            revision.send_if_modified(|current| {
                let newer = remote > *current;
                if newer {
                    *current = remote;
                }
                newer
            });
        }));
        Ok(store)
    }

    fn with_kv(
        kv: Arc<dyn Kv>,
        watermark: Option<Watermark>,
        server_id: &str,
    ) -> Result<Self, StoreError> {
        let revision = read_u64(kv.get(t(META), REVISION_KEY)?.as_deref());
        Ok(Self {
            kv,
            writer: Mutex::new(Writer::default()),
            issue_queue: Mutex::new(Vec::new()),
            watermark,
            revision: Arc::new(watch::channel(revision).0),
            crl_signer: std::sync::OnceLock::new(),
            event_sink: std::sync::OnceLock::new(),
            server_id: server_id.to_string(),
        })
    }

    fn load_revocations(&self) -> Result<(), StoreError> {
        if !self.kv.shared() {
            self.lock().revocations =
                self.revocations()?.into_iter().filter(|r| r.jti.is_empty()).collect();
        }
        Ok(())
    }

    /// Opens the sled database and reads the watermark, without checking either.
    fn open_unchecked(dir: &Path) -> Result<(Self, Option<u64>), StoreError> {
        let kv: Arc<dyn Kv> = Arc::new(SledKv::open(dir, STORE_CACHE_BYTES)?);
        let (watermark, acked) = Watermark::open(dir.join("tessera.watermark"))?;
        Ok((Self::with_kv(kv, Some(watermark), "")?, acked))
    }

    /// The database, for the records kept beside the store's own trees
    /// (the event log, entries waiting for approval).
    pub fn kv(&self) -> Arc<dyn Kv> {
        self.kv.clone()
    }

    /// Runs `f` as one commit: serialized with every other commit (of
    /// every server), atomic across trees, durable (and watermarked on
    /// sled) before it returns; wakes Sync streams if it logged a change.
    fn commit<T>(
        &self,
        audit: &Audit<'_, T>,
        f: impl Fn(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let mut writer = self.lock();
        self.commit_locked(&mut writer, audit, f)
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit_locked<T>(
        &self,
        writer: &mut Writer,
        audit: &Audit<'_, T>,
        f: impl Fn(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let mut out = None;
        let (mut revision, mut seq, mut added, mut chained) = (0, 0, Vec::new(), Vec::new());
        let stored = &writer.revocations;
        let sink = self.event_sink.get();
        let lock = if sink.is_some() { Lock::StoreAndEvents } else { Lock::Store };
        self.kv.transaction(lock, &mut |txn| {
            let start = read_u64(txn.get(t(META), REVISION_KEY)?.as_deref());
            let tx = Tx {
                txn,
                revision: Cell::new(start),
                revoked: Default::default(),
                resign: Cell::new(false),
                operator: audit.operator,
                events: Default::default(),
            };
            let value = f(&tx)?;
            if tx.resign.get() {
                self.sign_crls_in(stored, &tx)?;
            }
            // The change's events, in the change's commit.
            let mut events = audit.describe(&value);
            events.append(&mut tx.events.borrow_mut());
            chained = match sink {
                Some(sink) if !events.is_empty() => sink.chain_in(txn, events)?,
                _ => Vec::new(),
            };
            seq = read_u64(txn.get(t(META), WRITE_SEQ_KEY)?.as_deref()) + 1;
            txn.put(t(META), WRITE_SEQ_KEY, seq.to_be_bytes());
            revision = tx.revision.get();
            if revision != start {
                txn.put(t(META), REVISION_KEY, revision.to_be_bytes());
                txn.notify(revision);
            }
            added = tx.revoked.take();
            out = Some(value);
            Ok(())
        })?;
        if !self.kv.shared() {
            writer.revocations.extend(added);
        }
        self.kv.flush()?;
        if let Some(watermark) = &self.watermark {
            watermark.write(seq)?;
        }
        if let Some(sink) = sink {
            sink.committed(&chained);
        }
        self.revision.send_if_modified(|current| {
            let newer = revision > *current;
            if newer {
                *current = revision;
            }
            newer
        });
        out.ok_or_else(|| StoreError::Group("the commit produced no result".into()))
    }

    /// This server's key for a per-server record in `meta`.
    fn own_key(&self, name: &str) -> String {
        if self.server_id.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{}", self.server_id)
        }
    }

    /// Signs this server's CRLs for every stored revocation (`stored` on
    /// sled; read in the commit from a shared database) plus this commit's,
    /// stores them and logs the change, inside the commit.
    fn sign_crls_in(&self, stored: &[pb::Revocation], tx: &Tx<'_>) -> TxResult<()> {
        let Some(signer) = self.crl_signer.get() else { return Ok(()) };
        let mut all = if self.kv.shared() {
            let mut all = Vec::new();
            for (key, bytes) in tx.txn.scan_prefix(t(REVOCATIONS), b"")? {
                let revocation: pb::Revocation = decode(&key, &bytes)?;
                if revocation.jti.is_empty() {
                    all.push(revocation);
                }
            }
            all
        } else {
            stored.to_vec()
        };
        all.extend(tx.revoked.borrow().iter().cloned());
        all.sort_by(|a, b| a.serial.cmp(&b.serial));
        all.dedup_by(|a, b| a.serial == b.serial);
        let number_key = self.own_key(CRL_NUMBER_KEY);
        let number = read_u64(tx.get(META, &number_key)?.as_deref()) + 1;
        let crls = signer
            .sign_crls(&all, number)
            .map_err(|reason| StoreError::Corrupt { key: "CRL".into(), reason })?;
        tx.put(META, number_key, number.to_be_bytes());
        tx.put(META, self.own_key(CRLS_KEY), pb::Crls { crls }.encode_to_vec());
        tx.log(ChangeKind::Crls)?;
        Ok(())
    }

    /// Records queued issuance batches. The records are written first, one
    /// batch per tree (sled's transactional insert reads every key first,
    /// which cost more than the rest of issuance): recorded either way, so
    /// that the record outlives no revocation; a crash before the commit
    /// leaves records of SVIDs never handed out, which is harmless. Then
    /// one commit checks each against the agent (still current and
    /// unbanned) and the entry as it is now (unchanged, compared by its
    /// encoding, or still authorizing the SVID), bumps the write sequence
    /// and revokes the SVIDs no longer authorized; everything is durable
    /// before anyone is answered.
    fn record_jobs(
        &self,
        writer: &mut Writer,
        jobs: &[IssueJob],
    ) -> Result<Vec<Vec<Result<(), ItemRefused>>>, StoreError> {
        let mut records = Vec::new();
        for job in jobs {
            for (key, record, index_key, _) in &job.encoded {
                records.push(Op::Put(t(ISSUED), key.as_bytes().to_vec(), record.clone()));
                records.push(Op::Put(t(ISSUED_BY_OWNER), index_key.clone(), Vec::new()));
            }
        }
        self.kv.apply(records)?;
        self.commit_locked(writer, &Audit::quiet(), |tx| {
            let mut revoke = Vec::new();
            let mut all = Vec::with_capacity(jobs.len());
            for job in jobs {
                let agent_refusal = match tx.agent(&job.agent_id)? {
                    None => Some(ItemRefused::typed(
                        Refusal::Evicted,
                        format!("agent {} was evicted while signing", job.agent_id),
                    )),
                    Some(a) if a.banned => Some(ItemRefused::typed(
                        Refusal::Banned,
                        format!("agent {} was banned while signing", job.agent_id),
                    )),
                    Some(a) if a.x509_svid_serial != job.agent_serial => Some(ItemRefused::typed(
                        Refusal::AgentSvidChanged,
                        tessera_proto::AGENT_SVID_CHANGED.to_string(),
                    )),
                    Some(_) => None,
                };
                let mut results = Vec::with_capacity(job.signed.len());
                for (item, (_, _, _, entry_bytes)) in job.signed.iter().zip(&job.encoded) {
                    let id = item.entry.id.as_bytes();
                    let refusal = match (&agent_refusal, tx.get(ENTRIES, id)?) {
                        (Some(why), _) => Some(why.clone()),
                        (None, None) => Some(ItemRefused::from(format!(
                            "entry {} was deleted while signing",
                            item.entry.id
                        ))),
                        (None, Some(stored)) if stored == *entry_bytes => None,
                        (None, Some(stored)) => {
                            if decode_entry(id, &stored)?
                                .authorizes_svid_of(&item.entry, item.svid.expires_at)
                            {
                                None
                            } else {
                                Some(ItemRefused::from(format!(
                                    "entry {} changed while signing",
                                    item.entry.id
                                )))
                            }
                        }
                    };
                    // The issuance's event, in the commit that records it.
                    let mut event = item.event.clone();
                    match refusal {
                        Some(why) => {
                            revoke.push(revocation_of(&item.svid, &why.why, job.now));
                            event.decision = schema::DENY.into();
                            event.reason.clone_from(&why.why);
                            tx.events.borrow_mut().push(event.attr("revoked_as_issued", true));
                            results.push(Err(why));
                        }
                        None => {
                            tx.events.borrow_mut().push(event);
                            results.push(Ok(()));
                        }
                    }
                }
                all.push(results);
            }
            tx.revoke(&revoke)?;
            Ok(all)
        })
    }

    /// Restores a backup written by [`Store::backup`] into `dir` (sled),
    /// which must hold no store yet.
    pub fn restore(dir: &Path, input: &mut dyn Read) -> Result<StoreReport, StoreError> {
        let records = read_backup(input)?;
        if dir.join("db").exists() || dir.join("conf").exists() {
            return Err(StoreError::Backup(format!(
                "{} already holds a store; move it aside first",
                dir.display()
            )));
        }
        let (store, _) = Self::open_unchecked(dir)?;
        let ops =
            records.into_iter().map(|(tree, key, value)| Op::Put(t(tree), key, value)).collect();
        store.kv.apply(ops)?;
        store.kv.flush()?;
        let report = store.check()?;
        if let Some(watermark) = &store.watermark {
            watermark.write(report.write_seq)?;
        }
        Ok(report)
    }

    /// Calls `visit` with each pair of `tree` from `start` (after it, if
    /// `skip_start`) to `end`, read in pages of up to 1,000 (at most
    /// `limit`), until `visit` answers false: a filter that skips many pairs
    /// costs no more than reading them.
    fn page_through(
        &self,
        tree: usize,
        mut start: Vec<u8>,
        end: Option<Vec<u8>>,
        mut skip_start: bool,
        limit: usize,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let page = limit.clamp(1, 1000);
        loop {
            let pairs = self.kv.range(t(tree), &start, end.as_deref(), page + 1, false)?;
            let Some((last, _)) = pairs.last() else { return Ok(()) };
            let next = last.clone();
            for (key, value) in &pairs {
                if std::mem::take(&mut skip_start) && *key == start {
                    continue;
                }
                if !visit(key, value)? {
                    return Ok(());
                }
            }
            if pairs.len() <= page {
                return Ok(());
            }
            start = next;
            skip_start = true;
        }
    }

    /// Every record of `tree`, decoded.
    fn decode_tree<M: Message + Default>(&self, tree: &'static str) -> Result<Vec<M>, StoreError> {
        scan_prefix(&*self.kv, tree, b"")?
            .into_iter()
            .map(|(key, bytes)| decode(&key, &bytes))
            .collect()
    }

    /// A whole copy of every tree, read under the lock: consistent.
    fn dump(&self) -> Result<Vec<Pairs>, StoreError> {
        self.commit_read(|tx| tx.dump())
    }

    /// Runs `f` under the store's lock (of every server) without writing.
    fn commit_read<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let _writer = self.lock();
        let mut out = None;
        self.kv.transaction(Lock::Store, &mut |txn| {
            let tx = Tx {
                txn,
                revision: Cell::new(0),
                revoked: Default::default(),
                resign: Cell::new(false),
                operator: None,
                events: Default::default(),
            };
            out = Some(f(&tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Group("the read produced no result".into()))
    }
}

/// Decodes every record and checks that the indexes match the entries.
fn verify_records(trees: &[Pairs]) -> Result<StoreReport, StoreError> {
    let corrupt = |key: &[u8], reason: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.into(),
    };
    let by_parent: std::collections::HashSet<&[u8]> =
        trees[BY_PARENT].iter().map(|(k, _)| k.as_slice()).collect();
    let by_identity: std::collections::HashMap<&[u8], &[u8]> =
        trees[BY_IDENTITY].iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let mut entries = 0;
    let mut with_expiry = 0;
    for (key, bytes) in &trees[ENTRIES] {
        let entry = decode_entry(key, bytes)?;
        if entry.id.as_bytes() != key.as_slice() {
            return Err(corrupt(key, "stored under another entry's ID"));
        }
        if !by_parent.contains(parent_key(&entry.parent_id, &entry.id).as_slice()) {
            return Err(corrupt(key, "missing from the parent index"));
        }
        if by_identity.get(entry.identity_key().as_slice()) != Some(&key.as_slice()) {
            return Err(corrupt(key, "missing from the identity index"));
        }
        with_expiry += usize::from(entry.expires_at != 0);
        entries += 1;
    }
    for (tree, want, what) in [
        (BY_PARENT, entries, "parent index"),
        (BY_IDENTITY, entries, "identity index"),
        (BY_EXPIRY, with_expiry, "expiry index"),
    ] {
        let have = trees[tree].len();
        if have != want {
            return Err(corrupt(
                what.as_bytes(),
                &format!("has {have} records for {want} entries"),
            ));
        }
    }
    for (key, bytes) in &trees[AGENTS] {
        decode::<pb::Agent>(key, bytes)?;
    }
    for (key, bytes) in &trees[ISSUED] {
        decode::<pb::IssuedSvid>(key, bytes)?;
    }
    for (key, bytes) in &trees[REVOCATIONS] {
        decode::<pb::Revocation>(key, bytes)?;
    }
    let meta: std::collections::HashMap<&[u8], &[u8]> =
        trees[META].iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    let revision = read_u64(meta.get(REVISION_KEY).copied());
    if let Some((key, _)) = trees[CHANGES].last() {
        if read_u64(Some(key)) != revision {
            return Err(corrupt(
                b"change log",
                &format!("ends at {} but the revision is {revision}", read_u64(Some(key))),
            ));
        }
    }
    Ok(StoreReport {
        revision,
        write_seq: read_u64(meta.get(WRITE_SEQ_KEY).copied()),
        entries,
        agents: trees[AGENTS].len(),
        issued: trees[ISSUED].len(),
        revocations: trees[REVOCATIONS].len(),
    })
}

fn parent_key(parent: &SpiffeId, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(parent.as_str().len() + 1 + id.len());
    key.extend_from_slice(parent.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn expiry_key(expires_at: i64, id: &str) -> Vec<u8> {
    let mut key = expires_at.max(0).to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// The index owner of an issued SVID: its entry, or for an agent SVID
/// (no entry) the agent, under a prefix no entry ID can have.
fn owner_of(svid: &pb::IssuedSvid) -> String {
    if svid.entry_id.is_empty() {
        agent_owner(&svid.agent_id)
    } else {
        svid.entry_id.clone()
    }
}

fn agent_owner(agent_id: &str) -> String {
    format!("agent:{agent_id}")
}

fn index_key(owner: &str, serial: &str) -> Vec<u8> {
    let mut key = owner.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(serial.as_bytes());
    key
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let p = pb::Entry::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    Entry::from_stored(p).map_err(|e| corrupt(e.to_string()))
}

fn read_u64(value: Option<&[u8]>) -> u64 {
    value.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

const BACKUP_MAGIC: &[u8; 16] = b"TESSERA-BACKUP-1";

/// Writes every record of `trees` as `magic, (tree u8, key len u32, key,
/// value len u32, value)*, 0xFF, sha256 of all before`.
fn write_backup(trees: &[Pairs], out: &mut dyn Write) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Backup(e.to_string());
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut put = |bytes: &[u8], out: &mut dyn Write| -> Result<(), StoreError> {
        hash.update(bytes);
        out.write_all(bytes).map_err(io)
    };
    put(BACKUP_MAGIC, out)?;
    for (i, tree) in trees.iter().enumerate() {
        for (key, value) in tree {
            put(&[i as u8], out)?;
            for part in [key.as_slice(), value.as_slice()] {
                let len = u32::try_from(part.len())
                    .map_err(|_| StoreError::Backup("record too large".into()))?;
                put(&len.to_be_bytes(), out)?;
                put(part, out)?;
            }
        }
    }
    put(&[0xFF], out)?;
    out.write_all(hash.finish().as_ref()).map_err(io)?;
    out.flush().map_err(io)
}

type BackupRecord = (usize, Vec<u8>, Vec<u8>);

fn read_backup(input: &mut dyn Read) -> Result<Vec<BackupRecord>, StoreError> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes).map_err(|e| StoreError::Backup(e.to_string()))?;
    let bad = |why: &str| StoreError::Backup(format!("not a whole Tessera backup: {why}"));
    if bytes.len() < BACKUP_MAGIC.len() + 33 || &bytes[..BACKUP_MAGIC.len()] != BACKUP_MAGIC {
        return Err(bad("wrong header"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != digest {
        return Err(bad("checksum mismatch (truncated or altered)"));
    }
    let mut records = Vec::new();
    let mut at = BACKUP_MAGIC.len();
    let take = |n: usize, at: &mut usize| -> Result<Vec<u8>, StoreError> {
        let end = at
            .checked_add(n)
            .filter(|end| *end <= body.len())
            .ok_or_else(|| bad("record runs past the end"))?;
        let out = body[*at..end].to_vec();
        *at = end;
        Ok(out)
    };
    loop {
        let tree = take(1, &mut at)?[0];
        if tree == 0xFF {
            break;
        }
        if usize::from(tree) >= TREE_NAMES.len() {
            return Err(bad("unknown tree"));
        }
        let mut parts = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = read_u32(&take(4, &mut at)?);
            parts.push(take(len as usize, &mut at)?);
        }
        let value = parts.pop().unwrap_or_default();
        let key = parts.pop().unwrap_or_default();
        records.push((usize::from(tree), key, value));
    }
    if at != body.len() {
        return Err(bad("bytes after the end marker"));
    }
    Ok(records)
}

fn read_u32(bytes: &[u8]) -> u32 {
    <[u8; 4]>::try_from(bytes).map(u32::from_be_bytes).unwrap_or(0)
}

impl Store for KvStore {
    fn create_entries(
        &self,
        entries: &[Entry],
        audit: &Audit<'_, Vec<Result<Entry, EntryError>>>,
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        self.commit(audit, |tx| entries.iter().map(|entry| tx.create_one(entry)).collect())
    }

    fn update_entries(
        &self,
        entries: &[Entry],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        self.commit(audit, |tx| {
            let mut write = EntryWrite::default();
            let mut revoke = Vec::new();
            for entry in entries {
                // The item's result is in `write`.
                let _ = tx.update_one(entry, now, reason, &mut write, &mut revoke)?;
            }
            write.revoked = tx.revoke(&revoke)?;
            Ok(write)
        })
    }

    fn delete_entries(
        &self,
        ids: &[String],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        self.commit(audit, |tx| {
            let mut write = EntryWrite::default();
            let mut revoke = Vec::new();
            for id in ids {
                let Some(mut old) = tx.entry(id)? else {
                    write.results.push(Err(EntryError::NotFound(id.clone())));
                    write.previous.push(None);
                    continue;
                };
                let issued = tx.issued_by_owner(id)?;
                tx.remove_entry(&old)?;
                let previous = old.clone();
                old.revision = tx.log(ChangeKind::Entry {
                    entry_id: id.clone(),
                    parents: vec![old.parent_id.to_string()],
                })?;
                revoke.extend(issued.iter().map(|svid| revocation_of(svid, reason, now)));
                write.results.push(Ok(old));
                write.previous.push(Some(previous));
            }
            write.revoked = tx.revoke(&revoke)?;
            Ok(write)
        })
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        self.kv
            .get(t(ENTRIES), id.as_bytes())?
            .map(|bytes| decode_entry(id.as_bytes(), &bytes))
            .transpose()
    }

    fn entries(&self, ids: &[String]) -> Result<Vec<Option<Entry>>, StoreError> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        let values = self.kv.get_many(t(ENTRIES), &keys)?;
        keys.iter()
            .zip(values)
            .map(|(key, value)| value.map(|bytes| decode_entry(key, &bytes)).transpose())
            .collect()
    }

    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        let prefix = parent_key(parent, "");
        let mut out = Vec::new();
        for (key, _) in scan_prefix(&*self.kv, t(BY_PARENT), &prefix)? {
            let id = &key[prefix.len()..];
            if let Some(bytes) = self.kv.get(t(ENTRIES), id)? {
                out.push(decode_entry(id, &bytes)?);
            }
        }
        Ok(out)
    }

    fn snapshot(&self, parent: &SpiffeId) -> Result<(u64, Vec<Entry>), StoreError> {
        self.commit_read(|tx| {
            let revision = read_u64(tx.get(META, REVISION_KEY)?.as_deref());
            let prefix = parent_key(parent, "");
            let mut entries = Vec::new();
            for (key, _) in tx.txn.scan_prefix(t(BY_PARENT), &prefix)? {
                if let Some(entry) = tx.entry(&String::from_utf8_lossy(&key[prefix.len()..]))? {
                    entries.push(entry);
                }
            }
            Ok((revision, entries))
        })
    }

    fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let keep = |e: &Entry| filter.spiffe_id.as_ref().is_none_or(|id| &e.spiffe_id == id);
        if let Some(parent) = &filter.parent_id {
            let prefix = parent_key(parent, "");
            let end = prefix_end(&prefix);
            let start = parent_key(parent, after.unwrap_or(""));
            self.page_through(BY_PARENT, start, end, after.is_some(), limit, &mut |key, _| {
                let id = &key[prefix.len()..];
                if let Some(bytes) = self.kv.get(t(ENTRIES), id)? {
                    let entry = decode_entry(id, &bytes)?;
                    if keep(&entry) {
                        out.push(entry);
                    }
                }
                Ok(out.len() < limit)
            })?;
        } else {
            let start = after.unwrap_or("").as_bytes().to_vec();
            self.page_through(ENTRIES, start, None, after.is_some(), limit, &mut |key, bytes| {
                let entry = decode_entry(key, bytes)?;
                if keep(&entry) {
                    out.push(entry);
                }
                Ok(out.len() < limit)
            })?;
        }
        Ok(out)
    }

    fn entry_count(&self) -> usize {
        self.kv.len(t(ENTRIES)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "counting entries failed");
            0
        })
    }

    fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let end = (now.max(0) + 1).to_be_bytes();
        Ok(self
            .kv
            .range(t(BY_EXPIRY), b"", Some(&end), usize::MAX, false)?
            .into_iter()
            .map(|(key, _)| String::from_utf8_lossy(&key[8..]).into_owned())
            .collect())
    }

    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let start = revision.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for (key, bytes) in self.kv.range(t(CHANGES), &start, None, limit, false)? {
            let change: Change =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    key: format!("change {}", read_u64(Some(&key))),
                    reason: e.to_string(),
                })?;
            // Revisions are assigned under the store's lock and become
            // visible in order, so the log has no holes; a hole would mean
            // a reader skipping a change, so stop before it and read again.
            let expected = out.last().map_or(revision + 1, |c: &Change| c.revision + 1);
            if change.revision != expected {
                tracing::warn!(
                    expected,
                    found = change.revision,
                    "change log read has a hole; reading again later"
                );
                break;
            }
            out.push(change);
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.kv.get(t(META), REVISION_KEY)?.as_deref()))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn log_bundle_change(&self, audit: &Audit<'_, u64>) -> Result<u64, StoreError> {
        self.commit(audit, |tx| tx.log(ChangeKind::Bundle))
    }

    fn publish_cas(&self, server_id: &str, cas: &[pb::CaRecord]) -> Result<bool, StoreError> {
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
            tx.log(ChangeKind::Bundle)?;
            Ok(true)
        })
    }

    fn cas(&self) -> Result<Vec<pb::CaRecord>, StoreError> {
        self.decode_tree(t(CAS))
    }

    fn take_shared_budget(
        &self,
        agent: &str,
        n: u64,
        rate: u32,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        self.kv.take_budget(agent, n, rate, burst, now_ms)
    }

    fn set_crl_signer(&self, signer: std::sync::Arc<dyn CrlSigner>) {
        let _ = self.crl_signer.set(signer);
    }

    fn set_event_sink(&self, sink: std::sync::Arc<dyn EventSink>) {
        let _ = self.event_sink.set(sink);
    }

    fn resign_crls(&self) -> Result<u64, StoreError> {
        self.commit(&Audit::quiet(), |tx| {
            tx.resign.set(true);
            Ok(())
        })?;
        self.revision()
    }

    fn crls(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        // Every server's: `crls` alone on sled, `crls/<server>` when shared.
        let mut out = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(META), CRLS_KEY.as_bytes())? {
            if key == CRLS_KEY.as_bytes() || key.starts_with(b"crls/") {
                out.extend(decode::<pb::Crls>(&key, &bytes)?.crls);
            }
        }
        Ok(out)
    }

    fn put_join_token(
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

    fn take_join_token(
        &self,
        token: &str,
        audit: &Audit<'_, Option<pb::JoinToken>>,
    ) -> Result<Option<pb::JoinToken>, StoreError> {
        let key = join_token_key(token);
        self.commit(audit, |tx| {
            tx.remove(JOIN_TOKENS, &key)?.map(|bytes| decode(b"join token", &bytes)).transpose()
        })
    }

    fn join_token_exists(&self, token: &str) -> Result<bool, StoreError> {
        Ok(self.kv.get(t(JOIN_TOKENS), &join_token_key(token))?.is_some())
    }

    fn register_agent(
        &self,
        agent: &pb::Agent,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            if let Err(refusal) = tx.agent_id_free(&agent.spiffe_id)? {
                return Ok(Err(refusal));
            }
            tx.put_agent(agent);
            tx.record(svid);
            Ok(Ok(()))
        })
    }

    fn propose(
        &self,
        proposal: &pb::Entry,
        audit: &Audit<'_, Result<(), ApprovalRefusal>>,
    ) -> Result<Result<(), ApprovalRefusal>, StoreError> {
        let bytes = proposal.encode_to_vec();
        self.commit(audit, |tx| {
            if let Some(waiting) = tx.txn.get(PENDING, proposal.id.as_bytes())? {
                let waiting: pb::Entry = decode(proposal.id.as_bytes(), &waiting)?;
                let id = waiting.pending.map(|p| p.proposal_id).unwrap_or_default();
                return Ok(Err(ApprovalRefusal::AlreadyPending {
                    entry: proposal.id.clone(),
                    proposal: id,
                }));
            }
            let op = proposal.pending.as_ref().map(|p| p.op.as_str());
            if op == Some(approval::OP_JOIN_TOKEN) {
                if let Err(refusal) = tx.agent_id_free(&proposal.spiffe_id)? {
                    return Ok(Err(ApprovalRefusal::Agent(refusal.to_string())));
                }
            }
            tx.txn.put(PENDING, proposal.id.as_bytes(), bytes.as_slice());
            Ok(Ok(()))
        })
    }

    fn remove_proposal(
        &self,
        key: &str,
        proposal_id: Option<&str>,
        audit: &Audit<'_, bool>,
    ) -> Result<bool, StoreError> {
        self.commit(audit, |tx| {
            let Some(bytes) = tx.txn.get(PENDING, key.as_bytes())? else { return Ok(false) };
            if let Some(wanted) = proposal_id {
                let stored: pb::Entry = decode(key.as_bytes(), &bytes)?;
                if stored.pending.is_none_or(|p| p.proposal_id != wanted) {
                    return Ok(false);
                }
            }
            Ok(tx.txn.delete(PENDING, key.as_bytes())?.is_some())
        })
    }

    fn approve(
        &self,
        key: &str,
        content_hash: &str,
        approver_uid: u32,
        now: i64,
        audit: &Audit<'_, Result<Approved, ApprovalRefusal>>,
    ) -> Result<Result<Approved, ApprovalRefusal>, StoreError> {
        // A proposal ID names its key (the entry ID) through a scan; the
        // commit then re-reads and checks the record under that key.
        let key = match self.kv.get(PENDING, key.as_bytes())? {
            Some(_) => key.to_string(),
            None => kv::scan_prefix(&*self.kv, PENDING, b"")?
                .into_iter()
                .find_map(|(k, v)| {
                    let p: pb::Entry = decode(&k, &v).ok()?;
                    (p.pending?.proposal_id == key).then(|| String::from_utf8_lossy(&k).into())
                })
                .unwrap_or_else(|| key.to_string()),
        };
        self.commit(audit, |tx| {
            let Some(bytes) = tx.txn.get(PENDING, key.as_bytes())? else {
                return Ok(Err(ApprovalRefusal::NotFound(key.clone())));
            };
            let proposal: pb::Entry = decode(key.as_bytes(), &bytes)?;
            let pending = match approval::check(&proposal, content_hash, approver_uid, now) {
                Ok(pending) => pending,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let mut write = EntryWrite::default();
            match pending.op.as_str() {
                approval::OP_JOIN_TOKEN => {
                    if let Err(refusal) = tx.agent_id_free(&proposal.spiffe_id)? {
                        return Ok(Err(ApprovalRefusal::Agent(refusal.to_string())));
                    }
                    let token = pb::JoinToken {
                        token: String::new(),
                        spiffe_id: proposal.spiffe_id.clone(),
                        expires_at: now + i64::from(pending.join_token_ttl),
                        pending: None,
                        approved: true,
                    };
                    tx.put(JOIN_TOKENS, pending.join_token_hash.as_bytes(), token.encode_to_vec());
                }
                op => {
                    let stored = pb::Entry { pending: None, ..proposal.clone() };
                    let entry = Entry::from_stored(stored).map_err(|e| corrupt("proposal", e))?;
                    let result = if op == approval::OP_UPDATE {
                        match tx.entry(&entry.id)? {
                            Some(current) if current.revision == pending.base_revision => {}
                            _ => return Ok(Err(ApprovalRefusal::Changed(entry.id.clone()))),
                        }
                        let mut revoke = Vec::new();
                        let mut written = EntryWrite::default();
                        let result =
                            tx.update_one(&entry, now, "entry updated", &mut written, &mut revoke)?;
                        write.previous = written.previous;
                        write.revoked = tx.revoke(&revoke)?;
                        result
                    } else {
                        tx.create_one(&entry)?
                    };
                    match result {
                        Ok(entry) => write.results.push(Ok(entry)),
                        Err(e) => return Ok(Err(ApprovalRefusal::Entry(e))),
                    }
                }
            }
            tx.txn.delete(PENDING, key.as_bytes())?;
            Ok(Ok(Approved { proposal: proposal.clone(), write }))
        })
    }

    fn check_agent(
        &self,
        agent_id: &str,
        serial: &str,
    ) -> Result<Result<pb::Agent, AgentRefusal>, StoreError> {
        let Some(agent) = self.agent(agent_id)? else {
            return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
        };
        if agent.banned {
            return Ok(Err(AgentRefusal::Banned(agent_id.to_string())));
        }
        if self.kv.get(t(REVOCATIONS), serial.as_bytes())?.is_some() {
            return Ok(Err(AgentRefusal::Revoked(serial.to_string())));
        }
        if agent.x509_svid_serial != serial {
            return Ok(Err(AgentRefusal::Superseded(serial.to_string())));
        }
        Ok(Ok(agent))
    }

    fn renew_agent(
        &self,
        agent_id: &str,
        presented: &str,
        svid: &pb::IssuedSvid,
        now: i64,
        audit: &Audit<'_, RenewOutcome>,
    ) -> Result<Result<(pb::Agent, Vec<pb::Revocation>), AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(mut agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            if agent.banned {
                return Ok(Err(AgentRefusal::Banned(agent_id.to_string())));
            }
            if tx.get(REVOCATIONS, presented.as_bytes())?.is_some() {
                return Ok(Err(AgentRefusal::Revoked(presented.to_string())));
            }
            let mut revoked = Vec::new();
            if presented != agent.x509_svid_serial {
                if presented.is_empty() || presented != agent.previous_x509_svid_serial {
                    return Ok(Err(AgentRefusal::Superseded(presented.to_string())));
                }
                // The agent never got the reply to its last renewal: the
                // SVID it lost must not stay valid.
                if let Some(bytes) = tx.get(ISSUED, agent.x509_svid_serial.as_bytes())? {
                    let lost: pb::IssuedSvid = decode(b"issued", &bytes)?;
                    revoked = tx.revoke(&[revocation_of(
                        &lost,
                        "agent SVID reply lost; superseded",
                        now,
                    )])?;
                }
            }
            agent.previous_x509_svid_serial = presented.to_string();
            agent.x509_svid_serial = svid.serial.clone();
            agent.x509_svid_expires_at = svid.expires_at;
            agent.last_seen_at = now;
            tx.put_agent(&agent);
            tx.record(svid);
            Ok(Ok((agent, revoked)))
        })
    }

    fn ban_agent(
        &self,
        agent_id: &str,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        let why = format!("agent banned: {reason}");
        self.commit(audit, |tx| {
            let Some(mut agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            let issued = tx.issued_through_agent(agent_id)?;
            agent.banned = true;
            tx.put_agent(&agent);
            // The ban first: the agent's stream tells it it is banned before
            // the revocation of its own SVID closes the stream.
            tx.log(ChangeKind::AgentBanned {
                agent_id: agent_id.to_string(),
                reason: reason.to_string(),
            })?;
            let revocations: Vec<_> = issued.iter().map(|s| revocation_of(s, &why, now)).collect();
            let revoked = tx.revoke(&revocations)?;
            Ok(Ok(revoked))
        })
    }

    fn evict_agent(
        &self,
        agent_id: &str,
        unban: bool,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(agent) = tx.agent(agent_id)? else {
                return Ok(Err(AgentRefusal::Unknown(agent_id.to_string())));
            };
            let own = tx.issued_by_owner(&agent_owner(agent_id))?;
            if agent.banned && !unban {
                // Evicting must not become a way to lift a ban: keep the
                // record (banned) so the agent can never attest again.
                let kept = pb::Agent {
                    x509_svid_serial: String::new(),
                    previous_x509_svid_serial: String::new(),
                    ..agent
                };
                tx.put_agent(&kept);
            } else {
                tx.remove(AGENTS, agent_id.as_bytes())?;
            }
            // The eviction first: it closes the agent's stream with a
            // reason before the revocation of its SVID would.
            tx.log(ChangeKind::AgentEvicted { agent_id: agent_id.to_string() })?;
            let revocations: Vec<_> =
                own.iter().map(|s| revocation_of(s, "agent evicted", now)).collect();
            let revoked = tx.revoke(&revocations)?;
            Ok(Ok(revoked))
        })
    }

    fn confirm_agent_svid(&self, agent_id: &str, serial: &str) -> Result<(), StoreError> {
        // Most calls find nothing to do: check before taking the lock.
        match self.agent(agent_id)? {
            Some(a) if a.x509_svid_serial == serial && !a.previous_x509_svid_serial.is_empty() => {}
            _ => return Ok(()),
        }
        self.commit(&Audit::quiet(), |tx| {
            if let Some(mut agent) = tx.agent(agent_id)? {
                if agent.x509_svid_serial == serial && !agent.previous_x509_svid_serial.is_empty() {
                    agent.previous_x509_svid_serial.clear();
                    tx.put_agent(&agent);
                }
            }
            Ok(())
        })
    }

    fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError> {
        self.kv
            .get(t(AGENTS), spiffe_id.as_bytes())?
            .map(|b| decode(spiffe_id.as_bytes(), &b))
            .transpose()
    }

    fn agents(&self) -> Result<Vec<pb::Agent>, StoreError> {
        self.decode_tree(t(AGENTS))
    }

    fn record_issued(
        &self,
        agent_id: &str,
        agent_serial: &str,
        signed: &[Signed],
        now: i64,
    ) -> Result<Vec<Result<(), ItemRefused>>, StoreError> {
        // Group commit: concurrent batches (many agents signing at once)
        // share one commit and one fsync. Each caller encodes its batch and
        // queues it; whoever holds the writer lock records everything queued.
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job = IssueJob::new(agent_id, agent_serial, signed, now, done);
        self.issue_queue.lock().unwrap_or_else(|e| e.into_inner()).push(job);
        {
            let mut writer = self.lock();
            let jobs =
                std::mem::take(&mut *self.issue_queue.lock().unwrap_or_else(|e| e.into_inner()));
            if !jobs.is_empty() {
                match self.record_jobs(&mut writer, &jobs) {
                    Ok(all) => {
                        for (job, results) in jobs.iter().zip(all) {
                            let _ = job.done.send(Ok(results));
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        for job in &jobs {
                            let _ = job.done.send(Err(why.clone()));
                        }
                    }
                }
            }
        }
        result
            .recv()
            .map_err(|_| StoreError::Group("the commit of this batch was abandoned".into()))?
            .map_err(StoreError::Group)
    }

    fn record_minted(
        &self,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError> {
        self.record_minted_svid(svid, audit)
    }

    fn purge_agent(
        &self,
        agent_id: &str,
        expired_before: i64,
        now: i64,
        audit: &Audit<'_, Option<Vec<pb::Revocation>>>,
    ) -> Result<Option<Vec<pb::Revocation>>, StoreError> {
        self.purge_expired_agent(agent_id, expired_before, now, audit)
    }

    fn issued(&self, serial: &str) -> Result<Option<pb::IssuedSvid>, StoreError> {
        self.kv
            .get(t(ISSUED), serial.as_bytes())?
            .map(|b| decode(serial.as_bytes(), &b))
            .transpose()
    }

    fn issued_count(&self) -> usize {
        self.kv.len(t(ISSUED)).unwrap_or(0)
    }

    fn revoke(
        &self,
        revocations: &[pb::Revocation],
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError> {
        self.commit(audit, |tx| tx.revoke(revocations).map(drop))
    }

    fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError> {
        self.kv
            .get(t(REVOCATIONS), serial.as_bytes())?
            .map(|b| decode(serial.as_bytes(), &b))
            .transpose()
    }

    fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError> {
        self.decode_tree(t(REVOCATIONS))
    }

    fn prune_expired(&self, now: i64) -> Result<usize, StoreError> {
        // Expired records stay expired: find them without the lock, then
        // remove them in one commit.
        let mut issued = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(ISSUED), b"")? {
            let svid: pb::IssuedSvid = decode(&key, &bytes)?;
            if svid.expires_at <= now {
                issued.push(svid);
            }
        }
        let mut revocations = Vec::new();
        for (key, bytes) in scan_prefix(&*self.kv, t(REVOCATIONS), b"")? {
            if decode::<pb::Revocation>(&key, &bytes)?.expires_at <= now {
                revocations.push(key);
            }
        }
        if issued.is_empty() && revocations.is_empty() {
            return Ok(0);
        }
        let mut writer = self.lock();
        let pruned = self.commit_locked(&mut writer, &Audit::quiet(), |tx| {
            for svid in &issued {
                let key = svid_key(&svid.serial, &svid.jti);
                tx.remove(ISSUED, key.as_bytes())?;
                tx.remove(ISSUED_BY_OWNER, index_key(&owner_of(svid), &key))?;
            }
            for key in &revocations {
                tx.remove(REVOCATIONS, key)?;
            }
            Ok(issued.len() + revocations.len())
        })?;
        writer.revocations.retain(|r| r.expires_at > now);
        Ok(pruned)
    }

    fn check(&self) -> Result<StoreReport, StoreError> {
        verify_records(&self.dump()?)
    }

    fn backup(&self, out: &mut dyn Write) -> Result<(), StoreError> {
        // Under the lock: a copy of one moment, while reads go on.
        write_backup(&self.dump()?, out)
    }

    fn health(&self) -> Result<String, StoreError> {
        self.kv.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryRules;
    use tessera_workload_api::TrustDomain;

    fn entry(id: &str, spiffe: &str, parent: &str, uid: u32) -> Entry {
        let rules = EntryRules {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            default_ttl: 60,
            max_ttl: 600,
            default_jwt_ttl: 300,
            max_jwt_ttl: 600,
        };
        let mut e = rules
            .validate(
                &pb::Entry {
                    spiffe_id: format!("spiffe://example.org/{spiffe}"),
                    parent_id: format!("spiffe://example.org/{parent}"),
                    selectors: vec![pb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        e.id = id.into();
        e
    }

    fn issued(serial: &str, entry: &Entry) -> pb::IssuedSvid {
        pb::IssuedSvid {
            serial: serial.into(),
            spiffe_id: entry.spiffe_id.to_string(),
            entry_id: entry.id.clone(),
            agent_id: entry.parent_id.to_string(),
            expires_at: i64::MAX,
            ca_seq: 1,
            jti: String::new(),
        }
    }

    fn agent(id: &str, serial: &str) -> pb::Agent {
        pb::Agent {
            spiffe_id: format!("spiffe://example.org/{id}"),
            x509_svid_serial: serial.into(),
            x509_svid_expires_at: i64::MAX,
            ..Default::default()
        }
    }

    fn agent_svid(id: &str, serial: &str) -> pb::IssuedSvid {
        pb::IssuedSvid {
            serial: serial.into(),
            agent_id: format!("spiffe://example.org/{id}"),
            expires_at: i64::MAX,
            ..Default::default()
        }
    }

    /// Pages of every size, after every position, with each filter, give
    /// exactly the matching entries in ID order.
    fn entries_list_in_pages_with_and_without_filters(place: Place) {
        let store = place.open();
        let made: Vec<Entry> = (0..23)
            .map(|i| {
                let parent = if i % 3 == 0 { "agent-a" } else { "agent-b" };
                let spiffe = if i % 4 == 0 { "shared".to_string() } else { format!("w{i}") };
                entry(&format!("e{i:02}"), &spiffe, parent, i)
            })
            .collect();
        assert!(store.create_entries(&made, &Audit::quiet()).unwrap().iter().all(Result::is_ok));
        let id = |s: &str| SpiffeId::parse(&format!("spiffe://example.org/{s}")).unwrap();
        let filters = [
            EntryFilter::default(),
            EntryFilter { parent_id: Some(id("agent-a")), spiffe_id: None },
            EntryFilter { parent_id: Some(id("agent-b")), spiffe_id: Some(id("shared")) },
            EntryFilter { parent_id: None, spiffe_id: Some(id("shared")) },
            EntryFilter { parent_id: Some(id("nobody")), spiffe_id: None },
        ];
        for filter in &filters {
            let mut want: Vec<String> = made
                .iter()
                .filter(|e| filter.parent_id.as_ref().is_none_or(|p| &e.parent_id == p))
                .filter(|e| filter.spiffe_id.as_ref().is_none_or(|s| &e.spiffe_id == s))
                .map(|e| e.id.clone())
                .collect();
            want.sort();
            for page in [1, 2, 5, 100] {
                let (mut got, mut after) = (Vec::new(), None::<String>);
                loop {
                    let listed = store.list_entries(filter, after.as_deref(), page).unwrap();
                    assert!(listed.len() <= page);
                    got.extend(listed.iter().map(|e| e.id.clone()));
                    if listed.len() < page {
                        break;
                    }
                    after = listed.last().map(|e| e.id.clone());
                }
                assert_eq!(got, want, "{filter:?}, pages of {page}");
            }
        }
    }

    /// A multi-get answers each ID asked, in order, repeats and absent ones included.
    fn entries_are_read_at_once_in_the_order_asked(place: Place) {
        let store = place.open();
        let made = [entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 2)];
        assert!(store.create_entries(&made, &Audit::quiet()).unwrap().iter().all(Result::is_ok));
        let ids: Vec<String> = ["b", "zz", "a", "b"].iter().map(|s| s.to_string()).collect();
        let got: Vec<Option<String>> =
            store.entries(&ids).unwrap().into_iter().map(|e| e.map(|e| e.id)).collect();
        let want = [Some("b"), None, Some("a"), Some("b")].map(|s| s.map(str::to_string));
        assert_eq!(got, want);
        assert!(store.entries(&[]).unwrap().is_empty());
    }

    fn entries_are_indexed_by_parent_and_survive_reopen(place: Place) {
        {
            let store = place.open();
            let results = store
                .create_entries(
                    &[
                        entry("a", "w1", "agent1", 1),
                        entry("b", "w2", "agent2", 1),
                        entry("c", "w3", "agent1", 2),
                    ],
                    &Audit::quiet(),
                )
                .unwrap();
            assert!(results.iter().all(Result::is_ok));
            assert_eq!(store.revision().unwrap(), 3);
        }
        let store = place.open();
        let parent = SpiffeId::parse("spiffe://example.org/agent1").unwrap();
        let ids: Vec<_> =
            store.entries_by_parent(&parent).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(store.entry_count(), 3);
    }

    fn duplicates_are_refused_per_item_and_store_unchanged(place: Place) {
        let store = place.open();
        store.create_entries(&[entry("a", "w", "agent", 1)], &Audit::quiet()).unwrap();
        let results = store
            .create_entries(
                &[
                    entry("b", "w", "agent", 1),
                    entry("c", "w", "agent", 2),
                    entry("d", "w", "agent", 2),
                ],
                &Audit::quiet(),
            )
            .unwrap();
        assert_eq!(results[0], Err(EntryError::Duplicate("a".into())));
        assert!(results[1].is_ok());
        assert_eq!(results[2], Err(EntryError::Duplicate("c".into())));
        assert_eq!(store.entry_count(), 2);
        assert_eq!(store.revision().unwrap(), 2);
    }

    /// One change per revision: an update that moves an entry names both
    /// parents in one record, so a resume decides from the entry as it is.
    fn an_update_is_one_change_naming_old_and_new_parent(place: Place) {
        let store = place.open();
        store.create_entries(&[entry("a", "w", "agent1", 1)], &Audit::quiet()).unwrap();
        let write = store
            .update_entries(&[entry("a", "w", "agent2", 1)], 0, "moved", &Audit::quiet())
            .unwrap();
        assert_eq!(write.results[0].as_ref().unwrap().revision, 2);
        let changes = store.changes_since(1, 100).unwrap();
        assert_eq!(
            changes,
            [Change {
                revision: 2,
                kind: ChangeKind::Entry {
                    entry_id: "a".into(),
                    parents: vec![
                        "spiffe://example.org/agent1".into(),
                        "spiffe://example.org/agent2".into()
                    ]
                }
            }]
        );
        let revisions: Vec<u64> =
            store.changes_since(0, 100).unwrap().iter().map(|c| c.revision).collect();
        assert_eq!(revisions, [1, 2], "revisions are commit order, without gaps");
    }

    /// Item 4: a delete and the revocation of its SVIDs are one commit;
    /// what is reopened after it has both or neither.
    fn a_delete_and_its_revocations_are_one_commit(place: Place) {
        {
            let store = place.open();
            let e = entry("a", "w", "agent", 1);
            store.create_entries(std::slice::from_ref(&e), &Audit::quiet()).unwrap();
            store
                .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
                .unwrap()
                .unwrap();
            let signed =
                [Signed { svid: issued("01", &e), entry: e.clone(), event: Default::default() }];
            assert_eq!(
                store.record_issued(&e.parent_id.to_string(), "s0", &signed, 5).unwrap(),
                [Ok(())]
            );
            let write =
                store.delete_entries(&["a".into()], 7, "entry deleted", &Audit::quiet()).unwrap();
            assert_eq!(write.revoked.len(), 1);
            let kinds: Vec<_> =
                store.changes_since(1, 100).unwrap().into_iter().map(|c| c.kind).collect();
            assert!(
                matches!(kinds.as_slice(), [ChangeKind::Entry { .. }, ChangeKind::Revoked { serials, .. }] if serials == &["01"])
            );
        }
        let store = place.open();
        assert!(store.entry("a").unwrap().is_none());
        assert_eq!(store.revocation("01").unwrap().map(|r| r.revoked_at), Some(7));
        let retry = store.delete_entries(&["a".into()], 8, "again", &Audit::quiet()).unwrap();
        assert_eq!(retry.results[0], Err(EntryError::NotFound("a".into())));
    }

    /// Item 4: an SVID whose signing raced a delete, a change or a ban is
    /// recorded and revoked in the same commit, never handed out valid.
    fn svids_recorded_after_their_entry_changed_are_revoked(place: Place) {
        let store = place.open();
        let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 1));
        store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        store.delete_entries(&["a".into()], 1, "deleted", &Audit::quiet()).unwrap();
        let mut renamed = b.clone();
        renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/other").unwrap();
        store.update_entries(&[renamed], 1, "renamed", &Audit::quiet()).unwrap();
        let signed = [
            Signed { svid: issued("0a", &a), entry: a.clone(), event: Default::default() },
            Signed { svid: issued("0b", &b), entry: b.clone(), event: Default::default() },
        ];
        let results = store.record_issued("spiffe://example.org/agent", "s0", &signed, 2).unwrap();
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(
            store.revocation("0a").unwrap().is_some() && store.revocation("0b").unwrap().is_some()
        );

        // Signed with an agent SVID a renewal replaced meanwhile: refused
        // with the typed code the agent acts on (sign again at once).
        let d = entry("d", "w4", "agent", 1);
        store.create_entries(std::slice::from_ref(&d), &Audit::quiet()).unwrap();
        let signed = [Signed { svid: issued("0d", &d), entry: d, event: Default::default() }];
        let results =
            store.record_issued("spiffe://example.org/agent", "s-old", &signed, 3).unwrap();
        assert_eq!(
            results[0].as_ref().err().and_then(|r| r.refusal),
            Some(Refusal::AgentSvidChanged),
            "{results:?}"
        );

        let c = entry("c", "w3", "agent", 1);
        store.create_entries(std::slice::from_ref(&c), &Audit::quiet()).unwrap();
        store.ban_agent("spiffe://example.org/agent", "test", 3, &Audit::quiet()).unwrap().unwrap();
        let signed = [Signed { svid: issued("0c", &c), entry: c, event: Default::default() }];
        let results = store.record_issued("spiffe://example.org/agent", "s0", &signed, 4).unwrap();
        assert_eq!(results[0].as_ref().err().and_then(|r| r.refusal), Some(Refusal::Banned));
        assert!(store.revocation("0c").unwrap().is_some());
    }

    /// JWT-SVIDs are recorded under `jwt:<jti>` and revoked with their entry
    /// (renamed) or agent (banned) like X509-SVIDs; their revocations are
    /// logged with their expiry and kept out of the CRL signing set, and
    /// survive a reopen.
    fn jwt_svids_are_revoked_with_their_entry_and_agent(place: Place) {
        let jwt = |jti: &str, entry: &Entry| pb::IssuedSvid {
            serial: String::new(),
            jti: jti.into(),
            expires_at: 1000,
            ..issued("", entry)
        };
        {
            let store = place.open();
            let (a, b) = (entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 1));
            store.create_entries(&[a.clone(), b.clone()], &Audit::quiet()).unwrap();
            store
                .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
                .unwrap()
                .unwrap();
            let signed = [
                Signed { svid: jwt("j1", &a), entry: a.clone(), event: Default::default() },
                Signed { svid: jwt("j2", &b), entry: b.clone(), event: Default::default() },
                Signed { svid: issued("0b", &b), entry: b.clone(), event: Default::default() },
            ];
            let results =
                store.record_issued("spiffe://example.org/agent", "s0", &signed, 1).unwrap();
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert!(store.issued("jwt:j1").unwrap().is_some());
            let mut renamed = a.clone();
            renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/renamed").unwrap();
            let write = store.update_entries(&[renamed], 2, "renamed", &Audit::quiet()).unwrap();
            assert_eq!(write.revoked.iter().map(|r| r.jti.as_str()).collect::<Vec<_>>(), ["j1"]);
            let revoked = store
                .ban_agent("spiffe://example.org/agent", "test", 3, &Audit::quiet())
                .unwrap()
                .unwrap();
            let mut jtis: Vec<&str> =
                revoked.iter().filter(|r| !r.jti.is_empty()).map(|r| r.jti.as_str()).collect();
            jtis.sort_unstable();
            assert_eq!(jtis, ["j2"]);
            let logged: Vec<RevokedJwt> = store
                .changes_since(0, 100)
                .unwrap()
                .into_iter()
                .flat_map(|c| match c.kind {
                    ChangeKind::Revoked { jwts, .. } => jwts,
                    _ => Vec::new(),
                })
                .collect();
            assert_eq!(
                logged,
                [
                    RevokedJwt { jti: "j1".into(), expires_at: 1000 },
                    RevokedJwt { jti: "j2".into(), expires_at: 1000 }
                ]
            );
            assert!(store.lock().revocations.iter().all(|r| r.jti.is_empty()));
        }
        let store = place.open();
        assert_eq!(store.revocation("jwt:j2").unwrap().unwrap().jti, "j2");
        assert!(
            store.lock().revocations.iter().all(|r| r.jti.is_empty()),
            "CRLs list serials only"
        );
        assert_eq!(store.prune_expired(1000).unwrap(), 4, "records and revocations go at expiry");
        assert!(store.revocation("jwt:j1").unwrap().is_none());
    }

    /// The server revokes exactly on the changes for which the agent
    /// re-issues because the old SVID no longer states what the entry
    /// authorizes: a new DNS name revokes; a new TTL alone does not.
    fn a_dns_name_change_revokes_and_a_ttl_change_does_not(place: Place) {
        let store = place.open();
        let e = entry("a", "w", "agent", 1);
        store.create_entries(std::slice::from_ref(&e), &Audit::quiet()).unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        let signed =
            [Signed { svid: issued("0a", &e), entry: e.clone(), event: Default::default() }];
        store.record_issued("spiffe://example.org/agent", "s0", &signed, 1).unwrap();
        let mut longer = e.clone();
        longer.x509_svid_ttl = 600;
        assert!(store
            .update_entries(&[longer.clone()], 2, "ttl", &Audit::quiet())
            .unwrap()
            .revoked
            .is_empty());
        let mut named = longer;
        named.dns_names = vec!["web.internal".into()];
        let revoked = store.update_entries(&[named], 3, "dns", &Audit::quiet()).unwrap().revoked;
        assert_eq!(revoked.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(), ["0a"]);
    }

    /// Item 4: a renewal cannot undo a ban, and is refused once banned.
    fn a_renewal_never_undoes_a_ban(place: Place) {
        let store = place.open();
        let id = "spiffe://example.org/agent";
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        store.ban_agent(id, "test", 1, &Audit::quiet()).unwrap().unwrap();
        let refused =
            store.renew_agent(id, "s0", &agent_svid("agent", "s1"), 2, &Audit::quiet()).unwrap();
        assert_eq!(refused.err(), Some(AgentRefusal::Banned(id.into())));
        assert!(store.agent(id).unwrap().unwrap().banned);
        assert_eq!(store.check_agent(id, "s0").unwrap(), Err(AgentRefusal::Banned(id.into())));
    }

    /// Item 7: a store behind its watermark (data lost, or an old copy put
    /// back) is refused, never served as what is left.
    /// Where a conformance test's store lives: each `open` is a new handle
    /// on the same records (a restart).
    enum Place {
        Sled(tempfile::TempDir),
        Postgres(String),
    }

    impl Place {
        fn sled() -> Self {
            Place::Sled(tempfile::tempdir().unwrap())
        }

        fn postgres() -> Self {
            Place::Postgres(crate::pg_cluster::PgCluster::shared().database())
        }

        fn open(&self) -> KvStore {
            self.open_as("server-a")
        }

        /// Another server's handle (on sled: the same store).
        fn open_as(&self, server_id: &str) -> KvStore {
            match self {
                Place::Sled(dir) => KvStore::open(dir.path()).unwrap(),
                Place::Postgres(url) => KvStore::open_postgres(url, server_id).unwrap(),
            }
        }
    }

    /// The conformance suite: every test runs against sled and against
    /// PostgreSQL (a private cluster, a database per test).
    macro_rules! conformance {
        ($($name:ident),* $(,)?) => {
            mod sled_store {
                $( #[test] fn $name() { super::$name(super::Place::sled()) } )*
            }
            mod postgres_store {
                $( #[test] fn $name() { super::$name(super::Place::postgres()) } )*
            }
        };
    }

    conformance!(
        entries_are_indexed_by_parent_and_survive_reopen,
        entries_are_read_at_once_in_the_order_asked,
        entries_list_in_pages_with_and_without_filters,
        duplicates_are_refused_per_item_and_store_unchanged,
        an_update_is_one_change_naming_old_and_new_parent,
        a_delete_and_its_revocations_are_one_commit,
        svids_recorded_after_their_entry_changed_are_revoked,
        jwt_svids_are_revoked_with_their_entry_and_agent,
        a_dns_name_change_revokes_and_a_ttl_change_does_not,
        a_renewal_never_undoes_a_ban,
        backup_restores_every_record_and_a_damaged_backup_is_refused,
        join_token_can_be_taken_once,
        join_tokens_are_hashed_and_never_name_an_agent_or_entry,
        an_approval_writes_exactly_the_proposal_it_names,
        an_update_decided_against_a_revision_replaces_only_that_revision,
        join_token_exists_reads_without_writing,
        a_ca_record_set_per_server_makes_one_bundle,
    );

    /// One server on its embedded store keeps signing budgets in memory.
    #[test]
    fn an_embedded_store_leaves_signing_budgets_to_the_server() {
        let store = Place::sled().open();
        assert_eq!(store.take_shared_budget("agent", 1, 1, 1000, 0).unwrap(), None);
    }

    /// A stand-in CA record of `server`, generation `seq`.
    fn ca_record(server: &str, seq: u32) -> pb::CaRecord {
        pb::CaRecord {
            server_id: server.into(),
            seq,
            cert_der: vec![seq as u8],
            jwt: None,
            not_after: 99,
        }
    }

    fn a_ca_record_set_per_server_makes_one_bundle(place: Place) {
        let store = place.open();
        let record = ca_record;
        assert!(store.publish_cas("a", &[record("a", 1)]).unwrap());
        assert!(store.publish_cas("b", &[record("b", 1), record("b", 2)]).unwrap());
        assert!(!store.publish_cas("a", &[record("a", 1)]).unwrap(), "unchanged: no change logged");
        assert!(store.publish_cas("a", &[record("a", 2)]).unwrap());
        let mut held: Vec<(String, u32)> =
            store.cas().unwrap().into_iter().map(|r| (r.server_id, r.seq)).collect();
        held.sort();
        assert_eq!(held, [("a".into(), 2), ("b".into(), 1), ("b".into(), 2)]);
        let bundles = store
            .changes_since(0, 100)
            .unwrap()
            .into_iter()
            .filter(|c| c.kind == ChangeKind::Bundle)
            .count();
        assert_eq!(bundles, 3);
    }

    #[test]
    fn a_store_behind_its_watermark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let old = tempfile::tempdir().unwrap();
        {
            let store = KvStore::open(dir.path()).unwrap();
            store.create_entries(&[entry("a", "w1", "agent", 1)], &Audit::quiet()).unwrap();
        }
        copy_dir(dir.path(), old.path());
        {
            let store = KvStore::open(dir.path()).unwrap();
            store.create_entries(&[entry("b", "w2", "agent", 1)], &Audit::quiet()).unwrap();
        }
        // Put the old database back, keeping the newer watermark.
        std::fs::copy(dir.path().join("tessera.watermark"), old.path().join("tessera.watermark"))
            .unwrap();
        let err = KvStore::open(old.path()).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("acknowledged"), "{err}");
    }

    fn backup_restores_every_record_and_a_damaged_backup_is_refused(place: Place) {
        let store = place.open();
        store
            .create_entries(
                &[entry("a", "w1", "agent", 1), entry("b", "w2", "agent", 2)],
                &Audit::quiet(),
            )
            .unwrap();
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        let mut backup = Vec::new();
        store.backup(&mut backup).unwrap();
        let before = store.check().unwrap();

        let target = tempfile::tempdir().unwrap();
        let restored =
            KvStore::restore(&target.path().join("store"), &mut backup.as_slice()).unwrap();
        assert_eq!(restored, before);
        let reopened = KvStore::open(&target.path().join("store")).unwrap();
        assert_eq!(reopened.entry("b").unwrap().map(|e| e.id), Some("b".into()));

        let mut flipped = backup.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x10;
        let err = KvStore::restore(
            &tempfile::tempdir().unwrap().path().join("s"),
            &mut flipped.as_slice(),
        );
        assert!(err.unwrap_err().to_string().contains("checksum"));
        let err =
            KvStore::restore(&target.path().join("store"), &mut backup.as_slice()).unwrap_err();
        assert!(err.to_string().contains("already holds a store"), "{err}");
    }

    fn copy_dir(from: &Path, to: &Path) {
        for item in std::fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            let target = to.join(item.file_name());
            if item.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&item.path(), &target);
            } else {
                std::fs::copy(item.path(), target).unwrap();
            }
        }
    }

    fn join_token_can_be_taken_once(place: Place) {
        let store = place.open();
        let token = pb::JoinToken {
            token: "t".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            expires_at: 5,
            pending: None,
            approved: false,
        };
        store.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
        let stored = pb::JoinToken { token: String::new(), ..token };
        assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), Some(stored));
        assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), None);
    }

    /// Issue 19 (1, 11): a token is kept only as its hash; a token or an
    /// attestation for the ID of an agent on record (live or banned) or of
    /// an entry is refused, and an entry cannot take an agent's ID.
    fn join_tokens_are_hashed_and_never_name_an_agent_or_entry(place: Place) {
        let store = place.open();
        let secret = "d3b07384-d9a0-4c4e-9b1e-secret-token";
        let token = |id: &str| pb::JoinToken {
            token: secret.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            expires_at: 5,
            pending: None,
            approved: false,
        };
        store.put_join_token(&token("node/1"), &Audit::quiet()).unwrap().unwrap();
        let dump = store.dump().unwrap();
        let all: Vec<u8> =
            dump.iter().flatten().flat_map(|(k, v)| [k.clone(), v.clone()].concat()).collect();
        assert!(
            !all.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the token is not stored in clear"
        );
        store
            .register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
            .unwrap()
            .unwrap();
        assert_eq!(
            store.put_join_token(&token("agent"), &Audit::quiet()).unwrap(),
            Err(AgentRefusal::Exists("spiffe://example.org/agent".into()))
        );
        assert_eq!(
            store
                .register_agent(&agent("agent", "s1"), &agent_svid("agent", "s1"), &Audit::quiet())
                .unwrap(),
            Err(AgentRefusal::Exists("spiffe://example.org/agent".into())),
            "a second attestation does not take over a live agent's ID"
        );
        assert_eq!(
            store.agent("spiffe://example.org/agent").unwrap().unwrap().x509_svid_serial,
            "s0"
        );
        store.ban_agent("spiffe://example.org/agent", "test", 1, &Audit::quiet()).unwrap().unwrap();
        assert!(matches!(
            store.put_join_token(&token("agent"), &Audit::quiet()).unwrap(),
            Err(AgentRefusal::Exists(_))
        ));
        store
            .create_entries(&[entry("e1", "prod/payments", "agent", 1)], &Audit::quiet())
            .unwrap()
            .remove(0)
            .unwrap();
        assert_eq!(
            store.put_join_token(&token("prod/payments"), &Audit::quiet()).unwrap(),
            Err(AgentRefusal::EntryIdentity("spiffe://example.org/prod/payments".into()))
        );
        assert!(matches!(
            store
                .register_agent(
                    &agent("prod/payments", "s2"),
                    &agent_svid("prod/payments", "s2"),
                    &Audit::quiet()
                )
                .unwrap(),
            Err(AgentRefusal::EntryIdentity(_))
        ));
        assert_eq!(
            store
                .create_entries(&[entry("e2", "agent", "agent", 1)], &Audit::quiet())
                .unwrap()
                .remove(0),
            Err(EntryError::AgentIdentity("spiffe://example.org/agent".into()))
        );
    }

    /// Issue 19 (4): a proposal is taken by the approval that names its
    /// hash, in the commit that writes it; a second proposal for the entry
    /// is refused while one waits.
    fn an_approval_writes_exactly_the_proposal_it_names(place: Place) {
        let store = place.open();
        let op = |uid| pb::Operator { uid, gid: uid, pid: 1 };
        let e = entry("e1", "prod/a", "agent", 1);
        let first = approval::proposal(&e, approval::OP_CREATE, &op(1), vec![], 10, 60, 0);
        store.propose(&first, &Audit::quiet()).unwrap().unwrap();
        let second = approval::proposal(
            &entry("e1", "prod/b", "agent", 1),
            approval::OP_CREATE,
            &op(1),
            vec![],
            10,
            60,
            0,
        );
        assert!(matches!(
            store.propose(&second, &Audit::quiet()).unwrap(),
            Err(ApprovalRefusal::AlreadyPending { .. })
        ));
        let hash = |p: &pb::Entry| p.pending.clone().unwrap().content_hash;
        assert!(matches!(
            store.approve("e1", &hash(&second), 2, 11, &Audit::quiet()).unwrap(),
            Err(ApprovalRefusal::HashMismatch { .. })
        ));
        assert!(matches!(
            store.approve("e1", &hash(&first), 1, 11, &Audit::quiet()).unwrap(),
            Err(ApprovalRefusal::SameOperator { .. })
        ));
        assert!(store.entry("e1").unwrap().is_none(), "nothing written by a refused approval");
        let proposal_id = first.pending.clone().unwrap().proposal_id;
        let approved =
            store.approve(&proposal_id, &hash(&first), 2, 11, &Audit::quiet()).unwrap().unwrap();
        assert_eq!(approved.proposal, first);
        assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/a");
        assert!(
            matches!(
                store.approve("e1", &hash(&first), 2, 11, &Audit::quiet()).unwrap(),
                Err(ApprovalRefusal::NotFound(_))
            ),
            "taken once"
        );
        // An update proposed against a revision is refused once the entry moved on.
        let current = store.entry("e1").unwrap().unwrap();
        let update = approval::proposal(
            &entry("e1", "prod/c", "agent", 1),
            approval::OP_UPDATE,
            &op(1),
            vec![],
            12,
            60,
            current.revision,
        );
        store.propose(&update, &Audit::quiet()).unwrap().unwrap();
        store
            .update_entries(&[entry("e1", "prod/d", "agent", 1)], 12, "test", &Audit::quiet())
            .unwrap();
        assert!(matches!(
            store.approve("e1", &hash(&update), 2, 13, &Audit::quiet()).unwrap(),
            Err(ApprovalRefusal::Changed(_))
        ));
        assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/d");
    }

    /// An update judged against a revision (the approval policy's decision)
    /// replaces only that revision: one that lands after an approval (or
    /// another change) is refused, and the approved entry stays.
    fn an_update_decided_against_a_revision_replaces_only_that_revision(place: Place) {
        let store = place.open();
        let created =
            store.create_entries(&[entry("e1", "dev/a", "agent", 1)], &Audit::quiet()).unwrap();
        let judged = created[0].clone().unwrap().revision;
        store
            .update_entries(
                &[entry("e1", "prod/approved", "agent", 1)],
                1,
                "approved",
                &Audit::quiet(),
            )
            .unwrap();
        let mut late = entry("e1", "dev/b", "agent", 2);
        late.revision = judged;
        let write = store.update_entries(&[late], 2, "late", &Audit::quiet()).unwrap();
        assert_eq!(write.results, vec![Err(EntryError::Changed("e1".into()))]);
        assert_eq!(store.entry("e1").unwrap().unwrap().spiffe_id.path(), "/prod/approved");
    }

    fn join_token_exists_reads_without_writing(place: Place) {
        let store = place.open();
        let token = pb::JoinToken {
            token: "t".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            expires_at: 5,
            pending: None,
            approved: false,
        };
        store.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
        let before = store.check().unwrap().write_seq;
        assert!(store.join_token_exists("t").unwrap());
        assert!(!store.join_token_exists("bogus").unwrap());
        assert_eq!(store.check().unwrap().write_seq, before, "a lookup commits nothing");
        let stored = pb::JoinToken { token: String::new(), ..token };
        assert_eq!(store.take_join_token("t", &Audit::quiet()).unwrap(), Some(stored));
        assert!(!store.join_token_exists("t").unwrap());
    }

    /// Several servers on one PostgreSQL database.
    mod shared_postgres {
        use super::*;

        fn two() -> (Place, KvStore, KvStore) {
            let place = Place::postgres();
            let (a, b) = (place.open_as("server-a"), place.open_as("server-b"));
            (place, a, b)
        }

        /// Runs `work(store, i)` for `i` in `0..n` on as many threads at
        /// once, even `i` on server A and odd on B; the results in order.
        fn at_once<T: Send + 'static>(
            a: &Arc<KvStore>,
            b: &Arc<KvStore>,
            n: usize,
            work: fn(&KvStore, usize) -> T,
        ) -> Vec<T> {
            let threads: Vec<_> = (0..n)
                .map(|i| {
                    let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                    std::thread::spawn(move || work(&store, i))
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        }

        /// Writers on two servers at once: the log has every change once,
        /// numbered without holes, and both servers read the same log.
        #[test]
        fn two_servers_share_one_change_log_without_holes() {
            let (_place, a, b) = two();
            let (a, b) = (Arc::new(a), Arc::new(b));
            at_once(&a, &b, 4, |store, w| {
                for i in 0..25 {
                    let e = entry(&format!("e{w}-{i}"), &format!("w{w}-{i}"), "agent", 1);
                    assert!(store.create_entries(&[e], &Audit::quiet()).unwrap()[0].is_ok());
                }
            });
            for store in [&a, &b] {
                let revisions: Vec<u64> =
                    store.changes_since(0, 1000).unwrap().iter().map(|c| c.revision).collect();
                assert_eq!(revisions, (1..=100).collect::<Vec<_>>());
                assert_eq!(store.revision().unwrap(), 100);
                assert_eq!(store.entry_count(), 100);
            }
        }

        /// A commit on one server wakes the other's change feed (NOTIFY).
        #[test]
        fn a_commit_on_one_server_wakes_the_other() {
            let (_place, a, b) = two();
            let mut woken = b.subscribe();
            // The listener connects in the background: commit until it hears.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut n = 0;
            loop {
                n += 1;
                a.create_entries(
                    &[entry(&format!("e{n}"), &format!("w{n}"), "agent", 1)],
                    &Audit::quiet(),
                )
                .unwrap();
                std::thread::sleep(std::time::Duration::from_millis(100));
                if woken.has_changed().unwrap() && *woken.borrow_and_update() >= 1 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "server B never heard of A's commits"
                );
            }
            assert_eq!(b.changes_since(0, 100).unwrap().len(), n);
        }

        /// A join token is taken once, whichever servers race for it.
        #[test]
        fn a_join_token_is_taken_once_across_servers() {
            let (_place, a, b) = two();
            let (a, b) = (Arc::new(a), Arc::new(b));
            for i in 0..20 {
                let token = pb::JoinToken {
                    token: format!("t{i}"),
                    spiffe_id: "spiffe://example.org/a".into(),
                    expires_at: 5,
                    pending: None,
                    approved: false,
                };
                a.put_join_token(&token, &Audit::quiet()).unwrap().unwrap();
            }
            let takers: Vec<_> = [a.clone(), b.clone(), a, b]
                .into_iter()
                .map(|store| {
                    std::thread::spawn(move || {
                        (0..20)
                            .filter(|i| {
                                store
                                    .take_join_token(&format!("t{i}"), &Audit::quiet())
                                    .unwrap()
                                    .is_some()
                            })
                            .count()
                    })
                })
                .collect();
            let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(taken, 20, "every token taken exactly once");
        }

        /// Two servers rotating their CAs at once: each publishes only its
        /// own records, so the bundle is always the union of both latest sets.
        #[test]
        fn two_servers_rotating_at_once_keep_one_whole_bundle() {
            let (_place, a, b) = two();
            let (a, b) = (Arc::new(a), Arc::new(b));
            at_once(&a, &b, 2, |store, i| {
                let name = ["a", "b"][i];
                for seq in 1..=30 {
                    store
                        .publish_cas(name, &[ca_record(name, seq), ca_record(name, seq + 1)])
                        .unwrap();
                }
            });
            for store in [&a, &b] {
                let mut held: Vec<(String, u32)> =
                    store.cas().unwrap().into_iter().map(|r| (r.server_id, r.seq)).collect();
                held.sort();
                assert_eq!(
                    held,
                    [("a".into(), 30), ("a".into(), 31), ("b".into(), 30), ("b".into(), 31)]
                );
            }
        }

        /// An agent's signing budget is one across servers: what it took
        /// on A is gone on B; time refills it.
        #[test]
        fn a_signing_budget_is_shared_across_servers() {
            let (_place, a, b) = two();
            let (rate, burst) = (100, 1000);
            assert_eq!(a.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(true));
            assert_eq!(b.take_shared_budget("agent", 600, rate, burst, 0).unwrap(), Some(false));
            assert_eq!(b.take_shared_budget("agent", 400, rate, burst, 0).unwrap(), Some(true));
            assert_eq!(a.take_shared_budget("agent", 1, rate, burst, 0).unwrap(), Some(false));
            assert_eq!(a.take_shared_budget("other", 1000, rate, burst, 0).unwrap(), Some(true));
            // One second later: 100 more, no more.
            assert_eq!(a.take_shared_budget("agent", 100, rate, burst, 1000).unwrap(), Some(true));
            assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 1000).unwrap(), Some(false));
            // A server whose clock is behind does not refill it.
            assert_eq!(b.take_shared_budget("agent", 1, rate, burst, 500).unwrap(), Some(false));
        }

        /// Eight callers on two servers at once never take more than the
        /// bucket holds.
        #[test]
        fn concurrent_takes_on_two_servers_never_exceed_the_budget() {
            let (_place, a, b) = two();
            let (a, b) = (Arc::new(a), Arc::new(b));
            let taken: usize = at_once(&a, &b, 8, |store, _| {
                (0..40)
                    .filter(|_| {
                        store.take_shared_budget("agent", 10, 0, 1000, 0).unwrap() == Some(true)
                    })
                    .count()
            })
            .into_iter()
            .sum();
            assert_eq!(taken * 10, 1000, "exactly the burst, no more, no less");
        }

        /// A ban on one server is enforced by the other, and a renewal
        /// racing it on the other server cannot undo it.
        #[test]
        fn a_ban_on_one_server_holds_on_the_other() {
            let (_place, a, b) = two();
            let id = "spiffe://example.org/agent";
            a.register_agent(&agent("agent", "s0"), &agent_svid("agent", "s0"), &Audit::quiet())
                .unwrap()
                .unwrap();
            b.ban_agent(id, "test", 1, &Audit::quiet()).unwrap().unwrap();
            assert_eq!(a.check_agent(id, "s0").unwrap(), Err(AgentRefusal::Banned(id.into())));
            let refused =
                a.renew_agent(id, "s0", &agent_svid("agent", "s1"), 2, &Audit::quiet()).unwrap();
            assert_eq!(refused.err(), Some(AgentRefusal::Banned(id.into())));
        }
    }
}
