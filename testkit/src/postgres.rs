//! PostgreSQL for tests and benchmarks: scratch databases on a shared server, and a
//! private server that a test may stop and start.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch PostgreSQL database, dropped by [`drop_database`](Self::drop_database).
pub struct PgDatabase {
    /// Its URL.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    /// A fresh database on the server `TEST_DATABASE_URL` names; `None`, with a message,
    /// when that is not set. Panics when it is set but the server cannot be reached.
    pub async fn create() -> Option<Self> {
        let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("SKIPPED: TEST_DATABASE_URL is not set, so this PostgreSQL test did not run");
            return None;
        };
        Some(
            Self::create_on(&admin, "letro_test")
                .await
                .unwrap_or_else(|e| {
                    panic!("TEST_DATABASE_URL is set but PostgreSQL is unreachable: {e}")
                }),
        )
    }

    /// A fresh database, named after `prefix`, on the server of the URL `admin`.
    pub async fn create_on(admin: &str, prefix: &str) -> Result<Self, sqlx::Error> {
        use sqlx::Connection;
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let mut conn = sqlx::PgConnection::connect(admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        let mut url =
            reqwest::Url::parse(admin).map_err(|e| sqlx::Error::Configuration(e.into()))?;
        url.set_path(&format!("/{name}"));
        Ok(Self {
            url: url.to_string(),
            admin: admin.to_owned(),
            name,
        })
    }

    /// Its name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another fresh database on the same server, named after `prefix`.
    pub async fn sibling(&self, prefix: &str) -> Result<Self, sqlx::Error> {
        Self::create_on(&self.admin, prefix).await
    }

    /// Transactions committed and rolled back in it so far, as PostgreSQL counts them
    /// (`pg_stat_database`, which a backend updates when it finishes a transaction,
    /// at most once a second, and when it exits), asked over a connection to another
    /// database, which it does not count.
    pub async fn transactions(&self) -> Result<i64, sqlx::Error> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin).await?;
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.name)
        .fetch_optional(&mut conn)
        .await?;
        let _ = conn.close().await;
        Ok(n.unwrap_or(0))
    }

    /// Drops the database, whoever is still connected to it.
    pub async fn drop_database(self) {
        use sqlx::Connection;
        let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await else {
            return;
        };
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

/// A PostgreSQL server of our own (initdb in a temp dir, run as the `postgres` user), so
/// that a test can stop and start it without disturbing the machine's shared one.
/// `None`, with a message, where that cannot be done.
pub struct PrivatePostgres {
    /// Its URL.
    pub url: String,
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// initdb and start a server; `None`, with a message, where that cannot be done.
    pub fn start() -> Option<Self> {
        let skip = |why: &str| {
            eprintln!("SKIPPED: cannot run a private PostgreSQL server here ({why})");
            None
        };
        let Some(bin) = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.flatten().map(|v| v.path().join("bin")).max())
        else {
            return skip("no /usr/lib/postgresql/*/bin");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let chown = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            return skip("cannot hand a directory to the postgres user");
        }
        let data = dir.path().join("data");
        let initdb = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !initdb.is_ok_and(|s| s.success()) {
            return skip("initdb failed");
        }
        let port = crate::free_port();
        let server = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            bin,
            data,
            port,
            _dir: dir,
        };
        server.pg_ctl(&["start"]);
        Some(server)
    }

    fn pg_ctl(&self, action: &[&str]) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-w", "-t", "30", "-m", "fast"])
            .args(action)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action:?} failed");
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        self.pg_ctl(&["stop"]);
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        self.pg_ctl(&["start"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
