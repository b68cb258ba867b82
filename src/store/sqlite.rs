//! The embedded SQLite store.
//!
//! One thread owns the connection and runs every operation. Whatever operations are
//! waiting when it finishes a transaction go into the next one (if one fails, the others
//! run again, one transaction each, so one failure does not undo the others), and nobody
//! hears back before the commit has been synced: group commit, one fsync for a whole
//! batch, with the same guarantees as a transaction per request. A single writer also
//! serialises every read-then-write, so two reverse requests can never both match or
//! both miss.

mod events;
mod filter;
mod leases;
mod pending;

use std::cell::{Cell, RefCell};
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::Wal;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    Attempt, DiskObserver, DiskStep, EventMessages, OutboxEntry, OutboxStatus, OutboxSummary,
    PairingOutcome, PairingSubmission, PurgeReport, QueueOutcome, RequestStats, Result, Stats,
    Store, StoreError, StoredMessage, check_schema_version, deliverable,
};
use crate::domain::{EventKey, MessageId, MessageKind, OutgoingMessage, Timestamp};
use crate::flow::{Plan, plan};
pub use events::COUNT_KEYS as COUNT_EVENT_KEYS;
use events::{GENERATION_KEYS, ProcessedEvents};
use leases::Leases;
use pending::{Pending, RECENT_ROWS, Request};

/// Time between two steps of a seal when no request waits; when requests keep the
/// writer busy, a step at least every [`SEAL_PACE_BUSY`] all the same. Waiting for an idle
/// writer alone, at 5,000 req/s a seal would wait until it fell behind and then run its
/// ~80 steps back to back (the slowest requests of those runs came seconds after the
/// seal began; issue 17, stop 31).
const SEAL_PACE: Duration = Duration::from_millis(4);
const SEAL_PACE_BUSY: Duration = Duration::from_millis(25);

/// How long the writer leaves its maintenance after it failed.
const MAINTENANCE_PAUSE: Duration = Duration::from_secs(1);

/// How long a statement waits for a lock another connection holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many queued operations may share one transaction.
const MAX_BATCH: usize = 512;

/// Pages in the write-ahead log after which a commit checkpoints it (why this many: the
/// PRAGMAs in [`SqliteStore::open`]).
const CHECKPOINT_PAGES: std::ffi::c_int = 1000;

/// Durability of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync on every commit: an acknowledged request survives power loss.
    #[default]
    Full,
    /// No fsync on commit: survives a crash of the process, not of the machine.
    Normal,
}

/// One store operation waiting for the writer.
trait Operation: Send {
    /// Runs the operation inside the current transaction, keeping its result; false if it
    /// failed. May run more than once: a later run replaces the earlier result.
    fn run(&mut self, db: &Db) -> bool;
    /// Hands the result over once the transaction it last ran in has ended, with how it
    /// ended: a result is only good if its writes were committed.
    fn finish(self: Box<Self>, transaction: Result<()>);
}

/// An [`Operation`] made of a closure, answering on a oneshot channel.
struct Call<F, T> {
    f: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<F, T> Operation for Call<F, T>
where
    F: FnMut(&Db) -> rusqlite::Result<T> + Send,
    T: Send,
{
    fn run(&mut self, db: &Db) -> bool {
        let result = (self.f)(db).map_err(unavailable);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, transaction: Result<()>) {
        let result = match (self.result, transaction) {
            // Its own failure says more than the rollback it caused.
            (Some(Err(e)), _) | (_, Err(e)) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (None, Ok(())) => Err(StoreError::Unavailable("the operation did not run".into())),
        };
        let _ = self.reply.send(result);
    }
}

type Job = Box<dyn Operation>;

/// What the writer's operations run on: its connection, the generations of
/// processed-event keys, whose filters live in memory beside it, and the recent table of
/// pending requests.
struct Db {
    conn: Connection,
    events: RefCell<ProcessedEvents>,
    pending: Pending,
    /// Only the server seals generations and settles requests: an admin command or
    /// `migrate` beside it would seal the generation the server is still filling.
    maintains: bool,
    /// No maintenance before this, after a failure.
    paused_until: Cell<Option<Instant>>,
    pace_seal: bool,
    last_seal_step: Cell<Option<Instant>>,
    leases: Leases,
    disk: Arc<DiskTimes>,
}

/// The writer's time on disk, for [`Store::observe_disk`]: the observer once the server
/// hands one over; whether the commit under way wrote to the log, and the time the
/// checkpoints it ran took (both told by the log's hook, which runs inside `COMMIT`).
#[derive(Default)]
struct DiskTimes {
    observer: OnceLock<DiskObserver>,
    logged: AtomicBool,
    checkpoint_nanos: AtomicU64,
}

impl std::fmt::Debug for DiskTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTimes")
            .field("observed", &self.observer.get().is_some())
            .finish_non_exhaustive()
    }
}

impl DiskTimes {
    /// The commit under way appended to the log.
    fn logged(&self) {
        self.logged.store(true, Ordering::Relaxed);
    }

    fn checkpointed(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.checkpoint_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(observe) = self.observer.get() {
            observe(DiskStep::Checkpoint, took);
        }
    }

    /// A `COMMIT` that took `took`, checkpoints included. One that failed, or wrote
    /// nothing (a batch of reads: nothing to sync), is not observed.
    fn committed(&self, took: Duration, succeeded: bool) {
        let checkpoints = Duration::from_nanos(self.checkpoint_nanos.swap(0, Ordering::Relaxed));
        let logged = self.logged.swap(false, Ordering::Relaxed);
        if let Some(observe) = self.observer.get().filter(|_| succeeded && logged) {
            observe(DiskStep::Commit, took.saturating_sub(checkpoints));
        }
    }
}

impl Deref for Db {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Sizes of the writer's structures: the defaults, smaller in tests.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    generation_keys: u64,
    recent_rows: u64,
    /// Whether a seal's steps are paced ([`SEAL_PACE`]); tests that count steps take
    /// one after every batch.
    pace_seal: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            generation_keys: GENERATION_KEYS,
            recent_rows: RECENT_ROWS,
            pace_seal: true,
        }
    }
}

impl Db {
    fn open(
        conn: Connection,
        tuning: Tuning,
        maintains: bool,
        disk: Arc<DiskTimes>,
    ) -> rusqlite::Result<Self> {
        let events = RefCell::new(ProcessedEvents::load(&conn, tuning.generation_keys)?);
        let pending = Pending::load(&conn, tuning.recent_rows, maintains)?;
        Ok(Self {
            conn,
            events,
            pending,
            maintains,
            paused_until: Cell::new(None),
            pace_seal: tuning.pace_seal,
            last_seal_step: Cell::new(None),
            leases: Leases::default(),
            disk,
        })
    }

    /// A transaction rolled back: what it did to memory is undone too.
    fn discard(&self) {
        self.leases.discard();
        self.events.borrow_mut().discard();
    }

    /// Work between batches: sealing a full generation of event keys (a step of it,
    /// paced, since each step delays the requests waiting; `idle`: none is), settling
    /// pending requests that have been waiting a while. A failure leaves things as they were (a
    /// generation grows a little past its size, requests stay recent a little longer);
    /// the work is tried again after [`MAINTENANCE_PAUSE`], not after every batch (on a
    /// full disk, that would be a warning and a failed transaction per batch).
    fn maintain(&self, idle: bool) {
        if !self.maintains
            || self
                .paused_until
                .get()
                .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        let mut failed = false;
        let mut events = self.events.borrow_mut();
        // Paced, so that the pages a seal writes (and the checkpoints they bring) are
        // spread over a second or more rather than a burst that requests wait behind.
        let since = self.last_seal_step.get().map(|at| at.elapsed());
        let step = !self.pace_seal
            || events.behind()
            || since.is_none_or(|since| since >= SEAL_PACE_BUSY || (idle && since >= SEAL_PACE));
        if step {
            self.last_seal_step.set(Some(Instant::now()));
        }
        if events.due()
            && let Err(e) = events.seal_step(&self.conn, step)
        {
            tracing::warn!(error = %e, "could not seal a generation of processed-event keys");
            failed = true;
        }
        if let Err(e) = self.pending.settle(&self.conn, crate::clock::now()) {
            tracing::warn!(error = %e, "could not settle pending requests");
            failed = true;
        }
        self.paused_until
            .set(failed.then(|| Instant::now() + MAINTENANCE_PAUSE));
    }
}

enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

/// Who opens the database, which decides what opening it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The one server process, starting at `now`: migrates, and releases a dead
    /// process's leases.
    Server { now: Timestamp },
    /// `migrate`: migrates only.
    Migrator,
    /// An admin command beside the server: needs the current schema, changes nothing.
    Admin,
}

