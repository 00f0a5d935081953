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
//! - **Migrations** are embedded and versioned ([`MIGRATIONS`]), applied
//!   at startup under an advisory lock so servers starting together apply
//!   each once.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};
use tracing::{info, warn};

use crate::kv::{Kv, Lock, OnRemoteChange, Op, Pairs, TxRead, Txn};
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
    async fn open(config: &tokio_postgres::Config) -> Result<Self, StoreError> {
        let (client, connection) = config.connect(NoTls).await.map_err(db_err)?;
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

/// `postgres://user:secret@host/db` with the password hidden.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl PgKv {
    /// Connects to `url` (a `postgres://` URL or a key=value string) and
    /// applies the migrations this version knows.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let target = redact(url);
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Database(format!("datastore {target}: {e}")))?;
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
        let config = self.config.clone();
        let target = self.target.clone();
        match self.run(async move { Conn::open(&config).await }) {
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
        let config = self.config.clone();
        let target = self.target.clone();
        self.run(async move {
            let (mut client, connection) = config.connect(NoTls).await.map_err(|e| {
                StoreError::Database(format!(
                    "cannot reach the datastore {target}: {}",
                    tessera_workload_api::error_chain(&e)
                ))
            })?;
            let task = tokio::spawn(connection);
            let tx = client.transaction().await.map_err(db_err)?;
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
            tx.commit().await.map_err(db_err)?;
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
        let end = crate::kv::prefix_end(&prefix);
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
        let begin_sql = format!("BEGIN; SELECT pg_advisory_xact_lock({})", lock as i64);
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
                    // The notification and the commit in one round trip (a
                    // revision is a number, the channel ours).
                    let commit = match notify {
                        Some(revision) => format!("NOTIFY {CHANNEL}, '{revision}'; COMMIT"),
                        None => "COMMIT".to_string(),
                    };
                    conn.client.batch_execute(&commit).await.map_err(db_err)
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
            conn.client.batch_execute("COMMIT").await.map_err(db_err)
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
        let config = self.config.clone();
        self.handle.spawn(listen(config, f));
    }

    fn health(&self) -> Result<String, StoreError> {
        let target = self.target.clone();
        let version: String = self.with_conn(|conn| async move {
            Ok(conn.client.query_one("SHOW server_version", &[]).await.map_err(db_err)?.get(0))
        })?;
        let open = self.pool.lock().unwrap_or_else(|e| e.into_inner()).open;
        Ok(format!("postgresql {version} at {target}, {open} connections open"))
    }
}

/// LISTENs for other servers' commits and calls `f` with each revision,
/// reconnecting when the connection drops.
async fn listen(config: tokio_postgres::Config, f: OnRemoteChange) {
    loop {
        match config.connect(NoTls).await {
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
