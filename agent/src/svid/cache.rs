//! The agent's view of its entries, the SVIDs it holds for them and the
//! trust bundle, published through a `watch` channel so every Workload API
//! stream sees each change, and every stream of a workload sees the same
//! cached SVIDs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tessera_proto::types as pb;
use tessera_workload_api::jwt::JwtBundle;
use tessera_workload_api::{Selector, SpiffeId};
use tokio::sync::watch;

/// An entry as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    /// Entry ID.
    pub id: String,
    /// The identity it grants.
    pub spiffe_id: SpiffeId,
    /// All must be among the workload's selectors.
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime, seconds.
    pub x509_svid_ttl: u32,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Unix seconds, 0 = never.
    pub expires_at: i64,
    /// Revision of the last change.
    pub revision: u64,
    /// Hint for workloads.
    pub hint: String,
    /// Audiences the entry may get JWT-SVIDs for; empty: any.
    pub jwt_audiences: Vec<String>,
}

impl AgentEntry {
    /// Parses an entry from the server; `None` if the server sent nonsense.
    pub fn from_proto(p: &pb::Entry) -> Option<Self> {
        Some(Self {
            id: p.id.clone(),
            spiffe_id: SpiffeId::parse(&p.spiffe_id).ok()?,
            selectors: p
                .selectors
                .iter()
                .map(|s| Selector::new(&s.r#type, &s.value).ok())
                .collect::<Option<_>>()?,
            x509_svid_ttl: p.x509_svid_ttl.unwrap_or(3600),
            dns_names: p.dns_names.clone(),
            expires_at: p.expires_at,
            revision: p.revision,
            hint: p.hint.clone(),
            jwt_audiences: p.jwt_audiences.clone(),
        })
    }

    /// Whether the entry's audience policy allows a JWT-SVID for `audience`.
    pub fn allows_audience(&self, audience: &str) -> bool {
        tessera_workload_api::jwt::audience_allowed(&self.jwt_audiences, audience)
    }

    /// Whether an SVID signed for `other` is still right for this entry:
    /// `tessera_common::rules::SvidBasis::serves_svid_of`, the rule beside
    /// the one the server revokes by. The agent re-issues on every field
    /// that goes into the certificate, so no revoked SVID is left in use
    /// and no valid one is kept after its content went stale.
    pub fn same_certificate_content(&self, other: &AgentEntry) -> bool {
        self.svid_basis().serves_svid_of(&other.svid_basis())
    }

    /// What of this entry goes into an X509-SVID (every entry the agent
    /// holds is parented to it: the parent is not compared here).
    fn svid_basis(&self) -> tessera_common::rules::SvidBasis<'_> {
        tessera_common::rules::SvidBasis {
            spiffe_id: self.spiffe_id.as_str(),
            parent_id: "",
            dns_names: &self.dns_names,
            expires_at: self.expires_at,
            x509_svid_ttl: self.x509_svid_ttl,
        }
    }
}

/// An X509-SVID the agent holds for an entry.
#[derive(Clone)]
pub struct CachedSvid {
    /// The entry it was issued for.
    pub entry_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER private key, generated on this node.
    pub key_pkcs8: Arc<Vec<u8>>,
    /// Leaf serial, hex.
    pub serial: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// When to renew: half-life ± 10 % jitter.
    pub renew_at: i64,
    /// The entry's hint.
    pub hint: String,
}

impl fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Everything the agent knows at one moment.
#[derive(Debug, Clone, Default)]
pub struct CacheState {
    /// True once the first full snapshot from the server was applied (or a
    /// previous one restored).
    pub ready: bool,
    /// Last applied entry revision.
    pub revision: u64,
    /// Entries by ID.
    pub entries: BTreeMap<String, Arc<AgentEntry>>,
    /// SVIDs by entry ID.
    pub svids: BTreeMap<String, Arc<CachedSvid>>,
    /// The trust domain's CA certificates.
    pub bundle: Arc<Vec<CertificateDer<'static>>>,
    /// The CRLs in force (DER, one per CA).
    pub crls: Arc<Vec<Vec<u8>>>,
    /// The trust domain's JWT signing keys (none until the server sent them).
    pub jwt_bundle: Option<Arc<JwtBundle>>,
    /// Entry IDs by each of their selectors, so a workload's entries are
    /// found without scanning every entry. Rebuilt by [`reindex`](Self::reindex).
    by_selector: Arc<HashMap<Selector, BTreeSet<String>>>,
}

impl CacheState {
    /// Rebuilds the selector index from `entries`.
    pub fn reindex(&mut self) {
        let mut index: HashMap<Selector, BTreeSet<String>> = HashMap::new();
        for entry in self.entries.values() {
            for selector in &entry.selectors {
                index.entry(selector.clone()).or_default().insert(entry.id.clone());
            }
        }
        self.by_selector = Arc::new(index);
    }

    /// Adds or replaces an entry, keeping the index current.
    pub fn insert_entry(&mut self, entry: Arc<AgentEntry>) {
        self.remove_entry(&entry.id);
        let index = Arc::make_mut(&mut self.by_selector);
        for selector in &entry.selectors {
            index.entry(selector.clone()).or_default().insert(entry.id.clone());
        }
        self.entries.insert(entry.id.clone(), entry);
    }

