//! Upgrading keeps everything: a database left by the previous release, with rows in
//! every table, is migrated by the new server, which delivers the queued messages as
//! they were, matches the waiting request, and still knows the handled events.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use letro_server::config::Secret;
use letro_server::domain::{VeraId, VeraIdDigester};
use letro_server::store::postgres::{self, PostgresStore};
use letro_server::store::sqlite;
use reqwest::StatusCode;

use crate::support::*;

const SECRET: &[u8] = b"upgrade-test-secret-32-bytes-long";
const DAY_MS: i64 = 86_400_000;

/// A byte string as an SQL literal of `db`'s dialect.
fn blob(db: &TestDb, bytes: &[u8]) -> String {
    match db {
        TestDb::Sqlite(..) => format!("X'{}'", hex::encode(bytes)),
        TestDb::Postgres(_) => format!("'\\x{}'::bytea", hex::encode(bytes)),
    }
}

/// The schema versions of the release before the several protocols (SQLite 4,
/// PostgreSQL 2), whose columns `sql` below writes: the upgrade from them runs every
/// later migration, data-moving ones included.
const PREVIOUS_SQLITE: usize = 4;
const PREVIOUS_POSTGRES: usize = 2;
const _: () = assert!(
    PREVIOUS_SQLITE < sqlite::SCHEMA_VERSION && PREVIOUS_POSTGRES < postgres::SCHEMA_VERSION
);

/// Creates the previous release's schema and runs `sql` on it.
async fn previous_release(db: &TestDb, sql: &str) {
    match db {
        TestDb::Sqlite(_, path) => {
            sqlite::create_at_version(path, PREVIOUS_SQLITE).expect("old schema")
        }
        TestDb::Postgres(pg) => PostgresStore::create_at_version(&pg.url, PREVIOUS_POSTGRES)
            .await
            .expect("old schema"),
    }
    execute(db, sql).await;
}

async fn an_upgraded_database_keeps_and_delivers_everything(db: &TestDb) {
    let p = parties();
    let digester = VeraIdDigester::new(SECRET);
    let digest = |v: &str| digester.digest(&VeraId::parse(v).expect("VeraId")).0;
    let now = letro_server::clock::now().0;
    let (match_id, completion_id) = ("1".repeat(64), "2".repeat(64));
    // What the previous release wrote, in its own columns: the secret's fingerprint, a
    // request waiting for its reverse half, a handled event, and two undelivered
    // messages, one of them already tried.
    let sql = format!(
        "INSERT INTO settings (name, value) VALUES ('veraid_secret_fingerprint', {fingerprint});
         INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id, key_der,
                                       created_at, expires_at)
             VALUES ({alice}, {bob}, '{sender}', {key}, {now}, {later});
         INSERT INTO processed_events (source, id, expires_at)
             VALUES ('{handled_source}', 'handled', {later});
         INSERT INTO outbox (id, source, recipient, kind, content, time_ms, expiry_ms,
                             attempts, next_attempt_at, last_error)
             VALUES ('{match_id}', '{SERVER_ID}', '{r1}', 'pairing-match', {match_body},
                     {now}, {later}, 2, {now}, 'sink answered 503'),
                    ('{completion_id}', '{SERVER_ID}', '{r2}', 'pairing-completion',
                     {completion_body}, {now}, {later}, 0, {now}, NULL);",
        fingerprint = blob(db, &digester.fingerprint()),
        alice = blob(db, &digest("alice@x.io")),
        bob = blob(db, &digest("bob@y.io")),
        sender = p[0].id,
        key = blob(db, &p[0].key_der),
        later = now + DAY_MS,
        handled_source = p[2].id,
        r1 = p[3].id,
        r2 = p[4].id,
        match_body = blob(db, b"old match"),
        completion_body = blob(db, b"old completion"),
    );
    previous_release(db, &sql).await;
    // The migration itself fills in the new columns (the store would also read an empty
    // content type by kind, which is not what is checked here).
    open(db).await.close().await;
    assert_eq!(
        texts(
            db,
            "SELECT kind || ' ' || content_type FROM outbox ORDER BY id; \
             SELECT protocol || ' ' || length(offer) FROM pending_requests"
        )
        .await,
        [
            format!("pairing-match {MATCH_TYPE}"),
            "pairing-completion application/vnd.relaycorp.letro.pairing-completion-tmp".into(),
            format!("tmp {}", p[0].key_der.len()),
        ]
    );

    let mut sink = FakeSink::start().await;
    let mut config = db.config(Some(&sink.url));
    config.veraid_secret = Some(Secret(SECRET.to_vec()));
    let app = TestApp::spawn(config).await;

    // The queued messages go out as they were queued: same ids, bytes and types.
    let old = sink.take(2).await;
    let by_id = |id: &str| {
        old.iter()
            .find(|r| r.header("ce-id") == id)
            .unwrap_or_else(|| panic!("{id} was not delivered"))
    };
    assert_eq!(by_id(&match_id).header("content-type"), MATCH_TYPE);
    assert_eq!(by_id(&match_id).body, b"old match");
    assert_eq!(by_id(&match_id).header("ce-subject"), p[3].id);
    assert_eq!(
        by_id(&completion_id).header("content-type"),
        "application/vnd.relaycorp.letro.pairing-completion-tmp"
    );
    assert_eq!(by_id(&completion_id).body, b"old completion");

    // The waiting request is still there, with its key: the reverse half matches it.
    assert_eq!(
        app.post_request(&p[1], "reverse", "bob@y.io", "alice@x.io")
            .await,
        StatusCode::NO_CONTENT
    );
    let matches = sink.take(2).await;
    let for_bob = matches
        .iter()
        .find(|m| m.header("ce-subject") == p[1].id)
        .expect("bob's match");
    assert_eq!(
        assert_match_event(for_bob),
        [
            "alice@x.io",
            "bob@y.io",
            &p[0].id,
            &STANDARD.encode(&p[0].key_der)
        ]
    );
    assert!(matches.iter().any(|m| m.header("ce-subject") == p[0].id));

    // The handled event is still known: its redelivery changes nothing.
    assert_eq!(
        app.post_request(&p[2], "handled", "carol@z.io", "dave@w.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-request\",outcome=\"duplicate\"}")
            .await,
        1
    );
    assert_eq!(app.stats().await.pending_requests, 0);
    sink.assert_quiet(std::time::Duration::from_millis(300))
        .await;
    app.stop().await;
}

