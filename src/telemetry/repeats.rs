//! Log lines that can repeat hundreds of times a second (a storage outage under the
//! broker's retries, a connection flood, slow clients): the first of each interval is
//! logged in full by its caller; the rest are only counted, and one summary line per
//! interval gives their number. Metrics count every one of them.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// The level of a repeated line and of its summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepeatLevel {
    /// `ERROR`.
    Error,
    /// `WARN`.
    Warn,
    /// `INFO`.
    Info,
}

#[derive(Debug, Default)]
struct Window {
    /// A line was logged in full in this interval.
    logged: bool,
    /// Occurrences not logged in this interval.
    unlogged: u64,
}

/// One kind of repeated line.
#[derive(Debug)]
pub struct Repeated {
    /// The message of the line in full, named by its summaries' `repeated` field.
    what: &'static str,
    level: RepeatLevel,
    window: Mutex<Window>,
}

impl Repeated {
    const fn new(what: &'static str, level: RepeatLevel) -> Self {
        Self {
            what,
            level,
            window: Mutex::new(Window {
                logged: false,
                unlogged: 0,
            }),
        }
    }

    /// Notes one occurrence. True when the caller is to log it in full: the first of
    /// its interval. Otherwise it is counted for the interval's summary.
    pub fn first(&self) -> bool {
        // Nothing is left half-done under this lock.
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if window.logged {
            window.unlogged += 1;
            false
        } else {
            window.logged = true;
            true
        }
    }

    /// Ends the interval: logs how many occurrences were not logged in it, if any. An
    /// interval with none ends the run, so the next occurrence is logged in full.
    fn summarise(&self, every: Duration) {
        let count = {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            let count = window.unlogged;
            window.unlogged = 0;
            if count == 0 {
                window.logged = false;
            }
            count
        };
        if count == 0 {
            return;
        }
        let interval_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let every = humantime::format_duration(every);
        let what = self.what;
        match self.level {
            RepeatLevel::Error => tracing::error!(
                repeated = what,
                count,
                interval_ms,
                "{what}: {count} more in the last {every}"
            ),
            RepeatLevel::Warn => tracing::warn!(
                repeated = what,
                count,
                interval_ms,
                "{what}: {count} more in the last {every}"
            ),
            RepeatLevel::Info => tracing::info!(
                repeated = what,
                count,
                interval_ms,
                "{what}: {count} more in the last {every}"
            ),
        }
    }

    /// The message of the line in full.
    pub fn what(&self) -> &'static str {
        self.what
    }
}

/// Every repeated line the server has.
#[derive(Debug)]
pub struct Repeats {
    /// An incoming message could not be stored (503).
    pub store_failures: Repeated,
    /// A connection refused at `--max-connections`.
    pub connections_refused: Repeated,
    /// `accept` failed (out of file descriptors, usually).
    pub accept_failures: Repeated,
    /// A client did not send its request line and headers in time.
    pub header_timeouts: Repeated,
    /// A client did not send its body in time (408).
    pub body_timeouts: Repeated,
    /// A pairing request that would wait, at `--max-pending-requests` (503).
    pub at_ceiling: Repeated,
}

impl Default for Repeats {
    fn default() -> Self {
        Self {
            store_failures: Repeated::new(
                "could not store an incoming message; answering 503",
                RepeatLevel::Error,
            ),
            connections_refused: Repeated::new(
                "refusing connections: at --max-connections",
                RepeatLevel::Warn,
            ),
            accept_failures: Repeated::new("could not accept a connection", RepeatLevel::Warn),
            header_timeouts: Repeated::new(
                "request headers not sent in time; connection closed",
                RepeatLevel::Info,
            ),
            body_timeouts: Repeated::new("body not sent in time; answering 408", RepeatLevel::Info),
            at_ceiling: Repeated::new(
                "pending requests at --max-pending-requests; answering 503 to requests that would wait",
                RepeatLevel::Warn,
            ),
        }
    }
}

impl Repeats {
    fn all(&self) -> [&Repeated; 6] {
        [
            &self.store_failures,
            &self.connections_refused,
            &self.accept_failures,
            &self.header_timeouts,
            &self.body_timeouts,
            &self.at_ceiling,
        ]
    }

    /// Logs the summaries every `every` until `stop`, then once more.
    pub async fn summarise_every(&self, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            for repeated in self.all() {
                repeated.summarise(every);
            }
        }
        for repeated in self.all() {
            repeated.summarise(every);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_run_is_logged_and_the_rest_counted_until_a_quiet_interval() {
        let r = Repeated::new("x", RepeatLevel::Info);
        assert!(r.first());
        assert!(!r.first());
        assert!(!r.first());
        assert_eq!(r.window.lock().map(|w| w.unlogged).ok(), Some(2));
        r.summarise(Duration::from_secs(1));
        // Still in the run: the next one is counted, not logged.
        assert!(!r.first());
        r.summarise(Duration::from_secs(1));
        // A quiet interval ends the run.
        r.summarise(Duration::from_secs(1));
        assert!(r.first());
    }
}
