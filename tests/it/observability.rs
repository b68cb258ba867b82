//! What the server tells its operator, and what that costs: `/metrics` counts the store
//! at most once per interval however often it is scraped; a storage outage, a flood of
//! connections or of slow clients gives a first line and then one summary per interval,
//! not a line per event; every event of the kind is counted.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use letro_server::app::{App, Opening, open_store};
use letro_server::clock::SystemClock;
use letro_server::config::Config;
use letro_server::domain::{MessageId, Timestamp};
use letro_server::store::{
    EventMessages, OutboxEntry, OutboxStatus, OutboxSummary, PairingOutcome, PairingSubmission,
    PurgeReport, QueueOutcome, RequestStats, Stats, Store, StoreError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::support::*;

/// A store that passes every call to the real one, counts `stats` calls, and fails the
/// writes of incoming messages while `failing` is set (a database outage, as the
/// handlers see it).
struct WatchedStore {
    inner: Arc<dyn Store>,
    stats_calls: AtomicU64,
    failing: AtomicBool,
}

impl WatchedStore {
    fn outage<T>(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "connection refused (test outage)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for WatchedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn setting_or_insert(
        &self,
        name: &'static str,
        candidate: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        self.inner.setting_or_insert(name, candidate).await
    }
    async fn setting(&self, name: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.setting(name).await
    }
    async fn submit_pairing_request(
        &self,
        submission: PairingSubmission,
    ) -> Result<PairingOutcome, StoreError> {
        self.outage::<()>()?;
        self.inner.submit_pairing_request(submission).await
    }
    async fn record_and_queue(
        &self,
        submission: EventMessages,
    ) -> Result<QueueOutcome, StoreError> {
        self.outage::<()>()?;
        self.inner.record_and_queue(submission).await
    }
    async fn claim_due_messages(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.claim_due_messages(now, lease_until, limit).await
    }
    async fn next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        self.inner.next_due().await
    }
    async fn mark_delivered(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.inner.mark_delivered(entry).await
    }
    async fn schedule_retry(
        &self,
        entry: &OutboxEntry,
        at: Timestamp,
        error: &str,
    ) -> Result<(), StoreError> {
        self.inner.schedule_retry(entry, at, error).await
    }
    async fn drop_message(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.inner.drop_message(entry).await
    }
    async fn stats(&self) -> Result<Stats, StoreError> {
        self.stats_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.stats().await
    }
    async fn purge_expired(&self, now: Timestamp) -> Result<PurgeReport, StoreError> {
        self.inner.purge_expired(now).await
    }
    async fn outbox_status(&self, now: Timestamp) -> Result<OutboxStatus, StoreError> {
        self.inner.outbox_status(now).await
    }
    async fn outbox_list(&self, limit: usize) -> Result<Vec<OutboxSummary>, StoreError> {
        self.inner.outbox_list(limit).await
    }
    async fn retry_now(
        &self,
        ids: Option<Vec<MessageId>>,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.inner.retry_now(ids, now).await
    }
    async fn request_stats(&self, now: Timestamp) -> Result<RequestStats, StoreError> {
        self.inner.request_stats(now).await
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}

/// The server of `config` on a [`WatchedStore`] over its database.
struct WatchedApp {
    url: String,
    addr: std::net::SocketAddr,
    client: reqwest::Client,
    store: Arc<WatchedStore>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl WatchedApp {
    async fn spawn(config: Config) -> Self {
        let inner = open_store(
            &config.database,
            Opening::Serve {
                now: letro_server::clock::now(),
            },
        )
        .await
        .expect("store opens");
        let store = Arc::new(WatchedStore {
            inner,
            stats_calls: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        });
        let app = App::build_on_store(config, store.clone(), Arc::new(SystemClock))
            .await
            .expect("app builds");
        let addr = app.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        Self {
            url: format!("http://{addr}/"),
            addr,
            client: client(),
            store,
            shutdown: Some(tx),
            task,
        }
    }

    async fn scrape(&self) -> String {
        self.client
            .get(format!("{}metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.expect("join").expect("clean shutdown");
    }
}

/// The value of the sample `name` (with its labels, exactly) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_and_concurrent_scrapes_count_the_store_at_most_once_per_interval() {
    let (_dir, db) = temp_db();
    let app = WatchedApp::spawn(test_config(&db, None)).await;
    let started = Instant::now();
    // 40 scrapes at once, then 40 one after the other.
    let concurrent: Vec<_> = (0..40).map(|_| app.scrape()).collect();
    for text in futures_util::future::join_all(concurrent).await {
        assert_eq!(sample(&text, "letro_pending_requests"), Some(0.0), "{text}");
    }
    for _ in 0..40 {
        app.scrape().await;
    }
    let took = started.elapsed();
    let counts = app.store.stats_calls.load(Ordering::SeqCst);
    // One count per second of scraping at the most (the first scrape counts).
    let allowed = 1 + took.as_secs();
    assert!(
        counts <= allowed,
        "{counts} store counts for 80 scrapes in {took:?} (at most {allowed})"
    );

    // A scrape more than a second after the last count counts again: the gauges follow
    // the database.
    let p = parties();
    let sent = send_request(&app.client, &app.url, &p[0], "cache-1", "a@x.io", "b@y.io")
        .await
        .expect("sent");
    assert_eq!(sent, 204);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = app.scrape().await;
    assert_eq!(sample(&text, "letro_pending_requests"), Some(1.0), "{text}");
    assert_eq!(app.store.stats_calls.load(Ordering::SeqCst), counts + 1);
    app.stop().await;
}
