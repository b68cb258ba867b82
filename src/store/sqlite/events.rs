//! Processed-event keys, kept in generations.
//!
//! Every request records its event's key, and keys are random: in one B-tree keyed by
//! them, each request wrote a leaf page somewhere new in a table that only grows (to
//! 180 days of events), and the cost of a request grew with it (the soak: 37 to 47 µs of
//! writer time per request over two minutes, against 20 µs with no keys at all). Here
//! the key leads with a generation number, and a generation is written to that table
//! once, whole and in key order, when it is sealed: until then its keys are held in
//! memory and appended, in the order they came, to `processed_events_recent`, so that
//! recording a key dirties the last page of that table rather than a random leaf of
//! the generation's tree (which was more than half of what the writer wrote per request;
//! issue 17, stop 30). A generation is sealed once it holds [`GENERATION_KEYS`] keys: a
//! few hundred at a time, between batches, its keys are copied into `processed_events`
//! in key order; the step that copies the last stores its Bloom filter, and the steps
//! after it delete its rows from the recent table (a stored filter tells a generation
//! whose rows are left there from one still being copied). The sealed generations' filters, kept in memory and stored beside
//! them, let a request skip every sealed generation that certainly lacks its key, so
//! that looking in all of them costs a scan of their interleaved filters (64 contiguous
//! bytes each), and a B-tree lookup only for the rare false positive. Keys still expire
//! one by one (the expiry index); a generation whose keys are all gone loses its filter
//! at the next seal.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::filter::{Filter, Sealed};
use crate::domain::Timestamp;

/// Keys per generation. Smaller generations make a seal cheaper and filters more
/// numerous (each one asked by every request): at 65,536 the writer spent 26 µs per
/// request in a two-minute soak (1.9 million keys), at 262,144 30 µs, with one B-tree for
/// all keys 37-47 µs (alternated builds; issue 17's note, stop 24). At 16,384, with
/// interleaved filters, a request wrote 7 KiB instead of 9.5 but the writer's time per
/// request grew over a five-minute soak, 24 to 32 µs (stop 29).
pub(super) const GENERATION_KEYS: u64 = 65_536;

/// Keys a seal copies per step, and rows of the recent table it deletes per step once
/// they are all copied: each step holds the writer (and the requests waiting for it)
/// well under a millisecond. Copying 4,096 keys at once took 11 ms, deleting a
/// generation's 65,536 rows at once 24 ms (`secure_delete` zeroes them).
pub(super) const SEAL_STEP: usize = 256;
const CLEAR_STEP: i64 = 1_024;

/// A key of the current generation: its expiry, and its row in the recent table.
#[derive(Debug, Clone, Copy)]
struct Recent {
    expiry: i64,
    seq: i64,
}

/// Keys with their expiry and row, in key order: a generation is copied in that order
/// when it is sealed, with nothing to sort then (sorting 65,536 keys at once held the
/// writer for milliseconds).
type Keys = BTreeMap<[u8; 16], Recent>;

/// What the transaction in progress did to the keys in memory, undone if it rolls back.
#[derive(Debug)]
enum Undo {
    Inserted([u8; 16]),
    Removed([u8; 16], Recent),
}

/// A generation being sealed: its keys are still in the recent table, and partly in
/// `processed_events` already.
#[derive(Debug)]
struct Sealing {
    generation: i64,
    keys: Keys,
    /// The last key copied into `processed_events`: those before it are there too.
    copied: Option<[u8; 16]>,
    /// Its rows in the recent table have a `seq` in this range.
    seqs: (i64, i64),
    filter: Filter,
}

/// A sealed generation whose rows are still in the recent table: they are deleted a
/// range of `seq` at a time. (Its filter is stored: that tells it from a generation
/// still being copied.)
#[derive(Debug)]
struct Clearing {
    generation: i64,
    /// The next range starts here.
    next: i64,
    last: i64,
}

impl Sealing {
    /// `filter` holds every one of `keys`, perhaps more.
    fn new(generation: i64, keys: Keys, filter: Filter) -> Self {
        let seqs = keys.values().map(|r| r.seq);
        let seqs = (seqs.clone().min().unwrap_or(0), seqs.max().unwrap_or(0));
        Self {
            generation,
            keys,
            copied: None,
            seqs,
            filter,
        }
    }

