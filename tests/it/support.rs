//! `TestApp` (the server on port 0 with a temp database) and `FakeSink` (a real HTTP
//! server that records what it receives and answers as the test scripts it).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use letro_server::app::App;
use letro_server::config::{Config, DatabaseConfig};
use letro_server::http::AppState;
use tokio::sync::{mpsc, oneshot};

pub const INCOMING_TYPE: &str = "tech.relaycorp.awala.endpoint-internet.incoming-service-message";
pub const REQUEST_TYPE: &str = "application/vnd.relaycorp.letro.pairing-request-tmp";
pub const AUTH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-auth-tmp";
pub const MATCH_TYPE: &str = "application/vnd.relaycorp.letro.pairing-match-tmp";
/// This server's own endpoint id, as the Awala Internet Endpoint puts it in ce-subject.
pub const SERVER_ID: &str = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A request the fake sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

#[derive(Default)]
struct Behaviour {
    /// Statuses to answer first, in order.
    script: VecDeque<u16>,
    /// Answer after the script runs out.
    default: u16,
    /// Recipients (ce-subject) that always get this status.
    poisoned: HashMap<String, u16>,
    /// Answer only after this delay.
    delay: Duration,
}

#[derive(Clone)]
struct SinkState {
    behaviour: Arc<Mutex<Behaviour>>,
    tx: mpsc::UnboundedSender<Received>,
}

