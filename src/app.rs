//! Wiring: builds the store, the dispatcher and the HTTP server from a [`Config`], and
//! runs them until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bundles::BundleVerifier;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, DatabaseConfig, Secret, SqliteSync};
use crate::domain::{Timestamp, VeraIdDigester};
use crate::http::{AppState, Routes, ServeOptions, serve};
use crate::outbox::{Backoff, Dispatcher, HttpSink};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::{SqliteStore, Synchronous};
use crate::store::{DiskStep, Store, settings};
use crate::telemetry::Metrics;

/// The limits on open files: before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The soft limit the process started with.
    pub soft_before: Option<u64>,
    /// The soft limit now.
    pub soft: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit, and logs both. Each connection
/// takes a descriptor; the usual soft limit of 1,024 is what an idle flood exhausted
/// first, while `--max-connections` is the bound meant to apply. A warning says when
/// the soft limit stays below `max_connections` and the descriptors the server needs
/// beside them.
#[cfg(unix)]
pub fn raise_fd_limit(max_connections: usize) -> FdLimits {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let mut limits = FdLimits {
        soft_before: before.current,
        soft: before.current,
        hard: before.maximum,
    };
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limits.soft = getrlimit(Resource::Nofile).current,
            Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
        }
    }
    let shown = |l: Option<u64>| l.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
    tracing::info!(
        soft_before = limits.soft_before,
        soft = limits.soft,
        hard = limits.hard,
        "file descriptor limit: soft {} (was {}), hard {}",
        shown(limits.soft),
        shown(limits.soft_before),
        shown(limits.hard)
    );
    // Descriptors beside the connections: the listener, the database, the sink's
    // connections (one per delivery in flight), logs.
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(512);
    if limits.soft.is_some_and(|soft| soft < needed) {
        tracing::warn!(
            soft = limits.soft,
            max_connections,
            "the file descriptor limit is below --max-connections and the descriptors the \
             server needs beside them: accept may fail before the cap applies"
        );
    }
    limits
}

/// Who opens the database, which decides what opening it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// `serve`, starting at `now`: create and migrate as needed; on SQLite, release a
    /// dead process's leases.
    Serve {
        /// When the server starts.
        now: Timestamp,
    },
    /// `migrate`: create and migrate as needed, leaving a running server's leases alone.
    Migrate,
    /// An admin command beside the server: the database must exist with this binary's
    /// schema; nothing is created, migrated or released; PostgreSQL gets a small pool.
    Admin,
}

/// Opens the configured database for `opening`.
pub async fn open_store(
    database: &DatabaseConfig,
    opening: Opening,
) -> anyhow::Result<Arc<dyn Store>> {
    match database {
        DatabaseConfig::Sqlite { path, synchronous } => {
            let synchronous = match synchronous {
                SqliteSync::Full => Synchronous::Full,
                SqliteSync::Normal => Synchronous::Normal,
            };
            let store = match opening {
                Opening::Serve { now } => SqliteStore::open(path, synchronous, now),
                Opening::Migrate => SqliteStore::open_to_migrate(path, synchronous),
                Opening::Admin => SqliteStore::open_existing(path, synchronous),
            }
            .with_context(|| format!("opening SQLite database {}", path.display()))?;
            Ok(Arc::new(store))
        }
        DatabaseConfig::Postgres { url, pool } => {
            let store = match opening {
                Opening::Serve { .. } | Opening::Migrate => {
                    PostgresStore::connect(&url.0, pool.max_connections, pool.timeout).await
                }
                Opening::Admin => {
                    let connections = pool.max_connections.min(2);
                    PostgresStore::connect_existing(&url.0, connections, pool.timeout).await
                }
            }
            .with_context(|| format!("opening PostgreSQL database {url}"))?;
            Ok(Arc::new(store))
        }
    }
}