    /// The next keys to copy, at most [`SEAL_STEP`].
    fn next(&self) -> impl Iterator<Item = (&[u8; 16], &Recent)> {
        let from = self.copied.map_or(Bound::Unbounded, Bound::Excluded);
        self.keys.range((from, Bound::Unbounded)).take(SEAL_STEP)
    }
}

/// A filter of `keys`, sized for at least `capacity`.
fn filter_of(keys: &Keys, capacity: u64) -> Filter {
    let mut filter = Filter::with_capacity(capacity.max(keys.len() as u64));
    for key in keys.keys() {
        filter.insert(key);
    }
    filter
}

/// The generations of processed-event keys, as the writer holds them.
#[derive(Debug)]
pub(super) struct ProcessedEvents {
    generation_keys: u64,
    /// The generation new keys go into.
    current: i64,
    /// The current generation's keys: exactly its rows in the recent table once the
    /// transaction in progress has committed or rolled back.
    recent: Keys,
    /// The current generation's keys, and any since forgotten, purged or rolled back:
    /// a superset, as a filter may be.
    recent_filter: Filter,
    undo: Vec<Undo>,
    /// Generations being sealed, oldest first: one at most, but for a database a crash
    /// left otherwise.
    sealing: VecDeque<Sealing>,
    /// Sealed generations whose rows are being deleted from the recent table.
    clearing: VecDeque<Clearing>,
    /// The sealed generations' filters.
    sealed: Sealed,
    /// Sealed generations whose filter was rebuilt at start and is not stored yet.
    unstored: Vec<i64>,
}

impl ProcessedEvents {
    /// Reads the generations: the recent table's keys, and the sealed generations'
    /// stored filters, or filters built from the keys where none was stored (a database
    /// from before generations, or a generation an earlier build filled in place).
    /// Writes nothing: an admin command beside the server opens the store too.
    pub(super) fn load(conn: &Connection, generation_keys: u64) -> rusqlite::Result<Self> {
        let mut by_generation: Vec<(i64, Keys)> = Vec::new();
        {
            let mut stmt = conn.prepare(
                "SELECT generation, seq, key, expires_at FROM processed_events_recent
                 ORDER BY generation, seq",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let generation: i64 = row.get(0)?;
                // Every key this build wrote is 16 bytes; anything else was never ours.
                let Ok(key) = <[u8; 16]>::try_from(row.get_ref(2)?.as_blob()?) else {
                    continue;
                };
                let recent = Recent {
                    expiry: row.get(3)?,
                    seq: row.get(1)?,
                };
                match by_generation.last_mut() {
                    Some((g, keys)) if *g == generation => {
                        keys.insert(key, recent);
                    }
                    _ => by_generation.push((generation, BTreeMap::from([(key, recent)]))),
                }
            }
        }
        let highest_sealed: Option<i64> =
            conn.query_row("SELECT max(generation) FROM processed_events", [], |r| {
                r.get(0)
            })?;
        // A generation in the recent table with keys in `processed_events` too was being
        // sealed; keys go into a generation newer than any.
        let current = by_generation
            .last()
            .map(|(g, _)| *g)
            .into_iter()
            .chain(highest_sealed.map(|g| g + 1))
            .max()
            .unwrap_or(0);
        let stored: Vec<i64> = conn
            .prepare("SELECT generation FROM processed_event_filters")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut recent = Keys::new();
        let mut sealing = VecDeque::new();
        let mut clearing = VecDeque::new();
        for (generation, keys) in by_generation {
            if generation == current {
                recent = keys;
            } else if stored.contains(&generation) {
                let seqs = keys.values().map(|r| r.seq);
                clearing.push_back(Clearing {
                    generation,
                    next: seqs.clone().min().unwrap_or(0),
                    last: seqs.max().unwrap_or(0),
                });
            } else if !keys.is_empty() {
                let filter = filter_of(&keys, generation_keys);
                sealing.push_back(Sealing::new(generation, keys, filter));
            }
        }
        let recent_filter = filter_of(&recent, generation_keys);

        let mut sealed = Sealed::new(generation_keys);
        let mut unstored = Vec::new();
        let mut next: Option<i64> =
            conn.query_row("SELECT min(generation) FROM processed_events", [], |r| {
                r.get(0)
            })?;
        while let Some(generation) = next {
            if !sealing.iter().any(|s: &Sealing| s.generation == generation) {
                let stored: Option<Vec<u8>> = conn
                    .query_row(
                        "SELECT bits FROM processed_event_filters WHERE generation = ?1",
                        params![generation],
                        |r| r.get(0),
                    )
                    .optional()?;
                let filter = match stored.as_deref().and_then(Filter::from_bytes) {
                    // Smaller than this build makes them: an earlier build's, at 12 bits
                    // per key. Built again, it is interleaved with the others and passes
                    // fewer absent keys. (Larger: a generation with more keys than most,
                    // kept.)
                    Some(filter) if filter.size() >= sealed.filter_size() => filter,
                    _ => {
                        unstored.push(generation);
                        build(conn, generation, generation_keys)?
                    }
                };
                sealed.push(generation, filter);
            }
            next = conn.query_row(
                "SELECT min(generation) FROM processed_events WHERE generation > ?1",
                params![generation],
                |r| r.get(0),
            )?;
        }
        Ok(Self {
            generation_keys,
            current,
            recent,
            recent_filter,
            undo: Vec::new(),
            sealing,
            clearing,
            sealed,
            unstored,
        })
    }

