//! Split-block Bloom filters over processed-event digests: they say "certainly not
//! seen" for all but a fraction of a percent of new events, so that a request does not
//! look for its event in every sealed generation of the table (see [`super::events`]).
//!
//! Each key sets one bit in each of the eight 64-bit words of one 64-byte block, so a
//! lookup in one filter reads one cache line. The keys are SHA-256 digests, already
//! uniform: the block comes from the first eight bytes, the bits from the last eight,
//! with no further hashing.
//!
//! Every request asks every sealed generation, so [`Sealed`] keeps their filters
//! interleaved: a key's block of [`GROUP`] generations lies in one contiguous run of
//! memory, not in as many cache lines scattered over megabytes.

/// Bits of filter per key it is sized for. With 16, 0.09% of absent keys pass (184 of
/// 200,000 in the unit test below; 0.45% at 12 bits): per sealed generation, that is
/// the share of requests that look up their key there for nothing, and a five-minute
/// soak seals 70 generations.
const BITS_PER_KEY: u64 = 16;
const WORDS: usize = 8;
const BLOCK_BYTES: usize = WORDS * 8;
/// Generations whose blocks are interleaved: a lookup reads 8 x 64 contiguous bytes per
/// group. A group's memory goes once all its generations have; as keys expire in the
/// order they came, the unused slots are those of one group at each end.
const GROUP: usize = 8;

type Block = [u64; WORDS];

/// Which block, and the bit of each of its words, stand for `key` in a filter of
/// `blocks` blocks.
fn locate(key: &[u8; 16], blocks: usize) -> (usize, Block) {
    let (high, low) = key.split_at(8);
    let mut a = [0; 8];
    a.copy_from_slice(high);
    let mut b = [0; 8];
    b.copy_from_slice(low);
    let (a, b) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
    // Multiply-shift maps `a` onto 0..blocks without a division's bias or cost.
    let block = ((u128::from(a) * blocks as u128) >> 64) as usize;
    let mut bits = [0; WORDS];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = 1 << ((b >> (6 * i)) & 63);
    }
    (block, bits)
}

fn holds(block: &Block, bits: &Block) -> bool {
    block.iter().zip(bits).all(|(word, bit)| word & bit == *bit)
}

/// A Bloom filter of 16-byte digests: no false negatives, few false positives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    blocks: Vec<Block>,
}

impl Filter {
    /// An empty filter sized for `keys` keys (more still work, with more false positives).
    pub(super) fn with_capacity(keys: u64) -> Self {
        Self {
            blocks: vec![[0; WORDS]; blocks_for(keys)],
        }
    }

    pub(super) fn insert(&mut self, key: &[u8; 16]) {
        let (block, bits) = locate(key, self.blocks.len());
        for (word, bit) in self.blocks[block].iter_mut().zip(bits) {
            *word |= bit;
        }
    }

    /// False if `key` was certainly never inserted.
    pub(super) fn may_contain(&self, key: &[u8; 16]) -> bool {
        let (block, bits) = locate(key, self.blocks.len());
        holds(&self.blocks[block], &bits)
    }

    /// The filter as stored: its words, little-endian. Written a word at a time into
    /// room made beforehand: collected byte by byte, a 128 KiB filter took the writer
    /// 5 ms (issue 17, stop 32).
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.size());
        for word in self.blocks.iter().flatten() {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// A stored filter; `None` if `bytes` cannot be one (then it is built again).
    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(BLOCK_BYTES) {
            return None;
        }
        let blocks = bytes
            .chunks_exact(BLOCK_BYTES)
            .map(|chunk| {
                let mut block = [0; WORDS];
                for (word, bytes) in block.iter_mut().zip(chunk.chunks_exact(8)) {
                    let mut le = [0; 8];
                    le.copy_from_slice(bytes);
                    *word = u64::from_le_bytes(le);
                }
                block
            })
            .collect();
        Some(Self { blocks })
    }

    /// Bytes of memory the filter holds.
    pub(super) fn size(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }
}

/// Blocks of a filter sized for `keys` keys.
fn blocks_for(keys: u64) -> usize {
    let bits = keys.max(1).saturating_mul(BITS_PER_KEY);
    let blocks = bits.div_ceil(BLOCK_BYTES as u64 * 8);
    usize::try_from(blocks).unwrap_or(usize::MAX >> 7)
}

/// The filters of the sealed generations, oldest first. Those sized for `keys` (all that
/// this build seals) are interleaved in groups; any other (a first generation migrated
/// from an older schema, filters stored with another size) is asked on its own.
#[derive(Debug)]
pub(super) struct Sealed {
    /// Blocks of an interleaved filter.
    blocks: usize,
    groups: Vec<Group>,
    odd: Vec<(i64, Filter)>,
}