/// A fake Knative broker ingress on a real socket.
pub struct FakeSink {
    pub url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    rx: mpsc::UnboundedReceiver<Received>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeSink {
    pub async fn start() -> Self {
        Self::start_at(0).await
    }

    /// A sink on a given port (0: any), e.g. one that was down and comes back.
    pub async fn start_at(port: u16) -> Self {
        let behaviour = Arc::new(Mutex::new(Behaviour {
            default: 202,
            ..Behaviour::default()
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let state = SinkState {
            behaviour: behaviour.clone(),
            tx,
        };
        let app = axum::Router::new()
            .route("/", axum::routing::post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/"),
            behaviour,
            rx,
            _server: server,
        }
    }

    /// Answers these statuses first, then the default.
    pub fn script(&self, statuses: &[u16]) {
        self.behaviour.lock().expect("lock").script.extend(statuses);
    }

    /// What the sink answers when no script or poison applies.
    pub fn set_default(&self, status: u16) {
        self.behaviour.lock().expect("lock").default = status;
    }

    pub fn poison(&self, recipient: &str, status: u16) {
        self.behaviour
            .lock()
            .expect("lock")
            .poisoned
            .insert(recipient.to_owned(), status);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.behaviour.lock().expect("lock").delay = delay;
    }

    /// The next request the sink receives, whatever it answered.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
            .await
            .expect("the sink received nothing within 20 s")
            .expect("sink channel open")
    }

    /// The next request if one arrives within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next `n` requests.
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("unexpected delivery: {r:?}");
        }
    }
}

async fn receive(
    State(state): State<SinkState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let (status, delay) = {
        let mut b = state.behaviour.lock().expect("lock");
        let subject = headers.get("ce-subject").cloned().unwrap_or_default();
        let status = match b.poisoned.get(&subject) {
            Some(s) => *s,
            None => b.script.pop_front().unwrap_or(b.default),
        };
        (status, b.delay)
    };
    let _ = state.tx.send(Received {
        headers,
        body: body.to_vec(),
    });
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    StatusCode::from_u16(status).expect("valid status")
}

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
        self.client
            .get(format!("{}metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of a metric sample line, e.g. `letro_refusals_total{reason="x"}`.
    pub async fn metric(&self, sample: &str) -> u64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
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

/// A port nothing listens on (for now): a sink that is down.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The real binary, as an operator runs it.
pub struct ServerProcess {
    pub url: String,
    child: std::process::Child,
    log: Arc<Mutex<VecDeque<String>>>,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_letro-server");

impl ServerProcess {
    /// Starts `letro-server serve` on port 0 with the given database file, sink and
    /// extra flags, fast retries, and a clean environment; waits until it listens.
    pub fn start(db: &Path, sink: Option<&str>, extra: &[&str]) -> Self {
        Self::start_on(&format!("sqlite://{}", db.display()), sink, extra)
    }

    /// The same on any database URL.
    pub fn start_on(database: &str, sink: Option<&str>, extra: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut command = Command::new(BIN);
        command
            .env_clear()
            .args(["--log-format", "json", "serve", "--bind", "127.0.0.1:0"])
            .args(["--database", database]);
        // Test defaults, unless `extra` sets them (clap refuses a flag given twice).
        for (flag, value) in [
            ("--retry-base-delay", "10ms"),
            ("--retry-max-delay", "200ms"),
            ("--sink-timeout", "1s"),
            ("--shutdown-timeout", "10s"),
        ] {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(sink) = sink {
            command.args(["--sink", sink]);
        }
        let mut child = command.spawn().expect("spawn letro-server");
        let stdout = child.stdout.take().expect("stdout");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = log.clone();
        // Keep reading: a server whose log pipe is full would block on its next line.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"listening\"") {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log");
                    let _ = tx.send(v["address"].as_str().expect("address").to_owned());
                }
                let mut kept = kept.lock().expect("lock");
                if kept.len() == 200 {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server did not report its address");
        Self {
            url: format!("http://{addr}/"),
            child,
            log,
        }
    }

    /// The last log lines, for failure messages.
    pub fn recent_log(&self) -> String {
        let log = self.log.lock().expect("lock");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL: no shutdown code runs at all.
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .expect("join")
            .expect("wait")
    }

    /// Resident set size, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .query_row("SELECT count(*) FROM pending_requests", [], |r| r.get(0))
        .expect("count");
    u64::try_from(n).expect("count")
}

/// A fresh PostgreSQL database on the server `TEST_DATABASE_URL` names; `None` (with a
/// message) when that is not set. Set but unreachable is a failure, not a skip.
pub struct PgDatabase {
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Option<Self> {
        use sqlx::Connection;
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("SKIPPED: TEST_DATABASE_URL is not set, so this PostgreSQL test did not run");
            return None;
        };
        let name = format!(
            "letro_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            rand::random::<u32>()
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("TEST_DATABASE_URL is set but PostgreSQL is unreachable: {e}")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        let mut url = reqwest::Url::parse(&admin).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Some(Self {
            url: url.to_string(),
            admin,
            name,
        })
    }

    pub async fn drop_database(self) {
        use sqlx::Connection;
        let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await else {
            return;
        };
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

/// A PostgreSQL server of our own (initdb in a temp dir, run as the `postgres` user), so
/// that a test can stop and start it without disturbing the machine's shared one.
/// `None`, with a message, where that cannot be done.
pub struct PrivatePostgres {
    pub url: String,
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    pub fn start() -> Option<Self> {
        let skip = |why: &str| {
            eprintln!("SKIPPED: cannot run a private PostgreSQL server here ({why})");
            None
        };
        let Some(bin) = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.flatten().map(|v| v.path().join("bin")).max())
        else {
            return skip("no /usr/lib/postgresql/*/bin");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let chown = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            return skip("cannot hand a directory to the postgres user");
        }
        let data = dir.path().join("data");
        let initdb = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !initdb.is_ok_and(|s| s.success()) {
            return skip("initdb failed");
        }
        let port = closed_port();
        let server = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            bin,
            data,
            port,
            _dir: dir,
        };
        server.pg_ctl(&["start"]);
        Some(server)
    }

    fn pg_ctl(&self, action: &[&str]) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-w", "-t", "30", "-m", "fast"])
            .args(action)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action:?} failed");
    }

    pub fn stop(&self) {
        self.pg_ctl(&["stop"]);
    }

    pub fn restart(&self) {
        self.pg_ctl(&["start"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
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
