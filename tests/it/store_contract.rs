//! One contract for every `Store` backend: each test below runs on a temporary SQLite
//! file (twice: as it is, and with every waiting request settled into the long-term
//! table at once) and on a fresh PostgreSQL database (from `TEST_DATABASE_URL`; skipped, with a
//! message, when that is not set).

use std::sync::Arc;
use std::time::Duration;

use letro_server::codec::pairing::{MatchOrder, PAIRING_COMPLETION_TYPE};
use letro_server::domain::{
    EndpointId, EventKey, MessageKind, OutgoingMessage, PairingRequest, PendingLimits, Refusal,
    Timestamp, VeraId, VeraIdDigester,
};
use letro_server::store::postgres::PostgresStore;
use letro_server::store::sqlite::{SqliteStore, Synchronous};
use letro_server::store::{
    Attempt, EventMessages, OutboxEntry, PairingOutcome, PairingSubmission, QueueOutcome, Store,
};

use crate::support::*;

pub(crate) const NOW: Timestamp = Timestamp(1_800_000_000_000);
const DAY: Duration = Duration::from_secs(86_400);
const LIMITS: PendingLimits = PendingLimits {
    per_sender: 1000,
    per_target: 100,
    refuse_endpoint_replacement: false,
};

/// A store under test, and what to clean up after it.
pub struct Backend {
    pub store: Arc<dyn Store>,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(PgDatabase),
}