/// The secret that keys VeraId digests: the configured one, or the one generated on the
/// first start and kept in the database. Either way its fingerprint is recorded, and the
/// recorded fingerprint is the authority: a server whose secret differs refuses to
/// start, since its digests would never match the requests already waiting. The first
/// secret to record its fingerprint wins, whichever replica it came from; a generated
/// secret that lost that race stays behind unused (only a fingerprint says which secret
/// the database uses).
async fn veraid_secret(store: &dyn Store, configured: Option<&Secret>) -> anyhow::Result<Vec<u8>> {
    const WHY: &str = "pairing requests already waiting would never match; keep the \
                       secret the database was first started with";
    let read = |name| async move {
        store
            .setting(name)
            .await
            .context("loading the VeraId digest secret")
    };
    let recorded = read(settings::VERAID_SECRET_FINGERPRINT).await?;
    let generated = read(settings::VERAID_SECRET).await?;
    let secret = match (configured, &recorded) {
        (Some(secret), _) => secret.0.clone(),
        (None, None) => match generated.clone() {
            Some(generated) => generated,
            None => {
                let mut candidate = vec![0u8; 32];
                rand::fill(&mut candidate[..]);
                store
                    .setting_or_insert(settings::VERAID_SECRET, candidate)
                    .await
                    .context("storing the VeraId digest secret")?
            }
        },
        (None, Some(recorded)) => match generated.clone() {
            Some(generated) if fingerprint(&generated) == *recorded => generated,
            // Checked before generating one: a refused start leaves nothing behind.
            _ => anyhow::bail!(
                "this database was started with --veraid-secret (LETRO_VERAID_SECRET), \
                 which is not set now: {WHY}"
            ),
        },
    };
    let mine = fingerprint(&secret);
    let recorded = store
        .setting_or_insert(settings::VERAID_SECRET_FINGERPRINT, mine.clone())
        .await
        .context("checking the VeraId digest secret")?;
    if recorded != mine {
        // `generated` is still what was read above: a configured secret stores nothing.
        if configured.is_some() && generated.is_some_and(|g| fingerprint(&g) == recorded) {
            anyhow::bail!(
                "--veraid-secret (LETRO_VERAID_SECRET) is set, but this database was \
                 started without it and uses the secret it generated: {WHY}"
            );
        }
        anyhow::bail!(
            "the VeraId digest secret is not the one this database was started with \
             (--veraid-secret / LETRO_VERAID_SECRET changed, or was removed): {WHY}"
        );
    }
    if configured.is_some() && generated.is_some_and(|g| g != secret) {
        // A database from before fingerprints that was started without a secret and
        // given one later: the configured secret is the one in use.
        tracing::warn!(
            "the database also holds a generated VeraId secret, unused while \
             LETRO_VERAID_SECRET is set"
        );
    }
    Ok(secret)
}

fn fingerprint(secret: &[u8]) -> Vec<u8> {
    VeraIdDigester::new(secret).fingerprint()
}

/// A server ready to run: the listener is bound and the database open.
pub struct App {
    listener: TcpListener,
    state: AppState,
    config: Config,
}

impl App {
    /// Opens the database, loads or creates the VeraId secret and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`build`](Self::build), reading the time from `clock`: tests move a
    /// [`ManualClock`](crate::clock::ManualClock) instead of sleeping.
    pub async fn build_with_clock(config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        config.validate()?;
        let opening = Opening::Serve { now: clock.now() };
        let store = open_store(&config.database, opening).await?;
        Self::build_on_store(config, store, clock).await
    }

