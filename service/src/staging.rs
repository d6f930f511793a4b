//! The staging tier and the upload queue: how ckptd absorbs a save burst at memory or local-disk
//! speed and drains it to the object store at the pace the store can take.
//!
//! Design note.
//! * Admission: a chunk upload first reserves its length from the memory budget
//!   (`staging_memory_bytes_max`) and is then read into memory. When memory is full it is streamed
//!   to the spill directory instead (`staging_spill_bytes_max`), hashing as it goes, so a spilled
//!   chunk never occupies more than a network frame of memory. When both are full the request
//!   waits up to `busy_wait_ms` for memory and is then refused with 503 + Retry-After. A body
//!   that stops sending (no frame for `body_progress_timeout_ms`, enforced by the HTTP layer)
//!   fails the receive, which releases the reservation and removes the spill file. Every
//!   chunk byte ckptd holds in memory is inside the budget; the rest is a fixed per-worker
//!   allowance (see `memory_overhead_bytes`).
//! * Staged → durable: each staged chunk is queued for upload (at most `upload_queue_max`; a
//!   chunk that finds the queue full for `busy_wait_ms` is dropped and refused with 503, like
//!   one that finds staging full). A dispatcher runs at most
//!   `upload_concurrency` uploads, optionally paced to `upload_bytes_per_s`. Transient store
//!   errors are retried with capped exponential backoff for as long as ckptd runs; a permanent
//!   error fails the chunk, and the coordinator aborts every save that references it. Only
//!   after the put returns is the chunk recorded durable and its staging space released. For a
//!   local-directory store the put is the node-local path's durable write (`DirectWrites`:
//!   direct I/O from a pooled aligned buffer, group syncs), the store's own put only if that
//!   fails.
//! * Crash consistency: memory-staged chunks are lost with the process (their ack said
//!   "staged", not "durable"; the client re-sends what `missing` reports). Spilled chunks are
//!   fsync'd before the ack and named `<job>/<hash>.<unique>` in the spill directory, which is the
//!   journal of staged data: at start-up every spill file is re-verified and re-queued. The file
//!   is fsync'd, renamed into place and its directory fsync'd (`durable.rs`) before the ack.
//!   Recovery only reads and removes spill files; a removal lost in a crash is redone next time.
//! * Compression: the core chunk codec (plain zstd or byte-grouped planes) at `compression_level`
//!   with one of ckptd's fixed set of encoders (`encoders.rs`). Its sample test keeps a chunk
//!   raw unless the codec saves at least `compression_min_savings_pct` (random or already dense
//!   bytes cost one cheap pass).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ckpt_core::{ChunkHash, ChunkHeader, Codec, CHUNK_HEADER_BYTES};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::durable;
use crate::error::{join_error, ServiceError};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct StagingConfig {
    pub memory_bytes_max: u64,
    pub spill_bytes_max: u64,
    pub spill_dir: PathBuf,
    pub upload_concurrency: usize,
    pub upload_bytes_per_s: u64,
    pub upload_queue_max: usize,
    pub compression_level: i32,
    pub compression_min_savings_pct: u32,
    pub busy_wait: Duration,
    pub chunk_bytes_max: u64,
}

/// Where a staged chunk's bytes are while it waits for upload.
enum Held {
    Memory(Bytes, OwnedSemaphorePermit),
    Spill(PathBuf, Option<OwnedSemaphorePermit>),
}

pub struct Staged {
    pub job: String,
    pub hash: ChunkHash,
    pub raw_len: u64,
    held: Held,
    /// When the chunk was staged (the durable-latency histogram measures from here).
    staged_at: Instant,
    /// The tenant's share of the staging budget this chunk holds, released with it.
    _share: Option<OwnedSemaphorePermit>,
}

/// What the upload queue tells the coordinator.
#[derive(Debug)]
pub enum UploadEvent {
    Durable { job: String, hash: ChunkHash },
    Failed { job: String, hash: ChunkHash, reason: String },
}

