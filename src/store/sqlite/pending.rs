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
//! waiting after [`SETTLE_AFTER_MS`], or beyond the newest [`Tuning::recent_rows`], is
//! moved (settled) into the large table by the writer between batches, a few hundred at
//! a time, in a transaction of its own. A pair has a row in one of the two tables at
//! most; every lookup, count and deletion looks in both.

use std::cell::Cell;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::domain::{EndpointId, Offer, PendingCounts, PendingRequest, Protocol, Timestamp};
use crate::flow::{PairState, PairingSubmission};

/// Age at which a waiting request is settled: by then most of its kind have matched.
pub(super) const SETTLE_AFTER_MS: i64 = 60_000;

/// Rows kept in the recent table at most (beyond, the oldest are settled): about 1.8 MiB
/// of rows with RSA-2048 endpoint keys, a fifth of the page cache.
pub(super) const RECENT_ROWS: u64 = 4_096;

/// Rows settled at most per step, so that one step holds the writer for a few
/// milliseconds at most.
const SETTLE_STEP: i64 = 512;

/// How the recent table is sized (tests make it small).
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    pub recent_rows: u64,
}

/// The recent table as the writer tracks it.
#[derive(Debug)]
pub(super) struct Recent {
    tuning: Tuning,
    /// Rows stored in the recent table since it was last counted (rolled-back ones
    /// included: it only decides when to count).
    stored: Cell<u64>,
}

impl Recent {
    pub(super) fn new(tuning: Tuning) -> Self {
        Self {
            tuning,
            // Counted at the first step: an earlier process may have left it full.
            stored: Cell::new(tuning.recent_rows),
        }
    }

