//! The PostgreSQL store, for several stateless replicas on one database.
//!
//! What the SQLite store gets from its single writer thread, this one gets from the
//! database: a transaction-scoped advisory lock on the unordered pair of VeraId digests
//! serialises the read-then-write of two reverse requests, wherever they arrive; the
//! processed-event key is inserted first, so a redelivery racing its original waits for
//! it and then sees it; and outbox claims take a lease with `FOR UPDATE SKIP LOCKED`, so
//! two replicas never hold the same message. Writes go through each replica's batcher
//! ([`batch`]): whatever arrives together commits together, in a few round trips.

mod batch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{
    EventMessages, OutboxEntry, OutboxStatus, OutboxSummary, PairingOutcome, PairingSubmission,
    PurgeReport, QueueOutcome, RequestStats, Result, Stats, Store, StoreError, StoredMessage,
    check_schema_version, deliverable,
};
use crate::domain::{MessageId, MessageKind, Timestamp, VeraIdDigest};

/// The schema version this build migrates PostgreSQL databases to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// The schema, one entry per version; applied in order under an advisory lock, so that
/// replicas starting together migrate once.
const MIGRATIONS: &[&str] = &[
    // 1: the same tables as SQLite's migrations 1 and 2.
    "CREATE TABLE settings (
         name TEXT PRIMARY KEY,
         value BYTEA NOT NULL
     );
     CREATE TABLE pending_requests (
         requester_digest BYTEA NOT NULL,
         target_digest BYTEA NOT NULL,
         endpoint_id TEXT NOT NULL,
         key_der BYTEA NOT NULL,
         created_at BIGINT NOT NULL,
         expires_at BIGINT NOT NULL,
         PRIMARY KEY (requester_digest, target_digest)
     );
     CREATE INDEX pending_requests_expiry ON pending_requests (expires_at);
     CREATE INDEX pending_requests_sender ON pending_requests (endpoint_id, expires_at);
     CREATE INDEX pending_requests_target ON pending_requests (target_digest, expires_at);
     CREATE TABLE processed_events (
         source TEXT NOT NULL,
         id TEXT NOT NULL,
         expires_at BIGINT NOT NULL,
         PRIMARY KEY (source, id)
     );
     CREATE INDEX processed_events_expiry ON processed_events (expires_at);
     CREATE TABLE outbox (
         seq BIGSERIAL PRIMARY KEY,
         id TEXT NOT NULL UNIQUE,
         source TEXT NOT NULL,
         recipient TEXT NOT NULL,
         kind TEXT NOT NULL,
         content BYTEA NOT NULL,
         time_ms BIGINT NOT NULL,
         expiry_ms BIGINT NOT NULL,
         attempts INTEGER NOT NULL DEFAULT 0,
         next_attempt_at BIGINT NOT NULL,
         last_error TEXT
     );
     CREATE INDEX outbox_due ON outbox (next_attempt_at);",
    // 2: claims walk the due messages in (next_attempt_at, seq) order, which this index
    // gives without a sort, however long the backlog.
    "CREATE INDEX outbox_due_seq ON outbox (next_attempt_at, seq);
     DROP INDEX outbox_due;",
    // 3: several protocols, as SQLite's migration 5. Rows that replicas of an older build
    // queue after this (while a rolling upgrade is under way) get an empty content type,
    // which the store reads by their kind.
    "ALTER TABLE pending_requests RENAME COLUMN key_der TO offer;
     ALTER TABLE pending_requests ADD COLUMN protocol TEXT NOT NULL DEFAULT 'tmp';
     ALTER TABLE outbox ADD COLUMN content_type TEXT NOT NULL DEFAULT '';
     UPDATE outbox SET content_type = CASE kind
         WHEN 'pairing-match' THEN 'application/vnd.relaycorp.letro.pairing-match-tmp'
         WHEN 'pairing-completion' THEN 'application/vnd.relaycorp.letro.pairing-completion-tmp'
         ELSE '' END;",
    // 4: as SQLite's migration 6: the per-target cap counts a target's requests from one
    // sending endpoint, by the sender index, which now leads with the endpoint, then the
    // target; the target index served only the old count.
    "DROP INDEX pending_requests_sender;
     DROP INDEX pending_requests_target;
     CREATE INDEX pending_requests_sender
         ON pending_requests (endpoint_id, target_digest, expires_at);",
    // 5: processed-event keys as 16-byte digests ([`EventKey::digest`], as SQLite keeps
    // them) in a table of their own. Keys are random, so each insert lands on a random
    // leaf of the primary key; keyed by (source, id), 174 bytes a key, that index
    // outgrew the shared buffers within a few million events and every insert then wrote
    // a dirty page out (issue 17). A uuid holds the digest in 16 bytes without a length
    // header: 28 bytes an index entry. The old table stays for replicas of the previous
    // build during a rolling upgrade: its triggers record and forget their keys here, and
    // an insert of a key known here is skipped, which they read as a redelivery. Locked
    // first, so that no old replica's key slips between the copy and the triggers.
    "LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE;
     CREATE FUNCTION letro_event_key(source TEXT, id TEXT) RETURNS UUID
         LANGUAGE sql STABLE STRICT PARALLEL SAFE
         AS $$ SELECT encode(substring(sha256(convert_to(source, 'UTF8') || decode('00', 'hex')
                                              || convert_to(id, 'UTF8')) FROM 1 FOR 16),
                             'hex')::uuid $$;
     CREATE TABLE processed_event_keys (
         key UUID PRIMARY KEY,
         expires_at BIGINT NOT NULL
     );
     CREATE INDEX processed_event_keys_expiry ON processed_event_keys (expires_at);
     INSERT INTO processed_event_keys (key, expires_at)
         SELECT letro_event_key(source, id), max(expires_at) FROM processed_events GROUP BY 1;
     TRUNCATE processed_events;
     CREATE FUNCTION letro_record_old_event_key() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         INSERT INTO processed_event_keys (key, expires_at)
             VALUES (letro_event_key(NEW.source, NEW.id), NEW.expires_at)
             ON CONFLICT (key) DO NOTHING;
         IF FOUND THEN
             RETURN NEW;
         END IF;
         RETURN NULL;
     END $$;
     CREATE TRIGGER record_event_key BEFORE INSERT ON processed_events
         FOR EACH ROW EXECUTE FUNCTION letro_record_old_event_key();
     CREATE FUNCTION letro_forget_old_event_key() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         DELETE FROM processed_event_keys WHERE key = letro_event_key(OLD.source, OLD.id);
         RETURN NULL;
     END $$;
     CREATE TRIGGER forget_event_key AFTER DELETE ON processed_events
         FOR EACH ROW EXECUTE FUNCTION letro_forget_old_event_key();",
];