#[derive(Debug, Default, Serialize)]
pub struct StagingStats {
    pub memory_bytes: u64,
    pub memory_bytes_max: u64,
    pub spill_bytes: u64,
    pub spill_bytes_max: u64,
    pub chunks_pending: u64,
    pub chunks_staged_memory: u64,
    pub chunks_staged_spill: u64,
    pub chunks_uploaded: u64,
    pub raw_bytes_uploaded: u64,
    pub stored_bytes_uploaded: u64,
    pub chunks_compressed: u64,
    pub busy_rejections: u64,
    pub upload_retries: u64,
    pub upload_failures: u64,
}

#[derive(Default)]
struct Counters {
    chunks_staged_memory: AtomicU64,
    chunks_staged_spill: AtomicU64,
    chunks_uploaded: AtomicU64,
    raw_bytes_uploaded: AtomicU64,
    stored_bytes_uploaded: AtomicU64,
    chunks_compressed: AtomicU64,
    busy_rejections: AtomicU64,
    upload_retries: AtomicU64,
    upload_failures: AtomicU64,
}

pub struct Staging {
    cfg: StagingConfig,
    memory: Arc<Semaphore>,
    spill: Arc<Semaphore>,
    queue: mpsc::Sender<Staged>,
    /// Chunks staged and not yet durable, with their raw length.
    pending: Mutex<HashMap<(String, ChunkHash), u64>>,
    counters: Counters,
    encoders: Arc<crate::encoders::Encoders>,
    direct: Option<DirectWrites>,
}

/// How chunks bound for a local-directory store are written: like node-local adopts (direct
/// I/O from pooled aligned buffers, one group sync for every write in flight) rather than through
/// the object store's buffered put with two fsyncs per chunk.
pub struct DirectWrites {
    pub fs: Arc<crate::durable::FsSync>,
    pub buffers: Arc<crate::segments::Segments>,
}

fn permits(bytes: u64) -> u32 {
    // Chunks are at most 1 GiB (config validation), so this never saturates in practice.
    bytes.min(u32::MAX as u64) as u32
}

impl Staging {
    /// Creates the staging tier and starts the upload dispatcher. Upload outcomes are sent on
    /// `events`.
    pub fn start(
        cfg: StagingConfig,
        store: Store,
        index: crate::index::Index,
        events: mpsc::UnboundedSender<UploadEvent>,
        encoders: Arc<crate::encoders::Encoders>,
        direct: Option<DirectWrites>,
    ) -> Arc<Staging> {
        let (tx, rx) = mpsc::channel(cfg.upload_queue_max.max(1));
        let staging = Arc::new(Staging {
            memory: Arc::new(Semaphore::new(cfg.memory_bytes_max as usize)),
            spill: Arc::new(Semaphore::new(cfg.spill_bytes_max as usize)),
            queue: tx,
            pending: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            cfg,
            encoders,
            direct,
        });
        tokio::spawn(dispatch(staging.clone(), rx, store, index, events));
        staging
    }

    /// The most memory ckptd uses for chunk data beyond `staging_memory_bytes_max`: each upload
    /// worker may hold a spilled chunk it read back and a compressed copy.
    pub fn memory_overhead_bytes(&self) -> u64 {
        self.cfg.upload_concurrency as u64 * 2 * self.cfg.chunk_bytes_max
    }