/// Runs `sql` on `db` beside whatever has it open.
async fn execute(db: &TestDb, sql: &str) {
    match db {
        TestDb::Sqlite(_, path) => {
            let conn = rusqlite::Connection::open(path).expect("open");
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .expect("busy timeout");
            conn.execute_batch(sql).expect("rows");
        }
        TestDb::Postgres(pg) => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&mut conn)
                .await
                .expect("rows");
            let _ = conn.close().await;
        }
    }
}

/// The first column of every row of the `;`-separated queries, as text.
async fn texts(db: &TestDb, queries: &str) -> Vec<String> {
    let mut out = Vec::new();
    for query in queries.split(';') {
        match db {
            TestDb::Sqlite(_, path) => {
                let conn = rusqlite::Connection::open(path).expect("open");
                let mut stmt = conn.prepare(query).expect("query");
                let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect("rows");
                out.extend(rows.map(|r| r.expect("row")));
            }
            TestDb::Postgres(pg) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
                    .fetch_all(&mut conn)
                    .await
                    .expect("rows");
                out.extend(rows);
                let _ = conn.close().await;
            }
        }
    }
    out
}

/// The current schema's store on `db`.
async fn open(db: &TestDb) -> std::sync::Arc<dyn letro_server::store::Store> {
    match db {
        TestDb::Sqlite(_, path) => std::sync::Arc::new(
            sqlite::SqliteStore::open(path, sqlite::Synchronous::Full, letro_server::clock::now())
                .expect("open"),
        ),
        TestDb::Postgres(pg) => std::sync::Arc::new(
            PostgresStore::connect(&pg.url, 2, std::time::Duration::from_secs(5))
                .await
                .expect("connect"),
        ),
    }
}

