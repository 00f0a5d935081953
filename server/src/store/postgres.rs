//! PostgreSQL under the [`Kv`] layer: one table of (tree, key, value),
//! shared by every server of the trust domain.
//!
//! - **Driver.** tokio-postgres on a small runtime of its own, so the
//!   store's synchronous callers (always on the blocking pool) wait on a
//!   channel and never block an async worker or nest runtimes.
//! - **Pool.** Up to [`POOL_SIZE`] connections, each with its statements
//!   prepared once; a connection that failed is dropped, and the next
//!   caller opens a new one, so the server recovers by itself when the
//!   database comes back.
//! - **Transactions** take `pg_advisory_xact_lock` first: writers of the
//!   store (every server) take turns, and the lock is released only after
//!   the commit is visible. So change-log revisions, assigned under it,
//!   become visible in revision order: a reader never sees revision N+1
//!   before N.
//! - **Wake-up.** A committing transaction runs `pg_notify` with its
//!   revision; every server LISTENs and wakes its change feed. The log
//!   stays the truth: a missed notification only delays a change until the
//!   feed's next poll.
//! - **TLS** with libpq's `sslmode` and `sslrootcert` in the datastore
//!   URL, on rustls ([`tls`]); without `sslmode`, a remote host is
//!   verified (`verify-full`) and a local one is reached in plain.
//! - **Commits are checked**: PostgreSQL answers the COMMIT of a
//!   transaction an earlier error aborted with `ROLLBACK` and no error;
//!   [`commit`] makes that an error instead of a success.
//! - **Migrations** are embedded and versioned ([`MIGRATIONS`]), applied
//!   at startup under an advisory lock so servers starting together apply
//!   each once.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

pub mod tls;

use super::kv::{Kv, Lock, OnRemoteChange, Op, Pairs, TxRead, Txn};
use crate::store::StoreError;

/// Most connections one server opens.
pub const POOL_SIZE: usize = 16;

/// How long one database call may take before the server gives up on it
/// (and on its connection).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel commits are announced on.
const CHANNEL: &str = "tessera_changes";

/// Serializes migrations across servers.
const MIGRATION_LOCK: i64 = 0x7465_7373_0000;

/// The schema, one step per version, applied in order and recorded in
/// `tessera_migrations`.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE kv (
            tree text NOT NULL,
            key bytea NOT NULL,
            value bytea NOT NULL,
            PRIMARY KEY (tree, key)
        )",
    ),
    (
        2,
        "CREATE TABLE sign_budgets (
            agent text PRIMARY KEY,
            tokens double precision NOT NULL,
            at_ms bigint NOT NULL,
            taken boolean NOT NULL
        )",
    ),
];

const SQL_GET: &str = "SELECT value FROM kv WHERE tree = $1 AND key = $2";
const SQL_GET_MANY: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key = ANY($2)";
const SQL_ASC: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 \
     AND ($3::bytea IS NULL OR key < $3) ORDER BY key LIMIT $4";
const SQL_DESC: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 \
     AND ($3::bytea IS NULL OR key < $3) ORDER BY key DESC LIMIT $4";
const SQL_LEN: &str = "SELECT count(*) FROM kv WHERE tree = $1";
/// Takes $3 tokens from agent $1's bucket (at most $2, refilled at $5 per
/// second, now $4 ms) in one statement: the row lock serializes the
/// agent's own calls, and no other agent's. Time never runs backwards.
const SQL_TAKE_BUDGET: &str = "INSERT INTO sign_budgets AS b (agent, tokens, at_ms, taken) \
     VALUES ($1, CASE WHEN $2 >= $3 THEN $2 - $3 ELSE $2 END, $4, $2 >= $3) \
     ON CONFLICT (agent) DO UPDATE SET \
     tokens = CASE WHEN LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) >= $3 \
         THEN LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) - $3 \
         ELSE LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) END, \
     at_ms = GREATEST(b.at_ms, $4), \
     taken = LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) >= $3 \
     RETURNING taken";
const SQL_PUT: &str = "INSERT INTO kv (tree, key, value) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value";
const SQL_DELETE: &str = "DELETE FROM kv WHERE (tree, key) IN \
     (SELECT * FROM unnest($1::text[], $2::bytea[]))";

