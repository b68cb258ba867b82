//! What a [`crate::Verifier`] remembers between bundles: for each organisation's DNSSEC
//! chain and certificate, what validating them established; for each member certificate,
//! that the organisation issued it.
//!
//! Every entry is keyed by the SHA-256 of the exact octets it was established from, so
//! only those octets ever meet it; it holds only what a successful verification
//! established (failures are never remembered); and what depends on time is re-checked
//! on every use: a remembered chain counts only while every RRSIG it was validated with
//! overlaps the new bundle's window, and certificate validity is checked each time.
//! Entries are evicted oldest first past the capacity.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::dnssec::Window;

/// The most TXT data remembered for one organisation. A real `_veraid` RRset is one
/// record of about a hundred octets; a bundle may carry up to 64 KiB of them, and
/// remembering that for thousands of organisations would be hundreds of megabytes. A
/// larger RRset is simply validated every time.
pub(crate) const MAX_REMEMBERED_TXT_OCTETS: usize = 2048;

/// What validating an organisation's chain and certificate established.
#[derive(Debug, Clone)]
pub(crate) struct ChainFacts {
    /// The organisation key's VeraId algorithm and key id.
    pub(crate) key_algorithm: u8,
    pub(crate) key_id: String,
    /// The character-strings of each validated TXT record at `_veraid.<organisation>`.
    pub(crate) txt: Vec<Vec<Vec<u8>>>,
    /// The (inception, expiration) of every RRSIG the validation relied on.
    pub(crate) signatures: Vec<(u32, u32)>,
}

impl ChainFacts {
    /// Whether the same chain validates within `window` by the same signatures: the
    /// signatures themselves do not depend on the time, only whether each overlaps the
    /// window does.
    pub(crate) fn reaches(&self, window: Window) -> bool {
        self.signatures
            .iter()
            .all(|&(inception, expiration)| window.overlaps(inception, expiration))
    }

    /// Whether it is small enough to remember.
    fn rememberable(&self) -> bool {
        let octets: usize = self.txt.iter().flatten().map(Vec::len).sum();
        octets <= MAX_REMEMBERED_TXT_OCTETS
    }
}

/// A bounded map, evicting the oldest insertion first.
#[derive(Debug)]
struct Bounded<V> {
    entries: HashMap<[u8; 32], V>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl<V: Clone> Bounded<V> {
    fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, key: &[u8; 32]) -> Option<V> {
        self.entries.get(key).cloned()
    }

    fn insert(&mut self, key: [u8; 32], value: V) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.insert(key, value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.entries.remove(&old);
                }
            }
        }
    }
}

/// The verifier's memory. Shared between threads behind one lock, held only to look up
/// or insert, never while verifying.
#[derive(Debug)]
pub(crate) struct Cache {
    chains: Mutex<Bounded<std::sync::Arc<ChainFacts>>>,
    issued: Mutex<Bounded<()>>,
}

impl Cache {
    pub(crate) fn new(organisations: usize, members: usize) -> Self {
        Self {
            chains: Mutex::new(Bounded::new(organisations)),
            issued: Mutex::new(Bounded::new(members)),
        }
    }

    pub(crate) fn chain(&self, key: &[u8; 32]) -> Option<std::sync::Arc<ChainFacts>> {
        self.chains.lock().ok()?.get(key)
    }

    pub(crate) fn remember_chain(&self, key: [u8; 32], facts: ChainFacts) {
        if !facts.rememberable() {
            return;
        }
        if let Ok(mut chains) = self.chains.lock() {
            chains.insert(key, std::sync::Arc::new(facts));
        }
    }

    pub(crate) fn issued(&self, key: &[u8; 32]) -> bool {
        self.issued
            .lock()
            .is_ok_and(|issued| issued.get(key).is_some())
    }

    pub(crate) fn remember_issued(&self, key: [u8; 32]) {
        if let Ok(mut issued) = self.issued.lock() {
            issued.insert(key, ());
        }
    }

    pub(crate) fn len(&self) -> (usize, usize) {
        (
            self.chains.lock().map_or(0, |c| c.entries.len()),
            self.issued.lock().map_or(0, |i| i.entries.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entry_goes_first_and_nothing_grows_past_the_capacity() {
        let mut map = Bounded::new(2);
        map.insert([1; 32], 1);
        map.insert([2; 32], 2);
        map.insert([1; 32], 10);
        assert_eq!(map.get(&[1; 32]), Some(10));
        map.insert([3; 32], 3);
        assert_eq!(map.get(&[1; 32]), None);
        assert_eq!((map.get(&[2; 32]), map.get(&[3; 32])), (Some(2), Some(3)));
        assert_eq!(map.entries.len(), 2);
        let mut none = Bounded::new(0);
        none.insert([1; 32], 1);
        assert_eq!(none.get(&[1; 32]), None);
    }

    #[test]
    fn a_large_txt_rrset_is_not_remembered() {
        let facts = |octets: usize| ChainFacts {
            key_algorithm: 1,
            key_id: "id".into(),
            txt: vec![
                vec![vec![0; octets / 2]],
                vec![vec![0; octets - octets / 2]],
            ],
            signatures: vec![(0, 10)],
        };
        let cache = Cache::new(4, 4);
        cache.remember_chain([1; 32], facts(MAX_REMEMBERED_TXT_OCTETS));
        cache.remember_chain([2; 32], facts(MAX_REMEMBERED_TXT_OCTETS + 1));
        assert!(cache.chain(&[1; 32]).is_some());
        assert!(cache.chain(&[2; 32]).is_none());
        assert_eq!(cache.len(), (1, 0));
    }

    #[test]
    fn a_remembered_chain_reaches_a_window_only_through_every_signature() {
        let facts = ChainFacts {
            key_algorithm: 1,
            key_id: "id".into(),
            txt: Vec::new(),
            signatures: vec![(100, 200), (150, 300)],
        };
        let window = |start, end| Window { start, end };
        assert!(facts.reaches(window(180, 190)));
        assert!(facts.reaches(window(0, 150)));
        assert!(!facts.reaches(window(0, 120)), "the second starts at 150");
        assert!(!facts.reaches(window(250, 400)), "the first ends at 200");
    }
}