/// The SQLite implementation of [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Msg>,
    /// A second, read-only connection for reads that need no transaction with a write
    /// (readiness, next due time, counts): WAL lets it read while the writer writes, so
    /// a `/metrics` scrape counting a million rows does not stall every request. `None`
    /// once closed.
    reader: Arc<Mutex<Option<Connection>>>,
    /// The outbox leases the writer committed ([`leases`]), for the next due time.
    leases: Arc<Mutex<leases::Held>>,
    /// The server's lock on the file ([`lock_for_serving`]): released once the writer
    /// has stopped (`close`), or when the store is dropped.
    serving: Mutex<Option<std::fs::File>>,
    disk: Arc<DiskTimes>,
}

/// Locks `<path>.lock` for the one server process of a database file. Its outbox leases
/// are in its memory ([`leases`]), so a second server on the same file would send every
/// message the first one sends: it is refused at start instead. The lock is the
/// operating system's (`flock` on Linux), released when the store is dropped or the
/// process dies, however it dies; the empty file stays.
fn lock_for_serving(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = Path::new(&name);
    let failed = |e: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("could not lock {}: {e}", lock.display()))
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(lock)
        .map_err(|e| failed(&e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "another letro-server is serving {} (it holds {}): one server per SQLite file",
            path.display(),
            lock.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(failed(&e)),
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database, and starts its writer thread.
    /// For the one server process that owns the file, starting at `now`: outbox leases
    /// left by an earlier process are released.
    pub fn open(path: &Path, synchronous: Synchronous, now: Timestamp) -> Result<Self> {
        Self::open_as(path, synchronous, Role::Server { now })
    }

    /// [`Self::open`] with at most `recent_rows` pending requests kept recent: with 0,
    /// every waiting request is settled after the batch that stored it (for tests of
    /// settled requests).
    #[doc(hidden)]
    pub fn open_with_recent_rows(
        path: &Path,
        synchronous: Synchronous,
        now: Timestamp,
        recent_rows: u64,
    ) -> Result<Self> {
        let tuning = Tuning {
            recent_rows,
            ..Tuning::default()
        };
        Self::open_tuned(path, synchronous, Role::Server { now }, tuning)
    }

    /// Opens (creating if missing) and migrates the database, for `migrate`, which may
    /// run beside a server: leases are left alone.
    pub fn open_to_migrate(path: &Path, synchronous: Synchronous) -> Result<Self> {
        Self::open_as(path, synchronous, Role::Migrator)
    }

    /// Opens an existing database for an admin command, which may run beside the server:
    /// a missing file is an error (not a new empty database), the schema must already be
    /// this binary's (an admin command never migrates), and leases are left alone.
    pub fn open_existing(path: &Path, synchronous: Synchronous) -> Result<Self> {
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "no database at {}",
                path.display()
            )));
        }
        Self::open_as(path, synchronous, Role::Admin)
    }

    fn open_as(path: &Path, synchronous: Synchronous, role: Role) -> Result<Self> {
        Self::open_tuned(path, synchronous, role, Tuning::default())
    }

    fn open_tuned(
        path: &Path,
        synchronous: Synchronous,
        role: Role,
        tuning: Tuning,
    ) -> Result<Self> {
        let serving = match role {
            Role::Server { .. } => Some(lock_for_serving(path)?),
            Role::Migrator | Role::Admin => None,
        };
        let mut conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        // An 8 MiB page cache (the default is 2 MiB) keeps more of a large database's
        // index pages in memory. Not more: SQLite scans the cache's whole hash table at
        // the end of every write transaction (pcache1TruncateUnsafe, 16% of the writer's
        // time with a 32 MiB cache of 1 KiB pages). A checkpoint runs in the writer and
        // stalls every request while it copies and syncs. While every request wrote a
        // page of its own somewhere in the file, long checkpoints cost the tail: with a
        // million pending, the p99 at half load was 13.5 and 13.1 ms at 1000 pages, 5.8
        // and 5.9 at 250 (issue 17, stop 24). Since new requests wait in a small table
        // (`pending`), most pages a checkpoint copies were rewritten many times since the
        // last, and a longer interval folds more rewrites into one copy: with a million
        // pending, 13.9-16.0k req/s at 1000 pages against 12.0-14.7k at 250 (five runs
        // each, alternated), the p99 at half load 6.5-7.8 ms against 5.5-6.4, and one
        // whole-benchmark run's empty row at 11.2 ms; in a two-minute soak 4% more
        // requests and 9.6-10.1 KiB written per request against 11.8-12.4 (stop 25).
        // So 1000.
        // A statement that may fail half-way inside a transaction keeps a copy of each
        // page it changes (its statement journal): in memory, not in a temporary file
        // (with a savepoint per operation, writing that file was 11% of the writer's time).
        // A deleted row is overwritten with zeros, and so is a page it freed: a delivered
        // match would otherwise leave both parties' VeraIds in the file's free space.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync};
             PRAGMA cache_size = -8192; PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES};
             PRAGMA temp_store = MEMORY; PRAGMA secure_delete = ON;"
        ))
        .map_err(unavailable)?;
        // SQLite recompiles a statement whenever a parameter it planned with changes value
        // (as `LIMIT ?` does): the cap counts were re-prepared on every request (7% of
        // the writer). Our queries have one good plan whatever the values.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(unavailable)?;
        // Every statement the writer runs stays compiled (rusqlite keeps 16 by default;
        // the writer uses about 20, and an evicted one is parsed again).
        conn.set_prepared_statement_cache_capacity(64);
        match role {
            Role::Server { .. } | Role::Migrator => migrate(&conn)?,
            Role::Admin => check_schema_version(schema_version(&conn)?, MIGRATIONS.len(), true)?,
        }
        if let Role::Server { now } = role {
            release_leases(&conn, now).map_err(unavailable)?;
        }
        let maintains = matches!(role, Role::Server { .. });
        let disk = Arc::new(DiskTimes::default());
        if maintains {
            // The server's checkpoints are SQLite's automatic ones, timed: this hook
            // replaces the one `wal_autocheckpoint` set, and does what it did.
            let times = disk.clone();
            conn.wal_hook(Some(move |wal: &mut Wal, pages| {
                times.logged();
                if pages >= CHECKPOINT_PAGES {
                    let started = Instant::now();
                    // Passive, as SQLite's own: it copies what no reader still needs and
                    // never waits. A checkpoint that fails is not the commit's failure
                    // (the transaction is in the log); the next commit tries again.
                    let _ = wal.checkpoint();
                    times.checkpointed(started.elapsed());
                }
                Ok(())
            }))
            .map_err(unavailable)?;
        }
        let db = Db::open(conn, tuning, maintains, disk.clone()).map_err(unavailable)?;
        let leases = db.leases.shared();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer(db, rx))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unavailable)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
        Ok(Self {
            jobs: tx,
            reader: Arc::new(Mutex::new(Some(reader))),
            leases,
            serving: Mutex::new(serving),
            disk,
        })
    }

    /// Moves every pending request into the table of those that have waited a while, as
    /// a server running long enough does: for a benchmark's preloaded database, and tests.
    #[doc(hidden)]
    pub async fn settle_pending(&self) -> Result<u64> {
        self.call(|db| db.pending.settle_all(db).map(|n| n as u64))
            .await
    }

    /// Runs the read `f` on the reader connection, off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let guard = reader.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref() {
                Some(conn) => f(conn).map_err(unavailable),
                None => Err(StoreError::Closed),
            }
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Runs the reads of `f` on the reader connection in one read transaction, so that
    /// they all see the same snapshot (counts that add up), off the async workers.
    async fn read_snapshot<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        self.read(move |conn| {
            let snapshot = conn.unchecked_transaction()?;
            let value = f(&snapshot)?;
            snapshot.commit()?;
            Ok(value)
        })
        .await
    }

    /// Runs `f` on the writer thread, inside the next transaction, and returns its result
    /// once that transaction has committed. `f` may run twice (see [`run_batch`]).
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnMut(&Db) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(Call {
            f,
            result: None,
            reply,
        });
        self.jobs
            .send(Msg::Job(job))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// The schema version this build migrates SQLite databases to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE settings (
         name TEXT PRIMARY KEY,
         value BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE pending_requests (
         requester_digest BLOB NOT NULL,
         target_digest BLOB NOT NULL,
         endpoint_id TEXT NOT NULL,
         key_der BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         PRIMARY KEY (requester_digest, target_digest)
     ) WITHOUT ROWID;
     CREATE INDEX pending_requests_expiry ON pending_requests (expires_at);
     CREATE TABLE processed_events (
         source TEXT NOT NULL,
         id TEXT NOT NULL,
         expires_at INTEGER NOT NULL,
         PRIMARY KEY (source, id)
     ) WITHOUT ROWID;
     CREATE INDEX processed_events_expiry ON processed_events (expires_at);
     CREATE TABLE outbox (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         id TEXT NOT NULL UNIQUE,
         source TEXT NOT NULL,
         recipient TEXT NOT NULL,
         kind TEXT NOT NULL,
         content BLOB NOT NULL,
         time_ms INTEGER NOT NULL,
         expiry_ms INTEGER NOT NULL,
         attempts INTEGER NOT NULL DEFAULT 0,
         next_attempt_at INTEGER NOT NULL,
         last_error TEXT
     );
     CREATE INDEX outbox_due ON outbox (next_attempt_at);",
    // 2: the per-sender and per-target caps count live requests by these.
    "CREATE INDEX pending_requests_sender ON pending_requests (endpoint_id, expires_at);
     CREATE INDEX pending_requests_target ON pending_requests (target_digest, expires_at);",
    // 3: no unique index on outbox ids. Ids are random, so each message's insert and
    // delete wrote a page of that index somewhere new (two of the ~4.5 pages each request
    // wrote). Results are recorded by `seq`; the admin's lookups by id scan.
    "CREATE TABLE outbox_v3 (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         id TEXT NOT NULL,
         source TEXT NOT NULL,
         recipient TEXT NOT NULL,
         kind TEXT NOT NULL,
         content BLOB NOT NULL,
         time_ms INTEGER NOT NULL,
         expiry_ms INTEGER NOT NULL,
         attempts INTEGER NOT NULL DEFAULT 0,
         next_attempt_at INTEGER NOT NULL,
         last_error TEXT
     );
     INSERT INTO outbox_v3 SELECT seq, id, source, recipient, kind, content, time_ms,
         expiry_ms, attempts, next_attempt_at, last_error FROM outbox;
     DROP TABLE outbox;
     ALTER TABLE outbox_v3 RENAME TO outbox;
     CREATE INDEX outbox_due ON outbox (next_attempt_at);",
    // 4: the key leads with the target, so that counting a target's requests (its cap)
    // walks the key and the separate target index goes: one random-keyed index fewer
    // to write on every stored and every matched request.
    "CREATE TABLE pending_requests_v4 (
         requester_digest BLOB NOT NULL,
         target_digest BLOB NOT NULL,
         endpoint_id TEXT NOT NULL,
         key_der BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         PRIMARY KEY (target_digest, requester_digest)
     ) WITHOUT ROWID;
     INSERT INTO pending_requests_v4 SELECT requester_digest, target_digest, endpoint_id,
         key_der, created_at, expires_at FROM pending_requests;
     DROP TABLE pending_requests;
     ALTER TABLE pending_requests_v4 RENAME TO pending_requests;
     CREATE INDEX pending_requests_expiry ON pending_requests (expires_at);
     CREATE INDEX pending_requests_sender ON pending_requests (endpoint_id, expires_at);",
    // 5: several protocols. A pending request keeps its protocol and what it offers the
    // other party (a tmp request: its endpoint key, the former `key_der`); an outbox row
    // keeps its content type, so that delivering it needs no knowledge of its kind.
    "ALTER TABLE pending_requests RENAME COLUMN key_der TO offer;
     ALTER TABLE pending_requests ADD COLUMN protocol TEXT NOT NULL DEFAULT 'tmp';
     ALTER TABLE outbox ADD COLUMN content_type TEXT NOT NULL DEFAULT '';
     UPDATE outbox SET content_type = CASE kind
         WHEN 'pairing-match' THEN 'application/vnd.relaycorp.letro.pairing-match-tmp'
         WHEN 'pairing-completion' THEN 'application/vnd.relaycorp.letro.pairing-completion-tmp'
         ELSE '' END;",
    // 6: the per-target cap counts a target's requests from one sending endpoint, so that
    // nobody can fill someone's cap with invented requesters and lock their contacts
    // out: the sender index leads with the endpoint, then the target.
    "DROP INDEX pending_requests_sender;
     CREATE INDEX pending_requests_sender
         ON pending_requests (endpoint_id, target_digest, expires_at);",
    // 7: event keys in generations (see `events`), each key a 16-byte digest of source
    // and id. The keys of earlier builds become generation 0, sealed at the first
    // chance; sorted, they go into the new tree in order.
    "CREATE TABLE processed_events_v7 (
         generation INTEGER NOT NULL,
         key BLOB NOT NULL,
         expires_at INTEGER NOT NULL,
         PRIMARY KEY (generation, key)
     ) WITHOUT ROWID;
     INSERT OR IGNORE INTO processed_events_v7
         SELECT 0, letro_event_key(source, id), expires_at FROM processed_events ORDER BY 2;
     DROP TABLE processed_events;
     ALTER TABLE processed_events_v7 RENAME TO processed_events;
     CREATE INDEX processed_events_expiry ON processed_events (expires_at);
     CREATE TABLE processed_event_filters (
         generation INTEGER PRIMARY KEY,
         bits BLOB NOT NULL
     );",
    // 8: new pending requests wait in a small table of their own (see `pending`); the
    // age index finds those to settle into `pending_requests`.
    "CREATE TABLE pending_recent (
         requester_digest BLOB NOT NULL,
         target_digest BLOB NOT NULL,
         endpoint_id TEXT NOT NULL,
         protocol TEXT NOT NULL,
         offer BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         PRIMARY KEY (target_digest, requester_digest)
     ) WITHOUT ROWID;
     CREATE INDEX pending_recent_sender
         ON pending_recent (endpoint_id, target_digest, expires_at);
     CREATE INDEX pending_recent_age ON pending_recent (created_at);",
    // 9: event keys in generations of buckets (see `events`): the keys of the generation
    // being filled, in the order they came; sealed generations, each a row with its
    // filter and a bucket row per slice of the key space. The generation an earlier build
    // was filling in `processed_events` stays there as it is; its filter goes, to be
    // built from its keys at start: an earlier build that restarted went on filling its
    // newest generation, sealed or not, and stored its filter again only at its next
    // seal.
    "CREATE TABLE processed_events_recent (
         seq INTEGER PRIMARY KEY,
         generation INTEGER NOT NULL,
         key BLOB NOT NULL,
         expires_at INTEGER NOT NULL
     );
     CREATE TABLE processed_event_buckets (
         id INTEGER PRIMARY KEY,
         keys BLOB NOT NULL
     );
     CREATE TABLE processed_event_generations (
         generation INTEGER PRIMARY KEY,
         buckets INTEGER NOT NULL,
         keys INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         bits BLOB NOT NULL
     );
     DELETE FROM processed_event_filters
         WHERE generation = (SELECT max(generation) FROM processed_events);",
];