    /// Records `key` in the current generation; false if any generation has it already.
    pub(super) fn record(
        &mut self,
        conn: &Connection,
        key: &[u8; 16],
        expiry: Timestamp,
    ) -> rusqlite::Result<bool> {
        if self.recent.contains_key(key) || self.sealing.iter().any(|s| s.keys.contains_key(key)) {
            return Ok(false);
        }
        // Newest first: a redelivery usually follows its first delivery closely.
        for generation in self.sealed.candidates(key) {
            if conn
                .prepare_cached(
                    "SELECT 1 FROM processed_events WHERE generation = ?1 AND key = ?2",
                )?
                .exists(params![generation, key])?
            {
                return Ok(false);
            }
        }
        conn.prepare_cached(
            "INSERT INTO processed_events_recent (generation, key, expires_at)
             VALUES (?1, ?2, ?3)",
        )?
        .execute(params![self.current, key, expiry.0])?;
        let seq = conn.last_insert_rowid();
        self.recent_filter.insert(key);
        self.recent.insert(
            *key,
            Recent {
                expiry: expiry.0,
                seq,
            },
        );
        self.undo.push(Undo::Inserted(*key));
        Ok(true)
    }

    /// Takes back a key that [`Self::record`] inserted in the same transaction (so in
    /// the current generation: seals happen between transactions).
    pub(super) fn forget(&mut self, conn: &Connection, key: &[u8; 16]) -> rusqlite::Result<()> {
        let Some(recent) = self.recent.get(key).copied() else {
            return Ok(());
        };
        conn.prepare_cached("DELETE FROM processed_events_recent WHERE seq = ?1")?
            .execute(params![recent.seq])?;
        self.recent.remove(key);
        self.undo.push(Undo::Removed(*key, recent));
        Ok(())
    }

    /// Deletes the keys that expired by `now`; returns how many. A generation being
    /// copied (in the recent table with no stored filter, as the tables say, not this
    /// process's memory: an admin command may purge beside the server) keeps its keys
    /// until it is sealed: they are deleted by the next purge after. Only the server (`serving`)
    /// purges the recent table, since it holds its keys in memory.
    pub(super) fn purge(
        &mut self,
        conn: &Connection,
        now: Timestamp,
        serving: bool,
    ) -> rusqlite::Result<u64> {
        let mut purged = conn
            .prepare_cached(
                "DELETE FROM processed_events WHERE expires_at <= ?1
                 AND generation NOT IN (SELECT generation FROM processed_events_recent
                                        WHERE generation NOT IN
                                            (SELECT generation FROM processed_event_filters))",
            )?
            .execute(params![now.0])?;
        if !serving {
            return Ok(purged as u64);
        }
        let expired: Vec<([u8; 16], Recent)> = self
            .recent
            .iter()
            .filter(|(_, r)| r.expiry <= now.0)
            .map(|(key, r)| (*key, *r))
            .collect();
        if !expired.is_empty() {
            purged += conn
                .prepare_cached(
                    "DELETE FROM processed_events_recent
                     WHERE generation = ?1 AND expires_at <= ?2",
                )?
                .execute(params![self.current, now.0])?;
            for (key, recent) in expired {
                self.recent.remove(&key);
                self.undo.push(Undo::Removed(key, recent));
            }
        }
        Ok(purged as u64)
    }

