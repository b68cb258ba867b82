//! Logs and metrics.
//!
//! Logs are `tracing` events: human-readable on a terminal, JSON lines otherwise. They
//! name parties by endpoint id and short VeraId digests, never by VeraId, key or body.
//! Metrics live in a [`Metrics`] registry owned by the app (not a global), exposed in
//! Prometheus/OpenMetrics text format on `GET /metrics`.

use std::borrow::Cow;
use std::io::IsTerminal;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::domain::Refusal;
use crate::domain::signed::FailureReason;

mod json;
mod lines;
mod process;
mod repeats;

pub use lines::LineGuard;
pub use repeats::{RepeatLevel, Repeated, Repeats};

/// `url` without its password (as `***`), for logs, errors and reports: the one in the
/// authority, and `password` or `sslpassword` in the query, which PostgreSQL URLs allow.
pub fn redacted_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let secret =
        |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
    if url.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// The most bytes of a value chosen by a client (a CloudEvent attribute, a raw header,
/// a redirect's `Location`) that a log line shows. It is the ingress's limit on `ce-id`
/// and `ce-source` (`codec::cloudevent::ATTRIBUTE_LIMITS`), so every id the server takes
/// is logged whole.
pub const LOGGED_VALUE_MAX: usize = 256;

/// `value` for a log line: whole up to [`LOGGED_VALUE_MAX`] bytes; beyond, its first
/// bytes (whole characters) followed by `…(truncated, N bytes)`.
pub fn clipped(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= LOGGED_VALUE_MAX {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut end = LOGGED_VALUE_MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}…(truncated, {} bytes)",
        value.get(..end).unwrap_or_default(),
        value.len()
    ))
}

/// Raw bytes (a header value that may not be UTF-8) for a log line, as [`clipped`]:
/// invalid UTF-8 shown as U+FFFD.
pub fn clipped_bytes(value: &[u8]) -> String {
    let shown = value.get(..LOGGED_VALUE_MAX).unwrap_or(value);
    let text = String::from_utf8_lossy(shown);
    if shown.len() == value.len() {
        text.into_owned()
    } else {
        format!("{text}…(truncated, {} bytes)", value.len())
    }
}

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

/// Where log lines go: `serve` writes them to stdout, as container platforms expect; the
/// admin commands print their reports on stdout, so their logs go to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Installs the global log subscriber. `RUST_LOG` filters (default `default_filter`).
/// Lines to stdout (the server's, one or more per request) are written by a thread of
/// their own, many per write: keep the guard until the end of `main`, whose drop writes
/// what is still waiting. Lines to stderr (the admin commands') are written at once.
#[must_use = "dropping the guard stops the log writer thread"]
pub fn init_logging(
    format: LogFormat,
    target: LogTarget,
    default_filter: &str,
) -> Option<LineGuard> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let terminal = match target {
        LogTarget::Stdout => std::io::stdout().is_terminal(),
        LogTarget::Stderr => std::io::stderr().is_terminal(),
    };
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let (writer, guard) = match target {
        LogTarget::Stdout => match lines::start(std::io::stdout) {
            Ok((lines, guard)) => (BoxMakeWriter::new(move || lines.clone()), Some(guard)),
            // No thread to be had: write each line directly.
            Err(_) => (BoxMakeWriter::new(std::io::stdout), None),
        },
        LogTarget::Stderr => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only where a terminal renders them, not in files or pipes.
        .with_ansi(terminal);
    // A second initialisation (as in tests) keeps the first subscriber.
    let installed = if json {
        builder
            .fmt_fields(json::SpanFields)
            .event_format(json::JsonLine)
            .try_init()
    } else {
        builder.try_init()
    };
    installed.ok().and(guard)
}

/// The id that ties one request's log lines together: the caller's `X-Request-Id`, else
/// the trace id of a W3C `traceparent`, else a fresh random one. Only printable ASCII
/// without quotes or spaces, at most 64 characters, so a client cannot forge log lines.
pub fn request_id(x_request_id: Option<&[u8]>, traceparent: Option<&[u8]>) -> String {
    let clean = |v: &[u8]| -> Option<String> {
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.iter()
                .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\');
        ok.then(|| String::from_utf8_lossy(v).into_owned())
    };
    if let Some(id) = x_request_id.and_then(clean) {
        return id;
    }
    // traceparent: version "-" trace-id (32 hex) "-" parent-id "-" flags.
    if let Some(trace_id) = traceparent
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter(|t| t.bytes().any(|b| b != b'0'))
    {
        return trace_id.to_ascii_lowercase();
    }
    let mut bytes = [0u8; 8];
    rand::fill(&mut bytes[..]);
    crate::domain::hex::lower(&bytes)
}

