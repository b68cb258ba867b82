//! The Letro for Android releases of July to October 2023, end to end on both backends:
//! they send `pairing-request-tmp`, read `pairing-match-tmp` with their own VeraId first
//! (`--tmp-match-order recipient-first`), and send and expect `pairing-auth`: raw
//! connection params, forwarded to the grantee unchanged.

use std::sync::OnceLock;
use std::time::Duration;

use letro_server::client::{CertificateOptions, Endpoint, connection_params, read_match_in};
use letro_server::codec::pairing::MatchOrder;
use reqwest::StatusCode;

use crate::support::*;

const PAIRING_AUTH: &str = "application/vnd.relaycorp.letro.pairing-auth";
const DAY: Duration = Duration::from_secs(86_400);

/// Two phones' Awala endpoints, with private keys: they sign real PDAs.
struct Phones {
    alice: Endpoint,
    bob: Endpoint,
}

fn phones() -> &'static Phones {
    static PHONES: OnceLock<Phones> = OnceLock::new();
    PHONES.get_or_init(|| Phones {
        alice: Endpoint::generate(2048).expect("key"),
        bob: Endpoint::generate(2048).expect("key"),
    })
}

async fn app_2023(db: &TestDb, sink: &FakeSink) -> TestApp {
    let mut config = db.config(Some(&sink.url));
    config.tmp_match_order = MatchOrder::RecipientFirst;
    TestApp::spawn(config).await
}

async fn request(app: &TestApp, from: &Endpoint, parcel: &str, me: &str, them: &str) {
    let status = app
        .post_message(
            from.id().as_str(),
            parcel,
            REQUEST_TYPE,
            from.pairing_request(me, them),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// What the app sends once it has a match: connection params with a PDA for the key.
fn authorisation(granter: &Endpoint, grantee: &Endpoint) -> Vec<u8> {
    connection_params(
        granter,
        grantee.spki_der(),
        &CertificateOptions::pda(30 * DAY),
        &[],
        "frankfurt.relaycorp.cloud",
    )
    .expect("params")
}

async fn a_2023_conversation_pairs_both_users(db: &TestDb) {
    let Phones { alice, bob } = phones();
    let mut sink = FakeSink::start().await;
    let app = app_2023(db, &sink).await;
    let (a, b) = ("alice@applepie.rocks", "bob@tickety.boo");

    request(&app, alice, "req-a", a, b).await;
    // The app's "send again": a second parcel with the same request, and a redelivery.
    request(&app, alice, "req-a2", a, b).await;
    request(&app, alice, "req-a2", a, b).await;
    request(&app, bob, "req-b", b, a).await;
    request(&app, bob, "req-b", b, a).await;

    let matches = sink.take(2).await;
    sink.assert_quiet(Duration::from_millis(300)).await;
    for (me, my_id, contact, contact_endpoint) in [(a, alice.id(), b, bob), (b, bob.id(), a, alice)]
    {
        let m = matches
            .iter()
            .find(|m| m.header("ce-subject") == my_id.as_str())
            .expect("a match for each user");
        assert_match_event(m);
        // The app reads its own VeraId first.
        let read = read_match_in(&m.body, MatchOrder::RecipientFirst).expect("readable");
        assert_eq!(read.own_veraid, me);
        assert_eq!(read.contact_veraid, contact);
        assert_eq!(read.contact_endpoint_id, *contact_endpoint.id());
        assert_eq!(read.contact_key_der, contact_endpoint.spki_der());
    }

    let for_bob = authorisation(alice, bob);
    let for_alice = authorisation(bob, alice);
    for (granter, parcel, params) in [(alice, "auth-a", &for_bob), (bob, "auth-b", &for_alice)] {
        for _ in 0..2 {
            let status = app
                .post_message(granter.id().as_str(), parcel, PAIRING_AUTH, params.clone())
                .await;
            assert_eq!(status, StatusCode::NO_CONTENT);
        }
    }
    let forwarded = sink.take(2).await;
    sink.assert_quiet(Duration::from_millis(300)).await;
    for (grantee, params) in [(bob, &for_bob), (alice, &for_alice)] {
        let f = forwarded
            .iter()
            .find(|f| f.header("ce-subject") == grantee.id().as_str())
            .expect("an authorisation for each grantee");
        // Byte for byte what the granter sent, under the type it was sent with.
        assert_eq!(f.header("content-type"), PAIRING_AUTH);
        assert_eq!(&f.body, params);
        assert_eq!(f.header("ce-source"), SERVER_ID);
        assert_eq!(f.header("ce-id").len(), 64);
    }
    assert_ne!(forwarded[0].header("ce-id"), forwarded[1].header("ce-id"));
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-auth\",outcome=\"forwarded\"}")
            .await,
        2
    );
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-auth\",outcome=\"duplicate\"}")
            .await,
        2
    );
    app.stop().await;
}

/// An authorisation in the 2023 app's dialect gets the same checks as the seed's: one
/// the sender did not issue, and one that is not connection params, are refused (204)
/// for their own reasons, and nothing reaches anyone.
async fn a_pairing_auth_that_fails_the_checks_is_refused(db: &TestDb) {
    let Phones { alice, bob } = phones();
    let mut sink = FakeSink::start().await;
    let app = app_2023(db, &sink).await;
    let params = authorisation(alice, bob);
    for (sender, body) in [
        (bob.id().as_str(), params.clone()),
        (alice.id().as_str(), params[..params.len() - 1].to_vec()),
    ] {
        let status = app.post_message(sender, "bad", PAIRING_AUTH, body).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    sink.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-auth\",outcome=\"refused\"}")
            .await,
        2
    );
    for reason in ["not_issued_by_sender", "params_malformed"] {
        let sample = format!("letro_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(app.metric(&sample).await, 1, "{reason}");
    }
    app.stop().await;
}

