//! A fast hasher for the library's own tables. Their keys are request ids
//! and connection tokens this process assigns and function names it
//! registered, so no stranger chooses them; std's SipHash (built to resist
//! chosen keys) costs more per call than the rest of a table lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiplicative hashing as in rustc's FxHasher: one rotate, xor and
/// multiply per word.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits at the top; the table
        // picks buckets with the low ones.
        self.0.rotate_left(26)
    }
}

/// A HashMap with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    fn hash_of(v: impl std::hash::Hash) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(v)
    }

    #[test]
    fn sequential_ids_spread_over_buckets() {
        // 1024 consecutive ids over 256 buckets (the low bits): none empty,
        // none crowded.
        let mut buckets = [0u32; 256];
        for id in 1..=1024u64 {
            buckets[(hash_of(id) & 255) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (1..=12).contains(&n)), "{buckets:?}");
    }

    #[test]
    fn names_differ_by_their_tail() {
        assert_ne!(hash_of("echo"), hash_of("echo_inline"));
        assert_ne!(hash_of("f00000001"), hash_of("f00000002"));
        let mut map: FastMap<String, u32> = FastMap::default();
        for i in 0..1000 {
            map.insert(format!("fn{i}"), i);
        }
        assert!((0..1000).all(|i| map[&format!("fn{i}")] == i));
    }
}
