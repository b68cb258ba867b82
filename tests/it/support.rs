//! `TestApp` (the server on port 0 with a temp database), the vectors' parties, and the
//! test kit's fake sink, server process and PostgreSQL scratch databases.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use letro_server::app::App;
use letro_server::config::{Config, DatabaseConfig};
use letro_server::http::AppState;
pub use letro_testkit::{
    ClosedPort, FakeSink, PgDatabase, PrivatePostgres, Received, ServerProcess,
};
use tokio::sync::oneshot;

/// The server binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_letro-server");

pub const INCOMING_TYPE: &str = "tech.relaycorp.awala.endpoint-internet.incoming-service-message";
pub const REQUEST_TYPE: &str = "application/vnd.relaycorp.letro.pairing-request-tmp";
pub const AUTH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-auth-tmp";
pub const MATCH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-match-tmp";
/// This server's own endpoint id, as the Awala Internet Endpoint puts it in ce-subject.
pub const SERVER_ID: &str = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// The server under test.
pub struct TestApp {
    pub addr: SocketAddr,
    pub url: String,
    pub client: reqwest::Client,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    letro_server::outbox::sink::install_crypto_provider();
    reqwest::Client::new()
}

/// A configuration for tests: port 0, the given database file, fast retries.
pub fn test_config(db_path: &Path, sink: Option<&str>) -> Config {
    let mut config = Config::new(
        "127.0.0.1:0".parse().expect("addr"),
        DatabaseConfig::Sqlite {
            path: db_path.to_owned(),
            synchronous: letro_server::config::SqliteSync::Full,
        },
    );
    config.sink = sink.map(|s| s.parse().expect("sink url"));
    config.retry_base_delay = Duration::from_millis(10);
    config.retry_max_delay = Duration::from_millis(50);
    config.sink_timeout = Duration::from_secs(2);
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

impl TestApp {
    pub async fn spawn(config: Config) -> Self {
        Self::spawn_with_clock(
            config,
            std::sync::Arc::new(letro_server::clock::SystemClock),
        )
        .await
    }

    /// The server reading the time from `clock` (a `ManualClock` the test moves).
    pub async fn spawn_with_clock(config: Config, clock: letro_server::clock::SharedClock) -> Self {
        // Logs go to the test's captured output (shown for failing tests) at RUST_LOG.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let app = App::build_with_clock(config, clock)
            .await
            .expect("app builds");
        let addr = app.local_addr().expect("addr");
        let state = app.state().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        Self {
            addr,
            url: format!("http://{addr}/"),
            client: client(),
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server the way SIGTERM does and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean shutdown");
        }
    }

    /// POSTs a binary-mode event.
    pub async fn post(
        &self,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> reqwest::StatusCode {
        let mut request = self.client.post(&self.url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .body(body.into())
            .send()
            .await
            .expect("request")
            .status()
    }

    /// POSTs an incoming service message from `sender`, with parcel id `parcel`.
    pub async fn post_message(
        &self,
        sender: &str,
        parcel: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> reqwest::StatusCode {
        self.post(&event_headers(sender, parcel, content_type), body)
            .await
    }

    /// POSTs a pairing request from `from` (who must hold the key it carries).
    pub async fn post_request(
        &self,
        from: &Party,
        parcel: &str,
        requester: &str,
        target: &str,
    ) -> reqwest::StatusCode {
        self.post_message(
            &from.id,
            parcel,
            REQUEST_TYPE,
            from.request(requester, target),
        )
        .await
    }

    /// The readiness probe's status.
    pub async fn health(&self) -> reqwest::StatusCode {
        self.client
            .get(&self.url)
            .send()
            .await
            .expect("health")
            .status()
    }

    pub async fn stats(&self) -> letro_server::store::Stats {
        self.state.store.stats().await.expect("stats")
    }

    /// The whole `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        scrape(&self.client, &self.url).await
    }

    /// The value of a metric sample line, e.g. `letro_refusals_total{reason="x"}`.
    pub async fn metric(&self, sample: &str) -> u64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Waits until the metric sample reaches `at_least`; fails after `within`. For
    /// counts made after the work they count (a delivery is counted once its row is
    /// gone), so waiting on the work alone would race the count.
    pub async fn wait_for_metric(&self, sample: &str, at_least: u64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.metric(sample).await < at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sample} never reached {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn event_headers<'a>(
    sender: &'a str,
    parcel: &'a str,
    content_type: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce-specversion", "1.0"),
        ("ce-id", parcel),
        ("ce-source", sender),
        ("ce-type", INCOMING_TYPE),
        ("ce-subject", SERVER_ID),
        ("content-type", content_type),
    ]
}

/// An Awala endpoint with a real RSA identity key from the interoperability vectors.
#[derive(Debug, Clone)]
pub struct Party {
    pub key_der: Vec<u8>,
    pub id: String,
}

impl Party {
    pub fn key_b64(&self) -> String {
        STANDARD.encode(&self.key_der)
    }

    pub fn request(&self, requester: &str, target: &str) -> String {
        format!("{requester},{target},{}", self.key_b64())
    }
}

pub fn vectors() -> serde_json::Value {
    serde_json::from_str(include_str!("../fixtures/awala-vectors.json")).expect("vectors")
}

/// The five endpoints of the vectors whose keys the original library accepted.
pub fn parties() -> Vec<Party> {
    vectors()["endpoint_keys"]
        .as_array()
        .expect("endpoint_keys")
        .iter()
        .filter_map(|k| {
            Some(Party {
                id: k["endpoint_id"].as_str()?.to_owned(),
                key_der: STANDARD
                    .decode(k["spki_der_b64"].as_str().expect("b64"))
                    .expect("base64"),
            })
        })
        .collect()
}

/// A temp dir and a database path in it.
pub fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("letro.db");
    (dir, path)
}

/// Checks every property of an outgoing match event; returns its content fields.
pub fn assert_match_event(r: &Received) -> Vec<String> {
    assert_eq!(r.header("ce-specversion"), "1.0");
    assert_eq!(
        r.header("ce-type"),
        "tech.relaycorp.awala.endpoint-internet.outgoing-service-message"
    );
    assert_eq!(r.header("ce-source"), SERVER_ID);
    assert_eq!(r.header("content-type"), MATCH_TYPE);
    let id = r.header("ce-id");
    assert_eq!(id.len(), 64, "ce-id {id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let time = time::OffsetDateTime::parse(
        r.header("ce-time"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("ce-time is RFC 3339");
    let expiry = time::OffsetDateTime::parse(
        r.header("ce-expiry"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("ce-expiry is RFC 3339");
    assert_eq!(expiry - time, time::Duration::days(90));
    r.text().split(',').map(str::to_owned).collect()
}

/// Distinct values, for "no duplicates" assertions.
pub fn distinct<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> usize {
    items.into_iter().collect::<HashSet<_>>().len()
}

/// POSTs a pairing request to `url`; `Err` for a transport failure (no answer).
pub async fn send_request(
    client: &reqwest::Client,
    url: &str,
    from: &Party,
    parcel: &str,
    requester: &str,
    target: &str,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    let mut request = client.post(url);
    for (name, value) in event_headers(&from.id, parcel, REQUEST_TYPE) {
        request = request.header(name, value);
    }
    request
        .body(from.request(requester, target))
        .send()
        .await
        .map(|r| r.status())
}

/// What the outbox of a database file holds, read directly.
pub fn outbox_ids(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).expect("open database");
    let mut stmt = conn.prepare("SELECT id FROM outbox").expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// How many pairing requests a database file holds, read directly.
pub fn pending_count(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).expect("open database");
    let n: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM pending_recent)
                    + (SELECT count(*) FROM pending_requests)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    u64::try_from(n).expect("count")
}

/// A fresh database of either backend, for a [`TestApp`] or a store.
pub enum TestDb {
    Sqlite(#[allow(dead_code)] tempfile::TempDir, PathBuf),
    Postgres(PgDatabase),
}

impl TestDb {
    pub fn sqlite() -> Self {
        let (dir, path) = temp_db();
        Self::Sqlite(dir, path)
    }

    /// `None` (with a message) when `TEST_DATABASE_URL` is not set.
    pub async fn postgres() -> Option<Self> {
        PgDatabase::create().await.map(Self::Postgres)
    }

    /// [`test_config`] on this database.
    pub fn config(&self, sink: Option<&str>) -> Config {
        match self {
            Self::Sqlite(_, path) => test_config(path, sink),
            Self::Postgres(db) => {
                let mut config = test_config(Path::new("unused.db"), sink);
                config.database = DatabaseConfig::Postgres {
                    url: letro_server::config::DatabaseUrl(db.url.clone()),
                    pool: letro_server::config::PoolSettings::default(),
                };
                config
            }
        }
    }

    pub async fn finish(self) {
        if let Self::Postgres(db) = self {
            db.drop_database().await;
        }
    }
}

/// Runs `test` once on a temporary SQLite file and once on a fresh PostgreSQL database
/// (skipped, with a message, when `TEST_DATABASE_URL` is not set), as `$test::sqlite`
/// and `$test::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        $(
            pub mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = $crate::support::TestDb::sqlite();
                    super::$test(&db).await;
                    db.finish().await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let Some(db) = $crate::support::TestDb::postgres().await else {
                        return;
                    };
                    super::$test(&db).await;
                    db.finish().await;
                }
            }
        )*
    };
}

/// Reads until the server closes the connection, or gives up after `limit`.
pub async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut answer))
        .await
        .ok()
        .map(|_| String::from_utf8_lossy(&answer).into_owned())
}

/// The whole `/metrics` exposition of the server at `url` (ending in `/`).
pub async fn scrape(client: &reqwest::Client, url: &str) -> String {
    client
        .get(format!("{url}metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The request line and CloudEvent headers of a binary-mode pairing request from
/// `sender` with parcel id `parcel`, as raw HTTP/1.1 text, each line ended: the caller adds
/// the framing headers (content-length or chunked) and the blank line.
pub fn raw_event_head(sender: &str, parcel: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nce-id: {parcel}\r\nce-source: {sender}\r\nce-type: {INCOMING_TYPE}\r\nce-subject: {SERVER_ID}\r\ncontent-type: {REQUEST_TYPE}\r\n"
    )
}
