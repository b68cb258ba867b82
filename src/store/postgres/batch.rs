//! Group commit for the PostgreSQL store: each replica carries out the pairing requests,
//! queued messages and delivery results that arrive together in one transaction, with
//! a constant number of round trips per batch, whatever its size.
//!
//! A batch is five round trips: `BEGIN`; the pair locks with every event key
//! ([`RECORD_EVENTS`]); every pending request of every pair the batch touches, with the
//! cap counts of each request ([`READ_PAIRS`]); every write ([`WRITE`]); `COMMIT`. The
//! decisions in between are [`plan`]'s, one request after the other in arrival order,
//! each seeing what the earlier ones of its batch did: both halves of a pair in one
//! batch match, an event there twice is a redelivery the second time, and a cap counts
//! the requests the batch has already stored.
//!
//! Transaction-scoped advisory locks on the pairs, taken in ascending order, serialise
//! the batches of every replica that touch a pair. If a batch fails on a conflict
//! (deadlock, serialisation failure) it is run again; if it fails because of one
//! operation, each operation runs again in a batch of its own, so one bad operation costs
//! the others a retry, not their result; if the database is out of reach, every
//! operation gets that error at once. Nobody hears back before the commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::pair_lock;
use crate::domain::{
    EndpointId, Offer, OutgoingMessage, PendingCounts, PendingRequest, Protocol, Timestamp,
};
use crate::flow::{PairState, Plan, plan};
use crate::store::{
    EventMessages, PairingOutcome, PairingSubmission, QueueOutcome, Result, StoreError,
};

/// Most operations in one transaction.
pub(super) const MAX_BATCH: usize = 256;

/// Runs of a batch that failed on a conflict with another transaction, before its
/// operations are run one by one instead.
const CONFLICT_RETRIES: usize = 3;

/// One write operation for the batcher.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// [`Store::submit_pairing_request`](crate::store::Store::submit_pairing_request).
    Pair(Box<PairingSubmission>),
    /// [`Store::record_and_queue`](crate::store::Store::record_and_queue).
    Queue(EventMessages),
    /// A claimed message delivered or dropped: its row goes.
    Remove(i64),
    /// A failed attempt at a claimed message: counted, and due again at `at`.
    Retry {
        /// The outbox row.
        seq: i64,
        /// When it is next tried.
        at: Timestamp,
        /// What the attempt said.
        error: String,
    },
    /// [`Store::claim_due_messages`](crate::store::Store::claim_due_messages): run in the
    /// batch's transaction when it has one (a round trip more, not a transaction).
    Claim {
        /// Due at or before this.
        now: Timestamp,
        /// Hidden from other claims until this.
        lease_until: Timestamp,
        /// At most this many.
        limit: i64,
    },
    /// [`Store::next_due`](crate::store::Store::next_due), likewise.
    NextDue,
}

/// An outbox row a claim took, as read.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRow {
    pub seq: i64,
    pub id: String,
    pub source: String,
    pub recipient: String,
    pub kind: String,
    pub content_type: String,
    pub content: Vec<u8>,
    pub time: i64,
    pub expiry: i64,
    pub attempts: i32,
}

/// What became of a [`BatchOp`].
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    /// Of a [`BatchOp::Pair`].
    Pair(PairingOutcome),
    /// Of a [`BatchOp::Queue`].
    Queue(QueueOutcome),
    /// Of a [`BatchOp::Remove`] or [`BatchOp::Retry`].
    Done,
    /// Of a [`BatchOp::Claim`].
    Claimed(Vec<ClaimedRow>),
    /// Of a [`BatchOp::NextDue`].
    NextDue(Option<i64>),
}

/// What the store has cost the database so far, for the benchmark and the close log.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Transactions, explicit or a statement on its own.
    pub(super) transactions: AtomicU64,
    /// Messages to the server answered before the next could be sent.
    pub(super) round_trips: AtomicU64,
    /// Operations carried out in batches.
    pub(super) operations: AtomicU64,
    /// Batches run again after a conflict.
    pub(super) conflicts: AtomicU64,
}

