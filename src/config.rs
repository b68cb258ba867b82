//! The validated configuration of a running server.
//!
//! Every setting is declared once, as a flag with an environment variable, in `cli`;
//! this module turns those raw values into a typed [`Config`] and refuses bad ones with
//! a message that names the setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::codec::cloudevent::is_header_safe;
use crate::codec::pairing::MatchOrder;
use crate::domain::PendingLimits;
use crate::telemetry::redacted_url;
use veraid::TrustAnchors;

/// A duration written the human way (`10s`, `90days`), for flags and env vars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime writes 90 days as "2months 29days 2h 52m 48s" (its month is 30.44
        // days): whole days are written as days.
        let secs = self.0.as_secs();
        if secs > 0 && secs.is_multiple_of(86_400) && self.0.subsec_nanos() == 0 {
            write!(f, "{}days", secs / 86_400)
        } else {
            write!(f, "{}", humantime::format_duration(self.0))
        }
    }
}

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Self)
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// Defaults, shared by the flags and by [`Config::new`].
pub mod defaults {
    use super::{DAY, Duration};
    /// `--port`.
    pub const PORT: u16 = 8080;
    /// `--database`.
    pub const DATABASE: &str = "sqlite://letro.db";
    /// `--max-body-bytes`: fastify's default, which the original server had.
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;
    /// `--retry-base-delay`.
    pub const RETRY_BASE_DELAY: Duration = Duration::from_millis(100);
    /// `--retry-max-delay`.
    pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(10);
    /// `--sink-timeout`.
    pub const SINK_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--delivery-concurrency`. Deliveries and incoming requests share the CPU as tasks
    /// of one runtime, about in proportion to how many of each are in flight: with 64
    /// slots against 128 busy client connections, a third of the messages made under
    /// full load were delivered during it and the backlog grew; with 256, all of them
    /// (`letro-bench`, 2 cores).
    pub const DELIVERY_CONCURRENCY: usize = 256;
    /// `--message-ttl`.
    pub const MESSAGE_TTL: Duration = Duration::from_secs(90 * 86_400);
    /// `--request-ttl`.
    pub const REQUEST_TTL: Duration = Duration::from_secs(90 * 86_400);
    /// `--purge-interval`.
    pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
    /// `--max-pending-per-sender`: far more contacts than one person adds in a request TTL.
    pub const MAX_PENDING_PER_SENDER: u32 = 1000;
    /// `--max-pending-per-target`: far more people than ever ask one person at once.
    pub const MAX_PENDING_PER_TARGET: u32 = 100;
    /// `--max-pending-requests`: about 1 GiB of SQLite at ~1 KiB per waiting request.
    pub const MAX_PENDING_REQUESTS: u64 = 1_000_000;
    /// `--pending-count-interval`: a `count(*)` of a million rows takes 50-70 ms.
    pub const PENDING_COUNT_INTERVAL: Duration = Duration::from_secs(5);
    /// `--header-read-timeout`: the AIE's own PoHTTP timeout is 3 s.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--body-read-timeout`.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--max-connections`. An idle HTTP connection costs the server about 19 KiB
    /// (hyper's buffers and its task: RSS 19 MiB with none, 35 MiB with 1,000, 111 MiB
    /// with 5,000, 206 MiB with 10,000, release build), so 4,096 of them take about
    /// 76 MiB, which leaves most of the Knative Service's 256 MiB to the requests in
    /// flight, the database and the VeraId caches. The platform's proxy needs far fewer.
    pub const MAX_CONNECTIONS: usize = 4096;
    /// `--log-summary-interval`.
    pub const LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
    /// `--db-max-connections`.
    pub const DB_MAX_CONNECTIONS: u32 = 10;
    /// `--db-timeout`.
    pub const DB_TIMEOUT: Duration = Duration::from_secs(5);
    /// `--shutdown-timeout`.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    /// RAMF's largest parcel TTL: the Awala Internet Endpoint fails on anything longer.
    pub const MAX_MESSAGE_TTL: Duration = Duration::from_secs(180 * 86_400);
    const _: () = assert!(MESSAGE_TTL.as_secs() <= MAX_MESSAGE_TTL.as_secs());
    const _: () = assert!(DAY.as_secs() == 86_400);
}

/// Which database, and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseConfig {
    /// An embedded SQLite file.
    Sqlite {
        /// The file, created if missing.
        path: PathBuf,
        /// Commit durability.
        synchronous: SqliteSync,
    },
    /// A PostgreSQL server, shared by any number of replicas.
    Postgres {
        /// `postgres://user:password@host:port/database?…`.
        url: DatabaseUrl,
        /// Connection pool settings.
        pool: PoolSettings,
    },
}

