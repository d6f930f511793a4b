//! What overlapping slices of one global tensor mean, decided once: a slice saved by several
//! ranks (a replica: the same offsets and shape) must hold byte-identical chunks; slices that
//! overlap without being the same slice are refused. So every element of a global tensor has one
//! value in a checkpoint, whichever rank a reader takes it from.
//!
//! `SliceMap` checks one rank's tensors against those already accepted for the save in
//! O(log n + k) per tensor, k being the slices whose rows can reach the new one's (one or two for
//! a row split, the column shards of a row band for a 2-D split): the check is not O(world size).

use std::collections::{BTreeMap, HashMap};

use crate::error::CoreError;
use crate::shard::{DType, ShardIndex, TensorEntry};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slice {
    shape: Vec<u64>,
    /// blake3 of the slice's chunk list: equal for byte-identical replicas.
    chunks: [u8; 32],
    rank: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TensorSlices {
    dtype: Option<DType>,
    global_shape: Vec<u64>,
    /// Slices by offsets (dimension 0 first, so a range over keys is a range of rows).
    slices: BTreeMap<Vec<u64>, Slice>,
    rows_max: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceMap {
    tensors: HashMap<String, TensorSlices>,
}

fn chunk_digest(t: &TensorEntry) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for c in &t.chunks {
        h.update(&c.hash.0);
        h.update(&c.len.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// A slice with a zero dimension holds no element, so it overlaps nothing.
fn is_empty(t: &TensorEntry) -> bool {
    t.shape.contains(&0)
}

fn overlaps(a_off: &[u64], a_shape: &[u64], b_off: &[u64], b_shape: &[u64]) -> bool {
    a_off
        .iter()
        .zip(a_shape)
        .zip(b_off.iter().zip(b_shape))
        .all(|((ao, al), (bo, bl))| ao < &bo.saturating_add(*bl) && bo < &ao.saturating_add(*al))
}

impl SliceMap {
    /// Checks `index` against the slices accepted so far, without recording it.
    pub fn check(&self, index: &ShardIndex) -> Result<(), CoreError> {
        for t in index.tensors.iter().filter(|t| !is_empty(t)) {
            let Some(known) = self.tensors.get(&t.name) else { continue };
            let bad = |m: String| CoreError::InvalidShardIndex(format!("rank {}: tensor {:?} {m}", index.rank, t.name));
            if known.dtype != Some(t.dtype) || known.global_shape != t.global_shape {
                return Err(bad("has another type or global shape than on the ranks before it".into()));
            }
            if let Some(same) = known.slices.get(&t.offsets) {
                if same.shape == t.shape {
                    if same.chunks != chunk_digest(t) {
                        return Err(bad(format!(
                            "is a replica of rank {}'s slice with different bytes; replicas must be identical",
                            same.rank
                        )));
                    }
                    continue;
                }
            }
            let (start, end) = match (t.offsets.first(), t.shape.first()) {
                (Some(o), Some(s)) => (*o, o.saturating_add(*s)),
                // A scalar has one slice, the whole tensor: handled by the exact lookup above.
                _ => match known.slices.iter().next() {
                    Some((_, other)) => {
                        return Err(bad(format!("overlaps rank {}'s slice without being the same", other.rank)))
                    }
                    None => continue,
                },
            };
            let from = vec![start.saturating_sub(known.rows_max)];
            for (off, other) in known.slices.range(from..vec![end]) {
                if overlaps(off, &other.shape, &t.offsets, &t.shape) && !(off == &t.offsets && other.shape == t.shape) {
                    return Err(bad(format!("overlaps rank {}'s slice without being the same slice", other.rank)));
                }
            }
        }
        Ok(())
    }

    /// Records an accepted index's slices.
    pub fn insert(&mut self, index: &ShardIndex) {
        for t in index.tensors.iter().filter(|t| !is_empty(t)) {
            let e = self.tensors.entry(t.name.clone()).or_default();
            if e.dtype.is_none() {
                e.dtype = Some(t.dtype);
                e.global_shape = t.global_shape.clone();
            }
            e.rows_max = e.rows_max.max(t.shape.first().copied().unwrap_or(1));
            e.slices.entry(t.offsets.clone()).or_insert_with(|| Slice {
                shape: t.shape.clone(),
                chunks: chunk_digest(t),
                rank: index.rank,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ChunkHash;
    use crate::shard::ChunkRef;

    fn slice(rank: u32, name: &str, off: Vec<u64>, shape: Vec<u64>, global: Vec<u64>, fill: u8) -> ShardIndex {
        let len: u64 = shape.iter().product();
        let data = vec![fill; len as usize];
        ShardIndex {
            rank,
            tensors: vec![TensorEntry {
                name: name.into(),
                dtype: DType::U8,
                shape,
                global_shape: global,
                offsets: off,
                chunks: vec![ChunkRef { hash: ChunkHash::of(&data), len }],
            }],
            metadata: serde_json::Value::Null,
        }
    }

    #[test]
    fn row_splits_and_identical_replicas_pass_partial_overlaps_and_different_replicas_do_not() {
        let mut m = SliceMap::default();
        for r in 0..4 {
            let i = slice(r, "w", vec![r as u64 * 10, 0], vec![10, 4], vec![40, 4], r as u8);
            m.check(&i).unwrap();
            m.insert(&i);
        }
        // A replica of rank 1's slice with the same bytes.
        m.check(&slice(5, "w", vec![10, 0], vec![10, 4], vec![40, 4], 1)).unwrap();
        let err = m.check(&slice(5, "w", vec![10, 0], vec![10, 4], vec![40, 4], 9)).unwrap_err();
        assert!(err.to_string().contains("replica of rank 1"), "{err}");
        let err = m.check(&slice(5, "w", vec![15, 0], vec![10, 4], vec![40, 4], 1)).unwrap_err();
        assert!(err.to_string().contains("overlaps rank 1"), "{err}");
        let err = m.check(&slice(5, "w", vec![0, 0], vec![10, 4], vec![80, 4], 0)).unwrap_err();
        assert!(err.to_string().contains("global shape"), "{err}");
        // Column shards of one row band do not overlap; a box across them does.
        let mut c = SliceMap::default();
        for r in 0..2 {
            let i = slice(r, "c", vec![0, r as u64 * 2], vec![8, 2], vec![8, 4], r as u8);
            c.check(&i).unwrap();
            c.insert(&i);
        }
        assert!(c.check(&slice(2, "c", vec![4, 1], vec![4, 2], vec![8, 4], 0)).is_err());
        // An empty slice takes no room: a full slice at the same offsets is still checked.
        let mut e = SliceMap::default();
        e.insert(&slice(0, "w", vec![0, 0], vec![0, 4], vec![40, 4], 0));
        e.insert(&slice(1, "w", vec![0, 0], vec![10, 4], vec![40, 4], 1));
        assert!(e.check(&slice(2, "w", vec![5, 0], vec![10, 4], vec![40, 4], 1)).is_err());
        assert!(e.check(&slice(2, "w", vec![0, 0], vec![10, 4], vec![40, 4], 9)).is_err());
        // Scalars saved whole by every rank are replicas.
        let mut s = SliceMap::default();
        let whole = |r| slice(r, "step", vec![], vec![], vec![], 7);
        s.insert(&whole(0));
        s.check(&whole(1)).unwrap();
        assert!(s.check(&slice(1, "step", vec![], vec![], vec![], 8)).is_err());
    }
}