/// One pooled connection and its prepared statements.
struct Conn {
    client: Client,
    get: Statement,
    get_many: Statement,
    asc: Statement,
    desc: Statement,
    len: Statement,
    take_budget: Statement,
    put: Statement,
    delete: Statement,
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(tessera_workload_api::error_chain(&e))
}

impl Conn {
    async fn open(
        config: &tokio_postgres::Config,
        tls: MakeRustlsConnect,
    ) -> Result<Self, StoreError> {
        let (client, connection) = config.connect(tls).await.map_err(db_err)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "database connection closed");
            }
        });
        let get = client.prepare(SQL_GET).await.map_err(db_err)?;
        let get_many = client.prepare(SQL_GET_MANY).await.map_err(db_err)?;
        let asc = client.prepare(SQL_ASC).await.map_err(db_err)?;
        let desc = client.prepare(SQL_DESC).await.map_err(db_err)?;
        let len = client.prepare(SQL_LEN).await.map_err(db_err)?;
        let take_budget = client
            .prepare_typed(
                SQL_TAKE_BUDGET,
                &[Type::TEXT, Type::FLOAT8, Type::FLOAT8, Type::INT8, Type::FLOAT8],
            )
            .await
            .map_err(db_err)?;
        let put = client.prepare(SQL_PUT).await.map_err(db_err)?;
        let delete = client.prepare(SQL_DELETE).await.map_err(db_err)?;
        Ok(Self { client, get, get_many, asc, desc, len, take_budget, put, delete })
    }

    async fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.client.query_opt(&self.get, &[&tree, &key]).await.map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The values of `keys` (in their order; `None` where absent), in one query.
    async fn get_many(
        &self,
        tree: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let rows = self.client.query(&self.get_many, &[&tree, &keys]).await.map_err(db_err)?;
        let found: std::collections::HashMap<Vec<u8>, Vec<u8>> =
            rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        // A key asked for twice is answered twice.
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn range(
        &self,
        tree: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let statement = if reverse { &self.desc } else { &self.asc };
        let rows =
            self.client.query(statement, &[&tree, &start, &end, &limit]).await.map_err(db_err)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        // Last write of a key wins, as in one transaction.
        let mut last = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put(t, k, v) => last.insert((t, k), Some(v)),
                Op::Delete(t, k) => last.insert((t, k), None),
            };
        }
        let (mut put, mut delete) = ((vec![], vec![], vec![]), (vec![], vec![]));
        for ((tree, key), value) in last {
            match value {
                Some(v) => {
                    put.0.push(tree);
                    put.1.push(key);
                    put.2.push(v);
                }
                None => {
                    delete.0.push(tree);
                    delete.1.push(key);
                }
            }
        }
        if !delete.0.is_empty() {
            self.client.execute(&self.delete, &[&delete.0, &delete.1]).await.map_err(db_err)?;
        }
        if !put.0.is_empty() {
            self.client.execute(&self.put, &[&put.0, &put.1, &put.2]).await.map_err(db_err)?;
        }
        Ok(())
    }
}

/// Ends the transaction open on `client` with COMMIT (announcing `notify`
/// to the other servers) and makes sure PostgreSQL committed it.
///
/// PostgreSQL answers the COMMIT of a transaction block that an earlier
/// statement aborted with the command tag `ROLLBACK`, not an error, and
/// tokio-postgres 0.7 does not hand command tags out
/// (`SimpleQueryMessage::CommandComplete` carries the row count parsed
/// from the tag: 0 for `COMMIT` and `ROLLBACK` alike). So COMMIT travels
/// behind a guard statement in the same query string: in an aborted block
/// every statement but COMMIT/ROLLBACK fails (SQLSTATE 25P02), which stops
/// the string before COMMIT and comes back as an error. An abort decided
/// by COMMIT itself (a deferred constraint, a serialization failure) is an
/// error response anyway. Last, every statement must report completion.
async fn commit(client: &Client, notify: Option<u64>) -> Result<(), StoreError> {
    // A revision is a number and the channel ours: nothing here is input.
    let mut sql = String::from("SELECT 1; ");
    if let Some(revision) = notify {
        sql.push_str(&format!("NOTIFY {CHANNEL}, '{revision}'; "));
    }
    sql.push_str("COMMIT");
    let statements = 2 + usize::from(notify.is_some());
    match client.simple_query(&sql).await {
        Ok(messages) => {
            let completed = messages
                .iter()
                .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
                .count();
            if completed == statements {
                Ok(())
            } else {
                Err(StoreError::Database(format!(
                    "COMMIT was not confirmed ({completed} of {statements} statements completed)"
                )))
            }
        }
        Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
            Err(StoreError::Database(
                "the transaction was rolled back, not committed: a statement in it had failed"
                    .into(),
            ))
        }
        Err(e) => Err(db_err(e)),
    }
}

