//! Committed checkpoints out: listings, roots, index objects, chunks, and deletion.
//!
//! Design note.
//! * ckptd never serves bytes it has not checked: a root (or version-1 manifest) is parsed and
//!   checked against its own hash, an index object against its content address, a chunk
//!   against its hash unless the caller says it verifies every byte itself (the client does,
//!   and checks index objects and roots again on arrival).
//! * The index holds a copy of every committed root for listings; a root the index does not
//!   have (a peer ckptd committed it) is read from the store.
//! * Deleting a checkpoint deletes its root, the commit point, so it disappears atomically;
//!   its index objects and chunks stay for garbage collection.

use bytes::Bytes;
use ckpt_core::{ChunkHash, ChunkHeader, Codec, CommitObject};

use crate::coordinator::{CheckpointList, Coordinator};
use crate::error::{join_error, ServiceError};
use crate::store::StoreError;

impl Coordinator {
    pub async fn jobs(&self) -> Result<Vec<String>, ServiceError> {
        self.blocking(|i| i.jobs()).await
    }

    pub async fn list(&self, job: &str) -> Result<CheckpointList, ServiceError> {
        let j = job.to_string();
        let steps = self.blocking(move |i| i.manifest_steps(&j)).await?;
        // Summaries come from the cache; a root is parsed (about 90 bytes a rank) only the first
        // time it is listed or polled.
        let mut committed = Vec::with_capacity(steps.len());
        for step in steps {
            if let Some(summary) = self.committed_summary(job, step).await? {
                committed.push(summary);
            }
        }
        let mut in_flight = Vec::new();
        for (key, slot) in self.slots_of(job) {
            in_flight.push(self.slot_status(&key, &slot).await);
        }
        in_flight.extend(self.recently_aborted(job, None));
        in_flight.sort_by_key(|s| s.step);
        Ok(CheckpointList { job: job.into(), committed, in_flight })
    }

