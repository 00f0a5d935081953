//! The token broker's records (`crate::broker::records`): tasks, the
//! access tokens issued under them, requests held for an operator, and
//! every server's published broker keys — JSON in their own trees, shared
//! by every server on PostgreSQL. The rules that must not race (a token
//! recorded under a task that ends at the same moment, an approval of a
//! request that lapsed or changed, a task ended with its sub-tasks) are
//! checked inside the commit that writes.

use std::collections::BTreeSet;

use super::audit::Audit;
use super::commit::{Tx, TxResult};
use super::error::StoreError;
use super::kv::{scan_prefix, Pairs};
use super::kv_store::KvStore;
use super::layout::{
    decode_json, encode_json, t, BROKER_KEYS, BROKER_REQUESTS, BROKER_TASKS, BROKER_TOKENS,
};
use crate::broker::records::{
    AccessToken, BrokerRefusal, PendingRequest, PublishedKey, RequestState, Task, TokenToRecord,
};
use crate::event_schema::{self as schema, kind, EventExt};

/// How long an ended or expired task, and a denied or used request, is
/// kept after it stopped mattering (seconds): long enough to show.
const KEEP_DONE: i64 = 86_400;

/// How long past its `exp` a token's record is kept (seconds): a relying
/// party with a clock behind ours still gets `active: false` for it.
const TOKEN_GRACE: i64 = 60;

/// The tree and key of each record [`KvStore::prune_access_tokens`] drops
/// from `tokens` and `tasks`: tokens past their `exp` (and a grace), tasks
/// ended or expired more than [`KEEP_DONE`] ago.
fn prunable(tokens: &Pairs, tasks: &Pairs, now: i64) -> TxResult<Vec<(usize, Vec<u8>)>> {
    let mut out = Vec::new();
    for (key, bytes) in tokens {
        let token: AccessToken = decode_json(key, bytes)?;
        if token.exp < now - TOKEN_GRACE {
            out.push((BROKER_TOKENS, key.clone()));
        }
    }
    for (key, bytes) in tasks {
        let task: Task = decode_json(key, bytes)?;
        let over = if task.ended_at != 0 { task.ended_at } else { task.expires_at };
        if over < now - KEEP_DONE {
            out.push((BROKER_TASKS, key.clone()));
        }
    }
    Ok(out)
}

