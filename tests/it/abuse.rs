//! Abuse limits and hostile clients: pending-request caps, hijack attempts, slow-loris
//! connections, header floods.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn refusals(reason: &str) -> String {
    format!("letro_refusals_total{{reason=\"{reason}\"}}")
}

#[tokio::test]
async fn one_sender_cannot_keep_more_than_its_cap_waiting() {
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.limits.per_sender = 3;
    let app = TestApp::spawn(config).await;
    let p = parties();
    for i in 0..3 {
        let status = app
            .post_request(&p[0], &format!("s{i}"), "a@x.io", &format!("t{i}@y.io"))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // The fourth is acknowledged, refused, counted, and not stored.
    assert_eq!(
        app.post_request(&p[0], "s3", "a@x.io", "t3@y.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 3);
    assert_eq!(app.metric(&refusals("sender_pending_limit")).await, 1);
    // Sending one of the three again replaces it, which takes no new slot.
    assert_eq!(
        app.post_request(&p[0], "s0-again", "a@x.io", "t0@y.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.metric(&refusals("sender_pending_limit")).await, 1);
    // Other senders are not affected.
    assert_eq!(
        app.post_request(&p[1], "o0", "b@x.io", "t0@y.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 4);
    // A match frees a slot: t1 answers, then the refused request goes through.
    assert_eq!(
        app.post_request(&p[2], "m1", "t1@y.io", "a@x.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 3);
    assert_eq!(
        app.post_request(&p[0], "s3", "a@x.io", "t3@y.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 4);
    assert_eq!(app.metric(&refusals("sender_pending_limit")).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn one_endpoint_cannot_fill_a_targets_cap_for_others() {
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.limits.per_target = 2;
    let app = TestApp::spawn(config).await;
    let p = parties();
    // One endpoint asks for star@y.io under invented requesters: two wait, the rest are
    // refused.
    for i in 0..3 {
        let status = app
            .post_request(
                &p[0],
                &format!("r{i}"),
                &format!("fan{i}@x.io"),
                "star@y.io",
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    assert_eq!(app.stats().await.pending_requests, 2);
    assert_eq!(app.metric(&refusals("target_pending_limit")).await, 1);
    // The target's domain is compared case-insensitively, so this is the same target.
    assert_eq!(
        app.post_request(&p[0], "r3", "fan3@x.io", "star@Y.IO")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.metric(&refusals("target_pending_limit")).await, 2);
    // A real contact, on an endpoint of their own, is not locked out by them.
    assert_eq!(
        app.post_request(&p[1], "friend", "friend@z.io", "star@y.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.metric(&refusals("target_pending_limit")).await, 2);
    assert_eq!(app.stats().await.pending_requests, 3);
    // The star can answer the contact, and the two who got in.
    for (parcel, contact) in [("s1", "friend@z.io"), ("s2", "fan0@x.io")] {
        assert_eq!(
            app.post_request(&p[4], parcel, "star@y.io", contact).await,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(app.metric("letro_matches_total").await, 2);
    assert_eq!(app.stats().await.pending_requests, 1);
    app.stop().await;
}

/// Alice waits for Bob; Mallory, from another endpoint, sends a request in Alice's name.
async fn hijack_attempt(refuse: bool) -> (TestApp, FakeSink, tempfile::TempDir) {
    let (dir, db) = temp_db();
    let sink = FakeSink::start().await;
    let mut config = test_config(&db, Some(&sink.url));
    config.limits.refuse_endpoint_replacement = refuse;
    let app = TestApp::spawn(config).await;
    let p = parties();
    let (alice, mallory, bob) = (&p[0], &p[1], &p[2]);
    assert_eq!(
        app.post_request(alice, "a1", "alice@x.io", "bob@y.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.post_request(mallory, "m1", "alice@x.io", "bob@y.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.metric("letro_replaced_other_endpoint_total").await, 1);
    assert_eq!(app.stats().await.pending_requests, 1);
    // Alice sending again from her own endpoint is never a hijack.
    assert_eq!(
        app.post_request(alice, "a2", "alice@x.io", "bob@y.io")
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.metric("letro_replaced_other_endpoint_total").await,
        2 - u64::from(refuse)
    );
    assert_eq!(
        app.post_request(bob, "b1", "bob@y.io", "alice@x.io").await,
        StatusCode::NO_CONTENT
    );
    (app, sink, dir)
}

#[tokio::test]
async fn a_hijack_attempt_is_counted_and_by_default_replaces() {
    let (app, mut sink, _dir) = hijack_attempt(false).await;
    // Replace-on-upsert: Mallory's request was replaced again by Alice's own, so Bob
    // learns Alice's endpoint. Nothing was refused.
    let matches = sink.take(2).await;
    let for_bob = matches
        .iter()
        .find(|m| m.header("ce-subject") == parties()[2].id)
        .expect("bob's match");
    assert!(for_bob.text().contains(&parties()[0].id));
    assert_eq!(app.metric(&refusals("replaces_other_endpoint")).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_operator_can_refuse_hijack_attempts() {
    let (app, mut sink, _dir) = hijack_attempt(true).await;
    assert_eq!(app.metric(&refusals("replaces_other_endpoint")).await, 1);
    let matches = sink.take(2).await;
    let p = parties();
    let for_bob = matches
        .iter()
        .find(|m| m.header("ce-subject") == p[2].id)
        .expect("bob's match");
    assert!(for_bob.text().contains(&p[0].id));
    assert!(matches.iter().all(|m| m.header("ce-subject") != p[1].id));
    app.stop().await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_the_server_stays_healthy() {
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.header_read_timeout = Duration::from_millis(300);
    config.body_read_timeout = Duration::from_millis(300);
    let app = TestApp::spawn(config).await;
    let p = parties();

    // Headers that never finish: the connection is closed.
    let mut trickle = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    trickle
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\n")
        .await
        .expect("write");
    let closed = read_until_closed(&mut trickle, Duration::from_secs(10)).await;
    assert!(
        closed.is_some(),
        "a client that never finishes its headers is disconnected"
    );

    // A connection that sends nothing at all.
    let mut idle = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(10))
            .await
            .is_some()
    );

    // A body that stops short: 408, which Knative retries, and a closed connection.
    let body = p[0].request("a@x.io", "b@y.io");
    let head = format!(
        "{}content-length: {}\r\n\r\n",
        raw_event_head(&p[0].id, "slow"),
        body.len()
    );
    let mut slow = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    slow.write_all(head.as_bytes()).await.expect("head");
    slow.write_all(&body.as_bytes()[..10])
        .await
        .expect("some body");
    let answer = read_until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert_eq!(app.stats().await.pending_requests, 0);
    assert_eq!(
        app.metric("letro_events_total{content_type=\"unknown\",outcome=\"body_timeout\"}")
            .await,
        1
    );

    // A slow client that does finish in time is served.
    let mut patient = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    patient.write_all(head.as_bytes()).await.expect("head");
    for chunk in body.as_bytes().chunks(body.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        patient.write_all(chunk).await.expect("chunk");
    }
    let mut buf = [0u8; 12];
    patient.read_exact(&mut buf).await.expect("status line");
    assert_eq!(&buf, b"HTTP/1.1 204");
    assert_eq!(app.stats().await.pending_requests, 1);
    assert_eq!(app.health().await, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn header_floods_and_odd_headers_get_the_contracts_answer() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let p = parties();
    let body = p[0].request("a@x.io", "b@y.io");

    // 500 headers: refused by the HTTP layer (431), never reaches the handler.
    let mut head = format!(
        "{}content-length: {}\r\n",
        raw_event_head(&p[0].id, "flood"),
        body.len()
    );
    for i in 0..500 {
        head.push_str(&format!("x-filler-{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    let mut flood = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    flood.write_all(head.as_bytes()).await.expect("head");
    let _ = flood.write_all(body.as_bytes()).await;
    let answer = read_until_closed(&mut flood, Duration::from_secs(10))
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // Invalid UTF-8 (and non-ASCII) in a ce- header: not a usable event, 400.
    let mut bad = format!(
        "POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nce-id: bad\r\nce-type: {INCOMING_TYPE}\r\nce-subject: {SERVER_ID}\r\ncontent-type: {REQUEST_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\nce-source: ",
        body.len()
    )
    .into_bytes();
    bad.extend_from_slice(b"\xff\xfe");
    bad.extend_from_slice(b"\r\n\r\n");
    bad.extend_from_slice(body.as_bytes());
    let mut raw = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    raw.write_all(&bad).await.expect("write");
    let answer = read_until_closed(&mut raw, Duration::from_secs(10))
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // A duplicated core attribute is ambiguous: 400.
    let mut headers = event_headers(&p[0].id, "dup", REQUEST_TYPE);
    headers.push(("ce-id", "other"));
    assert_eq!(
        app.post(&headers, body.clone()).await,
        StatusCode::BAD_REQUEST
    );

    // Percent-encoded ce- values are decoded: `%30` is `0`, so this is the sender's id.
    let encoded = format!("%30{}", &p[0].id[1..]);
    assert_eq!(
        app.post_message(&encoded, "pct", REQUEST_TYPE, body.clone())
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 1);
    // A duplicated unknown header is harmless.
    let mut headers = event_headers(&p[1].id, "dup-ext", REQUEST_TYPE);
    headers.push(("ce-knativearrivaltime", "2026-01-01T00:00:00Z"));
    headers.push(("ce-knativearrivaltime", "2026-01-01T00:00:01Z"));
    assert_eq!(
        app.post(&headers, p[1].request("c@x.io", "d@y.io")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 2);
    assert_eq!(app.health().await, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn over_long_attributes_are_refused_and_logged_truncated() {
    // The real binary, for its JSON log lines.
    let (_dir, db) = temp_db();
    let server = ServerProcess::start(&db, None, &[]);
    let p = parties();
    let client = client();
    // As in issue 19: a 350 KB parcel id, and a 350 KB sender, each sent a few times.
    let huge = "q".repeat(350_000);
    let huge_source = format!("{}{huge}", p[0].id);
    for i in 0..5 {
        for (source, id) in [(p[0].id.as_str(), huge.as_str()), (&huge_source, "x")] {
            let mut request = client.post(&server.url);
            for (name, value) in event_headers(source, id, REQUEST_TYPE) {
                request = request.header(name, value);
            }
            let response = request
                .body(p[0].request("a@x.io", &format!("b{i}@y.io")))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let answer = response.text().await.expect("body");
            assert!(answer.len() < 1024, "a 400 of {} bytes", answer.len());
        }
    }
    // The log pipe is read by another thread: wait until the last refusal is in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = server.recent_log();
        if log.matches("attribute_too_long").count() >= 10 || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("attribute_too_long"))
        .collect();
    assert_eq!(refusals.len(), 10, "{log}");
    for line in &refusals {
        assert!(line.len() < 2048, "a log line of {} bytes", line.len());
        assert!(line.contains("truncated"), "{line}");
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert!(
            v["parcel.id"].is_string() && v["sender"].is_string(),
            "{line}"
        );
    }
    assert!(log.lines().all(|l| l.len() < 4096), "no log line is long");
    assert_eq!(pending_count(&db), 0);
    let stats = server.terminate().await;
    assert!(stats.success());
}

/// Waits for the background count to have seen `pending` requests.
async fn counted(app: &TestApp, pending: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The count runs on its own schedule (every 20 ms here); nothing to await but it.
    while app.metric("letro_pending_requests").await != pending {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never counted {pending}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn at_the_ceiling_a_request_that_would_wait_gets_503_and_a_match_still_goes_through() {
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.pending_ceiling = Some(2);
    config.pending_count_interval = Duration::from_millis(20);
    let app = TestApp::spawn(config).await;
    let p = parties();
    for (party, parcel, requester, target) in [
        (&p[0], "w1", "a@x.io", "b@y.io"),
        (&p[1], "w2", "c@x.io", "d@y.io"),
    ] {
        assert_eq!(
            app.post_request(party, parcel, requester, target).await,
            StatusCode::NO_CONTENT
        );
    }
    counted(&app, 2).await;
    // A third that would wait is not acknowledged: 503, nothing stored, counted.
    let response = client()
        .post(&app.url)
        .headers(
            event_headers(&p[2].id, "w3", REQUEST_TYPE)
                .iter()
                .map(|(k, v)| {
                    (
                        reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                        reqwest::header::HeaderValue::from_str(v).expect("value"),
                    )
                })
                .collect(),
        )
        .body(p[2].request("e@x.io", "f@y.io"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"60"[..])
    );
    assert_eq!(app.stats().await.pending_requests, 2);
    assert_eq!(app.metric(&refusals("pending_ceiling")).await, 1);
    // Replacing one's own waiting request adds no row: it is taken.
    assert_eq!(
        app.post_request(&p[0], "w1b", "a@x.io", "b@y.io").await,
        StatusCode::NO_CONTENT
    );
    // A request that completes a pair frees room: it always goes through.
    assert_eq!(
        app.post_request(&p[3], "m", "b@y.io", "a@x.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.metric("letro_matches_total").await, 1);
    counted(&app, 1).await;
    // The refused event, redelivered once there is room, is stored (it was not recorded).
    assert_eq!(
        app.post_request(&p[2], "w3", "e@x.io", "f@y.io").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 2);
    app.stop().await;
}