    /// Settles one step's worth of rows that are too old, or too many: none if neither.
    /// Returns how many were moved.
    pub(super) fn settle(&self, conn: &Connection, now: Timestamp) -> rusqlite::Result<usize> {
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
        if self.stored.get() >= (self.tuning.recent_rows / 8).max(1) {
            let rows: i64 = conn
                .prepare_cached("SELECT count(*) FROM pending_recent")?
                .query_row([], |r| r.get(0))?;
            excess = u64::try_from(rows)
                .unwrap_or(0)
                .saturating_sub(self.tuning.recent_rows);
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
        let moved = move_up_to(conn, cutoff)?;
        if excess > moved as u64 {
            // Not all of it this time: count again after the next batch.
            self.stored.set(self.tuning.recent_rows);
        }
        Ok(moved)
    }

    /// Notes a row stored in the recent table.
    fn stored(&self) {
        self.stored.set(self.stored.get().saturating_add(1));
    }
}

/// Moves the recent rows created at or before `cutoff` into the large table, in one
/// immediate transaction (an admin command writing beside the server makes it wait its
/// turn rather than fail half-way).
fn move_up_to(conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let moved = move_rows(&tx, cutoff)?;
    tx.commit()?;
    Ok(moved)
}

/// [`move_up_to`] inside the caller's transaction.
fn move_rows(conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
    // In key order, so the inserts walk the large table forward. A pair's row is in one
    // table only; were one in both, the recent row is the newer.
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

/// Moves every recent row into the large table, as a long-running server would in time,
/// inside the caller's transaction.
pub(super) fn settle_all(conn: &Connection) -> rusqlite::Result<usize> {
    move_rows(conn, i64::MAX)
}

/// Stores `s` to wait for its counterpart, replacing the pair's earlier request.
pub(super) fn wait(
    conn: &Connection,
    recent: &Recent,
    s: &PairingSubmission,
) -> rusqlite::Result<()> {
    let (requester, target) = (&s.requester_digest.0[..], &s.target_digest.0[..]);
    // The earlier request may have been settled: the new one is recent.
    conn.prepare_cached(
        "DELETE FROM pending_requests WHERE target_digest = ?1 AND requester_digest = ?2",
    )?
    .execute(params![target, requester])?;
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
    recent.stored();
    Ok(())
}

/// Deletes the pair's requests, both ways round, from both tables.
pub(super) fn remove_pair(conn: &Connection, s: &PairingSubmission) -> rusqlite::Result<()> {
    let (requester, target) = (&s.requester_digest.0[..], &s.target_digest.0[..]);
    for sql in [
        "DELETE FROM pending_recent
         WHERE (requester_digest = ?1 AND target_digest = ?2)
            OR (requester_digest = ?2 AND target_digest = ?1)",
        "DELETE FROM pending_requests
         WHERE (requester_digest = ?1 AND target_digest = ?2)
            OR (requester_digest = ?2 AND target_digest = ?1)",
    ] {
        conn.prepare_cached(sql)?
            .execute(params![requester, target])?;
    }
    Ok(())
}

/// The live reverse request and the live request this one would replace.
pub(super) fn pair_state(conn: &Connection, s: &PairingSubmission) -> rusqlite::Result<PairState> {
    let (requester, target) = (&s.requester_digest.0[..], &s.target_digest.0[..]);
    // The recent table first: a counterpart is usually there.
    let mut pending = conn.prepare_cached(
        "SELECT endpoint_id, protocol, offer FROM pending_recent
         WHERE requester_digest = ?1 AND target_digest = ?2 AND expires_at > ?3
         UNION ALL
         SELECT endpoint_id, protocol, offer FROM pending_requests
         WHERE requester_digest = ?1 AND target_digest = ?2 AND expires_at > ?3
         LIMIT 1",
    )?;
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String, Vec<u8>)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    };
    let counterpart = pending
        .query_row(params![target, requester, s.now.0], read)
        .optional()?;
    let previous = pending
        .query_row(params![requester, target, s.now.0], read)
        .optional()?;
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

/// Counts what the caps look at, stopping at each cap: a full count of a flooded
/// sender's requests would cost more than the request is worth.
pub(super) fn count_pending(
    conn: &Connection,
    s: &PairingSubmission,
) -> rusqlite::Result<PendingCounts> {
    let (requester, target) = (&s.requester_digest.0[..], &s.target_digest.0[..]);
    // u32::MAX is no cap: nothing to count.
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
    let for_target: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM (
                 SELECT 1 FROM pending_recent INDEXED BY pending_recent_sender
                 WHERE endpoint_id = ?5 AND target_digest = ?1 AND expires_at > ?2
                   AND requester_digest <> ?3
                 UNION ALL
                 SELECT 1 FROM pending_requests INDEXED BY pending_requests_sender
                 WHERE endpoint_id = ?5 AND target_digest = ?1 AND expires_at > ?2
                   AND requester_digest <> ?3
                 LIMIT ?4)",
        )?
        .query_row(
            params![
                target,
                s.now.0,
                requester,
                s.limits.per_target,
                s.request.endpoint_id.as_str()
            ],
            |r| r.get(0),
        )?;
    Ok(PendingCounts {
        from_sender: u64::try_from(from_sender).unwrap_or(0),
        for_target: u64::try_from(for_target).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn recent(rows: u64) -> Recent {
        Recent::new(Tuning { recent_rows: rows })
    }

    #[test]
    fn a_request_past_the_age_is_settled_and_a_younger_one_stays() {
        let conn = db();
        add(&conn, 1, NOW.0 - 2 * MINUTE, b"old");
        add(&conn, 2, NOW.0 - MINUTE + 1, b"young");
        assert_eq!(recent(100).settle(&conn, NOW).expect("settle"), 1);
        assert_eq!(ages(&conn, "pending_requests"), [NOW.0 - 2 * MINUTE]);
        assert_eq!(ages(&conn, "pending_recent"), [NOW.0 - MINUTE + 1]);
        // Nothing more is due.
        assert_eq!(recent(100).settle(&conn, NOW).expect("settle"), 0);
    }

    #[test]
    fn beyond_the_recent_rows_the_oldest_are_settled() {
        let conn = db();
        let recent = recent(4);
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
        let recent = recent(100);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 512);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 488);
        assert_eq!(recent.settle(&conn, NOW).expect("settle"), 0);
        assert_eq!(ages(&conn, "pending_requests").len(), 1_000);
    }

    #[test]
    fn a_settled_copy_of_a_pair_gives_way_to_the_recent_one() {
        let conn = db();
        add(&conn, 7, NOW.0 - 3 * MINUTE, b"first");
        settle_all(&conn).expect("settle");
        // A bug's duplicate: the recent row is the newer and must win.
        add(&conn, 7, NOW.0 - 2 * MINUTE, b"second");
        assert_eq!(recent(100).settle(&conn, NOW).expect("settle"), 1);
        let offer: Vec<u8> = conn
            .query_row("SELECT offer FROM pending_requests", [], |r| r.get(0))
            .expect("row");
        assert_eq!(offer, b"second");
        assert!(ages(&conn, "pending_recent").is_empty());
    }
}