impl Tx<'_> {
    /// The checks and writes of one access token (see
    /// [`super::Store::record_access_token`]).
    fn record_access_token(
        &self,
        token: &AccessToken,
        done: &[String],
        now: i64,
    ) -> TxResult<Result<(), BrokerRefusal>> {
        let Some(mut task) = self.task(&token.task)? else {
            return Ok(Err(BrokerRefusal::UnknownTask(token.task.clone())));
        };
        if !task.is_live(now) {
            return Ok(Err(BrokerRefusal::TaskEnded(task.id)));
        }
        if task.spiffe_id != token.sub {
            return Ok(Err(BrokerRefusal::TaskNotYours { task: task.id, owner: task.spiffe_id }));
        }
        if !token.request.is_empty() {
            let Some(mut request) = self.broker_request(&token.request)? else {
                return Ok(Err(BrokerRefusal::UnknownRequest(token.request.clone())));
            };
            if request.spiffe_id != token.sub {
                return Ok(Err(BrokerRefusal::TaskNotYours {
                    task: request.id,
                    owner: request.spiffe_id,
                }));
            }
            if request.state != RequestState::Approved {
                return Ok(Err(BrokerRefusal::RequestState {
                    id: request.id,
                    state: request.state,
                    wanted: "approved",
                }));
            }
            if request.expires_at <= now {
                return Ok(Err(BrokerRefusal::RequestExpired(request.id)));
            }
            // An approval is used once.
            request.state = RequestState::Issued;
            self.put_broker_request(&request)?;
        }
        self.put(BROKER_TOKENS, token.jti.as_bytes(), encode_json(&token.jti, token)?);
        task.note_done(done);
        self.put_task(&task)?;
        Ok(Ok(()))
    }

    fn task(&self, id: &str) -> TxResult<Option<Task>> {
        self.get(BROKER_TASKS, id)?.map(|b| decode_json(id.as_bytes(), &b)).transpose()
    }

    fn put_task(&self, task: &Task) -> TxResult<()> {
        self.put(BROKER_TASKS, task.id.as_bytes(), encode_json(&task.id, task)?);
        Ok(())
    }

    fn broker_request(&self, id: &str) -> TxResult<Option<PendingRequest>> {
        self.get(BROKER_REQUESTS, id)?.map(|b| decode_json(id.as_bytes(), &b)).transpose()
    }

    fn put_broker_request(&self, request: &PendingRequest) -> TxResult<()> {
        self.put(BROKER_REQUESTS, request.id.as_bytes(), encode_json(&request.id, request)?);
        Ok(())
    }

    /// Ends the live descendants of `root` at `now`, each with its event
    /// in this commit.
    fn end_sub_tasks(&self, root: &str, now: i64) -> TxResult<()> {
        let all: Vec<Task> = self
            .txn
            .scan_prefix(t(BROKER_TASKS), b"")?
            .iter()
            .map(|(key, bytes)| decode_json(key, bytes))
            .collect::<TxResult<_>>()?;
        let mut seen = BTreeSet::from([root.to_string()]);
        let mut parents = vec![root.to_string()];
        while let Some(parent) = parents.pop() {
            for sub in all.iter().filter(|t| t.parent == parent) {
                if !seen.insert(sub.id.clone()) {
                    continue;
                }
                parents.push(sub.id.clone());
                if !sub.is_live(now) {
                    continue;
                }
                let why = format!("its parent task {parent} ended");
                let ended = Task { ended_at: now, ended_by: why.clone(), ..sub.clone() };
                self.put_task(&ended)?;
                let mut e = schema::event(kind::BROKER_TASK_END, schema::ALLOW)
                    .operator(self.operator)
                    .spiffe_id(&ended.spiffe_id)
                    .attr("task", &ended.id)
                    .attr("parent", &parent)
                    .attr("tokens_issued", ended.tokens_issued);
                e.reason = why;
                self.events.borrow_mut().push(e);
            }
        }
        Ok(())
    }
}

