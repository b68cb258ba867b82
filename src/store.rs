//! Durable state: pending pairing requests, processed-event keys, the outbox.
//!
//! One trait, [`Store`], whose methods are domain operations; each runs in one
//! transaction, so a state change and the messages it causes commit together (the
//! transactional outbox). Imports `domain`, `codec` and `flow` only: what a pairing
//! request does is [`flow::plan`](crate::flow::plan)'s to say, and every outgoing
//! message arrives rendered; the store keeps and returns bytes.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::codec::cloudevent::{is_header_safe, is_header_value};
use crate::codec::pairing::{PAIRING_COMPLETION_TYPE, PAIRING_MATCH_TYPE};
use crate::domain::{EndpointId, EventKey, MessageId, MessageKind, OutgoingMessage, Timestamp};

/// What went wrong below the domain. Every variant is transient from the client's point
/// of view: the event was not acknowledged and may be redelivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation (unreachable, read-only, disk full…).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
}

/// `Result` with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub use crate::flow::{PairingOutcome, PairingSubmission};

/// An event whose handling is to queue messages, whatever they are (completions,
/// forwarded authorisations): its key is recorded and the messages queued together.
#[derive(Debug, Clone)]
pub struct EventMessages {
    /// The idempotency key of the event.
    pub event: EventKey,
    /// What it causes, ready to send.
    pub messages: Vec<OutgoingMessage>,
    /// How long the event key is kept.
    pub event_expiry: Timestamp,
}

/// What became of an [`EventMessages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOutcome {
    /// The same event was handled before; nothing changed.
    Duplicate,
    /// The messages are in the outbox.
    Queued,
}

/// A message claimed from the outbox for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Where the store keeps it: a delivery's result is recorded against this row, not
    /// looked up by message id (an index on random ids costs a page write per message).
    pub seq: i64,
    /// The message, byte for byte as it was committed.
    pub message: OutgoingMessage,
    /// Delivery attempts already made.
    pub attempts: u32,
}

/// What an attempt at delivering a claimed message came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The sink accepted it: it leaves the outbox.
    Delivered,
    /// It expired before it could be delivered: it leaves the outbox.
    Expired,
    /// It failed: try again at `at`, keeping `error` for operators.
    Retry {
        /// When it is due again.
        at: Timestamp,
        /// What went wrong.
        error: String,
    },
}

/// Counts for health, metrics and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Messages waiting in the outbox.
    pub outbox_depth: u64,
    /// When the oldest waiting message was created.
    pub outbox_oldest: Option<Timestamp>,
    /// Pairing requests waiting for their reverse half (expired ones included until purged).
    pub pending_requests: u64,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Expired pending requests.
    pub requests: u64,
    /// Expired processed-event keys.
    pub events: u64,
}

/// One outbox message as an operator sees it. No content: a match carries a VeraId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSummary {
    /// The CloudEvent id.
    pub id: MessageId,
    /// What it is.
    pub kind: MessageKind,
    /// The endpoint it goes to, as stored (an operator must see a row even when it is
    /// not a valid endpoint id).
    pub recipient: String,
    /// When it was created.
    pub created: Timestamp,
    /// When it expires and is dropped undelivered.
    pub expiry: Timestamp,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it is next tried (or, while a delivery is in flight, when its lease ends on
    /// PostgreSQL; SQLite keeps leases in the server's memory and shows the time as it
    /// was).
    pub next_attempt: Timestamp,
    /// What the last failed attempt said.
    pub last_error: Option<String>,
}

/// The outbox at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxStatus {
    /// Messages waiting.
    pub depth: u64,
    /// Of those, due now (on SQLite, those being delivered too: their leases are in the
    /// server's memory).
    pub due: u64,
    /// Of those, having failed at least once.
    pub retrying: u64,
    /// Creation time of the oldest.
    pub oldest: Option<Timestamp>,
    /// The earliest next attempt.
    pub next_attempt: Option<Timestamp>,
    /// Waiting messages by kind, in [`MessageKind`] name order.
    pub by_kind: Vec<(MessageKind, u64)>,
}

/// Pending pairing requests at a glance (counts only: no VeraIds, no digests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestStats {
    /// Requests still waiting for their reverse half.
    pub live: u64,
    /// Expired requests not yet purged.
    pub expired: u64,
    /// Distinct endpoints with a live request.
    pub senders: u64,
    /// Creation time of the oldest live request.
    pub oldest: Option<Timestamp>,
    /// Processed-event keys kept for redelivery detection.
    pub processed_events: u64,
}

