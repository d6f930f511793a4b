//! Reading a committed checkpoint's metadata: its root, and only the index objects a reader
//! needs.
//!
//! A restoring rank reads the root (about 90 bytes a rank) and its own index object; a
//! resharding rank reads the root and the index objects its rows live in (the root's layout
//! names them). Every root is checked against its own hash and against the job and step asked
//! for; every index object against the address and length the root gives and the rank it must
//! be. Version-1 checkpoints (one manifest with every index inline) read the same way.

use bytes::Bytes;
use ckpt_core::commit::parse_index_object;
use ckpt_core::{CommitObject, Limits, Manifest, Root, ShardIndex};
use futures::{StreamExt, TryStreamExt};

use crate::client::Client;
use crate::error::ClientError;
use crate::http::Body;

/// A committed checkpoint as a reader first sees it: its root. A version-1 manifest carries its
/// indexes inline.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub root: Root,
    inline: Option<std::sync::Arc<Vec<ShardIndex>>>,
}

impl Checkpoint {
    pub fn job(&self) -> &str {
        &self.root.job
    }
    pub fn step(&self) -> u64 {
        self.root.step
    }
    pub fn world_size(&self) -> u32 {
        self.root.world_size
    }
    pub fn metadata(&self) -> &serde_json::Value {
        &self.root.metadata
    }
}

/// A reader accepts what any ckptd may have written; its own configured limits are ckptd's.
fn reader_limits() -> Limits {
    Limits {
        world_size_max: u32::MAX,
        tensors_per_rank_max: usize::MAX,
        chunk_bytes_max: u64::MAX,
        ..Limits::default()
    }
}

impl Client {
    /// A committed checkpoint's root, checked against its own hash and against the job and step
    /// asked for.
    pub async fn checkpoint(&self, job: &str, step: u64) -> Result<Checkpoint, ClientError> {
        ckpt_core::validate_job(job)?;
        let bytes =
            self.request(reqwest::Method::GET, &format!("/v1/jobs/{job}/checkpoints/{step}"), Body::Empty).await?;
        let corrupt = |reason: String| ClientError::CorruptManifest { job: job.into(), step, reason };
        let parsed = tokio::task::spawn_blocking(move || CommitObject::parse(&bytes, &reader_limits()))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .map_err(|e| corrupt(e.to_string()))?;
        if parsed.job() != job || parsed.step() != step {
            return Err(corrupt(format!("it is the root of {}@{}", parsed.job(), parsed.step())));
        }
        match parsed {
            CommitObject::Root(root) => Ok(Checkpoint { root, inline: None }),
            CommitObject::V1(m) => {
                let root = Root::from_v1(&m).map_err(|e| corrupt(e.to_string()))?;
                Ok(Checkpoint { root, inline: Some(std::sync::Arc::new(m.ranks)) })
            }
        }
    }

    /// Rank `rank`'s shard index of a checkpoint, fetched by the address its root gives and
    /// checked against it.
    pub async fn shard_index(&self, cp: &Checkpoint, rank: u32) -> Result<ShardIndex, ClientError> {
        let no_rank =
            || ClientError::NoSuchRank { job: cp.job().into(), step: cp.step(), rank, world_size: cp.world_size() };
        if let Some(inline) = &cp.inline {
            return inline.get(rank as usize).cloned().ok_or_else(no_rank);
        }
        let r = *cp.root.ranks.get(rank as usize).ok_or_else(no_rank)?;
        let bytes: Bytes = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{}/indexes/{}", cp.job(), r.hash), Body::Empty)
            .await?;
        let world = cp.world_size();
        tokio::task::spawn_blocking(move || parse_index_object(&bytes, &r, rank, world, &reader_limits()))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .map_err(|e| ClientError::CorruptManifest { job: cp.job().into(), step: cp.step(), reason: e.to_string() })
    }

    /// The indexes of `ranks`, fetched concurrently, in the order given.
    pub async fn shard_indexes(&self, cp: &Checkpoint, ranks: &[u32]) -> Result<Vec<ShardIndex>, ClientError> {
        futures::stream::iter(ranks.iter().map(|&r| self.shard_index(cp, r)))
            .buffered(self.options().concurrency.max(1))
            .try_collect()
            .await
    }

    /// The whole checkpoint: its root and every rank's index. For tools that need every rank
    /// (show, verify, average); a rank's restore needs only `checkpoint` and `shard_index`.
    pub async fn manifest(&self, job: &str, step: u64) -> Result<Manifest, ClientError> {
        let cp = self.checkpoint(job, step).await?;
        let ranks: Vec<u32> = (0..cp.world_size()).collect();
        let indexes = self.shard_indexes(&cp, &ranks).await?;
        Manifest::assemble(&cp.root, indexes).map_err(|e| ClientError::CorruptManifest {
            job: job.into(),
            step,
            reason: e.to_string(),
        })
    }
}
