//! Processed-event keys, kept in generations.
//!
//! Every request records its event's key, and keys are random: in one B-tree keyed by
//! them, each request wrote a leaf page somewhere new in a table that only grows (to
//! 180 days of events), and the cost of a request grew with it (the soak: 37 to 47 µs of
//! writer time per request over two minutes, against 20 µs with no keys at all). Here
//! keys come in generations of [`GENERATION_KEYS`]:
//!
//! - The generation being filled is held in memory and appended, in the order its keys
//!   came, to `processed_events_recent`: recording a key dirties the last page of that
//!   table, not a random leaf of a tree (which was more than half of what the writer
//!   wrote per request; issue 17, stop 30).
//! - A full generation is sealed a few steps at a time, between batches, into buckets:
//!   rows of `processed_event_buckets` that each hold the sorted keys of one slice of
//!   the key space (about [`BUCKET_KEYS`], 2 KiB), written in order, so a seal appends
//!   a megabyte and touches no index (copying into a keyed table cost the writer 180 ms
//!   a generation, in steps that requests waited behind). The step that writes the last
//!   bucket stores the generation's row in `processed_event_generations`: its Bloom
//!   filter, bucket and key counts, and its latest expiry; the steps after it delete
//!   its keys from the recent table (that row tells a generation whose keys are left
//!   there from one still being written).
//! - The sealed generations' filters, held in memory, let a request skip every one that
//!   certainly lacks its key: looking in all of them costs a scan of their interleaved
//!   filters (64 contiguous bytes each) and, for the rare false positive, one bucket
//!   read (a page) and a binary search.
//! - A sealed generation expires whole, once its latest key has: a key stays longer than
//!   it would alone by the time its generation took to fill (under two hours at ten
//!   requests a second, against the 90 days of `--request-ttl`; more where keys come
//!   slowly). Keys not sealed yet expire one by one.
//!
//! Generations an earlier build sealed stay in `processed_events` (keyed by generation
//! and key, filters in `processed_event_filters`) until their keys expire there one by
//! one; nothing new goes there.

use std::collections::{BTreeMap, HashMap, VecDeque, btree_map};
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

/// Keys per bucket of a sealed generation, on average: 2 KiB, so that two buckets share
/// a 4 KiB page and reading one reads a page.
const BUCKET_KEYS: u64 = 128;

/// A generation's buckets have ids from `generation * BUCKET_STRIDE` on.
const BUCKET_STRIDE: i64 = 1 << 20;

/// Buckets a seal writes per step (64 KiB of keys), and rows of the recent table it
/// deletes per step once they are all written: each step holds the writer (and the
/// requests waiting for it) well under a millisecond.
const SEAL_STEP: u64 = 32;
const CLEAR_STEP: i64 = 1_024;

/// Keys of a sealed generation freed per step (about a tenth of a millisecond).
const FREE_STEP: usize = 8_192;

/// The bucket of `key` among `buckets`: a slice of the key space, in key order (the
/// keys are digests, so the slices hold about as many keys each).
fn bucket_of(key: &[u8; 16], buckets: u64) -> u64 {
    let mut high = [0; 8];
    high.copy_from_slice(&key[..8]);
    ((u128::from(u64::from_be_bytes(high)) * u128::from(buckets)) >> 64) as u64
}

/// Buckets for a generation of `keys` keys.
fn buckets_for(keys: u64) -> u64 {
    keys.div_ceil(BUCKET_KEYS).clamp(1, BUCKET_STRIDE as u64)
}