/// Names of the values kept in the `settings` table.
pub mod settings {
    /// The generated secret that keys VeraId digests, when none is configured.
    pub const VERAID_SECRET: &str = "veraid_secret";
    /// A fingerprint of the secret the stored digests were made with, configured or
    /// generated: a server started with another secret would never match the requests
    /// already waiting, so it refuses to start instead.
    pub const VERAID_SECRET_FINGERPRINT: &str = "veraid_secret_fingerprint";
}

/// The broker's storage. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<()>;

    /// The value of setting `name` (see [`settings`]): the stored one, or `candidate`,
    /// which is then stored, if there is none yet.
    async fn setting_or_insert(&self, name: &'static str, candidate: Vec<u8>) -> Result<Vec<u8>>;

    /// The value of setting `name`, if there is one.
    async fn setting(&self, name: &'static str) -> Result<Option<Vec<u8>>>;

    /// Records a pairing request: stores it, or matches it with the stored reverse
    /// request and queues both matches, or does nothing for a redelivered event.
    async fn submit_pairing_request(&self, submission: PairingSubmission)
    -> Result<PairingOutcome>;

    /// Records the event and queues its messages, or does nothing for a redelivered event.
    async fn record_and_queue(&self, submission: EventMessages) -> Result<QueueOutcome>;

    /// Claims up to `limit` due messages, earliest due first (creation order among equals;
    /// the query must use an index, whatever the backlog), hiding them from other claims
    /// until `lease_until` (so a crash mid-delivery only delays them). A row this build
    /// cannot deliver (see [`StoredMessage::into_entry`]) is leased but left out, and
    /// logged: it never fails the claim of the others.
    async fn claim_due_messages(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>>;

    /// When the next outbox message becomes due, if there is one.
    async fn next_due(&self) -> Result<Option<Timestamp>>;

    /// Removes a claimed message the sink accepted.
    async fn mark_delivered(&self, entry: &OutboxEntry) -> Result<()>;

    /// Counts a failed attempt at a claimed message and schedules the next one.
    async fn schedule_retry(&self, entry: &OutboxEntry, at: Timestamp, error: &str) -> Result<()>;

    /// Removes a claimed message whose expiry has passed.
    async fn drop_message(&self, entry: &OutboxEntry) -> Result<()>;

    /// Records what became of attempts at claimed messages, as [`Self::mark_delivered`],
    /// [`Self::drop_message`] and [`Self::schedule_retry`] would one by one: one result
    /// per attempt, in order. The dispatcher records the attempts that finished together
    /// in one call. The default records each on its own, all at once; the SQLite store
    /// records them in one operation, because a delivered message's own trip to the writer
    /// (a job, its reply, a task to await it) cost more than its `DELETE` (issue 17).
    async fn record_attempts(&self, attempts: &[(OutboxEntry, Attempt)]) -> Vec<Result<()>> {
        futures_util::future::join_all(attempts.iter().map(|(entry, attempt)| async move {
            match attempt {
                Attempt::Delivered => self.mark_delivered(entry).await,
                Attempt::Expired => self.drop_message(entry).await,
                Attempt::Retry { at, error } => self.schedule_retry(entry, *at, error).await,
            }
        }))
        .await
    }

    /// Current counts.
    async fn stats(&self) -> Result<Stats>;

    /// Deletes pending requests and processed-event keys that expired before `now`.
    async fn purge_expired(&self, now: Timestamp) -> Result<PurgeReport>;

    /// The outbox at `now`, for operators.
    async fn outbox_status(&self, now: Timestamp) -> Result<OutboxStatus>;

    /// Up to `limit` outbox messages, earliest next attempt first.
    async fn outbox_list(&self, limit: usize) -> Result<Vec<OutboxSummary>>;

    /// Makes messages that have failed at least once due at `now` instead of at the end
    /// of their backoff: those in `ids`, or all of them. Returns how many were changed.
    async fn retry_now(&self, ids: Option<Vec<MessageId>>, now: Timestamp) -> Result<u64>;

    /// Counts of pending pairing requests at `now`, for operators.
    async fn request_stats(&self, now: Timestamp) -> Result<RequestStats>;

    /// Makes the space of rows that the busiest tables churn through (every outbox
    /// message and most pending requests are deleted within seconds) reusable, where
    /// enough has churned; the server calls it every second. Returns whether it did
    /// anything. SQLite reuses a freed page by itself: nothing to do there.
    async fn reclaim(&self) -> Result<bool> {
        Ok(false)
    }

    /// Hands the store something to tell how long its own writes to disk take, for the
    /// metrics. Only SQLite has steps of its own to time (its single writer's commits
    /// and checkpoints); the default ignores the observer.
    fn observe_disk(&self, observer: DiskObserver) {
        drop(observer);
    }

    /// Finishes queued work and releases the database.
    async fn close(&self);
}

/// A step of writing to disk that the store times, for [`Store::observe_disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskStep {
    /// A transaction's commit, without any checkpoint it ran: SQLite appends the
    /// transaction's pages to its write-ahead log and syncs it.
    Commit,
    /// A checkpoint: the log's pages copied into the database file, which is synced.
    Checkpoint,
}

/// Told of every [`DiskStep`] and how long it took, on the thread that ran it.
pub type DiskObserver = std::sync::Arc<dyn Fn(DiskStep, std::time::Duration) + Send + Sync>;

/// Checks a database's schema version `found` against the `known` migrations of this
/// binary: a newer schema is always refused (this binary would misread it); an older one
/// is refused when `exact`, for commands that must not migrate.
fn check_schema_version(found: usize, known: usize, exact: bool) -> Result<()> {
    if found > known {
        return Err(StoreError::Unavailable(format!(
            "the database schema is at version {found}, newer than this letro-server knows \
             ({known}): use a newer letro-server"
        )));
    }
    if exact && found < known {
        return Err(StoreError::Unavailable(format!(
            "the database schema is at version {found}, this letro-server needs {known}: \
             run `letro-server migrate` (or start the server) first"
        )));
    }
    Ok(())
}

/// An outbox row as a backend reads it, not yet trusted: the row may have been written
/// by another build (a newer replica on the same PostgreSQL database, say).
#[derive(Debug)]
struct StoredMessage {
    seq: i64,
    id: String,
    source: String,
    recipient: String,
    kind: String,
    /// Empty in rows written by a build older than the content-type column.
    content_type: String,
    content: Vec<u8>,
    time: i64,
    expiry: i64,
    attempts: i64,
}

impl StoredMessage {
    /// The entry to deliver, or why this build cannot deliver it. Nothing about the kind
    /// needs knowing: the content type and bytes are the message. Only rows from before
    /// the content-type column are read by kind, for the two kinds such builds wrote.
    fn into_entry(self) -> std::result::Result<OutboxEntry, String> {
        let content_type = match (self.content_type.as_str(), self.kind.as_str()) {
            ("", "pairing-match") => PAIRING_MATCH_TYPE.to_owned(),
            ("", "pairing-completion") => PAIRING_COMPLETION_TYPE.to_owned(),
            ("", kind) => return Err(format!("no content type, and unknown kind {kind:?}")),
            (ct, _) if !is_header_value(ct) => {
                return Err(format!("content type {ct:?} cannot be sent as a header"));
            }
            _ => self.content_type,
        };
        let recipient = EndpointId::parse(&self.recipient)
            .map_err(|_| format!("recipient {:?} is not an endpoint id", self.recipient))?;
        if !is_header_safe(&self.id) || !is_header_safe(&self.source) {
            return Err("id or source cannot be sent as a header".into());
        }
        Ok(OutboxEntry {
            seq: self.seq,
            message: OutgoingMessage {
                id: MessageId::from_stored(self.id),
                source: self.source,
                recipient,
                kind: MessageKind::from_stored(self.kind),
                content_type,
                content: self.content,
                time: Timestamp(self.time),
                expiry: Timestamp(self.expiry),
            },
            attempts: u32::try_from(self.attempts).unwrap_or(u32::MAX),
        })
    }
}

/// A claimed row this build cannot deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Undeliverable {
    seq: i64,
    /// Why, for the log and the row's `last_error`.
    reason: String,
    /// Its expiry has passed: it is deleted, as an expired message is.
    expired: bool,
}

/// Splits claimed rows into those this build can deliver, in `seq` order, and the
/// others, each logged. A backend records the reason in an undeliverable row's
/// `last_error` (it stays leased, and a newer replica may take it once the lease ends)
/// and deletes the expired ones, in the claim's transaction.
fn deliverable(rows: Vec<StoredMessage>, now: Timestamp) -> (Vec<OutboxEntry>, Vec<Undeliverable>) {
    let mut entries = Vec::with_capacity(rows.len());
    let mut undeliverable = Vec::new();
    for row in rows {
        let (seq, id, expiry) = (row.seq, row.id.clone(), Timestamp(row.expiry));
        match row.into_entry() {
            Ok(entry) => entries.push(entry),
            Err(reason) => {
                let expired = expiry <= now;
                tracing::warn!(
                    seq,
                    message.id = %id,
                    %reason,
                    expired,
                    "outbox message this build cannot deliver; {}",
                    if expired { "expired, so dropped" } else { "left in the outbox" }
                );
                undeliverable.push(Undeliverable {
                    seq,
                    reason: format!("this build cannot deliver it: {reason}"),
                    expired,
                });
            }
        }
    }
    entries.sort_by_key(|e| e.seq);
    (entries, undeliverable)
}
