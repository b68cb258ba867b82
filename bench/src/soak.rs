//! The soak: one server on a fresh database under a closed loop of pairing requests for
//! minutes, reported per tenth of the time, to show whether throughput, latency or CPU
//! per request drift as the database (and SQLite's WAL) grow; then the grown database
//! against a fresh one, turn about, which the machine's swings cannot tell apart from
//! a decay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use letro_testkit::PgDatabase;
use letro_testkit::load::{LoadReport, MakeRequest, run_until};

use crate::keys::BenchKey;
use crate::sink::CountingSink;
use crate::{Server, cpu_cell, drain, pair_half};

/// Slices the soak is reported in.
const SLICES: u32 = 10;

/// Where the soak runs.
pub(crate) enum SoakDatabase<'a> {
    /// A fresh SQLite file.
    Sqlite(&'a Path),
    /// A fresh PostgreSQL database.
    Postgres(&'a PgDatabase),
}

impl SoakDatabase<'_> {
    /// The tag of its parties' VeraIds and parcel ids: the sink counts matches by
    /// content, so a second soak must not repeat the first one's.
    fn tag(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "soak",
            Self::Postgres(_) => "soak-pg",
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
            Self::Postgres(db) => db.url.clone(),
        }
    }

    /// The section's title and its first words about the database.
    fn described(&self) -> (&'static str, &'static str) {
        match self {
            Self::Sqlite(_) => ("Soak", "a fresh SQLite database (synchronous=full)"),
            Self::Postgres(_) => (
                "Soak on PostgreSQL",
                "a fresh PostgreSQL database on the local server (its own processes' CPU and writes are not the server's, but they share the machine, so they show in the idle share)",
            ),
        }
    }

    /// A fresh database of the same kind beside it, for round `round` of the control,
    /// and what removes it.
    async fn fresh(&self, round: usize) -> anyhow::Result<Fresh> {
        Ok(match self {
            Self::Sqlite(path) => Fresh::Sqlite(
                path.parent()
                    .context("the soak database's directory")?
                    .join(format!("control-{round}.db")),
            ),
            Self::Postgres(db) => Fresh::Postgres(db.sibling("letro_control").await?),
        })
    }

    /// Puts what the soak left in memory on disk, so that its writeback does not land in
    /// the control's first run (a preloaded database's did in the latency rows; issue
    /// 17, stop 36).
    async fn settle(&self) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(path) => {
                for suffix in ["", "-wal"] {
                    let mut file = path.as_os_str().to_owned();
                    file.push(suffix);
                    if let Ok(file) = std::fs::File::open(&file) {
                        file.sync_all()?;
                    }
                }
            }
            Self::Postgres(db) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&db.url).await?;
                sqlx::query("CHECKPOINT").execute(&mut conn).await?;
                let _ = conn.close().await;
            }
        }
        Ok(())
    }

    /// What the database holds now.
    async fn state(&self) -> anyhow::Result<DatabaseState> {
        match self {
            Self::Sqlite(path) => DatabaseState::read_sqlite(path),
            Self::Postgres(db) => DatabaseState::read_postgres(&db.url).await,
        }
    }
}

/// A fresh database for the control, removed by [`Fresh::remove`].
enum Fresh {
    Sqlite(PathBuf),
    Postgres(PgDatabase),
}

impl Fresh {
    fn url(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
            Self::Postgres(db) => db.url.clone(),
        }
    }

    async fn remove(self) {
        match self {
            Self::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            Self::Postgres(db) => db.drop_database().await,
        }
    }
}

/// What the database holds at one moment.
struct DatabaseState {
    file_mib: f64,
    /// SQLite's WAL; PostgreSQL has none of its own to show.
    wal_mib: Option<f64>,
    pending: i64,
    processed_events: i64,
    outbox: i64,
    /// PostgreSQL's churned tables.
    tables: Vec<TableState>,
}

/// One of PostgreSQL's churned tables at one moment.
struct TableState {
    name: String,
    heap_mib: f64,
    indexes_mib: f64,
    /// Row versions dead and not yet vacuumed.
    dead_rows: i64,
    /// VACUUMs so far, the server's and autovacuum's.
    vacuums: i64,
}