/// Up to [`GROUP`] generations' filters, block by block: the blocks of slot `s` are at
/// `s`, `s + GROUP`, `s + 2 * GROUP`... Slots fill in order and are not reused; an
/// emptied slot is zeroed (it then matches nothing) and the group goes once all are.
#[derive(Debug)]
struct Group {
    generations: [Option<i64>; GROUP],
    filled: usize,
    blocks: Vec<Block>,
}

impl Sealed {
    /// No filters yet; those to interleave are sized for `keys` keys.
    pub(super) fn new(keys: u64) -> Self {
        Self {
            blocks: blocks_for(keys),
            groups: Vec::new(),
            odd: Vec::new(),
        }
    }

    /// Bytes of a filter sized as those interleaved here.
    pub(super) fn filter_size(&self) -> usize {
        self.blocks * BLOCK_BYTES
    }

    /// Adds the filter of `generation`, newer than any already here.
    pub(super) fn push(&mut self, generation: i64, filter: Filter) {
        if filter.blocks.len() != self.blocks {
            self.odd.push((generation, filter));
            return;
        }
        if self.groups.last().is_none_or(|group| group.filled == GROUP) {
            self.groups.push(Group {
                generations: [None; GROUP],
                filled: 0,
                blocks: vec![[0; WORDS]; self.blocks * GROUP],
            });
        }
        if let Some(group) = self.groups.last_mut() {
            let slot = group.filled;
            for (i, block) in filter.blocks.into_iter().enumerate() {
                group.blocks[i * GROUP + slot] = block;
            }
            group.generations[slot] = Some(generation);
            group.filled += 1;
        }
    }

