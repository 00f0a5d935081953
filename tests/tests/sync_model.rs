//! Model-based test of sync: seeded random sequences of entry creates,
//! updates (TTL, DNS names, SPIFFE ID), deletes and task-scoped expiries,
//! SVID revocations, JWT-SVID fetches and revocations by jti, agent stops,
//! starts and restarts, and server restarts, with a CA (and its JWT key)
//! that is prepared and activated every few seconds. At every quiet point a
//! real Workload API client on the agent must be served exactly the
//! identities of the server's entries, no revoked serial, no SVID past its
//! entry's expiry, and the server's current CRLs; and the agent's
//! ValidateJWTSVID must accept every unexpired token the model holds valid
//! and refuse every one it holds revoked (by jti, or with its entry deleted,
//! expired, or changed in SPIFFE ID or DNS names).
//!
//! The same model runs on two servers sharing one PostgreSQL database: each
//! operation goes to either server, servers stop, start and restart one at a
//! time, and the agent (told both addresses) must fail over and converge
//! just the same.
//!
//! Short run (in the suite): a few seeds. Long run, on demand:
//! `TESSERA_MODEL_SECONDS=600 cargo test -p tessera-tests --test sync_model -- --nocapture`
//! A failure prints its seed; `TESSERA_MODEL_SEED=N` replays it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{not_after_unix, now_unix, raw_client, serial_hex, uid_selector, Rng};
use tessera_proto::admin as admin_pb;
use tessera_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use tessera_server::SystemClock;
use tessera_tests::{entry, test_config, RunningAgent, TestServer};
use tessera_workload_api::jwt::UnverifiedJwt;
use tessera_workload_api::with_header;
use tonic::Code;

const AGENT_ID: &str = "spiffe://example.org/node/model";
/// CA lifetime: a CA is prepared every 12 s and activated 20 s after creation.
const CA_TTL: u64 = 24;
/// Operations per seed in the suite's short run and in the long run.
const SHORT_STEPS: usize = 48;
const LONG_STEPS: usize = 150;
/// How long the system may take to reach the model after a quiet point starts.
const CONVERGE: Duration = Duration::from_secs(30);

/// What the model says an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelEntry {
    spiffe_id: String,
    dns_names: Vec<String>,
    ttl: u32,
    expires_at: i64,
}

/// A JWT-SVID the workload was given, and whether the model says it is revoked.
#[derive(Debug, Clone)]
struct ModelToken {
    token: String,
    jti: String,
    entry_id: String,
    audience: String,
    expires_at: i64,
    revoked: bool,
}

/// A server of the model: running, or stopped with what restarts it.
enum Slot {
    Up(TestServer),
    Down(PathBuf, SocketAddr),
}

struct World {
    dir: PathBuf,
    /// One server on sled, or two on one PostgreSQL database (`datastore`).
    servers: Vec<Slot>,
    datastore: Option<String>,
    agent: Option<RunningAgent>,
    model: BTreeMap<String, ModelEntry>,
    tokens: Vec<ModelToken>,
    next_name: u64,
    log: Vec<String>,
    /// The seed, for failure messages.
    seed: u64,
    /// The jti of the last JWT-SVID fetched.
    last_jti: Option<String>,
    /// Steps that took effect, by kind.
    counts: BTreeMap<Kind, usize>,
    /// Tokens the agent's ValidateJWTSVID was seen to accept as the model
    /// holds them valid, and to refuse as the model holds them revoked.
    checked_valid: AtomicUsize,
    checked_revoked: AtomicUsize,
}

/// The kinds of random step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Create,
    Update,
    Delete,
    RevokeX509,
    AgentStopStart,
    AgentRestart,
    ServerEvent,
    FetchJwt,
    RevokeJwt,
    Pause,
}