impl Backend {
    pub async fn sqlite() -> Self {
        let (dir, path) = temp_db();
        let store = SqliteStore::open(&path, Synchronous::Full, NOW).expect("open SQLite");
        Self {
            store: Arc::new(store),
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    /// SQLite with no recent pending requests: each waiting request is settled into the
    /// long-term table after the batch that stored it, so every test meets it there.
    pub async fn sqlite_settled() -> Self {
        let (dir, path) = temp_db();
        let store = SqliteStore::open_with_recent_rows(&path, Synchronous::Full, NOW, 0)
            .expect("open SQLite");
        Self {
            store: Arc::new(store),
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    pub async fn postgres() -> Option<Self> {
        let db = PgDatabase::create().await?;
        let store = PostgresStore::connect(&db.url, 8, Duration::from_secs(5))
            .await
            .expect("connect to the test database");
        Some(Self {
            store: Arc::new(store),
            cleanup: Cleanup::Postgres(db),
        })
    }

    pub async fn finish(self) {
        self.store.close().await;
        if let Cleanup::Postgres(db) = self.cleanup {
            db.drop_database().await;
        }
    }
}

fn digester() -> VeraIdDigester {
    VeraIdDigester::new(b"contract-test-secret")
}

/// `requester` (holding `from`'s key) asks to pair with `target`, in event `parcel`.
pub(crate) fn submission(
    from: &Party,
    parcel: &str,
    requester: &str,
    target: &str,
) -> PairingSubmission {
    submission_at(from, parcel, requester, target, NOW)
}

/// The same, arriving at `now`.
fn submission_at(
    from: &Party,
    parcel: &str,
    requester: &str,
    target: &str,
    now: Timestamp,
) -> PairingSubmission {
    let request = PairingRequest::new(
        VeraId::parse(requester).expect("requester"),
        VeraId::parse(target).expect("target"),
        from.key_der.clone(),
        &from.id,
    )
    .expect("valid request");
    let d = digester();
    PairingSubmission {
        event: EventKey {
            source: from.id.clone(),
            id: parcel.to_owned(),
        },
        server_id: SERVER_ID.to_owned(),
        requester_digest: d.digest(&request.requester),
        target_digest: d.digest(&request.target),
        request,
        now,
        request_expiry: now.plus(DAY),
        message_expiry: now.plus(DAY),
        limits: LIMITS,
        at_ceiling: false,
        match_order: MatchOrder::ContactFirst,
    }
}

pub(crate) fn completion(parcel: &str, grantee: &Party) -> EventMessages {
    completion_at(parcel, grantee, NOW)
}

fn completion_at(parcel: &str, grantee: &Party, now: Timestamp) -> EventMessages {
    let event = EventKey {
        source: parties()[0].id.clone(),
        id: parcel.to_owned(),
    };
    EventMessages {
        messages: vec![OutgoingMessage::caused_by(
            &event,
            MessageKind::PAIRING_COMPLETION,
            SERVER_ID,
            EndpointId::parse(&grantee.id).expect("id"),
            PAIRING_COMPLETION_TYPE,
            b"granter,params".to_vec(),
            now,
            now.plus(DAY),
        )],
        event,
        event_expiry: now.plus(DAY),
    }
}

async fn wait_then_match(store: Arc<dyn Store>) {
    let p = parties();
    let first = store
        .submit_pairing_request(submission(&p[0], "a", "a@x.io", "b@y.io"))
        .await
        .expect("submit");
    assert_eq!(first, PairingOutcome::Stored { replaced: None });
    let second = store
        .submit_pairing_request(submission(&p[1], "b", "b@y.io", "a@x.io"))
        .await
        .expect("submit");
    let PairingOutcome::Matched { messages } = second else {
        panic!("expected a match, got {second:?}");
    };
    assert_eq!(messages.len(), 2);
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending_requests, stats.outbox_depth), (0, 2));
    assert_eq!(stats.outbox_oldest, Some(NOW));
    let claimed = store
        .claim_due_messages(NOW, NOW.plus(DAY), 10)
        .await
        .expect("claim");
    let mut recipients: Vec<_> = claimed
        .iter()
        .map(|e| e.message.recipient.as_str().to_owned())
        .collect();
    recipients.sort();
    let mut expected = vec![p[0].id.clone(), p[1].id.clone()];
    expected.sort();
    assert_eq!(recipients, expected);
    assert!(
        claimed
            .iter()
            .all(|e| e.message.kind == MessageKind::PAIRING_MATCH
                && e.attempts == 0
                && messages.contains(&e.message.id))
    );
    // Each party learns the other's endpoint.
    for e in &claimed {
        let text = String::from_utf8(e.message.content.clone()).expect("text");
        let other = if e.message.recipient.as_str() == p[0].id {
            &p[1]
        } else {
            &p[0]
        };
        assert!(text.contains(&other.id), "{text}");
    }
}

async fn a_redelivered_event_changes_nothing(store: Arc<dyn Store>) {
    let p = parties();
    let s = submission(&p[0], "same", "a@x.io", "b@y.io");
    assert!(matches!(
        store.submit_pairing_request(s.clone()).await,
        Ok(PairingOutcome::Stored { .. })
    ));
    assert_eq!(
        store.submit_pairing_request(s).await.expect("again"),
        PairingOutcome::Duplicate
    );
    // The reverse half, delivered twice, matches once.
    let reverse = submission(&p[1], "rev", "b@y.io", "a@x.io");
    assert!(matches!(
        store.submit_pairing_request(reverse.clone()).await,
        Ok(PairingOutcome::Matched { .. })
    ));
    assert_eq!(
        store.submit_pairing_request(reverse).await.expect("again"),
        PairingOutcome::Duplicate
    );
    assert_eq!(store.stats().await.expect("stats").outbox_depth, 2);
    let c = completion("auth", &p[1]);
    assert_eq!(
        store.record_and_queue(c.clone()).await.expect("queue"),
        QueueOutcome::Queued
    );
    assert_eq!(
        store.record_and_queue(c).await.expect("again"),
        QueueOutcome::Duplicate
    );
    assert_eq!(store.stats().await.expect("stats").outbox_depth, 3);
}

async fn replacement_and_caps(store: Arc<dyn Store>) {
    let p = parties();
    let capped = |mut s: PairingSubmission| {
        s.limits.per_sender = 2;
        s.limits.per_target = 2;
        s
    };
    for (parcel, target) in [("1", "t1@y.io"), ("2", "t2@y.io")] {
        let s = capped(submission(&p[0], parcel, "a@x.io", target));
        assert!(matches!(
            store.submit_pairing_request(s).await,
            Ok(PairingOutcome::Stored { replaced: None })
        ));
    }
    let over = capped(submission(&p[0], "3", "a@x.io", "t3@y.io"));
    assert_eq!(
        store
            .submit_pairing_request(over.clone())
            .await
            .expect("submit"),
        PairingOutcome::Refused(Refusal::SenderPendingLimit)
    );
    // Replacing one's own request takes no new slot; another endpoint's replacement is
    // reported with the endpoint it replaced.
    let again = capped(submission(&p[0], "1b", "a@x.io", "t1@y.io"));
    assert_eq!(
        store.submit_pairing_request(again).await.expect("submit"),
        PairingOutcome::Stored {
            replaced: Some(EndpointId::parse(&p[0].id).expect("id"))
        }
    );
    let hijack = capped(submission(&p[1], "h", "a@x.io", "t1@y.io"));
    assert_eq!(
        store.submit_pairing_request(hijack).await.expect("submit"),
        PairingOutcome::Stored {
            replaced: Some(EndpointId::parse(&p[0].id).expect("id"))
        }
    );
    // Per target, counted per sending endpoint: p[2] may have two waiting for t9 (under
    // any requesters), the third is refused; p[3]'s request for t9 is not locked out.
    for i in 2..4 {
        let s = capped(submission(
            &p[2],
            &format!("t{i}"),
            &format!("f{i}@x.io"),
            "t9@y.io",
        ));
        assert!(matches!(
            store.submit_pairing_request(s).await,
            Ok(PairingOutcome::Stored { .. })
        ));
    }
    let s = capped(submission(&p[2], "t4", "f4@x.io", "t9@y.io"));
    assert_eq!(
        store.submit_pairing_request(s).await.expect("submit"),
        PairingOutcome::Refused(Refusal::TargetPendingLimit)
    );
    let contact = capped(submission(&p[3], "t5", "f5@x.io", "t9@y.io"));
    assert!(matches!(
        store.submit_pairing_request(contact).await,
        Ok(PairingOutcome::Stored { replaced: None })
    ));
    // A refused event was not recorded: once a slot frees up, its redelivery is stored.
    assert_eq!(store.stats().await.expect("stats").pending_requests, 5);
    let answer = capped(submission(&p[2], "ans", "t2@y.io", "a@x.io"));
    assert!(matches!(
        store.submit_pairing_request(answer).await,
        Ok(PairingOutcome::Matched { .. })
    ));
    assert!(matches!(
        store.submit_pairing_request(over).await,
        Ok(PairingOutcome::Stored { .. })
    ));
    // The operator's opt-in refusal of replacements from another endpoint.
    let mut strict = submission(&p[3], "strict", "a@x.io", "t3@y.io");
    strict.limits.refuse_endpoint_replacement = true;
    assert_eq!(
        store.submit_pairing_request(strict).await.expect("submit"),
        PairingOutcome::Refused(Refusal::ReplacesOtherEndpoint)
    );
}

async fn leases_retries_and_delivery(store: Arc<dyn Store>) {
    let p = parties();
    for i in 0..3 {
        let c = completion(&format!("c{i}"), &p[1]);
        store.record_and_queue(c).await.expect("queue");
    }
    assert_eq!(store.next_due().await.expect("next"), Some(NOW));
    let lease = NOW.plus(Duration::from_secs(60));
    let first = store
        .claim_due_messages(NOW, lease, 2)
        .await
        .expect("claim");
    assert_eq!(first.len(), 2, "oldest first, up to the limit");
    let rest = store
        .claim_due_messages(NOW, lease, 10)
        .await
        .expect("claim");
    assert_eq!(rest.len(), 1, "claimed messages are leased");
    assert_all_leased_until(store.as_ref(), lease).await;
    // A failed attempt: counted, and due again at its time.
    let retry_at = NOW.plus(Duration::from_secs(5));
    store
        .schedule_retry(&first[0], retry_at, "sink answered 503")
        .await
        .expect("retry");
    let again = store
        .claim_due_messages(retry_at, lease, 10)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].message, first[0].message,
        "the same message, byte for byte"
    );
    assert_eq!(again[0].attempts, 1);
    // Delivered and dropped messages leave the outbox.
    store.mark_delivered(&first[0]).await.expect("delivered");
    store.mark_delivered(&first[1]).await.expect("delivered");
    store.drop_message(&rest[0]).await.expect("dropped");
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.outbox_depth, stats.outbox_oldest), (0, None));
    assert_eq!(store.next_due().await.expect("next"), None);
}

