//! The coordinator drives saves from open to committed, and answers reads.
//!
//! Design note.
//! * State: each in-flight save is a `SaveState` (ckpt-core's state machine) behind its own
//!   async mutex, so requests for one save are serialised while saves proceed in parallel. The
//!   journal copy in sled is written and flushed before any request that changed the state is
//!   acked, so an acked shard index survives a crash of ckptd.
//! * Commit: a rank's index is accepted once every chunk it names is staged or durable. When
//!   the last rank's index is in, the save is `staged`; the chunks not yet durable form its
//!   pending set, which the upload queue's events drain. When the set is empty (at once, or
//!   when the last upload lands, or at start-up) the save moves to `durable` and the manifest
//!   is created with a create-only put. "Already exists" reads the manifest back: the
//!   same bytes mean this save is committed (a retry, or a peer ckptd that committed the same
//!   content); other bytes mean another writer won, and this save is aborted with a conflict.
//! * Retries: store calls retry transient errors inside `Store`. A commit that still fails
//!   leaves the save `durable`; the client's retry of its index (a duplicate) or a restart of
//!   ckptd tries the commit again.
//! * Crash consistency: chunks are put before they are recorded; indexes are accepted only when
//!   every chunk they name is durable; the manifest is created last. So at any crash point the
//!   store holds either no manifest for the step or a complete one. `recover` reconciles the
//!   index with the store and finishes or reports journalled saves.
//! * Bounds: saves in flight (`saves_in_flight_max`), concurrent chunk requests
//!   (`chunk_requests_max`, waited for at most `busy_wait_ms`, and lost by a request whose body
//!   sends nothing for `body_progress_timeout_ms`), store fan-out per request
//!   (`store_requests_max`), hashes per existence query (`missing_query_hashes_max`); chunk
//!   bytes are bounded by the staging tier (see `staging.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
pub use ckpt_core::save::{CheckpointList, SaveStatus};
use ckpt_core::{
    ChunkHash, ChunkHeader, Codec, Limits, Manifest, ManifestSummary, SavePhase, SaveState, ShardIndex,
    CHUNK_HEADER_BYTES,
};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::{join_error, ServiceError};
use crate::index::Index;
use crate::staging::{Staging, StagingConfig, UploadEvent};
use crate::store::{Store, StoreError};

type SaveKey = (String, u64);

/// An in-flight save: its state (journalled) and the chunks it still waits on (derived, rebuilt
/// at start-up).
struct Slot {
    state: SaveState,
    pending: std::collections::HashSet<ChunkHash>,
}

type SlotRef = Arc<Mutex<Slot>>;

