//! HTTP: the CloudEvents ingress on `POST /`, readiness on `GET`/`HEAD /` and
//! `/readyz`, liveness on `/livez`, and `GET /metrics`. [`ApiError`] is the only place
//! that knows status codes.

mod error;
mod ingress;
mod messages;
mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use error::ApiError;
pub use server::{ServeOptions, serve};

use crate::bundles::BundleVerifier;
use crate::clock::SharedClock;
use crate::codec::pairing::MatchOrder;
use crate::domain::{PendingLimits, VeraIdDigester};
use crate::outbox::Dispatcher;
use crate::store::Store;
use crate::telemetry::{Metrics, Repeats};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Arc<dyn Store>,
    /// Where the time comes from.
    pub clock: SharedClock,
    /// Keys VeraId digests.
    pub digester: VeraIdDigester,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Woken when messages are committed; `None` without a sink.
    pub dispatcher: Option<Dispatcher>,
    /// Largest body read.
    pub max_body_bytes: usize,
    /// How long a pending request waits.
    pub request_ttl: Duration,
    /// Expiry of outgoing messages.
    pub message_ttl: Duration,
    /// Caps on waiting requests.
    pub limits: PendingLimits,
    /// How tmp matches list the two VeraIds.
    pub match_order: MatchOrder,
    /// Verifies signed pairing requests' VeraId bundles.
    pub bundles: Arc<BundleVerifier>,
    /// Time allowed to read a body once the headers are in.
    pub body_read_timeout: Duration,
    /// Log lines that repeat, summarised per interval.
    pub repeats: Arc<Repeats>,
    /// When `/metrics` last counted the store, shared by scrapes.
    pub store_counts: Arc<StoreCounts>,
    /// The ceiling on pending requests (`--max-pending-requests`), if any.
    pub pending_ceiling: Option<u64>,
}

/// How long one count of the store serves `/metrics`: a scrape within this of the last
/// count reuses it. A count is a `count(*)` over two tables (48 ms at 100,000 pending
/// requests on PostgreSQL), which a scraper or an attacker polling `/metrics` could
/// otherwise run as often as it likes.
pub const STORE_COUNT_REUSE: Duration = Duration::from_secs(1);

/// The last count of the store behind the three database-wide gauges. Scrapes take turns
/// on it: concurrent scrapes wait for the one count in progress and then reuse it.
#[derive(Debug, Default)]
pub struct StoreCounts {
    last: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Pending requests (expired ones not yet purged included) at the last count.
    pending: std::sync::atomic::AtomicU64,
}

impl StoreCounts {
    /// Whether the last count reached `ceiling`: what a request that would wait is
    /// judged by, without a count of its own (a `count(*)` per request would cost more
    /// than the request).
    pub fn at_ceiling(&self, ceiling: Option<u64>) -> bool {
        ceiling.is_some_and(|c| self.pending.load(std::sync::atomic::Ordering::Relaxed) >= c)
    }

    /// Sets the gauges from the store, unless they were set (or the store failed to
    /// answer) within [`STORE_COUNT_REUSE`].
    async fn refresh(&self, state: &AppState) {
        self.refresh_within(state, STORE_COUNT_REUSE).await;
    }

    /// Counts the store every `every` until `stop`, for the ceiling on pending requests.
    pub async fn count_every(
        self: Arc<Self>,
        state: AppState,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            self.refresh_within(&state, Duration::ZERO).await;
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Sets the gauges from the store, unless they were set (or the store failed to
    /// answer) within `reuse`.
    async fn refresh_within(&self, state: &AppState, reuse: Duration) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < reuse) {
            return;
        }
        // A failed count is not retried at once either: during an outage each attempt
        // waits for a connection (`--db-timeout`), and the gauges keep their values.
        if let Ok(stats) = state.store.stats().await {
            self.pending
                .store(stats.pending_requests, std::sync::atomic::Ordering::Relaxed);
            let age = stats
                .outbox_oldest
                .map(|t| u64::try_from((state.clock.now().0 - t.0).max(0) / 1000).unwrap_or(0))
                .unwrap_or(0);
            state
                .metrics
                .set_store_gauges(stats.outbox_depth, age, stats.pending_requests);
        }
        *last = Some(tokio::time::Instant::now());
    }
}

/// The routes, every one through axum (see [`Routes`]).
fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(health).post(ingress::ingest))
        .route("/readyz", get(health))
        .route("/livez", get(live))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What the connection loop serves: [`router`], except that `POST /`, the one route that
/// carries the load, is handed to its handler directly. The router's matching, boxed
/// services and per-request extensions cost about 3% of the server's CPU at full load
/// (issue 17), and the handler uses none of what they provide.
#[derive(Clone)]
pub struct Routes {
    router: hyper_util::service::TowerToHyperService<Router>,
    state: AppState,
}

impl Routes {
    /// The routes of `state`, with the benchmark's `POST /noop` if `noop_route`.
    pub fn new(state: AppState, noop_route: bool) -> Self {
        let mut router = router(state.clone());
        if noop_route {
            router = router.route("/noop", axum::routing::post(noop));
        }
        Self {
            router: hyper_util::service::TowerToHyperService::new(router),
            state,
        }
    }

    /// Answers `request`.
    fn call(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> futures_util::future::BoxFuture<'static, Result<Response, std::convert::Infallible>> {
        use hyper::service::Service as _;
        if request.method() == axum::http::Method::POST && request.uri().path() == "/" {
            let state = self.state.clone();
            let request = request.map(axum::body::Body::new);
            Box::pin(async move { Ok(ingress::ingest(State(state), request).await) })
        } else {
            Box::pin(self.router.call(request))
        }
    }
}

/// The benchmark's ceiling: HTTP in and out, the body read, nothing else.
async fn noop(body: axum::body::Bytes) -> StatusCode {
    std::hint::black_box(body);
    StatusCode::NO_CONTENT
}

/// Readiness: 200 when the database answers, else 503. Axum answers `HEAD` with the
/// same status and no body.
async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: the database does not answer");
            ApiError::Unavailable(e).into_response()
        }
    }
}

/// Liveness: 200 while the process serves HTTP. It does not look at the database: a
/// restart would not bring a database back, and restarting every replica during a
/// database outage would only add cold starts to it.
async fn live() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.store_counts.clone().refresh(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