/// Durability of a SQLite commit (`--sqlite-synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SqliteSync {
    /// fsync before acknowledging: survives power loss.
    #[default]
    Full,
    /// No fsync on commit: survives a process crash only.
    Normal,
}

/// The file of `sqlite://relative/path`, `sqlite:///absolute/path` or `sqlite:path`.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then(|| path.into())
}

/// Settings of a database connection pool (PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most connections open at once, per replica.
    pub max_connections: u32,
    /// Time allowed to connect, or to wait for a free connection; beyond it the request
    /// gets 503.
    pub timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: defaults::DB_MAX_CONNECTIONS,
            timeout: defaults::DB_TIMEOUT,
        }
    }
}

/// A database URL, which may hold a password: `Debug` and `Display` leave it out.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        match reqwest::Url::parse(&self.0) {
            Ok(url) => redacted_url(&url),
            Err(_) => "<unparseable URL>".to_owned(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl DatabaseConfig {
    /// Parses a database URL.
    pub fn from_url(
        url: &str,
        synchronous: SqliteSync,
        pool: PoolSettings,
    ) -> Result<Self, ConfigError> {
        const SETTING: &str = "--database (DATABASE_URL)";
        if let Some(path) = sqlite_path(url) {
            return Ok(Self::Sqlite { path, synchronous });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            reqwest::Url::parse(url).map_err(|e| ConfigError::new(SETTING, e.to_string()))?;
            if pool.max_connections == 0 {
                return Err(ConfigError::new(
                    "--db-max-connections (LETRO_DB_MAX_CONNECTIONS)",
                    "must be at least 1",
                ));
            }
            if pool.timeout.is_zero() {
                return Err(ConfigError::new(
                    "--db-timeout (LETRO_DB_TIMEOUT)",
                    "must be more than 0",
                ));
            }
            return Ok(Self::Postgres {
                url: DatabaseUrl(url.to_owned()),
                pool,
            });
        }
        let scheme = url.split(':').next().unwrap_or_default();
        Err(ConfigError::new(
            SETTING,
            format!(
                "unsupported database URL scheme {scheme:?}; expected sqlite://PATH or postgres://…"
            ),
        ))
    }
}

/// A setting with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting}: {reason}")]
pub struct ConfigError {
    setting: &'static str,
    reason: String,
}

impl ConfigError {
    /// A problem with `setting`.
    pub fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self {
            setting,
            reason: reason.into(),
        }
    }
}

/// Reads `--veraid-trust-anchors`: DS records of the root in zone-file form, one per
/// line. An unreadable file, a malformed line (named by number) or a file without any
/// record is a configuration error.
pub fn load_trust_anchors(path: &Path) -> Result<TrustAnchors, ConfigError> {
    const SETTING: &str = "--veraid-trust-anchors (LETRO_VERAID_TRUST_ANCHORS)";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(SETTING, format!("{}: {e}", path.display())))?;
    TrustAnchors::parse(&text)
        .map_err(|e| ConfigError::new(SETTING, format!("{}: {e}", path.display())))
}

