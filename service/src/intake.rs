//! Chunks in: uploads over HTTP into the staging tier, node-local adoption of handoff files, and
//! the lookups that say whether a job has a chunk and how long it is.
//!
//! Design note.
//! * Consistency: a chunk is `staged` while the staging tier holds it and `durable` once its
//!   store put returned and the index recorded it (the index records after the put, and the
//!   staging tier forgets the chunk after the index records it, so a lookup that misses the
//!   staging tier finds the index entry). The index lags the store after a crash or when a
//!   peer wrote the chunk, so a chunk the index does not know is looked up in the store (its
//!   48-byte header, which also gives its raw length) before anyone is told it is missing.
//! * Cost: a lookup of n hashes is one pass over the staging set, one blocking index batch,
//!   and store reads only for what the index does not know, `store_requests_max` at a time.
//!   The per-request cap `missing_query_hashes_max` applies to the API's existence query only;
//!   a shard index is bounded by its body size (`shard_index_bytes_max`).
//! * Answers are truthful: a chunk put answers `durable: false` for a chunk only staged.

use bytes::Bytes;
use ckpt_core::{ChunkHash, CHUNK_HEADER_BYTES};
use futures::{StreamExt, TryStreamExt};

use crate::coordinator::{ChunkPutOutcome, ChunkState, Coordinator};
use crate::error::{join_error, ServiceError};
use crate::staging::UploadEvent;
use tokio::sync::OwnedSemaphorePermit;

/// What a job holds of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Missing,
    Staged {
        raw_len: u64,
    },
    /// `raw_len` is None when only the stored size is on record and the header was not read.
    Durable {
        raw_len: Option<u64>,
    },
}

impl Coordinator {
    /// Looks up each of `hashes` (see the design note). With `need_len`, a durable chunk whose
    /// raw length the index lacks has its header read, so `Durable` carries the length.
    pub(crate) async fn lookup(
        &self,
        job: &str,
        hashes: &[ChunkHash],
        need_len: bool,
    ) -> Result<Vec<Known>, ServiceError> {
        let mut known = self.lookup_trusting_condemned(job, hashes, need_len).await?;
        // A durable chunk on the job's condemned list counts as missing: it is sent and written
        // again, which saves it from the sweep (see `gc.rs`).
        for (k, h) in known.iter_mut().zip(hashes) {
            if matches!(k, Known::Durable { .. }) && self.gc_condemned(job, h) {
                *k = Known::Missing;
            }
        }
        Ok(known)
    }

