//! The real `letro-server` binary as a child process, as an operator runs it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many of the last log lines are kept, for failure messages.
const KEPT_LINES: usize = 200;

/// The `letro-server` binary of the build that runs this code: `LETRO_SERVER_BIN` if set,
/// else the one beside the running executable (cargo puts integration tests in
/// `target/<profile>/deps` and binaries in `target/<profile>`).
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LETRO_SERVER_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("letro-server")
}

/// A `letro-server serve` child process on port 0, with its log (JSON lines on stdout)
/// read as it comes. Killed when dropped.
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT/`.
    pub url: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// From the spawn to the "listening" line.
    pub startup: Duration,
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl ServerProcess {
    /// Runs `binary --log-format json serve --bind 127.0.0.1:0 ARGS` in a clean
    /// environment and waits, at most `wait`, until it says where it listens.
    pub fn launch(binary: &Path, args: &[&str], wait: Duration) -> std::io::Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env_clear()
            .args(["--log-format", "json", "serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = log.clone();
        // Keep reading: a server whose log pipe is full would block on its next line.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"listening\"")
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(addr) = v["address"].as_str()
                {
                    let _ = tx.send(addr.to_owned());
                }
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let addr: SocketAddr = match rx.recv_timeout(wait) {
            Ok(addr) => addr.parse().map_err(std::io::Error::other)?,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other(format!(
                    "{} did not report its address within {wait:?}",
                    binary.display()
                )));
            }
        };
        Ok(Self {
            url: format!("http://{addr}/"),
            addr,
            startup: started.elapsed(),
            child,
            log,
        })
    }

    /// Starts the server of this build on the SQLite file `db`, with `sink`, fast
    /// retries and short timeouts for tests, and `extra` flags (which win over those).
    pub fn start(db: &Path, sink: Option<&str>, extra: &[&str]) -> Self {
        Self::start_on(&format!("sqlite://{}", db.display()), sink, extra)
    }

    /// The same on any database URL.
    pub fn start_on(database: &str, sink: Option<&str>, extra: &[&str]) -> Self {
        let mut args = vec!["--database", database];
        // Test defaults, unless `extra` sets them (clap refuses a flag given twice).
        for (flag, value) in [
            ("--retry-base-delay", "10ms"),
            ("--retry-max-delay", "200ms"),
            ("--sink-timeout", "1s"),
            ("--shutdown-timeout", "10s"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(extra);
        if let Some(sink) = sink {
            args.extend(["--sink", sink]);
        }
        Self::launch(&server_binary(), &args, Duration::from_secs(20)).expect("the server starts")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last log lines, for failure messages.
    pub fn recent_log(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL: no shutdown code runs at all.
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal_term().expect("kill -TERM");
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .expect("join")
            .expect("wait")
    }

    /// SIGTERM, then waits for the exit, off any runtime.
    pub fn stop(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.signal_term()?;
        self.child.wait()
    }

    fn signal_term(&self) -> std::io::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other("kill -TERM failed"))
        }
    }

    /// (current, peak) resident set size in KiB, from /proc; 0 when unreadable.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