/// Advisory lock key of migrations ("letro" in ASCII).
const MIGRATION_LOCK: i64 = 0x006c_6574_726f;

/// Advisory lock of [`Store::reclaim`], in the two-integer key space, which never meets
/// the single 64-bit keys of migrations and pairs: one replica vacuums at a time.
pub const RECLAIM_LOCK: (i32, i32) = (0x6c65_7472, 1);

pub use batch::{BatchAnswer, BatchOp};
use batch::{Batcher, Counters};

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    batcher: Batcher,
    counters: Arc<Counters>,
    /// [`RECLAIM_DEAD_ROWS`], but for tests.
    reclaim_threshold: i64,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The batcher answered an operation with another operation's answer: a bug.
fn mismatched(answer: &BatchAnswer) -> StoreError {
    StoreError::Unavailable(format!("the batch answered {answer:?}"))
}

impl PostgresStore {
    /// Connects, and migrates the schema.
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<Self> {
        let store = Self::pool(url, max_connections, timeout).await?;
        store.migrate(MIGRATIONS.len()).await?;
        Ok(store)
    }

    /// Creates the schema at `version`, as a letro-server of that schema left it, for
    /// tests of upgrades. Not for production: the server migrates on its own.
    #[doc(hidden)]
    pub async fn create_at_version(url: &str, version: usize) -> Result<()> {
        let store = Self::pool(url, 1, Duration::from_secs(5)).await?;
        let created = store.migrate(version.min(MIGRATIONS.len())).await;
        store.pool.close().await;
        created
    }

    /// Connects to a database whose schema must already be this binary's, as admin
    /// commands need: they run beside servers and must not upgrade a database under them.
    pub async fn connect_existing(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let store = Self::pool(url, max_connections, timeout).await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('letro_schema') IS NOT NULL")
            .fetch_one(&store.pool)
            .await
            .map_err(unavailable)?;
        let version: i32 = if exists {
            sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM letro_schema")
                .fetch_one(&store.pool)
                .await
                .map_err(unavailable)?
        } else {
            0
        };
        let version = usize::try_from(version).unwrap_or(0);
        check_schema_version(version, MIGRATIONS.len(), true)?;
        Ok(store)
    }