/// The dispatcher records the attempts that finished together in one call: each gets
/// the result it would get alone, and a message's lease ends with its result.
async fn attempts_recorded_together(store: Arc<dyn Store>) {
    let p = parties();
    for i in 0..4 {
        let c = completion(&format!("r{i}"), &p[1]);
        store.record_and_queue(c).await.expect("queue");
    }
    let lease = NOW.plus(Duration::from_secs(60));
    let claimed = store
        .claim_due_messages(NOW, lease, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 4);
    let retry_at = NOW.plus(Duration::from_secs(5));
    let attempts: Vec<(OutboxEntry, Attempt)> = claimed
        .iter()
        .cloned()
        .zip([
            Attempt::Delivered,
            Attempt::Retry {
                at: retry_at,
                error: "sink answered 503".into(),
            },
            Attempt::Expired,
            Attempt::Delivered,
        ])
        .collect();
    let recorded = store.record_attempts(&attempts).await;
    assert_eq!(recorded.len(), 4, "one result per attempt");
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.outbox_depth, 1, "only the retried message is left");
    let list = store.outbox_list(10).await.expect("list");
    assert_eq!(
        (list[0].attempts, list[0].last_error.as_deref()),
        (1, Some("sink answered 503"))
    );
    // Its lease ended with the result: it is due at its retry time, not the lease's end.
    assert_eq!(store.next_due().await.expect("next"), Some(retry_at));
    let again = store
        .claim_due_messages(retry_at, lease, 10)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message, claimed[1].message);
    assert!(store.record_attempts(&[]).await.is_empty());
}

async fn expiry_and_purge(store: Arc<dyn Store>) {
    let p = parties();
    let mut old = submission(&p[0], "old", "a@x.io", "b@y.io");
    old.request_expiry = NOW.plus(Duration::from_secs(10));
    store.submit_pairing_request(old).await.expect("submit");
    // After the expiry the stored half does not match.
    let mut late = submission(&p[1], "late", "b@y.io", "a@x.io");
    late.now = NOW.plus(Duration::from_secs(11));
    late.request_expiry = late.now.plus(DAY);
    assert!(matches!(
        store.submit_pairing_request(late).await,
        Ok(PairingOutcome::Stored { .. })
    ));
    let report = store
        .purge_expired(NOW.plus(Duration::from_secs(20)))
        .await
        .expect("purge");
    assert_eq!((report.requests, report.events), (1, 1));
    assert_eq!(store.stats().await.expect("stats").pending_requests, 1);
}