impl Counters {
    /// One statement outside any batch: a transaction and a round trip of its own.
    pub(super) fn statement(&self) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    fn add(&self, transactions: u64, round_trips: u64) {
        self.transactions.fetch_add(transactions, Ordering::Relaxed);
        self.round_trips.fetch_add(round_trips, Ordering::Relaxed);
    }
}

struct Job {
    op: BatchOp,
    reply: oneshot::Sender<Result<BatchAnswer>>,
}

enum Msg {
    Job(Job),
    /// Jobs that make a batch of their own (tests).
    Together(Vec<Job>),
    Close(oneshot::Sender<()>),
}

/// The handle on a replica's batching task.
#[derive(Debug, Clone)]
pub(super) struct Batcher {
    jobs: mpsc::UnboundedSender<Msg>,
}

impl Batcher {
    /// Starts the batching task on `pool`.
    pub(super) fn start(pool: PgPool, counters: Arc<Counters>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx, counters));
        Self { jobs }
    }

    /// Runs `op` in the next batch; answers once that batch has committed.
    pub(super) async fn call(&self, op: BatchOp) -> Result<BatchAnswer> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Msg::Job(Job { op, reply }))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `ops` as one batch of their own; answers each once it has committed.
    pub(super) async fn call_together(&self, ops: Vec<BatchOp>) -> Vec<Result<BatchAnswer>> {
        let (jobs, answers): (Vec<Job>, Vec<_>) = ops
            .into_iter()
            .map(|op| {
                let (reply, rx) = oneshot::channel();
                (Job { op, reply }, rx)
            })
            .unzip();
        let sent = self.jobs.send(Msg::Together(jobs)).is_ok();
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            out.push(match (sent, rx.await) {
                (true, Ok(answer)) => answer,
                _ => Err(StoreError::Closed),
            });
        }
        out
    }

    /// Finishes the operations already submitted, then stops the task.
    pub(super) async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.jobs.send(Msg::Close(done)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Msg>, counters: Arc<Counters>) {
    let mut closing = None;
    let mut next = None;
    while closing.is_none() {
        let first = match next.take() {
            Some(msg) => msg,
            None => match rx.recv().await {
                Some(msg) => msg,
                None => break,
            },
        };
        let mut jobs = Vec::new();
        match first {
            Msg::Job(job) => jobs.push(job),
            Msg::Together(together) => {
                run_batch(&pool, together, &counters).await;
                continue;
            }
            Msg::Close(done) => closing = Some(done),
        }
        while closing.is_none() && jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => jobs.push(job),
                Ok(msg @ Msg::Together(_)) => {
                    next = Some(msg);
                    break;
                }
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            run_batch(&pool, jobs, &counters).await;
        }
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// How a batch failed.
enum Failure {
    /// Because of what an operation holds (a value the database refused, a corrupt
    /// row): the operations may succeed alone.
    Operation(StoreError),
    /// The database is unavailable: nothing would succeed now.
    Transaction(StoreError),
}

/// Runs a batch and answers every operation in it.
async fn run_batch(pool: &PgPool, jobs: Vec<Job>, counters: &Counters) {
    let (ops, replies): (Vec<BatchOp>, Vec<_>) = jobs.into_iter().map(|j| (j.op, j.reply)).unzip();
    match run_together(pool, &ops, counters).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(Failure::Operation(e)) if ops.len() > 1 => {
            tracing::debug!(error = %e, operations = ops.len(), "batch failed; each operation runs alone");
            let mut unavailable = None;
            for (op, reply) in ops.into_iter().zip(replies) {
                let answer = match &unavailable {
                    Some(e) => Err(Clone::clone(e)),
                    None => match run_together(pool, std::slice::from_ref(&op), counters).await {
                        Ok(mut answers) => answers
                            .pop()
                            .ok_or_else(|| StoreError::Unavailable("no answer".into())),
                        Err(Failure::Operation(e)) => Err(e),
                        Err(Failure::Transaction(e)) => {
                            unavailable = Some(e.clone());
                            Err(e)
                        }
                    },
                };
                let _ = reply.send(answer);
            }
        }
        Err(Failure::Operation(e) | Failure::Transaction(e)) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Runs `ops` in one transaction, again after a conflict with another transaction.
async fn run_together(
    pool: &PgPool,
    ops: &[BatchOp],
    counters: &Counters,
) -> std::result::Result<Vec<BatchAnswer>, Failure> {
    let mut conflicts = 0;
    loop {
        match attempt(pool, ops, counters).await {
            Ok(answers) => {
                counters
                    .operations
                    .fetch_add(ops.len() as u64, Ordering::Relaxed);
                return Ok(answers);
            }
            Err(BatchError::Db(e)) if is_conflict(&e) && conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "batch conflicted with another transaction; again");
            }
            Err(BatchError::Corrupt(what)) => {
                return Err(Failure::Operation(StoreError::Unavailable(format!(
                    "corrupt row: {what}"
                ))));
            }
            Err(BatchError::Db(e)) => {
                let error = StoreError::Unavailable(e.to_string());
                return Err(if is_operations_fault(&e) {
                    Failure::Operation(error)
                } else {
                    Failure::Transaction(error)
                });
            }
        }
    }
}

