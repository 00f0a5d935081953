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
//!   [`conn::commit`] makes that an error instead of a success.
//! - **Migrations** are embedded and versioned ([`MIGRATIONS`]), applied
//!   at startup under an advisory lock so servers starting together apply
//!   each once.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

mod conn;
pub mod tls;

use super::error::StoreError;
use super::kv::{Kv, Lock, OnRemoteChange, Op, Pairs, TxRead, Txn};
use conn::{commit, db_err, Conn, CHANNEL};

/// Most connections one server opens.
pub const POOL_SIZE: usize = 16;

/// How long one database call may take before the server gives up on it
/// (and on its connection).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

    fn get_many(
        &self,
        tree: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let (conn, keys) = (self.conn.clone(), keys.to_vec());
        self.kv.run(async move { conn.get_many(tree, &keys).await })
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
mod tests;