/// One label: its name and value. Label values are names from this code, not from clients
/// (so borrowed: counting a request allocates nothing), except a status code outside the
/// usual ones.
type Label = [(&'static str, Cow<'static, str>); 1];
type Histograms = Family<Label, Histogram, fn() -> Histogram>;

/// Buckets from 0.5 ms to 8 s, doubling: commits take about a millisecond, requests a few,
/// and anything near the 10 s timeouts is an incident.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Buckets from 0.125 ms to 8 s, doubling: a commit's sync takes a fraction of a
/// millisecond on a quiet disk.
fn disk_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000125, 2.0, 17))
}

/// The message kinds of the `content_type` label (`ServiceMessage::label`).
const MESSAGE_KINDS: [&str; 4] = [
    "pairing-request",
    "contact-pairing-request",
    "pairing-auth-tmp",
    "pairing-auth",
];

/// Every `outcome` of `letro_events_total`, by `content_type` (`src/http/messages.rs`,
/// `src/http/ingress.rs`).
const EVENT_OUTCOMES: &[(&str, &[&str])] = &[
    (
        "pairing-request",
        &[
            "stored",
            "matched",
            "duplicate",
            "refused",
            "at_ceiling",
            "unavailable",
        ],
    ),
    (
        "contact-pairing-request",
        &[
            "stored",
            "matched",
            "duplicate",
            "refused",
            "at_ceiling",
            "unavailable",
            "failed",
        ],
    ),
    (
        "pairing-auth-tmp",
        &["forwarded", "duplicate", "refused", "unavailable"],
    ),
    (
        "pairing-auth",
        &["forwarded", "duplicate", "refused", "unavailable"],
    ),
    ("unsupported", &["unsupported_type"]),
    (
        "unknown",
        &[
            "not_cloudevent",
            "wrong_type",
            "missing_subject",
            "invalid_subject",
            "missing_content_type",
            "attribute_too_long",
            "unreadable_body",
            "too_large",
            "body_timeout",
        ],
    ),
];

/// The `check` names of `veraid::VerifyError::check`.
const VERAID_CHECKS: [&str; 12] = [
    "format",
    "chain_format",
    "signature",
    "metadata",
    "service",
    "signature_period",
    "certificate_path",
    "certificate_period",
    "organisation_certificate",
    "veraid_record",
    "dnssec",
    "user_name",
];

/// Every `reason` of `letro_refusals_total`: the refusals of the domain, and the
/// ingress's `attribute_too_long`.
fn refusal_reasons() -> impl Iterator<Item = &'static str> {
    use Refusal::*;
    [
        TooLarge,
        NotUtf8,
        FieldCount,
        InvalidRequester,
        InvalidTarget,
        SelfPairing,
        KeyNotBase64,
        KeyNotSpki,
        KeyNotRsa,
        KeyNotSender,
        SenderPendingLimit,
        TargetPendingLimit,
        PendingCeiling,
        ReplacesOtherEndpoint,
        ParamsMalformed,
        NotIssuedBySender,
        PdaWithoutKeyIdentifier,
        PdaNotRsaPss,
        PdaSubjectNotRsa,
        IdentityKeyNotGranter,
        PdaSignatureInvalid,
        PdaExpired,
        PdaNotYetValid,
        BundleInvalid,
        NotAContactPairingRequest,
    ]
    .into_iter()
    .map(Refusal::as_str)
    .chain(["attribute_too_long"])
}

fn label(name: &'static str, value: &'static str) -> Label {
    [(name, Cow::Borrowed(value))]
}

type EventLabels = [(&'static str, Cow<'static, str>); 2];

fn event_labels(content_type: &'static str, outcome: &'static str) -> EventLabels {
    [
        ("content_type", Cow::Borrowed(content_type)),
        ("outcome", Cow::Borrowed(outcome)),
    ]
}

/// The statuses `POST /` answers with: their series exist from the start, and their labels
/// are borrowed.
const STATUSES: [(u16, &str); 5] = [
    (204, "204"),
    (400, "400"),
    (408, "408"),
    (413, "413"),
    (503, "503"),
];