/// Idle connections and how many are open.
#[derive(Default)]
struct PoolState {
    idle: Vec<Arc<Conn>>,
    open: usize,
}

/// The PostgreSQL-backed [`Kv`].
pub struct PgKv {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    config: tokio_postgres::Config,
    /// TLS as `sslmode` asks (unused for `disable`).
    tls: MakeRustlsConnect,
    /// The `sslmode` in force.
    sslmode: tls::SslMode,
    /// Where it is, without a password, for messages.
    target: String,
    pool: Mutex<PoolState>,
    available: std::sync::Condvar,
}

impl fmt::Debug for PgKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgKv").field("target", &self.target).finish_non_exhaustive()
    }
}

impl Drop for PgKv {
    fn drop(&mut self) {
        // May be dropped on an async worker, where a runtime cannot block.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A datastore URL with its password hidden: `postgres://user:***@host/db`,
/// `?password=***`, `password=***` in the `key=value` form.
pub fn redact(url: &str) -> String {
    if !tls::is_url(url) {
        let Ok(pairs) = tls::conninfo_pairs(url) else {
            return "(a malformed datastore setting)".to_string();
        };
        let mut out = String::new();
        let mut copied = 0;
        for pair in pairs.iter().filter(|p| p.key == "password") {
            out.push_str(&url[copied..pair.value_start]);
            out.push_str("***");
            copied = pair.end;
        }
        out.push_str(&url[copied..]);
        return out;
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key == "password" => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

impl PgKv {
    /// Connects to `url` (a `postgres://` URL or a key=value string, with
    /// libpq's `sslmode` and `sslrootcert`: see [`tls`]) and applies the
    /// migrations this version knows.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let target = redact(url);
        let bad = |e: &dyn std::fmt::Display| StoreError::Database(format!("{target}: {e}"));
        let (rest, params) = tls::split_params(url).map_err(|e| bad(&e))?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| bad(&e))?;
        let sslmode = tls::SslMode::resolve(&params, &config).map_err(|e| bad(&e))?;
        let tls = tls::connector(sslmode, params.sslrootcert.as_deref()).map_err(|e| bad(&e))?;
        config.ssl_mode(sslmode.driver_mode());
        info!(datastore = %target, %sslmode, "datastore connection security");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("tessera-server");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("database runtime: {e}")))?;
        let kv = Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            config,
            tls,
            sslmode,
            target,
            pool: Mutex::default(),
            available: std::sync::Condvar::new(),
        };
        kv.migrate()?;
        Ok(kv)
    }

    /// Runs `fut` on the driver's runtime and waits for it (with a time limit).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let out = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(out) => out,
                Err(_) => Err(StoreError::Database(format!(
                    "no answer within {}s",
                    CALL_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(out);
        });
        rx.recv().map_err(|_| StoreError::Database("the database call was abandoned".into()))?
    }

    /// A connection: an idle one, or a new one while fewer than
    /// [`POOL_SIZE`] are open; otherwise waits for one.
    fn checkout(&self) -> Result<Arc<Conn>, StoreError> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while let Some(conn) = pool.idle.pop() {
                if !conn.client.is_closed() {
                    return Ok(conn);
                }
                pool.open -= 1;
            }
            if pool.open < POOL_SIZE {
                pool.open += 1;
                break;
            }
            pool = self.available.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
        drop(pool);
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let target = self.target.clone();
        match self.run(async move { Conn::open(&config, tls).await }) {
            Ok(conn) => Ok(Arc::new(conn)),
            Err(e) => {
                self.release(None);
                let why = match e {
                    StoreError::Database(why) => why,
                    other => other.to_string(),
                };
                Err(StoreError::Database(format!("cannot reach the datastore {target}: {why}")))
            }
        }
    }

    /// Returns a connection to the pool, or gives up its slot (`None`, or
    /// one that failed).
    fn release(&self, conn: Option<Arc<Conn>>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        match conn {
            Some(conn) if !conn.client.is_closed() => pool.idle.push(conn),
            _ => pool.open -= 1,
        }
        drop(pool);
        self.available.notify_one();
    }

    /// Runs `op` on a pooled connection; a connection whose call failed is
    /// not reused.
    fn with_conn<T: Send + 'static, F>(
        &self,
        op: impl FnOnce(Arc<Conn>) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let conn = self.checkout()?;
        let out = self.run(op(conn.clone()));
        self.release(out.is_ok().then_some(conn));
        out
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let target = self.target.clone();
        self.run(async move {
            let (client, connection) = config.connect(tls).await.map_err(|e| {
                StoreError::Database(format!(
                    "cannot reach the datastore {target}: {}",
                    tessera_workload_api::error_chain(&e)
                ))
            })?;
            let task = tokio::spawn(connection);
            // Ended by the checked commit (a failure drops the connection,
            // which rolls back).
            client.batch_execute("BEGIN").await.map_err(db_err)?;
            let tx = &client;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db_err)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS tessera_migrations (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(db_err)?;
            let applied: i32 = tx
                .query_one("SELECT coalesce(max(version), 0) FROM tessera_migrations", &[])
                .await
                .map_err(db_err)?
                .get(0);
            let newest = MIGRATIONS.last().map_or(0, |m| m.0);
            if applied > newest {
                return Err(StoreError::Database(format!(
                    "the datastore {target} has schema version {applied}, newer than this server's {newest}: upgrade the server"
                )));
            }
            for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
                tx.batch_execute(sql).await.map_err(db_err)?;
                tx.execute("INSERT INTO tessera_migrations (version) VALUES ($1)", &[version])
                    .await
                    .map_err(db_err)?;
                info!(version, "applied datastore migration");
            }
            commit(&client, None).await?;
            drop(client);
            let _ = task.await;
            Ok(())
        })
    }
}

