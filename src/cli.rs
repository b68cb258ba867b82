//! Command-line interface: every setting once, as a flag with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::codec::pairing::MatchOrder;
use crate::config::{
    Config, ConfigError, DatabaseConfig, HumanDuration, PoolSettings, SqliteSync, defaults,
    load_sink_ca, load_trust_anchors, parse_ce_overrides, parse_secret, parse_sink,
};
use crate::domain::PendingLimits;
use crate::telemetry::LogFormat;

/// letro-server: the contact-pairing broker of Letro, on the Awala network.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "LETRO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve CloudEvents over HTTP and deliver outgoing messages to the sink.
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate(DatabaseArgs),
    /// Check the settings `serve` would run with (flags and environment), print them with
    /// secrets hidden, and exit: 0 if valid, 2 if not. Does not touch the database.
    CheckConfig(Box<ServeArgs>),
    /// Inspect the outbox of outgoing messages, or make failed ones due now.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Inspect pending pairing requests (counts only), or purge expired ones.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// Play two Letro users pairing through a server on a temporary database, and print
    /// every message exchanged.
    Demo(DemoArgs),
}

/// `outbox` subcommands. They can run beside the server, on the same database.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Counts: waiting, due now, failing; the oldest message and the next attempt.
    Status(ReportArgs),
    /// The waiting messages, next attempt first (ids, kinds, recipients, attempts,
    /// last errors; never contents).
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        report: ReportArgs,
        /// How many to show (at least 1).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Make messages that failed at least once due now instead of at the end of their
    /// backoff (for example once the sink is back). A running server picks them up
    /// within 5 seconds, unless it is itself pausing after sink failures. Messages on
    /// their first attempt are left alone; one being retried at that very moment may be
    /// sent twice, with the same id.
    Retry {
        #[command(flatten)]
        #[allow(missing_docs)]
        database: DatabaseArgs,
        /// The message id to retry (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Retry every failed message.
        #[arg(long)]
        all: bool,
    },
}

/// `requests` subcommands.
#[derive(Debug, Subcommand)]
pub enum RequestsCommand {
    /// Counts of waiting and expired pairing requests (no VeraIds, no digests).
    Stats(ReportArgs),
    /// Delete expired pairing requests and processed-event keys now (the server also
    /// does it every --purge-interval).
    PurgeExpired(DatabaseArgs),
}

/// A database and an output format.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Settings of `demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Also print each message in full (CloudEvent headers and body).
    #[arg(long)]
    pub verbose: bool,
    /// Play the Letro for Android releases of 2023: matches with the recipient's own
    /// VeraId first (--tmp-match-order recipient-first), authorisations sent as
    /// pairing-auth and forwarded unchanged.
    #[arg(long)]
    pub android_2023: bool,
    /// Play today's Letro apps: pairing requests signed with VeraId by members of two
    /// mock organisations, whose mock DNSSEC root the server trusts; each party gets
    /// the other's bundle byte for byte; then a replayed bundle gets a failure.
    #[arg(long, conflicts_with = "android_2023")]
    pub signed: bool,
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database URL: sqlite://PATH (relative) or sqlite:///ABSOLUTE/PATH, or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE. `serve` and `migrate` create a
    /// missing SQLite file and upgrade the schema; the other commands need both done.
    #[arg(long = "database", env = "DATABASE_URL", default_value = defaults::DATABASE, hide_env_values = true)]
    pub url: String,
    /// SQLite commit durability.
    #[arg(long, env = "LETRO_SQLITE_SYNCHRONOUS", value_enum, default_value_t = SqliteSync::Full)]
    pub sqlite_synchronous: SqliteSync,
    /// PostgreSQL: most connections per replica.
    #[arg(long, env = "LETRO_DB_MAX_CONNECTIONS", default_value_t = defaults::DB_MAX_CONNECTIONS)]
    pub db_max_connections: u32,
    /// PostgreSQL: time allowed to connect or to get a free connection; then 503.
    #[arg(long, env = "LETRO_DB_TIMEOUT", default_value_t = HumanDuration(defaults::DB_TIMEOUT))]
    pub db_timeout: HumanDuration,
}

