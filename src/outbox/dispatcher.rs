//! The dispatcher: claims due messages and delivers them, several at a time, so that a
//! slow or failing message never holds up the others.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::sink::HttpSink;
use crate::clock::SharedClock;
use crate::store::{Attempt, OutboxEntry, Store};
use crate::telemetry::{Metrics, redacted_url};

/// How long to sleep, at most, with nothing due: other replicas may add messages without
/// waking us.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How much longer than the sink timeout a claim is held: time to record the result.
/// A replica that dies mid-delivery leaves its messages to the others after this.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Pause after a store error before trying again.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What one delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retry,
    Dropped,
    /// The store failed to record the result; the lease will make the message due again.
    Unrecorded,
}

/// Counts from [`Dispatcher::run_once`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Accepted by the sink.
    pub delivered: u64,
    /// Failed and scheduled again.
    pub retried: u64,
    /// Expired before delivery.
    pub dropped: u64,
}

struct Inner {
    store: Arc<dyn Store>,
    sink: HttpSink,
    backoff: Backoff,
    /// How long a claimed message stays hidden: longer than any delivery can take.
    lease: Duration,
    concurrency: usize,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    wake: Notify,
    health: Mutex<SinkHealth>,
}

/// Consecutive sink-wide failures, and the pause they earned.
#[derive(Debug, Default)]
struct SinkHealth {
    failures: u32,
    paused_until: Option<Instant>,
}

impl Inner {
    fn health(&self) -> std::sync::MutexGuard<'_, SinkHealth> {
        // The guarded data is two plain numbers: a panic elsewhere cannot leave it torn.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long deliveries stay paused because the sink looks down.
    fn paused_for(&self) -> Option<Duration> {
        let until = self.health().paused_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn sink_up(&self) {
        let mut health = self.health();
        if health.failures > 0 {
            tracing::info!(
                failures = health.failures,
                "sink accepts deliveries again; resuming"
            );
        }
        *health = SinkHealth::default();
    }

    fn sink_down(&self, retry_after: Option<Duration>) {
        let mut health = self.health();
        health.failures = health.failures.saturating_add(1);
        let pause =
            self.backoff
                .delay_with_hint(health.failures, rand::random::<f64>(), retry_after);
        let until = Instant::now() + pause;
        if health.paused_until.is_none_or(|current| current < until) {
            health.paused_until = Some(until);
        }
        if health.failures == 1 {
            tracing::warn!("sink looks down; pausing deliveries with backoff");
        }
    }
}

/// Delivers outbox messages to the sink. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("sink", &self.inner.sink.url().as_str())
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher delivering from `store` to `sink`.
    pub fn new(
        store: Arc<dyn Store>,
        sink: HttpSink,
        backoff: Backoff,
        sink_timeout: Duration,
        concurrency: usize,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                sink,
                backoff,
                lease: sink_timeout + LEASE_MARGIN,
                concurrency: concurrency.max(1),
                metrics,
                clock,
                wake: Notify::new(),
                health: Mutex::new(SinkHealth::default()),
            }),
        }
    }

    /// Tells the dispatcher that new messages were committed.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// One pass: claims every message due now, delivers them concurrently and waits for
    /// the results. For tools and tests; the server runs [`run`](Self::run).
    pub async fn run_once(&self) -> crate::store::Result<DispatchReport> {
        let now = self.inner.clock.now();
        let entries = self
            .inner
            .store
            .claim_due_messages(now, now.plus(self.inner.lease), usize::MAX >> 1)
            .await?;
        let mut set = JoinSet::new();
        for entry in entries {
            set.spawn(attempt(self.inner.clone(), entry));
        }
        let mut attempts = Vec::new();
        while let Some(result) = set.join_next().await {
            match result {
                Ok(done) => attempts.push(done),
                Err(e) => tracing::error!(error = %e, "delivery task failed"),
            }
        }
        let mut report = DispatchReport::default();
        for outcome in record(&self.inner, attempts).await {
            match outcome {
                Outcome::Delivered => report.delivered += 1,
                Outcome::Retry | Outcome::Unrecorded => report.retried += 1,
                Outcome::Dropped => report.dropped += 1,
            }
        }
        Ok(report)
    }

    /// Delivers until `shutdown` turns true, then lets deliveries in flight finish.
    ///
    /// A delivery holds one of the `concurrency` slots while it talks to the sink, not
    /// while its result is committed: waiting for that fsync in the slot capped delivery
    /// below the rate requests came in. The results of the deliveries that finished
    /// together are recorded together ([`Store::record_attempts`]).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let inner = &self.inner;
        let mut in_flight = JoinSet::new();
        let mut recording = JoinSet::new();
        tracing::info!(
            sink = %redacted_url(inner.sink.url()),
            "outbox dispatcher started"
        );
        let mut finished = Vec::new();
        while !*shutdown.borrow() {
            collect(&mut finished, &mut in_flight, None);
            start_recording(inner, &mut recording, &mut finished);
            while recording.try_join_next().is_some() {}
            let mut free = inner.concurrency.saturating_sub(in_flight.len());
            if !in_flight.is_empty() && free < inner.concurrency.div_ceil(4) {
                // Claim in batches: a claim is a write transaction, too dear per message.
                free = 0;
            }
            if inner.health().failures > 0 {
                // The sink looked down: probe with one message until one gets through.
                free = usize::from(in_flight.is_empty());
            }
            let mut pause = IDLE_POLL;
            if let Some(left) = inner.paused_for() {
                pause = left;
            } else if free > 0 {
                let now = inner.clock.now();
                match inner
                    .store
                    .claim_due_messages(now, now.plus(inner.lease), free)
                    .await
                {
                    Ok(entries) => {
                        let full = entries.len() == free;
                        for entry in entries {
                            in_flight.spawn(attempt(inner.clone(), entry));
                        }
                        if full {
                            // More may be due: claim again as soon as a slot frees up.
                            pause = Duration::ZERO;
                        } else {
                            pause = until_next_due(inner).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not claim outbox messages");
                        pause = STORE_ERROR_PAUSE;
                    }
                }
            }
            if pause.is_zero() && in_flight.len() < inner.concurrency {
                continue;
            }
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    collect(&mut finished, &mut in_flight, Some(done));
                    start_recording(inner, &mut recording, &mut finished);
                }
                Some(_) = recording.join_next(), if !recording.is_empty() => {}
                () = inner.wake.notified() => {}
                () = tokio::time::sleep(pause), if !pause.is_zero() => {}
                _ = shutdown.changed() => {}
            }
        }
        while let Some(done) = in_flight.join_next().await {
            collect(&mut finished, &mut in_flight, Some(done));
            start_recording(inner, &mut recording, &mut finished);
        }
        while recording.join_next().await.is_some() {}
        tracing::info!("outbox dispatcher stopped");
    }
}

