//! Durable storage: the `Store` trait the server needs, and its
//! implementation over a key-value database, sled or PostgreSQL.
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
//!
//! # Where things are
//!
//! This file has the [`Store`] trait and the types it speaks (with the
//! [`Audit`] of `audit.rs` and the [`StoreError`] of `error.rs`). The rest
//! is one concept per file, each using (importing, or calling a method of)
//! only this file and the files listed before it:
//!
//! - the key-value layer: `error.rs`, `kv.rs` (the `Kv` trait,
//!   transactions, locks), `sled/` (with `chunks.rs`), `postgres.rs` (with `postgres/`:
//!   a connection, TLS), and `kv_api.rs`, the crate's public `kv` module.
//!   It knows nothing of the store but `StoreError`.
//! - the records: `layout.rs` (trees, keys, decoding), `audit.rs` (the
//!   events a commit chains into the event log), `watermark.rs`,
//!   `issued_index.rs` (how issued SVIDs are kept: rows, and on sled an
//!   index in memory), `issue_queue.rs` (issuance's group commit),
//!   `entry_cache.rs` (on sled, entries decoded for signing).
//! - the [`KvStore`]: `kv_store.rs` (what it holds) and `commit.rs` (one
//!   commit, and its view of the trees, `Tx`).
//! - one file per concept of the [`Store`] trait: `changes.rs` (the change
//!   log), `revocations.rs` (with the CRLs), `entries.rs`, `cas.rs`,
//!   `agents.rs`, `join_tokens.rs`, `approvals.rs`, `issuance.rs`,
//!   `operator.rs`, `broker.rs` (the token broker's tasks, access tokens,
//!   held requests and keys), `check.rs`; then `open.rs` (opening a store checks it),
//!   `backup.rs` (a restore opens one), and `store_impl.rs`, which
//!   implements the trait by calling them.
//!
//! The rest of the server uses the re-exports below, and of the files only
//! the key-value layer (`kv`, for the event log and the proposals, and
//! `postgres::redact`).

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_proto::types as pb;
use tessera_proto::Refusal;
use tessera_workload_api::SpiffeId;
use tokio::sync::watch;

use crate::broker::records::{
    AccessToken, BrokerRefusal, PendingRequest, PublishedKey, Task, TokenToRecord,
};
use crate::entry::{Entry, EntryError};
use crate::policy::approval::ApprovalRefusal;

mod agents;
mod approvals;
mod audit;
mod backup;
mod broker;
mod cas;
mod changes;
mod check;
mod commit;
mod entries;
mod entry_cache;
mod error;
mod issuance;
mod issue_queue;
mod issued_index;
mod join_tokens;
pub mod kv;
pub mod kv_api;
mod kv_store;
mod layout;
mod open;
mod operator;
pub(crate) mod postgres;
mod revocations;
pub(crate) mod sled;
mod store_impl;
#[cfg(test)]
mod tests;
mod watermark;

pub use approvals::PENDING;
pub use audit::{Audit, EventSink};
pub use error::StoreError;
pub use join_tokens::join_token_key;
pub use kv_store::KvStore;
#[cfg(test)]
pub(crate) use layout::entries_tree;
pub(crate) use layout::entry_stored;
pub use layout::svid_key;
pub use revocations::revocation_of;

/// Largest number of items in one batch write.
pub const MAX_BATCH: usize = 1000;

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

/// One caller's check against its agent's record: the record when the
/// caller may act for the agent, a refusal when it may not, an error when
/// the record could not be read.
pub type AgentCheck = Result<Result<pb::Agent, AgentRefusal>, StoreError>;

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
    /// The typed refusal (`agent-svid-changed`: sign again at once;
    /// `entry-changed`, `banned`, `evicted`: revoked as recorded).
    pub refusal: Refusal,
    /// Why, in words.
    pub why: String,
}

