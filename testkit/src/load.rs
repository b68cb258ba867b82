//! A lean keep-alive HTTP/1.1 load generator. Requests are rendered to bytes before the
//! clock starts (or, for long runs, on demand: a few microseconds each), and answers are parsed only as far as the status line and
//! `Content-Length`, so the generator costs far less CPU than the server it loads (they
//! share the machine).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use letro_server::codec::cloudevent::INCOMING_TYPE;
use letro_server::codec::pairing::PAIRING_REQUEST_TYPE;

/// One pairing request, ready to send.
pub fn render_request(
    path: &str,
    sender: &str,
    parcel: &str,
    server_id: &str,
    body: &str,
) -> Vec<u8> {
    render_event(
        path,
        sender,
        parcel,
        server_id,
        PAIRING_REQUEST_TYPE,
        body.as_bytes(),
    )
}

/// One incoming event of any content type, ready to send.
pub fn render_event(
    path: &str,
    sender: &str,
    parcel: &str,
    server_id: &str,
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: letro\r\nce-specversion: 1.0\r\nce-id: {parcel}\r\n\
         ce-source: {sender}\r\nce-type: {INCOMING_TYPE}\r\nce-subject: {server_id}\r\n\
         content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each connection sends its next request as soon as the previous one is answered:
    /// maximum throughput.
    Closed,
    /// Requests are due at a fixed rate, whatever the server does; latency is measured
    /// from when a request was due, so a stalled server cannot hide its queue
    /// (no coordinated omission).
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// Requests answered, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer.
    pub failures: u64,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// In an open loop, how late each request was sent, in microseconds: the generator's
    /// own share of `latency` (empty in a closed loop).
    pub send_lag: Histogram<u64>,
    /// The longest latency, in microseconds, of the requests due in each second of the
    /// run (index 0: the first second): whether a high quantile is one stall or the
    /// whole run.
    pub worst_per_second: Vec<u64>,
}