async fn the_secret_is_chosen_once(store: Arc<dyn Store>) {
    use letro_server::store::settings::{VERAID_SECRET, VERAID_SECRET_FINGERPRINT};
    assert_eq!(store.setting(VERAID_SECRET).await.expect("read"), None);
    let first = store
        .setting_or_insert(VERAID_SECRET, vec![1; 32])
        .await
        .expect("secret");
    assert_eq!(first, vec![1; 32]);
    let second = store
        .setting_or_insert(VERAID_SECRET, vec![2; 32])
        .await
        .expect("secret");
    assert_eq!(second, vec![1; 32]);
    assert_eq!(
        store.setting(VERAID_SECRET).await.expect("read"),
        Some(vec![1; 32])
    );
    // Settings are independent of each other.
    assert_eq!(
        store
            .setting(VERAID_SECRET_FINGERPRINT)
            .await
            .expect("read"),
        None
    );
    store.ping().await.expect("ping");
}

async fn concurrent_reverse_halves_match_exactly_once(store: Arc<dyn Store>) {
    const PAIRS: usize = 60;
    let p = parties();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PAIRS {
        for b_side in [false, true] {
            let (store, p) = (store.clone(), p.clone());
            tasks.spawn(async move {
                let (a, b) = (format!("a{i}@x.io"), format!("b{i}@y.io"));
                let s = if b_side {
                    submission(&p[1], &format!("B{i}"), &b, &a)
                } else {
                    submission(&p[0], &format!("A{i}"), &a, &b)
                };
                store.submit_pairing_request(s).await.expect("submit")
            });
        }
    }
    let mut matched = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.expect("task") {
            PairingOutcome::Matched { .. } => matched += 1,
            PairingOutcome::Stored { replaced: None } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(matched, PAIRS);
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.pending_requests, stats.outbox_depth),
        (0, 2 * PAIRS as u64)
    );
}

async fn concurrent_claims_never_overlap(store: Arc<dyn Store>) {
    const MESSAGES: usize = 120;
    let p = parties();
    for i in 0..MESSAGES {
        store
            .record_and_queue(completion(&format!("m{i}"), &p[i % 5]))
            .await
            .expect("queue");
    }
    let mut claimers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        claimers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim_due_messages(NOW, NOW.plus(DAY), 7)
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|e| e.message.id.as_str().to_owned()));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(mine) = claimers.join_next().await {
        all.extend(mine.expect("claimer"));
    }
    assert_eq!(all.len(), MESSAGES, "every message claimed exactly once");
    assert_eq!(distinct(all), MESSAGES);
}

/// One event, several messages: recorded and queued together, each message kept byte
/// for byte with its own kind and content type, none of them queued twice.
async fn an_event_queues_all_its_messages_once(store: Arc<dyn Store>) {
    let p = parties();
    let event = EventKey {
        source: p[0].id.clone(),
        id: "many".into(),
    };
    let message = |kind: MessageKind, to: &Party, content_type: &str, content: &[u8]| {
        OutgoingMessage::caused_by(
            &event,
            kind,
            SERVER_ID,
            EndpointId::parse(&to.id).expect("id"),
            content_type,
            content.to_vec(),
            NOW,
            NOW.plus(DAY),
        )
    };
    let messages = vec![
        message(
            MessageKind::PAIRING_AUTH,
            &p[1],
            "application/vnd.relaycorp.letro.pairing-auth",
            &[0x30, 0x82, 0, 0xff],
        ),
        message(
            MessageKind::from_stored("some-future-kind".into()),
            &p[2],
            "application/x.future; v=2",
            b"",
        ),
    ];
    // The same message twice in one submission is queued once, on every backend.
    let mut twice = messages.clone();
    twice.push(messages[0].clone());
    let submission = EventMessages {
        event: event.clone(),
        messages: twice,
        event_expiry: NOW.plus(DAY),
    };
    assert_eq!(
        store
            .record_and_queue(submission.clone())
            .await
            .expect("queue"),
        QueueOutcome::Queued
    );
    assert_eq!(
        store.record_and_queue(submission).await.expect("again"),
        QueueOutcome::Duplicate
    );
    let claimed = store
        .claim_due_messages(NOW, NOW.plus(DAY), 10)
        .await
        .expect("claim");
    let got: Vec<OutgoingMessage> = claimed.into_iter().map(|e| e.message).collect();
    assert_eq!(got, messages);
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::sqlite().await;
                    super::$test(backend.store.clone()).await;
                    backend.finish().await;
                }
            )*
        }
        mod sqlite_settled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let backend = super::Backend::sqlite_settled().await;
                    super::$test(backend.store.clone()).await;
                    backend.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(backend) = super::Backend::postgres().await else {
                        return;
                    };
                    super::$test(backend.store.clone()).await;
                    backend.finish().await;
                }
            )*
        }
    };
}