/// Whether a bucket as stored (sorted 16-byte keys) holds `key`.
fn bucket_holds(bucket: &[u8], key: &[u8; 16]) -> bool {
    let keys = bucket.len() / 16;
    let (mut low, mut high) = (0, keys);
    while low < high {
        let mid = low + (high - low) / 2;
        match bucket[mid * 16..mid * 16 + 16].cmp(key.as_slice()) {
            std::cmp::Ordering::Less => low = mid + 1,
            std::cmp::Ordering::Greater => high = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// A key not sealed yet: its expiry, and its row in the recent table.
#[derive(Debug, Clone, Copy)]
struct Recent {
    expiry: i64,
    seq: i64,
}

/// Keys with their expiry and row, in key order (which is bucket order): a generation
/// is written bucket by bucket with nothing to sort (sorting 65,536 keys at once held
/// the writer for milliseconds).
type Keys = BTreeMap<[u8; 16], Recent>;

/// What the transaction in progress did to the keys in memory, undone if it rolls back.
#[derive(Debug)]
enum Undo {
    Inserted([u8; 16]),
    Removed([u8; 16], Recent),
}

/// A full generation whose buckets are being written; its keys are still in the recent
/// table.
#[derive(Debug)]
struct Sealing {
    generation: i64,
    keys: Keys,
    buckets: u64,
    written: Written,
    filter: Filter,
}

/// How far a seal has written.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    /// Buckets below this one are written.
    buckets: u64,
    /// The last key written: those before it are in written buckets.
    last: Option<[u8; 16]>,
    /// The written keys' rows in the recent table have a `seq` in this range, and the
    /// latest of their expiries: gathered step by step, since a pass over 65,536 keys
    /// in a B-tree costs the writer a millisecond (issue 17, stop 32).
    seqs: Option<(i64, i64)>,
    expires_at: i64,
}

/// The next buckets of a generation being sealed, each as (bucket, its keys
/// concatenated; empty buckets are left out: a lookup finds no row, and no key), and
/// how far the seal has written once they are.
#[derive(Debug)]
struct Step {
    buckets: Vec<(u64, Vec<u8>)>,
    written: Written,
}

impl Sealing {
    /// `filter` holds every one of `keys`, perhaps more.
    fn new(generation: i64, keys: Keys, filter: Filter) -> Self {
        Self {
            generation,
            buckets: buckets_for(keys.len() as u64),
            keys,
            written: Written::default(),
            filter,
        }
    }

    /// The buckets from those written to the next step's end.
    fn next_step(&self) -> Step {
        let end = self
            .written
            .buckets
            .saturating_add(SEAL_STEP)
            .min(self.buckets);
        let from = self.written.last.map_or(Bound::Unbounded, Bound::Excluded);
        let mut step = Step {
            buckets: Vec::new(),
            written: Written {
                buckets: end,
                ..self.written
            },
        };
        for (key, recent) in self.keys.range((from, Bound::Unbounded)) {
            let bucket = bucket_of(key, self.buckets);
            if bucket >= end {
                break;
            }
            match step.buckets.last_mut() {
                Some((b, bytes)) if *b == bucket => bytes.extend_from_slice(key),
                _ => step.buckets.push((bucket, key.to_vec())),
            }
            let written = &mut step.written;
            written.last = Some(*key);
            written.seqs = Some(
                written
                    .seqs
                    .map_or((recent.seq, recent.seq), |(first, last)| {
                        (first.min(recent.seq), last.max(recent.seq))
                    }),
            );
            written.expires_at = written.expires_at.max(recent.expiry);
        }
        step
    }
}

/// A sealed generation whose rows are still in the recent table: they are deleted a
/// range of `seq` at a time.
#[derive(Debug)]
struct Clearing {
    generation: i64,
    /// The next range starts here.
    next: i64,
    last: i64,
}

/// A filter of `keys`, sized for at least `capacity`.
fn filter_of<'a>(keys: impl ExactSizeIterator<Item = &'a [u8; 16]>, capacity: u64) -> Filter {
    let mut filter = Filter::with_capacity(capacity.max(keys.len() as u64));
    for key in keys {
        filter.insert(key);
    }
    filter
}

/// Where a sealed generation's keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// In buckets, this many.
    Buckets(u64),
    /// In `processed_events`, as an earlier build left them.
    Keyed,
}

