//! Pending pairing requests, in two tables: `pending_recent` for requests that arrived
//! lately and `pending_requests` for those that have waited longer.
//!
//! A request's key is a pair of digests, random: with every waiting request in one
//! B-tree, storing a request and deleting it at its match each dirtied a leaf of its
//! own in the table and another in its sender index, and with a million pending every
//! checkpoint copied those pages to as many places in the file (the writer spent a
//! third of its time waiting on the disk; issue 17, stop 24). Most requests are matched
//! soon after they arrive, so they are stored in a small table whose pages stay cached
//! and are written again and again between checkpoints, not once each. A request still
//! waiting after [`SETTLE_AFTER_MS`], or beyond the newest [`RECENT_ROWS`], is
//! moved (settled) into the large table by the writer between batches, a few hundred at
//! a time, in a transaction of its own. A pair has a row in one of the two tables at
//! most; every lookup, count and deletion looks in both.
//!
//! Looking in the large table costs a random leaf read each time (three or four per
//! request), so the server keeps a Bloom filter of its keys in memory ([`Settled`]):
//! every pair, and every (sending endpoint, target) couple, it holds. A request whose
//! pair has nothing settled, the usual case, then touches the recent table only. The
//! filter is filled before the rows it covers are committed (a rollback only adds false
//! positives) and is built from the table when the writer starts, so it never lacks a
//! key the table holds. Deleted rows stay in it until it is rebuilt, once as many rows
//! have been settled as it was sized for.

use std::cell::{Cell, RefCell};
use std::hash::Hasher;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::filter::Filter;
use crate::domain::{EndpointId, Offer, PendingCounts, PendingRequest, Protocol, Timestamp};
use crate::flow::{PairState, PairingSubmission};

/// Age at which a waiting request is settled: by then most of its kind have matched.
const SETTLE_AFTER_MS: i64 = 60_000;

/// Rows kept in the recent table at most (beyond, the oldest are settled): about 1.8 MiB
/// of rows with RSA-2048 endpoint keys, a fifth of the page cache.
pub(super) const RECENT_ROWS: u64 = 4_096;

/// Rows settled at most per step, so that one step holds the writer for a few
/// milliseconds at most.
const SETTLE_STEP: i64 = 512;

/// Settled rows a filter is sized for at least.
const MIN_SETTLED_ROWS: u64 = 65_536;

/// A submission as the pending tables see it: its digests, and its filter keys.
pub(super) struct Request<'a> {
    s: &'a PairingSubmission,
    requester: &'a [u8],
    target: &'a [u8],
    /// Its pair, the reverse pair, and its sender and target, as filter keys.
    pair: [u8; 16],
    reverse: [u8; 16],
    sender: [u8; 16],
}

impl<'a> Request<'a> {
    pub(super) fn of(s: &'a PairingSubmission) -> Self {
        let (requester, target) = (&s.requester_digest.0[..], &s.target_digest.0[..]);
        Self {
            s,
            requester,
            target,
            pair: pair_key(target, requester),
            reverse: pair_key(requester, target),
            sender: sender_key(s.request.endpoint_id.as_str(), target),
        }
    }
}

/// A row's pair as a filter key. Digests are HMAC-SHA-256 outputs, uniform and unknown
/// to senders, so halves of them make a uniform key with no hashing (a SHA-256 per key
/// was a third of the start's 0.7 s with a million settled rows). A digest of another
/// length (this build writes none) still gets a key, only a less uniform one: any key
/// that depends on the row alone keeps the filter free of false negatives.
fn pair_key(target: &[u8], requester: &[u8]) -> [u8; 16] {
    xor(
        target.get(..16).unwrap_or(target),
        requester.get(16..).unwrap_or(requester),
    )
}

/// A row's sending endpoint and target as a filter key: the target digest's other half
/// mixed with a fast hash of the endpoint id (a weak hash only costs false positives).
fn sender_key(endpoint_id: &str, target: &[u8]) -> [u8; 16] {
    let half = |seed: u8| {
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write_u8(seed);
        hasher.write(endpoint_id.as_bytes());
        hasher.finish().to_le_bytes()
    };
    let mut endpoint = [0; 16];
    endpoint[..8].copy_from_slice(&half(0));
    endpoint[8..].copy_from_slice(&half(1));
    xor(target.get(16..).unwrap_or(target), &endpoint)
}

