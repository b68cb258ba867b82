//! The outbox over real HTTP: retries with stable ids, restarts, expiry, isolation.

use std::time::Duration;

use crate::support::*;

async fn make_match(app: &TestApp, tag: &str) {
    let p = parties();
    app.post_request(
        &p[0],
        &format!("{tag}-a"),
        &format!("a-{tag}@x.io"),
        &format!("b-{tag}@y.io"),
    )
    .await;
    app.post_request(
        &p[1],
        &format!("{tag}-b"),
        &format!("b-{tag}@y.io"),
        &format!("a-{tag}@x.io"),
    )
    .await;
}

#[tokio::test]
async fn retries_after_503_keep_the_same_ids() {
    let mut sink = FakeSink::start().await;
    sink.script(&[503, 503, 503, 503]);
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    make_match(&app, "r").await;
    // Two messages share four 503s (in whatever order their retries come), then both are
    // accepted: six requests in all, and every retry repeats its message exactly.
    let received = sink.take(6).await;
    sink.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        distinct(received.iter().map(|r| r.header("ce-id").to_owned())),
        2
    );
    for r in &received {
        let same: Vec<_> = received
            .iter()
            .filter(|o| o.header("ce-id") == r.header("ce-id"))
            .collect();
        assert!(same.len() >= 2, "each message failed at least once");
        assert!(same.iter().all(|o| o.body == r.body
            && o.header("ce-time") == r.header("ce-time")
            && o.header("ce-expiry") == r.header("ce-expiry")
            && o.header("ce-subject") == r.header("ce-subject")));
    }
    assert_eq!(app.stats().await.outbox_depth, 0);
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"retry\"}")
            .await,
        4
    );
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"delivered\"}")
            .await,
        2
    );
    app.stop().await;
}

#[tokio::test]
async fn messages_survive_a_restart_and_wait_without_a_sink() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    make_match(&app, "s").await;
    assert_eq!(app.stats().await.outbox_depth, 2);
    app.stop().await;

    let mut sink = FakeSink::start().await;
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let received = sink.take(2).await;
    assert_eq!(
        distinct(received.iter().map(|r| r.header("ce-subject").to_owned())),
        2
    );
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    app.stop().await;
}

#[tokio::test]
async fn unreachable_and_slow_sinks_are_retried() {
    // Nothing listens on the sink's port at first.
    let down = ClosedPort::new();
    let (_dir, db) = temp_db();
    let sink_url = format!("http://127.0.0.1:{}/", down.port());
    let app = TestApp::spawn(test_config(&db, Some(&sink_url))).await;
    make_match(&app, "u").await;
    assert_eq!(app.stats().await.outbox_depth, 2);
    // Connection refused counts as a failed attempt, and the messages stay.
    app.wait_for_metric(
        "letro_outbox_deliveries_total{result=\"retry\"}",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(app.stats().await.outbox_depth, 2);
    assert!(
        app.metric("letro_outbox_delivery_failures_total{cause=\"unreachable\"}")
            .await
            >= 2,
        "a refused connection is counted as an unreachable sink"
    );
    app.stop().await;

    // A sink that answers slower than the timeout, then a normal one.
    let mut sink = FakeSink::start().await;
    sink.set_delay(Duration::from_secs(3));
    let mut config = test_config(&db, Some(&sink.url));
    config.sink_timeout = Duration::from_millis(500);
    let app = TestApp::spawn(config).await;
    let first = sink.take(2).await;
    sink.set_delay(Duration::ZERO);
    let ids: Vec<String> = first.iter().map(|r| r.header("ce-id").to_owned()).collect();
    assert_eq!(distinct(ids.iter().cloned()), 2);
    // Timed-out attempts are retried, with the same ids, until answered in time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut retries = 0;
    while app.stats().await.outbox_depth > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the messages were not delivered"
        );
        if let Some(r) = sink.try_next(Duration::from_millis(50)).await {
            assert!(
                ids.contains(&r.header("ce-id").to_owned()),
                "a retry changed the id"
            );
            retries += 1;
        }
    }
    assert!(retries >= 2, "each message was retried after its timeout");
    assert!(
        app.metric("letro_outbox_delivery_failures_total{cause=\"timeout\"}")
            .await
            >= 2,
        "a slow answer is counted as a timeout"
    );
    app.stop().await;
}

