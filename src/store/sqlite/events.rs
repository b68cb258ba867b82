//! Processed-event keys, kept in generations.
//!
//! Every request records its event's key, and keys are random: in one B-tree keyed by
//! them, each request wrote a leaf page somewhere new in a table that only grows (to
//! 180 days of events), and the cost of a request grew with it (the soak: 37 to 47 µs of
//! writer time per request over two minutes, against 20 µs with no keys at all). Here
//! the key leads with a generation number: new keys go into the current generation only,
//! a small part of the tree whose pages stay cached and are written again and again
//! between checkpoints, not once each. A generation is sealed once it holds
//! [`GENERATION_KEYS`] keys; its Bloom filter, kept in memory and stored beside it, lets
//! a request skip every sealed generation that certainly lacks its key, so that looking
//! in all of them costs a scan of their interleaved filters (64 contiguous bytes each),
//! and a B-tree lookup only for the rare false positive. Keys still expire one by one
//! (the expiry index); a generation whose keys are all gone loses its filter at the
//! next seal.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::filter::{Filter, Sealed};
use crate::domain::Timestamp;

/// Keys per generation. Smaller generations make inserts cheaper and filters more
/// numerous (each one asked by every request): at 65,536 the writer spent 26 µs per
/// request in a two-minute soak (1.9 million keys), at 262,144 30 µs, with one B-tree for
/// all keys 37-47 µs (alternated builds; issue 17's note, stop 24). At 16,384, with
/// interleaved filters, a request wrote 7 KiB instead of 9.5 but the writer's time per
/// request grew over a five-minute soak, 24 to 32 µs (stop 29).
pub(super) const GENERATION_KEYS: u64 = 65_536;

/// The generations of processed-event keys, as the writer holds them.
#[derive(Debug)]
pub(super) struct ProcessedEvents {
    generation_keys: u64,
    /// The generation new keys go into: the highest in the table (0 if it is empty).
    current: i64,
    /// Keys inserted into the current generation, including any whose transaction then
    /// rolled back: it only decides when to seal.
    current_keys: u64,
    /// The current generation's keys, and any rolled back: a superset, as a filter may be.
    current_filter: Filter,
    /// The sealed generations' filters.
    sealed: Sealed,
    /// Sealed generations whose filter was rebuilt at start and is not stored yet.
    unstored: Vec<i64>,
}

impl ProcessedEvents {
    /// Reads the generations of the table: stored filters, or filters built from the
    /// keys where none was stored (a database from before generations, or a crash
    /// between a seal's keys and its filter). Writes nothing: an admin command beside
    /// the server opens the store too.
    pub(super) fn load(conn: &Connection, generation_keys: u64) -> rusqlite::Result<Self> {
        let current: i64 = conn.query_row(
            "SELECT coalesce(max(generation), 0) FROM processed_events",
            [],
            |r| r.get(0),
        )?;
        let mut sealed = Sealed::new(generation_keys);
        let mut unstored = Vec::new();
        let mut next: Option<i64> = conn.query_row(
            "SELECT min(generation) FROM processed_events WHERE generation < ?1",
            params![current],
            |r| r.get(0),
        )?;
        while let Some(generation) = next {
            let stored: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT bits FROM processed_event_filters WHERE generation = ?1",
                    params![generation],
                    |r| r.get(0),
                )
                .optional()?;
            let filter = match stored.as_deref().and_then(Filter::from_bytes) {
                // Smaller than this build makes them: an earlier build's, at 12 bits per
                // key. Built again, it is interleaved with the others and passes fewer
                // absent keys. (Larger: a generation with more keys than most, kept.)
                Some(filter) if filter.size() >= sealed.filter_size() => filter,
                _ => {
                    unstored.push(generation);
                    build(conn, generation, generation_keys)?.1
                }
            };
            sealed.push(generation, filter);
            next = conn.query_row(
                "SELECT min(generation) FROM processed_events
                 WHERE generation > ?1 AND generation < ?2",
                params![generation, current],
                |r| r.get(0),
            )?;
        }
        let (current_keys, current_filter) = build(conn, current, generation_keys)?;
        Ok(Self {
            generation_keys,
            current,
            current_keys,
            current_filter,
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
        let inserted = conn
            .prepare_cached(
                "INSERT INTO processed_events (generation, key, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (generation, key) DO NOTHING",
            )?
            .execute(params![self.current, key, expiry.0])?
            == 1;
        if inserted {
            self.current_filter.insert(key);
            self.current_keys += 1;
        }
        Ok(inserted)
    }

    /// Takes back a key that [`Self::record`] inserted in the same transaction (so in
    /// the current generation: seals happen between transactions).
    pub(super) fn forget(&self, conn: &Connection, key: &[u8; 16]) -> rusqlite::Result<()> {
        conn.prepare_cached("DELETE FROM processed_events WHERE generation = ?1 AND key = ?2")?
            .execute(params![self.current, key])
            .map(drop)
    }

    /// Whether the current generation is due to be sealed.
    pub(super) fn full(&self) -> bool {
        self.current_keys >= self.generation_keys
    }

    /// Seals the current generation and starts the next, in a transaction of its own
    /// (the writer runs it between batches): stores its filter and any rebuilt at start,
    /// and drops the filters of generations whose keys have all expired. Memory follows
    /// only once that has committed.
    pub(super) fn seal(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        // Immediate: an admin command writing beside the server makes this wait its turn
        // rather than fail half-way.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
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
        let mut store = tx.prepare_cached(
            "INSERT OR REPLACE INTO processed_event_filters (generation, bits) VALUES (?1, ?2)",
        )?;
        for generation in &self.unstored {
            if let Some(bytes) = self.sealed.bytes_of(*generation)
                && !emptied.contains(generation)
            {
                store.execute(params![generation, bytes])?;
            }
        }
        store.execute(params![self.current, self.current_filter.to_bytes()])?;
        drop(store);
        tx.commit()?;
        self.sealed.remove(&emptied);
        let filter = std::mem::replace(
            &mut self.current_filter,
            Filter::with_capacity(self.generation_keys),
        );
        self.sealed.push(self.current, filter);
        self.current += 1;
        self.current_keys = 0;
        self.unstored.clear();
        tracing::debug!(
            generation = self.current - 1,
            sealed = self.sealed.len(),
            filter_bytes = self.filter_bytes(),
            "processed-event generation sealed"
        );
        Ok(())
    }

    /// Bytes of memory the filters hold.
    pub(super) fn filter_bytes(&self) -> usize {
        self.current_filter.size() + self.sealed.size()
    }
}

/// Counts a generation's keys and builds their filter, sized for at least `capacity`.
fn build(conn: &Connection, generation: i64, capacity: u64) -> rusqlite::Result<(u64, Filter)> {
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
    Ok((keys, filter))
}