    /// The transaction that recorded, forgot or purged keys since the last call has
    /// committed.
    pub(super) fn commit(&mut self) {
        self.undo.clear();
    }

    /// The transaction that recorded, forgot or purged keys since the last call has
    /// rolled back: the keys in memory are put back as they were.
    pub(super) fn discard(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Inserted(key) => {
                    self.recent.remove(&key);
                }
                Undo::Removed(key, recent) => {
                    self.recent.insert(key, recent);
                }
            }
        }
    }

    /// Whether there is sealing to do: a full current generation, or a seal under way.
    pub(super) fn due(&self) -> bool {
        !self.sealing.is_empty()
            || !self.clearing.is_empty()
            || self.recent.len() as u64 >= self.generation_keys
    }

    /// One step of sealing (the writer runs it between batches), in a transaction of
    /// its own: a full current generation starts being sealed and the next one starts;
    /// the oldest generation being sealed gets its next keys copied. The step that
    /// copies its last keys stores its filter and any rebuilt at start, and drops the
    /// filters of generations whose keys have all expired; the steps after it delete
    /// its rows from the recent table. Memory follows only once a step has committed.
    /// Whether the seal under way falls behind: half of the next generation is in.
    pub(super) fn behind(&self) -> bool {
        self.recent.len() as u64 >= self.generation_keys / 2
    }

    /// Unless `step`, a full generation only starts being sealed, and nothing is written.
    pub(super) fn seal_step(&mut self, conn: &Connection, step: bool) -> rusqlite::Result<()> {
        if self.sealing.is_empty()
            && self.clearing.is_empty()
            && self.recent.len() as u64 >= self.generation_keys
        {
            let keys = std::mem::take(&mut self.recent);
            let filter = std::mem::replace(
                &mut self.recent_filter,
                Filter::with_capacity(self.generation_keys),
            );
            self.sealing
                .push_back(Sealing::new(self.current, keys, filter));
            self.current += 1;
        }
        if !step {
            return Ok(());
        }
        let Some(sealing) = self.sealing.front() else {
            return self.clear_step(conn);
        };
        // Immediate: an admin command writing beside the server makes this wait its turn
        // rather than fail half-way.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let mut last = None;
        {
            let mut copy = tx.prepare_cached(
                "INSERT INTO processed_events (generation, key, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (generation, key) DO NOTHING",
            )?;
            for (key, recent) in sealing.next() {
                copy.execute(params![sealing.generation, key, recent.expiry])?;
                last = Some(*key);
            }
        }
        let done =
            last.is_none_or(|last| sealing.keys.last_key_value().map(|(k, _)| *k) == Some(last));
        if !done {
            tx.commit()?;
            if let Some(sealing) = self.sealing.front_mut() {
                sealing.copied = last;
            }
            return Ok(());
        }
        let mut emptied = Vec::new();
        for generation in self.sealed.generations() {
            let any: bool = tx
                .prepare_cached("SELECT 1 FROM processed_events WHERE generation = ?1")?
                .exists(params![generation])?;
            if !any {
                emptied.push(generation);
            }
        }
        tx.execute(
            "DELETE FROM processed_event_filters WHERE NOT EXISTS
                 (SELECT 1 FROM processed_events e
                  WHERE e.generation = processed_event_filters.generation)",
            [],
        )?;
        {
            let mut store = tx.prepare_cached(
                "INSERT OR REPLACE INTO processed_event_filters (generation, bits)
                 VALUES (?1, ?2)",
            )?;
            for generation in &self.unstored {
                if let Some(bytes) = self.sealed.bytes_of(*generation)
                    && !emptied.contains(generation)
                {
                    store.execute(params![generation, bytes])?;
                }
            }
            store.execute(params![sealing.generation, sealing.filter.to_bytes()])?;
        }
        tx.commit()?;
        self.sealed.remove(&emptied);
        if let Some(sealing) = self.sealing.pop_front() {
            self.clearing.push_back(Clearing {
                generation: sealing.generation,
                next: sealing.seqs.0,
                last: sealing.seqs.1,
            });
            self.sealed.push(sealing.generation, sealing.filter);
            tracing::debug!(
                generation = sealing.generation,
                keys = sealing.keys.len(),
                sealed = self.sealed.len(),
                memory_bytes = self.memory_bytes(),
                "processed-event generation sealed"
            );
        }
        self.unstored.clear();
        Ok(())
    }

    /// Deletes the next range of rows of the oldest sealed generation still in the
    /// recent table.
    fn clear_step(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let Some(clearing) = self.clearing.front_mut() else {
            return Ok(());
        };
        let end = clearing.next.saturating_add(CLEAR_STEP);
        conn.prepare_cached(
            "DELETE FROM processed_events_recent
             WHERE seq >= ?1 AND seq < ?2 AND generation = ?3",
        )?
        .execute(params![clearing.next, end, clearing.generation])?;
        clearing.next = end;
        if end > clearing.last {
            self.clearing.pop_front();
        }
        Ok(())
    }

    /// Bytes of memory the filters and the keys not sealed yet hold.
    pub(super) fn memory_bytes(&self) -> usize {
        self.sealed.size()
            + self
                .sealing
                .iter()
                .map(|s| s.filter.size() + s.keys.len() * 48)
                .sum::<usize>()
            + self.recent_filter.size()
            + self.recent.len() * 48
    }
}

