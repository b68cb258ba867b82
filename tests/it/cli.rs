//! The binary itself: migrate, and SIGTERM under way.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_letro-server");

#[test]
fn migrate_creates_the_database_and_bad_urls_are_refused() {
    let (_dir, db) = temp_db();
    let out = Command::new(BIN)
        .args([
            "migrate",
            "--database",
            &format!("sqlite://{}", db.display()),
        ])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    let out = Command::new(BIN)
        .args(["migrate", "--database", "mysql://nope"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let (dir, db) = temp_db();
    let mut child = Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database")
        .arg(format!("sqlite://{}", db.display()))
        .env_remove("K_SINK")
        .env_remove("LETRO_BIND")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("a log line").expect("read");
        if line.contains("\"listening\"") {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log");
            break v["address"].as_str().expect("address").to_owned();
        }
    };
    let client = client();
    let url = format!("http://{addr}/");
    let p = parties();
    // Requests in flight while the signal arrives are answered, and every 204 is stored.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (client, url, party) = (client.clone(), url.clone(), p[0].clone());
        tasks.spawn(async move {
            let mut req = client.post(&url);
            let id = format!("p{i}");
            for (n, v) in event_headers(&party.id, &id, REQUEST_TYPE) {
                req = req.header(n, v);
            }
            req.body(party.request(&format!("u{i}@a.io"), "t@b.io"))
                .send()
                .await
                .map(|r| r.status())
        });
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let mut acknowledged = 0;
    while let Some(r) = tasks.join_next().await {
        if let Ok(status) = r.expect("task") {
            assert!(
                status == StatusCode::NO_CONTENT || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}"
            );
            acknowledged += u64::from(status == StatusCode::NO_CONTENT);
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "exit code after SIGTERM");
    // Everything acknowledged is in the database.
    let app = TestApp::spawn(test_config(&db, None)).await;
    assert_eq!(app.stats().await.pending_requests, acknowledged);
    app.stop().await;
    drop(dir);
}
