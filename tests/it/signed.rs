//! Today's Letro apps: VeraId-signed pairing requests (`contact-pairing.request`), end
//! to end on both backends, with the bundles of the interoperability vectors
//! (`veraid/tests/fixtures/veraid-vectors.json`) replayed at their own time and from
//! their own trust anchor.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use letro_server::clock::{ManualClock, SharedClock};
use letro_server::config::Config;
use letro_server::domain::Timestamp;
use reqwest::StatusCode;
use veraid::TrustAnchors;

use crate::support::*;

const SIGNED_REQUEST: &str = "application/vnd.relaycorp.letro.contact-pairing.request";
const FAILURE: &str = "application/vnd.relaycorp.letro.contact-pairing.failure";

fn veraid_vectors() -> &'static serde_json::Value {
    static VECTORS: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    VECTORS.get_or_init(|| {
        serde_json::from_str(include_str!(
            "../../veraid/tests/fixtures/veraid-vectors.json"
        ))
        .expect("vectors")
    })
}

fn case(name: &str) -> &'static serde_json::Value {
    veraid_vectors()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn b64(value: &serde_json::Value) -> Vec<u8> {
    STANDARD
        .decode(value.as_str().expect("base64 text"))
        .expect("base64")
}

fn bundle(case: &serde_json::Value) -> Vec<u8> {
    b64(&case["bundle_der_b64"])
}

fn sender(case: &serde_json::Value) -> &str {
    case["sender_endpoint_id"].as_str().expect("sender")
}

/// When the vectors were made: the time every one of them is verified at.
fn generated_at() -> Timestamp {
    let text = veraid_vectors()["generated_at"].as_str().expect("time");
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    Timestamp(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).expect("ms"))
}

/// A config trusting the vectors' root, for `db`.
fn signed_config(db: &TestDb, sink: &FakeSink) -> Config {
    let mut config = db.config(Some(&sink.url));
    let anchors: Vec<&str> = veraid_vectors()["trust_anchors"]
        .as_array()
        .expect("anchors")
        .iter()
        .map(|a| a.as_str().expect("line"))
        .collect();
    config.veraid_trust_anchors = TrustAnchors::parse(&anchors.join("\n")).expect("anchors");
    config
}

async fn spawn_at_vector_time(config: Config) -> (TestApp, ManualClock) {
    let clock = ManualClock::new(generated_at());
    let shared: SharedClock = Arc::new(clock.clone());
    (TestApp::spawn_with_clock(config, shared).await, clock)
}

async fn send(app: &TestApp, case: &serde_json::Value, parcel: &str) {
    let status = app
        .post_message(sender(case), parcel, SIGNED_REQUEST, bundle(case))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{}", case["name"]);
}

/// The counter of events of the signed request with `outcome`.
fn events(outcome: &str) -> String {
    format!("letro_events_total{{content_type=\"contact-pairing-request\",outcome=\"{outcome}\"}}")
}

fn refusals(reason: &str) -> String {
    format!("letro_refusals_total{{reason=\"{reason}\"}}")
}

/// Where this server decides otherwise than the vectors' expectation, which allows it
/// (the `lenient` cases): data after the bundle is refused (veraid/README.md).
fn expected_outcome(case: &serde_json::Value) -> &str {
    match case["name"].as_str() {
        Some("der_trailing_byte") => "refused",
        _ => case["expected"]["outcome"].as_str().expect("outcome"),
    }
}

/// Every vector but the reverse of the valid request (which would match it), one after
/// another into one server: stored, refused for the stage the vectors name, or
/// answered with exactly the failure message they give, byte for byte.
async fn every_vector_gets_the_expected_outcome(db: &TestDb) {
    let mut sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(db, &sink)).await;
    let mut seen = std::collections::HashMap::<&str, u64>::new();
    for case in veraid_vectors()["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        if name == "valid_user_signed_reverse" {
            continue;
        }
        let before = (
            app.metric(&events("stored")).await,
            app.metric(&events("refused")).await,
            app.metric(&events("failed")).await,
        );
        send(&app, case, &format!("parcel-{name}")).await;
        let after = (
            app.metric(&events("stored")).await,
            app.metric(&events("refused")).await,
            app.metric(&events("failed")).await,
        );
        let outcome = expected_outcome(case);
        let expected = match outcome {
            "stored" => (before.0 + 1, before.1, before.2),
            "refused" => (before.0, before.1 + 1, before.2),
            "failure" => (before.0, before.1, before.2 + 1),
            other => panic!("{name}: outcome {other}"),
        };
        assert_eq!(after, expected, "{name}: expected {outcome}");
        *seen.entry(outcome).or_default() += 1;
        if outcome == "failure" {
            let failure = sink.next().await;
            let e = &case["expected"];
            assert_eq!(failure.header("content-type"), FAILURE, "{name}");
            assert_eq!(failure.header("ce-subject"), e["recipient"], "{name}");
            assert_eq!(failure.header("ce-source"), SERVER_ID, "{name}");
            assert_eq!(failure.body, b64(&e["content_der_b64"]), "{name}");
        }
        if outcome == "refused" {
            let reason = match case["expected"]["stage"].as_str() {
                Some("plaintext") => "not_a_contact_pairing_request",
                Some("self_pairing") => "self_pairing",
                _ => "bundle_invalid",
            };
            assert!(app.metric(&refusals(reason)).await >= 1, "{name}: {reason}");
        }
    }
    assert_eq!(seen["stored"], 23, "stored (der_trailing_byte is refused)");
    assert_eq!(seen["failure"], 16);
    assert_eq!(seen["refused"], 26 + 1);
    assert!(
        sink.try_next(Duration::from_millis(300)).await.is_none(),
        "no other event"
    );
    // Digests, never VeraIds, in what an operator can read.
    let metrics = app.metrics_text().await;
    assert!(!metrics.contains("alice"), "{metrics}");
    assert!(
        app.metric("letro_veraid_refusals_total{check=\"dnssec\"}")
            .await
            >= 5
    );
    // One organisation's chain, validated once and then remembered.
    let verified = |cache: &str| format!("letro_veraid_verified_total{{cache=\"{cache}\"}}");
    assert!(app.metric(&verified("hit")).await >= 20);
    assert!(app.metric(&verified("miss")).await >= 1);
    app.stop().await;
}