impl DatabaseArgs {
    /// The validated database configuration.
    pub fn to_config(&self) -> Result<DatabaseConfig, ConfigError> {
        let pool = PoolSettings {
            max_connections: self.db_max_connections,
            timeout: self.db_timeout.0,
        };
        DatabaseConfig::from_url(&self.url, self.sqlite_synchronous, pool)
    }
}

/// `--tmp-match-order` (clap's spelling of [`MatchOrder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatchOrderArg {
    /// `contactVeraId,recipientVeraId,...`: clients built to the protocol document.
    ContactFirst,
    /// `recipientVeraId,contactVeraId,...`: the Letro for Android releases of 2023.
    RecipientFirst,
}

/// Settings of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:$PORT].
    #[arg(long, env = "LETRO_BIND")]
    pub bind: Option<SocketAddr>,
    /// Port to listen on when --bind is not given.
    #[arg(long, env = "PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,
    /// Where outgoing CloudEvents are POSTed (the Knative SinkBinding sets K_SINK).
    /// Without a sink, outgoing messages wait in the outbox.
    #[arg(long, env = "K_SINK")]
    pub sink: Option<String>,
    /// PEM file of one or more CA certificates to trust for an https sink, beside the
    /// system's roots (a private CA, a service mesh's). Read and checked at start.
    #[arg(long, env = "LETRO_SINK_CA_FILE")]
    pub sink_ca_file: Option<PathBuf>,
    /// Extensions to add to outgoing events, as Knative's JSON {"extensions": {...}}.
    #[arg(long, env = "K_CE_OVERRIDES")]
    pub ce_overrides: Option<String>,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "LETRO_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// First delay before retrying a failed delivery; doubles on every attempt.
    #[arg(long, env = "LETRO_RETRY_BASE_DELAY", default_value_t = HumanDuration(defaults::RETRY_BASE_DELAY))]
    pub retry_base_delay: HumanDuration,
    /// Longest delay between delivery attempts.
    #[arg(long, env = "LETRO_RETRY_MAX_DELAY", default_value_t = HumanDuration(defaults::RETRY_MAX_DELAY))]
    pub retry_max_delay: HumanDuration,
    /// Time allowed for one delivery to the sink.
    #[arg(long, env = "LETRO_SINK_TIMEOUT", default_value_t = HumanDuration(defaults::SINK_TIMEOUT))]
    pub sink_timeout: HumanDuration,
    /// Deliveries in flight at once.
    #[arg(long, env = "LETRO_DELIVERY_CONCURRENCY", default_value_t = defaults::DELIVERY_CONCURRENCY)]
    pub delivery_concurrency: usize,
    /// Expiry of outgoing messages after their creation (at most 180 days).
    #[arg(long, env = "LETRO_MESSAGE_TTL", default_value_t = HumanDuration(defaults::MESSAGE_TTL))]
    pub message_ttl: HumanDuration,
    /// How long a pairing request waits for its reverse half.
    #[arg(long, env = "LETRO_REQUEST_TTL", default_value_t = HumanDuration(defaults::REQUEST_TTL))]
    pub request_ttl: HumanDuration,
    /// Hex key for VeraId digests. If absent, one is generated on first start and kept
    /// in the database.
    #[arg(long, env = "LETRO_VERAID_SECRET", hide_env_values = true)]
    pub veraid_secret: Option<String>,
    /// How often expired pairing requests are purged.
    #[arg(long, env = "LETRO_PURGE_INTERVAL", default_value_t = HumanDuration(defaults::PURGE_INTERVAL))]
    pub purge_interval: HumanDuration,
    /// How long shutdown waits for requests and deliveries in flight.
    #[arg(long, env = "LETRO_SHUTDOWN_TIMEOUT", default_value_t = HumanDuration(defaults::SHUTDOWN_TIMEOUT))]
    pub shutdown_timeout: HumanDuration,
    /// Most pairing requests one endpoint may have waiting; more are refused (204).
    /// 4294967295 means no cap (and saves counting them).
    #[arg(long, env = "LETRO_MAX_PENDING_PER_SENDER", default_value_t = defaults::MAX_PENDING_PER_SENDER)]
    pub max_pending_per_sender: u32,
    /// Most pairing requests one endpoint may have waiting for one target VeraId; more
    /// from that endpoint are refused (204). Others' requests for the target still wait.
    #[arg(long, env = "LETRO_MAX_PENDING_PER_TARGET", default_value_t = defaults::MAX_PENDING_PER_TARGET)]
    pub max_pending_per_target: u32,
    /// Refuse a pairing request that would replace a waiting one from another endpoint
    /// (by default it replaces it, so that a reinstalled app can pair; either way it is
    /// logged and counted).
    #[arg(long, env = "LETRO_REFUSE_ENDPOINT_REPLACEMENT")]
    pub refuse_endpoint_replacement: bool,
    /// Order of the two VeraIds in a tmp pairing match: contact-first (the protocol
    /// document) or recipient-first (the Letro for Android releases of 2023).
    #[arg(long, env = "LETRO_TMP_MATCH_ORDER", value_enum, default_value_t = MatchOrderArg::ContactFirst)]
    pub tmp_match_order: MatchOrderArg,
    /// File of DNSSEC trust anchors for VeraId: DS records of the root zone in zone-file
    /// form, one per line, `;` comments. Unset: IANA's root anchors (key tags 20326 and
    /// 38696). For private roots and tests.
    #[arg(long, env = "LETRO_VERAID_TRUST_ANCHORS")]
    pub veraid_trust_anchors: Option<PathBuf>,
    /// Time a client has to send the request line and headers before it is disconnected.
    #[arg(long, env = "LETRO_HEADER_READ_TIMEOUT", default_value_t = HumanDuration(defaults::HEADER_READ_TIMEOUT))]
    pub header_read_timeout: HumanDuration,
    /// Time a client has to send the body after its headers; slower ones get 408.
    #[arg(long, env = "LETRO_BODY_READ_TIMEOUT", default_value_t = HumanDuration(defaults::BODY_READ_TIMEOUT))]
    pub body_read_timeout: HumanDuration,
    /// Most HTTP connections open at once (idle keep-alive ones included); beyond, new
    /// connections get 503 and are closed.
    #[arg(long, env = "LETRO_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// How often a repeated log line (storage failures, refused connections, read
    /// timeouts) is summarised with its count; the first of each interval is logged.
    #[arg(long, env = "LETRO_LOG_SUMMARY_INTERVAL", default_value_t = HumanDuration(defaults::LOG_SUMMARY_INTERVAL))]
    pub log_summary_interval: HumanDuration,
    /// Most pairing requests kept waiting at once, from all endpoints together; beyond
    /// it a request that would wait is answered 503 (the broker redelivers it later),
    /// while requests that complete a pair still go through. 0: no ceiling.
    #[arg(long, env = "LETRO_MAX_PENDING_REQUESTS", default_value_t = defaults::MAX_PENDING_REQUESTS)]
    pub max_pending_requests: u64,
    /// How often the waiting requests are counted against --max-pending-requests.
    #[arg(long, env = "LETRO_PENDING_COUNT_INTERVAL", default_value_t = HumanDuration(defaults::PENDING_COUNT_INTERVAL))]
    pub pending_count_interval: HumanDuration,
    /// Benchmarks only: serve POST /noop, which answers 204 without touching storage.
    #[arg(long, env = "LETRO_BENCH_NOOP_ROUTE", hide = true)]
    pub bench_noop_route: bool,
}

