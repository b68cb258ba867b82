//! The ingress contract: what each kind of input is answered, and that refusals are
//! acknowledged, logged, counted and leave nothing behind.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn every_refusal_reason_is_acknowledged_counted_and_stores_nothing() {
    let mut sink = FakeSink::start().await;
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    let p = parties();
    let key = p[0].key_b64();
    let ec_key =
        vectors()["valid_connection_params"][0]["deserialized"]["session_public_key_spki_der_b64"]
            .as_str()
            .expect("ec key")
            .to_owned();
    let pss_key = vectors()["endpoint_keys"][5]["spki_der_b64"]
        .as_str()
        .expect("pss key")
        .to_owned();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "too_large",
            format!("a@b.io,c@d.io,{}", "A".repeat(5000)).into_bytes(),
        ),
        ("not_utf8", b"a@b.io,\xc3\x28@d.io,AAAA".to_vec()),
        ("field_count", format!("a@b.io,{key}").into_bytes()),
        (
            "field_count",
            format!("a@b.io,c@d.io,{key},extra").into_bytes(),
        ),
        ("field_count", Vec::new()),
        (
            "invalid_requester",
            format!("b.io,c@d.io,{key}").into_bytes(),
        ),
        (
            "invalid_requester",
            format!("a b@b.io,c@d.io,{key}").into_bytes(),
        ),
        ("invalid_target", format!("a@b.io,c@,{key}").into_bytes()),
        (
            "invalid_target",
            format!("a@b.io,c@-d.io,{key}").into_bytes(),
        ),
        ("self_pairing", format!("a@b.io,a@B.IO,{key}").into_bytes()),
        ("key_not_base64", b"a@b.io,c@d.io,***".to_vec()),
        (
            "key_not_base64",
            format!("a@b.io,c@d.io,{}", key.replace('/', "_").replace('+', "-")).into_bytes(),
        ),
        (
            "key_not_spki",
            format!("a@b.io,c@d.io,{}", STANDARD.encode(b"not a key")).into_bytes(),
        ),
        (
            "key_not_rsa",
            format!("a@b.io,c@d.io,{ec_key}").into_bytes(),
        ),
        (
            "key_not_rsa",
            format!("a@b.io,c@d.io,{pss_key}").into_bytes(),
        ),
        (
            "key_not_sender",
            p[1].request("a@b.io", "c@d.io").into_bytes(),
        ),
    ];
    for (i, (reason, body)) in cases.iter().enumerate() {
        let before = app
            .metric(&format!("letro_refusals_total{{reason=\"{reason}\"}}"))
            .await;
        let status = app
            .post_message(&p[0].id, &format!("r-{i}"), REQUEST_TYPE, body.clone())
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "case {i} ({reason})");
        let after = app
            .metric(&format!("letro_refusals_total{{reason=\"{reason}\"}}"))
            .await;
        assert_eq!(after, before + 1, "case {i} counted as {reason}");
    }
    let stats = app.stats().await;
    assert_eq!(stats.pending_requests, 0);
    assert_eq!(stats.outbox_depth, 0);
    sink.assert_quiet(Duration::from_millis(100)).await;
    // A refused event is not recorded as processed: a corrected one may reuse nothing, but
    // the same parcel id from the same sender with valid content is still handled.
    let status = app
        .post_message(
            &p[0].id,
            "r-0",
            REQUEST_TYPE,
            p[0].request("a@b.io", "c@d.io"),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(app.stats().await.pending_requests, 1);
    app.stop().await;
}