    /// `lookup` without the condemned list: what the store and staging hold.
    pub(crate) async fn lookup_trusting_condemned(
        &self,
        job: &str,
        hashes: &[ChunkHash],
        need_len: bool,
    ) -> Result<Vec<Known>, ServiceError> {
        let mut out: Vec<Known> = hashes
            .iter()
            .map(|h| match self.staging.pending_raw_len(job, h) {
                Some(raw_len) => Known::Staged { raw_len },
                None => Known::Missing,
            })
            .collect();
        let unstaged: Vec<(usize, ChunkHash)> =
            out.iter().enumerate().filter(|(_, k)| **k == Known::Missing).map(|(i, _)| (i, hashes[i])).collect();
        let j = job.to_string();
        let records = self
            .blocking(move |idx| {
                unstaged.into_iter().map(|(i, h)| Ok((i, h, idx.get_chunk(&j, &h)?))).collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut ask_store = Vec::new();
        for (i, h, rec) in records {
            match rec {
                Some(r) if r.raw_len.is_some() || !need_len => out[i] = Known::Durable { raw_len: r.raw_len },
                _ => ask_store.push((i, h)),
            }
        }
        if ask_store.is_empty() {
            return Ok(out);
        }
        let (store, j): (_, std::sync::Arc<str>) = (self.store.clone(), job.into());
        let found: Vec<(usize, ChunkHash, Option<u64>)> = futures::stream::iter(ask_store)
            .map(move |(i, h)| {
                let (store, j) = (store.clone(), j.clone());
                async move { store.chunk_raw_len(&j, &h).await.map(|len| (i, h, len)) }
            })
            .buffer_unordered(self.config.store_requests_max)
            .try_collect()
            .await?;
        let mut record = Vec::new();
        for (i, h, len) in found {
            if let Some(len) = len {
                out[i] = Known::Durable { raw_len: Some(len) };
                record.push((h, len));
            }
        }
        if !record.is_empty() {
            // A file in a local store can be visible and not yet durable (renamed into place by
            // a write or an adopt still waiting for its sync, or left by a killed ckptd): it is
            // answered durable and recorded only once the store's filesystem is synced.
            self.sync_local_store().await?;
            let j = job.to_string();
            // The stored size is not needed by any reader; 0 marks it unknown.
            self.blocking(move |idx| record.iter().try_for_each(|(h, len)| idx.put_chunk(&j, h, 0, Some(*len))))
                .await?;
        }
        Ok(out)
    }

    /// Which of `hashes` the job has neither staged nor durable.
    pub async fn missing_chunks(&self, job: &str, hashes: Vec<ChunkHash>) -> Result<Vec<ChunkHash>, ServiceError> {
        if hashes.len() > self.config.missing_query_hashes_max {
            return Err(ServiceError::BadRequest(format!(
                "{} hashes in one query, more than {}",
                hashes.len(),
                self.config.missing_query_hashes_max
            )));
        }
        let known = self.lookup(job, &hashes, false).await?;
        let mut missing: Vec<ChunkHash> =
            hashes.iter().zip(known).filter(|(_, k)| *k == Known::Missing).map(|(h, _)| *h).collect();
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// Receives a chunk of `len` bytes, verifies it against `hash`, and stages it for upload.
    /// Idempotent: a chunk already staged or durable is drained and not stored again. A body
    /// that stalls fails with `BodyStalled` (the HTTP layer times out every frame), which drops
    /// the caller's chunk slot and this chunk's staging space.
    #[tracing::instrument(name = "chunk.put", skip(self, body), fields(job = %job, hash = %hash, bytes = len))]
    pub async fn put_chunk<S>(
        &self,
        job: &str,
        hash: ChunkHash,
        len: u64,
        mut body: S,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<ChunkPutOutcome, ServiceError>
    where
        S: futures::Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send + 'static,
    {
        let started = std::time::Instant::now();
        if len == 0 || len > self.config.chunk_bytes_max {
            return Err(ServiceError::BadRequest(format!(
                "chunk is {len} bytes, not in 1..={}",
                self.config.chunk_bytes_max
            )));
        }
        let known = self.lookup(job, &[hash], false).await?[0];
        if known != Known::Missing {
            // Read the body anyway so the connection stays usable for the client's next request.
            while let Some(frame) = body.next().await {
                frame?;
            }
            let state = if matches!(known, Known::Durable { .. }) { ChunkState::Durable } else { ChunkState::Staged };
            return Ok(ChunkPutOutcome { written: false, state });
        }
        let m = &crate::metrics::METRICS;
        match self.staging.stage(job, hash, len, body, share).await {
            Ok(()) => {}
            Err(e) => {
                if matches!(e, ServiceError::Core(ckpt_core::CoreError::HashMismatch { .. })) {
                    m.verification_failures.add(1, &[opentelemetry::KeyValue::new("where", "upload")]);
                }
                return Err(e);
            }
        }
        m.staged_bytes.add(len, &[]);
        m.stage_seconds.record(started.elapsed().as_secs_f64(), &[]);
        Ok(ChunkPutOutcome { written: true, state: ChunkState::Staged })
    }

    /// Where clients on this host may hand over chunk files, and the store's root if it is a
    /// local directory they may read verified chunks from. A tenant gets its own handoff
    /// directory and no store root: the store's files are every tenant's, so with tenants
    /// reads go over HTTP.
    pub fn local_paths(
        &self,
        tenant: Option<&crate::auth::Tenant>,
    ) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>), ServiceError> {
        match tenant {
            None => Ok((self.handoff_dir.clone(), self.store.local_root().map(|p| p.to_path_buf()))),
            Some(t) => Ok((self.tenant_handoff_dir(t)?, None)),
        }
    }

    /// `<handoff_dir>/tenants/<name>`, made at start-up (`prepare_tenant_dirs`). Checked on
    /// every use without following links: a directory swapped for a link, or for one with
    /// another owner or looser mode, is refused rather than used.
    fn tenant_handoff_dir(&self, t: &crate::auth::Tenant) -> Result<std::path::PathBuf, ServiceError> {
        use std::os::unix::fs::MetadataExt;
        let root = self.handoff_dir.join("tenants");
        let dir = root.join(&t.name);
        let owner = std::fs::symlink_metadata(&root)?.uid();
        let m = std::fs::symlink_metadata(&dir)?;
        if !m.is_dir() || m.mode() & 0o077 != 0 || m.uid() != t.uid.unwrap_or(owner) {
            return Err(ServiceError::Internal(format!(
                "handoff directory {} is not the private directory ckptd made for tenant {}",
                dir.display(),
                t.name
            )));
        }
        Ok(dir)
    }

    /// Where clients on this host register shared-memory segments, if the path is on.
    pub fn segment_socket(&self) -> Option<std::path::PathBuf> {
        self.segment_socket.get().cloned()
    }

    /// The node-local path for uploads, for a local-directory store: a stored chunk file the
    /// client wrote into the handoff directory (verified through one fd and renamed into place,
    /// or copied when the handoff directory is on another filesystem; see `adopt.rs`), or raw
    /// bytes in a registered shared-memory segment (see [`Self::adopt_segment`]). Durable on
    /// return.
    pub async fn adopt_chunk(
        &self,
        job: &str,
        hash: ChunkHash,
        source: AdoptSource,
        permit: OwnedSemaphorePermit,
        tenant: Option<&crate::auth::Tenant>,
    ) -> Result<ChunkPutOutcome, ServiceError> {
        let name = match source {
            AdoptSource::File(name) => name,
            AdoptSource::Segment(seg) => return Ok(self.adopt_segment(job, Some(hash), seg, permit).await?.1),
        };
        let fs = self.local_fs()?;
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
            return Err(ServiceError::BadRequest(format!("handoff file name {name:?} is not a plain file name")));
        }
        // A tenant adopts only from its own directory: a name is looked up nowhere else.
        let path = match tenant {
            None => self.handoff_dir.join(name),
            Some(t) => self.tenant_handoff_dir(t)?.join(name),
        };
        if matches!(self.lookup(job, &[hash], false).await?[0], Known::Durable { .. }) {
            let _ = tokio::fs::remove_file(&path).await;
            settle(fs).await?;
            return Ok(ChunkPutOutcome { written: false, state: ChunkState::Durable });
        }
        let dest = self.local_dest(job, &hash)?;
        let stored_bytes_max = self.config.chunk_bytes_max + CHUNK_HEADER_BYTES as u64;
        let (j, idx) = (job.to_string(), self.index.clone());
        tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
            // The slot is held by the work, not by the request: a client that hangs up does not
            // free it while its chunk is still being adopted.
            let _permit = permit;
            let adopted = crate::adopt::adopt(&path, &dest, hash, stored_bytes_max, &fs)?;
            if adopted.copied {
                tracing::debug!(job = j, %hash, "handoff directory is on another filesystem; chunk copied");
            }
            idx.put_chunk(&j, &hash, adopted.stored_len, Some(adopted.raw_len))?;
            Ok(())
        })
        .await
        .map_err(join_error)??;
        let _ = self.events.send(UploadEvent::Durable { job: job.to_string(), hash });
        Ok(ChunkPutOutcome { written: true, state: ChunkState::Durable })
    }