/// Reads inside a transaction, on its connection.
struct PgTxRead<'a> {
    kv: &'a PgKv,
    conn: Arc<Conn>,
}

impl TxRead for PgTxRead<'_> {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let (conn, key) = (self.conn.clone(), key.to_vec());
        self.kv.run(async move { conn.get(tree, &key).await })
    }

    fn scan_prefix(&self, tree: &'static str, prefix: &[u8]) -> Result<Pairs, StoreError> {
        let (conn, prefix) = (self.conn.clone(), prefix.to_vec());
        let end = super::kv::prefix_end(&prefix);
        self.kv
            .run(async move { conn.range(tree, &prefix, end.as_deref(), usize::MAX, false).await })
    }

    fn last(&self, tree: &'static str) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        let conn = self.conn.clone();
        self.kv.run(async move { Ok(conn.range(tree, b"", None, 1, true).await?.pop()) })
    }
}

impl Kv for PgKv {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.with_conn(|conn| async move { conn.get(tree, &key).await })
    }

    fn take_budget(
        &self,
        key: &str,
        n: u64,
        rate: u32,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<bool>, StoreError> {
        let key = key.to_string();
        let (n, rate, burst) = (n as f64, f64::from(rate), f64::from(burst));
        self.with_conn(|conn| async move {
            let row = conn
                .client
                .query_one(&conn.take_budget, &[&key, &burst, &n, &now_ms, &rate])
                .await
                .map_err(db_err)?;
            Ok(Some(row.get(0)))
        })
    }

    fn get_many(
        &self,
        tree: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let keys = keys.to_vec();
        self.with_conn(|conn| async move { conn.get_many(tree, &keys).await })
    }

    fn range(
        &self,
        tree: &'static str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        reverse: bool,
    ) -> Result<Pairs, StoreError> {
        let (start, end) = (start.to_vec(), end.map(<[u8]>::to_vec));
        self.with_conn(|conn| async move {
            conn.range(tree, &start, end.as_deref(), limit, reverse).await
        })
    }

    fn len(&self, tree: &'static str) -> Result<usize, StoreError> {
        self.with_conn(|conn| async move {
            let n: i64 = conn.client.query_one(&conn.len, &[&tree]).await.map_err(db_err)?.get(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    fn transaction(
        &self,
        lock: Lock,
        f: &mut dyn FnMut(&Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let conn = self.checkout()?;
        // One round trip: the lock number is ours, not input.
        let mut begin_sql = String::from("BEGIN");
        for part in lock.parts() {
            begin_sql.push_str(&format!("; SELECT pg_advisory_xact_lock({})", *part as i64));
        }
        let begin = {
            let conn = conn.clone();
            self.run(async move { conn.client.batch_execute(&begin_sql).await.map_err(db_err) })
        };
        if let Err(e) = begin {
            self.release(None);
            return Err(e);
        }
        let read = PgTxRead { kv: self, conn: conn.clone() };
        let txn = Txn::new(&read);
        let outcome = f(&txn);
        let end = match outcome {
            Ok(()) => {
                let (ops, notify) = txn.into_parts();
                let conn = conn.clone();
                self.run(async move {
                    conn.write(ops).await?;
                    // The notification and the commit in one round trip.
                    commit(&conn.client, notify).await
                })
            }
            Err(e) => {
                let conn = conn.clone();
                let rolled_back =
                    self.run(
                        async move { conn.client.batch_execute("ROLLBACK").await.map_err(db_err) },
                    );
                rolled_back.and(Err(e))
            }
        };
        // A connection is reused only after a clean commit or rollback.
        let clean = match &end {
            Ok(()) => true,
            Err(StoreError::Database(_)) => false,
            Err(_) => true,
        };
        self.release(clean.then_some(conn));
        end
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.with_conn(|conn| async move {
            conn.client.batch_execute("BEGIN").await.map_err(db_err)?;
            conn.write(ops).await?;
            commit(&conn.client, None).await
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every commit is durable when it returns.
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn on_remote_change(&self, f: OnRemoteChange) {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        self.handle.spawn(listen(config, tls, f));
    }

    fn health(&self) -> Result<String, StoreError> {
        let target = self.target.clone();
        let version: String = self.with_conn(|conn| async move {
            Ok(conn.client.query_one("SHOW server_version", &[]).await.map_err(db_err)?.get(0))
        })?;
        let open = self.pool.lock().unwrap_or_else(|e| e.into_inner()).open;
        Ok(format!(
            "postgresql {version} at {target} (sslmode {}), {open} connections open",
            self.sslmode
        ))
    }
}

/// LISTENs for other servers' commits and calls `f` with each revision,
/// reconnecting when the connection drops.
async fn listen(config: tokio_postgres::Config, tls: MakeRustlsConnect, f: OnRemoteChange) {
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let ready = {
                    let sql = format!("LISTEN {CHANNEL}");
                    let listening = client.batch_execute(&sql);
                    // The connection must be polled for LISTEN to complete.
                    let mut listening = std::pin::pin!(listening);
                    std::future::poll_fn(|cx| {
                        if let std::task::Poll::Ready(out) = listening.as_mut().poll(cx) {
                            return std::task::Poll::Ready(out.is_ok());
                        }
                        match connection.poll_message(cx) {
                            std::task::Poll::Ready(None | Some(Err(_))) => {
                                std::task::Poll::Ready(false)
                            }
                            _ => std::task::Poll::Pending,
                        }
                    })
                    .await
                };
                if ready {
                    loop {
                        let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                        match message {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                if let Ok(revision) = n.payload().parse::<u64>() {
                                    f(revision);
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                warn!(error = %e, "change notifications lost; reconnecting");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                drop(client);
            }
            Err(e) => warn!(error = %e, "cannot listen for changes; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(redact("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=/tmp user=u"), "host=/tmp user=u");
        assert_eq!(
            redact("postgres://u:pw@h/db?sslmode=verify-full&password=secret"),
            "postgres://u:***@h/db?sslmode=verify-full&password=***"
        );
        assert_eq!(redact("host=h password='s e\\'cret' user=u"), "host=h password=*** user=u");
        assert_eq!(redact("host=h password='unterminated"), "(a malformed datastore setting)");
    }

    /// PostgreSQL answers the COMMIT of a transaction that an earlier
    /// statement aborted with the tag ROLLBACK and no error: the store's
    /// commit must say so, not report a write that never happened.
    #[test]
    fn a_commit_that_postgresql_turned_into_a_rollback_is_an_error() {
        let kv = PgKv::connect(&crate::pg_cluster::PgCluster::shared().database()).unwrap();
        let (config, tls) = (kv.config.clone(), kv.tls.clone());
        let committed = kv
            .run(async move {
                let conn = Conn::open(&config, tls).await?;
                conn.client.batch_execute("BEGIN").await.map_err(db_err)?;
                conn.write(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).await?;
                // A statement fails and its error is lost on the way: the
                // transaction is aborted, and nothing says so any more.
                assert!(conn.client.batch_execute("SELECT 1/0").await.is_err());
                Ok(commit(&conn.client, None).await)
            })
            .unwrap();
        let error = committed.expect_err("a rolled-back commit reported success").to_string();
        assert!(error.contains("rolled back, not committed"), "{error}");
        assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), None, "nothing was written");
    }

    /// The same through the store's transactions: a read that failed on the
    /// server (its error ignored by the caller) aborts the transaction, and
    /// the transaction then fails instead of reporting a commit.
    #[test]
    fn a_transaction_with_an_ignored_failed_read_does_not_report_a_commit() {
        let kv = PgKv::connect(&crate::pg_cluster::PgCluster::shared().database()).unwrap();
        let out = kv.transaction(Lock::Store, &mut |tx| {
            // A NUL byte is not text to PostgreSQL: the server refuses the read.
            assert!(tx.get("t\0", b"k").is_err());
            Ok(())
        });
        let error = out.expect_err("an aborted transaction reported a commit").to_string();
        assert!(error.contains("rolled back, not committed"), "{error}");
        // The store goes on: the next transaction commits.
        kv.transaction(Lock::Store, &mut |tx| {
            tx.put("t", b"k", b"v".to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// A cluster that serves TLS with a certificate for `localhost` and
    /// 127.0.0.1 from a CA made here, and refuses plain TCP; the CA's PEM
    /// file, and another CA's.
    struct TlsCluster {
        cluster: crate::pg_cluster::PgCluster,
        ca: std::path::PathBuf,
        other_ca: std::path::PathBuf,
    }

    fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, rcgen::Issuer::new(params, key))
    }

    fn tls_cluster() -> &'static TlsCluster {
        static CLUSTER: std::sync::OnceLock<TlsCluster> = std::sync::OnceLock::new();
        CLUSTER.get_or_init(|| {
            let (ca_pem, issuer) = ca("tessera test PostgreSQL CA");
            let (other_pem, _) = ca("another CA");
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&key, &issuer).unwrap();
            let tls =
                crate::pg_cluster::ServerTls { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
            let cluster = crate::pg_cluster::PgCluster::start_tls(&tls).unwrap();
            let ca = cluster.dir().join("ca.pem");
            let other_ca = cluster.dir().join("other-ca.pem");
            std::fs::write(&ca, ca_pem).unwrap();
            std::fs::write(&other_ca, other_pem).unwrap();
            TlsCluster { cluster, ca, other_ca }
        })
    }

    impl TlsCluster {
        /// A new database's URL at `host`, with `query`.
        fn url(&self, host: &str, query: &str) -> String {
            let db = self.cluster.database();
            let name = db.rsplit('/').next().unwrap();
            format!("postgres://tessera@{host}:{}/{name}?{query}", self.cluster.port())
        }
    }

    /// Whether the store's connections are encrypted.
    fn encrypted(kv: &PgKv) -> bool {
        kv.with_conn(|conn| async move {
            let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
            Ok(conn.client.query_one(sql, &[]).await.map_err(db_err)?.get(0))
        })
        .unwrap()
    }

    #[test]
    fn sslmode_require_encrypts_without_checking_the_certificate() {
        let pg = tls_cluster();
        let kv = PgKv::connect(&pg.url("127.0.0.1", "sslmode=require")).unwrap();
        assert!(encrypted(&kv));
        kv.apply(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).unwrap();
        assert_eq!(Kv::get(&kv, "t", b"k").unwrap(), Some(b"v".to_vec()));
        assert!(kv.health().unwrap().contains("sslmode require"), "{}", kv.health().unwrap());
    }

    #[test]
    fn verify_full_with_the_servers_ca_connects() {
        let pg = tls_cluster();
        for host in ["127.0.0.1", "localhost"] {
            let query = format!("sslmode=verify-full&sslrootcert={}", pg.ca.display());
            let kv = PgKv::connect(&pg.url(host, &query)).unwrap();
            assert!(encrypted(&kv), "{host}");
            kv.apply(vec![Op::Put("t", b"k".to_vec(), b"v".to_vec())]).unwrap();
        }
    }

    #[test]
    fn verify_full_with_another_ca_is_refused_and_says_why() {
        let pg = tls_cluster();
        let query = format!("sslmode=verify-full&sslrootcert={}", pg.other_ca.display());
        let error = PgKv::connect(&pg.url("127.0.0.1", &query)).unwrap_err().to_string();
        assert!(error.contains("invalid peer certificate: UnknownIssuer"), "{error}");
        assert!(!error.contains('\n'), "{error}");
        // verify-ca checks the chain too.
        let query = format!("sslmode=verify-ca&sslrootcert={}", pg.other_ca.display());
        let error = PgKv::connect(&pg.url("127.0.0.1", &query)).unwrap_err().to_string();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[test]
    fn verify_full_refuses_a_certificate_for_another_host_name_and_verify_ca_does_not() {
        let pg = tls_cluster();
        // The name says db.example.test; the connection goes to 127.0.0.1.
        let query = |mode: &str| {
            format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}", pg.ca.display())
        };
        let error = PgKv::connect(&pg.url("db.example.test", &query("verify-full")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("certificate not valid for name \"db.example.test\""), "{error}");
        let kv = PgKv::connect(&pg.url("db.example.test", &query("verify-ca"))).unwrap();
        assert!(encrypted(&kv));
    }

    #[test]
    fn sslmode_disable_is_refused_by_a_server_that_requires_tls() {
        let pg = tls_cluster();
        let error = PgKv::connect(&pg.url("127.0.0.1", "sslmode=disable")).unwrap_err().to_string();
        assert!(error.contains("no encryption"), "{error}");
    }

    /// Without sslmode a remote host is verified (against the system's
    /// roots here, which do not hold the test CA), never reached in plain.
    #[test]
    fn a_remote_host_without_sslmode_is_verified() {
        let pg = tls_cluster();
        let error = PgKv::connect(&pg.url("db.example.test", "hostaddr=127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("invalid peer certificate: UnknownIssuer")
                || error.contains("needs trusted roots"),
            "{error}"
        );
        // With the CA named, the host name is checked too (verify-full, not verify-ca).
        let query = format!("hostaddr=127.0.0.1&sslrootcert={}", pg.ca.display());
        let error = PgKv::connect(&pg.url("db.example.test", &query)).unwrap_err().to_string();
        assert!(error.contains("certificate not valid for name"), "{error}");
    }

    #[test]
    fn an_unknown_sslmode_or_an_unreadable_root_file_is_a_one_line_error() {
        let error = PgKv::connect("postgres://u:pw@db.example.test/t?sslmode=verify").unwrap_err();
        assert_eq!(
            error.to_string(),
            "datastore: postgres://u:***@db.example.test/t?sslmode=verify: unknown sslmode \"verify\": use disable, prefer, require, verify-ca or verify-full"
        );
        let error = PgKv::connect("postgres://u@db.example.test/t?sslrootcert=/nonexistent.pem")
            .unwrap_err()
            .to_string();
        assert!(error.contains("sslrootcert /nonexistent.pem: No such file"), "{error}");
    }

    /// The README's Unix socket form: the socket directory, percent-encoded, as the host.
    #[test]
    fn a_unix_socket_url_reaches_the_database() {
        let cluster = crate::pg_cluster::PgCluster::shared();
        let tcp = cluster.database();
        let name = tcp.rsplit('/').next().unwrap();
        let dir = cluster.dir().display().to_string().replace('/', "%2F");
        let url = format!("postgres://tessera@{dir}:{}/{name}", cluster.port());
        let kv = PgKv::connect(&url).unwrap();
        assert!(kv.health().unwrap().starts_with("postgresql"), "{url}");
    }
}
