//! The change feed: one task per server tails the store's change log,
//! decodes each change once and keeps a window of the most recent ones that
//! every Sync stream reads from. The log stays the truth: a stream whose
//! revision is older than the window reads the store directly, and the
//! feed only ever holds a contiguous run of the log.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::entry::Entry;
use crate::store::{Change, ChangeKind, Store, StoreError};

/// Changes kept in memory for streams to read.
pub const FEED_WINDOW: usize = 50_000;

/// How long a change stays in the window. The window is for the streams
/// that are keeping up (a fan-out reaches them within a second); a stream
/// further behind reads the store. Without an age bound the window held
/// the last 50,000 changes whatever their age: at a steady 8 changes a
/// second (the soak's churn) it grew for 1.7 hours, about 1 KB a change.
pub const FEED_MAX_AGE: Duration = Duration::from_secs(120);

/// Changes read from the store at a time.
const READ_PAGE: usize = 5_000;

/// Called with each batch of changes the feed reads, before streams see them.
pub type ChangeHook = Arc<dyn Fn(&dyn Store, &[Change]) + Send + Sync>;

/// A change as the feed holds it, with what streams need of it read once
/// for all of them.
#[derive(Debug)]
pub struct FedChange {
    /// The change.
    pub change: Change,
    /// For an entry change, the entry as read right after the feed read the
    /// change (`Some(None)`: gone by then); `None` when not read, and a
    /// stream reads it itself. Either is at least as new as the change,
    /// and any later change follows in the log.
    pub entry: Option<Option<Entry>>,
    /// When the feed took the change in (`None` for one a stream read from
    /// the store itself): push latency is counted from here. The entry
    /// read began then and saw every commit made before; a stream uses it
    /// only if it began after the stream opened and after the stream's own
    /// last read of the store, so that nothing it sends is older than what
    /// it (or, before a failover, another server) sent before.
    pub read_at: Option<std::time::Instant>,
}

impl FedChange {
    /// A change a stream read from the store; it reads the entry itself.
    pub fn bare(change: Change) -> Self {
        Self { change, entry: None, read_at: None }
    }
}

/// The window's changes, and which of them concern whom: a stream reads
/// only the revisions of its agent and those for every agent, instead of
/// every change of the window (with 10,000 streams, scanning each change
/// once per stream was the cost of a fan-out).
#[derive(Debug, Default)]
struct Window {
    /// Contiguous revisions, oldest first.
    changes: VecDeque<Arc<FedChange>>,
    /// Revisions (ascending) of the changes that concern one agent: entry
    /// changes under each of their parents, a ban or an eviction.
    by_agent: HashMap<String, VecDeque<u64>>,
    /// Revisions (ascending) of the changes every agent reads:
    /// revocations, CRLs, the bundle.
    everyone: VecDeque<u64>,
}

/// Whom a change concerns: the agents it names, or `None` for every agent.
fn concerns(kind: &ChangeKind) -> Option<Vec<&str>> {
    match kind {
        ChangeKind::Entry { parents, .. } => Some(parents.iter().map(String::as_str).collect()),
        ChangeKind::AgentBanned { agent_id, .. } | ChangeKind::AgentEvicted { agent_id } => {
            Some(vec![agent_id.as_str()])
        }
        ChangeKind::Revoked { .. } | ChangeKind::Crls | ChangeKind::Bundle => None,
    }
}

impl Window {
    fn push(&mut self, fed: Arc<FedChange>) {
        let revision = fed.change.revision;
        match concerns(&fed.change.kind) {
            Some(agents) => {
                for agent in agents {
                    let revisions = self.by_agent.entry(agent.to_string()).or_default();
                    // An entry moved within one agent names it twice.
                    if revisions.back() != Some(&revision) {
                        revisions.push_back(revision);
                    }
                }
            }
            None => self.everyone.push_back(revision),
        }
        self.changes.push_back(fed);
    }

