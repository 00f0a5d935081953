//! `impl Store for KvStore`. Each method calls the inherent method of the
//! same name (in a call on `KvStore`, an inherent method is found before a
//! trait's), which lives with its concept: entries in `entries.rs`, the
//! change log in `changes.rs`, CA records in `cas.rs`, join tokens in
//! `join_tokens.rs`, agents in `agents.rs`, proposals in `approvals.rs`,
//! issued SVIDs in `issuance.rs`, revocations and CRLs in `revocations.rs`,
//! operator commands in `operator.rs`, the token broker's records in
//! `broker.rs`, `check` in `check.rs` and `backup` in `backup.rs`. Only the settings and the database's own answers are
//! here.

use std::io::Write;

use tessera_proto::types as pb;
use tessera_workload_api::SpiffeId;
use tokio::sync::watch;

use super::audit::{Audit, EventSink};
use super::error::StoreError;
use super::kv_store::KvStore;
use super::{
    AgentCheck, AgentRefusal, Approved, Change, CrlSigner, EntriesRead, EntryFilter, EntryWrite,
    RecordedSvid, RenewOutcome, Signed, Store, StoreReport,
};
use crate::broker::records::{
    AccessToken, BrokerRefusal, PendingRequest, PublishedKey, Task, TokenToRecord,
};
use crate::entry::{Entry, EntryError};
use crate::policy::approval::ApprovalRefusal;

impl Store for KvStore {
    fn create_entries(
        &self,
        entries: &[Entry],
        audit: &Audit<'_, Vec<Result<Entry, EntryError>>>,
    ) -> Result<Vec<Result<Entry, EntryError>>, StoreError> {
        KvStore::create_entries(self, entries, audit)
    }

    fn update_entries(
        &self,
        entries: &[Entry],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        KvStore::update_entries(self, entries, now, reason, audit)
    }

    fn delete_entries(
        &self,
        ids: &[String],
        now: i64,
        reason: &str,
        audit: &Audit<'_, EntryWrite>,
    ) -> Result<EntryWrite, StoreError> {
        KvStore::delete_entries(self, ids, now, reason, audit)
    }

