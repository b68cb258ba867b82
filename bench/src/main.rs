//! `letro-bench`: runs the real server binary under load and writes a table of figures,
//! each also given as a ratio to a no-op route served by the same server in the same run.
//! `bench/run` builds in release mode and runs it; see README.md.

mod keys;
mod signed;
mod sink;
mod soak;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::keys::{BenchKey, load_or_generate};
use crate::signed::{SignedRequests, SignedWorld};
use crate::sink::CountingSink;
use anyhow::Context;
use clap::Parser;
use letro_server::clock;
use letro_server::codec::pairing::MatchOrder;
use letro_server::domain::{EventKey, PairingRequest, PendingLimits, VeraId, VeraIdDigester};
use letro_server::store::sqlite::{SqliteStore, Synchronous};
use letro_server::store::{PairingSubmission, Store, settings};
use letro_testkit::load::{LoadReport, Pace, render_request, run};
use letro_testkit::{PgDatabase, ServerProcess};

pub(crate) const SERVER_ID: &str =
    "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
/// Users on each side of the cache-warm signed row.
const SIGNED_MEMBERS: usize = 100;
const SECRET_HEX: &str = "62656e63686d61726b2d7365637265742d6b6579";

#[derive(Debug, Parser)]
#[command(about = "Benchmark letro-server: throughput, latency, outbox, large database")]
struct Args {
    /// Where to write the results table.
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: PathBuf,
    /// Requests per throughput measurement.
    #[arg(long, default_value_t = 60_000)]
    requests: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Distinct endpoint keys (cached in target/bench-keys/).
    #[arg(long, default_value_t = 256)]
    keys: usize,
    /// Pending requests to preload for the large-database run (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    preload: usize,
    /// A PostgreSQL server to benchmark too (a database is created and dropped).
    #[arg(long, env = "TEST_DATABASE_URL")]
    postgres: Option<String>,
    /// PostgreSQL connections per server (`--db-max-connections`) [default: the server's].
    #[arg(long)]
    pg_connections: Option<u32>,
    /// Replica counts of the closed-loop PostgreSQL rows: each runs that many servers on
    /// one fresh database, the two halves of a pair sent to different replicas (0:
    /// none).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pg_replicas: Vec<usize>,
    /// The server binary [default: letro-server next to this one].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Signed requests whose organisation is remembered (one organisation, new members);
    /// 0 skips the signed rows.
    #[arg(long, default_value_t = 10_000)]
    signed_requests: usize,
    /// Seconds of the soak: a closed loop on a fresh SQLite database, reported per tenth
    /// (0 skips it).
    #[arg(long, default_value_t = 300)]
    soak: u64,
    /// Requests per second of a database's open loop, instead of half its closed-loop
    /// throughput: builds of different speed compared at one load.
    #[arg(long)]
    open_rate: Option<f64>,
    /// Soak PostgreSQL too (`--postgres`), as long, on a fresh database, after SQLite's.
    #[arg(long, requires = "postgres")]
    soak_postgres: bool,
    /// Signed requests each from an organisation of its own.
    #[arg(long, default_value_t = 2_000)]
    signed_new_organisation_requests: usize,
    /// Keep the preloaded database here and, when it is already there, start the
    /// large-database run from a copy of it instead of preloading again (for A/B runs of
    /// that row; the file must come from a run with the same `--preload` and `--keys`).
    #[arg(long)]
    preloaded: Option<PathBuf>,
    /// Open loops at the same rate on the empty SQLite database, one after another, the
    /// table's row being the first: whether p99 stays under 10 ms in every run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    latency_runs: u64,
}

/// Server CPU time, all threads and the SQLite writer's share.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTime {
    total: Duration,
    writer: Duration,
}

impl CpuTime {
    /// Microseconds per request between `self` and `later`: (all threads, writer).
    fn per_request(self, later: CpuTime, requests: usize) -> (f64, f64) {
        let n = requests.max(1) as f64;
        (
            later.total.saturating_sub(self.total).as_secs_f64() * 1e6 / n,
            later.writer.saturating_sub(self.writer).as_secs_f64() * 1e6 / n,
        )
    }
}

/// The server under test, as a child process.
struct Server {
    process: ServerProcess,
    addr: SocketAddr,
    startup: Duration,
}