enum BatchError {
    Db(sqlx::Error),
    Corrupt(&'static str),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// A deadlock or a serialisation failure: the same batch may well succeed again.
fn is_conflict(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|code| code.starts_with("40"))
}

/// The database refused a statement for what it held (a bad value, a constraint), not
/// because it is unreachable, shutting down, short of resources or broken.
fn is_operations_fault(e: &sqlx::Error) -> bool {
    sqlstate(e).is_some_and(|code| {
        !["08", "40", "53", "57", "58", "XX"]
            .iter()
            .any(|class| code.starts_with(class))
    })
}

/// Locks every pair of the batch, in ascending order (so that two batches never wait
/// for each other both ways), then records every event key; returns the keys that were
/// new. A racing transaction recording the same key makes this wait for it to finish.
/// Keys are [`EventKey::digest`](crate::domain::EventKey::digest)s, bound as bytea and
/// stored as uuid (16 bytes, no length header: the smallest index entry PostgreSQL has
/// for them).
const RECORD_EVENTS: &str = "
    WITH locked AS (SELECT count(pg_advisory_xact_lock(k)) AS n FROM unnest($1::int8[]) AS k)
    INSERT INTO processed_event_keys (key, expires_at)
    SELECT encode(e.key, 'hex')::uuid, e.expires_at
    FROM locked, unnest($2::bytea[], $3::int8[]) AS e(key, expires_at)
    ON CONFLICT (key) DO NOTHING
    RETURNING uuid_send(key)";

/// Every pending request of the given pairs (`i` is -1), live or not; then for each
/// request `i`, what its caps look at, each counted up to the limit given (a sender
/// limit of 0 skips that count).
const READ_PAIRS: &str = "
    SELECT -1::int8 AS i, p.requester_digest, p.target_digest, p.endpoint_id, p.protocol,
           p.offer, p.expires_at, 0::int8 AS from_sender, 0::int8 AS for_target
    FROM unnest($1::bytea[], $2::bytea[]) AS x(r, t)
    JOIN pending_requests AS p ON p.requester_digest = x.r AND p.target_digest = x.t
    UNION ALL
    SELECT s.i, NULL, NULL, NULL, NULL, NULL, NULL,
           CASE WHEN s.sender_limit = 0 THEN 0 ELSE (SELECT count(*) FROM (
               SELECT 1 FROM pending_requests
               WHERE endpoint_id = s.e AND expires_at > s.now
                 AND NOT (requester_digest = s.r AND target_digest = s.t)
               LIMIT s.sender_limit) AS capped) END,
           (SELECT count(*) FROM (
               SELECT 1 FROM pending_requests
               WHERE endpoint_id = s.e AND target_digest = s.t AND expires_at > s.now
                 AND requester_digest <> s.r
               LIMIT s.target_limit) AS capped)
    FROM unnest($3::int8[], $4::text[], $5::int8[], $6::bytea[], $7::bytea[], $8::int8[],
                $9::int8[]) AS s(i, e, now, r, t, sender_limit, target_limit)";

/// Every write of a batch, in one statement: event keys taken back (refused requests),
/// pairs deleted (matched), requests stored, delivery results, messages queued (a stable
/// id already queued is the same message: the first is kept). No two parts touch the
/// same row.
const WRITE: &str = "
    WITH forgotten AS (
        DELETE FROM processed_event_keys AS e USING unnest($1::bytea[]) AS f(key)
        WHERE e.key = encode(f.key, 'hex')::uuid),
    unpaired AS (
        DELETE FROM pending_requests AS p USING unnest($2::bytea[], $3::bytea[]) AS d(r, t)
        WHERE p.requester_digest = d.r AND p.target_digest = d.t),
    waiting AS (
        INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id, protocol,
                                      offer, created_at, expires_at)
        SELECT * FROM unnest($4::bytea[], $5::bytea[], $6::text[], $7::text[], $8::bytea[],
                             $9::int8[], $10::int8[])
        ON CONFLICT (requester_digest, target_digest) DO UPDATE SET
            endpoint_id = excluded.endpoint_id, protocol = excluded.protocol,
            offer = excluded.offer, created_at = excluded.created_at,
            expires_at = excluded.expires_at),
    removed AS (
        DELETE FROM outbox AS o USING unnest($11::int8[]) AS d(seq) WHERE o.seq = d.seq),
    retried AS (
        UPDATE outbox AS o SET attempts = o.attempts + 1, next_attempt_at = r.at,
                               last_error = r.error
        FROM unnest($12::int8[], $13::int8[], $14::text[]) AS r(seq, at, error)
        WHERE o.seq = r.seq)
    INSERT INTO outbox (id, source, recipient, kind, content_type, content, time_ms,
                        expiry_ms, next_attempt_at)
    SELECT id, source, recipient, kind, content_type, content, time_ms, expiry_ms, time_ms
    FROM unnest($15::text[], $16::text[], $17::text[], $18::text[], $19::text[],
                $20::bytea[], $21::int8[], $22::int8[])
         AS m(id, source, recipient, kind, content_type, content, time_ms, expiry_ms)
    ON CONFLICT (id) DO NOTHING";

