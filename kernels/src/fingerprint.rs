//! Corruption fingerprints: 128 bits per chunk of state, compared between replicas that must
//! agree (silent data corruption shows up as a mismatch).
//!
//! Each 32-bit word `w` at global position `i` is mixed into two independent 64-bit values (a
//! SplitMix64-style finaliser over `w` and `i`, with different constants per lane), and the
//! lanes are summed with wrapping addition. Mixing in the position makes swapped or shifted
//! words count; the finaliser makes a single flipped bit change each lane's term completely.
//!
//! The reduction is a wrapping sum, which is associative and commutative: a GPU twin may reduce
//! in any tree shape (per warp, per block, then across blocks) and gets exactly these bits. The
//! order is therefore fixed by construction rather than by scheduling. Floats are taken as their
//! raw bits, so -0.0 and +0.0, and NaNs with different payloads, fingerprint differently.

/// Two 64-bit lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint(pub [u64; 2]);

impl Fingerprint {
    /// Combines fingerprints of consecutive pieces (positions already global): the same as
    /// fingerprinting the whole.
    pub fn combine(self, other: Fingerprint) -> Fingerprint {
        Fingerprint([self.0[0].wrapping_add(other.0[0]), self.0[1].wrapping_add(other.0[1])])
    }

    /// The eight 16-bit pieces, lane 0 first, least significant first: small enough to travel
    /// exactly as f32 values through a collective that only moves floats.
    pub fn to_u16s(self) -> [u16; 8] {
        let mut out = [0u16; 8];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (self.0[i / 4] >> (16 * (i % 4))) as u16;
        }
        out
    }

    pub fn from_u16s(p: [u16; 8]) -> Fingerprint {
        let mut lanes = [0u64; 2];
        for (i, v) in p.iter().enumerate() {
            lanes[i / 4] |= (*v as u64) << (16 * (i % 4));
        }
        Fingerprint(lanes)
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

const LANE_KEYS: [u64; 2] = [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f];
const POSITION_KEYS: [u64; 2] = [0xd6e8_feb8_6659_fd93, 0xa076_1d64_78bd_642f];

#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn term(word: u32, position: u64, lane: usize) -> u64 {
    let key = position.wrapping_mul(POSITION_KEYS[lane]).wrapping_add(LANE_KEYS[lane]);
    mix(((word as u64) << 32 | (word as u64)) ^ key)
}

/// The fingerprint of `words`, the first of which sits at global position `first_position`.
pub fn fingerprint_words(words: &[u32], first_position: u64) -> Fingerprint {
    let mut lanes = [0u64; 2];
    for (k, &w) in words.iter().enumerate() {
        let i = first_position + k as u64;
        lanes[0] = lanes[0].wrapping_add(term(w, i, 0));
        lanes[1] = lanes[1].wrapping_add(term(w, i, 1));
    }
    Fingerprint(lanes)
}

/// The fingerprint of `x` by its raw bits, the first element at `first_position`.
pub fn fingerprint_f32(x: &[f32], first_position: u64) -> Fingerprint {
    let mut lanes = [0u64; 2];
    for (k, v) in x.iter().enumerate() {
        let i = first_position + k as u64;
        let w = v.to_bits();
        lanes[0] = lanes[0].wrapping_add(term(w, i, 0));
        lanes[1] = lanes[1].wrapping_add(term(w, i, 1));
    }
    Fingerprint(lanes)
}