/// During a rolling upgrade on PostgreSQL, replicas of other builds share the outbox:
/// an older one queues rows without a content type, a newer one rows of kinds this build
/// never makes. Those it can read are delivered; a row it cannot read is left in the
/// outbox and logged, and never fails the claim of the others.
async fn rows_of_other_builds_never_stall_the_outbox(db: &TestDb) {
    let store = open(db).await;
    let p = parties();
    let now = letro_server::clock::now();
    let row_to = |id: char, recipient: &str, kind: &str, content_type: &str, expiry: i64| {
        format!(
            "('{}', '{SERVER_ID}', '{recipient}', '{kind}', '{content_type}', {}, {}, {}, {})",
            id.to_string().repeat(64),
            blob(db, kind.as_bytes()),
            now.0 - 1,
            expiry,
            now.0 - 1
        )
    };
    let row = |id: char, kind: &str, content_type: &str| {
        row_to(id, &p[0].id, kind, content_type, now.0 + DAY_MS)
    };
    let rows = [
        // An older replica's match: no content type.
        row('a', "pairing-match", ""),
        // A newer replica's message: a kind this build never makes.
        row(
            'b',
            "contact-pairing-failure",
            "application/vnd.relaycorp.letro.contact-pairing.failure",
        ),
        // Nothing to send it as.
        row('c', "mystery", ""),
        row('d', "pairing-match", "text/plain\n"),
        row_to(
            'e',
            "not an endpoint",
            "pairing-match",
            MATCH_TYPE,
            now.0 + DAY_MS,
        ),
        // Expired: dropped, as any expired message is.
        row_to('f', &p[0].id, "mystery", "", now.0 - 1),
    ];
    execute(
        db,
        &format!(
            "INSERT INTO outbox (id, source, recipient, kind, content_type, content, time_ms,
                                 expiry_ms, next_attempt_at)
             VALUES {};",
            rows.join(", ")
        ),
    )
    .await;
    let claimed = store
        .claim_due_messages(now, now.plus(std::time::Duration::from_secs(60)), 10)
        .await
        .expect("the claim succeeds");
    let got: Vec<(String, &str, &str)> = claimed
        .iter()
        .map(|e| {
            (
                e.message.id.as_str()[..1].to_owned(),
                e.message.kind.name(),
                e.message.content_type.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a".to_owned(), "pairing-match", MATCH_TYPE),
            (
                "b".to_owned(),
                "contact-pairing-failure",
                "application/vnd.relaycorp.letro.contact-pairing.failure"
            ),
        ]
    );
    assert_eq!(claimed[1].message.content, b"contact-pairing-failure");
    // The operator still sees the five that have not expired, by kind, and why the three
    // this build cannot send are stuck.
    let status = store.outbox_status(now).await.expect("status");
    assert_eq!(status.depth, 5);
    let kinds: Vec<(&str, u64)> = status.by_kind.iter().map(|(k, n)| (k.name(), *n)).collect();
    assert_eq!(
        kinds,
        [
            ("contact-pairing-failure", 1),
            ("mystery", 1),
            ("pairing-match", 3)
        ]
    );
    let listed = store.outbox_list(10).await.expect("list");
    let stuck: Vec<(&str, &str)> = listed
        .iter()
        .filter_map(|m| Some((&m.id.as_str()[..1], m.last_error.as_deref()?)))
        .collect();
    assert_eq!(stuck.len(), 3, "{listed:?}");
    for (id, error) in stuck {
        assert!(["c", "d", "e"].contains(&id), "{id}");
        assert!(error.starts_with("this build cannot deliver it"), "{error}");
    }
    assert!(listed.iter().any(|m| m.recipient == "not an endpoint"));
    store.close().await;
}

/// A waiting request in a protocol this build does not know (a newer replica's) is never
/// a counterpart: the reverse tmp request waits beside it, and nothing is sent.
async fn a_waiting_request_of_another_protocol_is_no_match(db: &TestDb) {
    use crate::store_contract::{NOW, submission};
    let store = open(db).await;
    let p = parties();
    let digester = VeraIdDigester::new(b"contract-test-secret");
    let digest = |v: &str| digester.digest(&VeraId::parse(v).expect("VeraId")).0;
    execute(
        db,
        &format!(
            "INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id,
                                           protocol, offer, created_at, expires_at)
             VALUES ({}, {}, '{}', 'signed-v2', {}, {}, {});",
            blob(db, &digest("b@y.io")),
            blob(db, &digest("a@x.io")),
            p[1].id,
            blob(db, b"a signed request"),
            NOW.0,
            NOW.0 + DAY_MS
        ),
    )
    .await;
    let outcome = store
        .submit_pairing_request(submission(&p[0], "tmp", "a@x.io", "b@y.io"))
        .await
        .expect("submit");
    assert_eq!(
        outcome,
        letro_server::store::PairingOutcome::Stored { replaced: None }
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.pending_requests, stats.outbox_depth), (2, 0));
    // The tmp request of the same pair still matches a tmp reverse half.
    let outcome = store
        .submit_pairing_request(submission(&p[1], "tmp-b", "b@y.io", "a@x.io"))
        .await
        .expect("submit");
    assert!(
        matches!(outcome, letro_server::store::PairingOutcome::Matched { .. }),
        "{outcome:?}"
    );
    store.close().await;
}

