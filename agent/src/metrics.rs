//! The agent's metrics (Prometheus, via `prometheus-client`), served by
//! `--metrics-addr` with `/live` and `/ready`.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_proto::types::Event;

use crate::health::{Health, HealthProbe};
use crate::node::link::NodeLink;
use crate::svid::cache::Cache;
use crate::telemetry::{self, EventCounters, Labels};

/// Every agent metric. Cloning shares them.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    counters: EventCounters,
    requests: Family<Labels, Counter>,
    attestations: Family<Labels, Counter>,
    attestation_seconds: Histogram,
    spool_events: Gauge,
    spool_bytes: Gauge,
    spool_dropped: Counter,
    refusals_folded: Counter,
    repeats_folded: Counter,
    push_failures: Counter,
    synced: Gauge,
    svids: Gauge,
    svid_expiry: Gauge<i64, AtomicI64>,
    /// The allocator's live heap and resident pages.
    heap: tessera_common::heap::HeapGauges,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A new set of metrics, registered under `tessera_agent`.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("tessera_agent");
        let counters = EventCounters::default();
        counters.register(registry);
        let requests = Family::<Labels, Counter>::default();
        let attestations = Family::<Labels, Counter>::default();
        let attestation_seconds = telemetry::latency_histogram();
        let (spool_events, spool_bytes) = (Gauge::default(), Gauge::default());
        let (spool_dropped, push_failures) = (Counter::default(), Counter::default());
        let (refusals_folded, repeats_folded) = (Counter::default(), Counter::default());
        let (synced, svids) = (Gauge::default(), Gauge::default());
        let svid_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "workload_api_requests",
            "Workload API requests, by method and outcome",
            requests.clone(),
        );
        registry.register(
            "workload_attestations",
            "Workload API connections attested, by how: full (read from /proc) or shared (another connection's of the same process)",
            attestations.clone(),
        );
        registry.register(
            "workload_attestation_seconds",
            "Time to attest a Workload API caller (selectors, executable hash)",
            attestation_seconds.clone(),
        );
        registry.register(
            "event_spool_events",
            "Events spooled, not yet stored by the server",
            spool_events.clone(),
        );
        registry.register(
            "event_spool_bytes",
            "Bytes of events spooled, not yet stored by the server",
            spool_bytes.clone(),
        );
        registry.register(
            "event_spool_dropped",
            "Events not recorded because the spool was full, or lost to a damaged spool record",
            spool_dropped.clone(),
        );
        registry.register(
            "workload_refusals_folded",
            "Workload API refusals folded into a per-uid summary event instead of one event each",
            refusals_folded.clone(),
        );
        registry.register(
            "workload_repeats_folded",
            "Workload API answers identical to one already recorded in the interval, folded into one event",
            repeats_folded.clone(),
        );
        registry.register(
            "event_push_failures",
            "Failed pushes of events to the server",
            push_failures.clone(),
        );
        registry.register(
            "synced",
            "1 when the agent holds a complete, current sync",
            synced.clone(),
        );
        registry.register("x509_svids", "X509-SVIDs held for workloads", svids.clone());
        let heap = tessera_common::heap::HeapGauges::default();
        heap.register(registry);
        registry.register(
            "agent_svid_expiry_seconds",
            "Seconds until the agent's own X509-SVID expires",
            svid_expiry.clone(),
        );
        let inner = Inner {
            registry: root,
            counters,
            requests,
            attestations,
            attestation_seconds,
            spool_events,
            spool_bytes,
            spool_dropped,
            refusals_folded,
            repeats_folded,
            push_failures,
            synced,
            svids,
            svid_expiry,
            heap,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Counts an event.
    pub fn event(&self, e: &Event) {
        self.inner.counters.count(e);
    }

    /// A Workload API request answered.
    pub fn request(&self, method: &str, outcome: &str) {
        self.inner
            .requests
            .get_or_create(&vec![("method", method.to_string()), ("outcome", outcome.to_string())])
            .inc();
    }

    /// A Workload API connection attested `how` (`full` or `shared`).
    pub fn attestation(&self, how: &str) {
        self.inner.attestations.get_or_create(&vec![("how", how.to_string())]).inc();
    }

    /// A caller attested in `seconds`.
    pub fn attested(&self, seconds: f64) {
        self.inner.attestation_seconds.observe(seconds);
    }

    /// The spool holds `events` events of `bytes` bytes.
    pub fn spool_depth(&self, events: usize, bytes: u64) {
        self.inner.spool_events.set(events as i64);
        self.inner.spool_bytes.set(bytes as i64);
    }

    /// An event was not spooled (spool full), or was found damaged in it.
    pub fn spool_dropped(&self) {
        self.inner.spool_dropped.inc();
    }

    /// `n` events found damaged in the spool when it was opened.
    pub fn spool_dropped_n(&self, n: u64) {
        self.inner.spool_dropped.inc_by(n);
    }

    /// A refusal was folded (not recorded on its own).
    pub fn refusal_folded(&self) {
        self.inner.refusals_folded.inc();
    }

    /// An answer repeating one already recorded was folded.
    pub fn repeat_folded(&self) {
        self.inner.repeats_folded.inc();
    }

    /// A push of events failed.
    pub fn push_failed(&self) {
        self.inner.push_failures.inc();
    }

    fn render(&self, cache: &Cache, link: &NodeLink) -> String {
        let state = cache.state();
        let inner = &self.inner;
        inner.synced.set(i64::from(state.ready));
        inner.svids.set(state.svids.len() as i64);
        inner.svid_expiry.set(link.identity().not_after - link.clock.now());
        inner.heap.refresh();
        telemetry::encode(&inner.registry)
    }
}

/// `/metrics` and `/ready` for the agent: ready unless
/// [`crate::health::decide`] calls it unhealthy (degraded is ready: the
/// cached SVIDs are served).
#[derive(Debug)]
pub struct AgentHealth {
    /// Metrics.
    pub metrics: AgentMetrics,
    /// The agent's state, set once the agent runs.
    pub parts: OnceLock<HealthProbe>,
}

impl telemetry::Health for AgentHealth {
    fn metrics(&self) -> String {
        match self.parts.get() {
            Some(probe) => self.metrics.render(&probe.cache, &probe.link),
            None => telemetry::encode(&self.metrics.inner.registry),
        }
    }

    fn ready(&self) -> Result<(), String> {
        let probe = self.parts.get().ok_or("agent is starting")?;
        match probe.assess() {
            Health::Unhealthy(why) => Err(why),
            Health::Healthy | Health::Degraded { .. } => Ok(()),
        }
    }
}
