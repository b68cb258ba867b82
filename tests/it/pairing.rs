//! Phase 1 over real HTTP: requests, matches, replacement, redelivery, concurrency.

use std::time::Duration;

use reqwest::StatusCode;

use letro_server::clock::ManualClock;

use crate::support::*;

const ALICE: &str = "alice@applepie.rocks";
const BOB: &str = "bob@tickety.boo";

async fn app_with_sink() -> (TestApp, FakeSink, tempfile::TempDir) {
    app_with_sink_and(|_| {}).await
}

async fn app_with_sink_and(
    adjust: impl FnOnce(&mut letro_server::config::Config),
) -> (TestApp, FakeSink, tempfile::TempDir) {
    let sink = FakeSink::start().await;
    let (dir, db) = temp_db();
    let mut config = test_config(&db, Some(&sink.url));
    adjust(&mut config);
    (TestApp::spawn(config).await, sink, dir)
}

/// Runs one arrival order and checks both matches byte for byte.
async fn check_match(alice_first: bool) {
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    let (alice, bob) = (&p[0], &p[1]);
    let (first, second) = if alice_first {
        ((alice, "a-1", ALICE, BOB), (bob, "b-1", BOB, ALICE))
    } else {
        ((bob, "b-1", BOB, ALICE), (alice, "a-1", ALICE, BOB))
    };
    assert_eq!(
        app.post_request(first.0, first.1, first.2, first.3).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 1);
    sink.assert_quiet(Duration::from_millis(100)).await;
    assert_eq!(
        app.post_request(second.0, second.1, second.2, second.3)
            .await,
        StatusCode::NO_CONTENT
    );

    let received = sink.take(2).await;
    let for_alice = received
        .iter()
        .find(|r| r.header("ce-subject") == alice.id)
        .expect("alice's match");
    let for_bob = received
        .iter()
        .find(|r| r.header("ce-subject") == bob.id)
        .expect("bob's match");
    // contactVeraId, recipientVeraId, contactEndpointId, base64(contactKey)
    assert_eq!(
        assert_match_event(for_alice),
        vec![
            BOB.to_owned(),
            ALICE.to_owned(),
            bob.id.clone(),
            bob.key_b64()
        ]
    );
    assert_eq!(
        assert_match_event(for_bob),
        vec![
            ALICE.to_owned(),
            BOB.to_owned(),
            alice.id.clone(),
            alice.key_b64()
        ]
    );
    assert_ne!(for_alice.header("ce-id"), for_bob.header("ce-id"));

    let stats = app.stats().await;
    assert_eq!(stats.pending_requests, 0, "both requests are removed");
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(
        app.stats().await.outbox_depth,
        0,
        "delivered messages leave the outbox"
    );
    assert_eq!(app.metric("letro_matches_total").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn match_contents_when_alice_asks_first() {
    check_match(true).await;
}

#[tokio::test]
async fn match_contents_when_bob_asks_first() {
    check_match(false).await;
}

#[tokio::test]
async fn domains_match_case_insensitively_and_each_party_sees_the_ids_as_sent() {
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    app.post_request(&p[0], "a", "alice@ApplePie.Rocks", BOB)
        .await;
    app.post_request(&p[1], "b", BOB, "alice@applepie.rocks")
        .await;
    let received = sink.take(2).await;
    let for_bob = received
        .iter()
        .find(|r| r.header("ce-subject") == p[1].id)
        .expect("bob's match");
    // The match is built from the request in hand (Bob's), which spells Alice's domain in lower case.
    assert!(
        for_bob
            .text()
            .starts_with("alice@applepie.rocks,bob@tickety.boo,")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_later_request_replaces_the_pending_one() {
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    app.post_request(&p[0], "a-1", ALICE, BOB).await;
    // Alice reinstalled: same VeraIds, new endpoint.
    app.post_request(&p[2], "a-2", ALICE, BOB).await;
    assert_eq!(app.stats().await.pending_requests, 1);
    assert_eq!(app.metric("letro_replaced_other_endpoint_total").await, 1);
    app.post_request(&p[1], "b-1", BOB, ALICE).await;
    let received = sink.take(2).await;
    let for_bob = received
        .iter()
        .find(|r| r.header("ce-subject") == p[1].id)
        .expect("bob's match");
    assert_eq!(
        assert_match_event(for_bob)[2],
        p[2].id,
        "the newest endpoint wins"
    );
    assert!(received.iter().any(|r| r.header("ce-subject") == p[2].id));
    assert!(!received.iter().any(|r| r.header("ce-subject") == p[0].id));
    app.stop().await;
}

#[tokio::test]
async fn requests_for_different_pairs_do_not_match() {
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    app.post_request(&p[0], "a", ALICE, BOB).await;
    app.post_request(&p[1], "b", BOB, "carol@example.com").await;
    app.post_request(&p[2], "c", "carol@example.com", ALICE)
        .await;
    assert_eq!(app.stats().await.pending_requests, 3);
    sink.assert_quiet(Duration::from_millis(200)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_redelivered_event_has_no_further_effect() {
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    assert_eq!(
        app.post_request(&p[0], "a-1", ALICE, BOB).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post_request(&p[0], "a-1", ALICE, BOB).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post_request(&p[1], "b-1", BOB, ALICE).await,
        StatusCode::NO_CONTENT
    );
    sink.take(2).await;
    // Both halves arrive again after the match: no new pending request, no new match.
    assert_eq!(
        app.post_request(&p[0], "a-1", ALICE, BOB).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post_request(&p[1], "b-1", BOB, ALICE).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 0);
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-request\",outcome=\"duplicate\"}")
            .await,
        3
    );
    // The same parcel id from another sender is a different event.
    assert_eq!(
        app.post_request(&p[2], "a-1", "carol@example.com", BOB)
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_reverse_requests_match_exactly_once() {
    const PAIRS: usize = 60;
    let (app, mut sink, _dir) = app_with_sink().await;
    let p = parties();
    let app = std::sync::Arc::new(app);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PAIRS {
        for side in 0..2 {
            let app = app.clone();
            let (from, requester, target) = if side == 0 {
                (
                    p[0].clone(),
                    format!("alice{i}@a.example"),
                    format!("bob{i}@b.example"),
                )
            } else {
                (
                    p[1].clone(),
                    format!("bob{i}@b.example"),
                    format!("alice{i}@a.example"),
                )
            };
            tasks.spawn(async move {
                app.post_request(&from, &format!("{side}-{i}"), &requester, &target)
                    .await
            });
        }
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), StatusCode::NO_CONTENT);
    }
    let received = sink.take(2 * PAIRS).await;
    sink.assert_quiet(Duration::from_millis(300)).await;
    // Exactly one match per party per pair.
    let per_party: Vec<(String, String)> = received
        .iter()
        .map(|r| {
            let f = assert_match_event(r);
            (f[1].clone(), f[0].clone())
        })
        .collect();
    assert_eq!(distinct(per_party.iter().cloned()), 2 * PAIRS);
    for (recipient, contact) in &per_party {
        let expected = match recipient.strip_prefix("alice") {
            Some(rest) => format!("bob{}", rest.replace("@a.", "@b.")),
            None => recipient.replacen("bob", "alice", 1).replace("@b.", "@a."),
        };
        assert_eq!(contact, &expected, "{recipient} got the wrong contact");
    }
    let app = std::sync::Arc::into_inner(app).expect("sole owner");
    assert_eq!(app.stats().await.pending_requests, 0);
    assert_eq!(app.metric("letro_matches_total").await, PAIRS as u64);
    app.stop().await;
}

#[tokio::test]
async fn pending_requests_are_never_stored_in_plain_text() {
    let (dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let p = parties();
    app.post_request(
        &p[0],
        "a",
        "zelda-the-unique@hyrule.example",
        "link-the-unique@hyrule.example",
    )
    .await;
    app.stop().await;
    let mut bytes = std::fs::read(&db).expect("db");
    for extra in ["letro.db-wal"] {
        if let Ok(more) = std::fs::read(dir.path().join(extra)) {
            bytes.extend(more);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("zelda-the-unique"),
        "requester VeraId stored in plain text"
    );
    assert!(!text.contains("hyrule"), "domain stored in plain text");
}

#[tokio::test]
async fn expired_requests_do_not_match_and_are_purged() {
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let clock = ManualClock::new(letro_server::clock::now());
    let app = TestApp::spawn_with_clock(
        test_config(&db, Some(&sink.url)),
        std::sync::Arc::new(clock.clone()),
    )
    .await;
    let p = parties();
    app.post_request(&p[0], "a", ALICE, BOB).await;
    // The default request TTL, 90 days, and a moment.
    clock.advance(Duration::from_secs(90 * 86_400 + 1));
    app.post_request(&p[1], "b", BOB, ALICE).await;
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(
        app.stats().await.pending_requests,
        2,
        "the expired row is ignored, not matched"
    );
    clock.advance(Duration::from_secs(90 * 86_400 + 1));
    let report = app
        .state
        .store
        .purge_expired(app.state.clock.now())
        .await
        .expect("purge");
    assert_eq!((report.requests, report.events), (2, 2));
    assert_eq!(app.stats().await.pending_requests, 0);
    app.stop().await;
}