/// During a rolling upgrade to schema 5 on PostgreSQL, replicas of the previous build
/// still record event keys in `processed_events` by (source, id), with the statement
/// below; this build records 16-byte digests elsewhere. Either build sees the other's
/// keys: a redelivery is a duplicate whichever replica handles it, and a key the old
/// build takes back (a refused request) is judged afresh by this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_the_previous_build_share_the_event_keys() {
    use crate::store_contract::{NOW, submission};
    use letro_server::store::PairingOutcome;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let TestDb::Postgres(pg) = &db else {
        unreachable!()
    };
    let p = parties();
    let later = NOW.0 + DAY_MS;
    PostgresStore::create_at_version(&pg.url, 4)
        .await
        .expect("old schema");
    // Recorded before the upgrade.
    execute(
        &db,
        &format!(
            "INSERT INTO processed_events (source, id, expires_at)
             VALUES ('{}', 'before', {later});",
            p[0].id
        ),
    )
    .await;
    let store = open(&db).await;
    // The previous build's statement: the keys it returns are new to it.
    let old_replica_records = |source: &str, id: &str| {
        let sql = format!(
            "INSERT INTO processed_events (source, id, expires_at)
             VALUES ('{source}', '{id}', {later})
             ON CONFLICT (source, id) DO NOTHING RETURNING id"
        );
        let db = &db;
        async move { texts(db, &sql).await }
    };
    let submit = |from: usize, parcel: &'static str, requester: &'static str| {
        let store = store.clone();
        let from = p[from].clone();
        async move {
            store
                .submit_pairing_request(submission(&from, parcel, requester, "target@t.io"))
                .await
                .expect("submit")
        }
    };
    let stored = PairingOutcome::Stored { replaced: None };

    assert_eq!(
        submit(0, "before", "a@x.io").await,
        PairingOutcome::Duplicate
    );
    // Recorded by an old replica: a duplicate here.
    assert_eq!(old_replica_records(&p[1].id, "old").await, ["old"]);
    assert_eq!(submit(1, "old", "b@x.io").await, PairingOutcome::Duplicate);
    // Recorded here: a duplicate there, and there too for the key from before.
    assert_eq!(submit(2, "new", "c@x.io").await, stored);
    assert!(old_replica_records(&p[2].id, "new").await.is_empty());
    assert!(old_replica_records(&p[0].id, "before").await.is_empty());
    // Taken back by an old replica (its request was refused): new again here.
    execute(
        &db,
        &format!(
            "DELETE FROM processed_events WHERE source = '{}' AND id = 'old';",
            p[1].id
        ),
    )
    .await;
    assert_eq!(submit(1, "old", "b@x.io").await, stored);
    // Every key once, however many builds recorded it.
    assert_eq!(
        texts(&db, "SELECT count(*)::text FROM processed_event_keys").await,
        ["3"]
    );
    let stats = store.request_stats(NOW).await.expect("stats");
    assert_eq!(stats.processed_events, 3);
    // The purge empties both tables of what expired.
    let report = store
        .purge_expired(letro_server::domain::Timestamp(later))
        .await
        .expect("purge");
    assert_eq!(report.events, 3);
    assert_eq!(
        texts(
            &db,
            "SELECT count(*)::text FROM processed_event_keys; \
             SELECT count(*)::text FROM processed_events"
        )
        .await,
        ["0", "0"]
    );
    store.close().await;
    db.finish().await;
}

crate::on_both_backends!(
    a_waiting_request_of_another_protocol_is_no_match,
    an_upgraded_database_keeps_and_delivers_everything,
    rows_of_other_builds_never_stall_the_outbox,
);