    async fn pool(url: &str, max_connections: u32, timeout: Duration) -> Result<Self> {
        // No ping before lending a connection: it was a round trip of its own before every
        // transaction (a pairing request takes five). A connection that died while idle
        // (PostgreSQL restarted) fails its next statement instead; sqlx then drops it, and
        // that one request gets 503 and is redelivered, as during the restart itself.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(unavailable)?;
        let counters = Arc::new(Counters::default());
        Ok(Self {
            batcher: Batcher::start(pool.clone(), counters.clone()),
            pool,
            counters,
            reclaim_threshold: RECLAIM_DEAD_ROWS,
        })
    }

    /// This store with [`Store::reclaim`] vacuuming tables from `dead_rows` dead row
    /// versions on, instead of [`RECLAIM_DEAD_ROWS`]: for tests, which churn a few rows.
    #[doc(hidden)]
    #[must_use]
    pub fn with_reclaim_threshold(mut self, dead_rows: i64) -> Self {
        self.reclaim_threshold = dead_rows;
        self
    }

    /// Runs `ops` in one batch of their own, as the batcher would had they arrived
    /// together, and answers each. For tests of what a batch must get right.
    #[doc(hidden)]
    pub async fn run_as_one_batch(&self, ops: Vec<BatchOp>) -> Vec<Result<BatchAnswer>> {
        self.batcher.call_together(ops).await
    }

    async fn call(&self, op: BatchOp) -> Result<BatchAnswer> {
        self.batcher.call(op).await
    }