type Digest = [u8; 32];
/// An event key as stored: [`EventKey::digest`](crate::domain::EventKey::digest).
type EventDigest = [u8; 16];
/// A pending request's key: (requester digest, target digest).
type PairKey = (Digest, Digest);

/// A pending request as the batch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    endpoint_id: String,
    protocol: String,
    offer: Vec<u8>,
    /// Only known (and only needed) for a request the batch stores.
    created_at: i64,
    expires_at: i64,
}

/// A pending-request key the batch touches: as read, and as the batch leaves it.
#[derive(Debug, Default)]
struct Slot {
    read: Option<Pending>,
    now: Option<Pending>,
    written: bool,
}

/// The pending requests of every pair of a batch, changed as its requests are planned.
#[derive(Debug, Default)]
struct Pairs {
    slots: HashMap<PairKey, Slot>,
    /// Keys the batch wrote, in the order first written.
    written: Vec<PairKey>,
}

impl Pairs {
    fn current(&self, key: &PairKey) -> Option<&Pending> {
        self.slots.get(key).and_then(|s| s.now.as_ref())
    }

    fn set(&mut self, key: PairKey, value: Option<Pending>) {
        let slot = self.slots.entry(key).or_default();
        slot.now = value;
        if !slot.written {
            slot.written = true;
            self.written.push(key);
        }
    }