impl TableState {
    fn describe(&self) -> String {
        format!(
            "{} {:.1} MiB + {:.1} MiB of indexes, {} dead rows, {} VACUUMs",
            self.name, self.heap_mib, self.indexes_mib, self.dead_rows, self.vacuums
        )
    }
}

impl DatabaseState {
    /// Reads `path` (and its WAL) through a read-only connection beside the server's.
    fn read_sqlite(path: &Path) -> anyhow::Result<Self> {
        let mib = |p: &Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1048576.0);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let table = |name: &str| -> anyhow::Result<bool> {
            Ok(conn.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [name],
                |r| r.get(0),
            )?)
        };
        let count = |name: &str| -> anyhow::Result<i64> {
            // A table an older build lacks (A/B runs against it) holds nothing.
            if !table(name)? {
                return Ok(0);
            }
            Ok(conn.query_row(&format!("SELECT count(*) FROM {name}"), [], |r| r.get(0))?)
        };
        Ok(Self {
            file_mib: mib(path),
            wal_mib: Some(mib(Path::new(&wal))),
            // New requests wait in `pending_recent` before they settle (SQLite schema 8).
            pending: count("pending_requests")? + count("pending_recent")?,
            // Keys in generations of buckets, or not sealed yet (SQLite schema 9).
            processed_events: if table("processed_event_generations")? {
                conn.query_row(letro_server::store::sqlite::COUNT_EVENT_KEYS, [], |r| {
                    r.get(0)
                })?
            } else {
                count("processed_events")?
            },
            outbox: count("outbox")?,
            tables: Vec::new(),
        })
    }

    async fn read_postgres(url: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        // Schema 5 keeps the keys in a table of their own (older builds, for A/B runs:
        // `processed_events`).
        let digests: bool =
            sqlx::query_scalar("SELECT to_regclass('processed_event_keys') IS NOT NULL")
                .fetch_one(&mut conn)
                .await?;
        let events = if digests {
            "processed_event_keys"
        } else {
            "processed_events"
        };
        let (size, pending, processed_events, outbox): (i64, i64, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT pg_database_size(current_database()),
                        (SELECT count(*) FROM pending_requests),
                        (SELECT count(*) FROM {events}),
                        (SELECT count(*) FROM outbox)"
            )))
            .fetch_one(&mut conn)
            .await?;
        // Where the churn leaves dead row versions until a VACUUM, and indexes that do
        // not shrink.
        let tables: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, pg_relation_size(relid), pg_indexes_size(relid), n_dead_tup,
                    vacuum_count + autovacuum_count
             FROM pg_stat_user_tables
             WHERE relname IN ('outbox', 'pending_requests', 'processed_event_keys')
             ORDER BY relname",
        )
        .fetch_all(&mut conn)
        .await?;
        let _ = conn.close().await;
        let mib = |bytes: i64| bytes as f64 / 1048576.0;
        Ok(Self {
            file_mib: mib(size),
            wal_mib: None,
            pending,
            processed_events,
            outbox,
            tables: tables
                .into_iter()
                .map(|(name, heap, indexes, dead_rows, vacuums)| TableState {
                    name,
                    heap_mib: mib(heap),
                    indexes_mib: mib(indexes),
                    dead_rows,
                    vacuums,
                })
                .collect(),
        })
    }

    fn describe(&self) -> String {
        let wal = self
            .wal_mib
            .map(|w| format!(", WAL {w:.1} MiB"))
            .unwrap_or_default();
        let tables = self
            .tables
            .iter()
            .map(TableState::describe)
            .collect::<Vec<_>>();
        let tables = if tables.is_empty() {
            String::new()
        } else {
            format!("; tables: {}", tables.join(", "))
        };
        format!(
            "database {:.1} MiB{wal}; rows: {} pending requests, {} processed-event keys, {} outbox{tables}",
            self.file_mib, self.pending, self.processed_events, self.outbox
        )
    }
}

/// The machine's CPU time so far, from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineCpu {
    idle: u64,
    /// Idle while some task waited for storage.
    iowait: u64,
    /// Taken by the hypervisor for other guests: the machine was slower, not idle.
    steal: u64,
    all: u64,
}