    /// Drops the oldest changes until at most [`FEED_WINDOW`] are held and
    /// none was taken in more than [`FEED_MAX_AGE`] before `now`.
    fn trim(&mut self, now: std::time::Instant) {
        while self.changes.front().is_some_and(|oldest| {
            self.changes.len() > FEED_WINDOW
                || oldest.read_at.is_none_or(|at| now.saturating_duration_since(at) > FEED_MAX_AGE)
        }) {
            self.pop();
        }
    }

    fn pop(&mut self) {
        let Some(fed) = self.changes.pop_front() else { return };
        let revision = fed.change.revision;
        match concerns(&fed.change.kind) {
            Some(agents) => {
                for agent in agents {
                    if let Some(revisions) = self.by_agent.get_mut(agent) {
                        while revisions.front().is_some_and(|r| *r <= revision) {
                            revisions.pop_front();
                        }
                        if revisions.is_empty() {
                            self.by_agent.remove(agent);
                        }
                    }
                }
            }
            None => {
                while self.everyone.front().is_some_and(|r| *r <= revision) {
                    self.everyone.pop_front();
                }
            }
        }
    }
}

/// What a stream reads from the feed: the changes after its revision that
/// concern its agent or every agent (in order, at most a page), and the
/// revision it is current to once it has sent them.
#[derive(Debug)]
pub struct ForAgent {
    /// The changes to send.
    pub changes: Vec<Arc<FedChange>>,
    /// The revision the stream has covered after them.
    pub covered: u64,
}

/// Wakes one Sync stream when the feed takes in a change that concerns
/// its agent or every agent, and not for other agents' changes: a commit
/// of 1,000 entries for 1,000 agents wakes those 1,000 streams, not all
/// 10,000 (which cost more than the commit itself).
#[derive(Debug)]
pub struct Wake {
    agent: watch::Receiver<u64>,
    everyone: watch::Receiver<u64>,
}

impl Wake {
    /// Waits until a change for this stream's agent or for every agent
    /// has been taken in since the last wake (or since the subscription:
    /// one taken in before the stream read the feed may wake it once for
    /// nothing, never the reverse). False once the feed is gone.
    pub async fn changed(&mut self) -> bool {
        tokio::select! {
            changed = self.agent.changed() => changed.is_ok(),
            changed = self.everyone.changed() => changed.is_ok(),
        }
    }
}

/// Recent changes of the log, shared by every Sync stream.
#[derive(Debug)]
pub struct ChangeFeed {
    window: RwLock<Window>,
    /// The last revision in the window (or the store's at start).
    latest: AtomicU64,
    /// Per agent with a stream open: the last revision taken in that
    /// concerns it. Senders whose streams are all gone are dropped as the
    /// feed takes in changes.
    agent_wakes: std::sync::Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The last revision taken in that concerns every agent.
    everyone_wake: watch::Sender<u64>,
    /// The CRLs in force as of at least `latest`, read once for all streams.
    crls: RwLock<Arc<Vec<Vec<u8>>>>,
    /// Why the last read of the store failed; `None` once a read succeeds.
    store_error: RwLock<Option<String>>,
}

impl ChangeFeed {
    /// An empty feed starting after `revision`, with the CRLs then in force.
    pub fn new(revision: u64, crls: Vec<Vec<u8>>) -> Self {
        Self {
            window: RwLock::new(Window::default()),
            latest: AtomicU64::new(revision),
            agent_wakes: Default::default(),
            everyone_wake: watch::channel(revision).0,
            crls: RwLock::new(Arc::new(crls)),
            store_error: RwLock::new(None),
        }
    }

