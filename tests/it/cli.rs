//! The binary's commands (serving under faults is in `faults`).

use std::process::Command;

use crate::support::*;

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
async fn migrate_on_postgresql_and_an_unreachable_server_is_a_clear_error() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let letro = |args: &[&str]| {
        Command::new(BIN)
            .env_clear()
            .args(args)
            .args(["--database", &db.url])
            .output()
            .expect("run")
    };
    // Admin commands do not migrate a database under a running server.
    let out = letro(&["outbox", "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("run `letro-server migrate`"),
        "{err}"
    );
    for _ in 0..2 {
        // Twice: the second run finds the schema up to date, and says nothing about
        // PostgreSQL's "already exists, skipping" notices.
        let out = letro(&["migrate"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("already exists"), "{err}");
    }
    let out = letro(&["outbox", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"depth\":0"));
    let version: i32 = {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query_scalar("SELECT max(version) FROM letro_schema")
            .fetch_one(&mut conn)
            .await
            .expect("schema version")
    };
    assert_eq!(
        usize::try_from(version).expect("positive"),
        letro_server::store::postgres::SCHEMA_VERSION
    );
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query("INSERT INTO letro_schema (version) VALUES (99)")
            .execute(&mut conn)
            .await
            .expect("a future version");
    }
    for args in [&["migrate"][..], &["requests", "stats"][..]] {
        let out = letro(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("newer than this letro-server knows"),
            "{args:?}: {err}"
        );
    }
    db.drop_database().await;

    let closed = ClosedPort::new();
    let url = format!("postgres://letro:hunter2@127.0.0.1:{}/letro", closed.port());
    let out = Command::new(BIN)
        .env_clear()
        .args(["migrate", "--db-timeout", "1s", "--database", &url])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening PostgreSQL database"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}
