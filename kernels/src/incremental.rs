//! Change detection for incremental saves: per-chunk fingerprints of a buffer, compared with
//! the fingerprints taken at the last checkpoint.
//!
//! Design note. A chunk's fingerprint uses the chunk's global word positions, so the chunk
//! fingerprints combine to the whole buffer's fingerprint and a chunk whose words moved counts
//! as changed. Only the fingerprints are kept between checkpoints (16 bytes per chunk), never
//! the data. A chunk with no previous fingerprint (the buffer grew, or this is the first save)
//! is changed; the caller decides what a shrunken buffer means, since the chunks past the new
//! end no longer exist to be copied.
//!
//! A fingerprint collision would let a changed chunk be skipped. One changed word cannot collide,
//! and several collide only if both 64-bit lanes cancel (at worst about 2^-62 for structured
//! pairs of changes, fingerprint.rs); it is why a full save still hashes everything.

use crate::fingerprint::{fingerprint_words, Fingerprint};

/// The outcome of comparing a buffer with its last fingerprints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangedChunks {
    /// This buffer's per-chunk fingerprints: the `previous` of the next comparison.
    pub fingerprints: Vec<Fingerprint>,
    /// Indices of the chunks whose fingerprint differs from (or has no) previous one, ascending.
    pub changed: Vec<usize>,
}

/// The number of chunks of `chunk_words` words that cover `len` words (the last may be short).
pub fn chunk_count(len: usize, chunk_words: usize) -> usize {
    assert!(chunk_words > 0, "chunk size must be positive");
    len.div_ceil(chunk_words)
}

/// Per-chunk fingerprints of `words`, each chunk at its global positions.
pub fn chunk_fingerprints(words: &[u32], chunk_words: usize) -> Vec<Fingerprint> {
    assert!(chunk_words > 0, "chunk size must be positive");
    words.chunks(chunk_words).enumerate().map(|(k, c)| fingerprint_words(c, (k * chunk_words) as u64)).collect()
}

/// Which chunks of `words` changed since `previous` (the fingerprints returned last time, with
/// the same chunk size).
pub fn changed_chunks(words: &[u32], chunk_words: usize, previous: &[Fingerprint]) -> ChangedChunks {
    compare(chunk_fingerprints(words, chunk_words), previous)
}

/// Compares fresh per-chunk fingerprints with `previous`; shared by the CPU path and the GPU
/// twin, which computes `fingerprints` on the device.
pub fn compare(fingerprints: Vec<Fingerprint>, previous: &[Fingerprint]) -> ChangedChunks {
    let changed =
        fingerprints.iter().enumerate().filter(|(k, f)| previous.get(*k) != Some(f)).map(|(k, _)| k).collect();
    ChangedChunks { fingerprints, changed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(seed % 31)).collect()
    }

    #[test]
    fn first_save_changes_everything_and_a_repeat_nothing() {
        let w = words(3, 1000);
        let first = changed_chunks(&w, 64, &[]);
        assert_eq!(first.changed, (0..16).collect::<Vec<_>>());
        let again = changed_chunks(&w, 64, &first.fingerprints);
        assert!(again.changed.is_empty());
        assert_eq!(again.fingerprints, first.fingerprints);
    }

    #[test]
    fn only_touched_chunks_change() {
        let mut w = words(5, 4096);
        let before = changed_chunks(&w, 256, &[]).fingerprints;
        w[0] ^= 1;
        w[256 * 7 + 3] = w[256 * 7 + 3].wrapping_add(1);
        w[4095] ^= 1 << 31;
        assert_eq!(changed_chunks(&w, 256, &before).changed, vec![0, 7, 15]);
    }

    #[test]
    fn growth_marks_new_chunks_changed() {
        let mut w = words(7, 300);
        let before = changed_chunks(&w, 100, &[]).fingerprints;
        w.extend(words(8, 150));
        assert_eq!(changed_chunks(&w, 100, &before).changed, vec![3, 4]);
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_count(4, 4), 1);
        assert_eq!(chunk_count(5, 4), 2);
    }

    proptest! {
        /// Chunk fingerprints combine to the whole buffer's: chunking loses nothing.
        #[test]
        fn chunks_combine_to_the_whole(seed in any::<u32>(), n in 0usize..3000, chunk in 1usize..700) {
            let w = words(seed, n);
            let whole = chunk_fingerprints(&w, chunk).into_iter().fold(Fingerprint::default(), Fingerprint::combine);
            prop_assert_eq!(whole, fingerprint_words(&w, 0));
        }

        /// A single flipped bit marks exactly its own chunk.
        #[test]
        fn a_flip_marks_exactly_its_chunk(seed in any::<u32>(), n in 1usize..3000, chunk in 1usize..700, at in any::<usize>(), bit in 0u32..32) {
            let mut w = words(seed, n);
            let before = chunk_fingerprints(&w, chunk);
            let at = at % n;
            w[at] ^= 1 << bit;
            prop_assert_eq!(changed_chunks(&w, chunk, &before).changed, vec![at / chunk]);
        }
    }
}