    /// Why the feed's last read of the store failed, if it did (a shared
    /// datastore is read at least every second, so this is current).
    pub fn store_error(&self) -> Option<String> {
        self.store_error.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_store_error(&self, error: Option<String>) {
        *self.store_error.write().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The CRLs in force, at least as new as every change the feed holds.
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.crls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wakes when the feed holds newer changes for `agent` or for every
    /// agent. Subscribe before reading the feed: a change taken in after
    /// the subscription wakes it.
    pub fn subscribe(&self, agent: &str) -> Wake {
        let mut wakes = self.agent_wakes.lock().unwrap_or_else(|e| e.into_inner());
        let latest = self.latest();
        let agent = wakes.entry(agent.to_string()).or_insert_with(|| watch::channel(latest).0);
        Wake { agent: agent.subscribe(), everyone: self.everyone_wake.subscribe() }
    }

    /// The last revision the feed holds (or the store's at start).
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// Wakes the streams the changes just taken in concern (after the
    /// window holds them, so that a woken stream finds them), and drops
    /// the wakes of agents whose streams are all gone.
    fn wake(&self, changes: &[Arc<FedChange>]) {
        let Some(last) = changes.last().map(|c| c.change.revision) else { return };
        let mut wakes = self.agent_wakes.lock().unwrap_or_else(|e| e.into_inner());
        wakes.retain(|_, wake| !wake.is_closed());
        let mut everyone = false;
        for fed in changes {
            match concerns(&fed.change.kind) {
                Some(agents) => {
                    for agent in agents {
                        if let Some(wake) = wakes.get(agent) {
                            wake.send_replace(fed.change.revision);
                        }
                    }
                }
                None => everyone = true,
            }
        }
        drop(wakes);
        if everyone {
            self.everyone_wake.send_replace(last);
        }
    }

    /// The changes after `revision` that concern `agent` or every agent,
    /// up to `limit`, if the window covers them; `None` when the stream
    /// must read the store. Costs the changes found, not the window's size.
    pub fn for_agent(&self, agent: &str, revision: u64, limit: usize) -> Option<ForAgent> {
        let window = self.window.read().unwrap_or_else(|e| e.into_inner());
        let latest = self.latest();
        if revision >= latest {
            return Some(ForAgent { changes: Vec::new(), covered: revision });
        }
        let first = window.changes.front()?.change.revision;
        if revision + 1 < first {
            return None;
        }
        // The first `limit` of each list after `revision`; the lists are
        // disjoint (a change concerns named agents or everyone), so the
        // page is the first `limit` of both in revision order.
        let after = |revisions: &VecDeque<u64>| {
            let start = revisions.partition_point(|r| *r <= revision);
            revisions.range(start..).take(limit).copied().collect::<Vec<u64>>()
        };
        let mut picked = window.by_agent.get(agent).map(after).unwrap_or_default();
        picked.extend(after(&window.everyone));
        picked.sort_unstable();
        picked.truncate(limit);
        let back = window.changes.back().map_or(latest, |c| c.change.revision);
        // A full page covers up to its last change; else everything held.
        let covered = if picked.len() == limit { picked[limit - 1] } else { back };
        let changes = picked.iter().map(|r| window.changes[(r - first) as usize].clone()).collect();
        Some(ForAgent { changes, covered })
    }

    /// Tails the store's log until `shutdown`. `on_changes` sees each batch
    /// of changes (on a blocking thread) before any stream does: the server
    /// takes in other servers' CAs and CRLs there.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
        on_changes: ChangeHook,
    ) {
        let mut wake = store.subscribe();
        loop {
            let after = self.latest();
            let reader = store.clone();
            let read =
                tokio::task::spawn_blocking(move || reader.changes_since(after, READ_PAGE)).await;
            if matches!(read, Ok(Ok(_))) {
                self.set_store_error(None);
            }
            let changes = match read {
                // CRLs change only with a `Crls` change (a revoking commit
                // logs one too): read them once, before streams see it.
                Ok(Ok(changes)) if changes.iter().any(|c| matches!(c.kind, ChangeKind::Crls)) => {
                    let reader = store.clone();
                    match tokio::task::spawn_blocking(move || reader.crls()).await {
                        Ok(Ok(crls)) => {
                            *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(crls);
                            changes
                        }
                        _ => {
                            warn!("reading the CRLs failed; retrying");
                            Vec::new()
                        }
                    }
                }
                Ok(Ok(changes)) => changes,
                Ok(Err(StoreError::ChangesTrimmed { start, .. })) => {
                    self.skip_to(start - 1, &store, &on_changes).await;
                    continue;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the change log failed; retrying");
                    self.set_store_error(Some(e.to_string()));
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "change log reader failed; retrying");
                    Vec::new()
                }
            };
            if !changes.is_empty() {
                let (hook, reader, batch) = (on_changes.clone(), store.clone(), changes.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || hook(&*reader, &batch)).await {
                    warn!(error = %e, "change hook failed");
                }
            }
            if let Some(last) = changes.last().map(|c| c.revision) {
                let fed: Vec<_> =
                    with_entries(&store, changes).await.into_iter().map(Arc::new).collect();
                let mut window = self.window.write().unwrap_or_else(|e| e.into_inner());
                for change in &fed {
                    window.push(change.clone());
                }
                window.trim(std::time::Instant::now());
                drop(window);
                self.latest.store(last, Ordering::Release);
                self.wake(&fed);
                continue;
            }
            // Quiet: changes age out of the window all the same.
            self.window.write().unwrap_or_else(|e| e.into_inner()).trim(std::time::Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = wake.changed() => if changed.is_err() { return },
                // A failed read is retried without waiting for the next commit.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

impl ChangeFeed {
    /// The log no longer holds the changes after the feed's last (the feed
    /// fell further behind than the log keeps): the feed goes on after
    /// `revision` with an empty window. Streams behind it read the store,
    /// are told the log was trimmed, and connect again for a snapshot (with
    /// every revocation in force). The server's hook is shown what it may
    /// have missed as it is now: the CAs, the CRLs, and every X.509
    /// revocation in force (so that it re-signs its own CRLs).
    async fn skip_to(&self, revision: u64, store: &Arc<dyn Store>, on_changes: &ChangeHook) {
        warn!(
            revision,
            "the change log was trimmed past the feed; streams behind it get snapshots"
        );
        let (hook, reader) = (on_changes.clone(), store.clone());
        let read = tokio::task::spawn_blocking(move || {
            let serials: Vec<String> = reader
                .revocations()?
                .into_iter()
                .map(|r| r.serial)
                .filter(|serial| !serial.is_empty())
                .collect();
            let mut now = vec![ChangeKind::Bundle, ChangeKind::Crls];
            if !serials.is_empty() {
                now.push(ChangeKind::Revoked { serials, jwts: Vec::new() });
            }
            let now: Vec<Change> = now.into_iter().map(|kind| Change { revision, kind }).collect();
            hook(&*reader, &now);
            reader.crls()
        })
        .await;
        if let Ok(Ok(crls)) = read {
            *self.crls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(crls);
        }
        *self.window.write().unwrap_or_else(|e| e.into_inner()) = Window::default();
        self.latest.store(revision, Ordering::Release);
        self.everyone_wake.send_replace(revision);
    }
}

/// The changes, each entry change with its entry read now, all in one
/// read (one round trip to a network database, not one per stream).
async fn with_entries(store: &Arc<dyn Store>, changes: Vec<Change>) -> Vec<FedChange> {
    let ids: Vec<String> = changes
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::Entry { entry_id, .. } => Some(entry_id.clone()),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut current = std::collections::HashMap::new();
    let read_at = Some(std::time::Instant::now());
    if !ids.is_empty() {
        let reader = store.clone();
        match tokio::task::spawn_blocking(move || {
            let entries = reader.entries(&ids)?;
            Ok::<_, crate::store::StoreError>(ids.into_iter().zip(entries).collect())
        })
        .await
        {
            Ok(Ok(read)) => current = read,
            // The streams read the entries themselves.
            Ok(Err(e)) => warn!(error = %e, "reading changed entries failed"),
            Err(e) => warn!(error = %e, "entry reader failed"),
        }
    }
    changes
        .into_iter()
        .map(|change| {
            let entry = match &change.kind {
                ChangeKind::Entry { entry_id, .. } => current.get(entry_id).cloned(),
                _ => None,
            };
            FedChange { change, entry, read_at }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: u64) -> Arc<FedChange> {
        Arc::new(FedChange::bare(Change { revision, kind: ChangeKind::Bundle }))
    }

    fn entry_change(revision: u64, parents: &[&str]) -> Arc<FedChange> {
        Arc::new(FedChange::bare(Change {
            revision,
            kind: ChangeKind::Entry {
                entry_id: format!("e{revision}"),
                parents: parents.iter().map(|p| p.to_string()).collect(),
            },
        }))
    }

    fn revisions(got: &ForAgent) -> Vec<u64> {
        got.changes.iter().map(|c| c.change.revision).collect()
    }

    /// A stream reads its agent's changes and everyone's, in log order,
    /// never another agent's; the revision it covers is the window's end
    /// (or a full page's last change).
    #[test]
    fn a_stream_reads_only_what_concerns_its_agent_in_order() {
        let feed = ChangeFeed::new(10, Vec::new());
        let empty = feed.for_agent("a", 10, 100).unwrap();
        assert_eq!((empty.changes.len(), empty.covered), (0, 10), "nothing newer yet");
        {
            let mut window = feed.window.write().unwrap();
            window.push(entry_change(11, &["a"]));
            window.push(entry_change(12, &["b"]));
            window.push(change(13));
            window.push(entry_change(14, &["b", "a"]));
            window.push(entry_change(15, &["a", "a"]));
            window.push(Arc::new(FedChange::bare(Change {
                revision: 16,
                kind: ChangeKind::AgentBanned { agent_id: "b".into(), reason: "r".into() },
            })));
            window.push(entry_change(17, &["c"]));
        }
        feed.latest.store(17, Ordering::Release);
        let a = feed.for_agent("a", 10, 100).unwrap();
        assert_eq!((revisions(&a), a.covered), (vec![11, 13, 14, 15], 17));
        let b = feed.for_agent("b", 12, 100).unwrap();
        assert_eq!((revisions(&b), b.covered), (vec![13, 14, 16], 17));
        let page = feed.for_agent("a", 10, 2).unwrap();
        assert_eq!((revisions(&page), page.covered), (vec![11, 13], 13), "a full page");
        let nobody = feed.for_agent("z", 10, 100).unwrap();
        assert_eq!((revisions(&nobody), nobody.covered), (vec![13], 17));
        assert_eq!(feed.for_agent("a", 17, 100).unwrap().covered, 17, "current");
        // The window drops its oldest changes, and their index with them.
        {
            let mut window = feed.window.write().unwrap();
            for _ in 0..4 {
                window.pop();
            }
            assert_eq!(window.by_agent["c"], [17]);
            assert_eq!(window.by_agent["b"], [16]);
            assert_eq!(window.by_agent["a"], [15]);
            assert!(window.everyone.is_empty());
        }
        assert!(feed.for_agent("a", 10, 100).is_none(), "older than the window");
        assert_eq!(revisions(&feed.for_agent("a", 14, 100).unwrap()), [15]);
    }

    /// The window holds no change taken in more than [`FEED_MAX_AGE`] ago
    /// (however few it holds), nor more than [`FEED_WINDOW`] changes; a
    /// stream behind what it holds reads the store.
    #[test]
    fn the_window_is_bounded_by_age_and_by_count() {
        let now = std::time::Instant::now();
        let aged = |revision: u64, parents: &[&str], age_secs: u64| {
            let mut fed = Arc::into_inner(entry_change(revision, parents)).unwrap();
            fed.read_at = Some(now - Duration::from_secs(age_secs));
            Arc::new(fed)
        };
        let feed = ChangeFeed::new(10, Vec::new());
        {
            let mut window = feed.window.write().unwrap();
            window.push(aged(11, &["a"], FEED_MAX_AGE.as_secs() + 5));
            window.push(aged(12, &["b"], FEED_MAX_AGE.as_secs() + 1));
            window.push(aged(13, &["a"], 3));
            window.trim(now);
            assert_eq!(window.changes.len(), 1, "the two older than the age bound are gone");
            assert!(!window.by_agent.contains_key("b"), "with their index");
            assert_eq!(window.by_agent["a"], [13]);
        }
        feed.latest.store(13, Ordering::Release);
        assert!(feed.for_agent("a", 10, 100).is_none(), "behind the window: read the store");
        assert_eq!(revisions(&feed.for_agent("a", 12, 100).unwrap()), [13]);
        {
            let mut window = feed.window.write().unwrap();
            for revision in 14..14 + FEED_WINDOW as u64 {
                window.push(aged(revision, &["c"], 0));
            }
            window.trim(now);
            assert_eq!(window.changes.len(), FEED_WINDOW, "the count bound");
            assert_eq!(window.changes.front().unwrap().change.revision, 14);
            assert!(!window.by_agent.contains_key("a"));
        }
    }

    /// A feed further behind than the log keeps goes on from the log's
    /// start: its window emptied, the server shown the CAs and CRLs as
    /// they are, every stream woken (and one behind told to resync).
    #[tokio::test]
    async fn a_feed_behind_the_trimmed_log_goes_on_from_its_start() {
        use crate::store::{Audit, KvStore};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(KvStore::open(dir.path()).unwrap());
        for _ in 0..30 {
            store.log_bundle_change(&Audit::quiet()).unwrap();
        }
        store.trim_changes(5, 0).unwrap();
        assert_eq!(store.changes_start().unwrap(), 26);
        let feed = Arc::new(ChangeFeed::new(2, Vec::new()));
        feed.window.write().unwrap().push(change(2));
        let mut wake = feed.subscribe("a");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: ChangeHook = {
            let seen = seen.clone();
            Arc::new(move |_: &dyn Store, changes: &[Change]| {
                seen.lock().unwrap().extend(changes.iter().map(|c| c.revision));
            })
        };
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(feed.clone().run(store.clone(), shutdown.clone(), hook));
        assert!(woken(&mut wake).await, "streams are woken");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while feed.latest() < 30 {
            assert!(std::time::Instant::now() < deadline, "the feed is stuck at {}", feed.latest());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(feed.for_agent("a", 3, 100).is_none(), "behind the window: the store says trimmed");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[..2], [25, 25], "the CAs and CRLs as of the log's start");
        assert_eq!(seen[2..], (26..=30).collect::<Vec<_>>(), "then every change it holds");
        shutdown.cancel();
        running.await.unwrap();
    }

    async fn woken(wake: &mut Wake) -> bool {
        tokio::time::timeout(Duration::from_millis(50), wake.changed()).await.is_ok()
    }

    /// A change wakes the streams of the agents it names, and every stream
    /// for a change that concerns everyone, no other; the wake of an agent
    /// whose streams are all gone is dropped.
    #[tokio::test]
    async fn a_change_wakes_only_the_streams_it_concerns() {
        let feed = ChangeFeed::new(10, Vec::new());
        let (mut a, mut b, mut a2) =
            (feed.subscribe("a"), feed.subscribe("b"), feed.subscribe("a"));
        feed.wake(&[entry_change(11, &["a"])]);
        assert!(woken(&mut a).await && woken(&mut a2).await, "both of a's streams");
        assert!(!woken(&mut b).await, "not b's");
        assert!(!woken(&mut a).await, "once per change");
        feed.wake(&[entry_change(12, &["c"])]);
        assert!(!woken(&mut a).await && !woken(&mut b).await, "nobody's but c's");
        feed.wake(&[entry_change(13, &["c"]), change(14)]);
        assert!(woken(&mut a).await && woken(&mut b).await, "a change for everyone");
        feed.wake(&[entry_change(15, &["b", "a"])]);
        assert!(woken(&mut a).await && woken(&mut b).await, "an entry moved from b to a");
        drop((a, a2));
        feed.wake(&[entry_change(16, &["b"])]);
        assert!(woken(&mut b).await);
        let wakes = feed.agent_wakes.lock().unwrap();
        assert!(wakes.contains_key("b") && !wakes.contains_key("a"), "a's wake dropped");
    }
}