/// The first 16 bytes of `a` and `b` XORed, zeros where either is shorter.
fn xor(a: &[u8], b: &[u8]) -> [u8; 16] {
    let mut key = [0; 16];
    for (k, (a, b)) in key.iter_mut().zip(a.iter().zip(b)) {
        *k = a ^ b;
    }
    key
}

/// The filter of the large table's keys.
#[derive(Debug)]
struct Settled {
    filter: Filter,
    /// Rows added since it was built.
    added: u64,
    /// Rows it is sized for (two keys each).
    rows: u64,
}

impl Settled {
    /// Built from every row of the table, sized for twice as many (or the minimum).
    fn build(conn: &Connection) -> rusqlite::Result<Self> {
        let rows: i64 =
            conn.query_row("SELECT count(*) FROM pending_requests", [], |r| r.get(0))?;
        let rows = (u64::try_from(rows).unwrap_or(0) * 2).max(MIN_SETTLED_ROWS);
        let mut settled = Self {
            filter: Filter::with_capacity(rows * 2),
            added: 0,
            rows,
        };
        // The sender index holds all three, in a tenth of the table's pages (the table
        // has the offers too).
        let mut stmt = conn.prepare(
            "SELECT target_digest, requester_digest, endpoint_id
             FROM pending_requests INDEXED BY pending_requests_sender",
        )?;
        let mut table = stmt.query([])?;
        while let Some(row) = table.next()? {
            settled.add(row)?;
        }
        settled.added = 0;
        Ok(settled)
    }

    /// Adds the keys of a row read as (target_digest, requester_digest, endpoint_id).
    fn add(&mut self, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
        let target = row.get_ref(0)?.as_blob()?;
        let requester = row.get_ref(1)?.as_blob()?;
        let endpoint_id = row.get_ref(2)?.as_str()?;
        self.filter.insert(&pair_key(target, requester));
        self.filter.insert(&sender_key(endpoint_id, target));
        self.added += 1;
        Ok(())
    }
}

/// The pending requests as the writer tracks them: how full the recent table is, and the
/// filter of the large table's keys.
#[derive(Debug)]
pub(super) struct Pending {
    /// Rows kept in the recent table at most ([`RECENT_ROWS`]; tests make it small).
    recent_rows: u64,
    /// Rows stored in the recent table since it was last counted (rolled-back ones
    /// included: it only decides when to count).
    stored: Cell<u64>,
    /// `None` where no request is planned (an admin command, `migrate`): every lookup
    /// then reads the large table.
    settled: RefCell<Option<Settled>>,
}

impl Pending {
    /// For the server (`filtered`), with the large table's filter built from its rows.
    pub(super) fn load(
        conn: &Connection,
        recent_rows: u64,
        filtered: bool,
    ) -> rusqlite::Result<Self> {
        let settled = if filtered {
            Some(Settled::build(conn)?)
        } else {
            None
        };
        Ok(Self {
            recent_rows,
            // Counted at the first step: an earlier process may have left it full.
            stored: Cell::new(recent_rows),
            settled: RefCell::new(settled),
        })
    }

    /// False if the large table certainly has no row with this key.
    fn may_be_settled(&self, key: &[u8; 16]) -> bool {
        self.settled
            .borrow()
            .as_ref()
            .is_none_or(|settled| settled.filter.may_contain(key))
    }