    /// [`build_with_clock`](Self::build_with_clock) on a store already open (tests wrap
    /// one to count or fail its calls); `config.database` is not opened.
    pub async fn build_on_store(
        config: Config,
        store: Arc<dyn Store>,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let secret = veraid_secret(store.as_ref(), config.veraid_secret.as_ref()).await?;
        let metrics = Arc::new(Metrics::new());
        let observed = metrics.clone();
        store.observe_disk(Arc::new(move |step, took| {
            observed.sqlite_disk(step == DiskStep::Checkpoint, took);
        }));
        let dispatcher = match &config.sink {
            Some(url) => {
                let sink = HttpSink::new(
                    url.clone(),
                    config.sink_timeout,
                    config.ce_overrides.clone(),
                    &config
                        .sink_ca
                        .iter()
                        .flat_map(|ca| &ca.certificates)
                        .map(|c| c.der.clone())
                        .collect::<Vec<_>>(),
                )
                .context("building the sink HTTP client")?;
                Some(Dispatcher::new(
                    store.clone(),
                    sink,
                    Backoff {
                        base: config.retry_base_delay,
                        cap: config.retry_max_delay,
                    },
                    config.sink_timeout,
                    config.delivery_concurrency,
                    metrics.clone(),
                    clock.clone(),
                ))
            }
            None => None,
        };
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {}", config.bind))?;
        let state = AppState {
            store,
            clock,
            digester: VeraIdDigester::new(&secret),
            metrics,
            dispatcher,
            max_body_bytes: config.max_body_bytes,
            request_ttl: config.request_ttl,
            message_ttl: config.message_ttl,
            limits: config.limits,
            match_order: config.tmp_match_order,
            bundles: Arc::new(BundleVerifier::new(config.veraid_trust_anchors.clone())),
            body_read_timeout: config.body_read_timeout,
            repeats: Arc::default(),
            store_counts: Arc::default(),
            pending_ceiling: config.pending_ceiling,
        };
        Ok(Self {
            listener,
            state,
            config,
        })
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state: store, metrics, dispatcher.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves; then stops taking connections, answers the
    /// requests in flight, lets deliveries in flight finish, and closes the database.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            config,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(address = %addr, "listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        // One deadline for the whole shutdown, from the signal: the HTTP drain and the
        // delivery drain run at the same time, and the platform's grace period counts
        // from the signal too.
        let stopped_at = Arc::new(std::sync::OnceLock::new());
        let signalled = stopped_at.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = signalled.set(tokio::time::Instant::now());
            let _ = stop_tx.send(true);
        });

        let dispatcher = match state.dispatcher.clone() {
            Some(d) => Some(tokio::spawn(d.run(stop_rx.clone()))),
            None => {
                tracing::warn!("no sink configured (K_SINK): outgoing messages wait in the outbox");
                None
            }
        };
        let purger = tokio::spawn(purge_loop(
            state.store.clone(),
            state.clock.clone(),
            config.purge_interval,
            stop_rx.clone(),
        ));

        let reclaimer = tokio::spawn(reclaim_loop(state.store.clone(), stop_rx.clone()));

        // The ceiling is judged by a count made in the background, never by a request.
        let counter = config.pending_ceiling.map(|_| {
            let (every, stop) = (config.pending_count_interval, stop_rx.clone());
            tokio::spawn(
                state
                    .store_counts
                    .clone()
                    .count_every(state.clone(), every, stop),
            )
        });

        let summaries = {
            let repeats = state.repeats.clone();
            let (every, stop) = (config.log_summary_interval, stop_rx.clone());
            tokio::spawn(async move { repeats.summarise_every(every, stop).await })
        };

        let store = state.store.clone();
        let options = ServeOptions {
            header_read_timeout: config.header_read_timeout,
            shutdown_timeout: config.shutdown_timeout,
            max_connections: config.max_connections,
            metrics: state.metrics.clone(),
            repeats: state.repeats.clone(),
        };
        let timeout = config.shutdown_timeout;
        if config.noop_route {
            tracing::warn!("POST /noop is on: a benchmark's ceiling, not for production");
        }
        let routes = Routes::new(state, config.noop_route);
        if !serve(listener, routes, options, stop_rx.clone()).await {
            tracing::warn!("shutdown timeout: dropping connections still open");
        }

        let deadline = stopped_at
            .get()
            .map_or_else(tokio::time::Instant::now, |at| *at)
            + timeout;
        // Past the deadline, tasks are aborted, not just left behind: a dropped store
        // call gives its connection back, so closing the store does not wait for it.
        if let Some(mut task) = dispatcher
            && tokio::time::timeout_at(deadline, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!(
                "shutdown timeout: deliveries still in flight will be retried after restart"
            );
        }
        // A purge is one transaction; one cut short is rolled back and done next time.
        let mut purger = purger;
        if tokio::time::timeout_at(deadline, &mut purger)
            .await
            .is_err()
        {
            purger.abort();
            tracing::warn!("shutdown timeout: a purge was cut short");
        }
        let mut reclaimer = reclaimer;
        if tokio::time::timeout_at(deadline, &mut reclaimer)
            .await
            .is_err()
        {
            reclaimer.abort();
        }
        if let Some(counter) = counter {
            counter.abort();
        }
        // The last summaries (counts since the last interval) are written at the stop.
        let _ = summaries.await;
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How often the server asks the store to make the churned tables' space reusable
/// ([`Store::reclaim`]), which does so only where enough has churned. Every 5 s, the
/// outbox of a PostgreSQL server under load held up to 59 thousand dead row versions and
/// PostgreSQL's backends spent 105-206 µs a request, against 20 thousand and 101-122 µs
/// every second (issue 17; docs/operations.md §1.2).
const RECLAIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

async fn reclaim_loop(store: Arc<dyn Store>, mut stop: watch::Receiver<bool>) {
    // One warning per spell of failures: the store's other errors are logged by the
    // requests and deliveries they fail.
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(RECLAIM_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match store.reclaim().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("reclaiming the outbox's space works again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not reclaim the outbox's space; will try again");
            }
            Err(_) => {}
        }
    }
}

async fn purge_loop(
    store: Arc<dyn Store>,
    clock: SharedClock,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match store.purge_expired(clock.now()).await {
            Ok(report) if report.requests + report.events > 0 => tracing::info!(
                requests = report.requests,
                events = report.events,
                "purged expired pairing requests and event keys"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purge failed; will try again"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
