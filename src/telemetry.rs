//! Logs and metrics.
//!
//! Logs are `tracing` events: human-readable on a terminal, JSON lines otherwise. They
//! name parties by endpoint id and short VeraId digests, never by VeraId, key or body.
//! Metrics live in a [`Metrics`] registry owned by the app (not a global), exposed in
//! Prometheus/OpenMetrics text format on `GET /metrics`.

use std::io::IsTerminal;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global log subscriber. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second initialisation (as in tests) keeps the first subscriber.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

type Labels = Vec<(String, String)>;

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    matches: Counter,
    completions: Counter,
    replaced_other_endpoint: Counter,
    deliveries: Family<Labels, Counter>,
    outbox_depth: Gauge,
    outbox_oldest_age: Gauge,
    pending_requests: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("letro");
        let events = Family::<Labels, Counter>::default();
        registry.register(
            "events",
            "Incoming events by service message type and outcome",
            events.clone(),
        );
        let refusals = Family::<Labels, Counter>::default();
        registry.register(
            "refusals",
            "Incoming messages refused (acknowledged, not acted on) by reason",
            refusals.clone(),
        );
        let matches = Counter::default();
        registry.register(
            "matches",
            "Pairs matched (two match messages each)",
            matches.clone(),
        );
        let completions = Counter::default();
        registry.register(
            "completions",
            "Pairing authorisations forwarded as completions",
            completions.clone(),
        );
        let replaced_other_endpoint = Counter::default();
        registry.register(
            "replaced_other_endpoint",
            "Pairing requests for a waiting pair from a different endpoint (possible hijack attempts), whether they replaced it or were refused",
            replaced_other_endpoint.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "outbox_deliveries",
            "Outbox delivery attempts by result (delivered, retry, dropped)",
            deliveries.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Messages waiting in the outbox",
            outbox_depth.clone(),
        );
        let outbox_oldest_age = Gauge::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox",
            outbox_oldest_age.clone(),
        );
        let pending_requests = Gauge::default();
        registry.register(
            "pending_requests",
            "Pairing requests waiting for their reverse half",
            pending_requests.clone(),
        );
        Self {
            registry,
            events,
            refusals,
            matches,
            completions,
            replaced_other_endpoint,
            deliveries,
            outbox_depth,
            outbox_oldest_age,
            pending_requests,
        }
    }

    /// Counts an incoming event of `content_type` with `outcome`.
    pub fn event(&self, content_type: &str, outcome: &str) {
        self.events
            .get_or_create(&vec![
                ("content_type".into(), content_type.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
    }

    /// Counts a refusal.
    pub fn refusal(&self, reason: &str) {
        self.refusals
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Counts a matched pair.
    pub fn matched(&self) {
        self.matches.inc();
    }

    /// Counts a forwarded completion.
    pub fn completed(&self) {
        self.completions.inc();
    }

    /// Counts a pending request replaced from another endpoint.
    pub fn replaced_other_endpoint(&self) {
        self.replaced_other_endpoint.inc();
    }

    /// Counts a delivery attempt's result: `delivered`, `retry` or `dropped`.
    pub fn delivery(&self, result: &str) {
        self.deliveries
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }

    /// Sets the gauges read from the store.
    pub fn set_store_gauges(&self, outbox_depth: u64, oldest_age_secs: u64, pending: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.outbox_depth.set(g(outbox_depth));
        self.outbox_oldest_age.set(g(oldest_age_secs));
        self.pending_requests.set(g(pending));
    }

    /// The metrics in OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