type Attempted = (OutboxEntry, Attempt);

/// Adds `done`, and every other delivery that has finished, to `finished`.
fn collect(
    finished: &mut Vec<Attempted>,
    in_flight: &mut JoinSet<Attempted>,
    done: Option<Result<Attempted, tokio::task::JoinError>>,
) {
    for result in done
        .into_iter()
        .chain(std::iter::from_fn(|| in_flight.try_join_next()))
    {
        match result {
            Ok(attempted) => finished.push(attempted),
            Err(e) => tracing::error!(error = %e, "delivery task failed"),
        }
    }
}

/// Records the `finished` deliveries' results, in a task of their own.
fn start_recording(inner: &Arc<Inner>, recording: &mut JoinSet<()>, finished: &mut Vec<Attempted>) {
    if finished.is_empty() {
        return;
    }
    let attempts = std::mem::take(finished);
    let inner = inner.clone();
    recording.spawn(async move {
        record(&inner, attempts).await;
    });
}

async fn until_next_due(inner: &Inner) -> Duration {
    match inner.store.next_due().await {
        Ok(Some(at)) => {
            let wait = at.0.saturating_sub(inner.clock.now().0).max(0);
            Duration::from_millis(u64::try_from(wait).unwrap_or(0))
                .min(IDLE_POLL)
                .max(Duration::from_millis(1))
        }
        Ok(None) => IDLE_POLL,
        Err(_) => STORE_ERROR_PAUSE,
    }
}

/// Sends `entry` to the sink (unless it has expired) and judges the answer.
async fn attempt(inner: Arc<Inner>, entry: OutboxEntry) -> Attempted {
    let message = &entry.message;
    let now = inner.clock.now();
    let result = if message.expiry <= now {
        tracing::warn!(
            message.id = message.id.as_str(),
            recipient = message.recipient.as_str(),
            attempts = entry.attempts,
            "outbox message expired undelivered; dropped"
        );
        Attempt::Expired
    } else {
        match inner.sink.deliver(message).await {
            Ok(()) => {
                tracing::debug!(message.id = message.id.as_str(), "delivered");
                inner.sink_up();
                Attempt::Delivered
            }
            Err(e) => {
                inner.metrics.delivery_failure(e.cause.label());
                if e.sink_down {
                    inner.sink_down(e.retry_after);
                }
                let attempt = entry.attempts.saturating_add(1);
                let delay =
                    inner
                        .backoff
                        .delay_with_hint(attempt, rand::random::<f64>(), e.retry_after);
                let now = inner.clock.now();
                // Never wait past the expiry: the message is dropped then.
                let at = now.plus(delay).min(message.expiry.max(now));
                tracing::warn!(
                    message.id = message.id.as_str(),
                    recipient = message.recipient.as_str(),
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "delivery failed; will retry"
                );
                Attempt::Retry {
                    at,
                    error: e.reason,
                }
            }
        }
    };
    (entry, result)
}

/// Commits the results of `attempts`; until then the claims' leases hide their messages.
async fn record(inner: &Inner, attempts: Vec<Attempted>) -> Vec<Outcome> {
    let recorded = inner.store.record_attempts(&attempts).await;
    attempts
        .iter()
        .zip(recorded)
        .map(|((entry, attempt), recorded)| {
            let outcome = match attempt {
                Attempt::Delivered => Outcome::Delivered,
                Attempt::Expired => Outcome::Dropped,
                Attempt::Retry { .. } => Outcome::Retry,
            };
            match recorded {
                Ok(()) => {
                    inner.metrics.delivery(match outcome {
                        Outcome::Delivered => "delivered",
                        Outcome::Dropped => "dropped",
                        Outcome::Retry | Outcome::Unrecorded => "retry",
                    });
                    outcome
                }
                Err(e) => {
                    tracing::warn!(
                        message.id = entry.message.id.as_str(),
                        error = %e,
                        "could not record delivery result; the message will be sent again"
                    );
                    Outcome::Unrecorded
                }
            }
        })
        .collect()
}
