use crate::hash::ChunkHash;

/// Every way a format or protocol rule can be broken. Messages are lowercase and name the
/// offending value so a caller can show them to a user unchanged.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    #[error("invalid job name {name:?}: {reason}")]
    InvalidJob { name: String, reason: &'static str },
    #[error("invalid step {value:?}: {reason}")]
    InvalidStep { value: String, reason: &'static str },
    #[error("invalid hash {value:?}: expected 64 lowercase hex digits")]
    InvalidHash { value: String },
    #[error("rank {rank} is outside world size {world_size}")]
    RankOutOfRange { rank: u32, world_size: u32 },
    #[error("invalid world size {world_size}: {reason}")]
    InvalidWorldSize { world_size: u32, reason: &'static str },
    #[error("invalid shard index: {0}")]
    InvalidShardIndex(String),
    #[error("invalid chunk: {0}")]
    InvalidChunk(String),
    #[error("chunk {expected} does not match its content (content hashes to {actual})")]
    HashMismatch { expected: ChunkHash, actual: ChunkHash },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("save {job}@{step}: {reason}")]
    Conflict { job: String, step: u64, reason: String },
    #[error("save {job}@{step} cannot go from {from} to {to}")]
    InvalidTransition { job: String, step: u64, from: &'static str, to: &'static str },
}
