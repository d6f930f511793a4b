//! The whole checkpoint in one value: every rank's shard index with the checkpoint's fields.
//!
//! Two uses. It is the version-1 commit object (one manifest holding every index inline, written
//! by earlier ckptd releases), parsed and checked here so old stores stay readable. And it is the
//! full view of a version-2 checkpoint (`Manifest::assemble`, a root plus every index object) for
//! tools that need every rank: verify, show, average. Restores of one rank do not build it.
//!
//! Version-1 bytes are a deterministic function of the content (fields in declaration order,
//! sorted maps); `hash` is blake3 of the serialisation with `hash` empty, and readers check it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::hash::ChunkHash;
use crate::seal::{check_common, check_seal, seal, Sealed};
use crate::shard::ShardIndex;
use crate::validate::Limits;

pub const MANIFEST_FORMAT: &str = "ckpt.manifest";
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub created_unix_ms: u64,
    /// The newest step committed before this one when it was written, if any.
    pub previous_committed_step: Option<u64>,
    /// Free-form trainer metadata for the whole checkpoint.
    pub metadata: serde_json::Value,
    /// One shard index per rank, ordered by rank, ranks 0..world_size.
    pub ranks: Vec<ShardIndex>,
    /// blake3 of this manifest serialised with `hash` set to "".
    pub hash: String,
}

impl Sealed for Manifest {
    fn hash_field(&mut self) -> &mut String {
        &mut self.hash
    }
}

impl Manifest {
    /// Builds a manifest and seals it with its hash. `ranks` must hold each rank exactly once.
    pub fn new(
        job: &str,
        step: u64,
        world_size: u32,
        created_unix_ms: u64,
        previous_committed_step: Option<u64>,
        metadata: serde_json::Value,
        mut ranks: Vec<ShardIndex>,
    ) -> Result<Manifest, CoreError> {
        ranks.sort_by_key(|r| r.rank);
        let mut m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_FORMAT_VERSION,
            job: job.into(),
            step,
            world_size,
            created_unix_ms,
            previous_committed_step,
            metadata,
            ranks,
            hash: String::new(),
        };
        m.check_structure(&Limits { world_size_max: u32::MAX, ..Limits::default() })?;
        m.hash = seal(&m);
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a stored manifest: format, version, hash and structure. The job and
    /// step it claims are compared against the ones expected from its key.
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Manifest, CoreError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| CoreError::InvalidManifest(format!("not a manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(CoreError::InvalidManifest(format!("format is {:?}", m.format)));
        }
        if m.version != MANIFEST_FORMAT_VERSION {
            return Err(CoreError::InvalidManifest(format!("unsupported version {}", m.version)));
        }
        check_seal(&m)?;
        m.check_structure(limits)?;
        Ok(m)
    }

    fn check_structure(&self, limits: &Limits) -> Result<(), CoreError> {
        let (prev, step) = (self.previous_committed_step, self.step);
        check_common(&self.job, self.world_size, self.ranks.len(), "shard indexes", prev, step, limits)?;
        for (i, r) in self.ranks.iter().enumerate() {
            if r.rank as usize != i {
                return Err(CoreError::InvalidManifest(format!("shard index {i} is for rank {}", r.rank)));
            }
            r.validate(self.world_size, limits)?;
        }
        Ok(())
    }

    /// The full view of a version-2 checkpoint: its root and every rank's index, in rank order.
    /// `hash` is the root's.
    pub fn assemble(root: &crate::commit::Root, ranks: Vec<ShardIndex>) -> Result<Manifest, CoreError> {
        let m = Manifest {
            format: root.format.clone(),
            version: root.version,
            job: root.job.clone(),
            step: root.step,
            world_size: root.world_size,
            created_unix_ms: root.created_unix_ms,
            previous_committed_step: root.previous_committed_step,
            metadata: root.metadata.clone(),
            ranks,
            hash: root.hash.clone(),
        };
        m.check_structure(&Limits { world_size_max: u32::MAX, ..Limits::default() })?;
        Ok(m)
    }

    /// Every distinct chunk the checkpoint references.
    pub fn chunk_set(&self) -> BTreeSet<ChunkHash> {
        self.ranks.iter().flat_map(|r| r.chunk_hashes()).collect()
    }

    pub fn summary(&self) -> ManifestSummary {
        ManifestSummary {
            job: self.job.clone(),
            step: self.step,
            world_size: self.world_size,
            created_unix_ms: self.created_unix_ms,
            bytes: self.ranks.iter().map(|r| r.byte_len()).sum(),
            chunks: self.chunk_set().len() as u64,
            hash: self.hash.clone(),
        }
    }
}

/// What listings show of a committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSummary {
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub created_unix_ms: u64,
    /// Logical bytes of all ranks' tensors.
    pub bytes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::tensor;

    fn two_ranks() -> Vec<ShardIndex> {
        (0..2)
            .rev()
            .map(|r| ShardIndex {
                rank: r,
                tensors: vec![tensor("w", &[r as u8; 9], 4)],
                metadata: serde_json::Value::Null,
            })
            .collect()
    }

    #[test]
    fn seal_round_trip_and_determinism() {
        let meta = serde_json::json!({"lr": 0.1, "b": [1, 2], "a": {"z": 1, "y": 2}});
        let m = Manifest::new("job", 10, 2, 5, Some(4), meta.clone(), two_ranks()).unwrap();
        assert_eq!(m.ranks[0].rank, 0, "ranks sorted");
        let bytes = m.to_bytes();
        let back = Manifest::from_bytes(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, m);
        let again = Manifest::new("job", 10, 2, 5, Some(4), meta, two_ranks()).unwrap();
        assert_eq!(again.to_bytes(), bytes, "same content, same bytes");
        assert_eq!(m.summary().bytes, 18);
        assert_eq!(m.chunk_set().len(), 4);
    }

    #[test]
    fn tampering_is_detected() {
        let m = Manifest::new("job", 10, 2, 5, None, serde_json::Value::Null, two_ranks()).unwrap();
        let text = String::from_utf8(m.to_bytes()).unwrap();
        let tampered = text.replace("\"step\": 10", "\"step\": 11");
        assert_ne!(tampered, text);
        assert!(Manifest::from_bytes(tampered.as_bytes(), &Limits::default()).is_err());
        assert!(Manifest::from_bytes(&text.as_bytes()[..text.len() - 3], &Limits::default()).is_err());
    }

    #[test]
    fn structure_is_checked() {
        let mut ranks = two_ranks();
        ranks.pop();
        assert!(Manifest::new("job", 1, 2, 0, None, serde_json::Value::Null, ranks).is_err(), "missing rank");
        assert!(
            Manifest::new("job", 1, 2, 0, Some(1), serde_json::Value::Null, two_ranks()).is_err(),
            "previous not before"
        );
        assert!(Manifest::new("a/b", 1, 2, 0, None, serde_json::Value::Null, two_ranks()).is_err(), "bad job");
    }
}
