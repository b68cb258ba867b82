//! What operators and newcomers touch: the admin commands, the demo, JSON logs, probes
//! and the latency metrics.

use std::process::{Command, Output};
use std::time::Duration;

use letro_server::store::Store;
use letro_server::store::sqlite::{SqliteStore, Synchronous};

use crate::store_contract::seed_for_operators;
use crate::support::*;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .env_clear()
        .args(args)
        .output()
        .expect("run letro-server")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// A database with one matched pair (two matches), one waiting request, one completion,
/// and one match that failed and waits an hour. Returns the failed message's id.
async fn seeded(db: &std::path::Path) -> String {
    // Real time: the commands read the clock (requests expire a day from now).
    let now = letro_server::clock::now();
    let store = SqliteStore::open(db, Synchronous::Full, now).expect("open");
    seed_for_operators(&store, now).await;
    let claimed = store.claim_due_messages(now, now, 1).await.expect("claim");
    let failed = claimed[0].message.id.clone();
    store
        .schedule_retry(
            &claimed[0],
            now.plus(Duration::from_secs(3600)),
            "sink answered 503",
        )
        .await
        .expect("retry later");
    store.close().await;
    failed.as_str().to_owned()
}

#[tokio::test]
async fn admin_commands_report_and_change_the_outbox_and_requests() {
    let (_dir, db) = temp_db();
    let failed = seeded(&db).await;
    let url = format!("sqlite://{}", db.display());
    let database = ["--database", url.as_str()];

    let status = stdout(&run(&[&["outbox", "status"][..], &database].concat()));
    assert!(status.contains("messages waiting      3"), "{status}");
    assert!(status.contains("pairing-match       2"), "{status}");
    assert!(status.contains("pairing-completion  1"), "{status}");
    assert!(status.contains("failed at least once  1"), "{status}");

    let json = stdout(&run(
        &[&["outbox", "status", "--json"][..], &database].concat()
    ));
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["depth"], 3);
    assert_eq!(v["due"], 2, "the failed message waits an hour");
    assert_eq!(v["retrying"], 1);
    assert_eq!(v["by_kind"]["pairing-match"], 2);

    let list = stdout(&run(
        &[&["outbox", "list", "--json"][..], &database].concat()
    ));
    let rows: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rows.len(), 3);
    let failing = rows
        .iter()
        .find(|r| r["id"] == failed.as_str())
        .expect("listed");
    assert_eq!(failing["attempts"], 1);
    assert_eq!(failing["last_error"], "sink answered 503");
    let text = stdout(&run(
        &[&["outbox", "list", "--limit", "1"][..], &database].concat()
    ));
    assert_eq!(text.matches(" to 0").count(), 1, "{text}");
    // Nothing that identifies a person: no VeraId, no key, no message content.
    let everything = format!("{status}{json}{list}{text}");
    for secret in ["a@x.io", "b@y.io", "c@z.io", &parties()[0].key_b64()[..40]] {
        assert!(!everything.contains(secret), "{secret} printed");
    }

    // Retry: an unknown id changes nothing and says so; the failed one is made due.
    let out = stdout(&run(
        &[&["outbox", "retry", "--id", "nope"][..], &database].concat()
    ));
    assert!(out.starts_with("0 message(s) made due now"), "{out}");
    assert!(out.contains("1 id(s) not retried"), "{out}");
    let out = stdout(&run(
        &[&["outbox", "retry", "--all"][..], &database].concat()
    ));
    assert!(out.starts_with("1 message(s) made due now"), "{out}");
    let store = SqliteStore::open_existing(&db, Synchronous::Full).expect("open");
    let status = store
        .outbox_status(letro_server::clock::now())
        .await
        .expect("status");
    // The two never tried were due already; the failed one is now too.
    assert_eq!(
        (status.depth, status.due),
        (3, 3),
        "the failed message is due now"
    );
    store.close().await;

    let stats = stdout(&run(
        &[&["requests", "stats", "--json"][..], &database].concat()
    ));
    let v: serde_json::Value = serde_json::from_str(&stats).expect("JSON");
    assert_eq!(
        (v["waiting"].as_u64(), v["senders"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(v["processed_event_keys"], 4);
    let out = stdout(&run(
        &[&["requests", "purge-expired"][..], &database].concat()
    ));
    assert!(out.contains("purged 0 expired pairing request(s)"), "{out}");
}

#[test]
fn admin_commands_refuse_bad_databases_clearly() {
    let (dir, _) = temp_db();
    let missing = format!("sqlite://{}", dir.path().join("missing.db").display());
    for args in [
        vec!["outbox", "status"],
        vec!["outbox", "list"],
        vec!["outbox", "retry", "--all"],
        vec!["requests", "stats"],
        vec!["requests", "purge-expired"],
    ] {
        let out = run(&[&args[..], &["--database", &missing]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("no database at"), "{args:?}: {err}");
        assert!(
            !dir.path().join("missing.db").exists(),
            "an admin command created a database"
        );
        let out = run(&[&args[..], &["--database", "mysql://root:hunter2@db/x"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("DATABASE_URL"), "{args:?}: {err}");
        assert!(!err.contains("hunter2"), "password printed: {err}");
        let out = run(&[
            &args[..],
            &[
                "--database",
                "postgres://letro:hunter2@127.0.0.1:1/letro",
                "--db-timeout",
                "1s",
            ],
        ]
        .concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("opening PostgreSQL database"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("hunter2"), "password printed: {err}");
    }
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["check-config", "--help"],
        vec!["outbox", "--help"],
        vec!["outbox", "status", "--help"],
        vec!["outbox", "list", "--help"],
        vec!["outbox", "retry", "--help"],
        vec!["requests", "--help"],
        vec!["requests", "stats", "--help"],
        vec!["requests", "purge-expired", "--help"],
        vec!["demo", "--help"],
    ] {
        let help = stdout(&run(&args));
        assert!(help.contains("Usage: letro-server"), "{args:?}: {help}");
    }
}

#[test]
fn check_config_prints_settings_without_secrets_and_exits_2_when_invalid() {
    let out = run(&[
        "check-config",
        "--database",
        "postgres://letro:hunter2@db.internal/letro",
        "--sink",
        "http://broker-ingress.knative-eventing.svc/letro/default",
        "--veraid-secret",
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        "--max-pending-per-target",
        "4294967295",
    ]);
    let text = stdout(&out);
    assert!(text.starts_with("configuration is valid"), "{text}");
    assert!(text.contains("db.internal"), "{text}");
    assert!(text.contains("broker-ingress"), "{text}");
    assert!(text.contains("no cap"), "{text}");
    assert!(text.contains("90days"), "{text}");
    assert!(
        text.contains("contact-first"),
        "the default match order: {text}"
    );
    for secret in ["hunter2", "00112233445566778899"] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
    }
    // Valid but risky: said, not refused.
    let text = stdout(&run(&[
        "check-config",
        "--database",
        "sqlite://x.db",
        "--sqlite-synchronous",
        "normal",
    ]));
    assert!(text.contains("warning: no sink"), "{text}");
    assert!(
        text.contains("warning: SQLite synchronous=normal"),
        "{text}"
    );
    let text = stdout(&run(&[
        "check-config",
        "--tmp-match-order",
        "recipient-first",
    ]));
    assert!(text.contains("recipient-first"), "{text}");
    let out = run(&["check-config", "--tmp-match-order", "owner-first"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tmp-match-order"), "{err}");
    // Under `timeout`: a server that took the value would serve forever, and fail here
    // with 124 instead of hanging the test.
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let out = Command::new("timeout")
        .args(["10", BIN])
        .env_clear()
        .env("LETRO_TMP_MATCH_ORDER", "backwards")
        .args(["serve", "--bind", "127.0.0.1:0", "--database", &url])
        .output()
        .expect("serve");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad value stops serve at startup"
    );
    let out = run(&["check-config", "--message-ttl", "200days"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LETRO_MESSAGE_TTL"), "{err}");
    let out = run(&["check-config", "--database", "mysql://x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_shows_connections_log_summaries_and_the_sink_ca_file() {
    // The value of a setting's line: `name   value`.
    let setting = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name:?} in {text}"))
    };
    let text = stdout(&run(&["check-config"]));
    assert_eq!(setting(&text, "connections at once"), "4096");
    assert_eq!(setting(&text, "repeated log lines summarised every"), "10s");
    assert_eq!(
        setting(&text, "sink CA certificates"),
        "the system's roots only"
    );
    let text = stdout(&run(&[
        "check-config",
        "--max-connections",
        "77",
        "--log-summary-interval",
        "3m",
    ]));
    assert_eq!(setting(&text, "connections at once"), "77");
    assert_eq!(setting(&text, "repeated log lines summarised every"), "3m");

    let dir = tempfile::tempdir().expect("temp dir");
    let one = crate::tls_sink::TestCa::new("letro ops CA one");
    let two = crate::tls_sink::TestCa::new("letro ops CA two");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}\n{}", one.pem, two.pem)).expect("write");
    // Through the environment, as a deployment sets it.
    let out = Command::new(BIN)
        .env_clear()
        .env("LETRO_SINK_CA_FILE", &bundle)
        .args(["check-config", "--sink", "https://broker.internal/ns/letro"])
        .output()
        .expect("run");
    let text = stdout(&out);
    let cas = setting(&text, "sink CA certificates");
    assert!(
        cas.starts_with("the system's roots and 2 from ")
            && cas.contains("bundle.pem")
            && cas.contains("CN=letro ops CA one (until ")
            && cas.contains("CN=letro ops CA two (until "),
        "{text}"
    );
    assert!(!text.contains("--sink-ca-file is set"), "{text}");
    let text = stdout(&run(&[
        "check-config",
        "--sink",
        "http://broker.internal/",
        "--sink-ca-file",
        bundle.to_str().expect("utf8"),
    ]));
    assert!(
        text.contains("warning: --sink-ca-file is set but the sink is not https"),
        "{text}"
    );

    // Refused at start, exit 2, naming the setting and the trouble.
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "just some text\n").expect("write");
    let key_only = dir.path().join("key.pem");
    std::fs::write(
        &key_only,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let not_x509 = dir.path().join("not-x509.pem");
    std::fs::write(
        &not_x509,
        format!(
            "{}-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
            one.pem
        ),
    )
    .expect("write");
    let unterminated = dir.path().join("unterminated.pem");
    std::fs::write(&unterminated, "-----BEGIN CERTIFICATE-----\nMIIB\n").expect("write");
    let missing = dir.path().join("missing.pem");
    for (file, expected) in [
        (&not_pem, "no PEM certificate"),
        (&key_only, "no PEM certificate"),
        (&not_x509, "certificate 2: not an X.509 certificate"),
        (&unterminated, "not valid PEM"),
        (&missing, "missing.pem"),
        (&dir.path().to_owned(), "Is a directory"),
    ] {
        let out = run(&[
            "check-config",
            "--sink-ca-file",
            file.to_str().expect("utf8"),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", file.display());
        assert!(
            err.contains("--sink-ca-file (LETRO_SINK_CA_FILE)") && err.contains(expected),
            "{}: {err}",
            file.display()
        );
    }
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let out = Command::new("timeout")
        .args(["10", BIN])
        .env_clear()
        .env("LETRO_SINK_CA_FILE", &not_pem)
        .args(["serve", "--bind", "127.0.0.1:0", "--database", &url])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2), "a bad CA file stops serve");
    assert!(String::from_utf8_lossy(&out.stderr).contains("LETRO_SINK_CA_FILE"));
}

#[test]
fn trust_anchors_are_listed_by_key_tag_and_a_bad_file_exits_2_naming_the_line() {
    let text = stdout(&run(&["check-config"]));
    assert!(
        text.contains("key tags 20326, 38696 (IANA root, built in)"),
        "{text}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("anchors.txt");
    std::fs::write(
        &good,
        "; a private root\n. 86400 IN DS 23299 8 2 AB7B803E5336EE64A120DF690A12204B92B90042128DE2D228C7933FFE1D48DA\n",
    )
    .expect("write");
    let text = stdout(&run(&[
        "check-config",
        "--veraid-trust-anchors",
        good.to_str().expect("utf8"),
    ]));
    assert!(text.contains("key tags 23299 (from "), "{text}");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "; comment\n. IN DS 23299 8 2 AB7B\n").expect("write");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "; nothing here\n\n").expect("write");
    let missing = dir.path().join("missing.txt");
    for (file, expected) in [
        (&bad, "line 2"),
        (&empty, "no DS record"),
        (&missing, "missing.txt"),
    ] {
        let out = run(&[
            "check-config",
            "--veraid-trust-anchors",
            file.to_str().expect("utf8"),
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", file.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--veraid-trust-anchors") && err.contains(expected),
            "{err}"
        );
    }
    // The same through the environment, at serve's startup.
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let out = Command::new("timeout")
        .args(["10", BIN])
        .env_clear()
        .env("LETRO_VERAID_TRUST_ANCHORS", &bad)
        .args(["serve", "--bind", "127.0.0.1:0", "--database", &url])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn the_demo_pairs_two_users_end_to_end() {
    let text = stdout(&run(&["demo"]));
    for line in [
        "1. Alice asks to pair with Bob",
        "server answered 204 No Content: stored, waiting for Bob's request",
        "Alice learns: contact bob@example.org is endpoint 0",
        "Bob learns: contact alice@example.com is endpoint 0",
        "the PDA was issued by Alice, so it goes to Bob",
        "Alice holds Bob's connection params",
        "Bob holds Alice's connection params",
        "Paired: Alice and Bob can now send each other parcels through Awala.",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // A proxy in the environment is for leaving the machine, not for loopback.
    let proxy = ClosedPort::new();
    let proxied = Command::new(BIN)
        .env_clear()
        .env("HTTP_PROXY", format!("http://127.0.0.1:{}", proxy.port()))
        .env("http_proxy", format!("http://127.0.0.1:{}", proxy.port()))
        .args(["demo"])
        .output()
        .expect("run");
    assert!(stdout(&proxied).contains("Paired: Alice and Bob"));
    let verbose = stdout(&run(&["demo", "--verbose"]));
    assert!(
        verbose
            .contains("ce-type: tech.relaycorp.awala.endpoint-internet.outgoing-service-message")
    );
    assert!(verbose.contains("ce-expiry: "));
    // The 2023 app's dialect: its own VeraId first, authorisations forwarded as they came.
    let android = stdout(&run(&["demo", "--android-2023"]));
    for line in [
        "content-type: application/vnd.relaycorp.letro.pairing-auth\n",
        "5. Each receives the other's authorisation, unchanged",
        "Alice holds Bob's connection params",
        "Paired: Alice and Bob can now send each other parcels through Awala.",
    ] {
        assert!(android.contains(line), "missing {line:?} in:\n{android}");
    }
    assert!(!android.contains("pairing-completion-tmp"), "{android}");
}

/// `demo --signed`: today's protocol, with mock VeraId organisations. Each request's
/// signer is verified, each party gets the other's bundle byte for byte (as many bytes
/// as were signed) and reads the right signer, endpoint and contact back from it, and a
/// replayed bundle gets a failure of reason 2.
#[test]
fn the_signed_demo_verifies_each_signer_and_forwards_each_bundle_byte_for_byte() {
    let text = stdout(&run(&["demo", "--signed"]));
    let endpoint = |veraid: &str| {
        let prefix = format!(" is {veraid} on endpoint ");
        text.lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, id)| id.to_owned()))
            .unwrap_or_else(|| panic!("no endpoint for {veraid} in:\n{text}"))
    };
    let (alice, bob) = (endpoint("alice@example.com"), endpoint("bob@example.org"));
    let mut lines = vec![
        "it trusts one VeraId root, a mock DNSSEC root made for this demo: . 3600 IN DS "
            .to_owned(),
        "  example.com: DNSSEC chain from the mock root, _veraid TXT record, certificate for alice\n".to_owned(),
        "  example.org: DNSSEC chain from the mock root, _veraid TXT record, certificate for bob\n".to_owned(),
        "1. Alice asks to pair with Bob, signing as alice@example.com\n".to_owned(),
        "content-type: application/vnd.relaycorp.letro.contact-pairing.request\n".to_owned(),
        "  verified with the server's own check (src/bundles.rs): signed by alice@example.com, a user of example.com, from the mock root\n  server answered 204 No Content: stored, waiting for Bob's request\n".to_owned(),
        "  verified with the server's own check (src/bundles.rs): signed by bob@example.org, a user of example.org, from the mock root\n  server answered 204 No Content: it is the reverse of Alice's, so each gets the other's bundle\n".to_owned(),
        format!("  Alice's app verifies it (Letro service, 90-day window): signed by bob@example.org, for alice@example.com, from endpoint {bob}\n"),
        format!("  Bob's app verifies it (Letro service, 90-day window): signed by alice@example.com, for bob@example.org, from endpoint {alice}\n"),
        "5. Each receives the other's authorisation, unchanged\n".to_owned(),
        "Paired: Alice and Bob can now send each other parcels through Awala.\n".to_owned(),
        format!("… for endpoint {bob}\n    content-type: application/vnd.relaycorp.letro.contact-pairing.failure\n"),
        "  Bob's endpoint gets a ContactPairingFailure: bob@example.org, reason 2 (invalid_requester_awala_key)\n".to_owned(),
    ];
    // Each forwarded bundle is as long as the one its signer's app made.
    for (sender, receiver) in [("Alice", "Bob"), ("Bob", "Alice")] {
        let prefix =
            format!("  {sender}'s app signs a ContactPairingRequest (its endpoint key and ");
        let size = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit_once("a VeraId bundle of "))
            .and_then(|(_, n)| n.strip_suffix(" bytes"))
            .unwrap_or_else(|| panic!("no bundle size for {sender} in:\n{text}"));
        lines.push(format!(
            "  {receiver} receives {sender}'s bundle: {size} bytes, byte for byte the one {sender} sent\n"
        ));
    }
    for line in &lines {
        assert!(text.contains(line.as_str()), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("pairing-completion-tmp"), "{text}");
    assert!(stdout(&run(&["demo", "--help"])).contains("--signed"));
    // Today's apps and the 2023 dialect are different demos.
    assert_eq!(
        run(&["demo", "--signed", "--android-2023"]).status.code(),
        Some(2)
    );
}

#[tokio::test]
async fn json_logs_carry_request_ids_and_never_veraids_keys_or_bodies() {
    let (_dir, db) = temp_db();
    let mut sink = FakeSink::start().await;
    let server = ServerProcess::start(&db, Some(&sink.url), &[]);
    let http = client();
    let p = parties();
    let (alice, bob) = ("alice.logs@example.com", "bob.logs@example.net");
    let post = |from: &Party, parcel: &str, body: String, extra: Option<(&str, &str)>| {
        let mut request = http.post(&server.url);
        for (name, value) in event_headers(&from.id, parcel, REQUEST_TYPE) {
            request = request.header(name, value);
        }
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        request.body(body).send()
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answers = [
        post(
            &p[0],
            "l-1",
            p[0].request(alice, bob),
            Some(("x-request-id", "req-42")),
        )
        .await,
        post(
            &p[1],
            "l-2",
            p[1].request(bob, alice),
            Some(("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))),
        )
        .await,
        // Refused content, with an id that tries to break out of its JSON string.
        post(
            &p[2],
            "l-3",
            "secret-body-text".into(),
            Some(("x-request-id", "a\"b")),
        )
        .await,
    ];
    for a in answers {
        assert_eq!(a.expect("answer").status(), 204);
    }
    sink.take(2).await;
    // The log pipe is read by another thread: wait until the last line is in.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = server.recent_log();
        if log.contains("\"l-3\"") || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "severity", "message"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
    }
    fn with_id<'a>(
        lines: &'a [serde_json::Value],
        id: &'a str,
    ) -> impl Iterator<Item = &'a serde_json::Value> {
        lines.iter().filter(move |l| l["request_id"] == id)
    }
    let mine: Vec<_> = with_id(&lines, "req-42").collect();
    assert!(!mine.is_empty(), "no line for req-42:\n{log}");
    assert!(
        mine.iter()
            .any(|l| l["parcel.id"] == "l-1" && l["sender"] == p[0].id.as_str())
    );
    assert!(
        with_id(&lines, trace).any(|l| l["parcel.id"] == "l-2"),
        "{log}"
    );
    // The module and a pairing request's `target` digest are two different fields.
    let stored = mine
        .iter()
        .find(|l| l["message"] == "pairing request stored")
        .expect("stored line");
    assert_eq!(
        stored["module"],
        "letro_server::http::messages::pairing_request"
    );
    assert_eq!(stored["target"].as_str().map(str::len), Some(8), "{stored}");
    let refused = lines
        .iter()
        .find(|l| l["parcel.id"] == "l-3")
        .expect("the refusal is logged");
    assert_eq!(refused["severity"], "WARNING");
    let id = refused["request_id"].as_str().expect("an id");
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    for secret in [alice, bob, "secret-body-text", &p[0].key_b64()[40..80]] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
    server.terminate().await;
}

#[tokio::test]
async fn probes_and_latency_histograms() {
    let (_dir, db) = temp_db();
    let app = TestApp::spawn(test_config(&db, None)).await;
    for path in ["livez", "readyz"] {
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), 200, "{path}");
    }
    let p = parties();
    assert_eq!(
        app.post_request(&p[0], "h-1", "a@x.io", "b@y.io").await,
        204
    );
    assert_eq!(
        app.post_message(&p[0].id, "h-2", REQUEST_TYPE, "").await,
        204
    );
    assert_eq!(app.post(&[("ce-id", "x")], "").await, 400);
    assert_eq!(
        app.metric("letro_request_duration_seconds_count{status=\"204\"}")
            .await,
        2
    );
    assert_eq!(
        app.metric("letro_request_duration_seconds_count{status=\"400\"}")
            .await,
        1
    );
    // Only what reached the store is a commit.
    assert_eq!(
        app.metric("letro_commit_duration_seconds_count{content_type=\"pairing-request\"}")
            .await,
        1
    );
    // The SQLite writer's commits to disk: at least the stored request's (a probe's
    // transaction writes nothing, and is not one).
    assert!(
        app.metric("letro_sqlite_disk_duration_seconds_count{step=\"commit\"}")
            .await
            >= 1
    );
    app.stop().await;
}

#[tokio::test]
async fn a_server_with_another_veraid_secret_than_its_database_refuses_to_start() {
    use letro_server::app::App;
    use letro_server::config::parse_secret;
    let (_dir, db) = temp_db();
    let with = |secret: Option<&str>| {
        let mut config = test_config(&db, None);
        config.veraid_secret = secret.map(|s| parse_secret(s).expect("hex"));
        config
    };
    let (x, y) = ("11".repeat(32), "22".repeat(32));
    let refusal = |result: anyhow::Result<App>| match result {
        Ok(_) => panic!("started with the wrong secret"),
        Err(e) => format!("{e:#}"),
    };
    // A database first started without a configured secret generated its own.
    drop(App::build(with(None)).await.expect("generated"));
    drop(
        App::build(with(None))
            .await
            .expect("the same generated secret"),
    );
    let e = refusal(App::build(with(Some(&x))).await);
    assert!(
        e.contains("started without it and uses the secret it generated"),
        "{e}"
    );
    // A database from before fingerprints, started without a secret and given one later:
    // the configured secret is the one in use and is recorded; the generated one stays
    // unused, and does not stop the configured secret from starting again (as a secret
    // generated by a replica that lost the race to record its fingerprint would not).
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute(
            "DELETE FROM settings WHERE name = 'veraid_secret_fingerprint'",
            [],
        )
        .expect("forget the fingerprint");
    }
    drop(App::build(with(Some(&x))).await.expect("legacy database"));
    drop(App::build(with(Some(&x))).await.expect("and again"));
    let e = refusal(App::build(with(None)).await);
    assert!(e.contains("which is not set now"), "{e}");

    let (_dir2, db2) = temp_db();
    let with2 = |secret: Option<&str>| {
        let mut config = test_config(&db2, None);
        config.veraid_secret = secret.map(|s| parse_secret(s).expect("hex"));
        config
    };
    drop(App::build(with2(Some(&x))).await.expect("first start"));
    drop(App::build(with2(Some(&x))).await.expect("same secret"));
    let e = refusal(App::build(with2(Some(&y))).await);
    assert!(
        e.contains("not the one this database was started with"),
        "{e}"
    );
    let e = refusal(App::build(with2(None)).await);
    assert!(e.contains("which is not set now"), "{e}");
    // A refused start left nothing behind: the right secret still starts.
    drop(
        App::build(with2(Some(&x)))
            .await
            .expect("the right secret again"),
    );
    // The configured secret itself is never stored, only its fingerprint.
    let store = SqliteStore::open_existing(&db2, Synchronous::Full).expect("open");
    use letro_server::store::settings::{VERAID_SECRET, VERAID_SECRET_FINGERPRINT};
    assert_eq!(store.setting(VERAID_SECRET).await.expect("read"), None);
    let fingerprint = store
        .setting(VERAID_SECRET_FINGERPRINT)
        .await
        .expect("read")
        .expect("recorded");
    assert_ne!(fingerprint, hex::decode(&x).expect("hex"));
    store.close().await;
}

#[test]
fn admin_commands_need_the_current_schema_and_no_command_runs_on_a_newer_one() {
    let (_dir, db) = temp_db();
    let url = format!("sqlite://{}", db.display());
    let set_version = |v: i64| {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.pragma_update(None, "user_version", v).expect("set");
    };
    // An older schema, as the previous release left it: admin commands ask for
    // `migrate` instead of upgrading it.
    let previous = letro_server::store::sqlite::SCHEMA_VERSION - 1;
    letro_server::store::sqlite::create_at_version(&db, previous).expect("old schema");
    let out = run(&["outbox", "status", "--database", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("run `letro-server migrate`"),
        "{err}"
    );
    stdout(&run(&["migrate", "--database", &url]));
    stdout(&run(&["outbox", "status", "--database", &url]));
    // A newer schema than this binary knows: nothing touches it.
    set_version(99);
    for args in [
        vec!["migrate"],
        vec!["outbox", "status"],
        vec!["requests", "purge-expired"],
    ] {
        let out = run(&[&args[..], &["--database", &url]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("newer than this letro-server knows"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(BIN)
        .env_clear()
        .args(["serve", "--bind", "127.0.0.1:0", "--database", &url])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer than this letro-server knows"), "{err}");
}

#[test]
fn an_empty_k_sink_means_no_sink() {
    let out = Command::new(BIN)
        .env_clear()
        .env("K_SINK", "")
        .args(["check-config", "--database", "sqlite://x.db"])
        .output()
        .expect("run");
    let text = stdout(&out);
    assert!(text.contains("warning: no sink"), "{text}");
}

#[tokio::test]
async fn shutdown_takes_at_most_one_shutdown_timeout_in_all() {
    use tokio::io::AsyncWriteExt;
    let (_dir, db) = temp_db();
    let mut sink = FakeSink::start().await;
    // Deliveries hang, and a client is slow to send its body: both drains take as
    // long as they are allowed to.
    sink.set_delay(Duration::from_secs(20));
    let mut config = test_config(&db, Some(&sink.url));
    config.sink_timeout = Duration::from_secs(30);
    config.body_read_timeout = Duration::from_secs(30);
    config.shutdown_timeout = Duration::from_secs(2);
    let app = TestApp::spawn(config).await;
    let p = parties();
    assert_eq!(
        app.post_request(&p[0], "s-1", "a@x.io", "b@y.io").await,
        204
    );
    assert_eq!(
        app.post_request(&p[1], "s-2", "b@y.io", "a@x.io").await,
        204
    );
    let mut slow = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nce-specversion: 1.0\r\n\
             ce-id: s-3\r\nce-source: {}\r\nce-type: {INCOMING_TYPE}\r\n\
             ce-subject: {SERVER_ID}\r\ncontent-type: {REQUEST_TYPE}\r\n\r\nab",
            p[2].id
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    // Both matches are out at the sink, hanging (it records them before its delay).
    sink.take(2).await;
    let started = std::time::Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "shutdown took {took:?}, with a 2 s shutdown timeout"
    );
    assert!(
        took >= Duration::from_secs(2),
        "did not wait at all: {took:?}"
    );
    drop(slow);
}

/// On PostgreSQL the running server vacuums the tables it churns by itself, once
/// PostgreSQL counts enough dead rows in them (`Store::reclaim`, asked every second):
/// autovacuum may be off, as on this project's CI machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_vacuums_its_churned_tables_on_postgres() {
    use letro_server::store::postgres::RECLAIM_DEAD_ROWS;
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let app = TestApp::spawn(db.config(None)).await;
    let TestDb::Postgres(pg) = &db else {
        unreachable!("made as PostgreSQL")
    };
    // Churn in one transaction: rows inserted and deleted before anyone else could
    // see them (the dispatcher must not deliver them), dead row versions all the same.
    // Closing the connection makes its backend report them to the statistics.
    let mut churn = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN;
         INSERT INTO outbox (id, source, recipient, kind, content_type, content, time_ms,
                             expiry_ms, next_attempt_at)
             SELECT 'churn-' || n, 'test', 'test', 'pairing-match', '', '\\x00', 0, 0, 0
             FROM generate_series(1, {RECLAIM_DEAD_ROWS}) AS n;
         DELETE FROM outbox WHERE id LIKE 'churn-%';
         INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id, offer,
                                       created_at, expires_at)
             SELECT sha256(int4send(n)), sha256(int4send(-n)), 'test', '\\x00', 0, 0
             FROM generate_series(1, {RECLAIM_DEAD_ROWS}) AS n;
         DELETE FROM pending_requests WHERE endpoint_id = 'test';
         COMMIT;"
    )))
    .execute(&mut churn)
    .await
    .expect("churn");
    churn.close().await.expect("close");
    let mut conn = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let vacuumed = loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_user_tables
             WHERE relname IN ('outbox', 'pending_requests') AND vacuum_count > 0",
        )
        .fetch_one(&mut conn)
        .await
        .expect("read the statistics");
        if n == 2 || tokio::time::Instant::now() > deadline {
            break n;
        }
        // PostgreSQL tells no one when a VACUUM ends: its statistics are watched.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = conn.close().await;
    app.stop().await;
    db.finish().await;
    assert_eq!(
        vacuumed, 2,
        "no VACUUM of the outbox and pending requests in 20 s"
    );
}