const KINDS: [Kind; 10] = [
    Kind::Create,
    Kind::Update,
    Kind::Delete,
    Kind::RevokeX509,
    Kind::AgentStopStart,
    Kind::AgentRestart,
    Kind::ServerEvent,
    Kind::FetchJwt,
    Kind::RevokeJwt,
    Kind::Pause,
];

/// A refusal of the Workload API the model allows at any time: the agent
/// has not synced yet or not caught up with an entry (or its change, or
/// its deletion), or the server could not sign just then (restarting,
/// failing over, or the entry deleted or expired while it signed).
fn expected_fetch_refusal(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::NotFound => true,
        Code::PermissionDenied => {
            status.message() == "no identity issued" || status.message().contains("while signing")
        }
        _ => false,
    }
}

/// A model server in `dir` on `bind`, with the model's short-lived CAs.
async fn start_server(dir: &Path, bind: SocketAddr, datastore: Option<&str>) -> TestServer {
    let mut config = test_config(dir);
    config.ca_ttl = CA_TTL;
    config.bind = bind;
    config.datastore = datastore.map(str::to_string);
    TestServer::start_with(config, Arc::new(SystemClock)).await
}

impl World {
    /// The first running server (there always is one).
    fn server(&self) -> &TestServer {
        self.servers
            .iter()
            .find_map(|s| match s {
                Slot::Up(server) => Some(server),
                Slot::Down(..) => None,
            })
            .expect("a server runs")
    }

    /// A running server picked at random, when there are several.
    fn any_server(&self, rng: &mut Rng) -> &TestServer {
        let up: Vec<&TestServer> = self
            .servers
            .iter()
            .filter_map(|s| match s {
                Slot::Up(server) => Some(server),
                Slot::Down(..) => None,
            })
            .collect();
        if up.len() == 1 {
            return up[0];
        }
        up[rng.below(up.len() as u64) as usize]
    }

