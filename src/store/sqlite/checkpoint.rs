//! Checkpoints off the writer's path.
//!
//! SQLite's own checkpoint runs inside the commit that fills the WAL past its threshold:
//! the writer copies every page of the WAL into the database file and syncs it while
//! every waiting request waits with it (the p99 at half load was set by these stalls).
//! Here a thread of its own copies the WAL into the database as it fills, with passive
//! checkpoints, which never take the write lock, so the writer goes on committing
//! meanwhile. What a passive checkpoint cannot do under continuous load is start the WAL
//! over (that needs a moment when every frame has been copied and none is being added),
//! so when the WAL has grown past a bound the writer restarts it itself, between two
//! batches, by then with only the last few commits left to copy.
//!
//! Durability is SQLite's either way: a checkpoint only copies committed frames, and a
//! crash mid-checkpoint leaves the WAL to be copied again at the next open.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

use super::{Result, StoreError, unavailable};

/// WAL frames (4 KiB pages) committed since the last pass that start the next one: the
/// threshold SQLite's own checkpoints used (`wal_autocheckpoint = 1000`, ~4 MiB).
const PASS_FRAMES: i32 = 1000;

/// WAL frames beyond which the writer restarts the WAL (~16 MiB: the headroom
/// docs/operations.md asks for).
const RESTART_FRAMES: i32 = 4000;

/// What the writer and the checkpoint thread share.
#[derive(Debug, Default)]
struct Shared {
    /// Frames in the WAL after the latest commit.
    frames: AtomicI32,
    /// Passes the checkpoint thread has made.
    passes: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// A pass is wanted.
    pending: bool,
    /// The WAL's length in frames when the last pass was asked for.
    asked_at: i32,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After each commit: the WAL now holds `frames` frames.
    fn committed(&self, frames: i32) {
        self.frames.store(frames, Ordering::Relaxed);
        let mut state = self.lock();
        if frames < state.asked_at {
            // The WAL started over.
            state.asked_at = 0;
        }
        if frames - state.asked_at >= PASS_FRAMES {
            state.asked_at = frames;
            state.pending = true;
            self.wake.notify_one();
        }
    }
}

/// The checkpoint thread, and the writer's side of it.
#[derive(Debug)]
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the checkpoint thread on `own` (a connection of its own to the database),
    /// and hands checkpoints over to it from `writer`, whose automatic checkpoints stop.
    pub(super) fn start(writer: &mut Connection, own: Connection) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let hook = shared.clone();
        // Never an error from the hook: SQLite would return it from a COMMIT that did
        // commit.
        writer
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames| {
                hook.committed(frames);
                Ok(())
            }))
            .map_err(unavailable)?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(&own, &thread_shared))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Between two batches: restarts the WAL if it has grown past its bound. Never
    /// waits: if the checkpoint thread is mid-pass, or a reader still reads from the
    /// WAL, it is left for after the next batch (`busy_timeout` is `restore` again
    /// afterwards).
    pub(super) fn restart_if_long(&self, writer: &Connection, restore: Duration) {
        if self.shared.frames.load(Ordering::Relaxed) < RESTART_FRAMES {
            return;
        }
        if writer.busy_timeout(Duration::ZERO).is_err() {
            return;
        }
        match writer.wal_checkpoint_v2(rusqlite::DEFAULT_NAME, CheckpointMode::RESTART) {
            Ok(_) => self.shared.frames.store(0, Ordering::Relaxed),
            Err(e) if is_busy(&e) => {}
            Err(e) => tracing::warn!(error = %e, "could not restart the SQLite WAL"),
        }
        if let Err(e) = writer.busy_timeout(restore) {
            tracing::warn!(error = %e, "could not restore the SQLite busy timeout");
        }
    }

    /// Stops the thread once its pass, if any, is over.
    pub(super) fn stop(mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

/// The checkpoint thread: a passive checkpoint each time one is asked for.
fn run(conn: &Connection, shared: &Shared) {
    loop {
        {
            let mut state = shared.lock();
            while !state.pending && !state.closing {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.closing {
                return;
            }
            state.pending = false;
        }
        match conn.wal_checkpoint_v2(rusqlite::DEFAULT_NAME, CheckpointMode::PASSIVE) {
            Ok(_) => {
                shared.passes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if is_busy(&e) => {}
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn wal_len(db: &std::path::Path) -> u64 {
        std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len())
    }

    #[test]
    fn the_wal_is_copied_by_its_own_thread_and_restarted_within_its_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut writer = Connection::open(&path).expect("open");
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                 CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB NOT NULL);",
            )
            .expect("schema");
        let own = Connection::open(&path).expect("open");
        let checkpointer = Checkpointer::start(&mut writer, own).expect("start");
        // About 5 WAL restarts' worth of commits, each of a few pages.
        let rows = 5 * RESTART_FRAMES as usize / 3;
        let body = vec![7u8; 3 * PAGE as usize];
        let mut longest = 0;
        for n in 0..i64::try_from(rows).expect("small") {
            writer
                .execute(
                    "INSERT INTO t (n, body) VALUES (?1, ?2)",
                    rusqlite::params![n, body],
                )
                .expect("insert");
            checkpointer.restart_if_long(&writer, Duration::from_secs(5));
            longest = longest.max(wal_len(&path));
        }
        let passes = checkpointer.shared.passes.load(Ordering::Relaxed);
        checkpointer.stop();
        assert!(passes > 0, "the checkpoint thread never copied the WAL");
        // Its bound, plus what the commits made while a pass held the restart off.
        let bound = (RESTART_FRAMES as u64 + PASS_FRAMES as u64) * (PAGE + 24);
        assert!(
            longest <= bound,
            "the WAL grew to {longest} bytes (bound {bound}): it is never started over"
        );
        drop(writer);
        let count: i64 = Connection::open(&path)
            .expect("reopen")
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, i64::try_from(rows).expect("small"));
    }
}