#[tokio::test]
async fn not_cloudevents_and_unsupported_events_get_400() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let p = parties();
    let body = p[0].request("a@b.io", "c@d.io");
    let full = event_headers(&p[0].id, "x", REQUEST_TYPE);
    let without = |name: &str| -> Vec<(&str, &str)> {
        full.iter().copied().filter(|(n, _)| *n != name).collect()
    };
    let with = |name: &'static str, value: &'static str| -> Vec<(&str, &str)> {
        full.iter()
            .map(|(n, v)| if *n == name { (name, value) } else { (*n, *v) })
            .collect()
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "no CloudEvent headers",
            vec![("content-type", REQUEST_TYPE)],
        ),
        ("no specversion", without("ce-specversion")),
        ("no id", without("ce-id")),
        ("no source", without("ce-source")),
        ("no type", without("ce-type")),
        ("wrong specversion", with("ce-specversion", "0.3")),
        (
            "wrong type",
            with(
                "ce-type",
                "tech.relaycorp.awala.endpoint-internet.outgoing-service-message",
            ),
        ),
        ("no subject", without("ce-subject")),
        ("subject with a space", with("ce-subject", "0abc%20def")),
        ("no content type", without("content-type")),
        (
            "unsupported content type",
            with(
                "content-type",
                "application/vnd.relaycorp.letro.pairing-request",
            ),
        ),
        (
            "batch mode",
            with("content-type", "application/cloudevents-batch+json"),
        ),
    ];
    for (what, headers) in cases {
        assert_eq!(
            app.post(&headers, body.clone()).await,
            StatusCode::BAD_REQUEST,
            "{what}"
        );
    }
    assert_eq!(app.stats().await.pending_requests, 0);
    // Content type parameters and case do not matter; unknown extensions are ignored.
    let mut headers = with(
        "content-type",
        "Application/Vnd.Relaycorp.Letro.Pairing-Request-Tmp; charset=utf-8",
    );
    headers.push(("ce-knativearrivaltime", "2026-01-01T00:00:00Z"));
    headers.push(("ce-expiry", "2026-03-01T00:00:00.000Z"));
    headers.push((
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ));
    headers.push(("prefer", "reply"));
    assert_eq!(app.post(&headers, body).await, StatusCode::NO_CONTENT);
    assert_eq!(app.stats().await.pending_requests, 1);
    app.stop().await;
}