impl ServeArgs {
    /// The validated configuration.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let bind = self
            .bind
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], self.port)));
        let mut config = Config::new(bind, self.database.to_config()?);
        // An empty K_SINK (a template left blank) means no sink, not a bad URL.
        config.sink = self
            .sink
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(parse_sink)
            .transpose()?;
        config.sink_ca = self
            .sink_ca_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(load_sink_ca)
            .transpose()?;
        config.ce_overrides = match &self.ce_overrides {
            Some(json) => parse_ce_overrides(json)?,
            None => Vec::new(),
        };
        config.max_body_bytes = self.max_body_bytes;
        config.retry_base_delay = self.retry_base_delay.0;
        config.retry_max_delay = self.retry_max_delay.0;
        config.sink_timeout = self.sink_timeout.0;
        config.delivery_concurrency = self.delivery_concurrency;
        config.message_ttl = self.message_ttl.0;
        config.request_ttl = self.request_ttl.0;
        config.veraid_secret = self
            .veraid_secret
            .as_deref()
            .map(parse_secret)
            .transpose()?;
        config.purge_interval = self.purge_interval.0;
        config.shutdown_timeout = self.shutdown_timeout.0;
        config.limits = PendingLimits {
            per_sender: self.max_pending_per_sender,
            per_target: self.max_pending_per_target,
            refuse_endpoint_replacement: self.refuse_endpoint_replacement,
        };
        config.tmp_match_order = match self.tmp_match_order {
            MatchOrderArg::ContactFirst => MatchOrder::ContactFirst,
            MatchOrderArg::RecipientFirst => MatchOrder::RecipientFirst,
        };
        if let Some(path) = &self.veraid_trust_anchors {
            config.veraid_trust_anchors = load_trust_anchors(path)?;
            config.veraid_trust_anchors_file = Some(path.clone());
        }
        config.header_read_timeout = self.header_read_timeout.0;
        config.body_read_timeout = self.body_read_timeout.0;
        config.max_connections = self.max_connections;
        config.log_summary_interval = self.log_summary_interval.0;
        config.pending_ceiling =
            (self.max_pending_requests > 0).then_some(self.max_pending_requests);
        config.pending_count_interval = self.pending_count_interval.0;
        config.noop_route = self.bench_noop_route;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    /// Parses `letro-server serve ARGS`.
    fn serve_args(args: &[&str]) -> ServeArgs {
        let cli =
            Cli::try_parse_from(["letro-server", "serve"].iter().chain(args)).expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("serve expected");
        };
        *args
    }

    #[test]
    fn flags_override_defaults() {
        // Flags only: every setting here is given explicitly, so the environment of the
        // test process does not matter.
        let args = serve_args(&[
            "--bind",
            "127.0.0.1:9000",
            "--database",
            "sqlite:///tmp/x.db",
            "--sink",
            "http://127.0.0.1:1/",
            "--retry-max-delay",
            "2s",
            "--message-ttl",
            "30days",
            "--veraid-secret",
            "00112233445566778899aabbccddeeff",
        ]);
        let config = args.to_config().expect("valid");
        assert_eq!(config.bind, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(config.retry_max_delay.as_secs(), 2);
        assert_eq!(config.message_ttl.as_secs(), 30 * 86_400);
        assert!(config.sink.is_some());
    }

    #[test]
    fn bad_values_name_their_setting() {
        let args = serve_args(&[
            "--bind",
            "127.0.0.1:9000",
            "--database",
            "sqlite://x.db",
            "--message-ttl",
            "200days",
        ]);
        let e = args.to_config().expect_err("too long");
        assert!(e.to_string().contains("LETRO_MESSAGE_TTL"), "{e}");
    }

    #[test]
    fn match_order() {
        let base = ["--bind", "127.0.0.1:9000", "--database", "sqlite://x.db"];
        let order = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            serve_args(&args)
                .to_config()
                .expect("valid")
                .tmp_match_order
        };
        assert_eq!(
            order(&["--tmp-match-order", "contact-first"]),
            MatchOrder::ContactFirst
        );
        assert_eq!(
            order(&["--tmp-match-order", "recipient-first"]),
            MatchOrder::RecipientFirst
        );
        let bad = Cli::try_parse_from(
            ["letro-server", "serve", "--tmp-match-order", "owner-first"]
                .iter()
                .chain(&base),
        )
        .expect_err("not an order");
        // clap exits 2 on a bad value, and names the ones it takes.
        assert_eq!(bad.exit_code(), 2);
        let text = bad.to_string();
        assert!(
            text.contains("contact-first") && text.contains("recipient-first"),
            "{text}"
        );
    }
}