/// Counts the keys of every generation: sealed in buckets or by an earlier build, or not
/// sealed yet (a generation whose rows are left in the recent table once sealed is
/// counted once).
pub const COUNT_KEYS: &str = "SELECT (SELECT count(*) FROM processed_events)
     + (SELECT coalesce(sum(keys), 0) FROM processed_event_generations)
     + (SELECT count(*) FROM processed_events_recent
        WHERE generation NOT IN (SELECT generation FROM processed_event_generations))";

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
    /// Keys of sealed generations, freed a slice at a time.
    spent: VecDeque<btree_map::IntoIter<[u8; 16], Recent>>,
    /// The sealed generations' filters: a superset, since a purge beside them (an
    /// admin command's, or a transaction's that then rolls back) leaves memory alone;
    /// the next seal drops those whose keys are gone.
    sealed: Sealed,
    kinds: HashMap<i64, Kind>,
    /// Generations an earlier build sealed whose filter was rebuilt at start and is not
    /// stored yet.
    unstored: Vec<i64>,
}

impl ProcessedEvents {
    /// Reads the generations: the recent table's keys, the sealed generations' filters
    /// (built from the keys where none was stored: a database from before generations,
    /// or a generation an earlier build filled in place). Writes nothing: an admin
    /// command beside the server opens the store too.
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
        let mut filters: Vec<(i64, Filter)> = Vec::new();
        let mut kinds = HashMap::new();
        let filter_size = Sealed::new(generation_keys).filter_size();
        {
            let mut stmt = conn.prepare(
                "SELECT generation, buckets, keys, bits FROM processed_event_generations
                 ORDER BY generation",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let generation: i64 = row.get(0)?;
                let buckets = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(1);
                let filter = match Filter::from_bytes(row.get_ref(3)?.as_blob()?) {
                    Some(filter) => filter,
                    None => {
                        let keys = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
                        build_from_buckets(conn, generation, keys.max(generation_keys))?
                    }
                };
                filters.push((generation, filter));
                kinds.insert(generation, Kind::Buckets(buckets));
            }
        }
        let mut unstored = Vec::new();
        let mut next: Option<i64> =
            conn.query_row("SELECT min(generation) FROM processed_events", [], |r| {
                r.get(0)
            })?;
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
                Some(filter) if filter.size() >= filter_size => filter,
                _ => {
                    unstored.push(generation);
                    build_keyed(conn, generation, generation_keys)?
                }
            };
            filters.push((generation, filter));
            kinds.insert(generation, Kind::Keyed);
            next = conn.query_row(
                "SELECT min(generation) FROM processed_events WHERE generation > ?1",
                params![generation],
                |r| r.get(0),
            )?;
        }
        // Keys go into a generation newer than any sealed or with buckets written; a
        // generation in the recent table with no row of its own was being sealed, unless
        // it is the newest and no bucket of it was written.
        let last_bucket: Option<i64> =
            conn.query_row("SELECT max(id) FROM processed_event_buckets", [], |r| {
                r.get(0)
            })?;
        let current = by_generation
            .last()
            .map(|(g, _)| *g)
            .into_iter()
            .chain(filters.iter().map(|(g, _)| g + 1))
            .chain(last_bucket.map(|id| id.div_euclid(BUCKET_STRIDE) + 1))
            .max()
            .unwrap_or(0);
        let mut recent = Keys::new();
        let mut sealing = VecDeque::new();
        let mut clearing = VecDeque::new();
        for (generation, keys) in by_generation {
            if generation == current {
                recent = keys;
            } else if kinds.contains_key(&generation) {
                let seqs = keys.values().map(|r| r.seq);
                clearing.push_back(Clearing {
                    generation,
                    next: seqs.clone().min().unwrap_or(0),
                    last: seqs.max().unwrap_or(0),
                });
            } else {
                let filter = filter_of(keys.keys(), generation_keys);
                sealing.push_back(Sealing::new(generation, keys, filter));
            }
        }
        let recent_filter = filter_of(recent.keys(), generation_keys);
        filters.sort_by_key(|(g, _)| *g);
        let mut sealed = Sealed::new(generation_keys);
        for (generation, filter) in filters {
            sealed.push(generation, filter);
        }
        Ok(Self {
            generation_keys,
            current,
            recent,
            recent_filter,
            undo: Vec::new(),
            sealing,
            clearing,
            spent: VecDeque::new(),
            sealed,
            kinds,
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
            if self.sealed_holds(conn, generation, key)? {
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

    /// Whether sealed `generation` holds `key`, as its table says.
    fn sealed_holds(
        &self,
        conn: &Connection,
        generation: i64,
        key: &[u8; 16],
    ) -> rusqlite::Result<bool> {
        match self.kinds.get(&generation) {
            Some(Kind::Buckets(buckets)) => {
                let id = generation * BUCKET_STRIDE + bucket_of(key, *buckets) as i64;
                let mut stmt =
                    conn.prepare_cached("SELECT keys FROM processed_event_buckets WHERE id = ?1")?;
                let mut rows = stmt.query(params![id])?;
                match rows.next()? {
                    Some(row) => Ok(bucket_holds(row.get_ref(0)?.as_blob()?, key)),
                    None => Ok(false),
                }
            }
            Some(Kind::Keyed) => conn
                .prepare_cached(
                    "SELECT 1 FROM processed_events WHERE generation = ?1 AND key = ?2",
                )?
                .exists(params![generation, key]),
            None => Ok(false),
        }
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

    /// Deletes the keys that expired by `now`; returns how many. A sealed generation
    /// goes whole once its latest key has expired; one being sealed keeps its keys
    /// until it is sealed. Only the server (`serving`) purges the current generation's
    /// keys, since it holds them in memory.
    pub(super) fn purge(
        &mut self,
        conn: &Connection,
        now: Timestamp,
        serving: bool,
    ) -> rusqlite::Result<u64> {
        let mut purged = conn
            .prepare_cached("DELETE FROM processed_events WHERE expires_at <= ?1")?
            .execute(params![now.0])? as u64;
        let expired: Vec<(i64, i64)> = conn
            .prepare_cached(
                "SELECT generation, keys FROM processed_event_generations
                 WHERE expires_at <= ?1",
            )?
            .query_map(params![now.0], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (generation, keys) in expired {
            conn.prepare_cached("DELETE FROM processed_event_buckets WHERE id >= ?1 AND id < ?2")?
                .execute(params![
                    generation * BUCKET_STRIDE,
                    (generation + 1) * BUCKET_STRIDE
                ])?;
            conn.prepare_cached("DELETE FROM processed_event_generations WHERE generation = ?1")?
                .execute(params![generation])?;
            // Rows left in the recent table would make it a generation being sealed.
            // Rows come in generation order, so any of its rows are before the first of a
            // newer generation: the scan stops there, not at the end of the table.
            conn.prepare_cached(
                "DELETE FROM processed_events_recent WHERE generation = ?1 AND seq < coalesce(
                     (SELECT seq FROM processed_events_recent WHERE generation > ?1
                      ORDER BY seq LIMIT 1),
                     9223372036854775807)",
            )?
            .execute(params![generation])?;
            purged += u64::try_from(keys).unwrap_or(0);
        }
        if !serving {
            return Ok(purged);
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
                .execute(params![self.current, now.0])? as u64;
            for (key, recent) in expired {
                self.recent.remove(&key);
                self.undo.push(Undo::Removed(key, recent));
            }
        }
        Ok(purged)
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
            || !self.spent.is_empty()
            || self.recent.len() as u64 >= self.generation_keys
    }

    /// Whether the seal under way falls behind: half of the next generation is in.
    pub(super) fn behind(&self) -> bool {
        self.recent.len() as u64 >= self.generation_keys / 2
    }

    /// One step of sealing (the writer runs it between batches), in a transaction of
    /// its own: a full current generation starts being sealed and the next one starts;
    /// the oldest generation being sealed gets its next buckets written. The step that
    /// writes its last stores its row (filter, counts, expiry) and the filters rebuilt at
    /// start, and drops the filters of generations whose keys are gone; the steps after
    /// it delete its rows from the recent table. Memory follows only once a step has
    /// committed. Unless `step`, a full generation only starts being sealed, and nothing
    /// is written.
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
        self.free_spent();
        let Some(sealing) = self.sealing.front() else {
            return self.clear_step(conn);
        };
        // Immediate: an admin command writing beside the server makes this wait its turn
        // rather than fail half-way.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let step = sealing.next_step();
        {
            let mut write = tx.prepare_cached(
                "INSERT OR REPLACE INTO processed_event_buckets (id, keys) VALUES (?1, ?2)",
            )?;
            for (bucket, keys) in &step.buckets {
                write.execute(params![
                    sealing.generation * BUCKET_STRIDE + *bucket as i64,
                    keys
                ])?;
            }
        }
        if step.written.buckets < sealing.buckets {
            tx.commit()?;
            if let Some(sealing) = self.sealing.front_mut() {
                sealing.written = step.written;
            }
            return Ok(());
        }
        let gone = self.emptied(&tx)?;
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
                    && !gone.contains(generation)
                {
                    store.execute(params![generation, bytes])?;
                }
            }
        }
        tx.prepare_cached(
            "INSERT OR REPLACE INTO processed_event_generations
                 (generation, buckets, keys, expires_at, bits) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            sealing.generation,
            sealing.buckets as i64,
            sealing.keys.len() as i64,
            step.written.expires_at,
            sealing.filter.to_bytes()
        ])?;
        tx.commit()?;
        self.sealed.remove(&gone);
        for generation in &gone {
            self.kinds.remove(generation);
        }
        if let Some(sealing) = self.sealing.pop_front() {
            let (next, last) = step.written.seqs.unwrap_or((0, 0));
            self.clearing.push_back(Clearing {
                generation: sealing.generation,
                next,
                last,
            });
            self.sealed.push(sealing.generation, sealing.filter);
            self.kinds
                .insert(sealing.generation, Kind::Buckets(sealing.buckets));
            tracing::debug!(
                generation = sealing.generation,
                keys = sealing.keys.len(),
                sealed = self.sealed.len(),
                memory_bytes = self.memory_bytes(),
                "processed-event generation sealed"
            );
            // Freed a slice per step: at once, its 65,536 keys held the writer for
            // most of a millisecond.
            self.spent.push_back(sealing.keys.into_iter());
        }
        self.unstored.clear();
        Ok(())
    }

    /// Frees the next slice of the keys of generations sealed since.
    fn free_spent(&mut self) {
        if let Some(keys) = self.spent.front_mut()
            && keys.by_ref().take(FREE_STEP).count() < FREE_STEP
        {
            self.spent.pop_front();
        }
    }

    /// The sealed generations whose keys are all gone (purged), as `tx` sees them.
    fn emptied(&self, tx: &Connection) -> rusqlite::Result<Vec<i64>> {
        let mut gone = Vec::new();
        for generation in self.sealed.generations() {
            let any: bool = match self.kinds.get(&generation) {
                Some(Kind::Buckets(_)) => tx
                    .prepare_cached(
                        "SELECT 1 FROM processed_event_generations WHERE generation = ?1",
                    )?
                    .exists(params![generation])?,
                Some(Kind::Keyed) => tx
                    .prepare_cached("SELECT 1 FROM processed_events WHERE generation = ?1")?
                    .exists(params![generation])?,
                None => false,
            };
            if !any {
                gone.push(generation);
            }
        }
        Ok(gone)
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
    fn memory_bytes(&self) -> usize {
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

/// Builds the filter of a generation an earlier build sealed, sized for at least
/// `capacity`.
fn build_keyed(conn: &Connection, generation: i64, capacity: u64) -> rusqlite::Result<Filter> {
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

/// Builds the filter of a generation in buckets (its stored one unreadable).
fn build_from_buckets(
    conn: &Connection,
    generation: i64,
    capacity: u64,
) -> rusqlite::Result<Filter> {
    let mut filter = Filter::with_capacity(capacity);
    let mut stmt =
        conn.prepare("SELECT keys FROM processed_event_buckets WHERE id >= ?1 AND id < ?2")?;
    let mut rows = stmt.query(params![
        generation * BUCKET_STRIDE,
        (generation + 1) * BUCKET_STRIDE
    ])?;
    while let Some(row) = rows.next()? {
        for key in row.get_ref(0)?.as_blob()?.chunks_exact(16) {
            if let Ok(key) = <[u8; 16]>::try_from(key) {
                filter.insert(&key);
            }
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

    fn record(conn: &Connection, events: &mut ProcessedEvents, keys: std::ops::Range<u8>) {
        transaction(conn, events, true, |conn, events| {
            for n in keys {
                assert!(events.record(conn, &key(n), LATER).expect("record"));
            }
        });
    }

    fn count(conn: &Connection, query: &str) -> i64 {
        conn.query_row(query, [], |r| r.get(0)).expect("count")
    }

    #[test]
    fn buckets_slice_the_key_space_in_key_order_and_find_exactly_their_keys() {
        // xorshift: keys spread as digests are.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let keys: Keys = (0..5_000_i64)
            .map(|i| {
                let mut key = [0; 16];
                key[..8].copy_from_slice(&next().to_be_bytes());
                key[8..].copy_from_slice(&next().to_be_bytes());
                let expiry = i * 7_919 % 10_007;
                (
                    key,
                    Recent {
                        expiry,
                        seq: 100 + i,
                    },
                )
            })
            .collect();
        let buckets = buckets_for(keys.len() as u64);
        assert_eq!(buckets, 40);
        let of: Vec<u64> = keys.keys().map(|k| bucket_of(k, buckets)).collect();
        assert!(of.windows(2).all(|w| w[0] <= w[1]), "in key order");
        assert_eq!((of[0], of[of.len() - 1]), (0, buckets - 1));
        let mut sealing = Sealing::new(0, keys.clone(), Filter::with_capacity(1));
        let mut stored: Vec<(u64, Vec<u8>)> = Vec::new();
        while sealing.written.buckets < sealing.buckets {
            let mut step = sealing.next_step();
            let written = sealing.written.buckets..step.written.buckets;
            assert!(step.buckets.iter().all(|(b, _)| written.contains(b)));
            stored.append(&mut step.buckets);
            sealing.written = step.written;
        }
        assert_eq!(stored.len() as u64, buckets);
        // Gathered step by step: the rows to clear, and when the generation expires.
        assert_eq!(sealing.written.seqs, Some((100, 5_099)));
        assert_eq!(
            sealing.written.expires_at,
            keys.values().map(|r| r.expiry).max().expect("keys")
        );
        // About 125 keys each: none starved, none twice the mean.
        assert!(
            stored
                .iter()
                .all(|(_, k)| (40..250).contains(&(k.len() / 16)))
        );
        assert_eq!(
            stored.iter().map(|(_, k)| k.len() / 16).sum::<usize>(),
            keys.len()
        );
        for key in keys.keys() {
            let bucket = &stored[bucket_of(key, buckets) as usize].1;
            assert!(bucket_holds(bucket, key));
            let mut other = *key;
            other[15] ^= 1;
            assert_eq!(bucket_holds(bucket, &other), keys.contains_key(&other));
        }
        assert!(!bucket_holds(&[], &key(1)));
    }

    /// Which of keys 1, 2 and 3 are new, to `events` and to the table loaded afresh.
    fn assert_new(conn: &Connection, events: &mut ProcessedEvents, expected: [bool; 3]) {
        for events in [events, &mut ProcessedEvents::load(conn, 100).expect("load")] {
            assert_eq!(
                (1..=3).map(|n| new(conn, events, n)).collect::<Vec<_>>(),
                expected
            );
        }
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
        assert_new(&conn, &mut events, [false, false, true]);
        // Committed, the same changes hold in memory and in the table.
        transaction(&conn, &mut events, true, |conn, events| {
            assert!(events.record(conn, &key(3), LATER).expect("record"));
            events.forget(conn, &key(3)).expect("forget");
            assert_eq!(events.purge(conn, SOON, true).expect("purge"), 1);
        });
        assert_new(&conn, &mut events, [true, false, true]);
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
        let buckets = "SELECT count(*) FROM processed_event_buckets";
        record(&conn, &mut events, 0..4);
        events.seal_step(&conn, false).expect("step");
        assert_eq!(count(&conn, buckets), 0, "sealing, but nothing written yet");
        assert!(!new(&conn, &mut events, 0));
        assert!(!events.behind());
        record(&conn, &mut events, 4..6);
        assert!(events.behind(), "half of the next generation is in");
        events.seal_step(&conn, true).expect("step");
        assert_eq!(count(&conn, buckets), 1);
        let row = "SELECT keys * 100 + buckets FROM processed_event_generations";
        assert_eq!(count(&conn, row), 401);
        assert!((0..6).all(|n| !new(&conn, &mut events, n)));
    }

    #[test]
    fn an_expired_generation_goes_whole_with_its_rows_left_in_the_recent_table() {
        let conn = db();
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        record(&conn, &mut events, 0..5);
        events.seal_step(&conn, true).expect("seal");
        record(&conn, &mut events, 5..6);
        let mut admin = ProcessedEvents::load(&conn, 4).expect("load");
        transaction(&conn, &mut admin, true, |conn, events| {
            assert_eq!(events.purge(conn, LATER, false).expect("purge"), 5);
        });
        let recent = "SELECT count(*) * 100 + min(generation) FROM processed_events_recent";
        assert_eq!(
            count(&conn, recent),
            101,
            "the newer generation's row stays"
        );
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!(!events.due());
        assert!((0..5).all(|n| new(&conn, &mut events, n)));
        assert!(!new(&conn, &mut events, 5));
        assert_eq!(count(&conn, COUNT_KEYS), 1);
    }

    #[test]
    fn a_sealed_generation_left_in_the_recent_table_is_cleared_after_a_restart() {
        let conn = db();
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        record(&conn, &mut events, 0..5);
        // Its last bucket written (the only one), a key recorded in the next, then a
        // crash: rows left in the recent table.
        events.seal_step(&conn, true).expect("seal");
        record(&conn, &mut events, 5..6);
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
        assert_eq!(generations("processed_event_generations"), [(0, 1)]);
        assert_eq!(generations("processed_events_recent"), [(0, 5), (1, 1)]);
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!((0..5).all(|n| !new(&conn, &mut events, n)));
        assert!(events.due());
        events.seal_step(&conn, true).expect("clear");
        assert!(!events.due());
        assert_eq!(generations("processed_events_recent"), [(1, 1)]);
        let mut events = ProcessedEvents::load(&conn, 4).expect("load");
        assert!((0..5).all(|n| !new(&conn, &mut events, n)));
        assert!((0..6).all(|n| !new(&conn, &mut events, n)));
        assert!(new(&conn, &mut events, 6));
        assert_eq!(count(&conn, COUNT_KEYS), 6);
    }
}