/// A sink that answers every request with a 202 head promising a body it never sends,
/// and keeps the connection open; returns its URL.
async fn sink_with_a_body_that_never_comes() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            // Read the head and the body it declares before answering.
            let mut read = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                read.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&read).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if read.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 100\r\n\r\n")
                .await;
            open.push(stream);
        }
    });
    url
}

#[tokio::test]
async fn a_2xx_head_is_a_delivery_even_if_its_body_never_comes() {
    let url = sink_with_a_body_that_never_comes().await;
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, Some(&url));
    config.sink_timeout = Duration::from_millis(300);
    let app = TestApp::spawn(config).await;
    make_match(&app, "slow-body").await;
    // The count follows the row's deletion: wait for the count, not the empty outbox.
    let delivered = "letro_outbox_deliveries_total{result=\"delivered\"}";
    app.wait_for_metric(delivered, 2, Duration::from_secs(10))
        .await;
    // Judged by the status: delivered once each, never timed out and sent again.
    assert_eq!(app.stats().await.outbox_depth, 0);
    assert_eq!(app.metric(delivered).await, 2);
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"retry\"}")
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_message_the_sink_always_refuses_does_not_hold_up_the_others_and_expires() {
    let mut sink = FakeSink::start().await;
    let p = parties();
    sink.poison(&p[0].id, 400);
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, Some(&sink.url));
    config.message_ttl = Duration::from_millis(1500);
    let app = TestApp::spawn(config).await;
    make_match(&app, "p").await;
    // The message to p[1] goes through while the one to p[0] keeps failing.
    let mut delivered_other = false;
    let mut refused = 0;
    while !delivered_other || refused < 3 {
        let r = sink.next().await;
        if r.header("ce-subject") == p[1].id {
            delivered_other = true;
        } else {
            refused += 1;
        }
    }
    // After its expiry the refused message is dropped and counted.
    // (Counted after the row goes: wait for the count.)
    let dropped = "letro_outbox_deliveries_total{result=\"dropped\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while app.metric(dropped).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired message was not dropped"
        );
        let _ = sink.try_next(Duration::from_millis(200)).await;
    }
    assert_eq!(app.stats().await.outbox_depth, 0);
    assert_eq!(app.metric(dropped).await, 1);
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"delivered\"}")
            .await,
        1
    );
    app.stop().await;
}

#[tokio::test]
async fn during_an_outage_the_dispatcher_probes_instead_of_storming() {
    let mut sink = FakeSink::start().await;
    sink.set_default(503);
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.retry_base_delay = Duration::from_millis(50);
    config.retry_max_delay = Duration::from_millis(400);
    config.delivery_concurrency = 16;
    // Queue 40 messages before the dispatcher starts.
    let app = TestApp::spawn(config.clone()).await;
    for i in 0..20 {
        make_match(&app, &format!("o{i}")).await;
    }
    assert_eq!(app.stats().await.outbox_depth, 40);
    app.stop().await;
    config.sink = Some(sink.url.parse().expect("url"));
    let app = TestApp::spawn(config).await;
    // A second of outage. Retrying each message on its own schedule would try every
    // one of the 40 at least once (and most several times); with the sink-wide pause
    // the first wave (up to 16 in flight) is followed by one probe per pause.
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut attempts = 0;
    while let Some(left) = outage_end.checked_duration_since(tokio::time::Instant::now()) {
        if sink.try_next(left).await.is_some() {
            attempts += 1;
        }
    }
    assert!(attempts >= 1, "the dispatcher tried the sink");
    assert!(attempts < 40, "{attempts} attempts in a second of outage");
    sink.set_default(202);
    let mut delivered = std::collections::HashSet::new();
    while delivered.len() < 40 {
        let r = sink.next().await;
        delivered.insert(r.header("ce-id").to_owned());
    }
    sink.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    println!("sink outage of 1 s with 40 messages queued: {attempts} attempts");
    app.stop().await;
}