impl Server {
    fn start(
        binary: &Path,
        database: &str,
        sink: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let sink = format!("http://{sink}/");
        let mut args = vec!["--database", database, "--sink", &sink];
        args.extend(["--veraid-secret", SECRET_HEX, "--bench-noop-route"]);
        // No per-sender cap: a few hundred keys stand for many users here.
        args.extend(["--max-pending-per-sender", "4294967295"]);
        // The large-database row waits with a million requests and more.
        args.extend(["--max-pending-requests", "0"]);
        args.extend(extra.iter().map(String::as_str));
        let process = ServerProcess::launch(binary, &args, Duration::from_secs(60))
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            addr: process.addr,
            startup: process.startup,
            process,
        })
    }

    /// (current, peak) resident set size in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let (rss, peak) = self.process.rss_kib();
        (rss as f64 / 1024.0, peak as f64 / 1024.0)
    }

    /// CPU time the server has used so far, from the scheduler's per-thread counters
    /// (nanoseconds, no tick rounding): (all live threads, the SQLite writer thread).
    /// Less at the mercy of a noisy machine than throughput, so optimisations are
    /// compared by it.
    fn cpu(&self) -> CpuTime {
        let mut cpu = CpuTime::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.process.pid())) else {
            return cpu;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            cpu.total += Duration::from_nanos(ns);
            if name.trim() == "sqlite-writer" {
                cpu.writer += Duration::from_nanos(ns);
            }
        }
        cpu
    }

    /// Bytes the server has had written to storage so far (`write_bytes` of
    /// `/proc/<pid>/io`: WAL frames, checkpoints, the database file).
    fn storage_writes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/io", self.process.pid()))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Major page faults of the server so far (`majflt` of `/proc/<pid>/stat`): pages it
    /// had to wait for the disk for, its code or the database's, dropped from memory
    /// since it last touched them.
    fn major_faults(&self) -> Option<u64> {
        soak::stat_fields(&self.process.pid().to_string())
            .get(9)
            .copied()
    }

    fn stop(self) -> anyhow::Result<()> {
        self.process.stop()?;
        Ok(())
    }

    /// Stops a PostgreSQL server and returns what its store says it cost the database
    /// over its life (the line it logs on closing): (transactions, round trips); `None`
    /// from a server that logs no such line (an older build).
    fn stop_counting(self) -> anyhow::Result<Option<(u64, u64)>> {
        let pid = self.process.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let counts = loop {
            let log = self.process.recent_log();
            if let Some(line) = log.lines().find(|l| l.contains("PostgreSQL store closed")) {
                break json_number(line, "transactions").zip(json_number(line, "round_trips"));
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.stop()?;
        Ok(counts)
    }
}

/// The number after `"key":` in a JSON log line.
fn json_number(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Request `n` of a run named after `tag`, rendered for `path`: the first (`n` even) or
/// second half of pair `n / 2`, `a{i}` and `b{i}` asking for each other.
fn pair_half(keys: &[BenchKey], tag: &str, n: usize, path: &str) -> Vec<u8> {
    let i = n / 2;
    let (a, b) = (
        format!("a{i}@{tag}.bench.test"),
        format!("b{i}@{tag}.bench.test"),
    );
    let key = &keys[n % keys.len()];
    let (half, requester, target) = if n.is_multiple_of(2) {
        ("A", a, b)
    } else {
        ("B", b, a)
    };
    render_request(
        path,
        key.id.as_str(),
        &parcel_id(&format!("{tag}-{half}{i}")),
        SERVER_ID,
        &format!("{requester},{target},{}", key.spki_b64),
    )
}

/// A parcel id as Letro makes them, a random-looking UUID (version 4 layout), derived
/// from `name` so that a run is repeatable. Ids in arrival order would sit side by side
/// in the server's index of processed events; real ones land all over it.
fn parcel_id(name: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Both halves of `pairs` pairs named after `tag`, rendered for `path`.
fn pair_requests(
    keys: &[BenchKey],
    tag: &str,
    pairs: std::ops::Range<usize>,
    path: &str,
) -> Vec<Vec<u8>> {
    (2 * pairs.start..2 * pairs.end)
        .map(|n| pair_half(keys, tag, n, path))
        .collect()
}

/// Checks every party of every pair got exactly one match.
fn all_matched(sink: &CountingSink, tag: &str, pairs: std::ops::Range<usize>) -> bool {
    pairs.into_iter().all(|i| {
        let (a, b) = (
            format!("a{i}@{tag}.bench.test"),
            format!("b{i}@{tag}.bench.test"),
        );
        sink.matched_once(&a, &b) && sink.matched_once(&b, &a)
    })
}

/// Where an open loop's tail came from: its slowest second, how many seconds had a
/// request over the 10 ms target, and how late the generator itself sent requests.
fn worst_second(open: &LoadReport) -> String {
    let Some((second, ms)) = open.worst_second() else {
        return "open loop: no answers".to_owned();
    };
    let (over, seconds) = open.seconds_slower_than(10.0);
    format!(
        "open loop's slowest request {ms:.1} ms (due in second {}), requests over 10 ms in {over} of {seconds} seconds; {}",
        second + 1,
        send_lag(open)
    )
}

/// How late the generator sent the open loop's requests: part of their latency that is
/// not the server's.
fn send_lag(open: &LoadReport) -> String {
    format!(
        "the generator sent requests {:.2} / {:.2} ms (p50 / p99) after they were due",
        open.send_lag_ms(0.5),
        open.send_lag_ms(0.99)
    )
}

fn cpu_cell((total, writer): (f64, f64)) -> String {
    if writer > 0.0 {
        format!("{total:.0} µs (SQLite writer {writer:.0} µs)")
    } else {
        format!("{total:.0} µs")
    }
}

fn ok_share(report: &LoadReport) -> String {
    let answered: u64 = report.statuses.values().sum();
    let ok = report.statuses.get(&204).copied().unwrap_or(0);
    if ok == answered && report.failures == 0 {
        "all 204".to_owned()
    } else {
        format!("{:?}, {} failed", report.statuses, report.failures)
    }
}

/// A throughput row, a latency row, and what the outbox did, for one database.
struct BackendFigures {
    name: String,
    closed: LoadReport,
    open: OpenLoop,
    delivered_within_load: u64,
    delivery_rate: f64,
    exact: bool,
    rss: (f64, f64),
    /// Server CPU µs per request over the closed loop and the outbox drain that follows
    /// (so it includes delivering the matches): (all threads, SQLite writer).
    cpu: (f64, f64),
}

/// One open loop at a fixed rate, with what tells the server's part of its tail from
/// the machine's.
struct OpenLoop {
    report: LoadReport,
    rate: f64,
    /// Server CPU µs per request over the open loop and its drain: at a moderate load,
    /// batches are small and each costs more per request.
    cpu: (f64, f64),
    /// Share of the machine's CPU time busy over the open loop (all processes: the
    /// server, the generator and sink, the kernel's I/O threads).
    busy: f64,
    /// The server's major page faults over the open loop.
    major_faults: Option<u64>,
    /// Share of the open loop's requests that the server itself took over 8 ms to
    /// answer, by its own histogram (`letro_request_duration_seconds`, whose buckets
    /// double: 8 ms is the one below the 10 ms target): what of the tail is the server's,
    /// not the generator's or the kernel's.
    server_over_8ms: Option<f64>,
    /// The SQLite writer's time on disk over the open loop.
    disk: Option<DiskFigures>,
}

/// The SQLite writer's steps on disk over an open loop, by its own timing
/// (`letro_sqlite_disk_duration_seconds`): a request waits for the commit under way and
/// then its own, so a commit or checkpoint over 4 ms is what can take one past 8 ms.
struct DiskFigures {
    commits: f64,
    commits_over_4ms: f64,
    checkpoints: f64,
    checkpoints_over_4ms: f64,
}

impl DiskFigures {
    fn note(&self) -> String {
        format!(
            "commits over 4 ms {:.2}% of {:.0}, checkpoints {:.0} ({:.0} over 4 ms)",
            100.0 * self.commits_over_4ms / self.commits.max(1.0),
            self.commits,
            self.checkpoints,
            self.checkpoints_over_4ms,
        )
    }
}

/// One scrape's counts of what [`OpenLoop`] tells apart: 204 answers (all, within 8 ms),
/// the writer's commits and checkpoints (all, within 4 ms).
#[derive(Clone, Copy)]
struct ServerTiming {
    answers: (f64, f64),
    commits: Option<(f64, f64)>,
    checkpoints: Option<(f64, f64)>,
}

impl ServerTiming {
    /// From one scrape of `/metrics`; none if the answers' lines are missing (a renamed
    /// metric or bucket must not read as every request slow).
    async fn scrape(server: &Server) -> Option<Self> {
        let text = scrape(server).await.ok()?;
        let pair =
            |count: &str, within: &str| Some((sample(&text, count)?, sample(&text, within)?));
        Some(Self {
            answers: pair(
                "letro_request_duration_seconds_count{status=\"204\"}",
                "letro_request_duration_seconds_bucket{le=\"0.008\",status=\"204\"}",
            )?,
            commits: pair(
                "letro_sqlite_disk_duration_seconds_count{step=\"commit\"}",
                "letro_sqlite_disk_duration_seconds_bucket{le=\"0.004\",step=\"commit\"}",
            ),
            checkpoints: pair(
                "letro_sqlite_disk_duration_seconds_count{step=\"checkpoint\"}",
                "letro_sqlite_disk_duration_seconds_bucket{le=\"0.004\",step=\"checkpoint\"}",
            ),
        })
    }

    /// The share of answers over 8 ms since `before`, in percent.
    fn over_8ms_since(&self, before: &Self) -> Option<f64> {
        let (answered, over) = since(self.answers, before.answers);
        (answered > 0.0).then(|| 100.0 * over / answered)
    }

    /// The writer's steps on disk since `before`; none where there are none (PostgreSQL).
    fn disk_since(&self, before: &Self) -> Option<DiskFigures> {
        let between = |now: Option<(f64, f64)>, then: Option<(f64, f64)>| {
            now.zip(then).map(|(now, then)| since(now, then))
        };
        let (commits, commits_over_4ms) = between(self.commits, before.commits)?;
        let (checkpoints, checkpoints_over_4ms) =
            between(self.checkpoints, before.checkpoints).unwrap_or((0.0, 0.0));
        (commits > 0.0).then_some(DiskFigures {
            commits,
            commits_over_4ms,
            checkpoints,
            checkpoints_over_4ms,
        })
    }
}

/// Between two scrapes of a histogram's (count, count within a bucket): how many were
/// observed, and how many of those over the bucket.
fn since(now: (f64, f64), then: (f64, f64)) -> (f64, f64) {
    let all = now.0 - then.0;
    (all, all - (now.1 - then.1))
}

/// The empty SQLite database's open loops one after another: each one's p99 and what
/// tells the server's part of it from the machine's.
fn latency_runs_note<'a>(runs: impl Iterator<Item = &'a OpenLoop>) -> String {
    let runs: Vec<_> = runs.collect();
    let under = runs
        .iter()
        .filter(|r| r.report.latency_ms(0.99) < 10.0)
        .count();
    let each = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{}. {:.2} ms (generator {:.2} ms late at p99{}{})",
                i + 1,
                r.report.latency_ms(0.99),
                r.report.send_lag_ms(0.99),
                r.server_over_8ms
                    .map(|share| format!(", server over 8 ms {share:.2}%"))
                    .unwrap_or_default(),
                r.disk
                    .as_ref()
                    .map(|disk| format!(", {}", disk.note()))
                    .unwrap_or_default(),
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "SQLite p99 at half load in {} open loops one after another on the same server (the table's row is the first), \
         {under} of them under 10 ms: {each}. How late the generator sent is in each p99 and is not the server's; the share over 8 ms is by the server's own timing, and so are the SQLite writer's commits (each one's log write and sync) and checkpoints.",
        runs.len(),
    )
}

/// "; by its own timing the server took over 8 ms for X% of `requests`" and what its
/// SQLite writer's time on disk was, as far as they were measured.
fn server_timing_note(open: &OpenLoop, requests: &str) -> String {
    let over_8ms = open
        .server_over_8ms
        .map(|share| {
            format!("; by its own timing the server took over 8 ms for {share:.2}% of {requests}")
        })
        .unwrap_or_default();
    let disk = open
        .disk
        .as_ref()
        .map(|disk| format!("; the SQLite writer's {}", disk.note()))
        .unwrap_or_default();
    format!("{over_8ms}{disk}")
}

async fn measure_backend(
    name: &str,
    server: &Server,
    sink: &CountingSink,
    keys: &[BenchKey],
    args: &Args,
    tag: &str,
) -> anyhow::Result<BackendFigures> {
    let pairs = args.requests / 2;
    let before = sink.counts().distinct;
    let requests = Arc::new(pair_requests(keys, tag, 0..pairs, "/"));
    eprintln!("{name}: closed loop, {} requests", requests.len());
    let load_start = Instant::now();
    let cpu_before = server.cpu();
    let closed = run(server.addr, requests, args.connections, Pace::Closed, name).await;
    let delivered_within_load = sink.counts().distinct - before;
    let drained_at = drain(sink, before + 2 * pairs as u64).await;
    let cpu = cpu_before.per_request(server.cpu(), 2 * pairs);
    let delivery_rate = (2 * pairs) as f64
        / drained_at
            .duration_since(load_start)
            .as_secs_f64()
            .max(1e-9);
    let exact = all_matched(sink, tag, 0..pairs) && sink.counts().conflicting == 0;

    let open_rate = args.open_rate.unwrap_or(closed.throughput() / 2.0).max(1.0);
    let open = open_loop(
        name,
        server,
        sink,
        keys,
        args,
        &format!("{tag}o"),
        open_rate,
    )
    .await;
    Ok(BackendFigures {
        name: name.to_owned(),
        closed,
        open,
        delivered_within_load,
        delivery_rate,
        exact,
        rss: server.rss_mib(),
        cpu,
    })
}

/// Ten seconds of pairing requests at `rate` (at least 1,000, at most `--requests`),
/// then the drain of their matches.
async fn open_loop(
    name: &str,
    server: &Server,
    sink: &CountingSink,
    keys: &[BenchKey],
    args: &Args,
    tag: &str,
    rate: f64,
) -> OpenLoop {
    let pairs = ((rate * 10.0) as usize / 2).clamp(500, args.requests / 2);
    let requests = Arc::new(pair_requests(keys, tag, 0..pairs, "/"));
    eprintln!(
        "{name}: open loop at {rate:.0} req/s, {} requests",
        requests.len()
    );
    let sink_before = sink.counts().distinct;
    let cpu_before = server.cpu();
    let timing_before = ServerTiming::scrape(server).await;
    let machine_before = soak::machine_cpu();
    let faults_before = server.major_faults();
    let report = run(
        server.addr,
        requests,
        args.connections,
        Pace::Open { rate },
        name,
    )
    .await;
    let (idle, iowait, _) = soak::machine_cpu().shares_since(machine_before);
    let major_faults = server
        .major_faults()
        .zip(faults_before)
        .map(|(after, before)| after.saturating_sub(before));
    drain(sink, sink_before + 2 * pairs as u64).await;
    let timing = timing_before.zip(ServerTiming::scrape(server).await);
    let server_over_8ms = timing.and_then(|(before, after)| after.over_8ms_since(&before));
    let disk = timing.and_then(|(before, after)| after.disk_since(&before));
    OpenLoop {
        cpu: cpu_before.per_request(server.cpu(), 2 * pairs),
        report,
        rate,
        busy: 100.0 * (1.0 - idle - iowait).max(0.0),
        major_faults,
        server_over_8ms,
        disk,
    }
}

/// A closed loop on several replicas sharing one PostgreSQL database.
struct ReplicaFigures {
    replicas: usize,
    throughput: f64,
    closed: Vec<LoadReport>,
    exact: bool,
    /// Server CPU µs per request, all replicas, over the closed loop and the drain.
    cpu: f64,
    /// Per request, over the replicas' whole lives: transactions as the servers count
    /// them, as PostgreSQL counts them, and round trips as the servers count them.
    transactions: Option<f64>,
    pg_transactions: f64,
    round_trips: Option<f64>,
}

/// Starts `replicas` servers on a fresh database of `url` and sends them a closed loop,
/// request `n` to replica `n % replicas` (so the two halves of a pair reach different
/// replicas), `connections` shared among them.
async fn measure_replicas(
    url: &str,
    binary: &Path,
    sink: &CountingSink,
    keys: &[BenchKey],
    args: &Args,
    replicas: usize,
) -> anyhow::Result<ReplicaFigures> {
    let db = PgDatabase::create_on(url, "letro_bench").await?;
    let pg_before = db.transactions().await?;
    let mut extra: Vec<String> = args
        .pg_connections
        .map(|n| vec!["--db-max-connections".into(), n.to_string()])
        .unwrap_or_default();
    // The replicas share the machine's cores: a smaller outbox concurrency each keeps
    // the total the single server's.
    extra.extend([
        "--delivery-concurrency".to_owned(),
        (256 / replicas).max(1).to_string(),
    ]);
    let servers = (0..replicas)
        .map(|_| Server::start(binary, &db.url, sink.addr, &extra))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tag = format!("r{replicas}");
    let pairs = args.requests / 2;
    let all = pair_requests(keys, &tag, 0..pairs, "/");
    let total = all.len();
    let mut shares = vec![Vec::new(); replicas];
    for (n, request) in all.into_iter().enumerate() {
        shares[n % replicas].push(request);
    }
    let name = format!("PostgreSQL, {replicas} replica(s)");
    eprintln!("{name}: closed loop, {total} requests");
    let before = sink.counts().distinct;
    let cpu_before: Vec<CpuTime> = servers.iter().map(Server::cpu).collect();
    let started = Instant::now();
    let connections = (args.connections / replicas).max(1);
    let mut loads = tokio::task::JoinSet::new();
    for (server, share) in servers.iter().zip(shares) {
        let (addr, name) = (server.addr, name.clone());
        loads.spawn(
            async move { run(addr, Arc::new(share), connections, Pace::Closed, &name).await },
        );
    }
    let mut closed = Vec::with_capacity(replicas);
    while let Some(report) = loads.join_next().await {
        closed.push(report?);
    }
    let answered: u64 = closed
        .iter()
        .map(|r| r.statuses.values().sum::<u64>())
        .sum();
    let throughput = answered as f64 / started.elapsed().as_secs_f64().max(1e-9);
    drain(sink, before + total as u64).await;
    let cpu: f64 = servers
        .iter()
        .zip(cpu_before)
        .map(|(s, before)| before.per_request(s.cpu(), total).0)
        .sum();
    let exact = all_matched(sink, &tag, 0..pairs) && sink.counts().conflicting == 0;
    let mut counted = Some((0, 0));
    for server in servers {
        let counts = server.stop_counting()?;
        counted = counted
            .zip(counts)
            .map(|((t, r), (dt, dr))| (t + dt, r + dr));
    }
    // The replicas' backends have exited, and so reported every transaction.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pg_transactions = db.transactions().await? - pg_before;
    db.drop_database().await;
    let per = |n: f64| n / total.max(1) as f64;
    Ok(ReplicaFigures {
        replicas,
        throughput,
        closed,
        exact,
        cpu,
        transactions: counted.map(|(t, _)| per(t as f64)),
        pg_transactions: per(pg_transactions as f64),
        round_trips: counted.map(|(_, r)| per(r as f64)),
    })
}

/// Waits (5 minutes at most) until the sink has `expected` distinct messages; returns
/// when the last one arrived.
async fn drain(sink: &CountingSink, expected: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(300);
    while sink.counts().distinct < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.last_delivery().unwrap_or_else(Instant::now)
}

/// A closed-loop run of signed requests: throughput, server CPU per request (bundles
/// forwarded included), whether every bundle reached its recipient exactly once.
struct SignedFigures {
    closed: LoadReport,
    cpu: (f64, f64),
    exact: bool,
}

async fn measure_signed(
    name: &str,
    server: &Server,
    sink: &CountingSink,
    signed: &SignedRequests,
    connections: usize,
) -> SignedFigures {
    let before = sink.counts().distinct;
    let n = signed.requests.len();
    eprintln!("{name}: closed loop, {n} requests");
    let cpu_before = server.cpu();
    let closed = run(
        server.addr,
        Arc::new(signed.requests.clone()),
        connections,
        Pace::Closed,
        name,
    )
    .await;
    drain(sink, before + n as u64).await;
    let cpu = cpu_before.per_request(server.cpu(), n);
    SignedFigures {
        closed,
        cpu,
        exact: signed.all_forwarded(sink) && sink.counts().conflicting == 0,
    }
}

/// The server's `/metrics` text.
async fn scrape(server: &Server) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{}/metrics", server.addr))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// A sample's value in a scrape, if its line is there.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// A counter's value in the server's `/metrics` (0 when absent).
async fn metric(server: &Server, name: &str) -> anyhow::Result<f64> {
    Ok(sample(&scrape(server).await?, name).unwrap_or(0.0))
}

/// Stores `count` first halves straight through the store, as a long-running server
/// would have accumulated them.
async fn preload(path: &Path, keys: &[BenchKey], count: usize) -> anyhow::Result<()> {
    let sqlite = Arc::new(SqliteStore::open(path, Synchronous::Normal, clock::now())?);
    let store: Arc<dyn Store> = sqlite.clone();
    let secret = hex::decode(SECRET_HEX)?;
    store
        .setting_or_insert(settings::VERAID_SECRET, secret.clone())
        .await?;
    let digester = VeraIdDigester::new(&secret);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        if tasks.len() >= 2048
            && let Some(done) = tasks.join_next().await
        {
            done??;
        }
        if i % 100_000 == 0 && i > 0 {
            eprintln!(
                "  preload: {i}/{count} ({:.0}/s)",
                i as f64 / started.elapsed().as_secs_f64()
            );
        }
        let key = &keys[i % keys.len()];
        let der =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key.spki_b64)?;
        let request = PairingRequest::new(
            VeraId::parse(&format!("p{i}@pre.bench.test"))?,
            VeraId::parse(&format!("q{i}@pre.bench.test"))?,
            der,
            key.id.as_str(),
        )
        .map_err(|r| anyhow::anyhow!("preload request refused: {r}"))?;
        let now = clock::now();
        let submission = PairingSubmission {
            event: EventKey {
                source: key.id.as_str().to_owned(),
                id: parcel_id(&format!("pre-{i}")),
            },
            server_id: SERVER_ID.to_owned(),
            requester_digest: digester.digest(&request.requester),
            target_digest: digester.digest(&request.target),
            request,
            now,
            request_expiry: now.plus(Duration::from_secs(90 * 86_400)),
            message_expiry: now.plus(Duration::from_secs(90 * 86_400)),
            limits: PendingLimits {
                per_sender: u32::MAX,
                per_target: 100,
                refuse_endpoint_replacement: false,
            },
            at_ceiling: false,
            match_order: MatchOrder::ContactFirst,
        };
        let store = store.clone();
        tasks.spawn(async move {
            match store.submit_pairing_request(submission).await? {
                letro_server::store::PairingOutcome::Stored { .. } => Ok(()),
                other => Err(anyhow::anyhow!("preload: {other:?}")),
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    // As a server leaves requests that waited more than a minute: settled, none recent.
    sqlite.settle_pending().await?;
    store.close().await;
    Ok(())
}

/// The commit measured, marked `-dirty` when the work tree has changes.
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{commit}-dirty"),
        _ => commit,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    letro_server::outbox::sink::install_crypto_provider();
    let args = Args::parse();
    let binary = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .join("letro-server"),
    };
    let keys = load_or_generate(
        Path::new(&format!("target/bench-keys/rsa2048-{}.txt", args.keys)),
        args.keys,
    )?;
    let sink = CountingSink::start().await?;
    let dir = tempfile::tempdir()?;
    let mut table = Vec::new();
    let mut notes = Vec::new();

    // Signed requests are made before any server runs: signing is slow, and its CPU
    // would be the server's competition.
    let anchors = dir.path().join("veraid-anchors.zone");
    let signed = if args.signed_requests > 0 {
        eprintln!(
            "signing {} + {} pairing requests",
            args.signed_requests, args.signed_new_organisation_requests
        );
        let mut world = SignedWorld::new();
        world.write_anchors(&anchors)?;
        Some([
            world.returning_members(&keys, "sr", args.signed_requests / 2, SIGNED_MEMBERS),
            world.one_organisation(&keys, "sw", args.signed_requests / 2),
            world.new_organisations(&keys, "sn", args.signed_new_organisation_requests / 2),
        ])
    } else {
        None
    };

    // SQLite, durable (fsync before every 204), and the no-op ceiling on the same server.
    let db = dir.path().join("bench.db");
    let anchors_flag = [
        "--veraid-trust-anchors".to_owned(),
        anchors.display().to_string(),
    ];
    let server = Server::start(
        &binary,
        &format!("sqlite://{}", db.display()),
        sink.addr,
        if signed.is_some() { &anchors_flag } else { &[] },
    )?;
    let empty_startup = server.startup;
    let warm = Arc::new(pair_requests(&keys, "warm", 0..1000, "/noop"));
    run(server.addr, warm, args.connections, Pace::Closed, "warm-up").await;
    let noop_requests = Arc::new(pair_requests(&keys, "noop", 0..args.requests / 2, "/noop"));
    eprintln!(
        "ceiling: closed loop on POST /noop, {} requests",
        noop_requests.len()
    );
    let cpu_before = server.cpu();
    let ceiling = run(
        server.addr,
        noop_requests,
        args.connections,
        Pace::Closed,
        "no-op",
    )
    .await;
    let (noop_cpu, _) = cpu_before.per_request(server.cpu(), args.requests / 2 * 2);
    let noop_open_rate = ceiling.throughput() / 2.0;
    let noop_open = run(
        server.addr,
        Arc::new(pair_requests(
            &keys,
            "noopo",
            0..((noop_open_rate * 10.0) as usize / 2).max(500),
            "/noop",
        )),
        args.connections,
        Pace::Open {
            rate: noop_open_rate,
        },
        "no-op open",
    )
    .await;
    let sqlite = measure_backend(
        "SQLite (synchronous=full)",
        &server,
        &sink,
        &keys,
        &args,
        "s",
    )
    .await?;
    let mut repeats = Vec::new();
    for run in 2..=args.latency_runs {
        let name = format!("SQLite open loop {run} of {}", args.latency_runs);
        repeats.push(
            open_loop(
                &name,
                &server,
                &sink,
                &keys,
                &args,
                &format!("s{run}o"),
                sqlite.open.rate,
            )
            .await,
        );
    }
    if !repeats.is_empty() {
        notes.push(latency_runs_note(
            std::iter::once(&sqlite.open).chain(&repeats),
        ));
    }
    let mut signed_rows = Vec::new();
    if let Some([returning, warm, cold]) = &signed {
        for (label, requests) in [
            (
                format!(
                    "signed, cache warm: one organisation, {} users signing ~{} requests each",
                    2 * SIGNED_MEMBERS,
                    args.signed_requests.div_ceil(2 * SIGNED_MEMBERS)
                ),
                returning,
            ),
            (
                "signed, organisation remembered, every user new (member certificate checked)"
                    .to_owned(),
                warm,
            ),
            (
                "signed, each request from a new organisation".to_owned(),
                cold,
            ),
        ] {
            let f = measure_signed(&label, &server, &sink, requests, args.connections).await;
            signed_rows.push((label, f));
        }
        let hits = metric(&server, "letro_veraid_verified_total{cache=\"hit\"}").await?;
        let misses = metric(&server, "letro_veraid_verified_total{cache=\"miss\"}").await?;
        notes.push(format!(
            "Signed requests: bundles made with the `veraid` crate's mock hierarchy (RSA-2048 organisation and member keys, \
             Ed25519 DNSSEC), ~{} octets each; the server verified {hits:.0} with the organisation remembered and {misses:.0} without. \
             A request whose member certificate is not remembered checks one RSA signature more than the CMS signature every request needs.",
            warm.requests.first().map_or(0, Vec::len),
        ));
    }
    server.stop()?;

    table.push(format!(
        "| no-op route (ceiling) | {:.0} req/s | 100% | {:.2} / {:.2} / {:.2} ms at {:.0} req/s | — | {:.0} µs | {}; {} |",
        ceiling.throughput(),
        noop_open.latency_ms(0.5),
        noop_open.latency_ms(0.99),
        noop_open.latency_ms(0.999),
        noop_open_rate,
        noop_cpu,
        ok_share(&ceiling),
        send_lag(&noop_open),
    ));
    let mut backends = vec![sqlite];
    let mut replica_rows = Vec::new();

    // PostgreSQL on a fresh database.
    if let Some(url) = &args.postgres {
        let db = PgDatabase::create_on(url, "letro_bench").await?;
        let extra: Vec<String> = args
            .pg_connections
            .map(|n| vec!["--db-max-connections".into(), n.to_string()])
            .unwrap_or_default();
        let server = Server::start(&binary, &db.url, sink.addr, &extra)?;
        let pg_name = format!(
            "PostgreSQL (local, {} connections)",
            args.pg_connections
                .unwrap_or(letro_server::config::defaults::DB_MAX_CONNECTIONS)
        );
        let figures = measure_backend(&pg_name, &server, &sink, &keys, &args, "pg").await;
        server.stop()?;
        db.drop_database().await;
        backends.push(figures?);
        for &replicas in args.pg_replicas.iter().filter(|r| **r > 0) {
            replica_rows.push(measure_replicas(url, &binary, &sink, &keys, &args, replicas).await?);
        }
    } else {
        notes.push("PostgreSQL: skipped (no --postgres / TEST_DATABASE_URL).".to_owned());
    }

    for b in &backends {
        table.push(format!(
            "| {} | {:.0} req/s | {:.0}% | {:.2} / {:.2} / {:.2} ms at {:.0} req/s | {:.0} msg/s ({} of {} delivered during the load) | {} | {}; matches exact: {}; server RSS {:.0} MiB (peak {:.0}); {}; server CPU per request in the open loop {}, the machine {:.0}% busy{}{} |",
            b.name,
            b.closed.throughput(),
            100.0 * b.closed.throughput() / ceiling.throughput(),
            b.open.report.latency_ms(0.5),
            b.open.report.latency_ms(0.99),
            b.open.report.latency_ms(0.999),
            b.open.rate,
            b.delivery_rate,
            b.delivered_within_load,
            args.requests / 2 * 2,
            cpu_cell(b.cpu),
            ok_share(&b.closed),
            if b.exact { "yes" } else { "NO" },
            b.rss.0,
            b.rss.1,
            worst_second(&b.open.report),
            cpu_cell(b.open.cpu),
            b.open.busy,
            b.open.major_faults
                .map(|n| format!(", {n} major page faults in the server"))
                .unwrap_or_default(),
            server_timing_note(&b.open, "the open loop's requests"),
        ));
    }

    for r in &replica_rows {
        let ok = r.closed.iter().all(|c| ok_share(c) == "all 204");
        table.push(format!(
            "| PostgreSQL, {} replica(s) on one database, closed loop only | {:.0} req/s ({:.2}x SQLite) | {:.0}% | — | — | {:.0} µs (all replicas) | {}; matches exact: {}; per request: {} transactions ({:.3} as PostgreSQL counts them), {} round trips |",
            r.replicas,
            r.throughput,
            r.throughput / backends[0].closed.throughput().max(1e-9),
            100.0 * r.throughput / ceiling.throughput(),
            r.cpu,
            if ok { "all 204".to_owned() } else { r.closed.iter().map(ok_share).collect::<Vec<_>>().join(" / ") },
            if r.exact { "yes" } else { "NO" },
            r.transactions.map_or("?".to_owned(), |t| format!("{t:.3}")),
            r.pg_transactions,
            r.round_trips.map_or("?".to_owned(), |t| format!("{t:.3}")),
        ));
    }
    if !replica_rows.is_empty() {
        notes.push(
            "PostgreSQL replica rows: each on a fresh database, the two halves of every pair sent to different replicas, the connections shared among them; \
             transactions and round trips are over the replicas' whole lives (start, load, drain, stop) per request of the load, as each server's store counts them \
             (a statement on its own is a transaction and a round trip; a batch is `BEGIN`, three statements and `COMMIT`) and as `pg_stat_database` counts them (xact_commit + xact_rollback)."
                .to_owned(),
        );
    }
    for (label, f) in &signed_rows {
        table.push(format!(
            "| {label} (SQLite) | {:.0} req/s | {:.0}% | — | — | {} = {:.2}x a tmp request | {}; bundles forwarded exact: {} |",
            f.closed.throughput(),
            100.0 * f.closed.throughput() / ceiling.throughput(),
            cpu_cell(f.cpu),
            f.cpu.0 / backends[0].cpu.0.max(1e-9),
            ok_share(&f.closed),
            if f.exact { "yes" } else { "NO" },
        ));
    }

    // A large database: `preload` pending requests, then the same closed-loop run.
    if args.preload > 0 {
        let big = dir.path().join("big.db");
        eprintln!("preloading {} pending requests", args.preload);
        let started = Instant::now();
        match &args.preloaded {
            Some(kept) if kept.exists() => {
                eprintln!("  from a copy of {}", kept.display());
                std::fs::copy(kept, &big)?;
            }
            kept => {
                preload(&big, &keys, args.preload).await?;
                if let Some(kept) = kept {
                    std::fs::copy(&big, kept)?;
                }
            }
        }
        // Written without syncs: on disk before the server starts, or the kernel's
        // writeback of those hundreds of megabytes lands in the measurements that follow
        // and every fsync waits behind it (the p99 at half load of the empty database's
        // row, run next in an A/B loop, went to 29 and 270 ms; issue 17, stop 36).
        std::fs::File::open(&big)?.sync_all()?;
        if let Some(kept) = &args.preloaded {
            std::fs::File::open(kept)?.sync_all()?;
        }
        let preload_time = started.elapsed();
        let size = std::fs::metadata(&big)?.len();
        let server = Server::start(
            &binary,
            &format!("sqlite://{}", big.display()),
            sink.addr,
            &[],
        )?;
        let startup = server.startup;
        let (rss_start, _) = server.rss_mib();
        let label = format!("SQLite, {} pending", args.preload);
        let figures = measure_backend(&label, &server, &sink, &keys, &args, "big").await?;
        let (rss_end, rss_peak) = server.rss_mib();
        // A Prometheus scrape counts every pending request.
        let scrape_started = Instant::now();
        let scraped = scrape(&server).await?;
        let scrape_time = scrape_started.elapsed();
        anyhow::ensure!(
            scraped.contains("letro_pending_requests"),
            "no pending gauge in /metrics"
        );
        server.stop()?;
        let empty = backends[0].closed.throughput();
        notes.push(format!(
            "Large database: {} pending requests preloaded in {:.0} s; database {:.1} MiB, {:.0} bytes per pending request; \
             startup {:.0} ms (empty database: {:.0} ms); server RSS {:.0} MiB after start, {:.0} MiB after the run (peak {:.0}); \
             closed-loop throughput {:.0} req/s = {:.0}% of the empty-database figure; server CPU per request {} (empty: {}); p99 at half load {:.2} ms ({}{}); \
             one GET /metrics (counts every row) {:.0} ms.",
            args.preload,
            preload_time.as_secs_f64(),
            size as f64 / 1048576.0,
            size as f64 / args.preload as f64,
            startup.as_secs_f64() * 1000.0,
            empty_startup.as_secs_f64() * 1000.0,
            rss_start,
            rss_end,
            rss_peak,
            figures.closed.throughput(),
            100.0 * figures.closed.throughput() / empty,
            cpu_cell(figures.cpu),
            cpu_cell(backends[0].cpu),
            figures.open.report.latency_ms(0.99),
            send_lag(&figures.open.report),
            server_timing_note(&figures.open, "the requests"),
            scrape_time.as_secs_f64() * 1000.0,
        ));
    }

    let mut soak = if args.soak > 0 {
        eprintln!("soak: {} s", args.soak);
        soak::soak(
            &binary,
            soak::SoakDatabase::Sqlite(&dir.path().join("soak.db")),
            &sink,
            &keys,
            args.connections,
            Duration::from_secs(args.soak),
        )
        .await?
    } else {
        "Soak: skipped (`--soak 0`).\n".to_owned()
    };
    if let (true, Some(url)) = (args.soak > 0 && args.soak_postgres, &args.postgres) {
        eprintln!("soak on PostgreSQL: {} s", args.soak);
        let db = PgDatabase::create_on(url, "letro_soak").await?;
        let section = soak::soak(
            &binary,
            soak::SoakDatabase::Postgres(&db),
            &sink,
            &keys,
            args.connections,
            Duration::from_secs(args.soak),
        )
        .await;
        db.drop_database().await;
        soak.push('\n');
        soak.push_str(&section?);
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let text = format!(
        "# Benchmark results\n\n\
         Written by `bench/run` ({}, commit {}, {} cores; generator, sink and server share the machine).\n\
         {} requests per closed-loop run over {} keep-alive connections, {} distinct RSA-2048 endpoint keys.\n\
         Latency is measured in an open loop at {}, from when each request was due; the generator's timer ticks every millisecond, \
         so requests go out in bursts, up to a millisecond late or more when it waits for a core (the notes say how late).\n\n\
         Server CPU is the server process's CPU time per request over the closed loop and, for a database, the outbox drain after it \
         (so it includes delivering the matches; PostgreSQL's own processes are not counted); a database's notes give it over the open loop \
         and its drain too, where batches are small.\n\n\
         | Route / database | Closed-loop throughput | vs no-op | Latency p50 / p99 / p99.9 | Outbox delivery | Server CPU per request | Notes |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{}\n\n{}\n\n{}",
        date,
        git_commit(),
        cores,
        args.requests,
        args.connections,
        args.keys,
        match args.open_rate {
            Some(rate) => format!(
                "{rate:.0} req/s for a database (`--open-rate`), half its closed-loop throughput for the no-op route"
            ),
            None => "half the closed-loop throughput".to_owned(),
        },
        table.join("\n"),
        notes
            .iter()
            .map(|n| format!("- {n}"))
            .collect::<Vec<_>>()
            .join("\n"),
        soak,
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &text)?;
    println!("{text}");
    Ok(())
}