#[tokio::test]
async fn structured_mode_is_accepted() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let p = parties();
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": "parcel-s",
        "source": p[0].id,
        "type": INCOMING_TYPE,
        "subject": SERVER_ID,
        "datacontenttype": REQUEST_TYPE,
        "data_base64": STANDARD.encode(p[0].request("a@b.io", "c@d.io")),
    });
    let status = app
        .post(
            &[("content-type", "application/cloudevents+json")],
            event.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(app.stats().await.pending_requests, 1);
    // The same event again, now in binary mode: a duplicate.
    let status = app
        .post_request(&p[0], "parcel-s", "a@b.io", "c@d.io")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.metric("letro_events_total{content_type=\"pairing-request\",outcome=\"duplicate\"}")
            .await,
        1
    );
    let bad = app
        .post(
            &[("content-type", "application/cloudevents+json")],
            "{not json",
        )
        .await;
    assert_eq!(bad, StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Sends a request with a body of `size` bytes over a raw socket and reads the answer.
async fn raw_post(addr: std::net::SocketAddr, size: usize, chunked: bool) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let p = parties();
    let mut head = raw_event_head(&p[0].id, "big");
    if chunked {
        head.push_str("transfer-encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("content-length: {size}\r\n\r\n"));
    }
    stream.write_all(head.as_bytes()).await.expect("write head");
    let writer = async {
        let chunk = vec![b'A'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            let n = chunk.len().min(size - sent);
            let ok = if chunked {
                stream
                    .write_all(format!("{n:x}\r\n").as_bytes())
                    .await
                    .is_ok()
                    && stream.write_all(&chunk[..n]).await.is_ok()
                    && stream.write_all(b"\r\n").await.is_ok()
            } else {
                stream.write_all(&chunk[..n]).await.is_ok()
            };
            if !ok {
                break;
            }
            sent += n;
        }
        stream
    };
    let mut stream = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("write in time");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn oversized_bodies_get_413_and_a_clean_close() {
    let (_dir, db) = temp_db();
    let mut config = test_config(&db, None);
    config.max_body_bytes = 64 * 1024;
    let app = TestApp::spawn(config).await;
    // Declared too large: answered before the body is read.
    let answer = raw_post(app.addr, 4 * 1024 * 1024, false).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"));
    // Streamed without a length: answered once the limit is passed.
    let answer = raw_post(app.addr, 4 * 1024 * 1024, true).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // Through an ordinary client too.
    let status = app
        .post(
            &event_headers(&parties()[0].id, "big", REQUEST_TYPE),
            vec![b'A'; 200 * 1024],
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // The server is still healthy and nothing was stored.
    assert_eq!(app.health().await, StatusCode::OK);
    assert_eq!(app.stats().await.pending_requests, 0);
    assert_eq!(
        app.metric("letro_events_total{content_type=\"unknown\",outcome=\"too_large\"}")
            .await,
        3
    );
    app.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_database() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    assert_eq!(app.health().await, StatusCode::OK);
    let head = app.client.head(&app.url).send().await.expect("head");
    assert_eq!(head.status(), StatusCode::OK);
    // With the database gone, readiness and ingress answer 503 (retried by Knative),
    // never acknowledging what was not stored.
    app.state.store.close().await;
    assert_eq!(app.health().await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        app.client
            .head(&app.url)
            .send()
            .await
            .expect("head")
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let p = parties();
    assert_eq!(
        app.post_request(&p[0], "x", "a@b.io", "c@d.io").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A refusal needs no database, so it is still a 204.
    assert_eq!(
        app.post_message(&p[0].id, "y", REQUEST_TYPE, "junk").await,
        StatusCode::NO_CONTENT
    );
    app.stop().await;
}

#[tokio::test]
async fn the_veraid_secret_is_generated_once_and_kept() {
    let (_dir, db) = temp_db();
    let p = parties();
    // A request stored by one process is matched by the next one on the same database:
    // the digests agree because the generated secret was kept.
    let mut sink = FakeSink::start().await;
    let app = TestApp::spawn(test_config(&db, None)).await;
    app.post_request(&p[0], "a", "a@b.io", "c@d.io").await;
    app.stop().await;
    let app = TestApp::spawn(test_config(&db, Some(&sink.url))).await;
    assert_eq!(app.stats().await.pending_requests, 1);
    app.post_request(&p[1], "c", "c@d.io", "a@b.io").await;
    assert_eq!(sink.take(2).await.len(), 2);
    app.stop().await;
}

/// Event keys kept against redelivery in a database file, as the store counts them.
fn event_keys(db: &std::path::Path) -> u64 {
    let conn = rusqlite::Connection::open(db).expect("open database");
    let n: i64 = conn
        .query_row(letro_server::store::sqlite::COUNT_EVENT_KEYS, [], |r| {
            r.get(0)
        })
        .expect("count");
    u64::try_from(n).expect("count")
}

#[tokio::test]
async fn over_long_attributes_get_400_and_store_nothing() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    let p = parties();
    let body = p[0].request("a@b.io", "c@d.io");
    let too_long = "letro_refusals_total{reason=\"attribute_too_long\"}";
    // The documented limits (docs/protocol.md §5): 256 bytes for id and source.
    let id_over = "p".repeat(257);
    let huge_id = "p".repeat(350_000);
    // The sender's own id, padded: the source of a request that would otherwise be taken.
    let source_over = format!("{}{}", p[0].id, "0".repeat(257 - p[0].id.len()));
    let cases: [(&str, &str, &str); 3] = [
        ("ce-id one byte over", &p[0].id, &id_over),
        ("ce-id of 350 KB", &p[0].id, &huge_id),
        ("ce-source one byte over", &source_over, "src-over"),
    ];
    for (what, source, id) in cases {
        assert_eq!(
            app.post_message(source, id, REQUEST_TYPE, body.clone())
                .await,
            StatusCode::BAD_REQUEST,
            "{what}"
        );
    }
    // The same in structured mode.
    let structured = serde_json::json!({
        "specversion": "1.0", "id": id_over, "source": p[0].id, "type": INCOMING_TYPE,
        "subject": SERVER_ID, "datacontenttype": REQUEST_TYPE, "data": body,
    });
    assert_eq!(
        app.post(
            &[("content-type", "application/cloudevents+json")],
            structured.to_string()
        )
        .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(app.metric(too_long).await, 4);
    assert_eq!(app.stats().await.pending_requests, 0);
    assert_eq!(event_keys(&db), 0, "no event key kept");

    // An id at the limit is an ordinary parcel id: taken, and its key kept.
    let at_limit = "p".repeat(256);
    assert_eq!(
        app.post_message(&p[0].id, &at_limit, REQUEST_TYPE, body.clone())
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.stats().await.pending_requests, 1);
    assert_eq!(event_keys(&db), 1);
    assert_eq!(app.metric(too_long).await, 4);
    app.stop().await;
}