    /// Settles one step's worth of rows that are too old, or too many: none if neither.
    /// Returns how many were moved.
    pub(super) fn settle(&self, conn: &Connection, now: Timestamp) -> rusqlite::Result<usize> {
        self.rebuild_if_full(conn)?;
        let oldest: Option<i64> = conn
            .prepare_cached("SELECT min(created_at) FROM pending_recent")?
            .query_row([], |r| r.get(0))?;
        let Some(oldest) = oldest else {
            self.stored.set(0);
            return Ok(0);
        };
        let by_age = now.0.saturating_sub(SETTLE_AFTER_MS);
        let mut cutoff = (oldest <= by_age).then_some(by_age);
        // Counting walks the table, so only once enough rows were stored to matter.
        let mut excess = 0;
        if self.stored.get() >= (self.recent_rows / 8).max(1) {
            let rows: i64 = conn
                .prepare_cached("SELECT count(*) FROM pending_recent")?
                .query_row([], |r| r.get(0))?;
            excess = u64::try_from(rows)
                .unwrap_or(0)
                .saturating_sub(self.recent_rows);
            self.stored.set(0);
        }
        let step = i64::try_from(excess)
            .unwrap_or(i64::MAX)
            .clamp(1, SETTLE_STEP);
        let nth_oldest = |n: i64| -> rusqlite::Result<Option<i64>> {
            conn.prepare_cached(
                "SELECT created_at FROM pending_recent ORDER BY created_at LIMIT 1 OFFSET ?1",
            )?
            .query_row(params![n - 1], |r| r.get(0))
            .optional()
        };
        if excess > 0 {
            cutoff = cutoff.max(nth_oldest(step)?);
        }
        let Some(mut cutoff) = cutoff else {
            return Ok(0);
        };
        // No more than a step (ties in `created_at` may add a few).
        if let Some(limit) = nth_oldest(SETTLE_STEP)? {
            cutoff = cutoff.min(limit);
        }
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let moved = self.move_rows(&tx, cutoff)?;
        tx.commit()?;
        if excess > moved as u64 {
            // Not all of it this time: count again after the next batch.
            self.stored.set(self.recent_rows);
        }
        Ok(moved)
    }

    /// Notes a row stored in the recent table.
    fn stored(&self) {
        self.stored.set(self.stored.get().saturating_add(1));
    }

    /// Rebuilds the filter once as many rows were added as it was sized for: deleted
    /// rows' keys go, and it is sized for the table as it is now.
    fn rebuild_if_full(&self, conn: &Connection) -> rusqlite::Result<()> {
        let full = self
            .settled
            .borrow()
            .as_ref()
            .is_some_and(|settled| settled.added >= settled.rows);
        if full {
            let started = std::time::Instant::now();
            let settled = Settled::build(conn)?;
            tracing::info!(
                sized_for = settled.rows,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "filter of settled pending requests rebuilt"
            );
            *self.settled.borrow_mut() = Some(settled);
        }
        Ok(())
    }

    /// Moves the recent rows created at or before `cutoff` into the large table, inside
    /// the caller's transaction, their keys into the filter first.
    fn move_rows(&self, conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
        if let Some(settled) = self.settled.borrow_mut().as_mut() {
            let mut stmt = conn.prepare_cached(
                "SELECT target_digest, requester_digest, endpoint_id FROM pending_recent
                 WHERE created_at <= ?1",
            )?;
            let mut rows = stmt.query(params![cutoff])?;
            while let Some(row) = rows.next()? {
                settled.add(row)?;
            }
        }
        // In key order, so the inserts walk the large table forward. A pair's row is in
        // one table only; were one in both, the recent row is the newer.
        let moved = conn
            .prepare_cached(
                "INSERT INTO pending_requests (requester_digest, target_digest, endpoint_id,
                                               protocol, offer, created_at, expires_at)
                 SELECT requester_digest, target_digest, endpoint_id, protocol, offer,
                        created_at, expires_at
                 FROM pending_recent WHERE created_at <= ?1
                 ORDER BY target_digest, requester_digest
                 ON CONFLICT (target_digest, requester_digest) DO UPDATE SET
                     endpoint_id = excluded.endpoint_id, protocol = excluded.protocol,
                     offer = excluded.offer, created_at = excluded.created_at,
                     expires_at = excluded.expires_at",
            )?
            .execute(params![cutoff])?;
        conn.prepare_cached("DELETE FROM pending_recent WHERE created_at <= ?1")?
            .execute(params![cutoff])?;
        Ok(moved)
    }

    /// Moves every recent row into the large table, as a long-running server would in
    /// time, inside the caller's transaction.
    pub(super) fn settle_all(&self, conn: &Connection) -> rusqlite::Result<usize> {
        self.move_rows(conn, i64::MAX)
    }
}