impl LoadReport {
    /// Answered requests per second.
    pub fn throughput(&self) -> f64 {
        let answered: u64 = self.statuses.values().sum();
        answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in milliseconds.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// A quantile of how late requests were sent, in milliseconds.
    pub fn send_lag_ms(&self, quantile: f64) -> f64 {
        self.send_lag.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The second of the run whose slowest request was slowest: (second, milliseconds).
    pub fn worst_second(&self) -> Option<(usize, f64)> {
        self.worst_per_second
            .iter()
            .enumerate()
            .max_by_key(|(_, us)| **us)
            .map(|(second, us)| (second, *us as f64 / 1000.0))
    }

    /// How many seconds of the run had a request slower than `ms`, of how many.
    pub fn seconds_slower_than(&self, ms: f64) -> (usize, usize) {
        let over = self
            .worst_per_second
            .iter()
            .filter(|us| **us as f64 / 1000.0 > ms)
            .count();
        (over, self.worst_per_second.len())
    }
}

/// Keeps the longest of `micros` for the second of the run `due` falls in.
fn record_worst(worst: &mut Vec<u64>, start: Instant, due: Instant, micros: u64) {
    let second = usize::try_from(due.saturating_duration_since(start).as_secs()).unwrap_or(0);
    if worst.len() <= second {
        worst.resize(second + 1, 0);
    }
    worst[second] = worst[second].max(micros);
}

/// Renders request `i` on demand, for runs too long to render beforehand.
pub type MakeRequest = Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>;

/// What a run sends.
#[derive(Clone)]
enum Requests {
    /// These, each once.
    List(Arc<Vec<Vec<u8>>>),
    /// Requests `first`, `first + 1`, … made on demand, until `until` (none is sent
    /// after it; those in flight are answered).
    Made {
        make: MakeRequest,
        first: usize,
        until: Instant,
    },
}

impl Requests {
    fn get(&self, i: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
        match self {
            Self::List(list) => list.get(i).map(|r| std::borrow::Cow::Borrowed(&r[..])),
            Self::Made { make, first, until } => {
                (Instant::now() < *until).then(|| std::borrow::Cow::Owned(make(first + i)))
            }
        }
    }

    fn total(&self) -> String {
        match self {
            Self::List(list) => list.len().to_string(),
            Self::Made { .. } => "?".to_owned(),
        }
    }
}

/// Sends every request once over `connections` keep-alive connections to `addr`, paced
/// by `pace`, printing progress to stderr every second under `label`.
pub async fn run(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    connections: usize,
    pace: Pace,
    label: &str,
) -> LoadReport {
    run_requests(addr, Requests::List(requests), connections, pace, label).await
}

/// A closed loop of requests `first`, `first + 1`, … made by `make`, until `until`.
/// Every request sent is in the report (answered or failed), so the next run can start
/// where this one stopped.
pub async fn run_until(
    addr: std::net::SocketAddr,
    make: MakeRequest,
    first: usize,
    until: Instant,
    connections: usize,
    label: &str,
) -> LoadReport {
    let requests = Requests::Made { make, first, until };
    run_requests(addr, requests, connections, Pace::Closed, label).await
}

async fn run_requests(
    addr: std::net::SocketAddr,
    requests: Requests,
    connections: usize,
    pace: Pace,
    label: &str,
) -> LoadReport {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let merged = Arc::new(Mutex::new(Merged::empty()));
    let start = Instant::now();
    let progress = {
        let (done, label, total) = (done.clone(), label.to_owned(), requests.total());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {label}: {now}/{total} answered, {} req/s",
                    now.saturating_sub(last)
                );
                last = now;
            }
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (requests, next, done, merged) =
            (requests.clone(), next.clone(), done.clone(), merged.clone());
        workers.spawn(async move {
            let mut mine = Merged::empty();
            let mut conn: Option<BufReader<TcpStream>> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let request = &request[..];
                let due = match pace {
                    Pace::Closed => Instant::now(),
                    Pace::Open { rate } => {
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        let lag = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let _ = mine.send_lag.record(lag.max(1));
                        due
                    }
                };
                if conn.is_none() {
                    conn = TcpStream::connect(addr).await.ok().map(|s| {
                        let _ = s.set_nodelay(true);
                        BufReader::new(s)
                    });
                }
                let status = match conn.as_mut() {
                    Some(stream) => exchange(stream, request).await,
                    None => None,
                };
                match status {
                    Some((status, keep_alive)) => {
                        *mine.statuses.entry(status).or_default() += 1;
                        let micros = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let _ = mine.latency.record(micros.max(1));
                        record_worst(&mut mine.worst, start, due, micros);
                        if !keep_alive {
                            conn = None;
                        }
                    }
                    None => {
                        mine.failures += 1;
                        conn = None;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            merged.lock().await.add(mine);
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    progress.abort();
    let merged = Arc::try_unwrap(merged)
        .map(Mutex::into_inner)
        .unwrap_or_else(|_| Merged::empty());
    LoadReport {
        statuses: merged.statuses,
        failures: merged.failures,
        elapsed,
        latency: merged.latency,
        send_lag: merged.send_lag,
        worst_per_second: merged.worst,
    }
}

/// What the connections of a run measured, added up as each one ends.
struct Merged {
    statuses: BTreeMap<u16, u64>,
    failures: u64,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    worst: Vec<u64>,
}

impl Merged {
    fn empty() -> Self {
        Self {
            statuses: BTreeMap::new(),
            failures: 0,
            latency: new_histogram(),
            send_lag: new_histogram(),
            worst: Vec::new(),
        }
    }

    fn add(&mut self, other: Merged) {
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.failures += other.failures;
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
        if self.worst.len() < other.worst.len() {
            self.worst.resize(other.worst.len(), 0);
        }
        for (all, mine) in self.worst.iter_mut().zip(other.worst) {
            *all = (*all).max(mine);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds")
}

/// Writes one request and reads its answer: (status, whether the connection stays open).
async fn exchange(stream: &mut BufReader<TcpStream>, request: &[u8]) -> Option<(u16, bool)> {
    stream.get_mut().write_all(request).await.ok()?;
    let mut line = String::new();
    let mut status = 0u16;
    let mut length = 0usize;
    let mut keep_alive = true;
    loop {
        line.clear();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if status == 0 {
            status = line.get(9..12)?.parse().ok()?;
            continue;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        } else if lower.starts_with("connection:") && lower.contains("close") {
            keep_alive = false;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.ok()?;
    Some((status, keep_alive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_connections_measured_adds_up() {
        let mut all = Merged::empty();
        let mut one = Merged::empty();
        one.statuses.insert(204, 3);
        one.failures = 1;
        one.latency.record(2_000).expect("within bounds");
        one.send_lag.record(900).expect("within bounds");
        one.worst = vec![2_000];
        let mut other = Merged::empty();
        other.statuses.insert(204, 2);
        other.statuses.insert(503, 1);
        other.latency.record(12_000).expect("within bounds");
        other.send_lag.record(1_100).expect("within bounds");
        other.worst = vec![1_000, 12_000];
        all.add(one);
        all.add(other);
        assert_eq!(all.statuses, BTreeMap::from([(204, 5), (503, 1)]));
        assert_eq!(all.failures, 1);
        assert_eq!(all.latency.len(), 2);
        assert_eq!(all.send_lag.len(), 2);
        assert_eq!(all.worst, vec![2_000, 12_000]);
    }

    #[test]
    fn the_worst_second_is_found_and_seconds_over_a_bound_counted() {
        let start = Instant::now();
        let mut worst = Vec::new();
        record_worst(&mut worst, start, start + Duration::from_millis(200), 3_000);
        record_worst(
            &mut worst,
            start,
            start + Duration::from_millis(2_500),
            25_000,
        );
        record_worst(
            &mut worst,
            start,
            start + Duration::from_millis(2_900),
            12_000,
        );
        record_worst(&mut worst, start, start + Duration::from_millis(400), 4_000);
        assert_eq!(worst, vec![4_000, 0, 25_000]);
        let report = LoadReport {
            statuses: BTreeMap::new(),
            failures: 0,
            elapsed: Duration::from_secs(3),
            latency: new_histogram(),
            send_lag: new_histogram(),
            worst_per_second: worst,
        };
        assert_eq!(report.worst_second(), Some((2, 25.0)));
        assert_eq!(report.seconds_slower_than(10.0), (1, 3));
        assert_eq!(report.seconds_slower_than(3.5), (2, 3));
    }
}