impl MachineCpu {
    /// Shares of the time since `before`: (idle, I/O wait, stolen).
    pub(crate) fn shares_since(self, before: Self) -> (f64, f64, f64) {
        let all = self.all.saturating_sub(before.all).max(1) as f64;
        let share = |now: u64, then: u64| now.saturating_sub(then) as f64 / all;
        (
            share(self.idle, before.idle),
            share(self.iowait, before.iowait),
            share(self.steal, before.steal),
        )
    }
}

pub(crate) fn machine_cpu() -> MachineCpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let tick = |i: usize| ticks.get(i).copied().unwrap_or(0);
    MachineCpu {
        idle: tick(3),
        iowait: tick(4),
        steal: tick(7),
        all: ticks.iter().take(8).sum(),
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which is in parentheses and
/// may hold spaces): state is field 0, majflt 9, utime 11, stime 12. Empty if the file
/// cannot be read; a field that is not a number (state) is 0.
pub(crate) fn stat_fields(pid: &str) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// The benchmark's own CPU time (generator and sink, every thread), from
/// `/proc/self/stat`, in µs: when it grows per request, the server gets less of the
/// machine, and its figures say so.
fn own_cpu_us() -> u64 {
    process_cpu_us("self")
}

/// A process's CPU time so far (user and system, every thread), in µs; 0 once it has
/// gone.
fn process_cpu_us(pid: &str) -> u64 {
    // utime and stime, in clock ticks.
    let fields = stat_fields(pid);
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    // USER_HZ, which Linux fixes at 100 for what it reports to user space.
    ticks * 10_000
}

/// CPU time so far of each PostgreSQL backend connected to the database of `url` (the
/// server's connections; the asking connection left out), by pid.
async fn backends_cpu_us(url: &str) -> anyhow::Result<HashMap<i32, u64>> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(pids
        .into_iter()
        .map(|pid| (pid, process_cpu_us(&pid.to_string())))
        .collect())
}