/// The fingerprint of raw bytes as little-endian 32-bit words, the last one zero-padded, the
/// first at `first_position`: for state handed over as bytes (a chunk of a staging buffer), with
/// no alignment asked of them. Bytes that are whole words give `fingerprint_words`' value.
pub fn fingerprint_bytes(bytes: &[u8], first_position: u64) -> Fingerprint {
    let mut lanes = [0u64; 2];
    let words = bytes.chunks_exact(4);
    let tail = words.remainder();
    let mut k = 0u64;
    for w in words {
        let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let i = first_position + k;
        lanes[0] = lanes[0].wrapping_add(term(w, i, 0));
        lanes[1] = lanes[1].wrapping_add(term(w, i, 1));
        k += 1;
    }
    if !tail.is_empty() {
        let mut last = [0u8; 4];
        last[..tail.len()].copy_from_slice(tail);
        let w = u32::from_le_bytes(last);
        let i = first_position + k;
        lanes[0] = lanes[0].wrapping_add(term(w, i, 0));
        lanes[1] = lanes[1].wrapping_add(term(w, i, 1));
    }
    Fingerprint(lanes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(seed: u64, n: usize) -> Vec<u32> {
        (0..n as u64).map(|i| mix(seed ^ i.wrapping_mul(0x1234_5678_9abc_def1)) as u32).collect()
    }

    #[test]
    fn every_single_bit_flip_changes_both_lanes() {
        let w = words(1, 257);
        let base = fingerprint_words(&w, 0);
        for i in 0..w.len() {
            for bit in 0..32 {
                let mut v = w.clone();
                v[i] ^= 1 << bit;
                let f = fingerprint_words(&v, 0);
                assert!(f.0[0] != base.0[0] && f.0[1] != base.0[1], "word {i} bit {bit}");
            }
        }
    }

    #[test]
    fn swapped_words_and_shifted_positions_differ() {
        let w = words(2, 64);
        let mut swapped = w.clone();
        swapped.swap(3, 40);
        assert_ne!(fingerprint_words(&w, 0), fingerprint_words(&swapped, 0));
        assert_ne!(fingerprint_words(&w, 0), fingerprint_words(&w, 1));
    }

    #[test]
    fn bytes_fingerprint_as_little_endian_words() {
        let w = words(3, 33);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(fingerprint_bytes(&bytes, 5), fingerprint_words(&w, 5));
        // Unaligned and with a short tail: the tail is one zero-padded word.
        let odd = &bytes[1..bytes.len() - 2];
        let mut padded = odd.to_vec();
        padded.resize(odd.len().div_ceil(4) * 4, 0);
        let as_words: Vec<u32> = padded.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(fingerprint_bytes(odd, 0), fingerprint_words(&as_words, 0));
        // Padding makes a short tail and its zero-extended word equal: callers compare lengths
        // (a save's layout) separately.
        assert_eq!(fingerprint_bytes(&[1], 0), fingerprint_bytes(&[1, 0, 0, 0], 0));
    }

    #[test]
    fn floats_fingerprint_by_their_bits() {
        assert_ne!(fingerprint_f32(&[0.0], 0), fingerprint_f32(&[-0.0], 0));
        let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bits: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
        assert_eq!(fingerprint_f32(&x, 9), fingerprint_words(&bits, 9));
    }

    /// The value a GPU twin must reproduce: positions 0..1024 of a fixed sequence. Computed by
    /// this implementation when it was written; a change to it breaks every stored comparison.
    #[test]
    fn the_reference_value_is_stable() {
        let w: Vec<u32> = (0..1024u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        assert_eq!(fingerprint_words(&w, 0).to_string(), REFERENCE);
    }
    const REFERENCE: &str = "4e8a0f87ae5dfaa8f99883707b646f0f";

    proptest! {
        /// Any split into pieces, combined in any order, gives the whole's fingerprint: the
        /// property that lets a GPU reduce in whatever tree shape it likes.
        #[test]
        fn pieces_combine_to_the_whole(seed in any::<u64>(), n in 0usize..2000, cuts in proptest::collection::vec(0usize..2000, 0..6)) {
            let w = words(seed, n);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(n)).collect();
            cuts.push(0);
            cuts.push(n);
            cuts.sort_unstable();
            let mut pieces: Vec<Fingerprint> = cuts.windows(2).map(|c| fingerprint_words(&w[c[0]..c[1]], c[0] as u64)).collect();
            pieces.reverse();
            let combined = pieces.into_iter().fold(Fingerprint::default(), Fingerprint::combine);
            prop_assert_eq!(combined, fingerprint_words(&w, 0));
        }

        #[test]
        fn u16_pieces_round_trip(a in any::<u64>(), b in any::<u64>()) {
            let f = Fingerprint([a, b]);
            prop_assert_eq!(Fingerprint::from_u16s(f.to_u16s()), f);
        }
    }
}