    /// Applies the migrations up to `target` that are not applied yet.
    async fn migrate(&self, target: usize) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Each statement sees what committed before it, whatever the database's default
        // isolation: migration 5 locks a table, then copies it, and must see every row
        // committed before its lock.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // PostgreSQL's NOTICEs ("relation already exists, skipping") are not news. SET
        // LOCAL, not a connection option: poolers such as PgBouncer refuse `options`.
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS letro_schema (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let applied: i32 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM letro_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let applied = usize::try_from(applied).unwrap_or(0);
        check_schema_version(applied, MIGRATIONS.len(), false)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(applied) {
            sqlx::raw_sql(*sql)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query("INSERT INTO letro_schema (version) VALUES ($1)")
                .bind(i32::try_from(i + 1).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}

/// The advisory lock key of the unordered pair {a, b}: both halves of a pair take the
/// same lock, so their transactions run one after the other.
fn pair_lock(a: &VeraIdDigest, b: &VeraIdDigest) -> i64 {
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut hash = Sha256::new();
    hash.update(first.0);
    hash.update(second.0);
    let digest = hash.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The tables whose rows live for seconds: every outbox message leaves two dead row
/// versions (the claim's update, the delete), a matched pair one.
const CHURNED: [&str; 2] = ["outbox", "pending_requests"];

/// Dead row versions a churned table holds before [`Store::reclaim`] vacuums it, by
/// PostgreSQL's statistics. The claims and the next-due reads walk the due index from its
/// start, through the entries of every message delivered since the last VACUUM: under
/// load, a second's churn, not five (issue 17). An idle database is left alone.
pub const RECLAIM_DEAD_ROWS: i64 = 2_000;

/// The churned tables that hold at least `threshold` dead row versions (every one, where
/// PostgreSQL keeps no statistics: `track_counts` off).
async fn churned_tables(
    pool: &PgPool,
    threshold: i64,
) -> std::result::Result<Vec<&'static str>, sqlx::Error> {
    // The statistics lag by up to a second (each backend reports at most once a second),
    // as much as the interval between two reclaims.
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT t.name FROM unnest($1::text[]) AS t(name)
         LEFT JOIN pg_stat_user_tables AS s ON s.relid = to_regclass(t.name)
         WHERE NOT current_setting('track_counts')::bool OR s.n_dead_tup >= $2",
    )
    .bind(CHURNED)
    .bind(threshold)
    .fetch_all(pool)
    .await?;
    Ok(CHURNED
        .into_iter()
        .filter(|t| due.iter().any(|d| d == t))
        .collect())
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<()> {
        self.counters.statement();
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn setting_or_insert(&self, name: &'static str, candidate: Vec<u8>) -> Result<Vec<u8>> {
        // One transaction: the insert waits for a racing replica's insert to commit, and
        // the read that follows then sees whichever value was first.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(value)
    }

    async fn setting(&self, name: &'static str) -> Result<Option<Vec<u8>>> {
        self.counters.statement();
        sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn submit_pairing_request(&self, s: PairingSubmission) -> Result<PairingOutcome> {
        match self.call(BatchOp::Pair(Box::new(s))).await? {
            BatchAnswer::Pair(outcome) => Ok(outcome),
            other => Err(mismatched(&other)),
        }
    }

    async fn record_and_queue(&self, s: EventMessages) -> Result<QueueOutcome> {
        match self.call(BatchOp::Queue(s)).await? {
            BatchAnswer::Queue(outcome) => Ok(outcome),
            other => Err(mismatched(&other)),
        }
    }

    async fn claim_due_messages(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let op = BatchOp::Claim {
            now,
            lease_until,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        };
        let rows = match self.call(op).await? {
            BatchAnswer::Claimed(rows) => rows,
            other => return Err(mismatched(&other)),
        };
        let rows = rows
            .into_iter()
            .map(|r| StoredMessage {
                seq: r.seq,
                id: r.id,
                source: r.source,
                recipient: r.recipient,
                kind: r.kind,
                content_type: r.content_type,
                content: r.content,
                time: r.time,
                expiry: r.expiry,
                attempts: i64::from(r.attempts),
            })
            .collect();
        let (entries, undeliverable) = deliverable(rows, now);
        // Rare (rows of another build): a statement each, outside the claim, which
        // already holds them under its lease.
        for row in undeliverable {
            let query = if row.expired {
                sqlx::query("DELETE FROM outbox WHERE seq = $1").bind(row.seq)
            } else {
                sqlx::query("UPDATE outbox SET last_error = $2 WHERE seq = $1")
                    .bind(row.seq)
                    .bind(row.reason)
            };
            query.execute(&self.pool).await.map_err(unavailable)?;
        }
        Ok(entries)
    }

    async fn next_due(&self) -> Result<Option<Timestamp>> {
        match self.call(BatchOp::NextDue).await? {
            BatchAnswer::NextDue(next) => Ok(next.map(Timestamp)),
            other => Err(mismatched(&other)),
        }
    }

    async fn mark_delivered(&self, entry: &OutboxEntry) -> Result<()> {
        self.call(BatchOp::Remove(entry.seq)).await.map(drop)
    }

    async fn schedule_retry(&self, entry: &OutboxEntry, at: Timestamp, error: &str) -> Result<()> {
        let error = error.to_owned();
        self.call(BatchOp::Retry {
            seq: entry.seq,
            at,
            error,
        })
        .await
        .map(drop)
    }

    async fn drop_message(&self, entry: &OutboxEntry) -> Result<()> {
        self.mark_delivered(entry).await
    }

    async fn stats(&self) -> Result<Stats> {
        self.counters.statement();
        let (depth, oldest, pending): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), (SELECT min(time_ms) FROM outbox),
                    (SELECT count(*) FROM pending_requests)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(Stats {
            outbox_depth: u64::try_from(depth).unwrap_or(0),
            outbox_oldest: oldest.map(Timestamp),
            pending_requests: u64::try_from(pending).unwrap_or(0),
        })
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<PurgeReport> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let requests = sqlx::query("DELETE FROM pending_requests WHERE expires_at <= $1")
            .bind(now.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        let events = sqlx::query("DELETE FROM processed_event_keys WHERE expires_at <= $1")
            .bind(now.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        // What replicas of the previous build recorded during a rolling upgrade: copies
        // of keys above, so not counted.
        sqlx::query("DELETE FROM processed_events WHERE expires_at <= $1")
            .bind(now.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(PurgeReport { requests, events })
    }

    async fn outbox_status(&self, now: Timestamp) -> Result<OutboxStatus> {
        // Two queries, one snapshot: the counts by kind add up to the depth.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let (depth, due, retrying, oldest, next): (i64, i64, i64, Option<i64>, Option<i64>) =
            sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE next_attempt_at <= $1),
                        count(*) FILTER (WHERE attempts > 0), min(time_ms), min(next_attempt_at)
                 FROM outbox",
            )
            .bind(now.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let kinds: Vec<(String, i64)> =
            sqlx::query_as("SELECT kind, count(*) FROM outbox GROUP BY kind ORDER BY kind")
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let mut by_kind = Vec::with_capacity(kinds.len());
        for (kind, n) in kinds {
            by_kind.push((MessageKind::from_stored(kind), count(n)));
        }
        Ok(OutboxStatus {
            depth: count(depth),
            due: count(due),
            retrying: count(retrying),
            oldest: oldest.map(Timestamp),
            next_attempt: next.map(Timestamp),
            by_kind,
        })
    }

    async fn outbox_list(&self, limit: usize) -> Result<Vec<OutboxSummary>> {
        let rows = sqlx::query(
            "SELECT id, kind, recipient, time_ms, expiry_ms, attempts, next_attempt_at,
                    last_error
             FROM outbox ORDER BY next_attempt_at, seq LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let get = |e: sqlx::Error| unavailable(e);
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let attempts: i32 = row.try_get("attempts").map_err(get)?;
            out.push(OutboxSummary {
                id: MessageId::from_stored(row.try_get("id").map_err(get)?),
                kind: MessageKind::from_stored(row.try_get("kind").map_err(get)?),
                recipient: row.try_get("recipient").map_err(get)?,
                created: Timestamp(row.try_get("time_ms").map_err(get)?),
                expiry: Timestamp(row.try_get("expiry_ms").map_err(get)?),
                attempts: u32::try_from(attempts).unwrap_or(0),
                next_attempt: Timestamp(row.try_get("next_attempt_at").map_err(get)?),
                last_error: row.try_get("last_error").map_err(get)?,
            });
        }
        Ok(out)
    }

    async fn retry_now(&self, ids: Option<Vec<MessageId>>, now: Timestamp) -> Result<u64> {
        // Only messages that failed: one with no failure and a future next attempt is
        // being delivered right now, and making it due would send it twice.
        let query = match &ids {
            None => sqlx::query(
                "UPDATE outbox SET next_attempt_at = $1
                 WHERE attempts > 0 AND next_attempt_at > $1",
            )
            .bind(now.0),
            Some(ids) => sqlx::query(
                "UPDATE outbox SET next_attempt_at = $1
                 WHERE id = ANY($2) AND attempts > 0 AND next_attempt_at > $1",
            )
            .bind(now.0)
            .bind(
                ids.iter()
                    .map(|id| id.as_str().to_owned())
                    .collect::<Vec<_>>(),
            ),
        };
        let done = query.execute(&self.pool).await.map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn request_stats(&self, now: Timestamp) -> Result<RequestStats> {
        let (live, expired, senders, oldest, events): (i64, i64, i64, Option<i64>, i64) =
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE expires_at > $1),
                        count(*) FILTER (WHERE expires_at <= $1),
                        count(DISTINCT endpoint_id) FILTER (WHERE expires_at > $1),
                        min(created_at) FILTER (WHERE expires_at > $1),
                        (SELECT count(*) FROM processed_event_keys)
                 FROM pending_requests",
            )
            .bind(now.0)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(RequestStats {
            live: count(live),
            expired: count(expired),
            senders: count(senders),
            oldest: oldest.map(Timestamp),
            processed_events: count(events),
        })
    }

    async fn reclaim(&self) -> Result<bool> {
        // The counts first, on any connection: an idle database costs one read, and no
        // lock is taken for nothing.
        let tables = churned_tables(&self.pool, self.reclaim_threshold)
            .await
            .map_err(unavailable)?;
        if tables.is_empty() {
            return Ok(false);
        }
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(RECLAIM_LOCK.0)
            .bind(RECLAIM_LOCK.1)
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        if !locked {
            return Ok(false);
        }
        // The simple protocol: VACUUM refuses to run in a transaction block, and an
        // extended-protocol statement may be taken for one. SKIP_LOCKED: a table that
        // autovacuum (or another VACUUM) holds is being done already.
        let started = std::time::Instant::now();
        let vacuumed = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "VACUUM (SKIP_LOCKED) {}",
            tables.join(", ")
        )))
        .execute(&mut *conn)
        .await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(RECLAIM_LOCK.0)
            .bind(RECLAIM_LOCK.1)
            .execute(&mut *conn)
            .await;
        if vacuumed.is_err() || unlocked.is_err() {
            // The session lock must not go back to the pool with the connection: closing
            // the session releases it.
            conn.close_on_drop();
        }
        vacuumed.map_err(unavailable)?;
        unlocked.map_err(unavailable)?;
        tracing::debug!(tables = ?tables, elapsed_ms = started.elapsed().as_millis(), "vacuumed");
        Ok(true)
    }

    async fn close(&self) {
        self.batcher.close().await;
        let c = &self.counters;
        tracing::info!(
            transactions = c.transactions.load(Ordering::Relaxed),
            round_trips = c.round_trips.load(Ordering::Relaxed),
            batched_operations = c.operations.load(Ordering::Relaxed),
            conflicts = c.conflicts.load(Ordering::Relaxed),
            "PostgreSQL store closed"
        );
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_of_a_pair_take_the_same_lock() {
        let a = VeraIdDigest([1; 32]);
        let b = VeraIdDigest([2; 32]);
        let c = VeraIdDigest([3; 32]);
        assert_eq!(pair_lock(&a, &b), pair_lock(&b, &a));
        assert_ne!(pair_lock(&a, &b), pair_lock(&a, &c));
    }
}