    /// Corrects counts made on the rows as read for what the batch has written since,
    /// for request `s`: (from its sender, for its target).
    fn count_changes(&self, s: &PairingSubmission) -> (i64, i64) {
        let own = (s.requester_digest.0, s.target_digest.0);
        let endpoint = s.request.endpoint_id.as_str();
        let now = s.now.0;
        fn live(p: &Option<Pending>, now: i64) -> Option<&Pending> {
            p.as_ref().filter(|p| p.expires_at > now)
        }
        let (mut from_sender, mut for_target) = (0i64, 0i64);
        for key in &self.written {
            if *key == own {
                continue;
            }
            let Some(slot) = self.slots.get(key) else {
                continue;
            };
            let (before, after) = (live(&slot.read, now), live(&slot.now, now));
            let sender =
                |p: Option<&Pending>| i64::from(p.is_some_and(|p| p.endpoint_id == endpoint));
            from_sender += sender(after) - sender(before);
            if key.1 == own.1 && key.0 != own.0 {
                for_target += sender(after) - sender(before);
            }
        }
        (from_sender, for_target)
    }
}

/// The writes a batch has planned.
#[derive(Default)]
struct Writes {
    forgotten: Vec<EventDigest>,
    messages: Vec<OutgoingMessage>,
    removed: Vec<i64>,
    retried: Vec<(i64, Timestamp, String)>,
}

/// Runs `ops` once, in one transaction.
async fn attempt(
    pool: &PgPool,
    ops: &[BatchOp],
    counters: &Counters,
) -> std::result::Result<Vec<BatchAnswer>, BatchError> {
    // Each operation's event key and its expiry; deliveries have none.
    let events: Vec<Option<(EventDigest, Timestamp)>> = ops
        .iter()
        .map(|op| match op {
            BatchOp::Pair(s) => Some((s.event.digest(), s.request_expiry)),
            BatchOp::Queue(q) => Some((q.event.digest(), q.event_expiry)),
            _ => None,
        })
        .collect();
    let mut writes = Writes::default();
    for op in ops {
        match op {
            BatchOp::Remove(seq) => writes.removed.push(*seq),
            BatchOp::Retry { seq, at, error } => writes.retried.push((*seq, *at, error.clone())),
            _ => {}
        }
    }
    if events.iter().all(Option::is_none) {
        // No pairing: each statement is its own transaction.
        if !writes.removed.is_empty() || !writes.retried.is_empty() {
            counters.statement();
            write(pool, &writes, &Pairs::default()).await?;
        }
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            answers.push(match read_outbox(pool, op).await? {
                Some(answer) => {
                    counters.statement();
                    answer
                }
                None => BatchAnswer::Done,
            });
        }
        return Ok(answers);
    }

    let mut tx = pool.begin().await?;
    let mut locks: Vec<i64> = ops
        .iter()
        .filter_map(|op| match op {
            BatchOp::Pair(s) => Some(pair_lock(&s.requester_digest, &s.target_digest)),
            _ => None,
        })
        .collect();
    locks.sort_unstable();
    locks.dedup();
    let recorded: HashSet<EventDigest> = sqlx::query(RECORD_EVENTS)
        .bind(locks)
        .bind(
            events
                .iter()
                .flatten()
                .map(|(k, _)| k.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .flatten()
                .map(|(_, t)| t.0)
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| {
            let key: Vec<u8> = row.try_get(0)?;
            EventDigest::try_from(key.as_slice())
                .map_err(|_| sqlx::Error::Decode("an event key of other than 16 bytes".into()))
        })
        .collect::<std::result::Result<_, sqlx::Error>>()?;
    let mut round_trips = 2;

    // New to the database, and not recorded yet by an earlier operation of the batch.
    let key = |i: usize| events[i].map(|(k, _)| k);
    let is_new = |key: Option<EventDigest>, taken: &HashSet<EventDigest>| {
        key.is_some_and(|k| recorded.contains(&k) && !taken.contains(&k))
    };
    let candidates: Vec<(usize, &PairingSubmission)> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match op {
            BatchOp::Pair(s) if key(i).is_some_and(|k| recorded.contains(&k)) => Some((i, &**s)),
            _ => None,
        })
        .collect();
    let (mut pairs, counts) = if candidates.is_empty() {
        (Pairs::default(), HashMap::new())
    } else {
        round_trips += 1;
        read_pairs(&mut tx, &candidates).await?
    };

    let mut taken: HashSet<EventDigest> = HashSet::new();
    let mut answers = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let answer = match op {
            BatchOp::Queue(q) => {
                if is_new(key(i), &taken) {
                    taken.extend(key(i));
                    writes.messages.extend(q.messages.iter().cloned());
                    BatchAnswer::Queue(QueueOutcome::Queued)
                } else {
                    BatchAnswer::Queue(QueueOutcome::Duplicate)
                }
            }
            BatchOp::Pair(s) => {
                if is_new(key(i), &taken) {
                    let base = counts.get(&i).copied().unwrap_or_default();
                    let plan = plan_one(s, &mut pairs, base)?;
                    match &plan {
                        Plan::Refuse(_) => {}
                        Plan::Wait { .. } | Plan::Match { .. } => {
                            taken.extend(key(i));
                        }
                    }
                    if let Plan::Match { messages } = &plan {
                        writes.messages.extend(messages.iter().cloned());
                    }
                    BatchAnswer::Pair(plan.outcome())
                } else {
                    BatchAnswer::Pair(PairingOutcome::Duplicate)
                }
            }
            BatchOp::Remove(_)
            | BatchOp::Retry { .. }
            | BatchOp::Claim { .. }
            | BatchOp::NextDue => BatchAnswer::Done,
        };
        answers.push(answer);
    }
    // Keys recorded for requests that were refused: taken back, so that a redelivery is
    // judged afresh.
    writes
        .forgotten
        .extend(recorded.iter().filter(|k| !taken.contains(*k)));
    write(&mut *tx, &writes, &pairs).await?;
    for (op, answer) in ops.iter().zip(answers.iter_mut()) {
        if let Some(read) = read_outbox(&mut *tx, op).await? {
            round_trips += 1;
            *answer = read;
        }
    }
    tx.commit().await?;
    counters.add(1, round_trips + 2);
    Ok(answers)
}