    /// The raw length of a chunk that is staged and not yet durable.
    pub fn pending_raw_len(&self, job: &str, hash: &ChunkHash) -> Option<u64> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), *hash)).copied()
    }

    /// Marks a chunk staged (`Some(raw length)`) or no longer staged (`None`); false when that
    /// changed nothing.
    fn set_pending(&self, job: &str, hash: ChunkHash, raw_len: Option<u64>) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match raw_len {
            Some(len) => match p.entry((job.to_string(), hash)) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(len);
                    true
                }
            },
            None => p.remove(&(job.to_string(), hash)).is_some(),
        }
    }

    pub fn stats(&self) -> StagingStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StagingStats {
            memory_bytes: self.cfg.memory_bytes_max - self.memory.available_permits() as u64,
            memory_bytes_max: self.cfg.memory_bytes_max,
            spill_bytes: self.cfg.spill_bytes_max - self.spill.available_permits() as u64,
            spill_bytes_max: self.cfg.spill_bytes_max,
            chunks_pending: self.pending.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
            chunks_staged_memory: l(&c.chunks_staged_memory),
            chunks_staged_spill: l(&c.chunks_staged_spill),
            chunks_uploaded: l(&c.chunks_uploaded),
            raw_bytes_uploaded: l(&c.raw_bytes_uploaded),
            stored_bytes_uploaded: l(&c.stored_bytes_uploaded),
            chunks_compressed: l(&c.chunks_compressed),
            busy_rejections: l(&c.busy_rejections),
            upload_retries: l(&c.upload_retries),
            upload_failures: l(&c.upload_failures),
        }
    }

    /// Each spilled copy gets its own file, `<hash>.<unique>`: two ranks may upload the same
    /// chunk at once, and the copy that loses the race must not remove the winner's file.
    fn spill_paths(&self, job: &str, hash: &ChunkHash) -> (PathBuf, PathBuf) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        static EPOCH: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
        let epoch = EPOCH.get_or_init(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        });
        let unique = format!("{epoch}-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = self.cfg.spill_dir.join(job);
        let hex = hash.to_hex();
        (dir.join(format!(".{hex}.{unique}.tmp")), dir.join(format!("{hex}.{unique}")))
    }

    /// Receives a chunk body of `len` bytes, verifies it against `hash`, and stages it.
    /// Returns once the chunk is staged (in memory, or fsync'd on the spill disk). A body error
    /// (a stalled client's `BodyStalled` included) releases what was reserved: the memory
    /// permits are dropped and a spill file is removed.
    pub async fn stage<S>(
        self: &Arc<Self>,
        job: &str,
        hash: ChunkHash,
        len: u64,
        body: S,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send + 'static,
    {
        // `share` is the tenant's share of the budget for this chunk (taken by the caller
        // before any node-wide slot): it stays with the staged chunk until it is durable, so one
        // tenant's burst cannot fill staging for the others.
        //
        // In its own task: the request future is dropped when its client goes away, and a
        // receive cut off there would leave a partial spill file, or a chunk received but never
        // queued. The task ends when the body does (a closed connection ends it with an error).
        let (this, job) = (self.clone(), job.to_string());
        tokio::spawn(async move { this.stage_owned(&job, hash, len, body, share).await }).await.map_err(join_error)?
    }

    async fn stage_owned<S>(
        &self,
        job: &str,
        hash: ChunkHash,
        len: u64,
        body: S,
        share: Option<OwnedSemaphorePermit>,
    ) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send,
    {
        let n = permits(len);
        let held = if let Ok(p) = self.memory.clone().try_acquire_many_owned(n) {
            self.receive_to_memory(hash, len, body, p).await?
        } else if let Ok(p) = self.spill.clone().try_acquire_many_owned(n) {
            self.receive_to_spill(job, hash, len, body, p).await?
        } else {
            match tokio::time::timeout(self.cfg.busy_wait, self.memory.clone().acquire_many_owned(n)).await {
                Ok(Ok(p)) => self.receive_to_memory(hash, len, body, p).await?,
                _ => {
                    self.counters.busy_rejections.fetch_add(1, Ordering::Relaxed);
                    return Err(ServiceError::Busy(format!(
                        "staging is full ({} MiB memory, {} MiB spill)",
                        self.cfg.memory_bytes_max >> 20,
                        self.cfg.spill_bytes_max >> 20
                    )));
                }
            }
        };
        // Room in the upload queue first, then the pending mark: a chunk marked pending is
        // certain to be queued, so a concurrent upload of it that finds the mark and drops its
        // own copy (its client told "staged") never loses it to this one's refusal. The queue
        // is full only when uploads fall behind by `upload_queue_max` chunks; the request then
        // holds its slot and staging space no longer than any other busy wait.
        let room = match tokio::time::timeout(self.cfg.busy_wait, self.queue.reserve()).await {
            Ok(Ok(room)) => Ok(room),
            Ok(Err(_)) => Err("upload queue closed (shutting down)".to_string()),
            Err(_) => {
                self.counters.busy_rejections.fetch_add(1, Ordering::Relaxed);
                Err(format!("the upload queue is full ({} chunks waiting)", self.cfg.upload_queue_max))
            }
        };
        let room = match room {
            Ok(room) if self.set_pending(job, hash, Some(len)) => room,
            // A concurrent upload of the same chunk got here first; this copy is redundant.
            Ok(_) => return discard(held, Ok(())).await,
            Err(why) => return discard(held, Err(ServiceError::Busy(why))).await,
        };
        room.send(Staged { job: job.to_string(), hash, raw_len: len, held, staged_at: Instant::now(), _share: share });
        Ok(())
    }

    async fn receive_to_memory<S>(
        &self,
        hash: ChunkHash,
        len: u64,
        mut body: S,
        permit: OwnedSemaphorePermit,
    ) -> Result<Held, ServiceError>
    where
        S: Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send,
    {
        let mut buf = BytesMut::with_capacity(len as usize);
        let mut received = BodyLength::new(len);
        while let Some(frame) = body.next().await {
            let frame = frame?;
            received.add(frame.len())?;
            buf.extend_from_slice(&frame);
        }
        received.complete()?;
        let data = buf.freeze();
        let check = data.clone();
        tokio::task::spawn_blocking(move || hash.verify(&check)).await.map_err(join_error)??;
        self.counters.chunks_staged_memory.fetch_add(1, Ordering::Relaxed);
        Ok(Held::Memory(data, permit))
    }

    async fn receive_to_spill<S>(
        &self,
        job: &str,
        hash: ChunkHash,
        len: u64,
        mut body: S,
        permit: OwnedSemaphorePermit,
    ) -> Result<Held, ServiceError>
    where
        S: Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send,
    {
        let (tmp, path) = self.spill_paths(job, &hash);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        tokio::task::spawn_blocking(move || durable::ensure_dir(&dir)).await.map_err(join_error)??;
        let result: Result<(), ServiceError> = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut hasher = blake3::Hasher::new();
            let mut written = BodyLength::new(len);
            while let Some(frame) = body.next().await {
                let frame = frame?;
                written.add(frame.len())?;
                hasher.update(&frame);
                file.write_all(&frame).await?;
            }
            written.complete()?;
            let actual = ChunkHash(*hasher.finalize().as_bytes());
            if actual != hash {
                return Err(ckpt_core::CoreError::HashMismatch { expected: hash, actual }.into());
            }
            // Test-only switch (power-loss audit): ack a spilled chunk without syncing it.
            let skip_fsync = crate::switch_armed("staging::skip_spill_fsync");
            // tokio's File writes in the background and keeps a failed write's error (ENOSPC on
            // a full spill disk) for the next write or flush; `sync_data` does not report it.
            file.flush().await?;
            if !skip_fsync {
                file.sync_data().await?;
            }
            drop(file);
            // The ack says the chunk survives a restart: the name must be durable too.
            let (from, to) = (tmp.clone(), path.clone());
            tokio::task::spawn_blocking(move || durable::rename_into_place(&from, &to)).await.map_err(join_error)??;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        self.counters.chunks_staged_spill.fetch_add(1, Ordering::Relaxed);
        Ok(Held::Spill(path, Some(permit)))
    }

    /// Re-queues the chunks a previous ckptd left in the spill directory. Files that fail
    /// verification, and chunks already durable, are removed.
    pub async fn recover_spill(&self, index: &crate::index::Index) -> Result<usize, ServiceError> {
        let root = self.cfg.spill_dir.clone();
        let idx = index.clone();
        let found =
            tokio::task::spawn_blocking(move || -> Result<Vec<(String, ChunkHash, PathBuf, u64)>, ServiceError> {
                let mut out = Vec::new();
                let Ok(jobs) = std::fs::read_dir(&root) else { return Ok(out) };
                for job_dir in jobs.flatten() {
                    let job = job_dir.file_name().to_string_lossy().into_owned();
                    if ckpt_core::validate_job(&job).is_err() {
                        continue;
                    }
                    for f in std::fs::read_dir(job_dir.path())?.flatten() {
                        let name = f.file_name().to_string_lossy().into_owned();
                        let path = f.path();
                        let Some(Ok(hash)) = name.split('.').next().map(str::parse::<ChunkHash>) else {
                            // Temporary files of uploads that never finished.
                            let _ = std::fs::remove_file(&path);
                            continue;
                        };
                        let data = std::fs::read(&path)?;
                        if hash.verify(&data).is_err() || idx.has_chunk(&job, &hash)? {
                            let _ = std::fs::remove_file(&path);
                            continue;
                        }
                        out.push((job.clone(), hash, path, data.len() as u64));
                    }
                }
                Ok(out)
            })
            .await
            .map_err(join_error)??;
        let n = found.len();
        for (job, hash, path, len) in found {
            let permit = self.spill.clone().try_acquire_many_owned(permits(len)).ok();
            self.set_pending(&job, hash, Some(len));
            let staged = Staged {
                job,
                hash,
                raw_len: len,
                held: Held::Spill(path, permit),
                staged_at: Instant::now(),
                _share: None,
            };
            if self.queue.send(staged).await.is_err() {
                return Err(ServiceError::Internal("upload queue closed during recovery".into()));
            }
        }
        Ok(n)
    }
}