impl KvStore {
    pub(super) fn start_task(
        &self,
        task: &Task,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| {
            if let Some(taken) = tx.task(&task.id)? {
                // IDs are random: only a caller reusing one gets here.
                return Ok(Err(BrokerRefusal::TaskExists(taken.id)));
            }
            if !task.parent.is_empty() {
                let Some(parent) = tx.task(&task.parent)? else {
                    return Ok(Err(BrokerRefusal::UnknownTask(task.parent.clone())));
                };
                if !parent.is_live(task.created_at) {
                    return Ok(Err(BrokerRefusal::TaskEnded(parent.id)));
                }
                if parent.spiffe_id != task.spiffe_id {
                    return Ok(Err(BrokerRefusal::TaskNotYours {
                        task: parent.id,
                        owner: parent.spiffe_id,
                    }));
                }
            }
            tx.put_task(task)?;
            Ok(Ok(()))
        })
    }

    pub(super) fn end_task(
        &self,
        id: &str,
        now: i64,
        ended_by: &str,
        audit: &Audit<'_, Result<Task, BrokerRefusal>>,
    ) -> Result<Result<Task, BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(mut task) = tx.task(id)? else {
                return Ok(Err(BrokerRefusal::UnknownTask(id.to_string())));
            };
            if task.ended_at != 0 {
                return Ok(Err(BrokerRefusal::TaskEnded(task.id)));
            }
            task.ended_at = now;
            task.ended_by = ended_by.to_string();
            tx.put_task(&task)?;
            tx.end_sub_tasks(&task.id, now)?;
            Ok(Ok(task))
        })
    }

    pub(super) fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.kv
            .get(t(BROKER_TASKS), id.as_bytes())?
            .map(|b| decode_json(id.as_bytes(), &b))
            .transpose()
    }

    pub(super) fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        let mut tasks: Vec<Task> = self.decode_json_tree(BROKER_TASKS)?;
        tasks.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(tasks)
    }

    pub(super) fn expired_tasks(&self, now: i64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .tasks()?
            .into_iter()
            .filter(|t| t.ended_at == 0 && t.expires_at <= now)
            .map(|t| t.id)
            .collect())
    }

    pub(super) fn record_access_token(
        &self,
        token: &AccessToken,
        done: &[String],
        now: i64,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| tx.record_access_token(token, done, now))
    }

    pub(super) fn record_access_tokens(
        &self,
        tokens: &[TokenToRecord],
        audit: &Audit<'_, Vec<Result<(), BrokerRefusal>>>,
    ) -> Result<Vec<Result<(), BrokerRefusal>>, StoreError> {
        self.commit(audit, |tx| {
            tokens.iter().map(|t| tx.record_access_token(&t.token, &t.done, t.now)).collect()
        })
    }

    pub(super) fn revoke_access_token(
        &self,
        jti: &str,
        now: i64,
        audit: &Audit<'_, Result<AccessToken, BrokerRefusal>>,
    ) -> Result<Result<AccessToken, BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(bytes) = tx.get(BROKER_TOKENS, jti)? else {
                return Ok(Err(BrokerRefusal::UnknownToken(jti.to_string())));
            };
            let mut token: AccessToken = decode_json(jti.as_bytes(), &bytes)?;
            if token.revoked_at != 0 {
                return Ok(Err(BrokerRefusal::TokenRevoked(jti.to_string())));
            }
            token.revoked_at = now;
            tx.put(BROKER_TOKENS, jti.as_bytes(), encode_json(jti, &token)?);
            Ok(Ok(token))
        })
    }

    pub(super) fn access_token(&self, jti: &str) -> Result<Option<AccessToken>, StoreError> {
        self.kv
            .get(t(BROKER_TOKENS), jti.as_bytes())?
            .map(|b| decode_json(jti.as_bytes(), &b))
            .transpose()
    }

    pub(super) fn prune_access_tokens(&self, now: i64) -> Result<usize, StoreError> {
        // Read first: a pass with nothing to prune costs no commit.
        let read = |tree| scan_prefix(&*self.kv, t(tree), b"");
        if prunable(&read(BROKER_TOKENS)?, &read(BROKER_TASKS)?, now)?.is_empty() {
            return Ok(0);
        }
        self.commit(&Audit::quiet(), |tx| {
            let read = |tree| tx.txn.scan_prefix(t(tree), b"");
            let found = prunable(&read(BROKER_TOKENS)?, &read(BROKER_TASKS)?, now)?;
            for (tree, key) in &found {
                tx.remove(*tree, key)?;
            }
            Ok(found.len())
        })
    }

    pub(super) fn put_request(
        &self,
        request: &PendingRequest,
        audit: &Audit<'_, Result<(), BrokerRefusal>>,
    ) -> Result<Result<(), BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| {
            if let Some(held) = tx.broker_request(&request.id)? {
                return Ok(Err(BrokerRefusal::RequestState {
                    id: held.id,
                    state: held.state,
                    wanted: "new",
                }));
            }
            tx.put_broker_request(request)?;
            Ok(Ok(()))
        })
    }

    pub(super) fn request(&self, id: &str) -> Result<Option<PendingRequest>, StoreError> {
        self.kv
            .get(t(BROKER_REQUESTS), id.as_bytes())?
            .map(|b| decode_json(id.as_bytes(), &b))
            .transpose()
    }

    pub(super) fn requests(&self) -> Result<Vec<PendingRequest>, StoreError> {
        let mut requests: Vec<PendingRequest> = self.decode_json_tree(BROKER_REQUESTS)?;
        requests.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(requests)
    }

    #[allow(clippy::too_many_arguments)] // the trait's signature
    pub(super) fn decide_request(
        &self,
        id: &str,
        content_hash: &str,
        approve: bool,
        approver_uid: u32,
        reason: &str,
        now: i64,
        audit: &Audit<'_, Result<PendingRequest, BrokerRefusal>>,
    ) -> Result<Result<PendingRequest, BrokerRefusal>, StoreError> {
        self.commit(audit, |tx| {
            let Some(mut request) = tx.broker_request(id)? else {
                return Ok(Err(BrokerRefusal::UnknownRequest(id.to_string())));
            };
            if request.state != RequestState::Pending {
                return Ok(Err(BrokerRefusal::RequestState {
                    id: request.id,
                    state: request.state,
                    wanted: "pending",
                }));
            }
            if request.expires_at <= now {
                return Ok(Err(BrokerRefusal::RequestExpired(request.id)));
            }
            if request.content_hash != content_hash {
                return Ok(Err(BrokerRefusal::ContentChanged {
                    id: request.id,
                    expected: content_hash.to_string(),
                    actual: request.content_hash,
                }));
            }
            if request.excluded_uids.contains(&approver_uid) {
                return Ok(Err(BrokerRefusal::OwnUid(approver_uid)));
            }
            request.state = if approve { RequestState::Approved } else { RequestState::Denied };
            request.decided_by = format!("uid:{approver_uid}");
            request.reason = reason.to_string();
            tx.put_broker_request(&request)?;
            Ok(Ok(request))
        })
    }

    pub(super) fn expire_requests(
        &self,
        now: i64,
        audit: &Audit<'_, Vec<PendingRequest>>,
    ) -> Result<Vec<PendingRequest>, StoreError> {
        // Whether a request goes, and whether it lapsed unanswered (or unused).
        let lapse = |r: &PendingRequest| match r.state {
            RequestState::Pending | RequestState::Approved => (r.expires_at <= now, true),
            RequestState::Denied | RequestState::Issued => {
                (r.expires_at.max(r.created_at) <= now - KEEP_DONE, false)
            }
        };
        // Read first: a pass with nothing to expire costs no commit.
        let held: Vec<PendingRequest> = self.decode_json_tree(BROKER_REQUESTS)?;
        if !held.iter().any(|r| lapse(r).0) {
            return Ok(Vec::new());
        }
        self.commit(audit, |tx| {
            let mut lapsed = Vec::new();
            for (key, bytes) in tx.txn.scan_prefix(t(BROKER_REQUESTS), b"")? {
                let request: PendingRequest = decode_json(&key, &bytes)?;
                let (goes, unanswered) = lapse(&request);
                if goes {
                    tx.remove(BROKER_REQUESTS, &key)?;
                    if unanswered {
                        lapsed.push(request);
                    }
                }
            }
            Ok(lapsed)
        })
    }

    pub(super) fn publish_broker_keys(
        &self,
        server_id: &str,
        keys: &[PublishedKey],
    ) -> Result<(), StoreError> {
        let bytes = encode_json(server_id, &keys)?;
        if self.kv.get(t(BROKER_KEYS), server_id.as_bytes())?.as_deref() == Some(&bytes[..]) {
            return Ok(());
        }
        self.commit(&Audit::quiet(), |tx| {
            tx.put(BROKER_KEYS, server_id.as_bytes(), bytes.as_slice());
            Ok(())
        })
    }

    pub(super) fn broker_keys(&self) -> Result<Vec<PublishedKey>, StoreError> {
        let per_server: Vec<Vec<PublishedKey>> = self.decode_json_tree(BROKER_KEYS)?;
        Ok(per_server.into_iter().flatten().collect())
    }

    /// Every record of the broker tree `tree`, decoded.
    fn decode_json_tree<T: serde::de::DeserializeOwned>(
        &self,
        tree: usize,
    ) -> Result<Vec<T>, StoreError> {
        scan_prefix(&*self.kv, t(tree), b"")?
            .iter()
            .map(|(key, bytes)| decode_json(key, bytes))
            .collect()
    }
}