/// The two valid requests, in either order: when the second is in, each party gets the
/// other's bundle byte for byte (the vectors' `matches`), and nothing is left waiting.
async fn a_signed_pair_gets_each_others_bundles(db: &TestDb) {
    let mut sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(db, &sink)).await;
    let exchange = &veraid_vectors()["matches"][0];
    for (round, order) in [
        ["valid_user_signed", "valid_user_signed_reverse"],
        ["valid_user_signed_reverse", "valid_user_signed"],
    ]
    .iter()
    .enumerate()
    {
        send(&app, case(order[0]), &format!("r{round}-first")).await;
        assert_eq!(app.stats().await.pending_requests, 1);
        assert!(sink.try_next(Duration::from_millis(100)).await.is_none());
        send(&app, case(order[1]), &format!("r{round}-second")).await;
        let mut received = [sink.next().await, sink.next().await];
        received.sort_by(|a, b| a.header("ce-subject").cmp(b.header("ce-subject")));
        let mut expected: Vec<&serde_json::Value> = exchange["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .collect();
        expected.sort_by_key(|d| d["recipient"].as_str().expect("recipient"));
        for (got, want) in received.iter().zip(expected) {
            assert_eq!(got.header("ce-subject"), want["recipient"]);
            assert_eq!(got.header("content-type"), SIGNED_REQUEST);
            assert_eq!(got.body, b64(&want["content_der_b64"]), "byte for byte");
            assert_eq!(got.header("ce-id").len(), 64);
        }
        assert_eq!(app.stats().await.pending_requests, 0);
        // Redeliveries of both halves change nothing and send nothing.
        send(&app, case(order[0]), &format!("r{round}-first")).await;
        send(&app, case(order[1]), &format!("r{round}-second")).await;
        assert!(sink.try_next(Duration::from_millis(200)).await.is_none());
        assert_eq!(app.stats().await.pending_requests, 0);
    }
    assert_eq!(app.metric(&events("matched")).await, 2);
    assert_eq!(app.metric(&events("duplicate")).await, 4);
    app.stop().await;
}

/// A failure goes out once, however often its event is redelivered; a refusal sends
/// nothing, however often.
async fn a_redelivered_failure_sends_no_second_message(db: &TestDb) {
    let mut sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(db, &sink)).await;
    for _ in 0..3 {
        send(&app, case("org_bot_signed"), "bot-parcel").await;
        send(&app, case("tampered_plaintext"), "tampered-parcel").await;
    }
    let failure = sink.next().await;
    assert_eq!(failure.header("content-type"), FAILURE);
    assert!(sink.try_next(Duration::from_millis(300)).await.is_none());
    assert_eq!(app.metric(&events("failed")).await, 1);
    assert_eq!(app.metric(&events("duplicate")).await, 2);
    assert_eq!(app.metric(&refusals("bundle_invalid")).await, 3);
    assert_eq!(
        app.metric("letro_pairing_failures_total{reason=\"invalid_requester_veraid\"}")
            .await,
        1
    );
    app.stop().await;
}

/// Both halves at once, each delivered three times over, round after round: exactly one
/// bundle per party per round.
async fn concurrent_duplicated_halves_match_once(db: &TestDb) {
    let mut sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(db, &sink)).await;
    let rounds = 5;
    for round in 0..rounds {
        let posts = (0..6).map(|i| {
            let which = if i % 2 == 0 {
                "valid_user_signed"
            } else {
                "valid_user_signed_reverse"
            };
            let app = &app;
            async move { send(app, case(which), &format!("round{round}-{which}")).await }
        });
        futures_util::future::join_all(posts).await;
        let mut recipients = vec![
            sink.next().await.header("ce-subject").to_owned(),
            sink.next().await.header("ce-subject").to_owned(),
        ];
        recipients.sort();
        let mut expected = vec![
            sender(case("valid_user_signed")).to_owned(),
            sender(case("valid_user_signed_reverse")).to_owned(),
        ];
        expected.sort();
        assert_eq!(recipients, expected, "round {round}");
        assert_eq!(app.stats().await.pending_requests, 0);
    }
    assert!(sink.try_next(Duration::from_millis(300)).await.is_none());
    assert_eq!(app.metric(&events("matched")).await, rounds);
    app.stop().await;
}

