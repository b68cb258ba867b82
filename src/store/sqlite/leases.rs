//! Outbox leases, held in memory.
//!
//! A SQLite file has one server process (docs/operations.md §1.1), so a claimed
//! message's lease need not be written into its row: it is kept here, and a claim is a
//! read. A delivered message is then written twice (queued, deleted) instead of three
//! times. After a crash nothing is leased, which is what [`release_leases`] makes of
//! leases a process left in rows.
//!
//! Changes are staged by the batch that makes them and count once it commits: a claim
//! rolled back with its batch, and run again, leases nothing twice; a result that was
//! not recorded keeps its message leased until the lease ends, as a lease in the row
//! would.
//!
//! [`release_leases`]: super::release_leases

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Lease ends (milliseconds) by outbox `seq`.
pub(super) type Held = HashMap<i64, i64>;

/// The leases of the outbox, as the writer holds them.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// Committed leases; the reader looks at them for the next due message.
    held: Arc<Mutex<Held>>,
    /// What the batch under way did, in order.
    staged: RefCell<Vec<Change>>,
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Take { seq: i64, until: i64 },
    Release { seq: i64 },
}

impl Leases {
    /// The committed leases, for the reader.
    pub(super) fn shared(&self) -> Arc<Mutex<Held>> {
        self.held.clone()
    }

    /// The leases as the batch under way sees them (those that ended are gone once
    /// [`Self::forget_ended`] ran).
    pub(super) fn current(&self) -> Held {
        let mut leases = lock(&self.held).clone();
        for change in self.staged.borrow().iter() {
            apply(&mut leases, *change);
        }
        leases
    }

    /// Leases `seq` until `until`, once the batch commits.
    pub(super) fn take(&self, seq: i64, until: i64) {
        self.staged.borrow_mut().push(Change::Take { seq, until });
    }

    /// Ends `seq`'s lease, once the batch commits.
    pub(super) fn release(&self, seq: i64) {
        self.staged.borrow_mut().push(Change::Release { seq });
    }

    /// Forgets the leases that ended by `now`: whether or not the batch commits, an
    /// ended lease holds nothing (its message may have gone without a word: an admin
    /// command beside the server deleted it).
    pub(super) fn forget_ended(&self, now: i64) {
        lock(&self.held).retain(|_, until| *until > now);
    }

    /// The batch committed: its changes count.
    pub(super) fn commit(&self) {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        if staged.is_empty() {
            return;
        }
        let mut held = lock(&self.held);
        for change in staged {
            apply(&mut held, change);
        }
    }

    /// The batch rolled back: its changes never happened.
    pub(super) fn discard(&self) {
        self.staged.borrow_mut().clear();
    }
}

fn apply(leases: &mut Held, change: Change) {
    match change {
        Change::Take { seq, until } => {
            leases.insert(seq, until);
        }
        Change::Release { seq } => {
            leases.remove(&seq);
        }
    }
}

/// The leases, even if a thread panicked holding them (a map of plain numbers has no
/// invariant to break).
pub(super) fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_count_once_committed_and_never_if_discarded() {
        let leases = Leases::default();
        leases.take(1, 100);
        leases.take(2, 100);
        assert_eq!(leases.current().len(), 2, "the batch sees its own changes");
        assert!(lock(&leases.shared()).is_empty(), "the reader does not yet");
        leases.discard();
        assert!(leases.current().is_empty());
        leases.take(1, 100);
        leases.take(2, 50);
        leases.commit();
        leases.release(1);
        assert_eq!(leases.current().keys().collect::<Vec<_>>(), [&2]);
        leases.discard();
        assert_eq!(leases.current().len(), 2);
        // A lease that ended is no lease.
        leases.forget_ended(50);
        assert_eq!(leases.current().keys().collect::<Vec<_>>(), [&1]);
        leases.release(1);
        leases.commit();
        assert!(lock(&leases.shared()).is_empty());
    }
}