/// CPU µs the backends of `after` used since `before`, per request: a backend that
/// connected in between counts from its start; one that left in between is not counted.
fn backends_per_request(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>, n: usize) -> f64 {
    let used: u64 = after
        .iter()
        .map(|(pid, cpu)| cpu.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    used as f64 / n.max(1) as f64
}

/// One tenth of the soak.
struct Slice {
    report: LoadReport,
    /// Server CPU µs per request: (all threads, SQLite writer).
    cpu: (f64, f64),
    /// The benchmark's CPU µs per request.
    own: f64,
    /// Shares of the machine idle, idle waiting for I/O, and stolen by the hypervisor
    /// (server, generator and sink share it).
    machine: (f64, f64, f64),
    /// Bytes the server had written to storage, per request.
    written: f64,
    /// Matches delivered by the slice's end, of those the requests answered so far owe.
    delivered: u64,
    owed: u64,
}

/// Runs the soak for `duration` against a fresh server on `db`, and returns its section
/// of the results.
pub(crate) async fn soak(
    binary: &Path,
    db: SoakDatabase<'_>,
    sink: &CountingSink,
    keys: &[BenchKey],
    connections: usize,
    duration: Duration,
) -> anyhow::Result<String> {
    let server = Server::start(binary, &db.url(), sink.addr, &[])?;
    let keys: Arc<Vec<BenchKey>> = Arc::new(keys.to_vec());
    let tag = db.tag();
    let make: MakeRequest = {
        let keys = keys.clone();
        Arc::new(move |n| pair_half(&keys, tag, n, "/"))
    };
    let before = db.state().await?;
    let delivered_before = sink.counts().distinct;
    let start = Instant::now();
    let slice_time = duration / SLICES;
    let mut sent = 0usize;
    let mut slices = Vec::new();
    for k in 1..=SLICES {
        let label = format!("soak {k}/{SLICES}");
        let (cpu_before, machine_before, written_before, own_before) = (
            server.cpu(),
            machine_cpu(),
            server.storage_writes(),
            own_cpu_us(),
        );
        let report = run_until(
            server.addr,
            make.clone(),
            sent,
            start + slice_time * k,
            connections,
            &label,
        )
        .await;
        let n = report.statuses.values().sum::<u64>() + report.failures;
        sent += usize::try_from(n)?;
        // A pair is owed its two matches once both halves were answered.
        let owed = (sent / 2 * 2) as u64;
        let machine = machine_cpu();
        slices.push(Slice {
            cpu: cpu_before.per_request(server.cpu(), usize::try_from(n)?),
            own: own_cpu_us().saturating_sub(own_before) as f64 / n.max(1) as f64,
            machine: machine.shares_since(machine_before),
            written: server.storage_writes().saturating_sub(written_before) as f64
                / n.max(1) as f64,
            delivered: sink.counts().distinct - delivered_before,
            owed,
            report,
        });
    }
    let soaked = start.elapsed();
    let owed = (sent / 2 * 2) as u64;
    let drained = drain(sink, delivered_before + owed)
        .await
        .saturating_duration_since(start);
    let after = db.state().await?;
    let (rss, peak) = server.rss_mib();
    server.stop()?;
    db.settle().await?;
    let control =
        grown_against_fresh(binary, &db, sink, keys, connections, after.processed_events).await?;

    let mut rows = Vec::new();
    for (k, s) in slices.iter().enumerate() {
        rows.push(format!(
            "| {} | {:.0} req/s | {:.2} / {:.2} ms | {} | {:.0} µs | {:.0}% / {:.0}% / {:.0}% | {} | {} of {} |",
            k + 1,
            s.report.throughput(),
            s.report.latency_ms(0.5),
            s.report.latency_ms(0.99),
            cpu_cell(s.cpu),
            s.own,
            100.0 * s.machine.0,
            100.0 * s.machine.1,
            100.0 * s.machine.2,
            match db {
                // PostgreSQL's own processes write, not the server.
                SoakDatabase::Postgres(_) => "—".to_owned(),
                SoakDatabase::Sqlite(_) => format!("{:.1} KiB", s.written / 1024.0),
            },
            s.delivered,
            s.owed,
        ));
    }
    let (first, last) = (&slices[0], &slices[slices.len() - 1]);
    let (title, database) = db.described();
    let server_decay = last.cpu.0 / first.cpu.0.max(1e-9);
    let machine_slowing = last.own / first.own.max(1e-9);
    Ok(format!(
        "## {}\n\n\
         One server on {}, a closed loop of pairing requests over {} connections for {:.0} s, \
         every match delivered to the sink during the load; parcel ids are random-looking UUIDs, as Letro's are. Latency here is the closed loop's (from sending to the answer); \
         idle, I/O wait (idle while a task waited for storage) and stolen (taken by the hypervisor) are the whole machine's (generator and sink included), from /proc/stat; storage writes are the server's `write_bytes` (/proc/<pid>/io).\n\n\
         | Slice | Throughput | Latency p50 / p99 | Server CPU per request | Generator and sink CPU per request | Machine idle / I/O wait / stolen | Written to storage per request | Matches delivered by its end |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n{}\n\n\
         - Last slice vs first: throughput {:.0}% (target >= 90%), p99 {:.2}x (target <= 2x); server CPU per request {:.2}x, the generator's {:.2}x, so {:.2}x once the machine's slowing is taken out (the generator does the same work in every slice, so its figure tracks the machine's speed: a server that decays costs more per request than the machine's slowing explains).\n\
         - {} requests in {:.0} s; the last match delivered {:.1} s after the load began; server RSS {:.0} MiB (peak {:.0}).\n\
         - Start: {}.\n\
         - End: {}.\n{}",
        title,
        database,
        connections,
        soaked.as_secs_f64(),
        rows.join("\n"),
        100.0 * last.report.throughput() / first.report.throughput().max(1e-9),
        last.report.latency_ms(0.99) / first.report.latency_ms(0.99).max(1e-9),
        server_decay,
        machine_slowing,
        server_decay / machine_slowing.max(1e-9),
        sent,
        soaked.as_secs_f64(),
        drained.as_secs_f64(),
        rss,
        peak,
        before.describe(),
        after.describe(),
        control,
    ))
}

/// The control after a soak: [`CONTROL_ROUNDS`] rounds of a closed loop of [`CONTROL_RUN`] on
/// the soaked database and on a fresh one, each by a newly started server.
const CONTROL_RUN: Duration = Duration::from_secs(10);
const CONTROL_ROUNDS: usize = 3;

/// The soak's grown database against a fresh one, alternated on newly started servers:
/// the machine's speed swings over minutes, so a soak's last slice against its first
/// mixes the server's decay with the machine's; two databases measured turn about, in
/// the same minute, do not.
async fn grown_against_fresh(
    binary: &Path,
    grown: &SoakDatabase<'_>,
    sink: &CountingSink,
    keys: Arc<Vec<BenchKey>>,
    connections: usize,
    grown_keys: i64,
) -> anyhow::Result<String> {
    // Per run: throughput, server CPU µs per request, and PostgreSQL's backends' CPU µs
    // per request.
    let mut figures: [Vec<(f64, f64, Option<f64>)>; 2] = [Vec::new(), Vec::new()];
    let mut grown_startup = Vec::new();
    for round in 1..=CONTROL_ROUNDS {
        let fresh = grown.fresh(round).await?;
        // Each goes first in every other round: neither always follows the other.
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for which in order {
            let label = ["grown", "fresh"][which];
            let url = if which == 0 { grown.url() } else { fresh.url() };
            let server = Server::start(binary, &url, sink.addr, &[])?;
            if which == 0 {
                grown_startup.push(server.startup.as_secs_f64() * 1000.0);
            }
            let tag = format!("ctl-{}-{label}{round}", grown.tag());
            let keys = keys.clone();
            let make: MakeRequest = Arc::new(move |n| pair_half(&keys, &tag, n, "/"));
            let delivered_before = sink.counts().distinct;
            let backends_before = match grown {
                SoakDatabase::Postgres(_) => Some(backends_cpu_us(&url).await?),
                SoakDatabase::Sqlite(_) => None,
            };
            let cpu_before = server.cpu();
            let report = run_until(
                server.addr,
                make,
                0,
                Instant::now() + CONTROL_RUN,
                connections,
                &format!("soak control {round}/{CONTROL_ROUNDS}, {label} database"),
            )
            .await;
            let n = usize::try_from(report.statuses.values().sum::<u64>() + report.failures)?;
            drain(sink, delivered_before + (n / 2 * 2) as u64).await;
            let (cpu, _) = cpu_before.per_request(server.cpu(), n);
            let database_cpu = match backends_before {
                Some(before) => Some(backends_per_request(
                    &before,
                    &backends_cpu_us(&url).await?,
                    n,
                )),
                None => None,
            };
            server.stop()?;
            figures[which].push((report.throughput(), cpu, database_cpu));
        }
        fresh.remove().await;
    }
    type Run = (f64, f64, Option<f64>);
    let list = |runs: &[Run]| {
        runs.iter()
            .map(|(rate, cpu, database)| match database {
                Some(database) => {
                    format!("{rate:.0} req/s ({cpu:.0} µs, PostgreSQL's backends {database:.0} µs)")
                }
                None => format!("{rate:.0} req/s ({cpu:.0} µs)"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let total = |runs: &[Run]| runs.iter().map(|(rate, ..)| rate).sum::<f64>();
    let cpu = |runs: &[Run]| {
        runs.iter()
            .map(|(_, cpu, database)| cpu + database.unwrap_or(0.0))
            .sum::<f64>()
            / runs.len().max(1) as f64
    };
    // What the CPU figures count, in the brackets and in the ratio.
    let (counted, together) = match grown {
        SoakDatabase::Sqlite(_) => ("", ""),
        SoakDatabase::Postgres(_) => (
            ", and PostgreSQL's backends serving it (its other processes, the WAL writer and checkpointer, not counted)",
            " (the server's and its backends' together)",
        ),
    };
    Ok(format!(
        "- Grown against fresh, turn about on newly started servers ({CONTROL_ROUNDS} rounds of a {:.0} s closed loop on each, matches drained, server CPU per request in brackets{}): \
         the soaked database ({grown_keys} processed-event keys; startup {}) {}; a fresh database {}. \
         The grown database's throughput is {:.0}% of the fresh one's, its CPU per request {:.2}x{}: the server's own decay as the database grows, with the machine's swings falling on both alike.\n",
        CONTROL_RUN.as_secs_f64(),
        counted,
        grown_startup
            .iter()
            .map(|ms| format!("{ms:.0} ms"))
            .collect::<Vec<_>>()
            .join(", "),
        list(&figures[0]),
        list(&figures[1]),
        100.0 * total(&figures[0]) / total(&figures[1]).max(1e-9),
        cpu(&figures[0]) / cpu(&figures[1]).max(1e-9),
        together,
    ))
}