/// Signed requests obey the caps of tmp ones: the second target from one endpoint is
/// refused under a cap of one, and counted.
async fn the_caps_apply_to_signed_requests(db: &TestDb) {
    let sink = FakeSink::start().await;
    let mut config = signed_config(db, &sink);
    config.limits.per_sender = 1;
    let (app, _clock) = spawn_at_vector_time(config).await;
    send(&app, case("valid_user_signed"), "one").await;
    send(&app, case("target_user_with_comma"), "two").await;
    assert_eq!(app.metric(&refusals("sender_pending_limit")).await, 1);
    // The same pair again replaces, and fits.
    send(&app, case("valid_org_key_rsa3072"), "three").await;
    assert_eq!(app.metric(&events("stored")).await, 2);
    assert_eq!(app.stats().await.pending_requests, 1);
    app.stop().await;
}

/// A signed request waits as long as the tmp ones do, then no longer matches.
async fn an_expired_signed_request_no_longer_matches(db: &TestDb) {
    let mut sink = FakeSink::start().await;
    let mut config = signed_config(db, &sink);
    config.request_ttl = Duration::from_secs(3600);
    let (app, clock) = spawn_at_vector_time(config).await;
    send(&app, case("valid_user_signed"), "first").await;
    clock.advance(Duration::from_secs(2 * 3600));
    send(&app, case("valid_user_signed_reverse"), "second").await;
    assert!(sink.try_next(Duration::from_millis(300)).await.is_none());
    assert_eq!(app.metric(&events("stored")).await, 2);
    app.stop().await;
}

crate::on_both_backends!(
    every_vector_gets_the_expected_outcome,
    a_signed_pair_gets_each_others_bundles,
    a_redelivered_failure_sends_no_second_message,
    concurrent_duplicated_halves_match_once,
    the_caps_apply_to_signed_requests,
    an_expired_signed_request_no_longer_matches,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_signed_request_survives_a_restart() {
    let db = TestDb::sqlite();
    let mut sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(&db, &sink)).await;
    send(&app, case("valid_user_signed"), "before").await;
    app.stop().await;
    let (app, _clock) = spawn_at_vector_time(signed_config(&db, &sink)).await;
    assert_eq!(app.stats().await.pending_requests, 1);
    send(&app, case("valid_user_signed_reverse"), "after").await;
    let bodies = [sink.next().await.body, sink.next().await.body];
    assert!(bodies.contains(&bundle(case("valid_user_signed"))));
    assert!(bodies.contains(&bundle(case("valid_user_signed_reverse"))));
    app.stop().await;
    db.finish().await;
}

/// Without the vectors' root among the trust anchors (the IANA ones, by default),
/// their bundles do not verify: refused, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_trust_anchors_refuse_a_private_root() {
    let db = TestDb::sqlite();
    let sink = FakeSink::start().await;
    let (app, _clock) = spawn_at_vector_time(db.config(Some(&sink.url))).await;
    send(&app, case("valid_user_signed"), "p").await;
    assert_eq!(app.metric(&refusals("bundle_invalid")).await, 1);
    assert_eq!(app.stats().await.pending_requests, 0);
    app.stop().await;
    db.finish().await;
}

/// Three replicas on one PostgreSQL database (in-process, each with its own pool and
/// dispatcher, at the vectors' time): both halves of the pair sent to different
/// replicas at once, three times each, round after round; one bundle per party.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_match_once() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut sink = FakeSink::start().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(spawn_at_vector_time(signed_config(&db, &sink)).await.0);
    }
    let rounds = 4;
    for round in 0..rounds {
        let posts = (0..6).map(|i| {
            let which = if i % 2 == 0 {
                "valid_user_signed"
            } else {
                "valid_user_signed_reverse"
            };
            let app = &replicas[i % 3];
            async move { send(app, case(which), &format!("round{round}-{which}")).await }
        });
        futures_util::future::join_all(posts).await;
        let mut bodies = vec![sink.next().await.body, sink.next().await.body];
        bodies.sort();
        let mut expected = vec![
            bundle(case("valid_user_signed")),
            bundle(case("valid_user_signed_reverse")),
        ];
        expected.sort();
        assert_eq!(bodies, expected, "round {round}");
    }
    assert!(sink.try_next(Duration::from_millis(500)).await.is_none());
    for app in replicas {
        app.stop().await;
    }
    db.finish().await;
}