impl ItemRefused {
    fn typed(refusal: Refusal, why: String) -> Self {
        Self { refusal, why }
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

/// Entries read to sign from ([`Store::entries_for_signing`]).
#[derive(Debug, Clone)]
pub struct EntriesRead {
    /// A revision every change before the read is visible at.
    pub revision: u64,
    /// In the order asked, `None` where absent (on sled, each shared
    /// with the store's cache of entries read for signing).
    pub entries: Vec<Option<Arc<Entry>>>,
}

/// A signed SVID as its commit left it: recorded, or revoked (why).
pub type RecordedSvid = (Signed, Result<(), ItemRefused>);

/// A signed SVID to record, with the entry it was signed for.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The record.
    pub svid: pb::IssuedSvid,
    /// The entry as it was read for signing.
    pub entry: Arc<Entry>,
    /// The issuance's event: stored with the record, or, if the commit
    /// revokes the SVID, stored as a denial with the reason.
    pub event: pb::Event,
}

/// Signs the CRLs for a set of revocations: given to the store so that a
/// commit that revokes also stores CRLs listing what it revoked (agents
/// and workloads never see a revocation without its CRL).
pub trait CrlSigner: Send + Sync + fmt::Debug {
    /// One DER CRL per CA in the bundle, numbered `crl_number`, listing
    /// `revocations` (X509-SVIDs', sorted by serial, each serial once).
    fn sign_crls(
        &self,
        revocations: &[&pb::Revocation],
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
    /// Entries to sign from, as `entries`, and a revision every change
    /// before the read is visible at: [`Store::record_issued`] given it
    /// skips re-reading the entries when the store has not moved past it.
    fn entries_for_signing(&self, ids: &[String]) -> Result<EntriesRead, StoreError>;
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

    /// Up to `limit` changes after `revision`, in revision order;
    /// [`StoreError::ChangesTrimmed`] if the log no longer holds the next.
    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// The change log's start: every change from it on is held (some
    /// before it may be too).
    fn changes_start(&self) -> Result<u64, StoreError>;
    /// Deletes changes older than the newest `keep` once more than
    /// `keep + slack` are held (a chunk at a time); returns how far the
    /// start moved.
    fn trim_changes(&self, keep: u64, slack: u64) -> Result<u64, StoreError>;
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
    /// commit with every check of [`crate::policy::approval::check`] and, for an
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
    /// [`Store::check_agent`] for each `(agent_id, serial)`, in order, in
    /// one read per tree (the periodic re-check of every Sync stream); a
    /// record that cannot be read fails only its own item.
    fn check_agents(&self, callers: &[(String, String)]) -> Result<Vec<AgentCheck>, StoreError>;
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

    /// Records SVIDs signed for `agent_id`'s entries, as read at revision
    /// `read_at` ([`EntriesRead::revision`]). Each is checked, in the
    /// commit, against the agent (still current and unbanned) and the
    /// entry as it is now (not re-read while the store is still at
    /// `read_at`: no entry changed since); one no longer authorized is
    /// revoked at once and its item says why. Each comes back with what
    /// became of it, its event moved into the log.
    fn record_issued(
        &self,
        agent_id: &str,
        agent_serial: &str,
        read_at: u64,
        signed: Vec<Signed>,
        now: i64,
    ) -> Result<Vec<RecordedSvid>, StoreError>;
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

    /// Stores a new broker task, in one commit with the checks: its ID is
    /// not taken ([`BrokerRefusal::TaskExists`]), and a sub-task's parent exists, is live at the
    /// task's `created_at` and belongs to the same workload. The caller
    /// has clamped a sub-task's `expires_at` to its parent's.
    fn start_task(
        &self,
        task: &Task,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError>;
    /// Ends a task at `now` (`ended_by`: `uid:N: reason`, or `expired`)
    /// and its live sub-tasks, in one commit (each sub-task with its own
    /// `broker.task.end` event): from that commit every token issued under
    /// them is inactive ([`AccessToken::is_active`] reads the task).
    /// Refused: unknown ([`BrokerRefusal::UnknownTask`]), already ended
    /// ([`BrokerRefusal::TaskEnded`]). Returns the task as ended.
    fn end_task(
        &self,
        id: &str,
        now: i64,
        ended_by: &str,
        audit: &Audit<'_, Result<Task, BrokerRefusal>>,
    ) -> Result<Result<Task, BrokerRefusal>, StoreError>;
    /// One task (ended and expired ones until pruned).
    fn task(&self, id: &str) -> Result<Option<Task>, StoreError>;
    /// Every task on record, by `created_at`.
    fn tasks(&self) -> Result<Vec<Task>, StoreError>;
    /// IDs of tasks not ended whose `expires_at` is at or before `now`:
    /// for the expiry loop to end them.
    fn expired_tasks(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// Records several access tokens in one commit (the broker's group
    /// commit), each with the checks of [`Store::record_access_token`] in
    /// order; per-token results.
    fn record_access_tokens(
        &self,
        tokens: &[TokenToRecord],
        audit: &Audit<'_, Vec<Result<(), BrokerRefusal>>>,
    ) -> Result<Vec<Result<(), BrokerRefusal>>, StoreError>;
    /// Records an issued access token, durable before it returns, in one
    /// commit with the checks: its task exists, is live at `now` and is
    /// `token.sub`'s; for a token issued on an approval (`token.request`),
    /// the request exists, is approved and unexpired — it is then marked
    /// issued (an approval is used once). The task notes `done` (and one
    /// more token issued).
    fn record_access_token(
        &self,
        token: &AccessToken,
        done: &[String],
        now: i64,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError>;
    /// Revokes one access token (refused for an unknown or revoked one).
    fn revoke_access_token(
        &self,
        jti: &str,
        now: i64,
        audit: &Audit<'_, Result<AccessToken, BrokerRefusal>>,
    ) -> Result<Result<AccessToken, BrokerRefusal>, StoreError>;
    /// An access token's record, by `jti` (until pruned).
    fn access_token(&self, jti: &str) -> Result<Option<AccessToken>, StoreError>;
    /// Holds a new request for an operator; refused when its ID is taken
    /// ([`BrokerRefusal::RequestState`], wanted `new`).
    fn put_request(
        &self,
        request: &PendingRequest,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError>;
    /// One held request (decided ones until they are dropped).
    fn request(&self, id: &str) -> Result<Option<PendingRequest>, StoreError>;
    /// Every held request, by `created_at`.
    fn requests(&self) -> Result<Vec<PendingRequest>, StoreError>;
    /// An operator's decision on a held request, in one commit with the
    /// checks: it exists, is pending, has not expired at `now`, its content
    /// hash is `content_hash` (the approval binds what the operator saw:
    /// [`BrokerRefusal::ContentChanged`]), and `approver_uid` is not one
    /// of the workload's own ([`BrokerRefusal::OwnUid`]). Sets its state,
    /// `decided_by` (`uid:N`) and `reason`; an approval keeps `expires_at`.
    #[allow(clippy::too_many_arguments)]
    fn decide_request(
        &self,
        id: &str,
        content_hash: &str,
        approve: bool,
        approver_uid: u32,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<PendingRequest, BrokerRefusal>>,
    ) -> Result<Result<PendingRequest, BrokerRefusal>, StoreError>;
    /// Drops pending requests and unused approvals whose `expires_at` is
    /// at or before `now` (and returns them, for their events), and denied
    /// or used ones a day after that; one commit, none when nothing goes.
    fn expire_requests(
        &self,
        now: i64,
        audit: &Audit<'_, Vec<PendingRequest>>,
    ) -> Result<Vec<PendingRequest>, StoreError>;
    /// Replaces `server_id`'s published broker keys (no event, like
    /// [`Store::publish_cas`]).
    fn publish_broker_keys(&self, server_id: &str, keys: &[PublishedKey])
        -> Result<(), StoreError>;
    /// Every server's published broker keys: the JWKS is their union.
    fn broker_keys(&self) -> Result<Vec<PublishedKey>, StoreError>;
    /// Forgets access tokens expired for over a minute and tasks ended or
    /// expired over a day ago; how many records went.
    fn prune_access_tokens(&self, now: i64) -> Result<usize, StoreError>;

    /// Reads every record and checks the indexes and the watermark.
    fn check(&self) -> Result<StoreReport, StoreError>;
    /// Writes a consistent copy of every record to `out`.
    fn backup(&self, out: &mut dyn Write) -> Result<(), StoreError>;
    /// Whether the database answers, and what it is.
    fn health(&self) -> Result<String, StoreError>;
}