/// Both halves of many pairs at the same instant: each party gets exactly one match,
/// in the 2023 app's order, whatever the interleaving.
async fn concurrent_halves_match_exactly_once_in_recipient_first_order(db: &TestDb) {
    const PAIRS: usize = 40;
    let mut sink = FakeSink::start().await;
    let app = std::sync::Arc::new(app_2023(db, &sink).await);
    let p = parties();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PAIRS {
        let (app, p) = (app.clone(), p.clone());
        tasks.spawn(async move {
            let (a, b) = (format!("a{i}@x.io"), format!("b{i}@y.io"));
            let (pa, pb) = (format!("A{i}"), format!("B{i}"));
            let (ra, rb) = tokio::join!(
                app.post_request(&p[0], &pa, &a, &b),
                app.post_request(&p[1], &pb, &b, &a),
            );
            assert_eq!((ra, rb), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("pair");
    }
    let matches = sink.take(2 * PAIRS).await;
    sink.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        distinct(matches.iter().map(|m| m.header("ce-id"))),
        2 * PAIRS
    );
    for m in &matches {
        let fields = assert_match_event(m);
        let (own, contact) = (&fields[0], &fields[1]);
        let i = &own[1..own.find('@').expect("@")];
        if m.header("ce-subject") == p[0].id {
            assert_eq!(
                (own.as_str(), contact.as_str()),
                (&*format!("a{i}@x.io"), &*format!("b{i}@y.io"))
            );
            assert_eq!(fields[2], p[1].id);
        } else {
            assert_eq!(m.header("ce-subject"), p[1].id);
            assert_eq!(
                (own.as_str(), contact.as_str()),
                (&*format!("b{i}@y.io"), &*format!("a{i}@x.io"))
            );
            assert_eq!(fields[2], p[0].id);
        }
    }
    match std::sync::Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("tasks still hold the app"),
    }
}

crate::on_both_backends!(
    a_2023_conversation_pairs_both_users,
    a_pairing_auth_that_fails_the_checks_is_refused,
    concurrent_halves_match_exactly_once_in_recipient_first_order,
);

/// Three replicas of the real binary on one PostgreSQL database, started with
/// `--tmp-match-order recipient-first`: both halves of each pair reach different
/// replicas at once, then each authorisation reaches two replicas at once (a
/// redelivery racing its original). Every match and every authorisation arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_pair_2023_apps_exactly_once() {
    const PAIRS: usize = 30;
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let Phones { alice, bob } = phones();
    let mut sink = FakeSink::start().await;
    let extra = [
        "--tmp-match-order",
        "recipient-first",
        "--sink-timeout",
        "5s",
    ];
    let replicas: Vec<ServerProcess> = (0..3)
        .map(|_| ServerProcess::start_on(&db.url, Some(&sink.url), &extra))
        .collect();
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PAIRS {
        let client = client.clone();
        let (first, second) = (
            replicas[i % 3].url.clone(),
            replicas[(i + 1) % 3].url.clone(),
        );
        let (alice, bob) = (alice.clone(), bob.clone());
        tasks.spawn(async move {
            let (a, b) = (format!("a{i}@x.io"), format!("b{i}@y.io"));
            let post = |url: String, from: Endpoint, parcel: String, me: String, them: String| {
                let client = client.clone();
                async move {
                    let mut request = client.post(url);
                    for (name, value) in event_headers(from.id().as_str(), &parcel, REQUEST_TYPE) {
                        request = request.header(name, value);
                    }
                    let body = from.pairing_request(&me, &them);
                    request.body(body).send().await.expect("answer").status()
                }
            };
            let (ra, rb) = tokio::join!(
                post(first, alice, format!("A{i}"), a.clone(), b.clone()),
                post(second, bob, format!("B{i}"), b, a),
            );
            assert_eq!((ra, rb), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("pair");
    }
    let matches = sink.take(2 * PAIRS).await;
    sink.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(
        distinct(matches.iter().map(|m| m.header("ce-id"))),
        2 * PAIRS
    );
    for m in &matches {
        let read = read_match_in(&m.body, MatchOrder::RecipientFirst).expect("readable");
        let mine = if m.header("ce-subject") == alice.id().as_str() {
            ("a", bob)
        } else {
            ("b", alice)
        };
        assert!(read.own_veraid.starts_with(mine.0), "{read:?}");
        assert_eq!(read.contact_endpoint_id, *mine.1.id());
    }

    let for_bob = authorisation(alice, bob);
    let (r0, r1) = (replicas[0].url.clone(), replicas[1].url.clone());
    let post_auth = |url: String| {
        let (client, body) = (client.clone(), for_bob.clone());
        async move {
            let mut request = client.post(url);
            for (name, value) in event_headers(alice.id().as_str(), "auth", PAIRING_AUTH) {
                request = request.header(name, value);
            }
            request.body(body).send().await.expect("answer").status()
        }
    };
    let (s0, s1) = tokio::join!(post_auth(r0), post_auth(r1));
    assert_eq!((s0, s1), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
    let forwarded = sink.next().await;
    sink.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(forwarded.header("ce-subject"), bob.id().as_str());
    assert_eq!(forwarded.body, for_bob);
    for replica in replicas {
        assert_eq!(replica.terminate().await.code(), Some(0));
    }
    db.drop_database().await;
}