/// The cap counts read for a request, before the batch's own writes.
#[derive(Debug, Default, Clone, Copy)]
struct BaseCounts {
    from_sender: i64,
    for_target: i64,
}

/// Reads the pending requests of every pair of `candidates` (each with its place in the
/// batch), both ways, and each one's cap counts (by its place), in one round trip.
async fn read_pairs(
    tx: &mut Transaction<'_, Postgres>,
    candidates: &[(usize, &PairingSubmission)],
) -> std::result::Result<(Pairs, HashMap<usize, BaseCounts>), BatchError> {
    let mut keys: Vec<PairKey> = Vec::with_capacity(2 * candidates.len());
    let mut seen = HashSet::with_capacity(2 * candidates.len());
    for (_, s) in candidates {
        let (r, t) = (s.requester_digest.0, s.target_digest.0);
        for key in [(r, t), (t, r)] {
            if seen.insert(key) {
                keys.push(key);
            }
        }
    }
    // A count stops at its cap plus what the batch's own writes could take off it: a
    // count that reaches that is over the cap whatever the batch did.
    let slack = i64::try_from(keys.len()).unwrap_or(i64::MAX) + 1;
    let rows = sqlx::query(READ_PAIRS)
        .bind(keys.iter().map(|k| k.0.to_vec()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1.to_vec()).collect::<Vec<_>>())
        .bind(
            candidates
                .iter()
                .map(|(i, _)| i64::try_from(*i).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )
        .bind(
            candidates
                .iter()
                .map(|(_, s)| s.request.endpoint_id.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(candidates.iter().map(|(_, s)| s.now.0).collect::<Vec<_>>())
        .bind(
            candidates
                .iter()
                .map(|(_, s)| s.requester_digest.0.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            candidates
                .iter()
                .map(|(_, s)| s.target_digest.0.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            candidates
                .iter()
                .map(|(_, s)| {
                    if s.limits.per_sender == u32::MAX {
                        0
                    } else {
                        i64::from(s.limits.per_sender).saturating_add(slack)
                    }
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            candidates
                .iter()
                .map(|(_, s)| i64::from(s.limits.per_target).saturating_add(slack))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?;
    let mut pairs = Pairs::default();
    for key in &keys {
        pairs.slots.insert(*key, Slot::default());
    }
    let mut counts = HashMap::with_capacity(candidates.len());
    for row in rows {
        let i: i64 = row.try_get(0)?;
        if i < 0 {
            let digest = |n: usize| -> std::result::Result<Digest, BatchError> {
                let bytes: Vec<u8> = row.try_get(n)?;
                bytes
                    .try_into()
                    .map_err(|_| BatchError::Corrupt("pending digest"))
            };
            let key = (digest(1)?, digest(2)?);
            let pending = Pending {
                endpoint_id: row.try_get(3)?,
                protocol: row.try_get(4)?,
                offer: row.try_get(5)?,
                created_at: 0,
                expires_at: row.try_get(6)?,
            };
            let slot = pairs.slots.entry(key).or_default();
            slot.read = Some(pending.clone());
            slot.now = Some(pending);
        } else {
            let i = usize::try_from(i).map_err(|_| BatchError::Corrupt("count index"))?;
            counts.insert(
                i,
                BaseCounts {
                    from_sender: row.try_get(7)?,
                    for_target: row.try_get(8)?,
                },
            );
        }
    }
    Ok((pairs, counts))
}

/// Plans request `s` on the pairs as the batch has left them so far, and applies the
/// plan to them.
fn plan_one(
    s: &PairingSubmission,
    pairs: &mut Pairs,
    base: BaseCounts,
) -> std::result::Result<Plan, BatchError> {
    let own = (s.requester_digest.0, s.target_digest.0);
    let reverse = (own.1, own.0);
    fn live(p: Option<&Pending>, now: i64) -> Option<&Pending> {
        p.filter(|p| p.expires_at > now)
    }
    let endpoint =
        |id: &str| EndpointId::parse(id).map_err(|_| BatchError::Corrupt("pending endpoint id"));
    let counterpart = match live(pairs.current(&reverse), s.now.0) {
        // A protocol this build does not know (a newer replica's row) matches nothing here.
        Some(p) => match Protocol::from_name(&p.protocol) {
            Some(protocol) => Some(PendingRequest {
                endpoint_id: endpoint(&p.endpoint_id)?,
                offer: Offer {
                    protocol,
                    bytes: p.offer.clone(),
                },
            }),
            None => None,
        },
        None => None,
    };
    let previous = match live(pairs.current(&own), s.now.0) {
        Some(p) => Some(endpoint(&p.endpoint_id)?),
        None => None,
    };
    let (from_sender, for_target) = pairs.count_changes(s);
    let counts = PendingCounts {
        from_sender: if s.limits.per_sender == u32::MAX {
            0
        } else {
            u64::try_from(base.from_sender + from_sender).unwrap_or(0)
        },
        for_target: u64::try_from(base.for_target + for_target).unwrap_or(0),
    };
    let plan = plan(
        s,
        PairState {
            counterpart,
            previous,
        },
        || Ok::<_, BatchError>(counts),
    )?;
    match &plan {
        Plan::Refuse(_) => {}
        Plan::Wait { .. } => pairs.set(
            own,
            Some(Pending {
                endpoint_id: s.request.endpoint_id.as_str().to_owned(),
                protocol: s.request.offer.protocol.name().to_owned(),
                offer: s.request.offer.bytes.clone(),
                created_at: s.now.0,
                expires_at: s.request_expiry.0,
            }),
        ),
        Plan::Match { .. } => {
            pairs.set(own, None);
            pairs.set(reverse, None);
        }
    }
    Ok(plan)
}

/// Runs a claim or reads the next due time; `None` for any other operation.
async fn read_outbox<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    op: &BatchOp,
) -> std::result::Result<Option<BatchAnswer>, sqlx::Error> {
    match op {
        BatchOp::Claim {
            now,
            lease_until,
            limit,
        } => {
            let rows = sqlx::query(CLAIM)
                .bind(lease_until.0)
                .bind(now.0)
                .bind(*limit)
                .fetch_all(executor)
                .await?;
            let claimed = rows
                .iter()
                .map(|row| {
                    Ok(ClaimedRow {
                        seq: row.try_get("seq")?,
                        id: row.try_get("id")?,
                        source: row.try_get("source")?,
                        recipient: row.try_get("recipient")?,
                        kind: row.try_get("kind")?,
                        content_type: row.try_get("content_type")?,
                        content: row.try_get("content")?,
                        time: row.try_get("time_ms")?,
                        expiry: row.try_get("expiry_ms")?,
                        attempts: row.try_get("attempts")?,
                    })
                })
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
            Ok(Some(BatchAnswer::Claimed(claimed)))
        }
        BatchOp::NextDue => {
            let next: Option<i64> = sqlx::query_scalar("SELECT min(next_attempt_at) FROM outbox")
                .fetch_one(executor)
                .await?;
            Ok(Some(BatchAnswer::NextDue(next)))
        }
        BatchOp::Pair(_) | BatchOp::Queue(_) | BatchOp::Remove(_) | BatchOp::Retry { .. } => {
            Ok(None)
        }
    }
}

/// Leases up to `$3` messages due at `$2` until `$1`, earliest due first; rows another
/// transaction holds are skipped.
const CLAIM: &str = "
    UPDATE outbox SET next_attempt_at = $1
    WHERE seq IN (
        SELECT seq FROM outbox WHERE next_attempt_at <= $2
        ORDER BY next_attempt_at, seq LIMIT $3
        FOR UPDATE SKIP LOCKED)
    RETURNING seq, id, source, recipient, kind, content_type, content, time_ms,
              expiry_ms, attempts";

/// Carries out `writes` and the pending requests `pairs` left changed, in one statement.
async fn write<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    writes: &Writes,
    pairs: &Pairs,
) -> std::result::Result<(), sqlx::Error> {
    let mut unpaired: Vec<&PairKey> = Vec::new();
    let mut waiting: Vec<(&PairKey, &Pending)> = Vec::new();
    for key in &pairs.written {
        match pairs.slots.get(key).and_then(|s| s.now.as_ref()) {
            Some(p) => waiting.push((key, p)),
            None => unpaired.push(key),
        }
    }
    let messages = &writes.messages;
    let column = |f: fn(&OutgoingMessage) -> String| messages.iter().map(f).collect::<Vec<_>>();
    sqlx::query(WRITE)
        .bind(
            writes
                .forgotten
                .iter()
                .map(|k| k.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(unpaired.iter().map(|k| k.0.to_vec()).collect::<Vec<_>>())
        .bind(unpaired.iter().map(|k| k.1.to_vec()).collect::<Vec<_>>())
        .bind(
            waiting
                .iter()
                .map(|(k, _)| k.0.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(k, _)| k.1.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(_, p)| p.endpoint_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(_, p)| p.protocol.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(_, p)| p.offer.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(_, p)| p.created_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            waiting
                .iter()
                .map(|(_, p)| p.expires_at)
                .collect::<Vec<_>>(),
        )
        .bind(writes.removed.clone())
        .bind(writes.retried.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(writes.retried.iter().map(|r| r.1.0).collect::<Vec<_>>())
        .bind(
            writes
                .retried
                .iter()
                .map(|r| r.2.clone())
                .collect::<Vec<_>>(),
        )
        .bind(column(|m| m.id.as_str().to_owned()))
        .bind(column(|m| m.source.clone()))
        .bind(column(|m| m.recipient.as_str().to_owned()))
        .bind(column(|m| m.kind.name().to_owned()))
        .bind(column(|m| m.content_type.clone()))
        .bind(
            messages
                .iter()
                .map(|m| m.content.clone())
                .collect::<Vec<_>>(),
        )
        .bind(messages.iter().map(|m| m.time.0).collect::<Vec<_>>())
        .bind(messages.iter().map(|m| m.expiry.0).collect::<Vec<_>>())
        .execute(executor)
        .await
        .map(drop)
}
