//! Log lines gathered and written by one thread, several lines per write.
//!
//! Writing each line to stdout as it is made cost a write system call per line and, on a
//! pipe (as under a container runtime), a wake-up of the reader for each: 7% of the
//! server's CPU time at full load, one line per request. Here request handlers append
//! whole lines to a shared buffer, and a thread writes whatever has gathered since its
//! last write. Under load that is dozens of lines per write; when idle a line goes out
//! at once.
//!
//! The price: lines appended but not yet written are lost if the process is killed
//! outright (a normal exit, a panic in `main` or an error writes them: see
//! [`LineGuard`]). When the output cannot keep up, appending waits once a megabyte is
//! waiting, as a plain write to a full pipe would.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// The pause after each write, for lines to gather.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// How much may wait to be written before appending blocks.
const MAX_WAITING: usize = 1 << 20;

#[derive(Default)]
struct State {
    /// Lines appended and not yet taken by the writer thread.
    waiting: Vec<u8>,
    /// The writer thread is asleep waiting for lines (so an append must wake it).
    asleep: bool,
    /// No more lines will be taken: the guard was dropped.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Lines are waiting, or the buffer was closed.
    lines: Condvar,
    /// The writer thread took the waiting lines.
    taken: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing can be left half-done under this lock: appending is a single extend.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends to the buffer; what `tracing`'s formatter writes each line into.
pub(super) struct LineWriter<W: Write + Send + 'static> {
    shared: Arc<Shared>,
    /// Where lines go once the buffer is closed (and the thread gone).
    fallback: fn() -> W,
}

impl<W: Write + Send + 'static> Clone for LineWriter<W> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            fallback: self.fallback,
        }
    }
}

impl<W: Write + Send + 'static> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        while state.waiting.len() >= MAX_WAITING && !state.closed {
            state = self
                .shared
                .taken
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            drop(state);
            let mut out = (self.fallback)();
            out.write_all(buf)?;
            out.flush()?;
            return Ok(buf.len());
        }
        state.waiting.extend_from_slice(buf);
        if state.asleep {
            state.asleep = false;
            self.shared.lines.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Owns the writer thread: dropping it writes every line appended so far, then stops
/// the thread. Later lines are written directly.
pub struct LineGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LineGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            self.shared.lines.notify_one();
            self.shared.taken.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts a thread writing lines to what `output` returns (called once per write).
/// Returns the writer to hand to the formatter, and the guard that flushes at the end.
pub(super) fn start<W: Write + Send + 'static>(
    output: fn() -> W,
) -> std::io::Result<(LineWriter<W>, LineGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || run(&shared, output))?
    };
    Ok((
        LineWriter {
            shared: shared.clone(),
            fallback: output,
        },
        LineGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run<W: Write>(shared: &Shared, output: fn() -> W) {
    let mut batch = Vec::new();
    loop {
        {
            let mut state = shared.lock();
            while state.waiting.is_empty() && !state.closed {
                state.asleep = true;
                state = shared
                    .lines
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.asleep = false;
            if state.waiting.is_empty() {
                return;
            }
            std::mem::swap(&mut state.waiting, &mut batch);
            shared.taken.notify_all();
        }
        let mut out = output();
        // Nowhere to report a failed log write; the lines are dropped, as a direct
        // write's error would be.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // One burst must not keep its memory for good.
        if batch.capacity() > MAX_WAITING {
            batch = Vec::new();
        }
        // Let lines gather: woken for each line as it comes, this thread wrote one or
        // two at a time and saved nothing. A line waits a millisecond at most.
        std::thread::sleep(LINGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// What the test's "stdout" received, write by write.
    fn received() -> &'static Mutex<Vec<Vec<u8>>> {
        static RECEIVED: OnceLock<Mutex<Vec<Vec<u8>>>> = OnceLock::new();
        RECEIVED.get_or_init(Mutex::default)
    }

    struct Recorder(Vec<u8>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.0.is_empty() {
                received()
                    .lock()
                    .expect("recorder lock")
                    .push(std::mem::take(&mut self.0));
            }
            Ok(())
        }
    }

    fn recorder() -> Recorder {
        Recorder(Vec::new())
    }

    #[test]
    fn every_line_is_written_whole_in_order_and_before_the_guard_returns() {
        let (writer, guard) = start(recorder).expect("start");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .expect("append");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("producer");
        }
        drop(guard);
        let writes = std::mem::take(&mut *received().lock().expect("lock"));
        let text = String::from_utf8(writes.concat()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8_000, "every line written once");
        for t in 0..4 {
            let own: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().expect("number"))
                .collect();
            assert_eq!(own, (0..2_000).collect::<Vec<_>>(), "thread {t} in order");
        }
        assert!(
            writes.iter().all(|w| w.ends_with(b"\n")),
            "no write ends mid-line"
        );
        // A line after the guard is gone goes straight out.
        let mut late = writer.clone();
        late.write_all(b"late\n").expect("late line");
        let writes = received().lock().expect("lock").clone();
        assert_eq!(writes, vec![b"late\n".to_vec()]);
    }
}