    /// The commit object's bytes exactly as stored (a version-2 root or a version-1 manifest).
    /// Looks in the store when the index does not have it (a peer ckptd may have committed it),
    /// and checks the bytes before returning them.
    pub async fn manifest_bytes(&self, job: &str, step: u64) -> Result<Bytes, ServiceError> {
        let j = job.to_string();
        let bytes = match self.blocking(move |i| i.get_manifest(&j, step)).await? {
            Some(b) => Bytes::from(b),
            None => match self.store.get_manifest(job, step).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => {
                    return Err(ServiceError::NotFound(format!("no checkpoint {job}@{step}")))
                }
                Err(e) => return Err(e.into()),
            },
        };
        let (check, limits) = (bytes.clone(), self.limits);
        tokio::task::spawn_blocking(move || CommitObject::parse(&check, &limits))
            .await
            .map_err(join_error)?
            .map_err(|e| ServiceError::CorruptManifest { job: job.into(), step, reason: e.to_string() })?;
        Ok(bytes)
    }

    /// A rank's index object, checked against its content address.
    pub async fn index_object_bytes(&self, job: &str, hash: ChunkHash) -> Result<Bytes, ServiceError> {
        let bytes = match self.store.get_index_object(job, &hash).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                return Err(ServiceError::NotFound(format!("index object {hash} of job {job} not found")))
            }
            Err(e) => return Err(e.into()),
        };
        let check = bytes.clone();
        let actual = tokio::task::spawn_blocking(move || ChunkHash::of(&check)).await.map_err(join_error)?;
        if actual != hash {
            return Err(ServiceError::CorruptChunk {
                job: job.into(),
                hash,
                reason: format!("index object bytes hash to {actual}"),
            });
        }
        Ok(bytes)
    }

    pub async fn latest_step(&self, job: &str) -> Result<u64, ServiceError> {
        let j = job.to_string();
        self.blocking(move |i| i.manifest_steps(&j))
            .await?
            .last()
            .copied()
            .ok_or_else(|| ServiceError::NotFound(format!("job {job} has no committed checkpoint")))
    }

    /// Deletes a committed checkpoint's root. Its index objects and chunks stay until garbage
    /// collection. The newest committed checkpoint is kept unless `force` is set (it is what a
    /// restart needs), and so is a pinned one (someone asked to keep it).
    pub async fn delete_checkpoint(&self, job: &str, step: u64, force: bool) -> Result<(), ServiceError> {
        let latest = self.latest_step(job).await.ok();
        let j = job.to_string();
        if self.blocking(move |i| i.get_manifest(&j, step)).await?.is_none() {
            return Err(ServiceError::NotFound(format!("no checkpoint {job}@{step}")));
        }
        if latest == Some(step) && !force {
            return Err(ServiceError::Conflict(format!(
                "{job}@{step} is the newest committed checkpoint; pass force to delete it"
            )));
        }
        if !force && self.store.get_record(&ckpt_core::keys::pin_key(job, step)).await?.is_some() {
            return Err(ServiceError::Conflict(format!("{job}@{step} is pinned; unpin it or pass force to delete it")));
        }
        self.remove_root(job, step, "deleted on request").await
    }

    /// Deletes a root from the store, then from the index and the summary cache.
    pub(crate) async fn remove_root(&self, job: &str, step: u64, why: &str) -> Result<(), ServiceError> {
        self.store.delete_manifest(job, step).await?;
        self.summaries.lock().unwrap_or_else(|e| e.into_inner()).remove(&(job.to_string(), step));
        let j = job.to_string();
        self.blocking(move |i| i.remove_manifest(&j, step)).await?;
        self.index.flush().await?;
        tracing::info!(job, step, why, "checkpoint deleted");
        Ok(())
    }

    /// Reads a chunk back, decodes it and verifies its hash: ckptd never serves bytes it has
    /// not verified, unless the caller says it verifies every byte itself (`verify = false`);
    /// the header's address and length are checked either way.
    #[tracing::instrument(name = "chunk.get", skip(self), fields(job = %job, hash = %hash))]
    pub async fn get_chunk(&self, job: &str, hash: ChunkHash, verify: bool) -> Result<Bytes, ServiceError> {
        let started = std::time::Instant::now();
        let m = &crate::metrics::METRICS;
        let result = self.read_chunk(job, hash, verify).await;
        match &result {
            Ok(b) => {
                m.served_bytes.add(b.len() as u64, &[]);
                m.restore_chunk_seconds.record(started.elapsed().as_secs_f64(), &[]);
            }
            Err(ServiceError::CorruptChunk { .. }) => {
                m.verification_failures.add(1, &[opentelemetry::KeyValue::new("where", "read")])
            }
            Err(_) => {}
        }
        result
    }

    async fn read_chunk(&self, job: &str, hash: ChunkHash, verify: bool) -> Result<Bytes, ServiceError> {
        let stored = match self.store.get_chunk(job, &hash).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                return Err(ServiceError::NotFound(format!("chunk {hash} of job {job} not found")))
            }
            Err(e) => return Err(e.into()),
        };
        let job = job.to_string();
        tokio::task::spawn_blocking(move || {
            let corrupt = |reason: String| ServiceError::CorruptChunk { job: job.clone(), hash, reason };
            let (header, _) = ChunkHeader::decode(&stored).map_err(|e| corrupt(e.to_string()))?;
            if header.hash != hash {
                return Err(corrupt(format!("header names chunk {}", header.hash)));
            }
            let raw = match header.codec {
                Codec::None => stored.slice(ckpt_core::CHUNK_HEADER_BYTES..),
                _ => {
                    let raw = ckpt_core::codec::decode_stored(&stored, &hash).map_err(|e| corrupt(e.to_string()))?;
                    return Ok(Bytes::from(raw));
                }
            };
            if verify {
                let actual = ChunkHash::of(&raw);
                if actual != hash {
                    return Err(corrupt(format!("stored bytes hash to {actual}")));
                }
            }
            Ok(raw)
        })
        .await
        .map_err(join_error)?
    }
}
