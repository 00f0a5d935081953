//! Opening a [`KvStore`]: the embedded sled store in the data directory
//! (checked against its watermark and its own indexes), or PostgreSQL
//! shared with the other servers.

use std::path::Path;
use std::sync::Arc;

use super::error::StoreError;
use super::issued_index::IssuedIndex;
use super::kv::Kv;
use super::kv_store::KvStore;
use super::layout::{read_u64, t, AGENTS, ENTRIES, META, WRITE_SEQ_KEY};
use super::postgres::PgKv;
use super::sled::SledKv;
use super::watermark::Watermark;

/// The store's page cache.
pub(super) const STORE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

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
        let (_, trees) = store.check_dump().map_err(|e| match e {
            StoreError::Corrupt { key, reason } => damaged(format!("record {key}: {reason}")),
            other => other,
        })?;
        if let Some(watermark) = &store.watermark {
            watermark.write(meta_seq)?;
        }
        store.load_revocations()?;
        *store.index_mut() = IssuedIndex::load(&*store.kv, &trees)?;
        Ok(store)
    }

    /// Connects to the PostgreSQL store at `url`, shared with the other
    /// servers of the trust domain; `server_id` names this server's CRLs.
    pub fn open_postgres(url: &str, server_id: &str) -> Result<Self, StoreError> {
        let kv: Arc<dyn Kv> = Arc::new(PgKv::connect(url)?);
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

    /// Opens the sled database and reads the watermark, without checking either.
    pub(super) fn open_unchecked(dir: &Path) -> Result<(Self, Option<u64>), StoreError> {
        let kv: Arc<dyn Kv> = Arc::new(SledKv::open(dir, STORE_CACHE_BYTES)?);
        let (watermark, acked) = Watermark::open(dir.join("tessera.watermark"))?;
        Ok((Self::with_kv(kv, Some(watermark), "")?, acked))
    }
}