/// Drops a received chunk that will not be queued, its spill file included.
async fn discard(held: Held, outcome: Result<(), ServiceError>) -> Result<(), ServiceError> {
    if let Held::Spill(p, _) = &held {
        let _ = tokio::fs::remove_file(p).await;
    }
    outcome
}

/// Paces uploads to a byte rate: each upload books its share of time on a shared timeline.
struct Pacer {
    bytes_per_s: u64,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self, bytes: u64) {
        if self.bytes_per_s == 0 {
            return;
        }
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
            start
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

async fn dispatch(
    staging: Arc<Staging>,
    mut rx: mpsc::Receiver<Staged>,
    store: Store,
    index: crate::index::Index,
    events: mpsc::UnboundedSender<UploadEvent>,
) {
    let workers = Arc::new(Semaphore::new(staging.cfg.upload_concurrency.max(1)));
    let pacer =
        Arc::new(Pacer { bytes_per_s: staging.cfg.upload_bytes_per_s, next: tokio::sync::Mutex::new(Instant::now()) });
    while let Some(staged) = rx.recv().await {
        let Ok(worker) = workers.clone().acquire_owned().await else { break };
        let (staging, store, index, events, pacer) =
            (staging.clone(), store.clone(), index.clone(), events.clone(), pacer.clone());
        tokio::spawn(async move {
            let (job, hash, staged_at) = (staged.job.clone(), staged.hash, staged.staged_at);
            let span = tracing::info_span!("chunk.upload", job = %job, hash = %hash);
            let result = tracing::Instrument::instrument(upload(&staging, &store, &index, &pacer, staged), span).await;
            let event = match result {
                Ok(()) => {
                    crate::metrics::METRICS.durable_seconds.record(staged_at.elapsed().as_secs_f64(), &[]);
                    UploadEvent::Durable { job: job.clone(), hash }
                }
                Err(e) => {
                    staging.counters.upload_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(job, %hash, error = %e, "chunk upload failed permanently");
                    UploadEvent::Failed { job: job.clone(), hash, reason: e.to_string() }
                }
            };
            staging.set_pending(&job, hash, None);
            let _ = events.send(event);
            drop(worker);
        });
    }
}

/// Compresses when it pays (the codec's sample test decides), with one of ckptd's encoders.
/// Blocking.
fn encode(encoders: &crate::encoders::Encoders, raw: &Bytes, level: i32, min_savings_pct: u32) -> (Codec, Bytes) {
    let opts = ckpt_core::codec::EncodeOptions { level, min_savings_pct, width_hint: None };
    match encoders.encode(raw, &opts) {
        (codec, Some(payload)) => (codec, Bytes::from(payload)),
        (codec, None) => (codec, raw.clone()),
    }
}

async fn upload(
    staging: &Staging,
    store: &Store,
    index: &crate::index::Index,
    pacer: &Pacer,
    staged: Staged,
) -> Result<(), ServiceError> {
    let Staged { job, hash, raw_len, held, staged_at: _, _share: _held_share } = staged;
    let (raw, _permit_memory, _permit_spill, spill_path) = match held {
        Held::Memory(b, p) => (b, Some(p), None, None),
        Held::Spill(path, p) => {
            let read_path = path.clone();
            let data = tokio::task::spawn_blocking(move || -> Result<Bytes, ServiceError> {
                let data = Bytes::from(std::fs::read(&read_path)?);
                // The spill disk is outside the checked path: verify before it becomes durable.
                hash.verify(&data)?;
                Ok(data)
            })
            .await
            .map_err(join_error)??;
            (data, None, p, Some(path))
        }
    };
    debug_assert_eq!(raw.len() as u64, raw_len);
    let (level, min_savings) = (staging.cfg.compression_level, staging.cfg.compression_min_savings_pct);
    let (to_encode, encoders) = (raw.clone(), staging.encoders.clone());
    let (codec, payload) = tokio::task::spawn_blocking(move || encode(&encoders, &to_encode, level, min_savings))
        .await
        .map_err(join_error)?;
    drop(raw);
    let header = ChunkHeader { codec, raw_len, hash };
    let stored_len = (payload.len() + CHUNK_HEADER_BYTES) as u64;
    pacer.wait(stored_len).await;
    let mut written = false;
    if let (Some(d), Some(dest)) = (&staging.direct, store.local_chunk_path(&job, &hash)) {
        let (fs, buffers, head, body) = (d.fs.clone(), d.buffers.clone(), header.encode(), payload.clone());
        let direct =
            tokio::task::spawn_blocking(move || crate::segments::write_stored(&buffers, &head, &body, &dest, &fs))
                .await
                .map_err(join_error)?;
        match direct {
            Ok(()) => written = true,
            // The store's own put below retries, and says why if it fails too.
            Err(e) => tracing::warn!(job, %hash, error = %e, "direct write failed; using the store's put"),
        }
    }
    let mut delay = Duration::from_millis(100);
    while !written {
        match store.put_chunk(&job, &hash, Bytes::copy_from_slice(&header.encode()), payload.clone()).await {
            Ok(()) => written = true,
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => {
                staging.counters.upload_retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job, %hash, error = %e, retry_in_ms = delay.as_millis() as u64, "upload failed, will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    let (j, idx) = (job.clone(), index.clone());
    tokio::task::spawn_blocking(move || idx.put_chunk(&j, &hash, stored_len, Some(raw_len)))
        .await
        .map_err(join_error)??;
    fail::fail_point!("ckptd::chunk::after_put", |_| crate::coordinator::crash_now("ckptd::chunk::after_put"));
    let c = &staging.counters;
    c.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
    c.raw_bytes_uploaded.fetch_add(raw_len, Ordering::Relaxed);
    c.stored_bytes_uploaded.fetch_add(stored_len, Ordering::Relaxed);
    if codec != Codec::None {
        c.chunks_compressed.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(p) = spill_path {
        let _ = tokio::fs::remove_file(p).await;
    }
    Ok(())
}

/// Counts a chunk body's bytes against its Content-Length, so a body that is longer is refused
/// before its excess is held and one that is shorter is refused at its end.
struct BodyLength {
    expected: u64,
    received: u64,
}

impl BodyLength {
    fn new(expected: u64) -> BodyLength {
        BodyLength { expected, received: 0 }
    }

    fn add(&mut self, frame_len: usize) -> Result<(), ServiceError> {
        self.received += frame_len as u64;
        if self.received > self.expected {
            return Err(ServiceError::BadRequest(format!(
                "chunk body is longer than its Content-Length {}",
                self.expected
            )));
        }
        Ok(())
    }

    fn complete(&self) -> Result<(), ServiceError> {
        if self.received != self.expected {
            return Err(ServiceError::BadRequest(format!(
                "chunk body is {} bytes, Content-Length said {}",
                self.received, self.expected
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_only_when_it_pays() {
        let enc = crate::encoders::Encoders::new(1);
        let zeros = Bytes::from(vec![0u8; 1 << 20]);
        let (codec, payload) = encode(&enc, &zeros, 3, 10);
        assert_eq!(codec, Codec::Zstd);
        assert!(payload.len() < 1 << 16);
        assert!(payload.len() < 1 << 12);
        let mut noise = vec![0u8; 1 << 20];
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let noise = Bytes::from(noise);
        assert_eq!(encode(&enc, &noise, 3, 10).0, Codec::None, "random bytes are stored raw");
        assert_eq!(encode(&enc, &zeros, 0, 10).0, Codec::None, "level 0 turns compression off");
    }

    /// Uploads stalled (a store call held a minute) and a queue of one: the first chunk is
    /// uploading, the second waits for a worker, the third fills the queue, and the fourth is
    /// refused once `busy_wait` has passed, leaving nothing staged of it (here a spill file).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_that_finds_the_upload_queue_full_is_refused_after_the_busy_wait() {
        const LEN: usize = 4096;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("memory://", &Default::default(), 1, Duration::from_millis(1)).unwrap().with_faults();
        let stall = crate::faults::FaultRequest {
            kind: crate::faults::FaultKind::Latency,
            op: crate::faults::FaultOp::Chunk,
            count: 10,
            delay_ms: crate::faults::DELAY_MS_MAX,
        };
        store.faults().unwrap().arm(stall).unwrap();
        let index = crate::index::Index::open(&dir.path().join("index"), 8 << 20, false).unwrap();
        let (events, _events) = mpsc::unbounded_channel();
        let busy_wait = Duration::from_millis(300);
        let cfg = StagingConfig {
            memory_bytes_max: 3 * LEN as u64,
            spill_bytes_max: 4 * LEN as u64,
            spill_dir: dir.path().join("spill"),
            upload_concurrency: 1,
            upload_bytes_per_s: 0,
            upload_queue_max: 1,
            compression_level: 0,
            compression_min_savings_pct: 10,
            busy_wait,
            chunk_bytes_max: LEN as u64,
        };
        let staging = Staging::start(cfg, store, index, events, Arc::new(crate::encoders::Encoders::new(1)), None);
        let chunk = |i: u8| Bytes::from(vec![i; LEN]);
        let stage = |i: u8| {
            let staging = staging.clone();
            async move {
                let body = futures::stream::iter([Ok::<_, ServiceError>(chunk(i))]);
                staging.stage("job", ChunkHash::of(&chunk(i)), LEN as u64, body, None).await
            }
        };
        for i in 1..=3 {
            tokio::time::timeout(Duration::from_secs(5), stage(i)).await.unwrap().unwrap();
        }
        let t = Instant::now();
        let refused = tokio::time::timeout(Duration::from_secs(5), stage(4)).await.unwrap().unwrap_err();
        let took = t.elapsed();
        assert!(matches!(&refused, ServiceError::Busy(m) if m.contains("upload queue is full")), "{refused}");
        assert!(took >= busy_wait && took < busy_wait * 10, "refused after {took:?}");
        assert_eq!(staging.pending_raw_len("job", &ChunkHash::of(&chunk(4))), None);
        let stats = staging.stats();
        assert_eq!((stats.chunks_pending, stats.busy_rejections, stats.spill_bytes), (3, 1, 0), "{stats:?}");
        let spilled: Vec<_> = walk(&dir.path().join("spill"));
        assert!(spilled.is_empty(), "the refused chunk's spill file was left: {spilled:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
        rd.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
    }
}
