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
use tokio::io::AsyncWriteExt;
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
    fn outage(&self) -> Result<(), StoreError> {
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
        self.outage()?;
        self.inner.submit_pairing_request(submission).await
    }
    async fn record_and_queue(
        &self,
        submission: EventMessages,
    ) -> Result<QueueOutcome, StoreError> {
        self.outage()?;
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
        scrape(&self.client, &self.url).await
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

/// Log lines written while the guard lives, on this thread (a current-thread runtime
/// runs the server on it too), as JSON objects with the fields at the top level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

impl Captured {
    fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(logs.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("log buffer").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON log line"))
            .collect()
    }

    /// The lines in full (not summaries) whose message starts with `start`, at `level`.
    fn matching(&self, level: &str, start: &str) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| {
                l["level"] == level
                    && l.get("repeated").is_none()
                    && l["message"].as_str().is_some_and(|m| m.starts_with(start))
            })
            .collect()
    }

    /// The summaries of `what`: the lines with a `repeated` field naming it; the sum of
    /// their counts.
    fn summarised(&self, what: &str) -> u64 {
        self.lines()
            .iter()
            .filter(|l| l["repeated"].as_str() == Some(what))
            .map(|l| l["count"].as_u64().expect("a count"))
            .sum()
    }
}

#[tokio::test]
async fn a_storage_outage_logs_one_error_then_a_count_per_interval() {
    let (logs, _guard) = Captured::start();
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.log_summary_interval = Duration::from_millis(300);
    let app = WatchedApp::spawn(config).await;
    app.store.failing.store(true, Ordering::SeqCst);
    let p = parties();
    for i in 0..30 {
        let status = send_request(
            &app.client,
            &app.url,
            &p[0],
            &format!("out-{i}"),
            "a@x.io",
            "b@y.io",
        )
        .await
        .expect("answered");
        assert_eq!(status, 503);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let text = app.scrape().await;
    assert_eq!(
        sample(
            &text,
            "letro_events_total{content_type=\"pairing-request\",outcome=\"unavailable\"}"
        ),
        Some(30.0),
        "every failure is counted"
    );
    let errors = logs.matching("ERROR", "could not store");
    assert_eq!(errors.len(), 1, "one ERROR line in full: {errors:#?}");
    assert!(
        errors[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("test outage"))
    );
    assert_eq!(
        logs.summarised("could not store an incoming message; answering 503"),
        29,
        "the other 29 in summaries: {:#?}",
        logs.lines()
    );
    app.store.failing.store(false, Ordering::SeqCst);
    app.stop().await;
}

#[tokio::test]
async fn read_timeouts_are_counted_by_reason_and_logged_once_per_interval() {
    let (logs, _guard) = Captured::start();
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.header_read_timeout = Duration::from_millis(300);
    config.body_read_timeout = Duration::from_millis(300);
    config.log_summary_interval = Duration::from_millis(400);
    let app = WatchedApp::spawn(config).await;
    let p = parties();

    // Three clients whose headers never end, at once.
    let mut trickles = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        stream
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\n")
            .await
            .expect("write");
        trickles.push(stream);
    }
    for stream in &mut trickles {
        assert!(
            read_until_closed(stream, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
    // Two bodies that stop short, at once.
    let body = p[0].request("a@x.io", "b@y.io");
    let mut slow = Vec::new();
    for i in 0..2 {
        let head = format!(
            "{}content-length: {}\r\n\r\n",
            raw_event_head(&p[0].id, &format!("slow-{i}")),
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream
            .write_all(&body.as_bytes()[..10])
            .await
            .expect("some body");
        slow.push(stream);
    }
    for stream in &mut slow {
        let answer = read_until_closed(stream, Duration::from_secs(5))
            .await
            .expect("answered and closed");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    // A keep-alive connection left idle after its request is closed as well: that is
    // routine, counted apart and not logged.
    let mut idle = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("request");
    let answer = read_until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("closed once idle");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");

    tokio::time::sleep(Duration::from_millis(900)).await;
    let text = app.scrape().await;
    for (reason, count) in [("header", 3.0), ("body", 2.0), ("idle", 1.0)] {
        assert_eq!(
            sample(
                &text,
                &format!("letro_read_timeouts_total{{reason=\"{reason}\"}}")
            ),
            Some(count),
            "{reason}:\n{text}"
        );
    }
    let header = logs.matching("INFO", "request headers not sent in time");
    assert_eq!(header.len(), 1, "{header:#?}");
    assert_eq!(
        logs.summarised("request headers not sent in time; connection closed"),
        2
    );
    let body = logs.matching("INFO", "body not sent in time");
    assert_eq!(body.len(), 1, "{body:#?}");
    assert_eq!(logs.summarised("body not sent in time; answering 408"), 1);
    app.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_and_are_counted_and_summarised() {
    let (logs, _guard) = Captured::start();
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.max_connections = 3;
    config.log_summary_interval = Duration::from_millis(300);
    let app = WatchedApp::spawn(config).await;

    // Three idle connections take every slot.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::TcpStream::connect(app.addr)
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let mut extra = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        let answer = read_until_closed(&mut extra, Duration::from_secs(2))
            .await
            .expect("refused at once");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        assert!(answer.contains("retry-after: 1"), "{answer:?}");
    }
    // A slot freed is a slot taken again.
    held.pop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let text = app.scrape().await;
    assert_eq!(
        sample(
            &text,
            "letro_connections_refused_total{reason=\"over_limit\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "letro_connections_open"), Some(3.0), "{text}");
    let first = logs.matching("WARN", "refusing connections");
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["limit"], 3);
    assert_eq!(
        logs.summarised("refusing connections: at --max-connections"),
        2
    );
    drop(held);
    app.stop().await;
}

/// The soft limit on file descriptors of a `letro-server` started under a lower one.
#[tokio::test]
async fn the_soft_fd_limit_is_raised_to_the_hard_limit_and_logged() {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .expect("a hard limit");
    if hard <= 256 {
        eprintln!("SKIPPED: the hard limit on open files is {hard}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("low-limit");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nulimit -Sn 256 && exec {BIN} \"$@\"\n"),
    )
    .expect("script");
    std::process::Command::new("chmod")
        .args(["+x", &script.display().to_string()])
        .status()
        .expect("chmod");
    let db = dir.path().join("letro.db");
    let server = ServerProcess::launch(
        &script,
        &["--database", &format!("sqlite://{}", db.display())],
        Duration::from_secs(20),
    )
    .expect("the server starts");
    // The "listening" line may be read before the lines above it are kept.
    let mut found = None;
    for _ in 0..100 {
        found = server
            .recent_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("file descriptor limit"))
            });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = found.unwrap_or_else(|| panic!("no fd limit line in:\n{}", server.recent_log()));
    assert_eq!(line["soft_before"], 256, "{line}");
    assert_eq!(line["soft"], hard, "{line}");
    assert_eq!(line["hard"], hard, "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let soft_now: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("a soft limit");
    assert_eq!(soft_now, hard);
    let _ = server.terminate().await;
}
