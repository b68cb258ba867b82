//! Durable state: pending pairing requests, processed-event keys, the outbox.
//!
//! One trait, [`Store`], whose methods are domain operations; each runs in one
//! transaction, so a state change and the messages it causes commit together (the
//! transactional outbox). Imports `domain` and `codec` only.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::codec::pairing::encode_match;
use crate::domain::{
    EndpointId, EventKey, MessageId, MessageKind, OutgoingMessage, PairingMatch, PairingRequest,
    PendingLimits, Refusal, Timestamp, VeraIdDigest,
};

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

/// An incoming pairing request, validated, with everything needed to store it or match it.
#[derive(Debug, Clone)]
pub struct PairingSubmission {
    /// The idempotency key of the event that carried it.
    pub event: EventKey,
    /// This server's endpoint id (the event's subject): the source of any reply.
    pub server_id: String,
    /// The request itself.
    pub request: PairingRequest,
    /// Digest of the requester's VeraId.
    pub requester_digest: VeraIdDigest,
    /// Digest of the target's VeraId.
    pub target_digest: VeraIdDigest,
    /// When it arrived.
    pub now: Timestamp,
    /// When the request, if it has to wait, stops waiting.
    pub request_expiry: Timestamp,
    /// The expiry of any message it causes.
    pub message_expiry: Timestamp,
    /// The caps a request that has to wait must fit under.
    pub limits: PendingLimits,
}

/// What became of a pairing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingOutcome {
    /// The same event was handled before; nothing changed.
    Duplicate,
    /// Stored to wait for the reverse request.
    Stored {
        /// The endpoint id of the pending request this one replaced, if any.
        replaced: Option<EndpointId>,
    },
    /// It would have had to wait, but did not fit under the caps: nothing was stored,
    /// and the event was not recorded (a redelivery is judged afresh).
    Refused(Refusal),
    /// Matched with the reverse request: both matches are in the outbox.
    Matched {
        /// The ids of the two matches.
        messages: Vec<MessageId>,
    },
}

/// A checked pairing authorisation, ready to be forwarded as a completion.
#[derive(Debug, Clone)]
pub struct CompletionSubmission {
    /// The idempotency key of the event that carried the authorisation.
    pub event: EventKey,
    /// The completion for the grantee.
    pub message: OutgoingMessage,
    /// How long the event key is kept.
    pub event_expiry: Timestamp,
}

/// What became of a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionOutcome {
    /// The same event was handled before; nothing changed.
    Duplicate,
    /// The completion is in the outbox.
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
    /// The endpoint it goes to.
    pub recipient: EndpointId,
    /// When it was created.
    pub created: Timestamp,
    /// When it expires and is dropped undelivered.
    pub expiry: Timestamp,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it is next tried (or, while a delivery is in flight, when its lease ends).
    pub next_attempt: Timestamp,
    /// What the last failed attempt said.
    pub last_error: Option<String>,
}

/// The outbox at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxStatus {
    /// Messages waiting.
    pub depth: u64,
    /// Of those, due now.
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

    /// Queues a completion for its grantee, or does nothing for a redelivered event.
    async fn submit_completion(
        &self,
        submission: CompletionSubmission,
    ) -> Result<CompletionOutcome>;

    /// Claims up to `limit` due messages, earliest due first (creation order among equals;
    /// the query must use an index, whatever the backlog), hiding them from other claims
    /// until `lease_until` (so a crash mid-delivery only delays them).
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

    /// Finishes queued work and releases the database.
    async fn close(&self);
}

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

/// The two outbox messages of a match, as every backend writes them.
fn match_messages(
    submission: &PairingSubmission,
    matches: [&PairingMatch; 2],
) -> [OutgoingMessage; 2] {
    matches.map(|m| {
        OutgoingMessage::caused_by(
            &submission.event,
            MessageKind::PairingMatch,
            &submission.server_id,
            m.recipient_endpoint_id.clone(),
            encode_match(m),
            submission.now,
            submission.message_expiry,
        )
    })
}
