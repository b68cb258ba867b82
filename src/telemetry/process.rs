//! The process metrics Prometheus exporters conventionally have (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc` at each scrape. prometheus-client
//! has no process collector; these few reads are cheaper than a crate that has one.
//! Where `/proc` cannot be read (not Linux), the metric is left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`): 100 on every
/// Linux architecture the server is built for, as Prometheus's own `procfs` assumes.
const USER_HZ: f64 = 100.0;

/// Reads the process's metrics at each scrape.
#[derive(Debug, Default)]
pub(super) struct ProcessCollector;

/// What `/proc/self/stat` says, from the fields after the command name.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    /// User plus system time, in seconds.
    cpu_seconds: f64,
    /// Ticks from boot to the process's start.
    start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses: the fields that follow start after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)?.checked_add(field(15)?)?;
    Some(Stat {
        cpu_seconds: ticks as f64 / USER_HZ,
        start_ticks: field(22)?,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits` (`None` if unlimited).
fn parse_max_fds(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let stat = read("/proc/self/stat").as_deref().and_then(parse_stat);
        if let Some(stat) = stat {
            let counter = ConstCounter::new(stat.cpu_seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(rss) = read("/proc/self/status").as_deref().and_then(parse_rss) {
            let help = "Resident memory size in bytes";
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                help,
                rss as f64,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor, open while it is read, is not counted.
            let open = fds.count().saturating_sub(1);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open as f64,
            )?;
        }
        if let Some(max) = read("/proc/self/limits").as_deref().and_then(parse_max_fds) {
            let help = "Maximum number of open file descriptors";
            gauge(&mut encoder, "process_max_fds", help, max as f64)?;
        }
        let boot = read("/proc/stat").as_deref().and_then(parse_boot_time);
        if let (Some(stat), Some(boot)) = (stat, boot) {
            let started = boot as f64 + stat.start_ticks as f64 / USER_HZ;
            let help = "Start time of the process since unix epoch in seconds";
            gauge(&mut encoder, "process_start_time_seconds", help, started)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        // A command name with a space and a parenthesis.
        let stat = "4242 (letro (x) server) S 1 4242 4242 0 -1 4194560 1981 0 0 0 \
                    150 52 0 0 20 0 9 0 123456 1234567 890 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_seconds: 2.02,
                start_ticks: 123_456
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_rss("Name:\tx\nVmHWM:\t  9 kB\nVmRSS:\t   35484 kB\n"),
            Some(35_484 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_max_fds(limits), Some(20_000));
        assert_eq!(
            parse_boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read() {
        let stat = read("/proc/self/stat").as_deref().and_then(parse_stat);
        assert!(stat.is_some());
        assert!(
            read("/proc/self/status")
                .as_deref()
                .and_then(parse_rss)
                .is_some_and(|r| r > 0)
        );
        assert!(
            read("/proc/stat")
                .as_deref()
                .and_then(parse_boot_time)
                .is_some()
        );
    }
}