/// Builds the filter of a sealed generation's keys, sized for at least `capacity`.
fn build(conn: &Connection, generation: i64, capacity: u64) -> rusqlite::Result<Filter> {
    let keys: i64 = conn.query_row(
        "SELECT count(*) FROM processed_events WHERE generation = ?1",
        params![generation],
        |r| r.get(0),
    )?;
    let keys = u64::try_from(keys).unwrap_or(0);
    let mut filter = Filter::with_capacity(keys.max(capacity));
    let mut stmt = conn.prepare("SELECT key FROM processed_events WHERE generation = ?1")?;
    let mut rows = stmt.query(params![generation])?;
    while let Some(row) = rows.next()? {
        // Every key this build wrote is 16 bytes; anything else was never a key of ours.
        if let Ok(key) = <[u8; 16]>::try_from(row.get_ref(0)?.as_blob()?) {
            filter.insert(&key);
        }
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        super::super::apply_migrations(&conn, 0, super::super::MIGRATIONS.len())
            .expect("migrations");
        conn
    }

    fn key(n: u8) -> [u8; 16] {
        [n; 16]
    }

    const SOON: Timestamp = Timestamp(10);
    const LATER: Timestamp = Timestamp(1 << 40);

    /// Runs `f` in a transaction, committed if `commit`, else rolled back.
    fn transaction(
        conn: &Connection,
        events: &mut ProcessedEvents,
        commit: bool,
        f: impl FnOnce(&Connection, &mut ProcessedEvents),
    ) {
        conn.execute_batch("BEGIN").expect("begin");
        f(conn, events);
        if commit {
            conn.execute_batch("COMMIT").expect("commit");
            events.commit();
        } else {
            conn.execute_batch("ROLLBACK").expect("rollback");
            events.discard();
        }
    }

    /// Whether `n` is new to `events`, asked in a transaction rolled back.
    fn new(conn: &Connection, events: &mut ProcessedEvents, n: u8) -> bool {
        let mut new = false;
        transaction(conn, events, false, |conn, events| {
            new = events.record(conn, &key(n), LATER).expect("record");
        });
        new
    }

    #[test]
    fn a_rolled_back_transaction_leaves_memory_as_the_table() {
        let conn = db();
        let mut events = ProcessedEvents::load(&conn, 100).expect("load");
        transaction(&conn, &mut events, true, |conn, events| {
            assert!(events.record(conn, &key(1), SOON).expect("record"));
            assert!(events.record(conn, &key(2), LATER).expect("record"));
        });
        // Recorded, forgotten, purged and recorded again, all undone.
        transaction(&conn, &mut events, false, |conn, events| {
            assert!(events.record(conn, &key(3), LATER).expect("record"));
            assert!(!events.record(conn, &key(3), LATER).expect("record"));
            events.forget(conn, &key(2)).expect("forget");
            assert_eq!(events.purge(conn, SOON, true).expect("purge"), 1);
            assert!(events.record(conn, &key(1), LATER).expect("record"));
            assert!(events.record(conn, &key(2), LATER).expect("record"));
        });
        for events in [
            &mut events,
            &mut ProcessedEvents::load(&conn, 100).expect("load"),
        ] {
            assert_eq!(
                (1..=3).map(|n| new(&conn, events, n)).collect::<Vec<_>>(),
                [false, false, true]
            );
        }
        // Committed, the same changes hold in memory and in the table.
        transaction(&conn, &mut events, true, |conn, events| {
            assert!(events.record(conn, &key(3), LATER).expect("record"));
            events.forget(conn, &key(3)).expect("forget");
            assert_eq!(events.purge(conn, SOON, true).expect("purge"), 1);
        });
        for events in [
            &mut events,
            &mut ProcessedEvents::load(&conn, 100).expect("load"),
        ] {
            assert_eq!(
                (1..=3).map(|n| new(&conn, events, n)).collect::<Vec<_>>(),
                [true, false, true]
            );
        }
    }

    #[test]
    fn only_the_server_purges_the_keys_it_holds_in_memory() {
        let conn = db();
        let mut server = ProcessedEvents::load(&conn, 100).expect("load");
        transaction(&conn, &mut server, true, |conn, events| {
            assert!(events.record(conn, &key(1), SOON).expect("record"));
        });
        let mut admin = ProcessedEvents::load(&conn, 100).expect("load");
        transaction(&conn, &mut admin, true, |conn, events| {
            assert_eq!(events.purge(conn, SOON, false).expect("purge"), 0);
        });
        assert!(!new(
            &conn,
            &mut ProcessedEvents::load(&conn, 100).expect("load"),
            1
        ));
        transaction(&conn, &mut server, true, |conn, events| {
            assert_eq!(events.purge(conn, SOON, true).expect("purge"), 1);
        });
        assert!(new(&conn, &mut server, 1));
    }

    #[test]
    fn a_full_generation_starts_sealing_before_any_step_and_falls_behind_at_half_the_next() {
        let conn = db();
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        let record = |events: &mut ProcessedEvents, keys: std::ops::Range<u8>| {
            transaction(&conn, events, true, |conn, events| {
                for n in keys {
                    assert!(events.record(conn, &key(n), LATER).expect("record"));
                }
            });
        };
        let copied = || -> i64 {
            conn.query_row("SELECT count(*) FROM processed_events", [], |r| r.get(0))
                .expect("count")
        };
        record(&mut events, 0..4);
        events.seal_step(&conn, false).expect("step");
        assert_eq!(copied(), 0, "sealing, but nothing copied yet");
        assert!(!new(&conn, &mut events, 0));
        assert!(!events.behind());
        record(&mut events, 4..6);
        assert!(events.behind(), "half of the next generation is in");
        events.seal_step(&conn, true).expect("step");
        assert_eq!(copied(), 4);
    }

    #[test]
    fn a_seal_cut_short_is_finished_from_what_the_tables_hold() {
        let conn = db();
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        transaction(&conn, &mut events, true, |conn, events| {
            for n in 0..5 {
                assert!(events.record(conn, &key(n), LATER).expect("record"));
            }
        });
        // A crash after the first keys of generation 0 were copied, before the rest.
        conn.execute_batch(
            "INSERT INTO processed_events (generation, key, expires_at)
             SELECT generation, key, expires_at FROM processed_events_recent
             ORDER BY key LIMIT 2",
        )
        .expect("copy");
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!(events.due());
        transaction(&conn, &mut events, true, |conn, events| {
            assert!(events.record(conn, &key(5), LATER).expect("record"));
        });
        assert!((0..=5).all(|n| !new(&conn, &mut events, n)));
        let generations = |table: &str| -> Vec<(i64, i64)> {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT generation, count(*) FROM {table} GROUP BY 1 ORDER BY 1"
                ))
                .expect("query");
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("rows")
                .collect::<rusqlite::Result<_>>()
                .expect("rows")
        };
        // Copied, and the filter stored: its rows in the recent table are left over.
        events.seal_step(&conn, true).expect("seal");
        assert_eq!(generations("processed_events"), [(0, 5)]);
        assert_eq!(generations("processed_events_recent"), [(0, 5), (1, 1)]);
        assert_eq!(generations("processed_event_filters"), [(0, 1)]);
        // A crash now: the filter says generation 0 is sealed, its rows are cleared.
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!((0..=5).all(|n| !new(&conn, &mut events, n)));
        assert!(events.due());
        events.seal_step(&conn, true).expect("clear");
        assert!(!events.due());
        assert_eq!(generations("processed_events_recent"), [(1, 1)]);
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!((0..=5).all(|n| !new(&conn, &mut events, n)));
        assert!(new(&conn, &mut events, 6));
    }
}
