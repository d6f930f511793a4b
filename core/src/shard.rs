//! A rank's shard index: which tensors the rank saved, where its slice sits in each global
//! tensor, and the chunks that hold the slice's bytes in order.
//!
//! Offsets and global shapes are recorded so a checkpoint written by one world size can be read
//! by another: a reader maps its own slice onto the global tensor and picks the ranges it needs.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::hash::ChunkHash;
use crate::validate::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::Bf16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    /// Raw (uncompressed) length of the chunk.
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    /// Shape of this rank's slice.
    pub shape: Vec<u64>,
    /// Shape of the whole tensor across ranks.
    pub global_shape: Vec<u64>,
    /// Where this rank's slice starts in the global tensor, per dimension.
    pub offsets: Vec<u64>,
    pub chunks: Vec<ChunkRef>,
}

impl TensorEntry {
    /// Bytes of this rank's slice, or None on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
    }

    fn validate(&self, limits: &Limits) -> Result<(), CoreError> {
        let bad = |m: String| CoreError::InvalidShardIndex(format!("tensor {:?}: {m}", self.name));
        if self.name.is_empty() || self.name.len() > limits.tensor_name_bytes_max || self.name.contains('\0') {
            return Err(bad(format!("name must be 1 to {} bytes without NUL", limits.tensor_name_bytes_max)));
        }
        let dims = self.shape.len();
        if dims > limits.tensor_dims_max {
            return Err(bad(format!("{dims} dimensions, more than {}", limits.tensor_dims_max)));
        }
        if self.global_shape.len() != dims || self.offsets.len() != dims {
            return Err(bad("shape, global_shape and offsets must have the same length".into()));
        }
        for i in 0..dims {
            let end = self.offsets[i].checked_add(self.shape[i]);
            if end.is_none_or(|e| e > self.global_shape[i]) {
                return Err(bad(format!("slice leaves the global tensor in dimension {i}")));
            }
        }
        let len = self.byte_len().ok_or_else(|| bad("byte length overflows".into()))?;
        let mut sum: u64 = 0;
        for c in &self.chunks {
            if c.len == 0 || c.len > limits.chunk_bytes_max {
                return Err(bad(format!(
                    "chunk {} has length {}, not in 1..={}",
                    c.hash, c.len, limits.chunk_bytes_max
                )));
            }
            sum = sum.checked_add(c.len).ok_or_else(|| bad("chunk lengths overflow".into()))?;
        }
        if sum != len {
            return Err(bad(format!("chunks hold {sum} bytes but the slice is {len} bytes")));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub rank: u32,
    pub tensors: Vec<TensorEntry>,
    /// Free-form per-rank data (for example a data-loader cursor or an RNG state).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl ShardIndex {
    pub fn validate(&self, world_size: u32, limits: &Limits) -> Result<(), CoreError> {
        if self.rank >= world_size {
            return Err(CoreError::RankOutOfRange { rank: self.rank, world_size });
        }
        if self.tensors.len() > limits.tensors_per_rank_max {
            return Err(CoreError::InvalidShardIndex(format!(
                "{} tensors, more than {}",
                self.tensors.len(),
                limits.tensors_per_rank_max
            )));
        }
        let mut names = BTreeSet::new();
        for t in &self.tensors {
            t.validate(limits)?;
            if !names.insert(t.name.as_str()) {
                return Err(CoreError::InvalidShardIndex(format!("tensor {:?} appears twice", t.name)));
            }
        }
        Ok(())
    }

    pub fn chunk_hashes(&self) -> impl Iterator<Item = ChunkHash> + '_ {
        self.tensors.iter().flat_map(|t| t.chunks.iter().map(|c| c.hash))
    }

    pub fn byte_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len().unwrap_or(0)).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn tensor(name: &str, data: &[u8], chunk: usize) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![data.len() as u64],
            global_shape: vec![data.len() as u64],
            offsets: vec![0],
            chunks: data.chunks(chunk).map(|c| ChunkRef { hash: ChunkHash::of(c), len: c.len() as u64 }).collect(),
        }
    }

    #[test]
    fn valid_index_passes_and_lists_chunks() {
        let idx = ShardIndex { rank: 1, tensors: vec![tensor("w", &[1; 10], 4)], metadata: serde_json::Value::Null };
        idx.validate(2, &Limits::default()).unwrap();
        assert_eq!(idx.chunk_hashes().count(), 3);
        assert_eq!(idx.byte_len(), 10);
    }

    #[test]
    fn broken_indexes_are_refused() {
        let l = Limits::default();
        let ok = ShardIndex { rank: 0, tensors: vec![tensor("w", &[1; 10], 4)], metadata: serde_json::Value::Null };
        assert!(matches!(ok.validate(0, &l), Err(CoreError::RankOutOfRange { .. })));
        let mut r = ok.clone();
        r.rank = 3;
        assert!(r.validate(3, &l).is_err());
        let mut dup = ok.clone();
        dup.tensors.push(dup.tensors[0].clone());
        assert!(dup.validate(1, &l).is_err());
        let mut short = ok.clone();
        short.tensors[0].chunks.pop();
        assert!(short.validate(1, &l).is_err());
        let mut outside = ok.clone();
        outside.tensors[0].offsets = vec![1];
        assert!(outside.validate(1, &l).is_err());
        let mut nul = ok.clone();
        nul.tensors[0].name = "a\0".into();
        assert!(nul.validate(1, &l).is_err());
        let mut overflow = ok;
        overflow.tensors[0].shape = vec![u64::MAX, 2];
        overflow.tensors[0].global_shape = vec![u64::MAX, 2];
        overflow.tensors[0].offsets = vec![0, 0];
        assert!(overflow.validate(1, &l).is_err());
    }
}