    /// Raw bytes from a registered shared-memory segment: copied out into a private aligned
    /// buffer, hashed there (and checked against `expected` when the client named the chunk;
    /// otherwise ckptd names it), stored unless the job already has it, encoded as the core
    /// codec decides and written with direct I/O (see `segments.rs`). Durable on return;
    /// returns the chunk's address.
    pub async fn adopt_segment(
        &self,
        job: &str,
        expected: Option<ChunkHash>,
        req: SegmentChunk,
        permit: OwnedSemaphorePermit,
    ) -> Result<(ChunkHash, ChunkPutOutcome), ServiceError> {
        let fs = self.local_fs()?;
        if req.len == 0 || req.len > self.config.chunk_bytes_max {
            return Err(ServiceError::BadRequest(format!(
                "a chunk of {} bytes; chunks are 1 to {} bytes",
                req.len, self.config.chunk_bytes_max
            )));
        }
        let Some(seg) = self.segments.get(&req.token) else {
            return Err(crate::adopt::AdoptError::Segment("no such segment (closed or never registered)".into()).into());
        };
        let stored = ChunkPutOutcome { written: false, state: ChunkState::Durable };
        if let Some(hash) = expected {
            if matches!(self.lookup(job, &[hash], false).await?[0], Known::Durable { .. }) {
                settle(fs).await?;
                return Ok((hash, stored));
            }
        }
        let segments = self.segments.clone();
        let (offset, len) = (req.offset, req.len);
        // The slot travels with the blocking work (see `adopt_chunk`).
        let (permit, copied) = tokio::task::spawn_blocking(move || {
            (permit, crate::segments::copy_chunk(&segments, &seg, offset, len, expected))
        })
        .await
        .map_err(join_error)?;
        let copied = copied?;
        let hash = copied.hash;
        if expected.is_none() && matches!(self.lookup(job, &[hash], false).await?[0], Known::Durable { .. }) {
            self.segments.discard(copied);
            settle(fs).await?;
            return Ok((hash, stored));
        }
        let dest = match self.local_dest(job, &hash) {
            Ok(d) => d,
            Err(e) => {
                self.segments.discard(copied);
                return Err(e);
            }
        };
        let encode = ckpt_core::codec::EncodeOptions {
            level: req.level.clamp(0, self.config.compression_level),
            min_savings_pct: self.config.compression_min_savings_pct,
            width_hint: req.width,
        };
        let (segments, j, idx) = (self.segments.clone(), job.to_string(), self.index.clone());
        tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
            let _permit = permit;
            let adopted = crate::segments::write_chunk(&segments, copied, &dest, &fs, &encode)?;
            idx.put_chunk(&j, &hash, adopted.stored_len, Some(adopted.raw_len))?;
            Ok(())
        })
        .await
        .map_err(join_error)??;
        let _ = self.events.send(UploadEvent::Durable { job: job.to_string(), hash });
        Ok((hash, ChunkPutOutcome { written: true, state: ChunkState::Durable }))
    }

    /// Group syncs of a local-directory store's filesystem since start-up (0 for an object
    /// store).
    pub fn store_syncs(&self) -> u64 {
        self.fs_sync.as_ref().map_or(0, |fs| fs.syncs())
    }

    /// Makes everything in a local-directory store durable (one group sync, shared with every
    /// caller waiting); nothing to do for an object store, whose puts are durable when they
    /// return.
    pub(crate) async fn sync_local_store(&self) -> Result<(), ServiceError> {
        match &self.fs_sync {
            Some(fs) => settle(fs.clone()).await,
            None => Ok(()),
        }
    }

    /// The group sync of a local-directory store, or why the node-local path is refused.
    fn local_fs(&self) -> Result<std::sync::Arc<crate::durable::FsSync>, ServiceError> {
        if self.store.local_root().is_none() {
            return Err(ServiceError::Conflict(
                "the node-local path needs a local-directory store; send the chunk over HTTP".into(),
            ));
        }
        self.fs_sync.clone().ok_or_else(|| {
            ServiceError::Conflict("the store's filesystem cannot be synced here; send the chunk over HTTP".into())
        })
    }

    fn local_dest(&self, job: &str, hash: &ChunkHash) -> Result<std::path::PathBuf, ServiceError> {
        self.store
            .local_chunk_path(job, hash)
            .ok_or_else(|| ServiceError::Internal("local store without a root".into()))
    }
}

/// Makes sure a chunk found in the local store is durable before an adopt answers for it: the
/// store check also sees a file another adopt has renamed onto its key but not yet synced (one
/// group sync, shared with every adopt waiting).
async fn settle(fs: std::sync::Arc<crate::durable::FsSync>) -> Result<(), ServiceError> {
    tokio::task::spawn_blocking(move || fs.sync()).await.map_err(join_error)??;
    Ok(())
}

/// What a node-local adopt hands over.
pub enum AdoptSource {
    /// A stored chunk file in the handoff directory, by name.
    File(String),
    Segment(SegmentChunk),
}

/// `len` raw bytes at `offset` of the registered segment `token`, to be stored encoded as the
/// core codec decides (`width` of the tensor's elements, zstd `level` at most ckptd's).
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentChunk {
    #[serde(rename = "segment")]
    pub token: String,
    pub offset: u64,
    pub len: u64,
    #[serde(default)]
    pub width: Option<u8>,
    #[serde(default)]
    pub level: i32,
}