/// One pair matched (two messages), one request waiting, one completion queued, all
/// arriving at `now`: what the operator tests look at.
pub(crate) async fn seed_for_operators(store: &dyn Store, now: Timestamp) {
    let p = parties();
    for s in [
        submission_at(&p[0], "a", "a@x.io", "b@y.io", now),
        submission_at(&p[1], "b", "b@y.io", "a@x.io", now),
        submission_at(&p[2], "c", "c@z.io", "d@z.io", now),
    ] {
        store.submit_pairing_request(s).await.expect("submit");
    }
    store
        .record_and_queue(completion_at("auth", &p[1], now))
        .await
        .expect("queue");
}

/// What the admin commands read and change: counts and lists with no VeraIds, and a
/// retry that only touches messages that failed.
async fn operators_see_counts_and_can_retry_failed_messages(store: Arc<dyn Store>) {
    assert_eq!(
        store.outbox_status(NOW).await.expect("status"),
        Default::default()
    );
    assert!(store.outbox_list(10).await.expect("list").is_empty());
    seed_for_operators(store.as_ref(), NOW).await;
    // One match fails and waits an hour; the others are due. (Messages being delivered
    // count as due on SQLite, whose leases are in the server's memory, and as not due
    // until their lease ends on PostgreSQL: the counts below hold nothing in flight.)
    let claimed = store
        .claim_due_messages(NOW, NOW.plus(Duration::from_secs(60)), 1)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let failed = &claimed[0].message;
    store
        .schedule_retry(
            &claimed[0],
            NOW.plus(Duration::from_secs(3600)),
            "sink answered 503",
        )
        .await
        .expect("retry later");
    let status = store.outbox_status(NOW).await.expect("status");
    assert_eq!((status.depth, status.due, status.retrying), (3, 2, 1));
    assert_eq!(status.oldest, Some(NOW));
    assert_eq!(status.next_attempt, Some(NOW));
    assert_eq!(
        status.by_kind,
        vec![
            (MessageKind::PAIRING_COMPLETION, 1),
            (MessageKind::PAIRING_MATCH, 2)
        ]
    );
    let list = store.outbox_list(10).await.expect("list");
    assert_eq!(list.len(), 3);
    // Next attempt first: the failed one, an hour away, comes last.
    let last = &list[2];
    assert_eq!(last.id, failed.id);
    assert_eq!(
        (last.attempts, last.last_error.as_deref()),
        (1, Some("sink answered 503"))
    );
    assert_eq!(last.recipient, failed.recipient.as_str());
    assert!(
        list[..2]
            .iter()
            .all(|m| m.attempts == 0 && m.last_error.is_none())
    );
    assert_eq!(store.outbox_list(1).await.expect("list").len(), 1);
    // Retrying by id or all: only the failed message changes; in-flight ones are left.
    let others = store
        .claim_due_messages(NOW, NOW.plus(Duration::from_secs(60)), 10)
        .await
        .expect("claim");
    assert_eq!(others.len(), 2);
    let unknown = letro_server::domain::MessageId::from_stored("nope".into());
    let in_flight = others[0].message.id.clone();
    assert_eq!(
        store
            .retry_now(Some(vec![unknown, in_flight]), NOW)
            .await
            .expect("retry"),
        0
    );
    assert_eq!(
        store
            .retry_now(Some(vec![failed.id.clone()]), NOW)
            .await
            .expect("retry"),
        1
    );
    assert_eq!(store.retry_now(None, NOW).await.expect("retry all"), 0);
    let again = store
        .claim_due_messages(NOW, NOW.plus(DAY), 10)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.id, failed.id);
    // Requests: one waiting; after its expiry it counts as expired until purged.
    let stats = store.request_stats(NOW).await.expect("stats");
    assert_eq!((stats.live, stats.expired, stats.senders), (1, 0, 1));
    assert_eq!((stats.oldest, stats.processed_events), (Some(NOW), 4));
    let later = NOW.plus(DAY).plus(Duration::from_secs(1));
    let stats = store.request_stats(later).await.expect("stats");
    assert_eq!((stats.live, stats.expired, stats.oldest), (0, 1, None));
}

