//! One pooled PostgreSQL connection: its prepared statements, the
//! statements themselves, and the checked COMMIT every transaction ends
//! with.

use std::collections::BTreeMap;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

use crate::store::error::StoreError;
use crate::store::kv::{Op, Pairs};

/// The channel commits are announced on.
pub(super) const CHANNEL: &str = "tessera_changes";

pub(super) const SQL_GET: &str = "SELECT value FROM kv WHERE tree = $1 AND key = $2";
pub(super) const SQL_GET_MANY: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key = ANY($2)";
pub(super) const SQL_ASC: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 \
     AND ($3::bytea IS NULL OR key < $3) ORDER BY key LIMIT $4";
pub(super) const SQL_DESC: &str = "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 \
     AND ($3::bytea IS NULL OR key < $3) ORDER BY key DESC LIMIT $4";
pub(super) const SQL_LEN: &str = "SELECT count(*) FROM kv WHERE tree = $1";
/// Takes $3 tokens from agent $1's bucket (at most $2, refilled at $5 per
/// second, now $4 ms) in one statement: the row lock serializes the
/// agent's own calls, and no other agent's. Time never runs backwards.
pub(super) const SQL_TAKE_BUDGET: &str =
    "INSERT INTO sign_budgets AS b (agent, tokens, at_ms, taken) \
     VALUES ($1, CASE WHEN $2 >= $3 THEN $2 - $3 ELSE $2 END, $4, $2 >= $3) \
     ON CONFLICT (agent) DO UPDATE SET \
     tokens = CASE WHEN LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) >= $3 \
         THEN LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) - $3 \
         ELSE LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) END, \
     at_ms = GREATEST(b.at_ms, $4), \
     taken = LEAST($2, b.tokens + GREATEST($4 - b.at_ms, 0) / 1000.0 * $5) >= $3 \
     RETURNING taken";
pub(super) const SQL_PUT: &str = "INSERT INTO kv (tree, key, value) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value";
pub(super) const SQL_DELETE: &str = "DELETE FROM kv WHERE (tree, key) IN \
     (SELECT * FROM unnest($1::text[], $2::bytea[]))";

/// One pooled connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) get: Statement,
    pub(super) get_many: Statement,
    pub(super) asc: Statement,
    pub(super) desc: Statement,
    pub(super) len: Statement,
    pub(super) take_budget: Statement,
    pub(super) put: Statement,
    pub(super) delete: Statement,
}

pub(super) fn db_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(tessera_workload_api::error_chain(&e))
}

impl Conn {
    pub(super) async fn open(
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

    pub(super) async fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.client.query_opt(&self.get, &[&tree, &key]).await.map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The values of `keys` (in their order; `None` where absent), in one query.
    pub(super) async fn get_many(
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

    pub(super) async fn range(
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

    pub(super) async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
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
pub(super) async fn commit(client: &Client, notify: Option<u64>) -> Result<(), StoreError> {
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