/// The `status` label of a request's answer.
fn status_label(status: u16) -> Label {
    let value = match STATUSES.iter().find(|(code, _)| *code == status) {
        Some((_, text)) => Cow::Borrowed(*text),
        None => Cow::Owned(status.to_string()),
    };
    [("status", value)]
}

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    refusals: Family<Label, Counter>,
    matches: Counter,
    completions: Counter,
    replaced_other_endpoint: Counter,
    veraid_refusals: Family<Label, Counter>,
    veraid_verified: Family<Label, Counter>,
    pairing_failures: Family<Label, Counter>,
    deliveries: Family<Label, Counter>,
    delivery_failures: Family<Label, Counter>,
    outbox_depth: Gauge,
    outbox_oldest_age: Gauge,
    pending_requests: Gauge,
    request_duration: Histograms,
    commit_duration: Histograms,
    sqlite_disk_duration: Histograms,
    read_timeouts: Family<Label, Counter>,
    connections_refused: Family<Label, Counter>,
    connections_open: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("letro");
        let build_info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        registry.register(
            "build_info",
            "The version of this build and the git commit it was built from; always 1",
            build_info.clone(),
        );
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "commit",
                    option_env!("LETRO_BUILD_COMMIT").unwrap_or("unknown"),
                ),
            ])
            .set(1);
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Incoming events by service message type and outcome",
            events.clone(),
        );
        let refusals = Family::<Label, Counter>::default();
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
        let veraid_refusals = Family::<Label, Counter>::default();
        registry.register(
            "veraid_refusals",
            "Signed pairing requests whose VeraId bundle did not verify, by the check that failed",
            veraid_refusals.clone(),
        );
        let veraid_verified = Family::<Label, Counter>::default();
        registry.register(
            "veraid_verified",
            "VeraId bundles that verified, by whether the organisation's chain was remembered (hit) or validated (miss)",
            veraid_verified.clone(),
        );
        let pairing_failures = Family::<Label, Counter>::default();
        registry.register(
            "pairing_failures",
            "Contact pairing failure messages queued for requesters, by reason",
            pairing_failures.clone(),
        );
        let deliveries = Family::<Label, Counter>::default();
        registry.register(
            "outbox_deliveries",
            "Outbox delivery attempts by result (delivered, retry, dropped)",
            deliveries.clone(),
        );
        let delivery_failures = Family::<Label, Counter>::default();
        registry.register(
            "outbox_delivery_failures",
            "Failed outbox delivery attempts by cause (unreachable, timeout, tls, redirect, client_error, server_error, other)",
            delivery_failures.clone(),
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
        let request_duration = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time to answer POST / (read, decode, commit), by HTTP status",
            request_duration.clone(),
        );
        let commit_duration = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "commit_duration_seconds",
            "Time from handing an incoming message to the store to its durable commit, by message type",
            commit_duration.clone(),
        );
        let sqlite_disk_duration = Histograms::new_with_constructor(disk_histogram);
        registry.register(
            "sqlite_disk_duration_seconds",
            "Time the SQLite writer spent on disk, by step: commit (its pages appended to the write-ahead log and synced, checkpoints excluded) or checkpoint (the log copied into the database file and synced); empty on PostgreSQL",
            sqlite_disk_duration.clone(),
        );
        let read_timeouts = Family::<Label, Counter>::default();
        registry.register(
            "read_timeouts",
            "Connections closed for not sending in time: request headers (header), a body (body, answered 408), or the next request on an idle keep-alive connection (idle)",
            read_timeouts.clone(),
        );
        let connections_refused = Family::<Label, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections not served: over --max-connections (over_limit, answered 503), or not accepted (accept_failed, out of file descriptors usually)",
            connections_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "HTTP connections open, idle keep-alive ones included",
            connections_open.clone(),
        );
        let metrics = Self {
            registry: root,
            read_timeouts,
            connections_refused,
            connections_open,
            request_duration,
            commit_duration,
            sqlite_disk_duration,
            events,
            refusals,
            matches,
            completions,
            replaced_other_endpoint,
            veraid_refusals,
            veraid_verified,
            pairing_failures,
            deliveries,
            delivery_failures,
            outbox_depth,
            outbox_oldest_age,
            pending_requests,
        };
        metrics.zero_known_labels();
        metrics
    }

    /// Creates the series of every known label value at zero, so that each family has
    /// samples from the first scrape: dashboards show them, and `rate()` and
    /// `increase()` see the first event as an increase from 0.
    fn zero_known_labels(&self) {
        for (content_type, outcomes) in EVENT_OUTCOMES {
            for outcome in *outcomes {
                let _ = self
                    .events
                    .get_or_create(&event_labels(content_type, outcome));
            }
        }
        for reason in refusal_reasons() {
            let _ = self.refusals.get_or_create(&label("reason", reason));
        }
        for check in VERAID_CHECKS {
            let _ = self.veraid_refusals.get_or_create(&label("check", check));
        }
        for cache in ["hit", "miss"] {
            let _ = self.veraid_verified.get_or_create(&label("cache", cache));
        }
        for reason in [
            FailureReason::InvalidRequesterVeraid,
            FailureReason::InvalidTargetVeraid,
            FailureReason::InvalidRequesterAwalaKey,
        ] {
            let _ = self
                .pairing_failures
                .get_or_create(&label("reason", reason.as_str()));
        }
        for result in ["delivered", "retry", "dropped"] {
            let _ = self.deliveries.get_or_create(&label("result", result));
        }
        // `outbox::sink::FailureCause::label` (telemetry does not import the outbox,
        // which imports it).
        for cause in [
            "unreachable",
            "timeout",
            "tls",
            "redirect",
            "client_error",
            "server_error",
            "other",
        ] {
            let _ = self.delivery_failures.get_or_create(&label("cause", cause));
        }
        for (status, _) in STATUSES {
            let _ = self.request_duration.get_or_create(&status_label(status));
        }
        for content_type in MESSAGE_KINDS {
            let _ = self
                .commit_duration
                .get_or_create(&label("content_type", content_type));
        }
        for step in ["commit", "checkpoint"] {
            let _ = self
                .sqlite_disk_duration
                .get_or_create(&label("step", step));
        }
        for reason in ["header", "body", "idle"] {
            let _ = self.read_timeouts.get_or_create(&label("reason", reason));
        }
        for reason in ["over_limit", "accept_failed"] {
            let _ = self
                .connections_refused
                .get_or_create(&label("reason", reason));
        }
    }

    /// Counts an incoming event of `content_type` with `outcome`.
    pub fn event(&self, content_type: &'static str, outcome: &'static str) {
        self.events
            .get_or_create(&event_labels(content_type, outcome))
            .inc();
    }

    /// Counts a refusal.
    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&label("reason", reason)).inc();
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

    /// Counts a VeraId bundle that did not verify, by the check that failed.
    pub fn veraid_refusal(&self, check: &'static str) {
        self.veraid_refusals
            .get_or_create(&label("check", check))
            .inc();
    }

    /// Counts a bundle that verified, with its organisation remembered or not.
    pub fn veraid_verified(&self, from_cache: bool) {
        let cache = if from_cache { "hit" } else { "miss" };
        self.veraid_verified
            .get_or_create(&label("cache", cache))
            .inc();
    }

    /// Counts a failure message queued for the requester of a signed request.
    pub fn pairing_failure(&self, reason: &'static str) {
        self.pairing_failures
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Counts a delivery attempt's result: `delivered`, `retry` or `dropped`.
    pub fn delivery(&self, result: &'static str) {
        self.deliveries
            .get_or_create(&label("result", result))
            .inc();
    }

    /// Counts a failed delivery attempt by its cause (`FailureCause::label`).
    pub fn delivery_failure(&self, cause: &'static str) {
        self.delivery_failures
            .get_or_create(&label("cause", cause))
            .inc();
    }

    /// Records how long answering an incoming event took.
    pub fn request_answered(&self, status: u16, took: std::time::Duration) {
        self.request_duration
            .get_or_create(&status_label(status))
            .observe(took.as_secs_f64());
    }

    /// Records how long a store operation on an incoming message took to commit.
    pub fn committed(&self, content_type: &'static str, took: std::time::Duration) {
        self.commit_duration
            .get_or_create(&label("content_type", content_type))
            .observe(took.as_secs_f64());
    }

    /// Records a step of the SQLite writer on disk: a commit, or a checkpoint.
    pub fn sqlite_disk(&self, checkpoint: bool, took: std::time::Duration) {
        let step = if checkpoint { "checkpoint" } else { "commit" };
        self.sqlite_disk_duration
            .get_or_create(&label("step", step))
            .observe(took.as_secs_f64());
    }

    /// Counts a connection closed for not sending in time: `header`, `body` or `idle`.
    pub fn read_timeout(&self, reason: &'static str) {
        self.read_timeouts
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Counts a connection not served: `over_limit` or `accept_failed`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// The gauge of open connections.
    pub fn connections_open(&self) -> &Gauge {
        &self.connections_open
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_clipped_and_marked() {
        let at_limit = "a".repeat(LOGGED_VALUE_MAX);
        assert_eq!(clipped(&at_limit), at_limit.as_str());
        assert_eq!(clipped_bytes(at_limit.as_bytes()), at_limit);
        let over = format!("{at_limit}b");
        let shown = clipped(&over);
        assert_eq!(shown, format!("{at_limit}…(truncated, 257 bytes)"));
        assert_eq!(clipped_bytes(over.as_bytes()), shown);
        // Multi-byte characters are never split.
        let wide = "é".repeat(1000);
        let shown = clipped(&wide);
        assert!(shown.starts_with(&"é".repeat(LOGGED_VALUE_MAX / 2)));
        assert!(shown.ends_with("…(truncated, 2000 bytes)"), "{shown}");
        assert!(clipped_bytes(&vec![0xff; 100_000]).len() < 1024);
    }
}