    /// The generations whose filter may hold `key`, newest first.
    pub(super) fn candidates(&self, key: &[u8; 16]) -> impl Iterator<Item = i64> + '_ {
        let (block, bits) = locate(key, self.blocks);
        let grouped = self.groups.iter().rev().flat_map(move |group| {
            let run = &group.blocks[block * GROUP..(block + 1) * GROUP];
            (0..group.filled)
                .rev()
                .filter(move |slot| holds(&run[*slot], &bits))
                .filter_map(|slot| group.generations[slot])
        });
        let key = *key;
        let odd = self
            .odd
            .iter()
            .rev()
            .filter(move |(_, filter)| filter.may_contain(&key))
            .map(|(generation, _)| *generation);
        // The odd ones (a migrated first generation, a generation rebuilt at start with
        // more keys than a filter is sized for) are rare: asked last.
        grouped.chain(odd)
    }

    /// The generations here, oldest first.
    pub(super) fn generations(&self) -> Vec<i64> {
        let mut all: Vec<i64> = self.odd.iter().map(|(generation, _)| *generation).collect();
        all.extend(
            self.groups
                .iter()
                .flat_map(|group| group.generations.iter().flatten().copied()),
        );
        all.sort_unstable();
        all
    }

    /// The filter of `generation`, as [`Filter::to_bytes`] stores it.
    pub(super) fn bytes_of(&self, generation: i64) -> Option<Vec<u8>> {
        if let Some((_, filter)) = self.odd.iter().find(|(g, _)| *g == generation) {
            return Some(filter.to_bytes());
        }
        self.groups.iter().find_map(|group| {
            let slot = group
                .generations
                .iter()
                .position(|g| *g == Some(generation))?;
            let blocks = group
                .blocks
                .iter()
                .skip(slot)
                .step_by(GROUP)
                .copied()
                .collect();
            Some(Filter { blocks }.to_bytes())
        })
    }

    /// Drops the filters of `generations`.
    pub(super) fn remove(&mut self, generations: &[i64]) {
        self.odd
            .retain(|(generation, _)| !generations.contains(generation));
        for group in &mut self.groups {
            for slot in 0..group.filled {
                if group.generations[slot].is_some_and(|g| generations.contains(&g)) {
                    group.generations[slot] = None;
                    for block in group.blocks.iter_mut().skip(slot).step_by(GROUP) {
                        *block = [0; WORDS];
                    }
                }
            }
        }
        self.groups
            .retain(|group| group.generations.iter().any(Option::is_some));
    }

    /// How many generations have a filter here.
    pub(super) fn len(&self) -> usize {
        self.odd.len()
            + self
                .groups
                .iter()
                .map(|group| group.generations.iter().flatten().count())
                .sum::<usize>()
    }

    /// Bytes of memory the filters hold.
    pub(super) fn size(&self) -> usize {
        self.odd
            .iter()
            .map(|(_, filter)| filter.size())
            .sum::<usize>()
            + self.groups.len() * self.blocks * GROUP * BLOCK_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    fn key(n: u64) -> [u8; 16] {
        let digest = Sha256::digest(n.to_le_bytes());
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }

    #[test]
    fn a_full_filter_passes_few_absent_keys() {
        let mut filter = Filter::with_capacity(65_536);
        for n in 0..65_536 {
            filter.insert(&key(n));
        }
        let passed = (1_000_000..1_200_000)
            .filter(|n| filter.may_contain(&key(*n)))
            .count();
        // 184 of 200,000 absent keys pass (0.09%; 890 at 12 bits per key); 0.15% would
        // mean the bits are not independent.
        assert!(passed < 300, "{passed} of 200000 absent keys passed");
        assert!(passed > 0, "a Bloom filter this full passes some");
        assert_eq!(filter.size(), 65_536 * 16 / 8);
    }

    #[test]
    fn an_empty_filter_passes_nothing_and_a_tiny_one_still_works() {
        let empty = Filter::with_capacity(0);
        assert!(!(0..1000).any(|n| empty.may_contain(&key(n))));
        let mut tiny = Filter::with_capacity(1);
        tiny.insert(&key(7));
        assert!(tiny.may_contain(&key(7)));
    }

    #[test]
    fn stored_bytes_must_be_whole_blocks() {
        assert_eq!(Filter::from_bytes(&[]), None);
        assert_eq!(Filter::from_bytes(&[0; 65]), None);
        assert!(Filter::from_bytes(&[0; 128]).is_some());
    }

    /// Sealed filters of `generations` generations of `per` keys each, sized for `per`:
    /// generation g holds keys g * 1000 .. g * 1000 + per.
    fn sealed(generations: i64, per: u64) -> (Sealed, Vec<Filter>) {
        let mut sealed = Sealed::new(per);
        let mut filters = Vec::new();
        for g in 0..generations {
            let mut filter = Filter::with_capacity(per);
            for n in 0..per {
                filter.insert(&key(g as u64 * 1000 + n));
            }
            filters.push(filter.clone());
            sealed.push(g, filter);
        }
        (sealed, filters)
    }

    #[test]
    fn interleaved_filters_answer_as_each_filter_would_newest_first() {
        // 19 generations: two full groups and a third partly filled.
        let (sealed, filters) = sealed(19, 100);
        assert_eq!(sealed.len(), 19);
        assert_eq!(sealed.generations(), (0..19).collect::<Vec<_>>());
        for n in 0..25_000 {
            let k = key(n);
            let expected: Vec<i64> = (0..19)
                .rev()
                .filter(|g| filters[*g as usize].may_contain(&k))
                .collect();
            assert_eq!(
                sealed.candidates(&k).collect::<Vec<_>>(),
                expected,
                "key {n}"
            );
        }
        for (g, filter) in filters.iter().enumerate() {
            assert_eq!(sealed.bytes_of(g as i64), Some(filter.to_bytes()));
        }
        assert_eq!(sealed.bytes_of(19), None);
        assert_eq!(sealed.size(), 3 * GROUP * filters[0].size());
    }

    #[test]
    fn a_removed_generation_is_never_a_candidate_and_an_emptied_group_goes() {
        let (mut sealed, filters) = sealed(12, 100);
        let removed: Vec<i64> = (0..8).chain([10]).collect();
        sealed.remove(&removed);
        assert_eq!(sealed.generations(), [8, 9, 11]);
        assert_eq!(
            sealed.size(),
            GROUP * filters[0].size(),
            "the first group went"
        );
        for g in 0..12 {
            for n in 0..100 {
                let found: Vec<i64> = sealed.candidates(&key(g * 1000 + n)).collect();
                assert_eq!(found.contains(&(g as i64)), !removed.contains(&(g as i64)));
                assert!(found.iter().all(|c| !removed.contains(c)));
            }
        }
        // Slots are not reused: the next generation starts a group.
        let mut filter = Filter::with_capacity(100);
        filter.insert(&key(99_999));
        sealed.push(12, filter);
        assert_eq!(sealed.candidates(&key(99_999)).next(), Some(12));
        assert_eq!(sealed.generations(), [8, 9, 11, 12]);
    }

    #[test]
    fn a_filter_of_another_size_is_asked_on_its_own_and_last() {
        let (mut sealed, _) = sealed(3, 100);
        let mut big = Filter::with_capacity(10_000);
        for n in 0..3 {
            big.insert(&key(n));
        }
        sealed.push(-1, big.clone());
        assert_eq!(sealed.generations(), [-1, 0, 1, 2]);
        assert_eq!(sealed.candidates(&key(1)).collect::<Vec<_>>(), [0, -1]);
        assert_eq!(sealed.bytes_of(-1), Some(big.to_bytes()));
        sealed.remove(&[-1]);
        assert_eq!(sealed.candidates(&key(1)).collect::<Vec<_>>(), [0]);
    }

    proptest! {
        #[test]
        fn no_inserted_key_is_ever_missed_even_after_storing(
            keys in proptest::collection::vec(any::<[u8; 16]>(), 0..300),
            capacity in 0u64..400,
        ) {
            let mut filter = Filter::with_capacity(capacity);
            for k in &keys {
                filter.insert(k);
            }
            let stored = Filter::from_bytes(&filter.to_bytes()).expect("stored filter");
            prop_assert_eq!(&stored, &filter);
            for k in &keys {
                prop_assert!(stored.may_contain(k));
            }
        }
    }
}