pub struct Coordinator {
    store: Store,
    index: Index,
    limits: Limits,
    config: Config,
    saves: std::sync::Mutex<HashMap<SaveKey, SlotRef>>,
    chunk_permits: Arc<Semaphore>,
    staging: Arc<Staging>,
    /// Upload events for chunks made durable outside the upload queue (node-local adoption).
    events: mpsc::UnboundedSender<UploadEvent>,
    /// Recently aborted saves, for status queries; they no longer count as in flight.
    aborted: std::sync::Mutex<std::collections::VecDeque<SaveStatus>>,
    handoff_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenSave {
    pub world_size: u32,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// Creation time recorded in the manifest; defaults to ckptd's clock at the first open.
    /// Clients that may commit the same save through several ckptd processes pass it so every
    /// writer builds byte-identical manifests.
    #[serde(default)]
    pub created_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ChunkPutOutcome {
    /// False when the chunk was already staged or durable and nothing was written.
    pub written: bool,
    pub state: ChunkState,
}

/// Where a chunk stands once a put or adopt returns. Only `Durable` survives a crash of ckptd
/// for certain (a spilled staged chunk usually does too; see ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChunkState {
    /// In the staging tier, waiting for its upload to the store.
    Staged,
    /// In the store.
    Durable,
}

/// What start-up found and did, for the log and for tests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RecoveryReport {
    pub rebuilt: bool,
    pub manifests_added: usize,
    pub manifests_dropped: usize,
    pub chunks_indexed: usize,
    pub saves_committed: usize,
    pub saves_aborted: usize,
    pub saves_resumed: usize,
    pub spilled_chunks_requeued: usize,
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Kills the process on the spot, as a crash test's injected fault. Only reachable through a
/// fail point configured with the FAILPOINTS environment variable.
#[allow(dead_code)]
pub(crate) fn crash_now(point: &str) -> ! {
    tracing::error!(point, "fail point: killing ckptd with SIGKILL");
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

impl Coordinator {
    /// Creates the coordinator with its staging tier and starts the task that turns upload
    /// events into commits. Call `recover` before serving.
    pub fn start(store: Store, index: Index, config: Config) -> Arc<Coordinator> {
        let (tx, rx) = mpsc::unbounded_channel();
        let staging_cfg = StagingConfig {
            memory_bytes_max: config.staging_memory_bytes_max,
            spill_bytes_max: config.staging_spill_bytes_max,
            spill_dir: config.spill_dir(),
            upload_concurrency: config.upload_concurrency,
            upload_bytes_per_s: config.upload_bytes_per_s,
            upload_queue_max: config.upload_queue_max,
            compression_level: config.compression_level,
            compression_min_savings_pct: config.compression_min_savings_pct,
            busy_wait: Duration::from_millis(config.busy_wait_ms),
            chunk_bytes_max: config.chunk_bytes_max,
        };
        let staging = Staging::start(staging_cfg, store.clone(), index.clone(), tx.clone());
        let handoff_dir = config.handoff_dir();
        let c = Arc::new(Coordinator {
            limits: config.limits(),
            chunk_permits: Arc::new(Semaphore::new(config.chunk_requests_max)),
            store,
            index,
            config,
            saves: std::sync::Mutex::new(HashMap::new()),
            staging,
            events: tx,
            aborted: Default::default(),
            handoff_dir,
        });
        tokio::spawn(Self::upload_events(Arc::downgrade(&c), rx));
        tokio::spawn(Self::retry_commits(Arc::downgrade(&c), Duration::from_millis(c.config.commit_retry_ms)));
        c
    }

    /// Retries the commit of saves that are ready (every rank in, every chunk durable) but have
    /// no manifest, because the create failed with an error the store adapter's own retries did
    /// not get past. Without this such a save would wait for a rank to re-send its index or for
    /// a restart. Runs until the coordinator is dropped; skips saves another task holds.
    async fn retry_commits(me: std::sync::Weak<Coordinator>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { break };
            let slots: Vec<SlotRef> = me.saves.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            for slot in slots {
                let Ok(mut g) = slot.try_lock() else { continue };
                let ready = matches!(g.state.phase, SavePhase::Staged | SavePhase::Durable) && g.pending.is_empty();
                if !ready {
                    continue;
                }
                let (job, step) = (g.state.job.clone(), g.state.step);
                match me.commit(&mut g).await {
                    Ok(()) => tracing::info!(job, step, "commit retried in the background succeeded"),
                    Err(e) => {
                        tracing::warn!(job, step, error = %e, "background commit retry failed; trying again later")
                    }
                }
            }
        }
    }

    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    pub fn saves_in_flight(&self) -> usize {
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn slots_of(&self, job: &str) -> Vec<SlotRef> {
        let saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
        saves.iter().filter(|((j, _), _)| j == job).map(|(_, s)| s.clone()).collect()
    }

    /// Turns upload outcomes into commits and aborts. Runs until the coordinator is dropped.
    async fn upload_events(me: std::sync::Weak<Coordinator>, mut rx: mpsc::UnboundedReceiver<UploadEvent>) {
        while let Some(ev) = rx.recv().await {
            let Some(me) = me.upgrade() else { break };
            match ev {
                UploadEvent::Durable { job, hash } => {
                    for slot in me.slots_of(&job) {
                        let mut g = slot.lock().await;
                        if g.state.phase == SavePhase::Staged && g.pending.remove(&hash) && g.pending.is_empty() {
                            drop(g);
                            let me = me.clone();
                            tokio::spawn(async move {
                                let mut g = slot.lock().await;
                                if let Err(e) = me.commit(&mut g).await {
                                    tracing::error!(job = g.state.job, step = g.state.step, error = %e, "commit failed");
                                }
                            });
                        }
                    }
                }
                UploadEvent::Failed { job, hash, reason } => {
                    for slot in me.slots_of(&job) {
                        let mut g = slot.lock().await;
                        if !g.state.phase.is_final()
                            && g.state.ranks.values().any(|r| r.chunk_hashes().any(|h| h == hash))
                        {
                            let why = format!("chunk {hash} could not be made durable: {reason}");
                            if g.state.abort(why).is_ok() {
                                if let Err(e) = me.retire_aborted(&g.state).await {
                                    tracing::error!(job, error = %e, "cannot retire an aborted save");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How long a request body may send nothing before it is dropped.
    pub fn body_progress_timeout(&self) -> Duration {
        Duration::from_millis(self.config.body_progress_timeout_ms)
    }

    /// The largest JSON body (shard index, existence query) the API accepts.
    pub fn json_body_bytes_max(&self) -> u64 {
        self.config.shard_index_bytes_max
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, crate::index::IndexError> + Send + 'static,
    {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || f(&index)).await.map_err(join_error)?.map_err(ServiceError::from)
    }

    /// A slot for a chunk transfer, or `Busy` once `busy_wait_ms` has passed without one.
    pub async fn chunk_permit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        let wait = Duration::from_millis(self.config.busy_wait_ms);
        match tokio::time::timeout(wait, self.chunk_permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ServiceError::Busy("shutting down".into())),
            Err(_) => {
                Err(ServiceError::Busy(format!("{} chunk transfers in progress", self.config.chunk_requests_max)))
            }
        }
    }

    // ---- chunks ----------------------------------------------------------------------------

    /// Staged (waiting for upload) or durable.
    async fn chunk_known(&self, job: &str, hash: ChunkHash) -> Result<bool, ServiceError> {
        if self.staging.is_pending(job, &hash) {
            return Ok(true);
        }
        self.chunk_durable(job, hash).await
    }

    async fn chunk_durable(&self, job: &str, hash: ChunkHash) -> Result<bool, ServiceError> {
        let j = job.to_string();
        if self.blocking(move |i| i.has_chunk(&j, &hash)).await? {
            return Ok(true);
        }
        // The index lags the store after a crash, or when a peer ckptd wrote the chunk.
        if self.store.has_chunk(job, &hash).await? {
            let j = job.to_string();
            self.blocking(move |i| i.put_chunk(&j, &hash, 0)).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Which of `hashes` the job has neither staged nor durable.
    pub async fn missing_chunks(&self, job: &str, hashes: Vec<ChunkHash>) -> Result<Vec<ChunkHash>, ServiceError> {
        self.filter_chunks(job, hashes, false).await
    }

    async fn filter_chunks(
        &self,
        job: &str,
        hashes: Vec<ChunkHash>,
        durable_only: bool,
    ) -> Result<Vec<ChunkHash>, ServiceError> {
        if hashes.len() > self.config.missing_query_hashes_max {
            return Err(ServiceError::BadRequest(format!(
                "{} hashes in one query, more than {}",
                hashes.len(),
                self.config.missing_query_hashes_max
            )));
        }
        let flags: Vec<(ChunkHash, bool)> = futures::stream::iter(hashes)
            .map(|h| async move {
                let known =
                    if durable_only { self.chunk_durable(job, h).await } else { self.chunk_known(job, h).await };
                known.map(|k| (h, k))
            })
            .buffered(self.config.store_requests_max)
            .try_collect()
            .await?;
        let mut missing: Vec<ChunkHash> = flags.into_iter().filter(|(_, k)| !k).map(|(h, _)| h).collect();
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// Receives a chunk of `len` bytes, verifies it against `hash`, and stages it for upload.
    /// Idempotent: a chunk already staged or durable is drained and not stored again. A body
    /// that stalls fails with `BodyStalled` (the HTTP layer times out every frame), which drops
    /// the caller's chunk slot and this chunk's staging space.
    pub async fn put_chunk<S>(
        &self,
        job: &str,
        hash: ChunkHash,
        len: u64,
        mut body: S,
    ) -> Result<ChunkPutOutcome, ServiceError>
    where
        S: futures::Stream<Item = Result<Bytes, ServiceError>> + Unpin + Send,
    {
        if len == 0 || len > self.config.chunk_bytes_max {
            return Err(ServiceError::BadRequest(format!(
                "chunk is {len} bytes, not in 1..={}",
                self.config.chunk_bytes_max
            )));
        }
        let known = if self.staging.is_pending(job, &hash) {
            Some(ChunkState::Staged)
        } else if self.chunk_durable(job, hash).await? {
            Some(ChunkState::Durable)
        } else {
            None
        };
        if let Some(state) = known {
            // Read the body anyway so the connection stays usable for the client's next request.
            while let Some(frame) = body.next().await {
                frame?;
            }
            return Ok(ChunkPutOutcome { written: false, state });
        }
        self.staging.stage(job, hash, len, body).await?;
        Ok(ChunkPutOutcome { written: true, state: ChunkState::Staged })
    }

    /// Where clients on this host may hand over chunk files, and the store's root if it is a
    /// local directory they may read verified chunks from.
    pub fn local_paths(&self) -> (std::path::PathBuf, Option<std::path::PathBuf>) {
        (self.handoff_dir.clone(), self.store.local_root().map(|p| p.to_path_buf()))
    }

    /// The node-local path for uploads: `name` is a file the client wrote into the handoff
    /// directory, already in stored chunk format. It is verified (header and hash) through one
    /// fd and, for a local-directory store, renamed into place (copied when the handoff
    /// directory is on another filesystem): durable on return. See `adopt.rs`.
    pub async fn adopt_chunk(&self, job: &str, hash: ChunkHash, name: &str) -> Result<ChunkPutOutcome, ServiceError> {
        if self.store.local_root().is_none() {
            return Err(ServiceError::Conflict(
                "the node-local path needs a local-directory store; send the chunk over HTTP".into(),
            ));
        }
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
            return Err(ServiceError::BadRequest(format!("handoff file name {name:?} is not a plain file name")));
        }
        let path = self.handoff_dir.join(name);
        if self.chunk_durable(job, hash).await? {
            let _ = tokio::fs::remove_file(&path).await;
            return Ok(ChunkPutOutcome { written: false, state: ChunkState::Durable });
        }
        let Some(dest) = self.store.local_chunk_path(job, &hash) else {
            return Err(ServiceError::Internal("local store without a root".into()));
        };
        let stored_bytes_max = self.config.chunk_bytes_max + CHUNK_HEADER_BYTES as u64;
        let (j, idx) = (job.to_string(), self.index.clone());
        tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
            let adopted = crate::adopt::adopt(&path, &dest, hash, stored_bytes_max)?;
            if adopted.copied {
                tracing::debug!(job = j, %hash, "handoff directory is on another filesystem; chunk copied");
            }
            idx.put_chunk(&j, &hash, adopted.stored_len)?;
            Ok(())
        })
        .await
        .map_err(join_error)??;
        let _ = self.events.send(UploadEvent::Durable { job: job.to_string(), hash });
        Ok(ChunkPutOutcome { written: true, state: ChunkState::Durable })
    }

    /// Reads a chunk back, decodes it and verifies its hash: ckptd never serves bytes it has
    /// not verified, unless the caller says it verifies every byte itself (`verify = false`);
    /// the header's address and length are checked either way.
    pub async fn get_chunk(&self, job: &str, hash: ChunkHash, verify: bool) -> Result<Bytes, ServiceError> {
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
            let (header, payload) = ChunkHeader::decode(&stored).map_err(|e| corrupt(e.to_string()))?;
            if header.hash != hash {
                return Err(corrupt(format!("header names chunk {}", header.hash)));
            }
            let raw = match header.codec {
                Codec::None => stored.slice(ckpt_core::CHUNK_HEADER_BYTES..),
                Codec::Zstd => {
                    let out = zstd::bulk::decompress(payload, header.raw_len as usize)
                        .map_err(|e| corrupt(format!("zstd payload does not decode: {e}")))?;
                    if out.len() as u64 != header.raw_len {
                        return Err(corrupt(format!("decodes to {} bytes, header says {}", out.len(), header.raw_len)));
                    }
                    Bytes::from(out)
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

    // ---- saves -----------------------------------------------------------------------------

    fn save_slot(&self, job: &str, step: u64) -> Option<SlotRef> {
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), step)).cloned()
    }

    async fn committed_summary(&self, job: &str, step: u64) -> Result<Option<ManifestSummary>, ServiceError> {
        let j = job.to_string();
        let Some(bytes) = self.blocking(move |i| i.get_manifest(&j, step)).await? else {
            return Ok(None);
        };
        let m = Manifest::from_bytes(&bytes, &self.limits).map_err(|e| ServiceError::CorruptManifest {
            job: job.into(),
            step,
            reason: e.to_string(),
        })?;
        Ok(Some(m.summary()))
    }

    pub async fn open_save(&self, job: &str, step: u64, req: OpenSave) -> Result<SaveStatus, ServiceError> {
        if let Some(m) = self.committed_summary(job, step).await? {
            if m.world_size != req.world_size {
                return Err(ServiceError::Conflict(format!(
                    "{job}@{step} is committed with world size {}, not {}",
                    m.world_size, req.world_size
                )));
            }
            return Ok(SaveStatus::committed(&m));
        }
        let slot = {
            let mut saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = saves.get(&(job.to_string(), step)) {
                s.clone()
            } else {
                let in_flight = saves.len();
                if in_flight >= self.config.saves_in_flight_max {
                    return Err(ServiceError::Busy(format!("{in_flight} saves in flight, the configured maximum")));
                }
                let created = req.created_unix_ms.unwrap_or_else(now_unix_ms);
                let state = SaveState::open(job, step, req.world_size, created, req.metadata.clone(), &self.limits)?;
                let slot = Arc::new(Mutex::new(Slot { state, pending: Default::default() }));
                saves.insert((job.to_string(), step), slot.clone());
                slot
            }
        };
        let mut g = slot.lock().await;
        if g.state.phase == SavePhase::Aborted {
            // The save was aborted and retired while this request waited for it; a new open
            // starts it afresh in a new slot (for example a trainer that rolled back and
            // reached this step again).
            drop(g);
            return Box::pin(self.open_save(job, step, req)).await;
        }
        g.state.reopen(req.world_size, req.metadata)?;
        self.journal(&g.state).await?;
        Ok(SaveStatus::of(&g.state))
    }

    async fn journal(&self, state: &SaveState) -> Result<(), ServiceError> {
        let s = state.clone();
        self.blocking(move |i| i.put_save(&s)).await?;
        self.index.flush().await?;
        Ok(())
    }

    pub async fn put_shard_index(&self, job: &str, step: u64, index: ShardIndex) -> Result<SaveStatus, ServiceError> {
        if let Some(m) = self.committed_summary(job, step).await? {
            return Ok(SaveStatus::committed(&m));
        }
        let slot = self
            .save_slot(job, step)
            .ok_or_else(|| ServiceError::NotFound(format!("no save {job}@{step} is open; open it first")))?;
        let mut g = slot.lock().await;
        if g.state.phase == SavePhase::Committed {
            return Ok(SaveStatus::of(&g.state));
        }
        index.validate(g.state.world_size, &self.limits)?;
        let rank = index.rank;
        let hashes: Vec<ChunkHash> = index.chunk_hashes().collect();
        let missing = self.missing_chunks(job, hashes).await?;
        if let Some(first) = missing.first() {
            return Err(ServiceError::UnknownChunks { rank, count: missing.len(), first: *first });
        }
        let outcome = g.state.accept_index(index, &self.limits)?;
        if outcome == ckpt_core::save::IndexOutcome::New {
            self.journal(&g.state).await?;
        }
        if g.state.phase == SavePhase::Staged && outcome == ckpt_core::save::IndexOutcome::New {
            g.pending = self.not_durable(&g.state).await?;
        }
        if matches!(g.state.phase, SavePhase::Staged | SavePhase::Durable) && g.pending.is_empty() {
            self.commit(&mut g).await?;
        }
        Ok(SaveStatus::of(&g.state))
    }

    /// The chunks of a save that are not durable yet. Called with the save's lock held, so an
    /// upload that lands after this check finds the hash in the pending set and removes it.
    async fn not_durable(&self, state: &SaveState) -> Result<std::collections::HashSet<ChunkHash>, ServiceError> {
        let all: Vec<ChunkHash> = state.chunks().into_iter().collect();
        Ok(self.filter_chunks(&state.job, all, true).await?.into_iter().collect())
    }

    /// Moves a save whose chunks are all durable to committed. Called with the save's lock held.
    async fn commit(&self, slot: &mut Slot) -> Result<(), ServiceError> {
        let state = &mut slot.state;
        let job = state.job.clone();
        let step = state.step;
        if state.phase == SavePhase::Staged {
            let missing = self.filter_chunks(&job, state.chunks().into_iter().collect(), true).await?;
            if !missing.is_empty() {
                // The pending set said otherwise: refuse to write a manifest over a hole.
                slot.pending = missing.into_iter().collect();
                return Err(ServiceError::Internal(format!(
                    "{job}@{step}: {} referenced chunks are not durable yet",
                    slot.pending.len()
                )));
            }
            state.mark_durable()?;
            self.journal(state).await?;
        }
        fail::fail_point!("ckptd::commit::before_manifest", |_| crash_now("ckptd::commit::before_manifest"));
        let previous = self.store.list_manifest_steps(&job).await?.into_iter().filter(|s| *s < step).max();
        let manifest = state.manifest(previous)?;
        let bytes = Bytes::from(manifest.to_bytes());
        let created = async {
            fail::fail_point!("ckptd::commit::manifest_put", |_| Err(StoreError::Other(
                object_store::Error::Generic { store: "failpoint", source: "injected transient failure".into() }
            )));
            self.store.create_manifest(&job, step, bytes.clone()).await
        };
        match created.await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => {
                let existing = self.store.get_manifest(&job, step).await?;
                if existing != bytes {
                    let reason = "another writer committed a different manifest for this step".to_string();
                    tracing::warn!(job, step, "commit conflict: {reason}");
                    state.abort(reason.clone())?;
                    self.retire_aborted(state).await?;
                    return Err(ServiceError::Conflict(format!("{job}@{step}: {reason}")));
                }
                tracing::info!(job, step, "manifest already present with identical bytes; committed");
            }
            Err(e) => {
                tracing::warn!(job, step, error = %e, "manifest create failed; the save stays durable for a retry");
                return Err(e.into());
            }
        }
        fail::fail_point!("ckptd::commit::after_manifest", |_| crash_now("ckptd::commit::after_manifest"));
        self.finish_commit(state, manifest.hash.clone(), bytes.to_vec()).await?;
        tracing::info!(job, step, world_size = state.world_size, hash = %manifest.hash, "committed");
        Ok(())
    }

    async fn finish_commit(&self, state: &mut SaveState, hash: String, bytes: Vec<u8>) -> Result<(), ServiceError> {
        state.mark_committed(hash)?;
        let (job, step) = (state.job.clone(), state.step);
        self.blocking(move |i| {
            i.put_manifest(&job, step, &bytes)?;
            i.remove_save(&job, step)
        })
        .await?;
        self.index.flush().await?;
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).remove(&(state.job.clone(), step));
        Ok(())
    }

    pub async fn save_status(&self, job: &str, step: u64) -> Result<SaveStatus, ServiceError> {
        if let Some(slot) = self.save_slot(job, step) {
            return Ok(SaveStatus::of(&slot.lock().await.state));
        }
        if let Some(m) = self.committed_summary(job, step).await? {
            return Ok(SaveStatus::committed(&m));
        }
        if let Some(a) = self.recently_aborted(job, Some(step)).pop() {
            return Ok(a);
        }
        Err(ServiceError::NotFound(format!("no save {job}@{step}")))
    }

    pub async fn abort_save(&self, job: &str, step: u64, reason: &str) -> Result<SaveStatus, ServiceError> {
        let slot = self
            .save_slot(job, step)
            .ok_or_else(|| ServiceError::NotFound(format!("no save {job}@{step} in flight")))?;
        let mut g = slot.lock().await;
        if g.state.phase != SavePhase::Aborted {
            g.state.abort(reason.to_string())?;
            self.retire_aborted(&g.state).await?;
        }
        Ok(SaveStatus::of(&g.state))
    }

    /// An aborted save leaves the in-flight set and the journal, so it no longer counts against
    /// `saves_in_flight_max`; its status stays answerable from a bounded list of recent aborts.
    /// Called with the save's lock held (or for a save not yet in the map, at start-up).
    async fn retire_aborted(&self, state: &SaveState) -> Result<(), ServiceError> {
        const ABORTED_KEPT: usize = 1024;
        let (job, step) = (state.job.clone(), state.step);
        self.blocking(move |i| i.remove_save(&job, step)).await?;
        self.index.flush().await?;
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).remove(&(state.job.clone(), state.step));
        let mut aborted = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
        aborted.retain(|s| !(s.job == state.job && s.step == state.step));
        aborted.push_back(SaveStatus::of(state));
        while aborted.len() > ABORTED_KEPT {
            aborted.pop_front();
        }
        tracing::info!(job = state.job, step = state.step, reason = ?state.error, "save aborted");
        Ok(())
    }

    fn recently_aborted(&self, job: &str, step: Option<u64>) -> Vec<SaveStatus> {
        let aborted = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
        aborted.iter().filter(|s| s.job == job && step.is_none_or(|st| s.step == st)).cloned().collect()
    }

    // ---- committed checkpoints ---------------------------------------------------------------

    pub async fn jobs(&self) -> Result<Vec<String>, ServiceError> {
        self.blocking(|i| i.jobs()).await
    }

    pub async fn list(&self, job: &str) -> Result<CheckpointList, ServiceError> {
        let j = job.to_string();
        let manifests = self
            .blocking(move |i| {
                let mut out = Vec::new();
                for step in i.manifest_steps(&j)? {
                    if let Some(b) = i.get_manifest(&j, step)? {
                        out.push((step, b));
                    }
                }
                Ok(out)
            })
            .await?;
        let mut committed = Vec::with_capacity(manifests.len());
        for (step, bytes) in manifests {
            let m = Manifest::from_bytes(&bytes, &self.limits).map_err(|e| ServiceError::CorruptManifest {
                job: job.into(),
                step,
                reason: e.to_string(),
            })?;
            committed.push(m.summary());
        }
        let slots: Vec<_> = {
            let saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
            saves.iter().filter(|((j, _), _)| j == job).map(|(_, s)| s.clone()).collect()
        };
        let mut in_flight = Vec::with_capacity(slots.len());
        for s in slots {
            in_flight.push(SaveStatus::of(&s.lock().await.state));
        }
        in_flight.extend(self.recently_aborted(job, None));
        in_flight.sort_by_key(|s| s.step);
        Ok(CheckpointList { job: job.into(), committed, in_flight })
    }

    /// The manifest's bytes exactly as stored. Looks in the store when the index does not have
    /// it (a peer ckptd may have committed it), and checks the bytes before returning them.
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
        Manifest::from_bytes(&bytes, &self.limits).map_err(|e| ServiceError::CorruptManifest {
            job: job.into(),
            step,
            reason: e.to_string(),
        })?;
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

    /// Deletes a committed checkpoint's manifest. Its chunks stay until garbage collection.
    /// The newest committed checkpoint is kept unless `force` is set: it is what a restart needs.
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
        self.store.delete_manifest(job, step).await?;
        let j = job.to_string();
        self.blocking(move |i| i.remove_manifest(&j, step)).await?;
        self.index.flush().await?;
        tracing::info!(job, step, "checkpoint deleted");
        Ok(())
    }

    // ---- start-up ----------------------------------------------------------------------------

    /// Reconciles the index with the store, then finishes or reports journalled saves.
    /// Runs before ckptd serves requests.
    pub async fn recover(&self) -> Result<RecoveryReport, ServiceError> {
        let mut report = RecoveryReport::default();
        let described = self.blocking(|i| i.store_description()).await?;
        let store_desc = self.store.description().to_string();
        if described.as_deref() != Some(store_desc.as_str()) {
            if described.is_some() {
                tracing::warn!(was = ?described, now = store_desc, "index describes another store; rebuilding");
            }
            self.blocking(|i| i.clear()).await?;
            report.rebuilt = true;
        }
        let jobs = self.store.list_jobs().await?;
        let mut in_store = std::collections::BTreeSet::new();
        for job in &jobs {
            for step in self.store.list_manifest_steps(job).await? {
                in_store.insert((job.clone(), step));
            }
            if report.rebuilt {
                let chunks = self.store.list_chunks(job).await?;
                report.chunks_indexed += chunks.len();
                let j = job.clone();
                self.blocking(move |i| chunks.iter().try_for_each(|(h, len)| i.put_chunk(&j, h, *len))).await?;
            }
        }
        let in_index: std::collections::BTreeSet<(String, u64)> =
            self.blocking(|i| i.all_manifests()).await?.into_iter().collect();
        for (job, step) in in_store.difference(&in_index) {
            let bytes = self.store.get_manifest(job, *step).await?;
            if let Err(e) = Manifest::from_bytes(&bytes, &self.limits) {
                tracing::error!(job, step, error = %e, "manifest in the store is damaged; not indexed");
                continue;
            }
            let (j, s) = (job.clone(), *step);
            self.blocking(move |i| i.put_manifest(&j, s, &bytes)).await?;
            report.manifests_added += 1;
        }
        for (job, step) in in_index.difference(&in_store) {
            let (j, s) = (job.clone(), *step);
            self.blocking(move |i| i.remove_manifest(&j, s)).await?;
            report.manifests_dropped += 1;
        }
        if report.rebuilt {
            self.blocking(move |i| i.set_store_description(&store_desc)).await?;
        }
        self.index.flush().await?;

        for mut save in self.blocking(|i| i.all_saves()).await? {
            let (job, step) = (save.job.clone(), save.step);
            if in_store.contains(&(job.clone(), step)) && !save.phase.is_final() {
                let stored = self.store.get_manifest(&job, step).await?;
                let same = Manifest::from_bytes(&stored, &self.limits).ok().is_some_and(|m| {
                    m.world_size == save.world_size
                        && m.metadata == save.metadata
                        && m.created_unix_ms == save.created_unix_ms
                        && m.ranks.iter().eq(save.ranks.values())
                });
                if same && save.phase == SavePhase::Durable {
                    let m = Manifest::from_bytes(&stored, &self.limits).map_err(ServiceError::Core)?;
                    self.finish_commit(&mut save, m.hash, stored.to_vec()).await?;
                    report.saves_committed += 1;
                    tracing::info!(job, step, "journalled save found committed in the store");
                    continue;
                }
                save.abort("another writer committed a different manifest for this step".into())?;
                self.retire_aborted(&save).await?;
                report.saves_aborted += 1;
                continue;
            }
            if save.phase == SavePhase::Aborted {
                self.retire_aborted(&save).await?;
                continue;
            }
            if save.phase == SavePhase::Committed {
                let (j, s) = (job.clone(), step);
                self.blocking(move |i| i.remove_save(&j, s)).await?;
                continue;
            }
            let resume = matches!(save.phase, SavePhase::Staged | SavePhase::Durable);
            let pending =
                if save.phase == SavePhase::Staged { self.not_durable(&save).await? } else { Default::default() };
            let slot = Arc::new(Mutex::new(Slot { state: save, pending }));
            self.saves.lock().unwrap_or_else(|e| e.into_inner()).insert((job.clone(), step), slot.clone());
            let mut g = slot.lock().await;
            if resume && g.pending.is_empty() {
                match self.commit(&mut g).await {
                    Ok(()) => report.saves_resumed += 1,
                    Err(e) => tracing::error!(job, step, error = %e, "journalled save could not be committed"),
                }
            } else if resume {
                tracing::info!(
                    job,
                    step,
                    chunks = g.pending.len(),
                    "journalled save waits for chunks to become durable"
                );
            }
        }
        self.index.flush().await?;
        // Re-queue spilled chunks last: their upload events find the save slots above.
        report.spilled_chunks_requeued = self.staging.recover_spill(&self.index).await?;
        Ok(report)
    }
}
