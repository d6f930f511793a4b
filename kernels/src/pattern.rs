//! Pseudo-random words for tests and benchmarks, made the same way on the CPU and the GPU.
//!
//! Design note. Measurements and twin tests need gigabytes of data that is neither zeros (which
//! hide unwritten outputs and can run faster) nor costly to upload; each word is a pure function
//! of its index, so the device fills its own buffers and the CPU can recompute any word.

use crate::fingerprint::mix;

const INDEX_KEY: u64 = 0xd6e8_feb8_6659_fd93;

/// Word `i` of the pattern for `seed`.
#[inline]
pub fn pattern_word(seed: u64, i: u64) -> u32 {
    (mix(i.wrapping_mul(INDEX_KEY) ^ seed) >> 32) as u32
}

/// The first `n` words of the pattern for `seed`.
pub fn pattern(seed: u64, n: usize) -> Vec<u32> {
    (0..n as u64).map(|i| pattern_word(seed, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_indices_differ() {
        let a = pattern(1, 1000);
        assert_ne!(a, pattern(2, 1000));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(sorted.len() > 990, "words repeat too often");
        assert_eq!(pattern_word(1, 999), a[999]);
    }
}