    fn entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        KvStore::entry(self, id)
    }

    fn entries(&self, ids: &[String]) -> Result<Vec<Option<Entry>>, StoreError> {
        KvStore::entries(self, ids)
    }

    fn entries_for_signing(&self, ids: &[String]) -> Result<EntriesRead, StoreError> {
        KvStore::entries_for_signing(self, ids)
    }

    fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        KvStore::entries_by_parent(self, parent)
    }

    fn snapshot(&self, parent: &SpiffeId) -> Result<(u64, Vec<Entry>), StoreError> {
        KvStore::snapshot(self, parent)
    }

    fn list_entries(
        &self,
        filter: &EntryFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        KvStore::list_entries(self, filter, after, limit)
    }

    fn entry_count(&self) -> usize {
        KvStore::entry_count(self)
    }

    fn expired_entries(&self, now: i64) -> Result<Vec<String>, StoreError> {
        KvStore::expired_entries(self, now)
    }

    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        KvStore::changes_since(self, revision, limit)
    }

    fn changes_start(&self) -> Result<u64, StoreError> {
        KvStore::changes_start(self)
    }

    fn trim_changes(&self, keep: u64, slack: u64) -> Result<u64, StoreError> {
        KvStore::trim_changes(self, keep, slack)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        KvStore::revision(self)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        KvStore::subscribe(self)
    }

    fn log_bundle_change(&self, audit: &Audit<'_, u64>) -> Result<u64, StoreError> {
        KvStore::log_bundle_change(self, audit)
    }

    fn publish_cas(&self, server_id: &str, cas: &[pb::CaRecord]) -> Result<bool, StoreError> {
        KvStore::publish_cas(self, server_id, cas)
    }

    fn cas(&self) -> Result<Vec<pb::CaRecord>, StoreError> {
        KvStore::cas(self)
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
        KvStore::resign_crls(self)
    }

    fn crls(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        KvStore::crls(self)
    }

    fn put_join_token(
        &self,
        token: &pb::JoinToken,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError> {
        KvStore::put_join_token(self, token, audit)
    }

    fn take_join_token(
        &self,
        token: &str,
        audit: &Audit<'_, Option<pb::JoinToken>>,
    ) -> Result<Option<pb::JoinToken>, StoreError> {
        KvStore::take_join_token(self, token, audit)
    }

    fn join_token_exists(&self, token: &str) -> Result<bool, StoreError> {
        KvStore::join_token_exists(self, token)
    }

    fn register_agent(
        &self,
        agent: &pb::Agent,
        svid: &pb::IssuedSvid,
        audit: &Audit<'_, Result<(), AgentRefusal>>,
    ) -> Result<Result<(), AgentRefusal>, StoreError> {
        KvStore::register_agent(self, agent, svid, audit)
    }

    fn propose(
        &self,
        proposal: &pb::Entry,
        audit: &Audit<'_, Result<(), ApprovalRefusal>>,
    ) -> Result<Result<(), ApprovalRefusal>, StoreError> {
        KvStore::propose(self, proposal, audit)
    }

    fn remove_proposal(
        &self,
        key: &str,
        proposal_id: Option<&str>,
        audit: &Audit<'_, bool>,
    ) -> Result<bool, StoreError> {
        KvStore::remove_proposal(self, key, proposal_id, audit)
    }

    fn approve(
        &self,
        key: &str,
        content_hash: &str,
        approver_uid: u32,
        now: i64,
        audit: &Audit<'_, Result<Approved, ApprovalRefusal>>,
    ) -> Result<Result<Approved, ApprovalRefusal>, StoreError> {
        KvStore::approve(self, key, content_hash, approver_uid, now, audit)
    }

    fn check_agent(
        &self,
        agent_id: &str,
        serial: &str,
    ) -> Result<Result<pb::Agent, AgentRefusal>, StoreError> {
        KvStore::check_agent(self, agent_id, serial)
    }

    fn check_agents(&self, callers: &[(String, String)]) -> Result<Vec<AgentCheck>, StoreError> {
        KvStore::check_agents(self, callers)
    }

    fn renew_agent(
        &self,
        agent_id: &str,
        presented: &str,
        svid: &pb::IssuedSvid,
        now: i64,
        audit: &Audit<'_, RenewOutcome>,
    ) -> Result<Result<(pb::Agent, Vec<pb::Revocation>), AgentRefusal>, StoreError> {
        KvStore::renew_agent(self, agent_id, presented, svid, now, audit)
    }

    fn ban_agent(
        &self,
        agent_id: &str,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        KvStore::ban_agent(self, agent_id, reason, now, audit)
    }

    fn evict_agent(
        &self,
        agent_id: &str,
        unban: bool,
        now: i64,
        audit: &Audit<'_, Result<Vec<pb::Revocation>, AgentRefusal>>,
    ) -> Result<Result<Vec<pb::Revocation>, AgentRefusal>, StoreError> {
        KvStore::evict_agent(self, agent_id, unban, now, audit)
    }

    fn confirm_agent_svid(&self, agent_id: &str, serial: &str) -> Result<(), StoreError> {
        KvStore::confirm_agent_svid(self, agent_id, serial)
    }

    fn agent(&self, spiffe_id: &str) -> Result<Option<pb::Agent>, StoreError> {
        KvStore::agent(self, spiffe_id)
    }

    fn agents(&self) -> Result<Vec<pb::Agent>, StoreError> {
        KvStore::agents(self)
    }

    fn record_issued(
        &self,
        agent_id: &str,
        agent_serial: &str,
        read_at: u64,
        signed: Vec<Signed>,
        now: i64,
    ) -> Result<Vec<RecordedSvid>, StoreError> {
        KvStore::record_issued(self, agent_id, agent_serial, read_at, signed, now)
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
        KvStore::issued(self, serial)
    }

    fn issued_count(&self) -> usize {
        KvStore::issued_count(self)
    }

    fn revoke(
        &self,
        revocations: &[pb::Revocation],
        audit: &Audit<'_, ()>,
    ) -> Result<(), StoreError> {
        KvStore::revoke(self, revocations, audit)
    }

    fn revocation(&self, serial: &str) -> Result<Option<pb::Revocation>, StoreError> {
        KvStore::revocation(self, serial)
    }

    fn revocations(&self) -> Result<Vec<pb::Revocation>, StoreError> {
        KvStore::revocations(self)
    }

    fn prune_expired(&self, now: i64) -> Result<usize, StoreError> {
        KvStore::prune_expired(self, now)
    }

    fn start_task(
        &self,
        task: &Task,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        KvStore::start_task(self, task, audit)
    }

    fn end_task(
        &self,
        id: &str,
        now: i64,
        ended_by: &str,
        audit: &Audit<'_, Result<Task, BrokerRefusal>>,
    ) -> Result<Result<Task, BrokerRefusal>, StoreError> {
        KvStore::end_task(self, id, now, ended_by, audit)
    }

    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        KvStore::task(self, id)
    }

    fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        KvStore::tasks(self)
    }

    fn expired_tasks(&self, now: i64) -> Result<Vec<String>, StoreError> {
        KvStore::expired_tasks(self, now)
    }

    fn record_access_tokens(
        &self,
        tokens: &[TokenToRecord],
        audit: &Audit<'_, Vec<Result<(), BrokerRefusal>>>,
    ) -> Result<Vec<Result<(), BrokerRefusal>>, StoreError> {
        KvStore::record_access_tokens(self, tokens, audit)
    }

    fn record_access_token(
        &self,
        token: &AccessToken,
        done: &[String],
        now: i64,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        KvStore::record_access_token(self, token, done, now, audit)
    }

    fn revoke_access_token(
        &self,
        jti: &str,
        now: i64,
        audit: &Audit<'_, Result<AccessToken, BrokerRefusal>>,
    ) -> Result<Result<AccessToken, BrokerRefusal>, StoreError> {
        KvStore::revoke_access_token(self, jti, now, audit)
    }

    fn access_token(&self, jti: &str) -> Result<Option<AccessToken>, StoreError> {
        KvStore::access_token(self, jti)
    }

    fn put_request(
        &self,
        request: &PendingRequest,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        KvStore::put_request(self, request, audit)
    }

    fn request(&self, id: &str) -> Result<Option<PendingRequest>, StoreError> {
        KvStore::request(self, id)
    }

    fn requests(&self) -> Result<Vec<PendingRequest>, StoreError> {
        KvStore::requests(self)
    }

    fn decide_request(
        &self,
        id: &str,
        content_hash: &str,
        approve: bool,
        approver_uid: u32,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<PendingRequest, BrokerRefusal>>,
    ) -> Result<Result<PendingRequest, BrokerRefusal>, StoreError> {
        KvStore::decide_request(self, id, content_hash, approve, approver_uid, reason, now, audit)
    }

    fn expire_requests(
        &self,
        now: i64,
        audit: &Audit<'_, Vec<PendingRequest>>,
    ) -> Result<Vec<PendingRequest>, StoreError> {
        KvStore::expire_requests(self, now, audit)
    }

    fn publish_broker_keys(
        &self,
        server_id: &str,
        keys: &[PublishedKey],
    ) -> Result<(), StoreError> {
        KvStore::publish_broker_keys(self, server_id, keys)
    }

    fn broker_keys(&self) -> Result<Vec<PublishedKey>, StoreError> {
        KvStore::broker_keys(self)
    }

    fn prune_access_tokens(&self, now: i64) -> Result<usize, StoreError> {
        KvStore::prune_access_tokens(self, now)
    }

    fn check(&self) -> Result<StoreReport, StoreError> {
        KvStore::check(self)
    }

    fn backup(&self, out: &mut dyn Write) -> Result<(), StoreError> {
        KvStore::backup(self, out)
    }

    fn health(&self) -> Result<String, StoreError> {
        self.kv.health()
    }
}