/// Extra certificate authorities for an https sink (`--sink-ca-file`), trusted beside
/// the system's roots: a private CA in front of the broker, a service mesh's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkCa {
    /// The PEM file they were read from.
    pub file: PathBuf,
    /// Its certificates, in file order (at least one).
    pub certificates: Vec<CaCertificate>,
}

/// One CA certificate of `--sink-ca-file`.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// The certificate (DER), as the TLS client takes it.
    pub der: Vec<u8>,
    /// Its subject (RFC 4514), for `check-config` and errors.
    pub subject: String,
    /// The end of its validity (`2030-01-01T00:00:00Z`).
    pub not_after: String,
}

impl fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCertificate")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Reads `--sink-ca-file`: one or more PEM certificates (`-----BEGIN CERTIFICATE-----`;
/// other PEM sections, such as a key, are ignored). A missing or unreadable file, broken
/// PEM, no certificate at all, or a certificate the TLS client cannot take as a trust
/// anchor (named by its place in the file) is a configuration error.
pub fn load_sink_ca(path: &Path) -> Result<SinkCa, ConfigError> {
    use der::Decode;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    const SETTING: &str = "--sink-ca-file (LETRO_SINK_CA_FILE)";
    let error = |reason: String| ConfigError::new(SETTING, format!("{}: {reason}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let mut certificates = Vec::new();
    for (index, item) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
        let n = index + 1;
        let der = item.map_err(|e| error(format!("certificate {n}: not valid PEM: {e}")))?;
        let parsed = x509_cert::Certificate::from_der(der.as_ref())
            .map_err(|e| error(format!("certificate {n}: not an X.509 certificate: {e}")))?;
        // The check the sink's TLS client makes of each extra root.
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| {
                error(format!(
                    "certificate {n}: not usable as a trust anchor: {e}"
                ))
            })?;
        let tbs = parsed.tbs_certificate();
        certificates.push(CaCertificate {
            der: der.as_ref().to_vec(),
            subject: tbs.subject().to_string(),
            not_after: tbs.validity().not_after.to_string(),
        });
    }
    if certificates.is_empty() {
        return Err(error(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".to_owned(),
        ));
    }
    Ok(SinkCa {
        file: path.to_owned(),
        certificates,
    })
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The database.
    pub database: DatabaseConfig,
    /// Where outgoing events go (`K_SINK`); without one they wait in the outbox.
    pub sink: Option<reqwest::Url>,
    /// Extra CA certificates trusted for an https sink, beside the system's roots.
    pub sink_ca: Option<SinkCa>,
    /// Extensions to add to every outgoing event (`K_CE_OVERRIDES`).
    pub ce_overrides: Vec<(String, String)>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// First retry delay; doubles per attempt.
    pub retry_base_delay: Duration,
    /// Longest retry delay.
    pub retry_max_delay: Duration,
    /// Time allowed for one delivery to the sink.
    pub sink_timeout: Duration,
    /// Deliveries in flight at once.
    pub delivery_concurrency: usize,
    /// Expiry of outgoing messages, after their time.
    pub message_ttl: Duration,
    /// How long a pairing request waits for its reverse half.
    pub request_ttl: Duration,
    /// The key of VeraId digests; generated and stored in the database if absent.
    pub veraid_secret: Option<Secret>,
    /// How often expired requests are purged.
    pub purge_interval: Duration,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// Caps on waiting requests.
    pub limits: PendingLimits,
    /// How tmp matches list the two VeraIds: `contact-first` for clients built to the
    /// protocol document, `recipient-first` for the 2023 Letro for Android app.
    pub tmp_match_order: MatchOrder,
    /// The DNSSEC trust anchors VeraId bundles are verified from: IANA's root anchors
    /// unless `--veraid-trust-anchors` names a file.
    pub veraid_trust_anchors: TrustAnchors,
    /// The file the trust anchors were read from, if not the built-in ones.
    pub veraid_trust_anchors_file: Option<PathBuf>,
    /// Time allowed for a client to send the request line and headers.
    pub header_read_timeout: Duration,
    /// Time allowed for a client to send the body, once the headers are in.
    pub body_read_timeout: Duration,
    /// Most HTTP connections open at once; beyond, new ones get 503 and are closed.
    pub max_connections: usize,
    /// How often repeated log lines (storage failures, refused connections, read
    /// timeouts) are summarised with a count, after the first is logged in full.
    pub log_summary_interval: Duration,
    /// The most pending requests kept at once; `None`: no ceiling.
    pub pending_ceiling: Option<u64>,
    /// How often the pending requests are counted against the ceiling.
    pub pending_count_interval: Duration,
    /// Serve `POST /noop`, which reads the body and answers 204 without decoding or
    /// storing anything: the benchmark's ceiling. Off in production.
    pub noop_route: bool,
}

