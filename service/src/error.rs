use ckpt_core::{ChunkHash, CoreError};

use crate::adopt::AdoptError;
use crate::durable::DurableError;
use crate::index::IndexError;
use crate::store::StoreError;

/// Everything a ckptd operation can fail with. The HTTP layer maps each variant to a status and
/// a stable machine-readable code; the message is for people.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("shard index of rank {rank} names {count} chunk(s) this job does not have, first {first}")]
    UnknownChunks { rank: u32, count: usize, first: ChunkHash },
    #[error("{0}")]
    Conflict(String),
    #[error(
        "job {job} is fenced at generation {fence}; a writer of generation {epoch} was replaced and may not change it"
    )]
    Fenced { job: String, epoch: u64, fence: u64 },
    #[error("ckptd is busy: {0}")]
    Busy(String),
    #[error("request body does not match its digest (blake3 {actual}, header says {expected}): changed in transit")]
    BodyMismatch { expected: String, actual: String },
    #[error("request body sent nothing for {idle_ms} ms; dropped")]
    BodyStalled { idle_ms: u64 },
    #[error("request body not received within {within_ms} ms (body_min_bytes_per_s = {min_bytes_per_s}); dropped")]
    BodyTooSlow { within_ms: u64, min_bytes_per_s: u64 },
    /// `/readyz`: the store or the state disk failed its probe, or the index is damaged (503).
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("request body too large: {0}")]
    TooLarge(String),
    #[error("chunk {hash} of job {job} is corrupt in the store: {reason}")]
    CorruptChunk { job: String, hash: ChunkHash, reason: String },
    #[error("manifest of {job}@{step} is corrupt in the store: {reason}")]
    CorruptManifest { job: String, step: u64, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(transparent)]
    Adopt(#[from] AdoptError),

    /// No credentials, or credentials that name no tenant (401).
    #[error("{0}")]
    Unauthorized(String),
    /// An authenticated tenant asked for something only an admin may do (403).
    #[error("{0}")]
    Forbidden(String),
    /// A tenant over one of its lasting quotas (saves in flight, stored bytes): 429 with
    /// Retry-After, code `over_quota`; waiting alone may not cure it.
    #[error("{reason}")]
    OverQuota { reason: String, retry_after_s: u64 },
    /// A tenant over its request rate or holding its whole share of the chunk slots or the
    /// staging budget: 429 with Retry-After, code `rate_limited`; clients wait and retry.
    #[error("{reason}")]
    RateLimited { reason: String, retry_after_s: u64 },

    /// ckptd cannot start: its address, its data directory.
    #[error("{0}")]
    Startup(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::Core(e) => match e {
                CoreError::InvalidJob { .. } => "invalid_job",
                CoreError::InvalidStep { .. } => "invalid_step",
                CoreError::InvalidHash { .. } => "invalid_hash",
                CoreError::RankOutOfRange { .. } => "rank_out_of_range",
                CoreError::InvalidWorldSize { .. } => "invalid_world_size",
                CoreError::InvalidShardIndex(_) => "invalid_shard_index",
                CoreError::InvalidChunk(_) => "invalid_chunk",
                CoreError::HashMismatch { .. } => "hash_mismatch",
                CoreError::InvalidManifest(_) => "invalid_manifest",
                CoreError::Conflict { .. } => "conflict",
                CoreError::InvalidTransition { .. } => "invalid_transition",
            },
            ServiceError::BadRequest(_) => "bad_request",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::UnknownChunks { .. } => "unknown_chunks",
            ServiceError::Conflict(_) => "conflict",
            ServiceError::Fenced { .. } => "fenced",
            ServiceError::Busy(_) => "busy",
            ServiceError::BodyStalled { .. } => "body_stalled",
            ServiceError::BodyTooSlow { .. } => "body_too_slow",
            ServiceError::BodyMismatch { .. } => "body_mismatch",
            ServiceError::TooLarge(_) => "too_large",
            ServiceError::NotReady(_) => "not_ready",
            ServiceError::CorruptChunk { .. } => "chunk_corrupt",
            ServiceError::CorruptManifest { .. } => "manifest_corrupt",
            ServiceError::Store(_) => "store_error",
            ServiceError::Index(e) if e.is_damage() => "index_damaged",
            ServiceError::Index(_) => "index_error",
            ServiceError::Io(_) | ServiceError::Durable(_) => "io_error",
            ServiceError::Adopt(e) => e.code(),
            ServiceError::Unauthorized(_) => "unauthorized",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::OverQuota { .. } => "over_quota",
            ServiceError::RateLimited { .. } => "rate_limited",
            ServiceError::Startup(_) => "startup",
            ServiceError::Internal(_) => "internal",
        }
    }
}

pub fn join_error(e: tokio::task::JoinError) -> ServiceError {
    ServiceError::Internal(format!("blocking task failed: {e}"))
}
