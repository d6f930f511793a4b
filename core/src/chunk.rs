//! The stored form of a chunk: a fixed 48-byte header followed by the payload.
//!
//! ```text
//! 0..4    magic "CKC1"
//! 4       format version (1)
//! 5       codec (0 = none, 1 = zstd, 2 = byte-grouped planes; see `codec.rs`)
//! 6..8    reserved, zero
//! 8..16   raw length, u64 little-endian (length before the codec)
//! 16..48  blake3 of the raw bytes (the chunk's address)
//! 48..    payload: the raw bytes, or their encoding by the codec
//! ```
//!
//! The address is the hash of the *raw* bytes, so a chunk keeps its address whatever codec
//! stored it, and a reader always verifies after decoding. The header repeats the address so a
//! stored object can be checked without knowing the key it was read from.

use crate::error::CoreError;
use crate::hash::ChunkHash;

pub const CHUNK_MAGIC: [u8; 4] = *b"CKC1";
pub const CHUNK_FORMAT_VERSION: u8 = 1;
pub const CHUNK_HEADER_BYTES: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Zstd,
    /// Byte planes of fixed-width elements, each stored zstd-compressed or raw.
    Grouped,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::Grouped => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, CoreError> {
        match b {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Zstd),
            2 => Ok(Codec::Grouped),
            other => Err(CoreError::InvalidChunk(format!("unknown codec {other}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub codec: Codec,
    pub raw_len: u64,
    pub hash: ChunkHash,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_BYTES] {
        let mut out = [0u8; CHUNK_HEADER_BYTES];
        out[0..4].copy_from_slice(&CHUNK_MAGIC);
        out[4] = CHUNK_FORMAT_VERSION;
        out[5] = self.codec.to_byte();
        out[8..16].copy_from_slice(&self.raw_len.to_le_bytes());
        out[16..48].copy_from_slice(&self.hash.0);
        out
    }

    /// Parses a header alone (for readers that read the payload into place themselves; they
    /// must check the payload length against `raw_len`).
    pub fn decode_header(bytes: &[u8; CHUNK_HEADER_BYTES]) -> Result<ChunkHeader, CoreError> {
        Self::parse(bytes)
    }

    /// Parses the header at the start of a stored chunk and returns it with the payload.
    pub fn decode(stored: &[u8]) -> Result<(ChunkHeader, &[u8]), CoreError> {
        let header = Self::parse(stored)?;
        let payload = &stored[CHUNK_HEADER_BYTES..];
        if header.codec == Codec::None && payload.len() as u64 != header.raw_len {
            return Err(CoreError::InvalidChunk(format!(
                "payload is {} bytes but the header says {} (truncated or torn write)",
                payload.len(),
                header.raw_len
            )));
        }
        Ok((header, payload))
    }

    fn parse(stored: &[u8]) -> Result<ChunkHeader, CoreError> {
        if stored.len() < CHUNK_HEADER_BYTES {
            return Err(CoreError::InvalidChunk(format!(
                "stored chunk is {} bytes, shorter than its {CHUNK_HEADER_BYTES}-byte header",
                stored.len()
            )));
        }
        if stored[0..4] != CHUNK_MAGIC {
            return Err(CoreError::InvalidChunk("bad magic".into()));
        }
        if stored[4] != CHUNK_FORMAT_VERSION {
            return Err(CoreError::InvalidChunk(format!("unsupported chunk format version {}", stored[4])));
        }
        let codec = Codec::from_byte(stored[5])?;
        if stored[6..8] != [0, 0] {
            return Err(CoreError::InvalidChunk("reserved header bytes are not zero".into()));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&stored[8..16]);
        let raw_len = u64::from_le_bytes(len);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&stored[16..48]);
        Ok(ChunkHeader { codec, raw_len, hash: ChunkHash(hash) })
    }
}

/// Splits `len` bytes into consecutive ranges of at most `chunk_bytes` (the last may be shorter).
/// A zero-length tensor has no chunks.
pub fn chunk_ranges(len: u64, chunk_bytes: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    assert!(chunk_bytes > 0, "chunk size must be positive");
    (0..len.div_ceil(chunk_bytes)).map(move |i| {
        let start = i * chunk_bytes;
        start..(start + chunk_bytes).min(len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let raw = b"some tensor bytes";
        let h = ChunkHeader { codec: Codec::None, raw_len: raw.len() as u64, hash: ChunkHash::of(raw) };
        let mut stored = h.encode().to_vec();
        stored.extend_from_slice(raw);
        let (back, payload) = ChunkHeader::decode(&stored).unwrap();
        assert_eq!(back, h);
        assert_eq!(payload, raw);
    }

    #[test]
    fn torn_and_foreign_objects_are_rejected() {
        let raw = vec![1u8; 100];
        let h = ChunkHeader { codec: Codec::None, raw_len: 100, hash: ChunkHash::of(&raw) };
        let mut stored = h.encode().to_vec();
        stored.extend_from_slice(&raw);
        assert!(ChunkHeader::decode(&stored[..stored.len() - 1]).is_err(), "truncated payload");
        assert!(ChunkHeader::decode(&stored[..20]).is_err(), "truncated header");
        let mut bad = stored.clone();
        bad[0] = b'X';
        assert!(ChunkHeader::decode(&bad).is_err(), "bad magic");
        let mut bad = stored.clone();
        bad[5] = 9;
        assert!(ChunkHeader::decode(&bad).is_err(), "unknown codec");
        let mut bad = stored;
        bad[4] = 2;
        assert!(ChunkHeader::decode(&bad).is_err(), "future version");
    }

    #[test]
    fn ranges_cover_exactly() {
        let r: Vec<_> = chunk_ranges(10, 4).collect();
        assert_eq!(r, vec![0..4, 4..8, 8..10]);
        assert_eq!(chunk_ranges(8, 4).count(), 2);
        assert_eq!(chunk_ranges(0, 4).count(), 0);
    }
}
