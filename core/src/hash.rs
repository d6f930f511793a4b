//! The content address of a chunk: blake3 of its raw (uncompressed) bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CoreError;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(raw: &[u8]) -> Self {
        ChunkHash(*blake3::hash(raw).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            s.push(char::from_digit((b & 0xf) as u32, 16).unwrap_or('0'));
        }
        s
    }

    /// Checks `raw` against this address; the error carries both hashes for the report.
    pub fn verify(&self, raw: &[u8]) -> Result<(), CoreError> {
        let actual = ChunkHash::of(raw);
        if actual == *self {
            Ok(())
        } else {
            Err(CoreError::HashMismatch { expected: *self, actual })
        }
    }
}

/// A chunk's address computed piece by piece, as its bytes arrive: hashing each piece while it
/// is still in the cache costs less than hashing the whole chunk after it has left it.
#[derive(Default, Clone)]
pub struct ChunkHasher(blake3::Hasher);

impl ChunkHasher {
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    pub fn finish(&self) -> ChunkHash {
        ChunkHash(*self.0.finalize().as_bytes())
    }
}

impl FromStr for ChunkHash {
    type Err = CoreError;

    /// Only the canonical form (64 lowercase hex digits) is accepted, so a hash has exactly
    /// one spelling in keys and URLs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CoreError::InvalidHash { value: s.chars().take(80).collect() };
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        let digits = s.as_bytes();
        for (i, byte) in out.iter_mut().enumerate() {
            let hi = hex_digit(digits[2 * i]).ok_or_else(bad)?;
            let lo = hex_digit(digits[2 * i + 1]).ok_or_else(bad)?;
            *byte = (hi << 4) | lo;
        }
        Ok(ChunkHash(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_canonical_form() {
        let h = ChunkHash::of(b"hello");
        let hex = h.to_hex();
        assert_eq!(hex, blake3::hash(b"hello").to_hex().as_str());
        // Pieces that straddle blake3's 1 KiB chunks and 64-byte blocks.
        let bytes: Vec<u8> = (0..100_003u32).map(|i| (i * 31 % 251) as u8).collect();
        for piece in [1, 64, 1000, 4099, 65_536] {
            let mut h = ChunkHasher::default();
            for p in bytes.chunks(piece) {
                h.update(p);
            }
            assert_eq!(h.finish(), ChunkHash::of(&bytes), "pieces of {piece} bytes name the same chunk");
        }
        assert_eq!(hex.parse::<ChunkHash>().unwrap(), h);
        assert!(hex.to_uppercase().parse::<ChunkHash>().is_err());
        assert!(hex[..63].parse::<ChunkHash>().is_err());
        assert!(format!("{}g", &hex[..63]).parse::<ChunkHash>().is_err());
    }

    #[test]
    fn verify_detects_a_flipped_bit() {
        let mut data = vec![7u8; 1000];
        let h = ChunkHash::of(&data);
        assert!(h.verify(&data).is_ok());
        data[500] ^= 1;
        assert!(matches!(h.verify(&data), Err(CoreError::HashMismatch { .. })));
    }
}