fn schema_version(conn: &Connection) -> Result<usize> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    Ok(usize::try_from(version).unwrap_or(0))
}

fn migrate(conn: &Connection) -> Result<()> {
    let applied = schema_version(conn)?;
    check_schema_version(applied, MIGRATIONS.len(), false)?;
    apply_migrations(conn, applied, MIGRATIONS.len()).map_err(unavailable)
}

/// Creates a database at schema `version`, as a letro-server of that schema left it, for
/// tests of upgrades. Not for production: the server migrates on its own.
#[doc(hidden)]
pub fn create_at_version(path: &Path, version: usize) -> Result<()> {
    let conn = Connection::open(path).map_err(unavailable)?;
    apply_migrations(&conn, schema_version(&conn)?, version.min(MIGRATIONS.len()))
        .map_err(unavailable)
}

fn apply_migrations(conn: &Connection, applied: usize, target: usize) -> rusqlite::Result<()> {
    // Migration 7 computes each stored event's key as this build does.
    conn.create_scalar_function(
        "letro_event_key",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let key = EventKey {
                source: ctx.get(0)?,
                id: ctx.get(1)?,
            };
            Ok(key.digest().to_vec())
        },
    )?;
    for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(applied) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

/// Makes every message due now. A SQLite file has one server process, so at start no
/// delivery is in flight. This build keeps leases in memory ([`leases`]); a lease in the
/// future in a row was left by an older build's process, which died: waiting it out
/// would delay, after a crash, exactly the messages that were being sent. Retry delays
/// are reset too, which costs one early attempt each (one probe, when the sink is down).
fn release_leases(conn: &Connection, now: Timestamp) -> rusqlite::Result<()> {
    let released = conn.execute(
        "UPDATE outbox SET next_attempt_at = ?1 WHERE next_attempt_at > ?1",
        params![now.0],
    )?;
    if released > 0 {
        tracing::info!(messages = released, "outbox messages made due at start");
    }
    Ok(())
}