/// Nothing can be claimed before `lease` ends, and the dispatcher is told to wait for it.
async fn assert_all_leased_until(store: &dyn Store, lease: Timestamp) {
    assert!(
        store
            .claim_due_messages(NOW, lease, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(store.next_due().await.expect("next"), Some(lease));
}

/// Messages being delivered, in the operators' counts: on PostgreSQL their lease is in
/// the row (not due; the next attempt is the lease's end); on SQLite it is in the
/// server's memory, which an admin command cannot see (due; the next attempt as it was).
/// Either way no claim takes them, and the dispatcher waits for the lease's end.
async fn messages_in_flight_as_operators_count_them(store: Arc<dyn Store>, leases_in_rows: bool) {
    seed_for_operators(store.as_ref(), NOW).await;
    let lease = NOW.plus(Duration::from_secs(60));
    let claimed = store
        .claim_due_messages(NOW, lease, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3);
    let status = store.outbox_status(NOW).await.expect("status");
    let (due, next) = if leases_in_rows { (0, lease) } else { (3, NOW) };
    assert_eq!(
        (status.depth, status.due, status.next_attempt),
        (3, due, Some(next))
    );
    assert_all_leased_until(store.as_ref(), lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_as_operators_count_them_on_sqlite() {
    let backend = Backend::sqlite().await;
    messages_in_flight_as_operators_count_them(backend.store.clone(), false).await;
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_as_operators_count_them_on_postgres() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    messages_in_flight_as_operators_count_them(backend.store.clone(), true).await;
    backend.finish().await;
}

contract!(
    operators_see_counts_and_can_retry_failed_messages,
    wait_then_match,
    a_redelivered_event_changes_nothing,
    replacement_and_caps,
    leases_retries_and_delivery,
    attempts_recorded_together,
    expiry_and_purge,
    the_secret_is_chosen_once,
    concurrent_reverse_halves_match_exactly_once,
    concurrent_claims_never_overlap,
    an_event_queues_all_its_messages_once,
);

/// What a PostgreSQL replica's batch must get right when the requests that arrive
/// together share pairs, events and caps: each batch below runs as one transaction, and
/// its answers must be those of the same requests one after the other.
mod postgres_batches {
    use letro_server::store::postgres::{BatchAnswer, BatchOp};

    use super::*;

    async fn store_on(db: &PgDatabase) -> PostgresStore {
        PostgresStore::connect(&db.url, 4, Duration::from_secs(5))
            .await
            .expect("connect to the test database")
    }

    fn pair(s: PairingSubmission) -> BatchOp {
        BatchOp::Pair(Box::new(s))
    }

    fn answers(results: Vec<letro_server::store::Result<BatchAnswer>>) -> Vec<BatchAnswer> {
        results.into_iter().map(|r| r.expect("answer")).collect()
    }

    fn stored() -> BatchAnswer {
        BatchAnswer::Pair(PairingOutcome::Stored { replaced: None })
    }

    fn is_match(a: &BatchAnswer) -> bool {
        matches!(a, BatchAnswer::Pair(PairingOutcome::Matched { messages }) if messages.len() == 2)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_halves_in_one_batch_match() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = store_on(&db).await;
        let p = parties();
        let got = answers(
            store
                .run_as_one_batch(vec![
                    pair(submission(&p[0], "a", "a@x.io", "b@y.io")),
                    pair(submission(&p[2], "c", "c@x.io", "d@y.io")),
                    pair(submission(&p[1], "b", "b@y.io", "a@x.io")),
                ])
                .await,
        );
        assert_eq!(got[0], stored());
        assert_eq!(got[1], stored());
        assert!(is_match(&got[2]), "{got:?}");
        let stats = store.stats().await.expect("stats");
        assert_eq!((stats.pending_requests, stats.outbox_depth), (1, 2));
        let claimed = store
            .claim_due_messages(NOW, NOW.plus(DAY), 10)
            .await
            .expect("claim");
        let recipients: Vec<&str> = claimed
            .iter()
            .map(|e| e.message.recipient.as_str())
            .collect();
        assert_eq!(recipients, [p[1].id.as_str(), p[0].id.as_str()]);
        store.close().await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_twice_in_one_batch_is_a_redelivery_the_second_time() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = store_on(&db).await;
        let p = parties();
        let a = submission(&p[0], "a", "a@x.io", "b@y.io");
        let b = submission(&p[1], "b", "b@y.io", "a@x.io");
        let c = completion("auth", &p[1]);
        let got = answers(
            store
                .run_as_one_batch(vec![
                    pair(a.clone()),
                    pair(a),
                    BatchOp::Queue(c.clone()),
                    pair(b.clone()),
                    BatchOp::Queue(c),
                    pair(b),
                ])
                .await,
        );
        let duplicate = BatchAnswer::Pair(PairingOutcome::Duplicate);
        assert_eq!(got[0], stored());
        assert_eq!(got[1], duplicate);
        assert_eq!(got[2], BatchAnswer::Queue(QueueOutcome::Queued));
        assert!(is_match(&got[3]), "{got:?}");
        assert_eq!(got[4], BatchAnswer::Queue(QueueOutcome::Duplicate));
        assert_eq!(got[5], duplicate);
        let stats = store.stats().await.expect("stats");
        assert_eq!((stats.pending_requests, stats.outbox_depth), (0, 3));
        assert_eq!(
            store
                .request_stats(NOW)
                .await
                .expect("stats")
                .processed_events,
            3
        );
        store.close().await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn caps_count_what_the_batch_stored_and_freed() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = store_on(&db).await;
        let p = parties();
        let capped = |mut s: PairingSubmission| {
            s.limits.per_sender = 2;
            s.limits.per_target = 2;
            s
        };
        // One waiting before the batch, for target t@y.io.
        store
            .submit_pairing_request(capped(submission(&p[0], "0", "f0@x.io", "t@y.io")))
            .await
            .expect("submit");
        let got = answers(
            store
                .run_as_one_batch(vec![
                    // p[0]'s second for t@y.io fits, its third does not.
                    pair(capped(submission(&p[0], "1", "f1@x.io", "t@y.io"))),
                    pair(capped(submission(&p[0], "2", "f2@x.io", "t@y.io"))),
                    // t@y.io answers f0: a slot frees up, and the refused request's event,
                    // delivered again in the same batch, is judged afresh and fits.
                    pair(capped(submission(&p[3], "ans", "t@y.io", "f0@x.io"))),
                    pair(capped(submission(&p[0], "2", "f2@x.io", "t@y.io"))),
                    // Per sender: p[4] may have two waiting.
                    pair(capped(submission(&p[4], "s1", "g@x.io", "u1@y.io"))),
                    pair(capped(submission(&p[4], "s2", "g@x.io", "u2@y.io"))),
                    pair(capped(submission(&p[4], "s3", "g@x.io", "u3@y.io"))),
                    // Replacing one's own waiting request takes no new slot.
                    pair(capped(submission(&p[4], "s1b", "g@x.io", "u1@y.io"))),
                    // What others have waiting for t@y.io (p[0]'s two, p[2]'s one) does
                    // not count against p[1].
                    pair(capped(submission(&p[2], "o2", "k@x.io", "t@y.io"))),
                    pair(capped(submission(&p[1], "o1", "h@x.io", "t@y.io"))),
                ])
                .await,
        );
        let refused = |r| BatchAnswer::Pair(PairingOutcome::Refused(r));
        assert_eq!(got[0], stored());
        assert_eq!(got[1], refused(Refusal::TargetPendingLimit));
        assert!(is_match(&got[2]), "{got:?}");
        assert_eq!(got[3], stored());
        assert_eq!(got[4], stored());
        assert_eq!(got[5], stored());
        assert_eq!(got[6], refused(Refusal::SenderPendingLimit));
        assert_eq!(
            got[7],
            BatchAnswer::Pair(PairingOutcome::Stored {
                replaced: Some(EndpointId::parse(&p[4].id).expect("id"))
            })
        );
        assert_eq!(got[8], stored());
        assert_eq!(got[9], stored());
        let stats = store.request_stats(NOW).await.expect("stats");
        // f1, f2, g->u1, g->u2, k, h wait; of the ten events, the refused s3 left no key.
        assert_eq!((stats.live, stats.processed_events), (6, 9));
        store.close().await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operation_the_database_refuses_fails_alone() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = store_on(&db).await;
        let p = parties();
        // PostgreSQL text cannot hold a NUL: this one statement fails the whole batch.
        let mut bad = completion("bad", &p[1]);
        bad.messages[0].content_type = "text/plain\0".into();
        let results = store
            .run_as_one_batch(vec![
                pair(submission(&p[0], "a", "a@x.io", "b@y.io")),
                BatchOp::Queue(bad),
                pair(submission(&p[1], "b", "b@y.io", "a@x.io")),
            ])
            .await;
        assert_eq!(results[0].as_ref().expect("alone, it succeeds"), &stored());
        assert!(results[1].is_err(), "{results:?}");
        assert!(is_match(results[2].as_ref().expect("alone, it succeeds")));
        let stats = store.stats().await.expect("stats");
        assert_eq!((stats.pending_requests, stats.outbox_depth), (0, 2));
        store.close().await;
        db.drop_database().await;
    }

    /// Two replicas' batches, each holding one half of the same pairs, at the same time:
    /// every pair matches exactly once, whichever commits first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_batches_on_the_same_pairs_match_each_once() {
        const PAIRS: usize = 100;
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let (one, two) = (store_on(&db).await, store_on(&db).await);
        let p = parties();
        for round in 0..3 {
            let halves = |first: bool| -> Vec<BatchOp> {
                (0..PAIRS)
                    .map(|i| {
                        let (a, b) = (format!("a{i}r{round}@x.io"), format!("b{i}r{round}@y.io"));
                        pair(if first {
                            submission(&p[0], &format!("A{i}r{round}"), &a, &b)
                        } else {
                            submission(&p[1], &format!("B{i}r{round}"), &b, &a)
                        })
                    })
                    .collect()
            };
            let (x, y) = tokio::join!(
                one.run_as_one_batch(halves(true)),
                two.run_as_one_batch(halves(false))
            );
            let (x, y) = (answers(x), answers(y));
            for i in 0..PAIRS {
                let matched = usize::from(is_match(&x[i])) + usize::from(is_match(&y[i]));
                assert_eq!(
                    matched, 1,
                    "pair {i} of round {round}: {:?} / {:?}",
                    x[i], y[i]
                );
            }
        }
        let stats = one.stats().await.expect("stats");
        assert_eq!(
            (stats.pending_requests, stats.outbox_depth),
            (0, 2 * 3 * PAIRS as u64)
        );
        one.close().await;
        two.close().await;
        db.drop_database().await;
    }
}

/// PostgreSQL: the server's own VACUUM of the tables it churns (`Store::reclaim`).
mod postgres_reclaim {
    use letro_server::store::postgres::RECLAIM_LOCK;
    use sqlx::Connection;

    use super::*;

    const CHURNED: [&str; 2] = ["outbox", "pending_requests"];

    /// The churned tables VACUUM has been run on (or ANALYZE, which nothing here runs):
    /// PostgreSQL gives a table's row count (`reltuples`) as -1 until then. Read from the
    /// catalogue, not the statistics, which a database without `track_counts` lacks.
    async fn vacuumed(db: &PgDatabase) -> Vec<String> {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let names = sqlx::query_scalar(
            "SELECT relname::text FROM pg_class
             WHERE relname = ANY($1) AND relkind = 'r' AND reltuples >= 0 ORDER BY relname",
        )
        .bind(CHURNED)
        .fetch_all(&mut conn)
        .await
        .expect("read the catalogue");
        let _ = conn.close().await;
        names
    }

    /// Waits until PostgreSQL's statistics show dead row versions in both churned tables:
    /// each backend reports its counts at most once a second, when it finishes a
    /// transaction or after a second idle; nothing to await but the view itself.
    async fn counted(db: &PgDatabase) {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let dead: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_user_tables
                 WHERE relname = ANY($1) AND n_dead_tup > 0",
            )
            .bind(CHURNED)
            .fetch_one(&mut conn)
            .await
            .expect("read the statistics");
            if dead == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL's statistics never showed the churn"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = conn.close().await;
    }

    /// A store whose outbox and pending requests churned: a pair matched, its two
    /// messages delivered; it vacuums a table from `threshold` dead row versions on.
    async fn churned(db: &PgDatabase, threshold: i64) -> PostgresStore {
        let store = PostgresStore::connect(&db.url, 4, Duration::from_secs(5))
            .await
            .expect("connect to the test database")
            .with_reclaim_threshold(threshold);
        seed_for_operators(&store, NOW).await;
        let claimed = store
            .claim_due_messages(NOW, NOW.plus(DAY), 10)
            .await
            .expect("claim");
        for entry in &claimed {
            store.mark_delivered(entry).await.expect("delivered");
        }
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reclaim_vacuums_the_outbox_and_the_pending_requests_and_keeps_every_live_row() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = churned(&db, 1).await;
        counted(&db).await;
        let before = store.stats().await.expect("stats");
        assert!(store.reclaim().await.expect("reclaim"));
        assert_eq!(vacuumed(&db).await, ["outbox", "pending_requests"]);
        let after = store.stats().await.expect("stats");
        assert_eq!(
            (after.pending_requests, after.outbox_depth),
            (before.pending_requests, before.outbox_depth)
        );
        store.close().await;
        db.drop_database().await;
    }

    /// An idle or quiet database is left alone: below the threshold, no VACUUM.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reclaim_leaves_tables_with_fewer_dead_rows_than_the_threshold_alone() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = churned(&db, 1_000).await;
        counted(&db).await;
        assert!(!store.reclaim().await.expect("reclaim"));
        assert!(vacuumed(&db).await.is_empty());
        store.close().await;
        db.drop_database().await;
    }

    /// Where PostgreSQL keeps no statistics, nothing tells how much churned: every
    /// reclaim vacuums, as if always over the threshold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_statistics_reclaim_always_vacuums() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let off = sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} SET track_counts = off",
            db.name()
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
        if let Err(e) = off {
            // Only a superuser may: TEST_DATABASE_URL's role is not one.
            eprintln!("SKIPPED: could not turn PostgreSQL's statistics off ({e})");
            db.drop_database().await;
            return;
        }
        let store = churned(&db, 1_000).await;
        assert!(store.reclaim().await.expect("reclaim"));
        assert_eq!(vacuumed(&db).await, ["outbox", "pending_requests"]);
        store.close().await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_reclaims_at_a_time_and_none_keeps_the_lock() {
        let Some(db) = PgDatabase::create().await else {
            return;
        };
        let store = churned(&db, 1).await;
        counted(&db).await;
        let mut other = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        let lock = |sql: &'static str| sqlx::query(sql).bind(RECLAIM_LOCK.0).bind(RECLAIM_LOCK.1);
        // Another replica is vacuuming: this one leaves it be.
        lock("SELECT pg_advisory_lock($1, $2)")
            .execute(&mut other)
            .await
            .expect("lock");
        assert!(!store.reclaim().await.expect("reclaim"));
        assert!(vacuumed(&db).await.is_empty());
        lock("SELECT pg_advisory_unlock($1, $2)")
            .execute(&mut other)
            .await
            .expect("unlock");
        // Its turn now; and it lets go of the lock when done, or the other could never
        // take it again.
        assert!(store.reclaim().await.expect("reclaim"));
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(RECLAIM_LOCK.0)
            .bind(RECLAIM_LOCK.1)
            .fetch_one(&mut other)
            .await
            .expect("try the lock");
        assert!(taken, "the store kept the reclaim lock");
        let _ = other.close().await;
        store.close().await;
        db.drop_database().await;
    }

    /// SQLite has nothing to reclaim: it reuses a freed page by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_has_nothing_to_reclaim() {
        let backend = Backend::sqlite().await;
        assert!(!backend.store.reclaim().await.expect("reclaim"));
        backend.finish().await;
    }
}