/// What a [`RecordingSink`] saw: the method, the `ce-id` and the body of each request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A sink on a real socket that takes any method on any path and records it. While
/// `redirect_to` is set, it answers 301, 307 and 308 in turn with that `Location`;
/// otherwise 202.
struct RecordingSink {
    url: String,
    seen: Seen,
    redirect_to: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl RecordingSink {
    async fn start() -> Self {
        use axum::http::{HeaderMap, Method, StatusCode, header};
        use axum::response::IntoResponse;

        let seen = Seen::default();
        let redirect_to = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let (s, r) = (seen.clone(), redirect_to.clone());
        let handler = move |method: Method, headers: HeaderMap, body: axum::body::Bytes| {
            let (seen, redirect_to) = (s.clone(), r.clone());
            async move {
                let id = headers
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let mut seen = seen.lock().expect("lock");
                seen.push((method.to_string(), id, body.to_vec()));
                let codes = [301, 307, 308];
                match redirect_to.lock().expect("lock").clone() {
                    Some(to) => (
                        StatusCode::from_u16(codes[(seen.len() - 1) % codes.len()])
                            .expect("status"),
                        [(header::LOCATION, to)],
                    )
                        .into_response(),
                    None => StatusCode::ACCEPTED.into_response(),
                }
            }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            seen,
            redirect_to,
        }
    }

    fn seen(&self) -> Vec<(String, String, Vec<u8>)> {
        self.seen.lock().expect("lock").clone()
    }
}

#[tokio::test]
async fn a_redirect_is_a_failed_delivery_and_is_never_followed() {
    // The sink redirects (301, 307, 308 in turn) to another sink, as an http->https or
    // trailing-slash redirect in front of a broker would.
    let elsewhere = RecordingSink::start().await;
    let sink = RecordingSink::start().await;
    *sink.redirect_to.lock().expect("lock") = Some(format!("{}elsewhere", elsewhere.url));
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    make_match(&app, "redirect").await;

    // Every answer is a failure: the messages stay and are retried, each 3xx counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sink.seen().len() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the messages were not retried: {:?}",
            sink.seen().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed_attempts = sink.seen().len() as u64;
    assert_eq!(app.stats().await.outbox_depth, 2, "nothing was delivered");
    assert!(
        elsewhere.seen().is_empty(),
        "the redirect was followed: {:?}",
        elsewhere.seen()
    );
    // Counted once each attempt's result is recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let redirects = app
            .metric("letro_outbox_delivery_failures_total{cause=\"redirect\"}")
            .await;
        let retries = app
            .metric("letro_outbox_deliveries_total{result=\"retry\"}")
            .await;
        if redirects >= failed_attempts && retries >= failed_attempts {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{redirects} redirects and {retries} retries counted for {failed_attempts} attempts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"delivered\"}")
            .await,
        0
    );

    // The sink accepts again: both messages are delivered there, and only there.
    *sink.redirect_to.lock().expect("lock") = None;
    app.wait_for_metric(
        "letro_outbox_deliveries_total{result=\"delivered\"}",
        2,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(app.stats().await.outbox_depth, 0);
    let seen = sink.seen();
    assert!(
        seen.iter()
            .all(|(method, _, body)| method == "POST" && !body.is_empty())
    );
    assert_eq!(distinct(seen.iter().map(|(_, id, _)| id.clone())), 2);
    assert!(elsewhere.seen().is_empty());
    assert_eq!(
        app.metric("letro_outbox_deliveries_total{result=\"delivered\"}")
            .await,
        2
    );
    app.stop().await;
}
