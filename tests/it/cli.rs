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
