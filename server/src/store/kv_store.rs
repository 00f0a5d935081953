//! The [`KvStore`]: what it holds. It opens in `open.rs`; each `Store`
//! method lives in the file of its concept (`store_impl.rs` says which).

use std::fmt;
use std::sync::{Arc, Mutex};

use prost::Message;
use tessera_proto::types as pb;
use tokio::sync::watch;

use super::audit::EventSink;
use super::entry_cache::EntryCache;
use super::error::StoreError;
use super::issue_queue::IssueJob;
use super::issued_index::IssuedIndex;
use super::kv::{scan_prefix, Kv};
use super::layout::{decode, read_u64, t, META, REVISION_KEY};
use super::watermark::Watermark;
use super::CrlSigner;

/// The store: every record in a [`Kv`] database, `<data_dir>/store` (sled)
/// or PostgreSQL shared by several servers.
pub struct KvStore {
    pub(super) kv: Arc<dyn Kv>,
    /// Serializes this process's commits (the database's lock serializes
    /// them across servers): reads made while holding it are consistent
    /// with the commit that follows them.
    pub(super) writer: Mutex<Writer>,
    /// sled only: which records each entry and agent has, and where
    /// (`issued_index.rs`). Changed only under the writer lock.
    pub(super) issued_index: std::sync::RwLock<IssuedIndex>,
    /// sled only: entries decoded for signing (`entries.rs`).
    pub(super) entry_cache: Mutex<EntryCache>,
    /// Issuance batches waiting for a commit (group commit).
    pub(super) issue_queue: Mutex<Vec<IssueJob>>,
    /// sled only: PostgreSQL keeps its own durability.
    pub(super) watermark: Option<Watermark>,
    pub(super) revision: Arc<watch::Sender<u64>>,
    pub(super) crl_signer: std::sync::OnceLock<std::sync::Arc<dyn CrlSigner>>,
    /// The event log every commit chains its events into.
    pub(super) event_sink: std::sync::OnceLock<std::sync::Arc<dyn EventSink>>,
    /// This server's ID, naming its CRLs in a shared database ("" on sled).
    pub(super) server_id: String,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore").field("kv", &self.kv).finish_non_exhaustive()
    }
}

/// State only commits touch, under the writer lock.
#[derive(Debug, Default)]
pub(super) struct Writer {
    /// On sled, every stored X509-SVID revocation, what the CRLs are signed
    /// from (kept in memory rather than scanned per commit). A shared
    /// database reads them in the commit: other servers add to them.
    pub(super) revocations: Vec<pb::Revocation>,
}

impl KvStore {
    pub(super) fn with_kv(
        kv: Arc<dyn Kv>,
        watermark: Option<Watermark>,
        server_id: &str,
    ) -> Result<Self, StoreError> {
        let revision = read_u64(kv.get(t(META), REVISION_KEY)?.as_deref());
        Ok(Self {
            kv,
            writer: Mutex::new(Writer::default()),
            issued_index: Default::default(),
            entry_cache: Mutex::default(),
            issue_queue: Mutex::new(Vec::new()),
            watermark,
            revision: Arc::new(watch::channel(revision).0),
            crl_signer: std::sync::OnceLock::new(),
            event_sink: std::sync::OnceLock::new(),
            server_id: server_id.to_string(),
        })
    }

    /// The database, for the records kept beside the store's own trees
    /// (the event log, entries waiting for approval).
    pub fn kv(&self) -> Arc<dyn Kv> {
        self.kv.clone()
    }

    /// Every record of `tree`, decoded.
    pub(super) fn decode_tree<M: Message + Default>(
        &self,
        tree: &'static str,
    ) -> Result<Vec<M>, StoreError> {
        scan_prefix(&*self.kv, tree, b"")?
            .into_iter()
            .map(|(key, bytes)| decode(&key, &bytes))
            .collect()
    }
}
