//! Metrics and health over HTTP, shared by `tessera-server` and
//! `tessera-agent` (compiled into both crates): the event counters both
//! keep, and the small HTTP/1 server behind `--metrics-addr` with
//! `/metrics` (Prometheus text from the `prometheus-client` crate), `/live`
//! and `/ready`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tessera_proto::types::Event;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs of a metric family.
pub type Labels = Vec<(&'static str, String)>;

/// A latency histogram: 100 µs to about 3 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A family of latency histograms.
#[allow(dead_code)] // the agent has none
pub type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// A new family of latency histograms.
#[allow(dead_code)]
pub fn latency_family() -> LatencyFamily {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Counters every event moves: events by kind and decision, refusals by
/// kind and reason, anomalies by kind.
#[derive(Debug, Clone, Default)]
pub struct EventCounters {
    /// Events by kind and decision.
    pub events: Family<Labels, Counter>,
    /// Refusals (deny events) by kind and a reason class.
    pub refusals: Family<Labels, Counter>,
    /// Anomaly events by kind.
    pub anomalies: Family<Labels, Counter>,
    /// Requests refused for a rate or concurrency limit.
    pub rate_limited: Counter,
}

impl EventCounters {
    /// Registers the counters under `prefix` (`tessera_server`, `tessera_agent`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("events", "Events recorded, by kind and decision", self.events.clone());
        registry.register(
            "refusals",
            "Refusals, by event kind and reason (numbers and IDs left out)",
            self.refusals.clone(),
        );
        registry.register("anomalies", "Anomaly events, by kind", self.anomalies.clone());
        registry.register(
            "rate_limited",
            "Requests refused for a rate, connection or stream limit",
            self.rate_limited.clone(),
        );
    }

    /// Counts one event. Labels hold only values from fixed sets: the
    /// event's kind (one of `kind::ALL`), its decision and its code (a
    /// typed refusal or gRPC code); the reason's words, which may be an
    /// operator's free text or name a serial, stay in the event.
    pub fn count(&self, e: &Event) {
        self.count_all(std::slice::from_ref(e));
    }

    /// Counts `events`, each as [`count`](Self::count) does; a run of
    /// events of one kind and decision (a signing batch's issuances) looks
    /// its counter up once.
    pub fn count_all(&self, events: &[Event]) {
        let mut run: Option<(&Event, u64)> = None;
        for e in events {
            match &mut run {
                Some((first, n)) if first.kind == e.kind && first.decision == e.decision => {
                    *n += 1;
                }
                _ => {
                    if let Some((first, n)) = run.replace((e, 1)) {
                        self.count_run(first, n);
                    }
                }
            }
            self.count_refusal(e);
        }
        if let Some((first, n)) = run {
            self.count_run(first, n);
        }
    }

    /// `n` events of `e`'s kind and decision.
    fn count_run(&self, e: &Event, n: u64) {
        let kind = crate::event_schema::kind::bounded(&e.kind).to_string();
        let decision = match e.decision.as_str() {
            d @ ("allow" | "deny" | "") => d.to_string(),
            _ => "other".to_string(),
        };
        self.events.get_or_create(&vec![("kind", kind), ("decision", decision)]).inc_by(n);
    }

    /// A refusal's and an anomaly's own counters.
    fn count_refusal(&self, e: &Event) {
        let kind = || crate::event_schema::kind::bounded(&e.kind).to_string();
        if e.decision == "deny" {
            let code = if e.code.is_empty() {
                "unspecified"
            } else {
                crate::event_schema::bounded_code(&e.code)
            };
            if matches!(code, "rate-limited" | "resource-exhausted") {
                self.rate_limited.inc();
            }
            self.refusals
                .get_or_create(&vec![("kind", kind()), ("reason", code.to_string())])
                .inc();
        }
        if e.kind.starts_with("anomaly.") {
            self.anomalies.get_or_create(&vec![("kind", kind())]).inc();
        }
    }
}

/// What the HTTP endpoints ask the process.
pub trait Health: Send + Sync + 'static {
    /// The metrics in Prometheus text form (refreshing any gauge read at scrape time).
    fn metrics(&self) -> String;
    /// `Ok` when ready to serve; otherwise why not.
    fn ready(&self) -> Result<(), String>;
}

/// Encodes a registry as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, health: Arc<dyn Health>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(answer(&req, health.as_ref())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn answer<B>(req: &Request<B>, health: &dyn Health) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if req.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics(),
        ),
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match health.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n"))
            }
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /live or /ready\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An agent pushes its events as it likes (the server counts them
    /// too): codes shaped like codes, and kinds, that are no real ones all
    /// land in `other`, so a caller cannot add label values without bound.
    #[test]
    fn made_up_codes_and_kinds_add_no_label_values() {
        let counters = EventCounters::default();
        let mut registry = Registry::default();
        counters.register(&mut registry);
        for i in 0..500 {
            let e = Event {
                kind: if i % 2 == 0 { "workload.x509".into() } else { format!("workload.k{i}") },
                decision: "deny".into(),
                code: format!("made-up-{i}"),
                ..Default::default()
            };
            counters.count(&e);
        }
        counters.count(&Event {
            kind: "workload.x509".into(),
            decision: "deny".into(),
            code: "permission-denied".into(),
            ..Default::default()
        });
        let text = encode(&registry);
        let series = text.lines().filter(|l| l.contains("refusals_total{")).count();
        assert!(series <= 3, "{text}");
        assert!(text.contains("reason=\"other\""), "{text}");
        assert!(text.contains("reason=\"permission-denied\""), "{text}");
        assert!(!text.contains("made-up"), "{text}");
    }

    /// A batch counted at once ends where counting each one by one does.
    #[test]
    fn counting_a_batch_is_counting_each() {
        let event = |kind: &str, decision: &str| Event {
            kind: kind.into(),
            decision: decision.into(),
            code: "permission-denied".into(),
            ..Default::default()
        };
        let batch: Vec<Event> = [
            ("svid.jwt.issue", "allow"),
            ("svid.jwt.issue", "allow"),
            ("svid.jwt.issue", "deny"),
            ("svid.x509.issue", "deny"),
            ("svid.jwt.issue", "allow"),
            ("anomaly.unusual_audience", ""),
            ("anomaly.unusual_audience", ""),
            ("made.up", "maybe"),
        ]
        .iter()
        .map(|(k, d)| event(k, d))
        .collect();
        let text = |count: &dyn Fn(&EventCounters)| {
            let counters = EventCounters::default();
            let mut registry = Registry::default();
            counters.register(&mut registry);
            count(&counters);
            // Series print in the order of a hash map: compare them sorted.
            let mut lines: Vec<String> = encode(&registry).lines().map(String::from).collect();
            lines.sort();
            lines.join("\n")
        };
        let each = text(&|c| batch.iter().for_each(|e| c.count(e)));
        let at_once = text(&|c| c.count_all(&batch));
        assert_eq!(at_once, each);
        assert!(each.contains("decision=\"allow\"} 3"), "{each}");
    }
}
