//! The server's metrics (Prometheus, via `prometheus-client`), served by
//! `--metrics-addr` with `/live` and `/ready`.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_proto::types::Event;

use crate::telemetry::{self, EventCounters, Labels, LatencyFamily};

/// Every server metric. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    counters: EventCounters,
    /// SVIDs signed, by type (`x509`, `jwt`).
    issued: Family<Labels, Counter>,
    /// Time to answer one signing batch, by type.
    issue_seconds: LatencyFamily,
    /// Node attestations by outcome.
    attestations: Family<Labels, Counter>,
    attestation_seconds: Histogram,
    /// Open Sync streams.
    sync_streams: Gauge,
    /// Entry change read from the log → sent on an agent's Sync stream.
    push_seconds: Histogram,
    /// Revocation read from the log → sent on an agent's Sync stream.
    revocation_push_seconds: Histogram,
    /// Node API connections at once, by state (`unauthenticated`, `total`).
    node_connections: Family<Labels, Gauge>,
    /// Node API connections closed at accept, by the cap they were over.
    node_connections_refused: Family<Labels, Counter>,
    /// Attestations refused by the per-address rate limit.
    attestations_rate_limited: Counter,
    /// Events stored and pushed by agents.
    events_stored: Counter,
    events_ingested_: Counter,
    // Read at scrape time.
    ca_expiry: Gauge<i64, AtomicI64>,
    jwt_key_expiry: Gauge<i64, AtomicI64>,
    entries: Gauge<i64, AtomicI64>,
    pending: Gauge<i64, AtomicI64>,
    agents: Gauge<i64, AtomicI64>,
    revision: Gauge<i64, AtomicI64>,
    /// The allocator's live heap and resident pages.
    heap: tessera_common::heap::HeapGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A new set of metrics, registered under `tessera_server`.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("tessera_server");
        let counters = EventCounters::default();
        counters.register(registry);
        let inner = Inner {
            counters,
            issued: Family::default(),
            issue_seconds: telemetry::latency_family(),
            attestations: Family::default(),
            attestation_seconds: telemetry::latency_histogram(),
            sync_streams: Gauge::default(),
            push_seconds: telemetry::latency_histogram(),
            revocation_push_seconds: telemetry::latency_histogram(),
            node_connections: Family::default(),
            node_connections_refused: Family::default(),
            attestations_rate_limited: Counter::default(),
            events_stored: Counter::default(),
            events_ingested_: Counter::default(),
            ca_expiry: Gauge::default(),
            jwt_key_expiry: Gauge::default(),
            entries: Gauge::default(),
            pending: Gauge::default(),
            agents: Gauge::default(),
            revision: Gauge::default(),
            heap: Default::default(),
            registry: Registry::default(),
        };
        inner.heap.register(registry);
        registry.register("svids_issued", "SVIDs signed, by type", inner.issued.clone());
        registry.register(
            "svid_issue_seconds",
            "Time to answer one signing batch, by SVID type",
            inner.issue_seconds.clone(),
        );
        registry.register(
            "node_attestations",
            "Node attestations, by outcome",
            inner.attestations.clone(),
        );
        registry.register(
            "node_attestation_seconds",
            "Time to answer a node attestation",
            inner.attestation_seconds.clone(),
        );
        registry.register(
            "node_connections",
            "Node API connections open, by state (unauthenticated: handshaking or certless)",
            inner.node_connections.clone(),
        );
        registry.register(
            "node_connections_refused",
            "Node API connections closed at accept, by the cap they were over",
            inner.node_connections_refused.clone(),
        );
        registry.register(
            "node_attestations_rate_limited",
            "Attestations refused by the per-address rate limit",
            inner.attestations_rate_limited.clone(),
        );
        registry.register("sync_streams", "Open agent Sync streams", inner.sync_streams.clone());
        registry.register(
            "entry_push_delay_seconds",
            "An entry change, from its commit (read from the change log) to its agent's Sync stream",
            inner.push_seconds.clone(),
        );
        registry.register(
            "revocation_push_delay_seconds",
            "A revocation, from its commit (read from the change log) to each agent's Sync stream",
            inner.revocation_push_seconds.clone(),
        );
        registry.register(
            "events_stored",
            "Events stored in the event log",
            inner.events_stored.clone(),
        );
        registry.register(
            "events_ingested",
            "Events pushed by agents and stored",
            inner.events_ingested_.clone(),
        );
        registry.register(
            "ca_expiry_seconds",
            "Seconds until the active CA expires",
            inner.ca_expiry.clone(),
        );
        registry.register(
            "jwt_key_expiry_seconds",
            "Seconds until the active JWT signing key expires",
            inner.jwt_key_expiry.clone(),
        );
        registry.register("entries", "Registration entries", inner.entries.clone());
        registry.register("pending_entries", "Entries waiting for approval", inner.pending.clone());
        registry.register("agents", "Attested agents", inner.agents.clone());
        registry.register("revision", "Latest change log revision", inner.revision.clone());
        let inner = Inner { registry: root, ..inner };
        Self { inner: Arc::new(inner) }
    }

    /// Counts a commit's events (and their kinds of refusal or anomaly);
    /// a signing batch's look their counter up once.
    pub fn events(&self, events: &[Event]) {
        self.inner.counters.count_all(events);
    }

    /// Counts events stored.
    pub fn stored(&self, n: usize) {
        self.inner.events_stored.inc_by(n as u64);
    }

    /// Counter of events pushed by agents.
    pub fn events_ingested(&self) -> &Counter {
        &self.inner.events_ingested_
    }

    /// A signing batch answered: `signed` SVIDs of `kind`, in `seconds`.
    pub fn issued(&self, kind: &'static str, signed: usize, seconds: f64) {
        let labels = vec![("type", kind.to_string())];
        self.inner.issued.get_or_create(&labels).inc_by(signed as u64);
        self.inner.issue_seconds.get_or_create(&labels).observe(seconds);
    }

    /// A node attestation answered.
    pub fn attestation(&self, ok: bool, seconds: f64) {
        let outcome = if ok { "ok" } else { "refused" };
        self.inner.attestations.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
        self.inner.attestation_seconds.observe(seconds);
    }

    /// Node API connections open now: unauthenticated ones and all.
    pub fn node_connections(&self, unauthenticated: usize, total: usize) {
        let family = &self.inner.node_connections;
        family
            .get_or_create(&vec![("state", "unauthenticated".into())])
            .set(unauthenticated as i64);
        family.get_or_create(&vec![("state", "total".into())]).set(total as i64);
    }

    /// A node API connection closed at accept, over the cap `cap`.
    pub fn node_connection_refused(&self, cap: &'static str) {
        self.inner.node_connections_refused.get_or_create(&vec![("cap", cap.to_string())]).inc();
    }

    /// An attestation refused by the per-address rate limit.
    pub fn attestation_rate_limited(&self) {
        self.inner.attestations_rate_limited.inc();
    }

    /// The open Sync streams gauge.
    pub fn sync_streams(&self) -> &Gauge {
        &self.inner.sync_streams
    }

    /// A change sent on a Sync stream `seconds` after the feed read it.
    pub fn pushed(&self, revocation: bool, seconds: f64) {
        if revocation {
            self.inner.revocation_push_seconds.observe(seconds);
        } else {
            self.inner.push_seconds.observe(seconds);
        }
    }

    /// Sets the gauges read at scrape time and encodes everything.
    pub fn render(&self, gauges: &ScrapeGauges) -> String {
        let inner = &self.inner;
        inner.ca_expiry.set(gauges.ca_expires_in);
        inner.jwt_key_expiry.set(gauges.jwt_key_expires_in);
        inner.entries.set(gauges.entries as i64);
        inner.pending.set(gauges.pending as i64);
        if let Some(agents) = gauges.agents {
            inner.agents.set(agents as i64);
        }
        if let Some(revision) = gauges.revision {
            inner.revision.set(revision as i64);
        }
        inner.heap.refresh();
        telemetry::encode(&inner.registry)
    }
}

/// What the server reads at scrape time (`None`: the store did not answer).
#[derive(Debug, Clone, Default)]
pub struct ScrapeGauges {
    /// Seconds until the active CA expires.
    pub ca_expires_in: i64,
    /// Seconds until the active JWT key expires.
    pub jwt_key_expires_in: i64,
    /// Entries.
    pub entries: usize,
    /// Proposals waiting.
    pub pending: usize,
    /// Agents.
    pub agents: Option<usize>,
    /// The change log's revision.
    pub revision: Option<u64>,
}