    fn addresses(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| match s {
                Slot::Up(server) => server.addr.to_string(),
                Slot::Down(_, addr) => addr.to_string(),
            })
            .collect()
    }

    async fn start_agent(&mut self) {
        let request = admin_pb::CreateJoinTokenRequest { ttl: 0, spiffe_id: AGENT_ID.into() };
        let token = match self.admin().await.create_join_token(request).await {
            Ok(token) => Some(token.into_inner().token),
            // On record already: it restarts on its stored SVID, as a node
            // does (a token for a live agent's ID is refused).
            Err(status) if status.code() == tonic::Code::FailedPrecondition => None,
            Err(status) => self.diverged(&format!("join token: {status}")),
        };
        let addresses = self.addresses();
        let had_token = token.is_some();
        let agent_dir = self.dir.join("agent");
        let agent = RunningAgent::start_configured(self.server(), &agent_dir, |c| {
            c.join_token = token;
            c.server_addresses = addresses;
        });
        // A failed start fails the seed with its log (not a bare panic).
        let agent = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(agent))
            .await
        {
            Ok(agent) => agent,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                // The stored agent SVID's expiry: one too close to it is
                // not reused, and the model has no token for a live agent.
                let stored = std::fs::read(agent_dir.join("agent_svid.pem")).unwrap_or_default();
                let not_after = pem::parse_many(&stored)
                    .ok()
                    .and_then(|certs| certs.first().map(|c| not_after_unix(c.contents())));
                self.diverged(&format!(
                    "the agent did not start (join token: {had_token}; stored agent SVID's NotAfter {not_after:?}, now {}): {why}",
                    now_unix()
                ))
            }
        };
        assert_eq!(agent.id, AGENT_ID);
        self.agent = Some(agent);
    }

    async fn admin(&self) -> admin_pb::admin_client::AdminClient<tonic::transport::Channel> {
        self.server().admin().await
    }

    /// The admin API of any running server (one of several at random).
    async fn admin_of_any(
        &self,
        rng: &mut Rng,
    ) -> admin_pb::admin_client::AdminClient<tonic::transport::Channel> {
        self.any_server(rng).admin().await
    }

    /// Restarts a server, or (with several) stops one of two running or
    /// starts the stopped one.
    async fn server_event(&mut self, rng: &mut Rng) {
        let i = rng.below(self.servers.len() as u64) as usize;
        let up = self.servers.iter().filter(|s| matches!(s, Slot::Up(_))).count();
        let toggle = self.servers.len() > 1 && rng.below(2) == 0;
        let placeholder = Slot::Down(PathBuf::new(), SocketAddr::from(([127, 0, 0, 1], 0)));
        let slot = std::mem::replace(&mut self.servers[i], placeholder);
        self.servers[i] = match slot {
            Slot::Up(server) if toggle && up > 1 => {
                let (dir, addr) = (server.data_dir.clone(), server.addr);
                server.stop().await;
                self.log.push(format!("server {i} stopped"));
                Slot::Down(dir, addr)
            }
            Slot::Up(server) => {
                let (dir, addr) = (server.data_dir.clone(), server.addr);
                server.stop().await;
                self.log.push(format!("server {i} restarted"));
                Slot::Up(start_server(&dir, addr, self.datastore.as_deref()).await)
            }
            Slot::Down(dir, addr) => {
                self.log.push(format!("server {i} started"));
                Slot::Up(start_server(&dir, addr, self.datastore.as_deref()).await)
            }
        };
    }

    fn to_proto(id: &str, e: &ModelEntry) -> tessera_proto::types::Entry {
        let mut p = entry(&e.spiffe_id, AGENT_ID, &[&uid_selector()], Some(e.ttl));
        p.id = id.to_string();
        p.dns_names = e.dns_names.clone();
        p.expires_at = e.expires_at;
        p
    }

    /// The kind of the next random step.
    fn pick(&self, rng: &mut Rng) -> Kind {
        match rng.below(100) {
            0..=19 if self.model.len() < 6 => Kind::Create,
            20..=36 => Kind::Update,
            37..=49 => Kind::Delete,
            50..=60 => Kind::RevokeX509,
            61..=67 => Kind::AgentStopStart,
            68..=72 => Kind::AgentRestart,
            73..=77 => Kind::ServerEvent,
            78..=90 => Kind::FetchJwt,
            91..=96 => Kind::RevokeJwt,
            _ => Kind::Pause,
        }
    }

    async fn step(&mut self, rng: &mut Rng) {
        self.model.retain(|_, e| e.expires_at == 0 || e.expires_at > now_unix());
        let kind = self.pick(rng);
        self.run_counted(kind, rng).await;
    }

    /// Runs a step of `kind`; counts it when it took effect.
    async fn run_counted(&mut self, kind: Kind, rng: &mut Rng) -> bool {
        let ran = self.run(kind, rng).await;
        if ran {
            *self.counts.entry(kind).or_default() += 1;
        }
        ran
    }

    /// Fails the seed: the system did what the model does not allow.
    fn diverged(&self, problem: &str) -> ! {
        let tail = self.log.iter().rev().take(60).rev().cloned().collect::<Vec<_>>();
        panic!(
            "seed {}: divergence: {problem}\nlast operations:\n  {}",
            self.seed,
            tail.join("\n  ")
        );
    }

    /// One step of `kind`; whether it took effect (false when there was
    /// nothing to do it to, e.g. no entry, or the agent had not caught up).
    async fn run(&mut self, kind: Kind, rng: &mut Rng) -> bool {
        let pick = |rng: &mut Rng, model: &BTreeMap<String, ModelEntry>| {
            model.keys().nth(rng.below(model.len() as u64) as usize).cloned()
        };
        match kind {
            Kind::Create => {
                self.next_name += 1;
                let expires_at =
                    if rng.below(4) == 0 { now_unix() + 2 + rng.below(4) as i64 } else { 0 };
                let e = ModelEntry {
                    spiffe_id: format!("spiffe://example.org/m/{}", self.next_name),
                    dns_names: vec![],
                    ttl: 30 + rng.below(600) as u32,
                    expires_at,
                };
                let created = self
                    .admin_of_any(rng)
                    .await
                    .batch_create_entry(admin_pb::BatchCreateEntryRequest {
                        entries: vec![Self::to_proto("", &e)],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let id = created.results[0].entry.as_ref().expect("entry created").id.clone();
                self.log.push(format!("{} create {id} {e:?}", now_unix()));
                self.model.insert(id, e);
                true
            }
            Kind::Update => {
                let Some(id) = pick(rng, &self.model) else { return false };
                let mut e = self.model[&id].clone();
                match rng.below(3) {
                    0 => e.ttl = 30 + rng.below(600) as u32,
                    1 => {
                        e.dns_names = if e.dns_names.is_empty() {
                            vec![format!("m{}.internal", rng.below(100))]
                        } else {
                            vec![]
                        }
                    }
                    _ => {
                        self.next_name += 1;
                        e.spiffe_id = format!("spiffe://example.org/m/{}", self.next_name);
                    }
                }
                let updated = self
                    .admin_of_any(rng)
                    .await
                    .batch_update_entry(admin_pb::BatchUpdateEntryRequest {
                        entries: vec![Self::to_proto(&id, &e)],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let status = updated.results[0].status.clone().unwrap();
                if status.code == 0 {
                    self.log.push(format!("update {id} {e:?}"));
                    let old = &self.model[&id];
                    if old.spiffe_id != e.spiffe_id || old.dns_names != e.dns_names {
                        self.revoke_tokens_of(&id);
                    }
                    self.model.insert(id, e);
                    true
                } else {
                    // Only an entry that expired in between may be gone.
                    if status.code != Code::NotFound as i32 || self.model[&id].expires_at == 0 {
                        self.diverged(&format!("update of {id} refused: {status:?}"));
                    }
                    self.model.remove(&id);
                    false
                }
            }
            Kind::Delete => {
                let Some(id) = pick(rng, &self.model) else { return false };
                self.admin_of_any(rng)
                    .await
                    .batch_delete_entry(admin_pb::BatchDeleteEntryRequest { ids: vec![id.clone()] })
                    .await
                    .unwrap();
                self.log.push(format!("delete {id}"));
                self.model.remove(&id);
                self.revoke_tokens_of(&id);
                true
            }
            Kind::RevokeX509 => {
                let Some(agent) = &self.agent else { return false };
                let served = match served(&agent.socket).await {
                    Ok(served) => served,
                    // Not synced yet, or nothing to serve (yet).
                    Err(status) if expected_fetch_refusal(&status) => return false,
                    Err(status) => self.diverged(&format!("FetchX509SVID failed: {status:?}")),
                };
                let Some((_, serial, not_after)) =
                    served.get(rng.below(served.len() as u64) as usize).cloned()
                else {
                    return false;
                };
                let revoked = self
                    .admin_of_any(rng)
                    .await
                    .revoke_svid(admin_pb::RevokeSvidRequest {
                        serial: serial.clone(),
                        reason: "model".into(),
                        ..Default::default()
                    })
                    .await;
                self.log.push(format!("revoke {serial}: {:?}", revoked.as_ref().map(|_| ())));
                match revoked {
                    Ok(_) => true,
                    // Forgotten by the server as it expired.
                    Err(status) if not_after <= now_unix() + 1 => {
                        self.log.push(format!("(expired: {status:?})"));
                        false
                    }
                    Err(status) => {
                        self.diverged(&format!("revoking served serial {serial}: {status:?}"))
                    }
                }
            }
            Kind::AgentStopStart => {
                if let Some(agent) = self.agent.take() {
                    agent.stop().await;
                    self.log.push("agent stopped".into());
                } else {
                    self.start_agent().await;
                    self.log.push("agent started".into());
                }
                true
            }
            Kind::AgentRestart => {
                if let Some(agent) = self.agent.take() {
                    agent.stop().await;
                }
                self.start_agent().await;
                self.log.push("agent restarted".into());
                true
            }
            Kind::ServerEvent => {
                self.server_event(rng).await;
                true
            }
            Kind::FetchJwt => {
                let Some(id) = pick(rng, &self.model) else { return false };
                let Some(agent) = &self.agent else { return false };
                let audience = ["a", "b", "c"][rng.below(3) as usize].to_string();
                let request = JwtsvidRequest {
                    audience: vec![audience.clone()],
                    spiffe_id: self.model[&id].spiffe_id.clone(),
                };
                let mut client = raw_client(&agent.socket).await;
                let response = match client.fetch_jwtsvid(with_header(request)).await {
                    Ok(response) => response,
                    // The agent may not have the entry (or its change) yet.
                    Err(status) if expected_fetch_refusal(&status) => {
                        self.log.push(format!("jwt for {id}: {status:?}"));
                        return false;
                    }
                    Err(status) => {
                        self.diverged(&format!("FetchJWTSVID for {id} failed: {status:?}"))
                    }
                };
                let token = response.into_inner().svids.remove(0).svid;
                let claims = UnverifiedJwt::decode(&token).unwrap();
                let jti = claims.jti().unwrap().to_string();
                self.log.push(format!("jwt {jti} for {id} audience {audience}"));
                self.last_jti = Some(jti.clone());
                if !self.tokens.iter().any(|t| t.jti == jti) {
                    let expires_at = claims.expires_at().unwrap();
                    let entry_id = id;
                    self.tokens.push(ModelToken {
                        token,
                        jti,
                        entry_id,
                        audience,
                        expires_at,
                        revoked: false,
                    });
                }
                true
            }
            Kind::RevokeJwt => {
                let live: Vec<usize> =
                    (0..self.tokens.len()).filter(|i| !self.tokens[*i].revoked).collect();
                let Some(&i) = live.get(rng.below(live.len() as u64) as usize) else {
                    return false;
                };
                let jti = self.tokens[i].jti.clone();
                let revoked = self
                    .admin_of_any(rng)
                    .await
                    .revoke_svid(admin_pb::RevokeSvidRequest {
                        jti: jti.clone(),
                        reason: "model".into(),
                        ..Default::default()
                    })
                    .await;
                self.log.push(format!("revoke jwt {jti}: {:?}", revoked.as_ref().map(|_| ())));
                match revoked {
                    Ok(_) => {
                        self.tokens[i].revoked = true;
                        true
                    }
                    // Refused only for a token already expired and forgotten.
                    Err(_) if self.tokens[i].expires_at <= now_unix() + 1 => {
                        self.tokens[i].revoked = true;
                        false
                    }
                    Err(status) => self.diverged(&format!("revoking live JWT {jti}: {status:?}")),
                }
            }
            Kind::Pause => {
                let pause = rng.below(400);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                self.log.push(format!("pause {pause} ms"));
                true
            }
        }
    }

    /// The kinds of step that have not taken effect in this seed yet.
    fn missing(&self) -> Vec<Kind> {
        KINDS.into_iter().filter(|k| !self.counts.contains_key(k)).collect()
    }

    /// Makes sure every kind of step took effect at least once in this
    /// seed and that the JWT checks judged at least one token valid and
    /// one revoked: what the random steps left out is run now, each from a
    /// quiet point. Fails the seed if that cannot be done.
    async fn cover(&mut self, rng: &mut Rng) {
        for _ in 0..8 {
            let missing = self.missing();
            let checked = (self.checked_valid.load(SeqCst), self.checked_revoked.load(SeqCst));
            if missing.is_empty() && checked.0 > 0 && checked.1 > 0 {
                return;
            }
            self.log.push(format!("covering {missing:?}, JWT checks {checked:?}"));
            self.converge().await;
            if self.model.is_empty() || missing.contains(&Kind::Create) {
                self.run_counted(Kind::Create, rng).await;
                self.converge().await;
            }
            // Deleting last: the others want an entry.
            let jwt = [Kind::FetchJwt, Kind::RevokeJwt];
            let others = missing
                .iter()
                .filter(|k| !matches!(k, Kind::Create | Kind::Delete) && !jwt.contains(k));
            for kind in others {
                self.run_counted(*kind, rng).await;
                self.converge().await;
            }
            if checked.0 == 0 || checked.1 == 0 || jwt.iter().any(|k| missing.contains(k)) {
                // A fresh token, checked valid, then revoked and checked so.
                if self.run_counted(Kind::FetchJwt, rng).await {
                    self.converge().await;
                    let jti = self.last_jti.clone().expect("a token was fetched");
                    let i = self.tokens.iter().position(|t| t.jti == jti).unwrap();
                    let revoked = self
                        .admin()
                        .await
                        .revoke_svid(admin_pb::RevokeSvidRequest {
                            jti: jti.clone(),
                            reason: "model".into(),
                            ..Default::default()
                        })
                        .await;
                    self.log.push(format!(
                        "revoke jwt {jti} (cover): {:?}",
                        revoked.as_ref().map(|_| ())
                    ));
                    match revoked {
                        Ok(_) => *self.counts.entry(Kind::RevokeJwt).or_default() += 1,
                        Err(_) if self.tokens[i].expires_at <= now_unix() + 1 => {}
                        Err(status) => {
                            self.diverged(&format!("revoking live JWT {jti}: {status:?}"))
                        }
                    }
                    self.tokens[i].revoked = true;
                    self.converge().await;
                }
            }
            if missing.contains(&Kind::Delete) {
                self.run_counted(Kind::Delete, rng).await;
                self.converge().await;
            }
        }
        self.diverged(&format!(
            "could not run every kind of step: ran {:?}; JWT checks valid {}, revoked {}",
            self.counts,
            self.checked_valid.load(SeqCst),
            self.checked_revoked.load(SeqCst)
        ));
    }

    /// The model's tokens of an entry are revoked (deleted, expired, or its
    /// SPIFFE ID or DNS names changed).
    fn revoke_tokens_of(&mut self, entry_id: &str) {
        for token in self.tokens.iter_mut().filter(|t| t.entry_id == entry_id) {
            token.revoked = true;
        }
    }

    /// Waits until what the workload is served matches the model and the
    /// server; panics with the difference if it never does.
    async fn converge(&mut self) {
        if self.agent.is_none() {
            self.start_agent().await;
            self.log.push("agent started (quiet point)".into());
        }
        // Let entries about to expire expire first.
        let soon = now_unix() + 2;
        if let Some(last) =
            self.model.values().map(|e| e.expires_at).filter(|t| *t != 0 && *t <= soon).max()
        {
            tokio::time::sleep(Duration::from_secs((last + 1 - now_unix()).max(0) as u64)).await;
        }
        let deadline = Instant::now() + CONVERGE;
        let mut first_problem = None;
        loop {
            // Entries expire while we wait, on the server and in the model
            // (their tokens are revoked with them).
            let expired: Vec<String> = self
                .model
                .iter()
                .filter(|(_, e)| e.expires_at != 0 && e.expires_at <= now_unix() + 1)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                self.model.remove(&id);
                self.revoke_tokens_of(&id);
            }
            let problem = self.divergence().await;
            if first_problem.is_none() {
                first_problem.clone_from(&problem);
            }
            let Some(problem) = problem else { return };
            if Instant::now() > deadline {
                self.diverged(&format!(
                    "the agent did not converge in {CONVERGE:?}: {problem} (first seen: {})",
                    first_problem.unwrap_or_default(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What differs between the model, the server and the workload's view.
    async fn divergence(&self) -> Option<String> {
        let mut admin = self.admin().await;
        let listed = admin
            .list_entries(admin_pb::ListEntriesRequest {
                parent_id: AGENT_ID.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        let on_server: BTreeSet<String> = listed.iter().map(|e| e.id.clone()).collect();
        let in_model: BTreeSet<String> = self.model.keys().cloned().collect();
        if on_server != in_model {
            return Some(format!("server entries {on_server:?} != model {in_model:?}"));
        }
        let revoked = common::revoked_serials(self.server()).await;
        let crls = admin.get_bundle(admin_pb::GetBundleRequest {}).await.unwrap().into_inner().crls;
        let socket = &self.agent.as_ref().unwrap().socket;
        let want: BTreeMap<&str, &ModelEntry> =
            self.model.values().map(|e| (e.spiffe_id.as_str(), e)).collect();
        match served_with_crls(socket).await {
            Err(status) if want.is_empty() && status.message() == "no identity issued" => None,
            Err(status) => Some(format!("fetch failed: {status:?}; want {:?}", want.keys())),
            Ok((svids, served_crls)) => {
                let got: BTreeSet<&str> = svids.iter().map(|(id, _, _)| id.as_str()).collect();
                let wanted: BTreeSet<&str> = want.keys().copied().collect();
                if got != wanted {
                    return Some(format!("served {got:?}, server has {wanted:?}"));
                }
                for (id, serial, not_after) in &svids {
                    if revoked.contains(serial) {
                        return Some(format!("served revoked serial {serial} for {id}"));
                    }
                    let expires_at = want[id.as_str()].expires_at;
                    if expires_at != 0 && *not_after > expires_at {
                        return Some(format!(
                            "{id}: NotAfter {not_after} past expiry {expires_at}"
                        ));
                    }
                }
                if served_crls != crls {
                    return Some("the workload's CRLs are not the server's".into());
                }
                self.jwt_divergence(socket).await
            }
        }
    }

    /// A token the agent's ValidateJWTSVID judges otherwise than the model
    /// (tokens about to expire are left out).
    async fn jwt_divergence(&self, socket: &Path) -> Option<String> {
        let mut client = raw_client(socket).await;
        for t in self.tokens.iter().filter(|t| t.expires_at > now_unix() + 2) {
            let request =
                ValidateJwtsvidRequest { audience: t.audience.clone(), svid: t.token.clone() };
            let valid = client.validate_jwtsvid(with_header(request)).await;
            match (&valid, t.revoked) {
                (Ok(_), true) => {
                    return Some(format!("revoked JWT-SVID {} still validates", t.jti))
                }
                (Err(status), false) => {
                    return Some(format!("valid JWT-SVID {} refused: {status:?}", t.jti))
                }
                (Ok(_), false) => self.checked_valid.fetch_add(1, SeqCst),
                (Err(_), true) => self.checked_revoked.fetch_add(1, SeqCst),
            };
        }
        None
    }
}

/// (SPIFFE ID, serial, NotAfter) of each SVID served, and the CRLs.
type Served = (Vec<(String, String, i64)>, Vec<Vec<u8>>);

async fn served_with_crls(socket: &Path) -> Result<Served, tonic::Status> {
    let mut client = raw_client(socket).await;
    let mut stream = client.fetch_x509svid(with_header(X509svidRequest {})).await?.into_inner();
    let response = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no first response"))??
        .ok_or_else(|| tonic::Status::aborted("stream ended"))?;
    let svids = response
        .svids
        .iter()
        .map(|s| {
            let (_, leaf) = x509_parser::parse_x509_certificate(&s.x509_svid).unwrap();
            let leaf = leaf.as_ref();
            (s.spiffe_id.clone(), serial_hex(leaf), not_after_unix(leaf))
        })
        .collect();
    Ok((svids, response.crl))
}

async fn served(socket: &Path) -> Result<Vec<(String, String, i64)>, tonic::Status> {
    served_with_crls(socket).await.map(|(svids, _)| svids)
}

/// One seed's run: on one sled server, or (`datastore`) on two servers
/// sharing that PostgreSQL database.
async fn run_seed(seed: u64, steps: usize, datastore: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let count = if datastore.is_some() { 2 } else { 1 };
    let mut servers = Vec::new();
    for i in 0..count {
        let server_dir = dir.path().join(format!("server-{i}"));
        servers.push(Slot::Up(start_server(&server_dir, any_port, datastore.as_deref()).await));
    }
    let mut world = World {
        dir: dir.path().to_owned(),
        servers,
        datastore,
        agent: None,
        model: BTreeMap::new(),
        tokens: Vec::new(),
        next_name: 0,
        log: Vec::new(),
        seed,
        last_jti: None,
        counts: BTreeMap::new(),
        checked_valid: AtomicUsize::new(0),
        checked_revoked: AtomicUsize::new(0),
    };
    world.start_agent().await;
    let mut rng = Rng(seed | 1);
    for step in 0..steps {
        world.step(&mut rng).await;
        if step % 6 == 5 {
            world.converge().await;
        }
    }
    let random = world.counts.clone();
    world.cover(&mut rng).await;
    world.converge().await;
    eprintln!(
        "sync model: seed {seed}: steps by kind {random:?} (with the covering ones {:?}); {} JWT-SVIDs followed, {} of them revoked; ValidateJWTSVID checks: {} valid, {} revoked",
        world.counts,
        world.tokens.len(),
        world.tokens.iter().filter(|t| t.revoked).count(),
        world.checked_valid.load(SeqCst),
        world.checked_revoked.load(SeqCst),
    );
    let missing = world.missing();
    assert!(missing.is_empty(), "seed {seed}: no step of kind {missing:?} took effect");
    if let Some(agent) = world.agent.take() {
        agent.stop().await;
    }
    for slot in world.servers {
        if let Slot::Up(server) = slot {
            server.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_converge_to_the_server_under_random_sequences() {
    run_seeds(0x07e5_5e7a, 2, || None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_converge_to_two_servers_on_postgresql_under_random_sequences() {
    use tessera_tests::pg_cluster::PgCluster;
    run_seeds(0x2a5e_ed11, 1, || Some(PgCluster::shared().database())).await;
}

/// Runs `suite_runs` seeds from `base` (or, with TESSERA_MODEL_SECONDS, new
/// seeds until the time is up; with TESSERA_MODEL_SEED, that one), each on
/// a fresh datastore from `datastore`.
async fn run_seeds(base: u64, suite_runs: u64, datastore: impl Fn() -> Option<String>) {
    let seconds: u64 =
        std::env::var("TESSERA_MODEL_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let steps = if seconds > 0 { LONG_STEPS } else { SHORT_STEPS };
    if let Some(seed) = std::env::var("TESSERA_MODEL_SEED").ok().and_then(|s| s.parse().ok()) {
        eprintln!("sync model: replaying seed {seed}");
        run_seed(seed, steps, datastore()).await;
        return;
    }
    let started = Instant::now();
    let base = if seconds > 0 { now_unix() as u64 ^ base } else { base };
    let mut runs = 0u64;
    loop {
        let seed = base.wrapping_add(runs.wrapping_mul(0x9E37_79B9));
        eprintln!("sync model: seed {seed}");
        run_seed(seed, steps, datastore()).await;
        runs += 1;
        if (seconds == 0 && runs >= suite_runs)
            || (seconds > 0 && started.elapsed().as_secs() >= seconds)
        {
            break;
        }
    }
    eprintln!("sync model: {runs} runs, no divergence, {:?}", started.elapsed());
}