    /// Removes an entry (and its place in the index); returns it.
    pub fn remove_entry(&mut self, id: &str) -> Option<Arc<AgentEntry>> {
        let entry = self.entries.remove(id)?;
        let index = Arc::make_mut(&mut self.by_selector);
        for selector in &entry.selectors {
            if let Some(ids) = index.get_mut(selector) {
                ids.remove(id);
                if ids.is_empty() {
                    index.remove(selector);
                }
            }
        }
        Some(entry)
    }

    /// Entries whose selectors are all among `selectors`, valid at `now`.
    fn matching<'a>(
        &'a self,
        selectors: &'a [Selector],
        now: i64,
    ) -> impl Iterator<Item = &'a Arc<AgentEntry>> + 'a {
        let mut candidates: Vec<&String> =
            selectors.iter().filter_map(|s| self.by_selector.get(s)).flatten().collect();
        // An entry shows up once per selector it shares with the workload.
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .filter_map(|id| self.entries.get(id))
            .filter(move |e| Selector::all_present(&e.selectors, selectors))
            .filter(move |e| e.expires_at == 0 || e.expires_at > now)
    }

    /// The SVIDs a workload with `selectors` is entitled to, valid at `now`,
    /// in a stable order (by SPIFFE ID, then entry ID).
    pub fn svids_for(&self, selectors: &[Selector], now: i64) -> Vec<Arc<CachedSvid>> {
        let mut out: Vec<Arc<CachedSvid>> = self
            .matching(selectors, now)
            .filter_map(|e| self.svids.get(&e.id))
            .filter(|s| s.expires_at > now)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            (a.spiffe_id.as_str(), &a.entry_id).cmp(&(b.spiffe_id.as_str(), &b.entry_id))
        });
        out
    }

    /// The entries a workload with `selectors` has, valid at `now`, in a
    /// stable order (by SPIFFE ID, then entry ID).
    pub fn entries_for(&self, selectors: &[Selector], now: i64) -> Vec<Arc<AgentEntry>> {
        let mut out: Vec<Arc<AgentEntry>> = self.matching(selectors, now).cloned().collect();
        out.sort_by(|a, b| (a.spiffe_id.as_str(), &a.id).cmp(&(b.spiffe_id.as_str(), &b.id)));
        out
    }

    /// Whether any entry matches `selectors` (with or without an SVID yet).
    pub fn has_entries_for(&self, selectors: &[Selector], now: i64) -> bool {
        self.matching(selectors, now).next().is_some()
    }
}

/// The shared cache.
#[derive(Debug, Clone)]
pub struct Cache {
    tx: Arc<watch::Sender<Arc<CacheState>>>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// An empty, not-ready cache.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(CacheState::default()));
        Self { tx: Arc::new(tx) }
    }

    /// The current state.
    pub fn state(&self) -> Arc<CacheState> {
        self.tx.borrow().clone()
    }

    /// Follows changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheState>> {
        self.tx.subscribe()
    }

    /// Applies `change`; subscribers are woken only if it reports a change.
    pub fn update(&self, change: impl FnOnce(&mut CacheState) -> bool) {
        self.tx.send_if_modified(|state| change(Arc::make_mut(state)));
    }

    /// Withdraws every identity: an agent that is banned, or whose identity
    /// is dead for good, serves nothing (each stream says so before it ends).
    pub fn withdraw_all(&self) {
        self.update(|s| {
            let changed = !s.entries.is_empty() || !s.svids.is_empty();
            s.entries.clear();
            s.reindex();
            s.svids.clear();
            s.ready = true;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, selectors: &[&str], expires_at: i64) -> Arc<AgentEntry> {
        Arc::new(AgentEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/{id}")).unwrap(),
            selectors: selectors.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            x509_svid_ttl: 60,
            dns_names: vec![],
            expires_at,
            revision: 1,
            hint: String::new(),
            jwt_audiences: vec![],
        })
    }

    #[test]
    fn workloads_match_entries_whose_selectors_they_all_have() {
        let mut state = CacheState::default();
        for e in [
            entry("a", &["unix:uid:1"], 0),
            entry("b", &["unix:uid:1", "unix:gid:5"], 0),
            entry("c", &["unix:uid:2"], 0),
            entry("d", &["unix:uid:1"], 10),
        ] {
            state.insert_entry(e);
        }
        let ids = |selectors: &[&str], now| -> Vec<String> {
            let selectors: Vec<Selector> =
                selectors.iter().map(|s| Selector::parse(s).unwrap()).collect();
            let mut ids: Vec<String> =
                state.matching(&selectors, now).map(|e| e.id.clone()).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(&["unix:uid:1"], 5), ["a", "d"]);
        assert_eq!(ids(&["unix:uid:1", "unix:gid:5"], 5), ["a", "b", "d"]);
        assert_eq!(
            ids(&["unix:uid:1", "unix:gid:5"], 10),
            ["a", "b"],
            "expired entries match nothing"
        );
        assert!(ids(&["unix:uid:3"], 5).is_empty());
        let mut state = state.clone();
        state.remove_entry("a");
        state.insert_entry(entry("b", &["unix:uid:2"], 0));
        let selectors = [Selector::parse("unix:uid:1").unwrap()];
        let ids: Vec<String> = state.matching(&selectors, 5).map(|e| e.id.clone()).collect();
        assert_eq!(ids, ["d"], "removed and moved entries leave the index");
        state.reindex();
        assert_eq!(state.matching(&selectors, 5).count(), 1);
    }
}