/// What a request does to the pending tables.
impl Pending {
    /// Stores `s` to wait for its counterpart, replacing the pair's earlier request.
    pub(super) fn wait(&self, conn: &Connection, r: &Request<'_>) -> rusqlite::Result<()> {
        let (s, requester, target) = (r.s, r.requester, r.target);
        // The earlier request may have been settled: the new one is recent.
        if self.may_be_settled(&r.pair) {
            conn.prepare_cached(
                "DELETE FROM pending_requests WHERE target_digest = ?1 AND requester_digest = ?2",
            )?
            .execute(params![target, requester])?;
        }
        conn.prepare_cached(
            "INSERT INTO pending_recent (requester_digest, target_digest, endpoint_id,
                                         protocol, offer, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (target_digest, requester_digest) DO UPDATE SET
                 endpoint_id = excluded.endpoint_id, protocol = excluded.protocol,
                 offer = excluded.offer, created_at = excluded.created_at,
                 expires_at = excluded.expires_at",
        )?
        .execute(params![
            requester,
            target,
            s.request.endpoint_id.as_str(),
            s.request.offer.protocol.name(),
            s.request.offer.bytes,
            s.now.0,
            s.request_expiry.0
        ])?;
        self.stored();
        Ok(())
    }

    /// Deletes the pair's requests, both ways round, from both tables.
    pub(super) fn remove_pair(&self, conn: &Connection, r: &Request<'_>) -> rusqlite::Result<()> {
        let (requester, target) = (r.requester, r.target);
        conn.prepare_cached(
            "DELETE FROM pending_recent
             WHERE (requester_digest = ?1 AND target_digest = ?2)
                OR (requester_digest = ?2 AND target_digest = ?1)",
        )?
        .execute(params![requester, target])?;
        if self.may_be_settled(&r.pair) || self.may_be_settled(&r.reverse) {
            conn.prepare_cached(
                "DELETE FROM pending_requests
                 WHERE (requester_digest = ?1 AND target_digest = ?2)
                    OR (requester_digest = ?2 AND target_digest = ?1)",
            )?
            .execute(params![requester, target])?;
        }
        Ok(())
    }

    /// The live reverse request and the live request this one would replace.
    pub(super) fn pair_state(
        &self,
        conn: &Connection,
        r: &Request<'_>,
    ) -> rusqlite::Result<PairState> {
        let (s, requester, target) = (r.s, r.requester, r.target);
        let find = |requester: &[u8], target: &[u8], key: &[u8; 16]| {
            let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String, Vec<u8>)> {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            };
            let recent = conn
                .prepare_cached(
                    "SELECT endpoint_id, protocol, offer FROM pending_recent
                     WHERE requester_digest = ?1 AND target_digest = ?2 AND expires_at > ?3",
                )?
                .query_row(params![requester, target, s.now.0], read)
                .optional()?;
            if recent.is_some() || !self.may_be_settled(key) {
                return Ok(recent);
            }
            conn.prepare_cached(
                "SELECT endpoint_id, protocol, offer FROM pending_requests
                 WHERE requester_digest = ?1 AND target_digest = ?2 AND expires_at > ?3",
            )?
            .query_row(params![requester, target, s.now.0], read)
            .optional()
        };
        let counterpart = find(target, requester, &r.reverse)?;
        let previous = find(requester, target, &r.pair)?;
        Ok(PairState {
            counterpart: match counterpart {
                Some((id, protocol, bytes)) => pending_request(&id, &protocol, bytes)?,
                None => None,
            },
            previous: match previous {
                Some((id, _, _)) => Some(endpoint_id(&id)?),
                None => None,
            },
        })
    }

    /// Counts what the caps look at, stopping at each cap: a full count of a flooded
    /// sender's requests would cost more than the request is worth.
    pub(super) fn count_pending(
        &self,
        conn: &Connection,
        r: &Request<'_>,
    ) -> rusqlite::Result<PendingCounts> {
        let (s, requester, target) = (r.s, r.requester, r.target);
        // u32::MAX is no cap: nothing to count. The filter has no key for a sender alone.
        let from_sender: i64 = if s.limits.per_sender == u32::MAX {
            0
        } else {
            conn.prepare_cached(
                "SELECT count(*) FROM (
                     SELECT 1 FROM pending_recent
                     WHERE endpoint_id = ?1 AND expires_at > ?2
                       AND NOT (requester_digest = ?3 AND target_digest = ?4)
                     UNION ALL
                     SELECT 1 FROM pending_requests
                     WHERE endpoint_id = ?1 AND expires_at > ?2
                       AND NOT (requester_digest = ?3 AND target_digest = ?4)
                     LIMIT ?5)",
            )?
            .query_row(
                params![
                    s.request.endpoint_id.as_str(),
                    s.now.0,
                    requester,
                    target,
                    s.limits.per_sender
                ],
                |r| r.get(0),
            )?
        };
        let for_target = |sql: &str, limit: i64| -> rusqlite::Result<i64> {
            conn.prepare_cached(sql)?.query_row(
                params![
                    target,
                    s.now.0,
                    requester,
                    limit,
                    s.request.endpoint_id.as_str()
                ],
                |r| r.get(0),
            )
        };
        let cap = i64::from(s.limits.per_target);
        let mut for_target_count = for_target(
            "SELECT count(*) FROM (
                 SELECT 1 FROM pending_recent INDEXED BY pending_recent_sender
                 WHERE endpoint_id = ?5 AND target_digest = ?1 AND expires_at > ?2
                   AND requester_digest <> ?3
                 LIMIT ?4)",
            cap,
        )?;
        if for_target_count < cap && self.may_be_settled(&r.sender) {
            for_target_count += for_target(
                "SELECT count(*) FROM (
                     SELECT 1 FROM pending_requests INDEXED BY pending_requests_sender
                     WHERE endpoint_id = ?5 AND target_digest = ?1 AND expires_at > ?2
                       AND requester_digest <> ?3
                     LIMIT ?4)",
                cap - for_target_count,
            )?;
        }
        Ok(PendingCounts {
            from_sender: u64::try_from(from_sender).unwrap_or(0),
            for_target: u64::try_from(for_target_count).unwrap_or(0),
        })
    }
}