impl Config {
    /// The defaults, with the given bind address and database.
    pub fn new(bind: SocketAddr, database: DatabaseConfig) -> Self {
        Self {
            bind,
            database,
            sink: None,
            sink_ca: None,
            ce_overrides: Vec::new(),
            max_body_bytes: defaults::MAX_BODY_BYTES,
            retry_base_delay: defaults::RETRY_BASE_DELAY,
            retry_max_delay: defaults::RETRY_MAX_DELAY,
            sink_timeout: defaults::SINK_TIMEOUT,
            delivery_concurrency: defaults::DELIVERY_CONCURRENCY,
            message_ttl: defaults::MESSAGE_TTL,
            request_ttl: defaults::REQUEST_TTL,
            veraid_secret: None,
            purge_interval: defaults::PURGE_INTERVAL,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            limits: PendingLimits {
                per_sender: defaults::MAX_PENDING_PER_SENDER,
                per_target: defaults::MAX_PENDING_PER_TARGET,
                refuse_endpoint_replacement: false,
            },
            tmp_match_order: MatchOrder::ContactFirst,
            veraid_trust_anchors: TrustAnchors::iana(),
            veraid_trust_anchors_file: None,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            body_read_timeout: defaults::BODY_READ_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            log_summary_interval: defaults::LOG_SUMMARY_INTERVAL,
            pending_ceiling: Some(defaults::MAX_PENDING_REQUESTS),
            pending_count_interval: defaults::PENDING_COUNT_INTERVAL,
            noop_route: false,
        }
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.message_ttl.is_zero() || self.message_ttl > defaults::MAX_MESSAGE_TTL {
            return Err(ConfigError::new(
                "--message-ttl (LETRO_MESSAGE_TTL)",
                "must be more than 0 and at most 180 days (the Awala parcel limit)",
            ));
        }
        if self.request_ttl.is_zero() {
            return Err(ConfigError::new(
                "--request-ttl (LETRO_REQUEST_TTL)",
                "must be more than 0",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "--max-body-bytes (LETRO_MAX_BODY_BYTES)",
                "must be at least 1024",
            ));
        }
        if self.retry_base_delay.is_zero() || self.retry_max_delay < self.retry_base_delay {
            return Err(ConfigError::new(
                "--retry-max-delay (LETRO_RETRY_MAX_DELAY)",
                "must be at least the base delay, which must be more than 0",
            ));
        }
        if self.sink_timeout.is_zero() {
            return Err(ConfigError::new(
                "--sink-timeout (LETRO_SINK_TIMEOUT)",
                "must be more than 0",
            ));
        }
        if self.delivery_concurrency == 0 {
            return Err(ConfigError::new(
                "--delivery-concurrency (LETRO_DELIVERY_CONCURRENCY)",
                "must be at least 1",
            ));
        }
        if self.purge_interval.is_zero() {
            return Err(ConfigError::new(
                "--purge-interval (LETRO_PURGE_INTERVAL)",
                "must be more than 0",
            ));
        }
        if self.limits.per_sender == 0 {
            return Err(ConfigError::new(
                "--max-pending-per-sender (LETRO_MAX_PENDING_PER_SENDER)",
                "must be at least 1",
            ));
        }
        if self.limits.per_target == 0 {
            return Err(ConfigError::new(
                "--max-pending-per-target (LETRO_MAX_PENDING_PER_TARGET)",
                "must be at least 1",
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err(ConfigError::new(
                "--header-read-timeout (LETRO_HEADER_READ_TIMEOUT)",
                "must be more than 0",
            ));
        }
        if self.body_read_timeout.is_zero() {
            return Err(ConfigError::new(
                "--body-read-timeout (LETRO_BODY_READ_TIMEOUT)",
                "must be more than 0",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "--max-connections (LETRO_MAX_CONNECTIONS)",
                "must be at least 1",
            ));
        }
        if self.pending_count_interval.is_zero() {
            return Err(ConfigError::new(
                "--pending-count-interval (LETRO_PENDING_COUNT_INTERVAL)",
                "must be more than 0",
            ));
        }
        if self.log_summary_interval.is_zero() {
            return Err(ConfigError::new(
                "--log-summary-interval (LETRO_LOG_SUMMARY_INTERVAL)",
                "must be more than 0",
            ));
        }
        if let Some(secret) = &self.veraid_secret
            && secret.0.len() < 16
        {
            return Err(ConfigError::new(
                "--veraid-secret (LETRO_VERAID_SECRET)",
                "must be at least 16 bytes (32 hex digits)",
            ));
        }
        Ok(())
    }
}

/// Parses `K_SINK`.
pub fn parse_sink(url: &str) -> Result<reqwest::Url, ConfigError> {
    let setting = "--sink (K_SINK)";
    let url = reqwest::Url::parse(url).map_err(|e| ConfigError::new(setting, e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(setting, "must be an http or https URL"));
    }
    Ok(url)
}

/// Parses `K_CE_OVERRIDES`: `{"extensions": {"name": "value", ...}}`.
pub fn parse_ce_overrides(json: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let setting = "--ce-overrides (K_CE_OVERRIDES)";
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| ConfigError::new(setting, e.to_string()))?;
    let Some(extensions) = value.get("extensions") else {
        return Ok(Vec::new());
    };
    let Some(extensions) = extensions.as_object() else {
        return Err(ConfigError::new(
            setting,
            "\"extensions\" must be an object",
        ));
    };
    let mut out = Vec::new();
    for (name, value) in extensions {
        let value = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(ConfigError::new(
                    setting,
                    format!("extension {name:?} must be a scalar"),
                ));
            }
        };
        let name_ok = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !name_ok || !is_header_safe(&value) {
            return Err(ConfigError::new(
                setting,
                format!(
                    "extension {name:?} needs a lower-case alphanumeric name and a printable ASCII value"
                ),
            ));
        }
        out.push((name.clone(), value));
    }
    Ok(out)
}

