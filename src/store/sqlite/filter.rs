//! A split-block Bloom filter over processed-event digests: says "certainly not seen"
//! for all but a fraction of a percent of new events, so that a request does not look
//! for its event in every sealed generation of the table (see [`super::events`]).
//!
//! Each key sets one bit in each of the eight 64-bit words of one 64-byte block, so a
//! lookup reads one cache line. The keys are SHA-256 digests, already uniform: the block
//! comes from the first eight bytes, the bits from the last eight, with no further
//! hashing.

/// Bits of filter per key it is sized for. With 12, 0.45% of absent keys pass (890 of
/// 200,000 in the unit test below): per sealed generation, that is the share of requests
/// that look up a key there for nothing.
const BITS_PER_KEY: u64 = 12;
const WORDS: usize = 8;
const BLOCK_BYTES: usize = WORDS * 8;

type Block = [u64; WORDS];

/// A Bloom filter of 16-byte digests: no false negatives, few false positives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    blocks: Vec<Block>,
}

impl Filter {
    /// An empty filter sized for `keys` keys (more still work, with more false positives).
    pub(super) fn with_capacity(keys: u64) -> Self {
        let bits = keys.max(1).saturating_mul(BITS_PER_KEY);
        let blocks = bits.div_ceil(BLOCK_BYTES as u64 * 8);
        Self {
            blocks: vec![[0; WORDS]; usize::try_from(blocks).unwrap_or(usize::MAX >> 7)],
        }
    }

    /// Which block, and the bit of each of its words, stand for `key`.
    fn locate(&self, key: &[u8; 16]) -> (usize, Block) {
        let (high, low) = key.split_at(8);
        let mut a = [0; 8];
        a.copy_from_slice(high);
        let mut b = [0; 8];
        b.copy_from_slice(low);
        let (a, b) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        // Multiply-shift maps `a` onto 0..len without a division's bias or cost.
        let block = ((u128::from(a) * self.blocks.len() as u128) >> 64) as usize;
        let mut bits = [0; WORDS];
        for (i, bit) in bits.iter_mut().enumerate() {
            *bit = 1 << ((b >> (6 * i)) & 63);
        }
        (block, bits)
    }

    pub(super) fn insert(&mut self, key: &[u8; 16]) {
        let (block, bits) = self.locate(key);
        for (word, bit) in self.blocks[block].iter_mut().zip(bits) {
            *word |= bit;
        }
    }

    /// False if `key` was certainly never inserted.
    pub(super) fn may_contain(&self, key: &[u8; 16]) -> bool {
        let (block, bits) = self.locate(key);
        self.blocks[block]
            .iter()
            .zip(bits)
            .all(|(word, bit)| word & bit != 0)
    }

    /// The filter as stored: its words, little-endian.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        self.blocks
            .iter()
            .flatten()
            .flat_map(|word| word.to_le_bytes())
            .collect()
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
        // 890 of 200,000 absent keys pass (0.45%); 0.6% would mean the bits are not
        // independent.
        assert!(passed < 1_200, "{passed} of 200000 absent keys passed");
        assert!(passed > 0, "a Bloom filter this full passes some");
        assert_eq!(filter.size(), 65_536 * 12 / 8);
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