fn writer(db: Db, rx: mpsc::Receiver<Msg>) {
    let mut closing = None;
    // A message taken to learn whether any was waiting, to start the next batch.
    let mut next = None;
    while closing.is_none() {
        let first = match next.take() {
            Some(msg) => msg,
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => break,
            },
        };
        let mut jobs = Vec::new();
        match first {
            Msg::Job(job) => jobs.push(job),
            Msg::Close(done) => closing = Some(done),
        }
        while closing.is_none() && jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => jobs.push(job),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            run_batch(&db, jobs);
            if closing.is_none() {
                next = rx.try_recv().ok();
            }
            db.maintain(next.is_none());
        }
    }
    drop(db);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs one transaction-control statement (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`),
/// compiled once per connection rather than parsed for every batch.
fn control(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
        .map_err(unavailable)
}

/// Runs a batch of operations in one transaction. If an operation fails, the transaction
/// is rolled back and each operation runs again in a transaction of its own, so one bad
/// operation costs the others a retry, not their result. Savepoints would isolate them
/// in a single pass, but every savepoint copies each page its operation touches (a
/// quarter of the writer's time); failures are rare, batches are not. If the transaction
/// itself fails (`BEGIN` waited out the busy timeout behind another process, `COMMIT`
/// could not write), every operation gets that error at once: running them one by one
/// would only fail, or wait, as many times again.
fn run_batch(conn: &Db, mut jobs: Vec<Job>) {
    let outcome = match run_together(conn, &mut jobs) {
        Batch::OperationFailed if jobs.len() > 1 => {
            for mut job in jobs {
                let alone = match run_together(conn, std::slice::from_mut(&mut job)) {
                    Batch::Committed => Ok(()),
                    Batch::OperationFailed => {
                        Err(StoreError::Unavailable("the operation failed".into()))
                    }
                    Batch::TransactionFailed(e) => Err(e),
                };
                job.finish(alone);
            }
            return;
        }
        Batch::Committed => Ok(()),
        Batch::OperationFailed => Err(rolled_back()),
        Batch::TransactionFailed(e) => Err(e),
    };
    for job in jobs {
        job.finish(outcome.clone());
    }
}

fn rolled_back() -> StoreError {
    StoreError::Unavailable("rolled back: an operation in the transaction failed".into())
}

/// How one transaction of operations ended.
enum Batch {
    Committed,
    /// An operation failed (its own result says how); the transaction was rolled back.
    OperationFailed,
    /// `BEGIN` or `COMMIT` failed; nothing was committed.
    TransactionFailed(StoreError),
}

/// Runs `jobs` in one transaction and commits it if they all succeed.
fn run_together(conn: &Db, jobs: &mut [Job]) -> Batch {
    if let Err(e) = control(conn, "BEGIN IMMEDIATE") {
        // A failed BEGIN IMMEDIATE can leave no transaction open; ROLLBACK is harmless.
        let _ = control(conn, "ROLLBACK");
        return Batch::TransactionFailed(e);
    }
    if !jobs.iter_mut().all(|job| job.run(conn)) {
        let _ = control(conn, "ROLLBACK");
        conn.discard();
        return Batch::OperationFailed;
    }
    let started = Instant::now();
    let committed = control(conn, "COMMIT");
    conn.disk.committed(started.elapsed(), committed.is_ok());
    match committed {
        Ok(()) => {
            conn.leases.commit();
            conn.events.borrow_mut().commit();
            Batch::Committed
        }
        Err(e) => {
            // The transaction may still be open after a failed COMMIT.
            let _ = control(conn, "ROLLBACK");
            conn.discard();
            Batch::TransactionFailed(e)
        }
    }
}

/// Records that the event whose digest is `key` is being handled; false if it already was.
fn record_event(db: &Db, key: &[u8; 16], expiry: Timestamp) -> rusqlite::Result<bool> {
    db.events.borrow_mut().record(&db.conn, key, expiry)
}

/// Takes back [`record_event`] for an event that changed nothing (a refused request),
/// so that the same event, delivered again, is judged again.
fn forget_event(db: &Db, key: &[u8; 16]) -> rusqlite::Result<()> {
    db.events.borrow_mut().forget(&db.conn, key)
}

fn record_and_queue(conn: &Db, s: &EventMessages) -> rusqlite::Result<QueueOutcome> {
    if !record_event(conn, &s.event.digest(), s.event_expiry)? {
        return Ok(QueueOutcome::Duplicate);
    }
    // No unique index on ids (migration 3): the same id twice in one submission is the
    // same message, queued once, as PostgreSQL's ON CONFLICT does.
    for (i, m) in s.messages.iter().enumerate() {
        if !s.messages[..i].iter().any(|earlier| earlier.id == m.id) {
            insert_message(conn, m)?;
        }
    }
    Ok(QueueOutcome::Queued)
}

fn submit(db: &Db, s: &PairingSubmission) -> rusqlite::Result<PairingOutcome> {
    let key = s.event.digest();
    if !record_event(db, &key, s.request_expiry)? {
        return Ok(PairingOutcome::Duplicate);
    }
    let request = Request::of(s);
    let plan = plan(s, db.pending.pair_state(db, &request)?, || {
        db.pending.count_pending(db, &request)
    })?;
    match &plan {
        Plan::Refuse(_) => forget_event(db, &key)?,
        Plan::Wait { .. } => db.pending.wait(db, &request)?,
        Plan::Match { messages } => {
            db.pending.remove_pair(db, &request)?;
            for m in messages {
                insert_message(db, m)?;
            }
        }
    }
    Ok(plan.outcome())
}

fn insert_message(conn: &Connection, m: &OutgoingMessage) -> rusqlite::Result<()> {
    // No unique index on `id` (see migration 3): an id derives from the event that
    // caused the message, and that event is recorded as processed in this same
    // transaction, so no id can be queued twice.
    conn.prepare_cached(
        "INSERT INTO outbox (id, source, recipient, kind, content_type, content, time_ms,
                             expiry_ms, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7)",
    )?
    .execute(params![
        m.id.as_str(),
        m.source,
        m.recipient.as_str(),
        m.kind.name(),
        m.content_type,
        m.content,
        m.time.0,
        m.expiry.0
    ])?;
    Ok(())
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidParameterName(format!("corrupt row: {what}"))
}

/// Claims up to `limit` due messages that no one holds, leasing them until
/// `lease_until` in memory ([`leases`]): the rows it takes are only read (a row this
/// build cannot deliver gets its `last_error`, or is deleted if expired). Leased messages are
/// due too, and come first in due order, so the scan reads past them: as many rows as
/// are in flight (at most `--delivery-concurrency`), cached pages.
fn claim(
    conn: &Db,
    now: Timestamp,
    lease_until: Timestamp,
    limit: usize,
) -> rusqlite::Result<Vec<OutboxEntry>> {
    conn.leases.forget_ended(now.0);
    let leased = conn.leases.current();
    let scan = i64::try_from(limit.saturating_add(leased.len())).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, source, recipient, kind, content_type, content, time_ms,
                expiry_ms, attempts
         FROM outbox WHERE next_attempt_at <= ?1
         ORDER BY next_attempt_at, seq LIMIT ?2",
    )?;
    let mut rows = Vec::new();
    let mut found = stmt.query(params![now.0, scan])?;
    while rows.len() < limit {
        let Some(r) = found.next()? else { break };
        // Only the seq of a message in flight: its content is not copied.
        let seq: i64 = r.get(0)?;
        if leased.contains_key(&seq) {
            continue;
        }
        rows.push(StoredMessage {
            seq,
            id: r.get(1)?,
            source: r.get(2)?,
            recipient: r.get(3)?,
            kind: r.get(4)?,
            content_type: r.get(5)?,
            content: r.get(6)?,
            time: r.get(7)?,
            expiry: r.get(8)?,
            attempts: r.get(9)?,
        });
    }
    drop(found);
    for row in &rows {
        conn.leases.take(row.seq, lease_until.0);
    }
    let (entries, undeliverable) = deliverable(rows, now);
    for row in undeliverable {
        if row.expired {
            record_attempt(conn, row.seq, &Attempt::Expired)?;
        } else {
            conn.prepare_cached("UPDATE outbox SET last_error = ?2 WHERE seq = ?1")?
                .execute(params![row.seq, row.reason])?;
        }
    }
    Ok(entries)
}

/// Records what became of an attempt at the claimed message `seq`, and ends its lease.
fn record_attempt(conn: &Db, seq: i64, attempt: &Attempt) -> rusqlite::Result<()> {
    match attempt {
        Attempt::Delivered | Attempt::Expired => {
            conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
                .execute(params![seq])?;
        }
        Attempt::Retry { at, error } => {
            conn.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
                 WHERE seq = ?1",
            )?
            .execute(params![seq, at.0, error])?;
        }
    }
    conn.leases.release(seq);
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        // Through the writer: readiness must fail when writes cannot be queued.
        self.call(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn setting_or_insert(&self, name: &'static str, candidate: Vec<u8>) -> Result<Vec<u8>> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO NOTHING",
                params![name, candidate],
            )?;
            conn.query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn setting(&self, name: &'static str) -> Result<Option<Vec<u8>>> {
        self.read(move |conn| {
            conn.query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn submit_pairing_request(
        &self,
        submission: PairingSubmission,
    ) -> Result<PairingOutcome> {
        self.call(move |conn| submit(conn, &submission)).await
    }

    async fn record_and_queue(&self, submission: EventMessages) -> Result<QueueOutcome> {
        self.call(move |conn| record_and_queue(conn, &submission))
            .await
    }

    async fn claim_due_messages(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.call(move |conn| claim(conn, now, lease_until, limit))
            .await
    }

    async fn next_due(&self) -> Result<Option<Timestamp>> {
        let leases = self.leases.clone();
        self.read(move |conn| {
            // Leased messages are not due before their lease ends.
            let leased = leases::lock(&leases).clone();
            let scan = i64::try_from(leased.len().saturating_add(1)).unwrap_or(i64::MAX);
            let mut stmt = conn.prepare_cached(
                "SELECT seq, next_attempt_at FROM outbox ORDER BY next_attempt_at, seq LIMIT ?1",
            )?;
            let mut rows = stmt.query(params![scan])?;
            let mut next = None;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let at = match leased.get(&seq) {
                    Some(until) => (*until).max(row.get(1)?),
                    None => row.get(1)?,
                };
                next = Some(next.map_or(at, |n: i64| n.min(at)));
                if !leased.contains_key(&seq) {
                    break;
                }
            }
            Ok(next.map(Timestamp))
        })
        .await
    }

    async fn mark_delivered(&self, entry: &OutboxEntry) -> Result<()> {
        let seq = entry.seq;
        self.call(move |conn| record_attempt(conn, seq, &Attempt::Delivered))
            .await
    }

    async fn schedule_retry(&self, entry: &OutboxEntry, at: Timestamp, error: &str) -> Result<()> {
        let (seq, attempt) = (
            entry.seq,
            Attempt::Retry {
                at,
                error: error.to_owned(),
            },
        );
        self.call(move |conn| record_attempt(conn, seq, &attempt))
            .await
    }

    async fn drop_message(&self, entry: &OutboxEntry) -> Result<()> {
        self.mark_delivered(entry).await
    }

    async fn record_attempts(&self, attempts: &[(OutboxEntry, Attempt)]) -> Vec<Result<()>> {
        let results: Vec<(i64, Attempt)> = attempts
            .iter()
            .map(|(entry, attempt)| (entry.seq, attempt.clone()))
            .collect();
        let recorded = self
            .call(move |conn| {
                results
                    .iter()
                    .try_for_each(|(seq, attempt)| record_attempt(conn, *seq, attempt))
            })
            .await;
        vec![recorded; attempts.len()]
    }

    async fn stats(&self) -> Result<Stats> {
        self.read_snapshot(|conn| {
            let (depth, oldest): (i64, Option<i64>) =
                conn.query_row("SELECT count(*), min(time_ms) FROM outbox", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let pending: i64 = conn.query_row(
                "SELECT (SELECT count(*) FROM pending_recent)
                        + (SELECT count(*) FROM pending_requests)",
                [],
                |r| r.get(0),
            )?;
            Ok(Stats {
                outbox_depth: u64::try_from(depth).unwrap_or(0),
                outbox_oldest: oldest.map(Timestamp),
                pending_requests: u64::try_from(pending).unwrap_or(0),
            })
        })
        .await
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<PurgeReport> {
        self.call(move |conn| {
            // The recent table has no expiry index: it is small, and scanned.
            let requests = conn.execute(
                "DELETE FROM pending_recent WHERE expires_at <= ?1",
                params![now.0],
            )? + conn.execute(
                "DELETE FROM pending_requests WHERE expires_at <= ?1",
                params![now.0],
            )?;
            let events = conn.events.borrow_mut().purge(conn, now, conn.maintains)?;
            Ok(PurgeReport {
                requests: requests as u64,
                events,
            })
        })
        .await
    }

    async fn outbox_status(&self, now: Timestamp) -> Result<OutboxStatus> {
        self.read_snapshot(move |conn| {
            let (depth, due, retrying, oldest, next): (
                i64,
                Option<i64>,
                Option<i64>,
                Option<i64>,
                Option<i64>,
            ) = conn.query_row(
                "SELECT count(*), sum(next_attempt_at <= ?1), sum(attempts > 0),
                            min(time_ms), min(next_attempt_at)
                     FROM outbox",
                params![now.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )?;
            let mut by_kind = Vec::new();
            let mut stmt =
                conn.prepare("SELECT kind, count(*) FROM outbox GROUP BY kind ORDER BY kind")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                by_kind.push((MessageKind::from_stored(row.get(0)?), count(row.get(1)?)));
            }
            Ok(OutboxStatus {
                depth: count(depth),
                due: count(due.unwrap_or(0)),
                retrying: count(retrying.unwrap_or(0)),
                oldest: oldest.map(Timestamp),
                next_attempt: next.map(Timestamp),
                by_kind,
            })
        })
        .await
    }

    async fn outbox_list(&self, limit: usize) -> Result<Vec<OutboxSummary>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, kind, recipient, time_ms, expiry_ms, attempts, next_attempt_at,
                        last_error
                 FROM outbox ORDER BY next_attempt_at, seq LIMIT ?1",
            )?;
            stmt.query_map(params![limit], |r| {
                let attempts: i64 = r.get(5)?;
                Ok(OutboxSummary {
                    id: MessageId::from_stored(r.get(0)?),
                    kind: MessageKind::from_stored(r.get(1)?),
                    recipient: r.get(2)?,
                    created: Timestamp(r.get(3)?),
                    expiry: Timestamp(r.get(4)?),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    next_attempt: Timestamp(r.get(6)?),
                    last_error: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn retry_now(&self, ids: Option<Vec<MessageId>>, now: Timestamp) -> Result<u64> {
        self.call(move |conn| {
            // Only messages that failed: one with no failure and a future next attempt is
            // being delivered right now, and making it due would send it twice.
            let changed = match &ids {
                None => conn.execute(
                    "UPDATE outbox SET next_attempt_at = ?1
                     WHERE attempts > 0 AND next_attempt_at > ?1",
                    params![now.0],
                )?,
                // One pass over the outbox for all of them: ids are not indexed.
                Some(ids) if ids.is_empty() => 0,
                Some(ids) => {
                    let list = (2..ids.len() + 2)
                        .map(|i| format!("?{i}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "UPDATE outbox SET next_attempt_at = ?1
                         WHERE attempts > 0 AND next_attempt_at > ?1 AND id IN ({list})"
                    );
                    let mut values = vec![rusqlite::types::Value::Integer(now.0)];
                    values.extend(
                        ids.iter()
                            .map(|id| rusqlite::types::Value::Text(id.as_str().to_owned())),
                    );
                    conn.execute(&sql, rusqlite::params_from_iter(values))?
                }
            };
            Ok(changed as u64)
        })
        .await
    }

    async fn request_stats(&self, now: Timestamp) -> Result<RequestStats> {
        self.read_snapshot(move |conn| {
            let (live, expired, oldest): (Option<i64>, Option<i64>, Option<i64>) = conn.query_row(
                "SELECT sum(expires_at > ?1), sum(expires_at <= ?1),
                            min(CASE WHEN expires_at > ?1 THEN created_at END)
                     FROM (SELECT expires_at, created_at FROM pending_recent
                           UNION ALL
                           SELECT expires_at, created_at FROM pending_requests)",
                params![now.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let senders: i64 = conn.query_row(
                "SELECT count(*) FROM (
                     SELECT endpoint_id FROM pending_recent WHERE expires_at > ?1
                     UNION
                     SELECT endpoint_id FROM pending_requests WHERE expires_at > ?1)",
                params![now.0],
                |r| r.get(0),
            )?;
            let events: i64 = conn.query_row(COUNT_EVENT_KEYS, [], |r| r.get(0))?;
            Ok(RequestStats {
                live: count(live.unwrap_or(0)),
                expired: count(expired.unwrap_or(0)),
                senders: count(senders),
                oldest: oldest.map(Timestamp),
                processed_events: count(events),
            })
        })
        .await
    }

    /// The first observer stays; one handed over later is dropped.
    fn observe_disk(&self, observer: DiskObserver) {
        let _ = self.disk.observer.set(observer);
    }

    async fn close(&self) {
        self.reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        self.serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer job running `f`, and where its answer will arrive.
    fn job<T: Send + 'static>(
        mut f: impl FnMut(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> (Job, oneshot::Receiver<Result<T>>) {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(Call {
            f: move |db: &Db| f(db),
            result: None,
            reply,
        });
        (job, rx)
    }

    /// `conn` as the writer holds it, with this build's schema beside the test's tables.
    fn writer_db(conn: Connection) -> Db {
        apply_migrations(&conn, 0, MIGRATIONS.len()).expect("migrations");
        Db::open(conn, Tuning::default(), true, Arc::default()).expect("writer")
    }

    fn insert(name: &'static str) -> impl FnMut(&Connection) -> rusqlite::Result<()> + Send {
        move |conn| {
            conn.execute("INSERT INTO t (name) VALUES (?1)", [name])
                .map(drop)
        }
    }

    fn names(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM t ORDER BY name")
            .expect("query");
        stmt.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("names")
    }

    #[test]
    fn one_failing_operation_costs_the_rest_of_its_batch_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = Connection::open(dir.path().join("t.db")).expect("open");
        conn.execute_batch("CREATE TABLE t (name TEXT PRIMARY KEY)")
            .expect("schema");
        let conn = writer_db(conn);
        let (a, a_rx) = job(insert("a"));
        // Writes, then fails: its write must not survive.
        let (bad, bad_rx) = job(|conn: &Connection| {
            insert("b")(conn)?;
            conn.execute("INSERT INTO missing VALUES (1)", []).map(drop)
        });
        let (c, c_rx) = job(insert("c"));
        // Reads what is committed before it: must answer as of its own transaction.
        let (count, count_rx) = job(|conn: &Connection| {
            conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
        });
        run_batch(&conn, vec![a, bad, c, count]);

        assert!(matches!(a_rx.blocking_recv().expect("answer"), Ok(())));
        assert!(matches!(
            bad_rx.blocking_recv().expect("answer"),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(c_rx.blocking_recv().expect("answer"), Ok(())));
        assert_eq!(count_rx.blocking_recv().expect("answer").expect("count"), 2);
        assert_eq!(names(&conn), ["a", "c"]);
        assert!(conn.is_autocommit(), "no transaction left open");
    }

    #[tokio::test]
    async fn one_server_per_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let first = SqliteStore::open(&path, Synchronous::Full, Timestamp(0)).expect("open");
        let second = SqliteStore::open(&path, Synchronous::Full, Timestamp(0))
            .expect_err("a second server on the file");
        assert!(
            second
                .to_string()
                .contains("another letro-server is serving"),
            "{second}"
        );
        // The admin commands open it beside the server.
        drop(SqliteStore::open_existing(&path, Synchronous::Full).expect("admin"));
        first.close().await;
        let again = SqliteStore::open(&path, Synchronous::Full, Timestamp(0)).expect("free again");
        again.close().await;
    }

    /// A claim only reads: its lease is in memory, staged until its batch commits.
    #[test]
    fn a_claim_rolled_back_with_its_batch_leases_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = writer_db(Connection::open(dir.path().join("t.db")).expect("open"));
        conn.execute(
            "INSERT INTO outbox (id, source, recipient, kind, content_type, content, time_ms,
                                 expiry_ms, next_attempt_at)
             VALUES ('m', 's', ?1, 'pairing-match',
                     'application/vnd.relaycorp.letro.pairing-match-tmp', X'00', 10, 99999, 10)",
            [format!("0{}", "a".repeat(64))],
        )
        .expect("a due message");
        let claim_job = |limit: usize| {
            let (reply, rx) = oneshot::channel();
            let job: Job = Box::new(Call {
                f: move |db: &Db| claim(db, Timestamp(20), Timestamp(1000), limit),
                result: None,
                reply,
            });
            (job, rx)
        };
        let (first, first_rx) = claim_job(10);
        let (bad, _) =
            job(|conn: &Connection| conn.execute("INSERT INTO missing VALUES (1)", []).map(drop));
        // The batch fails and each operation runs again on its own: the claim must get
        // the message then, not find it leased by its rolled-back first run.
        run_batch(&conn, vec![first, bad]);
        let claimed = first_rx.blocking_recv().expect("answer").expect("claim");
        assert_eq!(claimed.len(), 1);
        let (again, again_rx) = claim_job(10);
        run_batch(&conn, vec![again]);
        assert!(
            again_rx
                .blocking_recv()
                .expect("answer")
                .expect("claim")
                .is_empty(),
            "leased once claimed"
        );
        let next: i64 = conn
            .query_row("SELECT next_attempt_at FROM outbox", [], |r| r.get(0))
            .expect("row");
        assert_eq!(next, 10, "the row is not written");
    }

    #[test]
    fn an_event_recorded_in_a_rolled_back_batch_is_new_when_it_runs_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = writer_db(Connection::open(dir.path().join("t.db")).expect("open"));
        let record_job = || {
            let (reply, rx) = oneshot::channel();
            let job: Job = Box::new(Call {
                f: move |db: &Db| record_and_queue(db, &event(1, LATER)),
                result: None,
                reply,
            });
            (job, rx)
        };
        let (first, first_rx) = record_job();
        let (bad, _) =
            job(|conn: &Connection| conn.execute("INSERT INTO missing VALUES (1)", []).map(drop));
        // Run again on its own, the event must not find its key from the rolled-back run.
        run_batch(&conn, vec![first, bad]);
        let outcome = first_rx.blocking_recv().expect("answer").expect("record");
        assert_eq!(outcome, QueueOutcome::Queued);
        let (again, again_rx) = record_job();
        run_batch(&conn, vec![again]);
        let outcome = again_rx.blocking_recv().expect("answer").expect("record");
        assert_eq!(outcome, QueueOutcome::Duplicate);
    }

    #[test]
    fn migrations_from_2_keep_every_row_and_drop_the_random_indexes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = Connection::open(dir.path().join("v2.db")).expect("open");
        for (i, sql) in MIGRATIONS[..2].iter().enumerate() {
            conn.execute_batch(sql).expect("old schema");
            conn.pragma_update(None, "user_version", i64::try_from(i + 1).expect("small"))
                .expect("version");
        }
        conn.execute_batch(
            "INSERT INTO outbox (seq, id, source, recipient, kind, content, time_ms,
                                 expiry_ms, attempts, next_attempt_at, last_error)
             VALUES (41, 'm41', 's', 'r', 'match', x'01', 5, 9, 2, 7, 'sink answered 503');",
        )
        .expect("queued message");
        conn.execute_batch(
            "INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id,
                                           key_der, created_at, expires_at)
             VALUES (x'aa', x'bb', 'e1', x'03', 1, 100), (x'cc', x'bb', 'e2', x'04', 2, 50);",
        )
        .expect("pending requests");
        migrate(&conn).expect("migrate");

        assert_eq!(schema_version(&conn).expect("version"), MIGRATIONS.len());
        let row: (i64, String, Vec<u8>, i64, i64, Option<String>) = conn
            .query_row(
                "SELECT seq, id, content, attempts, next_attempt_at, last_error FROM outbox",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .expect("row");
        assert_eq!(
            row,
            (
                41,
                "m41".into(),
                vec![1],
                2,
                7,
                Some("sink answered 503".into())
            )
        );
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_list('outbox') ORDER BY name")
            .expect("query")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("names");
        assert_eq!(indexes, ["outbox_due"]);
        let pending: Vec<String> = conn
            .prepare(
                "SELECT printf('%s %s %s %s %s %d %d', hex(requester_digest),
                               hex(target_digest), endpoint_id, protocol, hex(offer),
                               created_at, expires_at)
                 FROM pending_requests ORDER BY requester_digest",
            )
            .expect("query")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("pending");
        assert_eq!(pending, ["AA BB e1 tmp 03 1 100", "CC BB e2 tmp 04 2 50"]);
        // A target's cap is counted along the key, not through a separate index.
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT 1 FROM pending_requests
                 WHERE target_digest = x'bb' AND expires_at > 60 AND requester_digest <> x'cc'",
                [],
                |r| r.get(3),
            )
            .expect("plan");
        assert!(plan.contains("PRIMARY KEY"), "{plan}");
        // Sequence numbers carry on after the migrated ones.
        conn.execute_batch(
            "INSERT INTO outbox (id, source, recipient, kind, content, time_ms, expiry_ms,
                                 next_attempt_at)
             VALUES ('m', 's', 'r', 'match', x'02', 6, 9, 6)",
        )
        .expect("insert");
        assert_eq!(conn.last_insert_rowid(), 42);
    }

    #[test]
    fn a_transaction_that_cannot_start_fails_every_operation_at_once() {
        static BUSY_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn give_up(_retries: i32) -> bool {
            BUSY_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut conn = Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (name TEXT PRIMARY KEY)")
            .expect("schema");
        conn.busy_handler(Some(give_up)).expect("handler");
        let conn = writer_db(conn);
        // Another process's write transaction (an admin command, say).
        let other = Connection::open(&path).expect("open");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut answers = Vec::new();
        let jobs = (0..3)
            .map(|_| {
                let runs = runs.clone();
                let (job, rx) = job(move |conn: &Connection| {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    insert("a")(conn)
                });
                answers.push(rx);
                job
            })
            .collect();
        run_batch(&conn, jobs);
        for rx in answers {
            assert!(matches!(
                rx.blocking_recv().expect("answer"),
                Err(StoreError::Unavailable(_))
            ));
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
        // One wait for the lock, not one per operation.
        assert_eq!(BUSY_CALLS.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(conn.is_autocommit());
    }

    fn event(n: usize, expiry: Timestamp) -> EventMessages {
        EventMessages {
            event: EventKey {
                source: format!("0{}", "ab".repeat(32)),
                id: format!("parcel-{n}"),
            },
            messages: Vec::new(),
            event_expiry: expiry,
        }
    }

    /// The first column of each row of `query`, run beside the store.
    fn column(path: &Path, query: &str) -> Vec<i64> {
        let conn = Connection::open(path).expect("open");
        let mut stmt = conn.prepare(query).expect("query");
        stmt.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("column")
    }

    /// The generations an earlier build sealed with a stored filter.
    fn filters(path: &Path) -> Vec<i64> {
        column(
            path,
            "SELECT generation FROM processed_event_filters ORDER BY 1",
        )
    }

    /// The generations sealed in buckets.
    fn sealed(path: &Path) -> Vec<i64> {
        column(
            path,
            "SELECT generation FROM processed_event_generations ORDER BY 1",
        )
    }

    /// Whether recording each of `events` came out as `expected`.
    async fn all(
        store: &SqliteStore,
        events: std::ops::Range<usize>,
        expected: QueueOutcome,
    ) -> bool {
        outcomes(store, events).await.iter().all(|o| *o == expected)
    }

    const LATER: Timestamp = Timestamp(i64::MAX / 2);

    async fn open_small(path: &Path) -> SqliteStore {
        open_with_generations_of(path, 3)
    }

    fn open_with_generations_of(path: &Path, generation_keys: u64) -> SqliteStore {
        SqliteStore::open_tuned(
            path,
            Synchronous::Normal,
            Role::Server { now: Timestamp(0) },
            Tuning {
                generation_keys,
                pace_seal: false,
                ..Tuning::default()
            },
        )
        .expect("store")
    }

    /// Records `events`, and waits for the writer's work after the last (a seal).
    async fn outcomes(store: &SqliteStore, events: std::ops::Range<usize>) -> Vec<QueueOutcome> {
        let mut outcomes = Vec::new();
        for n in events {
            outcomes.push(
                store
                    .record_and_queue(event(n, LATER))
                    .await
                    .expect("record"),
            );
        }
        store.ping().await.expect("writer");
        outcomes
    }

    #[tokio::test]
    async fn an_event_of_any_generation_is_a_duplicate_before_and_after_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.db");
        let store = open_small(&path).await;
        assert!(all(&store, 0..10, QueueOutcome::Queued).await);
        // Three keys a generation: 0, 1 and 2 sealed in buckets, 3 current (its keys in
        // the recent table until it is sealed).
        assert_eq!(sealed(&path), [0, 1, 2]);
        assert_eq!(
            column(&path, "SELECT generation FROM processed_events_recent"),
            [3]
        );
        assert_eq!(
            column(&path, "SELECT count(*) FROM processed_event_buckets"),
            [3]
        );
        assert!(all(&store, 0..10, QueueOutcome::Duplicate).await);
        store.close().await;

        // From the stored filters.
        let store = open_small(&path).await;
        assert!(all(&store, 0..10, QueueOutcome::Duplicate).await);
        store.close().await;

        // With a stored filter that cannot be read: built again from the buckets.
        Connection::open(&path)
            .expect("open")
            .execute_batch("UPDATE processed_event_generations SET bits = x'00'")
            .expect("spoil");
        let store = open_small(&path).await;
        assert!(all(&store, 0..10, QueueOutcome::Duplicate).await);
        assert!(all(&store, 10..12, QueueOutcome::Queued).await);
        store.close().await;
    }

    /// Event keys kept, as the store counts them.
    async fn event_keys(store: &SqliteStore) -> u64 {
        let stats = store.request_stats(Timestamp(0)).await.expect("stats");
        stats.processed_events
    }

    #[tokio::test]
    async fn a_seal_cut_short_starts_again_and_a_sealed_generation_expires_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.db");
        // Two steps a seal: 33 buckets of about 128 keys.
        let keys = 32 * 128 + 100;
        let store = open_with_generations_of(&path, keys as u64);
        // Ten of the keys expire early, the rest at 2,000.
        for n in 0..keys {
            let expiry = Timestamp(if n < 10 { 1_000 } else { 2_000 });
            store
                .record_and_queue(event(n, expiry))
                .await
                .expect("record");
        }
        store.ping().await.expect("writer");
        store.close().await;
        assert_eq!(sealed(&path), [0]);
        let buckets = "SELECT count(*) FROM processed_event_buckets";
        assert_eq!(column(&path, buckets), [33]);

        // As a crash after the first step would leave it: the seal starts again.
        Connection::open(&path)
            .expect("open")
            .execute_batch(
                "DELETE FROM processed_event_generations;
                 DELETE FROM processed_event_buckets WHERE id >= 32;",
            )
            .expect("cut short");
        let store = open_with_generations_of(&path, keys as u64);
        assert_eq!(event_keys(&store).await, keys as u64);
        let purged = store.purge_expired(Timestamp(1_000)).await.expect("purge");
        assert_eq!(purged.events, 0, "a generation being sealed keeps its keys");
        assert!(all(&store, 0..keys, QueueOutcome::Duplicate).await);
        assert_eq!(sealed(&path), [0]);
        assert_eq!(column(&path, buckets), [33]);
        let recent = "SELECT count(*) FROM processed_events_recent";
        assert_eq!(column(&path, recent), [0], "cleared once sealed");
        assert_eq!(event_keys(&store).await, keys as u64);

        // Sealed, the generation goes once its latest key expires, not before.
        let purged = store.purge_expired(Timestamp(1_999)).await.expect("purge");
        assert_eq!(purged.events, 0);
        assert!(all(&store, 0..10, QueueOutcome::Duplicate).await);
        let purged = store.purge_expired(Timestamp(2_000)).await.expect("purge");
        assert_eq!(purged.events, keys as u64);
        assert_eq!(column(&path, buckets), [0]);
        assert_eq!(event_keys(&store).await, 0);
        assert!(all(&store, 0..10, QueueOutcome::Queued).await);
        store.close().await;
    }

    /// Records the keys of `events` as an earlier build sealed them: in
    /// `processed_events`, `per` keys a generation, no filter stored.
    fn seal_as_an_earlier_build(path: &Path, events: std::ops::Range<usize>, per: usize) {
        let conn = Connection::open(path).expect("open");
        for n in events {
            let e = event(n, Timestamp(1_000 + (n / per) as i64));
            conn.execute(
                "INSERT INTO processed_events (generation, key, expires_at) VALUES (?1, ?2, ?3)",
                params![(n / per) as i64, e.event.digest(), e.event_expiry.0],
            )
            .expect("insert");
        }
    }

    #[tokio::test]
    async fn generations_an_earlier_build_sealed_are_kept_until_their_keys_expire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.db");
        open_with_generations_of(&path, 128).close().await;
        seal_as_an_earlier_build(&path, 0..300, 128);
        // 128 keys a generation: filters of 4 blocks (16 bits per key), built at start
        // and stored at the next seal; new keys go into generation 3.
        let store = open_with_generations_of(&path, 128);
        assert!(all(&store, 0..300, QueueOutcome::Duplicate).await);
        assert!(all(&store, 300..428, QueueOutcome::Queued).await);
        store.close().await;
        assert_eq!(filters(&path), [0, 1, 2]);
        assert_eq!(sealed(&path), [3]);
        let sizes = "SELECT length(bits) FROM processed_event_filters ORDER BY generation";
        assert_eq!(column(&path, sizes), [256, 256, 256]);
        // Cut to 3 blocks (an earlier build's 12 bits per key), each filter would map
        // keys to other blocks and miss most: used as stored, events would pass as new.
        Connection::open(&path)
            .expect("open")
            .execute_batch("UPDATE processed_event_filters SET bits = substr(bits, 1, 192)")
            .expect("shrink");
        let store = open_with_generations_of(&path, 128);
        assert!(all(&store, 0..428, QueueOutcome::Duplicate).await);
        // Their keys expire one by one; a generation emptied loses its filter at the
        // next seal, and the others are stored at 4 blocks again.
        let purged = store.purge_expired(Timestamp(1_000)).await.expect("purge");
        assert_eq!(purged.events, 128);
        assert!(all(&store, 428..556, QueueOutcome::Queued).await);
        // Generation 5, sealed in turn.
        assert!(all(&store, 0..128, QueueOutcome::Queued).await);
        assert!(all(&store, 128..300, QueueOutcome::Duplicate).await);
        store.close().await;
        assert_eq!(filters(&path), [1, 2]);
        assert_eq!(column(&path, sizes), [256, 256]);
        assert_eq!(sealed(&path), [3, 4, 5]);
    }

    #[tokio::test]
    async fn a_generation_whose_keys_all_expired_loses_its_filter_at_the_next_seal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.db");
        let store = open_small(&path).await;
        for n in 0..6 {
            store
                .record_and_queue(event(n, Timestamp(1_000)))
                .await
                .expect("record");
        }
        store.ping().await.expect("writer");
        assert_eq!(sealed(&path), [0, 1]);
        let purged = store.purge_expired(Timestamp(1_000)).await.expect("purge");
        assert_eq!(purged.events, 6);
        assert!(all(&store, 6..9, QueueOutcome::Queued).await);
        assert_eq!(sealed(&path), [2]);
        // Expired keys are forgotten: the same events are new again.
        assert!(all(&store, 0..2, QueueOutcome::Queued).await);
        store.close().await;
    }

    #[tokio::test]
    async fn an_admin_command_beside_the_server_seals_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.db");
        let server = open_small(&path).await;
        assert!(all(&server, 0..2, QueueOutcome::Queued).await);
        // For the admin, the server's current generation is already full.
        let tuning = Tuning {
            generation_keys: 1,
            ..Tuning::default()
        };
        let admin = SqliteStore::open_tuned(&path, Synchronous::Normal, Role::Admin, tuning)
            .expect("admin");
        admin.purge_expired(Timestamp(0)).await.expect("purge");
        admin.ping().await.expect("writer");
        admin.close().await;
        assert!(sealed(&path).is_empty());
        assert_eq!(outcomes(&server, 2..3).await, [QueueOutcome::Queued]);
        assert_eq!(sealed(&path), [0]);
        server.close().await;
    }

    #[test]
    fn failed_maintenance_waits_before_it_is_tried_again() {
        let db = writer_db(Connection::open_in_memory().expect("open"));
        db.maintain(true);
        assert_eq!(db.paused_until.get(), None);
        db.execute_batch("DROP TABLE pending_recent").expect("drop");
        db.maintain(true);
        let until = db.paused_until.get().expect("paused after a failure");
        assert!(until > Instant::now());
        db.execute_batch(
            "CREATE TABLE pending_recent (requester_digest, target_digest, endpoint_id,
                 protocol, offer, created_at, expires_at)",
        )
        .expect("create");
        // Still paused: nothing runs, the pause stands.
        db.maintain(true);
        assert_eq!(db.paused_until.get(), Some(until));
        db.paused_until.set(Some(Instant::now()));
        db.maintain(true);
        assert_eq!(db.paused_until.get(), None);
    }

    #[test]
    fn a_batch_that_succeeds_commits_once_for_all() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = Connection::open(dir.path().join("t.db")).expect("open");
        conn.execute_batch("CREATE TABLE t (name TEXT PRIMARY KEY)")
            .expect("schema");
        let conn = writer_db(conn);
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, a_rx) = job({
            let runs = runs.clone();
            move |conn: &Connection| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                insert("a")(conn)
            }
        });
        let (b, b_rx) = job(insert("b"));
        run_batch(&conn, vec![a, b]);
        assert!(matches!(a_rx.blocking_recv().expect("answer"), Ok(())));
        assert!(matches!(b_rx.blocking_recv().expect("answer"), Ok(())));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(names(&conn), ["a", "b"]);
    }

    /// The server's checkpoints run from its own hook (to be timed), which must keep
    /// the log as short as SQLite's automatic checkpoints did: the log restarts once a
    /// checkpoint has copied it, rather than growing with every commit.
    #[tokio::test]
    async fn the_writer_times_its_commits_and_checkpoints_and_the_log_stays_short() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Synchronous::Normal, Timestamp(0)).expect("open");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let observed = seen.clone();
        store.observe_disk(Arc::new(move |step, took| {
            observed.lock().expect("steps").push((step, took));
        }));
        let page_size: i64 = store
            .call(|db| {
                db.execute_batch("CREATE TABLE t (v BLOB)")?;
                db.query_row("PRAGMA page_size", [], |r| r.get(0))
            })
            .await
            .expect("table");
        let page_size = u64::try_from(page_size).expect("page size");
        // A transaction that only reads writes nothing to the log: not a commit to time.
        let rows: i64 = store
            .call(|db| db.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .await
            .expect("read");
        assert_eq!(rows, 0);
        // Each insert fills a page of its own, and the inserts write several times
        // the pages after which the log is checkpointed.
        let wal = dir.path().join("t.db-wal");
        let inserts = 4 * usize::try_from(CHECKPOINT_PAGES).expect("pages");
        let mut longest = 0;
        for _ in 0..inserts {
            store
                .call(|db| {
                    db.execute("INSERT INTO t (v) VALUES (zeroblob(3000))", [])
                        .map(drop)
                })
                .await
                .expect("insert");
            longest = longest.max(std::fs::metadata(&wal).expect("log").len());
        }
        let seen = seen.lock().expect("steps").clone();
        let count = |wanted| seen.iter().filter(|(step, _)| *step == wanted).count();
        // The table's commit and every insert's, not the read's.
        assert_eq!(count(DiskStep::Commit), inserts + 1);
        assert!(count(DiskStep::Checkpoint) >= 3, "{seen:?}");
        // A frame is a page and its 24-byte header; the log has a 32-byte header.
        let frames = (longest - 32) / (page_size + 24);
        assert!(
            frames < u64::try_from(CHECKPOINT_PAGES).expect("pages") + 10,
            "the log reached {frames} frames"
        );
        store.close().await;
    }
}

#[cfg(test)]
mod secure_delete {
    use super::*;
    use crate::domain::EndpointId;

    const DAY_MS: i64 = 86_400_000;

    /// Where `needle` occurs in the file at `path`.
    fn occurs_in(path: &Path, needle: &[u8]) -> bool {
        let bytes = std::fs::read(path).expect("read the database file");
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn a_delivered_message_leaves_no_trace_in_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let now = Timestamp(1_700_000_000_000);
        let store = SqliteStore::open(&path, Synchronous::Full, now).expect("open");
        let recipient =
            EndpointId::parse("021208ff33689e93851eeff50b34197ffe189befe32d8ea7e0ef390133974c4a2")
                .expect("id");
        // A short match (one B-tree cell) and a bundle-sized one (overflow pages).
        let short = b"match:alice@secret-one.example,key".to_vec();
        let mut long = vec![b'x'; 6000];
        long.extend_from_slice(b"bob@secret-two.example");
        for (n, content) in [short, long].into_iter().enumerate() {
            let event = EventKey {
                source: recipient.as_str().to_owned(),
                id: format!("parcel-{n}"),
            };
            let message = OutgoingMessage::caused_by(
                &event,
                MessageKind::PAIRING_MATCH,
                "0server",
                recipient.clone(),
                "application/test",
                content,
                now,
                Timestamp(now.0 + DAY_MS),
            );
            let queued = store
                .record_and_queue(EventMessages {
                    event,
                    messages: vec![message],
                    event_expiry: Timestamp(now.0 + DAY_MS),
                })
                .await
                .expect("queue");
            assert_eq!(queued, QueueOutcome::Queued);
        }
        let claimed = store
            .claim_due_messages(now, Timestamp(now.0 + 60_000), 10)
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 2);
        for entry in &claimed {
            store.mark_delivered(entry).await.expect("delivered");
        }
        // Closing checkpoints the WAL into the file and removes it.
        store.close().await;
        for secret in [&b"alice@secret-one.example"[..], b"bob@secret-two.example"] {
            assert!(
                !occurs_in(&path, secret),
                "{} is still in the file",
                String::from_utf8_lossy(secret)
            );
        }
    }
}