/// Parses `LETRO_VERAID_SECRET` (hex).
pub fn parse_secret(hex_text: &str) -> Result<Secret, ConfigError> {
    hex::decode(hex_text.trim())
        .map(Secret)
        .map_err(|_| ConfigError::new("--veraid-secret (LETRO_VERAID_SECRET)", "must be hex"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls() {
        let p = sqlite_path;
        assert_eq!(p("sqlite://letro.db"), Some("letro.db".into()));
        assert_eq!(
            p("sqlite:///var/lib/letro.db"),
            Some("/var/lib/letro.db".into())
        );
        assert_eq!(p("sqlite:data/letro.db"), Some("data/letro.db".into()));
        assert_eq!(p("sqlite://x.db?mode=rwc"), Some("x.db".into()));
        assert_eq!(p("sqlite://"), None);
        assert_eq!(p("postgres://h/db"), None);
    }

    #[test]
    fn passwords_never_show_in_urls() {
        let show = |u: &str| redacted_url(&reqwest::Url::parse(u).expect("url"));
        assert_eq!(
            show("postgres://letro:hunter2@db/letro?sslmode=require"),
            "postgres://letro:***@db/letro?sslmode=require"
        );
        let shown = show("postgres://letro@db/letro?Password=hunter2&sslpassword=x2&a=b");
        assert!(
            !shown.contains("hunter2") && !shown.contains("x2"),
            "{shown}"
        );
        assert!(shown.contains("a=b"), "{shown}");
        assert_eq!(show("http://broker/ns/default"), "http://broker/ns/default");
    }

    #[test]
    fn durations_print_as_they_are_written_and_parse_back() {
        for (d, text) in [
            (defaults::REQUEST_TTL, "90days"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(90_000), "1day 1h"),
        ] {
            let shown = HumanDuration(d).to_string();
            assert_eq!(shown, text);
            assert_eq!(shown.parse::<HumanDuration>().map(|h| h.0), Ok(d));
        }
    }

    fn config() -> Config {
        Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            DatabaseConfig::from_url("sqlite://x.db", SqliteSync::Full, PoolSettings::default())
                .expect("url"),
        )
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn ttl_is_capped_at_180_days() {
        let mut c = config();
        c.message_ttl = 180 * DAY;
        assert!(c.validate().is_ok());
        c.message_ttl = 181 * DAY;
        let e = c.validate().expect_err("too long");
        assert!(e.to_string().contains("LETRO_MESSAGE_TTL"), "{e}");
    }

    #[test]
    fn other_ranges() {
        let mut c = config();
        c.retry_max_delay = Duration::from_millis(1);
        assert!(c.validate().is_err());
        let mut c = config();
        c.veraid_secret = Some(Secret(vec![0; 8]));
        assert!(c.validate().is_err());
        let mut c = config();
        c.max_body_bytes = 10;
        assert!(c.validate().is_err());
    }

    #[test]
    fn database_urls() {
        let parse = |url| DatabaseConfig::from_url(url, SqliteSync::Full, PoolSettings::default());
        assert!(matches!(
            parse("sqlite:///tmp/a.db"),
            Ok(DatabaseConfig::Sqlite { .. })
        ));
        let Ok(DatabaseConfig::Postgres { url, .. }) = parse("postgres://u:hunter2@db:5432/letro")
        else {
            panic!("a PostgreSQL URL");
        };
        assert_eq!(url.to_string(), "postgres://u:***@db:5432/letro");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(parse("postgresql://db/letro").is_ok());
        let e = parse("mysql://x").expect_err("unsupported");
        assert!(e.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn sink_and_overrides() {
        assert!(parse_sink("http://broker/ns/default").is_ok());
        assert!(parse_sink("ftp://x").is_err());
        assert!(parse_sink("not a url").is_err());
        assert_eq!(
            parse_ce_overrides(r#"{"extensions":{"team":"letro","n":1}}"#),
            Ok(vec![
                ("n".into(), "1".into()),
                ("team".into(), "letro".into())
            ])
        );
        assert_eq!(parse_ce_overrides("{}"), Ok(vec![]));
        assert!(parse_ce_overrides(r#"{"extensions":{"Bad":"x"}}"#).is_err());
        assert!(parse_ce_overrides(r#"{"extensions":{"ok":"has space"}}"#).is_err());
        assert!(parse_ce_overrides("[").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let s = parse_secret("00112233445566778899aabbccddeeff").expect("hex");
        assert_eq!(s.0.len(), 16);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(parse_secret("zz").is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(
            "10s".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_secs(10))
        );
        assert_eq!("90days".parse::<HumanDuration>().map(|d| d.0), Ok(90 * DAY));
        assert_eq!(HumanDuration(Duration::from_secs(10)).to_string(), "10s");
    }
}