/// A stored pending request; `None` for a protocol this build does not know (a newer
/// build's row: it cannot match any request this build handles).
fn pending_request(
    id: &str,
    protocol: &str,
    bytes: Vec<u8>,
) -> rusqlite::Result<Option<PendingRequest>> {
    let endpoint_id = endpoint_id(id)?;
    Ok(
        Protocol::from_name(protocol).map(|protocol| PendingRequest {
            endpoint_id,
            offer: Offer { protocol, bytes },
        }),
    )
}

fn endpoint_id(id: &str) -> rusqlite::Result<EndpointId> {
    EndpointId::parse(id).map_err(|_| super::corrupt("pending endpoint id"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const MINUTE: i64 = 60_000;
    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        super::super::apply_migrations(&conn, 0, super::super::SCHEMA_VERSION).expect("schema");
        conn
    }

    /// A waiting request of pair `n`, stored recent at `created_at`.
    fn add(conn: &Connection, n: u32, created_at: i64, offer: &[u8]) {
        conn.execute(
            "INSERT INTO pending_recent (requester_digest, target_digest, endpoint_id,
                                         protocol, offer, created_at, expires_at)
             VALUES (?1, ?2, 'e', 'tmp', ?3, ?4, ?5)
             ON CONFLICT (target_digest, requester_digest) DO UPDATE SET
                 offer = excluded.offer, created_at = excluded.created_at",
            params![
                n.to_be_bytes(),
                (n + 1_000_000).to_be_bytes(),
                offer,
                created_at,
                created_at + 30 * 24 * 60 * MINUTE
            ],
        )
        .expect("insert");
    }

    /// The `created_at` of each row of `table`, oldest first.
    fn ages(conn: &Connection, table: &str) -> Vec<i64> {
        let mut stmt = conn
            .prepare(&format!("SELECT created_at FROM {table} ORDER BY 1"))
            .expect("query");
        stmt.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<rusqlite::Result<_>>()
            .expect("ages")
    }

    fn recent(conn: &Connection, rows: u64) -> Pending {
        Pending::load(conn, rows, true).expect("load")
    }

    #[test]
    fn a_request_past_the_age_is_settled_and_a_younger_one_stays() {
        let conn = db();
        add(&conn, 1, NOW.0 - 2 * MINUTE, b"old");
        add(&conn, 2, NOW.0 - MINUTE + 1, b"young");
        assert_eq!(recent(&conn, 100).settle(&conn, NOW).expect("settle"), 1);
        assert_eq!(ages(&conn, "pending_requests"), [NOW.0 - 2 * MINUTE]);
        assert_eq!(ages(&conn, "pending_recent"), [NOW.0 - MINUTE + 1]);
        // Nothing more is due.
        assert_eq!(recent(&conn, 100).settle(&conn, NOW).expect("settle"), 0);
    }

    #[test]
    fn beyond_the_recent_rows_the_oldest_are_settled() {
        let conn = db();
        let recent = recent(&conn, 4);
        for n in 0..10 {
            add(&conn, n, NOW.0 + i64::from(n), b"k");
            recent.stored();
        }
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 6);
        assert_eq!(
            ages(&conn, "pending_recent"),
            (6..10).map(|n| NOW.0 + n).collect::<Vec<_>>()
        );
        assert_eq!(ages(&conn, "pending_requests").len(), 6);
    }

    #[test]
    fn one_step_settles_a_step_of_rows_at_most() {
        let conn = db();
        for n in 0..1_000 {
            add(&conn, n, NOW.0 - 10 * MINUTE + i64::from(n), b"k");
        }
        let recent = recent(&conn, 100);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 512);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 488);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 0);
        assert_eq!(ages(&conn, "pending_requests").len(), 1_000);
    }

    #[test]
    fn a_settled_copy_of_a_pair_gives_way_to_the_recent_one() {
        let conn = db();
        add(&conn, 7, NOW.0 - 3 * MINUTE, b"first");
        recent(&conn, 100).settle_all(&conn).expect("settle");
        // A bug's duplicate: the recent row is the newer and must win.
        add(&conn, 7, NOW.0 - 2 * MINUTE, b"second");
        assert_eq!(recent(&conn, 100).settle(&conn, NOW).expect("settle"), 1);
        let offer: Vec<u8> = conn
            .query_row("SELECT offer FROM pending_requests", [], |r| r.get(0))
            .expect("row");
        assert_eq!(offer, b"second");
        assert!(ages(&conn, "pending_recent").is_empty());
    }

    fn settle_one(conn: &Connection, pending: &Pending, n: u8) -> [u8; 16] {
        // Digests as the server's are: uniform.
        let target: [u8; 32] = Sha256::digest([n, 0]).into();
        let requester: [u8; 32] = Sha256::digest([n, 1]).into();
        conn.execute(
            "INSERT INTO pending_recent (requester_digest, target_digest, endpoint_id,
                                         protocol, offer, created_at, expires_at)
             VALUES (?1, ?2, 'e', 'tmp', x'00', 0, 1)",
            params![requester, target],
        )
        .expect("insert");
        pending.settle_all(conn).expect("settle");
        pair_key(&target, &requester)
    }

    #[test]
    fn the_filter_covers_rows_settled_now_and_rows_found_at_start() {
        let conn = db();
        let pending = recent(&conn, 10);
        let now = settle_one(&conn, &pending, 1);
        assert!(pending.may_be_settled(&now));
        assert!(pending.may_be_settled(&sender_key("e", &Sha256::digest([1, 0]))));
        // A new writer (a restart) builds its filter from the table.
        let restarted = recent(&conn, 10);
        assert!(restarted.may_be_settled(&now));
        assert!(!restarted.may_be_settled(&pair_key(&[1; 32], &[1; 32])));
        // Without a filter, everything may be there.
        let admin = Pending::load(&conn, 10, false).expect("load");
        assert!(admin.may_be_settled(&pair_key(&[1; 32], &[1; 32])));
    }

    #[test]
    fn a_full_filter_is_rebuilt_without_the_deleted_rows() {
        let conn = db();
        let pending = recent(&conn, 10);
        let gone = settle_one(&conn, &pending, 1);
        let kept = settle_one(&conn, &pending, 2);
        let target: [u8; 32] = Sha256::digest([1, 0]).into();
        conn.execute(
            "DELETE FROM pending_requests WHERE target_digest = ?1",
            [target],
        )
        .expect("delete");
        pending.rebuild_if_full(&conn).expect("not full yet");
        assert!(pending.may_be_settled(&gone));
        if let Some(settled) = pending.settled.borrow_mut().as_mut() {
            settled.added = settled.rows;
        }
        pending.rebuild_if_full(&conn).expect("rebuild");
        assert!(!pending.may_be_settled(&gone));
        assert!(pending.may_be_settled(&kept));
    }
}
