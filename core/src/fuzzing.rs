//! The properties the fuzz targets (`fuzz/`, cargo-fuzz) and their proptest twins
//! (`core/tests/fuzz_twins.rs`, run in CI) check, in one place so both check the same thing.
//! Each takes untrusted bytes as they would arrive from a store or a client, and panics only
//! when a property is broken: parsers must refuse bad input with an error, never panic, and
//! what they accept must survive a round trip.

use crate::commit::{index_object, parse_index_object};
use crate::keys::{chunk_key, index_key, manifest_key, parse_key, parse_part_key, parse_parts_step, ParsedKey};
use crate::{ChunkHash, ChunkHeader, CommitObject, Limits, ShardIndex, CHUNK_HEADER_BYTES};

/// A commit object (root or v1 manifest) from the store: parsed or refused, and once parsed
/// its summary and identity are consistent.
pub fn commit_object(bytes: &[u8]) {
    let limits = Limits::default();
    if let Ok(obj) = CommitObject::parse(bytes, &limits) {
        let s = obj.summary();
        assert_eq!(s.job, obj.job());
        assert_eq!(s.step, obj.step());
        if let CommitObject::Root(r) = &obj {
            let again = crate::Root::from_bytes(&r.to_bytes(), &limits).expect("a parsed root re-parses");
            assert_eq!(&again, r);
        }
    }
}

/// A shard index from a client (its JSON), validated for a world size taken from the input,
/// and as an index object from the store.
pub fn shard_index(bytes: &[u8]) {
    let limits = Limits::default();
    let world = bytes.first().map_or(1, |b| (*b as u32 % 8) + 1);
    if let Ok(index) = serde_json::from_slice::<ShardIndex>(bytes) {
        if index.validate(world, &limits).is_ok() {
            let (obj, r) = index_object(&index);
            let back = parse_index_object(&obj, &r, index.rank, world, &limits).expect("its own object parses");
            assert_eq!(back, index);
        }
    }
    // The same bytes as a stored index object whose address they do not have.
    if bytes.len() > 1 {
        let (_, r) = index_object(&ShardIndex { rank: 0, tensors: vec![], metadata: serde_json::Value::Null });
        let _ = parse_index_object(bytes, &r, 0, world, &limits);
    }
}

/// A stored chunk: its header parsed or refused; a parsed one re-encodes to the same bytes,
/// and decoding the payload either fails or yields the header's length and hash.
pub fn stored_chunk(bytes: &[u8]) {
    if let Ok((header, payload)) = ChunkHeader::decode(bytes) {
        assert_eq!(&header.encode()[..], &bytes[..CHUNK_HEADER_BYTES]);
        if header.raw_len <= 1 << 20 {
            if let Ok(raw) = crate::codec::decode_stored(bytes, &header.hash) {
                assert_eq!(raw.len() as u64, header.raw_len);
                assert_eq!(ChunkHash::of(&raw), header.hash);
            }
        }
        let _ = payload;
    }
}

/// Raw input for `store_key`: keys are UTF-8 (a listing never returns other bytes), so
/// anything else is skipped rather than refused.
pub fn store_key_bytes(bytes: &[u8]) {
    if let Ok(key) = std::str::from_utf8(bytes) {
        store_key(key);
    }
}

/// An object-store key, as a listing returns it: parsed or ignored, and what parses maps back
/// to the same key.
pub fn store_key(key: &str) {
    match parse_key(key) {
        Some(ParsedKey::Chunk { job, hash }) => assert_eq!(chunk_key(&job, &hash), key),
        Some(ParsedKey::Index { job, hash }) => assert_eq!(index_key(&job, &hash), key),
        Some(ParsedKey::Manifest { job, step }) => assert_eq!(manifest_key(&job, step), key),
        None => {}
    }
    let _ = parse_part_key(key);
    let _ = parse_parts_step(key);
    let _ = crate::keys::parse_pin_key(key);
    // Names that validate map to keys that parse back to them.
    if crate::validate_job(key).is_ok() {
        let h = ChunkHash::of(key.as_bytes());
        assert!(
            matches!(parse_key(&chunk_key(key, &h)), Some(ParsedKey::Chunk { job, hash }) if job == key && hash == h)
        );
    }
}
