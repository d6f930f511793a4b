//! The coordinator: ckptd's shared state and its background tasks. The work is split by concern,
//! each file with its own design note:
//! * `intake.rs`: chunks in (HTTP and node-local adopt), existence and length lookups;
//! * `commit.rs`: saves from open to committed — the commit protocol;
//! * `reads.rs`: committed checkpoints out (listings, roots, index objects, chunks, delete);
//! * `recovery.rs`: reconciling the index with the store at start-up.
//!
//! Design note.
//! * State: each in-flight save is a `Slot` (ckpt-core's `SaveState` plus derived tracking)
//!   behind its own async mutex, so requests for one save are serialised while saves proceed in
//!   parallel. Nothing per request walks all ranks of a save.
//! * Background: upload events (chunks made durable or failed) are turned into index-object
//!   writes, commits and aborts; a periodic task retries commits of ready saves whose root write
//!   failed and aborts saves that made no progress for `save_idle_abort_ms`. Neither waits on a
//!   save's lock: a commit holds it through the store's retries, so upload outcomes go to a
//!   per-save inbox drained by one task per save, and each commit retry gets a task of its own
//!   (one slow commit holds up no other save; `store_faults.rs`
//!   `a_commit_held_by_the_store_holds_up_no_other_save`).
//! * Bounds: saves in flight (`saves_in_flight_max`), shard-index requests served at once
//!   (`index_requests_max`, taken before the body is read), chunk references per save
//!   (`save_chunk_refs_max`) and over all saves (`in_flight_chunk_refs_max`), the bytes of the
//!   indexes one save and all saves hold (`save_index_bytes_max`, `in_flight_index_bytes_max`:
//!   an index of no chunks can still carry megabytes of names and metadata), JSON bodies held
//!   at once (`json_bytes_in_flight_max`, see `bodies.rs`), concurrent chunk
//!   requests (`chunk_requests_max`, waited for at most `busy_wait_ms`, and lost by a request
//!   whose body sends nothing for `body_progress_timeout_ms`), store fan-out per request
//!   (`store_requests_max`), hashes per existence query (`missing_query_hashes_max`);
//!   chunk bytes are bounded by the staging tier (see `staging.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use ckpt_core::save::{CheckpointList, SaveStatus};
use ckpt_core::{ChunkHash, Limits, SavePhase, SaveState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::{join_error, ServiceError};
use crate::index::Index;
use crate::staging::{Staging, StagingConfig, UploadEvent};
use crate::store::Store;

pub(crate) type SaveKey = (String, u64);

/// The gates of committed saves whose journalled ranks are still being removed, by save.
pub(crate) type RetiringGates = std::sync::Mutex<HashMap<SaveKey, Arc<Mutex<()>>>>;

/// An in-flight save: its state (journalled) and what it still waits for (derived from the
/// journal and the store, rebuilt at start-up).
pub(crate) struct Slot {
    pub(crate) state: SaveState,
    /// Chunks named by received indexes that are not durable yet, with the ranks naming them.
    pub(crate) pending: HashMap<ChunkHash, Vec<u32>>,
    /// Per rank, how many of its distinct chunks are in `pending`.
    pub(crate) rank_pending: HashMap<u32, u32>,
    /// Ranks whose index object is in the store or on its way; shared outside the save's lock.
    pub(crate) index_objects: Arc<IndexObjects>,
    pub(crate) last_progress: Instant,
    /// Whether the save's own journal entry (its fields) is written; every holder of the lock
    /// that finds it false writes it before acknowledging anything.
    pub(crate) journalled: bool,
    /// When the last rank's index was accepted (commit latency is measured from here).
    pub(crate) all_in_at: Option<Instant>,
    /// A save split over nodes, once this node's part is written: the parts read so far and
    /// when to look again (`parts.rs`).
    pub(crate) split: Option<crate::parts::SplitWait>,
    /// The oldest writer generation seen opening it or sending it an index on this node
    /// (`None`: none named one, or restored from the journal): a fence past it aborts the save,
    /// so no save mixes a replaced generation's ranks with the new one's.
    pub(crate) epoch: Option<u64>,
}

impl Slot {
    /// Records a writer's generation (see `epoch`).
    pub(crate) fn note_epoch(&mut self, epoch: Option<u64>) {
        self.epoch = match (self.epoch, epoch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    pub(crate) fn new(state: SaveState) -> Slot {
        Slot {
            state,
            pending: HashMap::new(),
            rank_pending: HashMap::new(),
            index_objects: Arc::default(),
            last_progress: Instant::now(),
            journalled: false,
            all_in_at: None,
            split: None,
            epoch: None,
        }
    }

    /// Records which of `rank`'s chunks are not durable yet.
    pub(crate) fn add_pending(&mut self, rank: u32, not_durable: impl IntoIterator<Item = ChunkHash>) {
        let mut n = 0;
        for h in not_durable {
            let ranks = self.pending.entry(h).or_default();
            if !ranks.contains(&rank) {
                ranks.push(rank);
                n += 1;
            }
        }
        self.rank_pending.insert(rank, n);
    }

    /// A chunk became durable: the ranks whose chunks are now all durable.
    pub(crate) fn chunk_durable(&mut self, hash: &ChunkHash) -> Option<Vec<u32>> {
        let ranks = self.pending.remove(hash)?;
        let mut complete = Vec::new();
        for r in ranks {
            if let Some(n) = self.rank_pending.get_mut(&r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    complete.push(r);
                }
            }
        }
        Some(complete)
    }

    pub(crate) fn rank_complete(&self, rank: u32) -> bool {
        self.rank_pending.get(&rank).is_some_and(|n| *n == 0)
    }

    /// Every rank in and every chunk durable: the save can commit.
    pub(crate) fn ready(&self) -> bool {
        matches!(self.state.phase, SavePhase::Staged | SavePhase::Durable) && self.pending.is_empty()
    }
}

pub(crate) type SlotRef = Arc<Mutex<Slot>>;

/// An upload's outcome for one save, waiting for the save's lock.
enum Outcome {
    Landed(ChunkHash),
    Lost(ChunkHash, String),
}

/// A share of an in-flight count (chunk references, index bytes) taken against its limit, and
/// given back when dropped unless kept.
pub(crate) struct InFlight<'a> {
    counter: &'a AtomicU64,
    n: u64,
}

impl<'a> InFlight<'a> {
    /// Takes `n` if the count stays within `max`; otherwise the count held now.
    pub(crate) fn take(counter: &'a AtomicU64, n: u64, max: u64) -> Result<InFlight<'a>, u64> {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| held.checked_add(n).filter(|&t| t <= max))
            .map(|_| InFlight { counter, n })
    }

    /// Keeps the share taken: its owner gives it back later (`Coordinator::untrack_slot`).
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        give_back(self.counter, self.n);
    }
}

/// Gives `n` back to an in-flight count, never below zero.
fn give_back(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| Some(held.saturating_sub(n)));
}

/// The JSON byte budget's permits: its configured bytes, within what a tokio semaphore holds.
fn json_budget_permits(config: &Config) -> u64 {
    config.json_bytes_in_flight_max.min(1 << 60)
}

/// Which ranks' index objects are written, and which are being written. Kept outside the save's
/// async lock: thousands of index puts finish their writes while others queue for the lock, and
/// the commit waits for writes in flight instead of repeating them.
#[derive(Default)]
pub(crate) struct IndexObjects {
    state: std::sync::Mutex<(HashSet<u32>, HashSet<u32>)>,
    changed: tokio::sync::Notify,
}

impl IndexObjects {
    /// Claims the write of `rank`'s object; None when it is written or being written. The claim
    /// is released as failed if it is dropped unfinished (a cancelled request), so nobody waits
    /// for a write that will never end.
    pub(crate) fn begin(self: &Arc<Self>, rank: u32) -> Option<IndexObjectClaim> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.contains(&rank) || g.1.contains(&rank) {
            return None;
        }
        g.1.insert(rank);
        Some(IndexObjectClaim { objects: self.clone(), rank, done: false })
    }

    fn finish(&self, rank: u32, ok: bool) {
        {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            g.1.remove(&rank);
            if ok {
                g.0.insert(rank);
            }
        }
        self.changed.notify_waiters();
    }

    /// (written, being written)
    pub(crate) fn counts(&self) -> (usize, usize) {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.len(), g.1.len())
    }

    pub(crate) fn is_written(&self, rank: u32) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.contains(&rank)
    }

    /// Waits until some write finishes, or `limit` passes.
    pub(crate) async fn changed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.changed.notified()).await;
    }
}

/// A claimed index-object write; see `IndexObjects::begin`.
pub(crate) struct IndexObjectClaim {
    objects: Arc<IndexObjects>,
    rank: u32,
    done: bool,
}

impl IndexObjectClaim {
    pub(crate) fn finish(mut self, ok: bool) {
        self.done = true;
        self.objects.finish(self.rank, ok);
    }
}

impl Drop for IndexObjectClaim {
    fn drop(&mut self) {
        if !self.done {
            self.objects.finish(self.rank, false);
        }
    }
}

pub struct Coordinator {
    pub(crate) store: Store,
    pub(crate) index: Index,
    pub(crate) limits: Limits,
    pub(crate) config: Config,
    pub(crate) saves: std::sync::Mutex<HashMap<SaveKey, SlotRef>>,
    /// Upload outcomes waiting for their save's lock, by the save's address (see
    /// `upload_events`); an entry lives while its one drain task does.
    inboxes: std::sync::Mutex<HashMap<usize, Vec<Outcome>>>,
    /// The status of each save whose commit is under way, as it began: a status query answers
    /// from here rather than wait for the save's lock, which the commit holds through the
    /// store's retries. At most one per save in flight.
    pub(crate) committing: std::sync::Mutex<HashMap<SaveKey, SaveStatus>>,
    /// Committed saves whose journalled ranks are still being removed (`finish_commit` does
    /// it after answering), each with a gate held until the removal ends: a save opened afresh
    /// under the same key waits at it, so the removal cannot take the new save's ranks.
    /// At most one entry per save committed in the last moments.
    pub(crate) retiring: Arc<RetiringGates>,
    /// Woken whenever a save leaves the in-flight set (committed or aborted): status queries
    /// waiting for their save to end answer at once.
    pub(crate) save_ended: tokio::sync::Notify,
    pub(crate) chunk_permits: Arc<Semaphore>,
    pub(crate) index_permits: Arc<Semaphore>,
    /// Bytes of JSON bodies held at once (`json_bytes_in_flight_max`).
    pub(crate) json_bytes: Arc<Semaphore>,
    pub(crate) staging: Arc<Staging>,
    /// Upload events for chunks made durable outside the upload queue (node-local adoption).
    pub(crate) events: mpsc::UnboundedSender<UploadEvent>,
    /// Recently aborted saves, for status queries; they no longer count as in flight.
    pub(crate) aborted: std::sync::Mutex<VecDeque<SaveStatus>>,
    pub(crate) handoff_dir: std::path::PathBuf,
    /// The group sync of a local-directory store's filesystem (node-local adopts share it).
    pub(crate) fs_sync: Option<Arc<crate::durable::FsSync>>,
    /// Clients' shared-memory staging buffers (the zero-copy node-local path).
    pub(crate) segments: Arc<crate::segments::Segments>,
    /// Where clients register segments, once `serve` has bound it.
    pub(crate) segment_socket: std::sync::OnceLock<std::path::PathBuf>,
    /// The data directory's lock (`lib.rs` `lock_data_dir`), held as long as anything that may
    /// write the index.
    pub(crate) data_dir_lock: std::sync::OnceLock<nix::fcntl::Flock<std::fs::File>>,
    /// What this process's start-up found and did (`/v1/stats`, `ckpt_index_set_aside`).
    pub(crate) started: std::sync::OnceLock<RecoveryReport>,
    /// Chunk references held by all saves in flight.
    pub(crate) chunk_refs_in_flight: AtomicU64,
    /// Index object bytes held by all saves in flight.
    pub(crate) index_bytes_in_flight: AtomicU64,
    /// Microseconds from the last rank's index to the root of the most recent commit.
    pub(crate) last_commit_after_last_index_us: AtomicU64,
    /// Summaries of committed roots already parsed (a root is about 90 bytes a rank; status
    /// polls after a commit must not parse it again each time). Bounded by `SUMMARIES_KEPT`.
    pub(crate) summaries: std::sync::Mutex<HashMap<SaveKey, ckpt_core::ManifestSummary>>,
    /// Generation fences by job (journalled in the index and recorded in the store), cached;
    /// bounded by `FENCES_KEPT`.
    pub(crate) fences: std::sync::Mutex<FenceCache>,
    /// This node's id (kept in `<data_dir>/node_id` and the index, `lib.rs` `keep_node_id`):
    /// names its save leases and GC locks in the store.
    pub(crate) node_id: String,
    /// Save leases, condemned views and the GC lock (`gc.rs`).
    pub(crate) gc: crate::gc::GcState,
}

pub(crate) const SUMMARIES_KEPT: usize = 4096;
/// Jobs whose generation fence is cached (a name and a number each: a few MB at most).
pub(crate) const FENCES_KEPT: usize = 65_536;

/// Generation fences by job as the index holds them (see `commit.rs` `cache_fence`).
#[derive(Default)]
pub(crate) struct FenceCache {
    pub(crate) by_job: HashMap<String, u64>,
    /// How many times the cache was cleared.
    pub(crate) clears: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OpenSave {
    pub world_size: u32,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// Creation time recorded in the root; defaults to ckptd's clock at the first open.
    /// Clients that may commit the same save through several ckptd processes pass it so every
    /// writer builds byte-identical roots.
    #[serde(default)]
    pub created_unix_ms: Option<u64>,
    /// The writer's generation; refused when the job is fenced at a later one.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The ranks `[first, end)` this ckptd serves when the save is split over several nodes;
    /// needs `epoch` (it names the save's parts). Absent, or the whole world: one node.
    #[serde(default)]
    pub node_ranks: Option<[u32; 2]>,
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
    /// The index sled could not read was renamed to `index.damaged` (then rebuilt).
    pub index_set_aside: bool,
    /// Jobs whose fence the store held higher than the index (an index rebuilt, or another
    /// node's raise).
    pub fences_restored: usize,
    pub manifests_added: usize,
    pub manifests_dropped: usize,
    /// Roots the store's listing left out but a direct read found (an eventually consistent or
    /// stale listing); kept.
    pub manifests_unlisted: usize,
    pub chunks_indexed: usize,
    pub saves_committed: usize,
    pub saves_aborted: usize,
    pub saves_resumed: usize,
    /// Journalled saves whose entries could not be read, forgotten (`Index::all_saves`).
    pub saves_unreadable: usize,
    pub spilled_chunks_requeued: usize,
    /// GC locks left by runs of this node that died with it.
    pub gc_locks_released: usize,
}

pub(crate) fn now_unix_ms() -> u64 {
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
    /// Creates the coordinator with its staging tier and starts the tasks that turn upload
    /// events into commits and keep saves moving. Call `recover` before serving.
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
        let encoders = Arc::new(crate::encoders::Encoders::new(config.encoders_max));
        let handoff_dir = config.handoff_dir();
        let fs_sync = store.local_root().and_then(|root| match crate::durable::FsSync::open(root) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the store's root for group syncs; node-local adopts are refused");
                None
            }
        });
        // One pool of aligned buffers for segment chunks and direct uploads: each in flight
        // holds one, and both are bounded (chunk requests, upload workers).
        let segments = Arc::new(crate::segments::Segments::new(
            config.segments_max,
            config.chunk_requests_max + config.upload_concurrency,
            encoders.clone(),
        ));
        let direct = fs_sync.clone().map(|fs| crate::staging::DirectWrites { fs, buffers: segments.clone() });
        let staging = Staging::start(staging_cfg, store.clone(), index.clone(), tx.clone(), encoders, direct);
        // One read (or write) of the index at start-up, before anything is served.
        let node_id = index.node_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot keep a node id in the index; using a fresh one");
            format!("{:016x}", rand::random::<u64>())
        });
        let c = Arc::new(Coordinator {
            node_id,
            gc: crate::gc::GcState::new(config.retention.gc_runs_max),
            fs_sync,
            segments,
            segment_socket: Default::default(),
            data_dir_lock: Default::default(),
            started: Default::default(),
            limits: config.limits(),
            chunk_permits: Arc::new(Semaphore::new(config.chunk_requests_max)),
            index_permits: Arc::new(Semaphore::new(config.index_requests_max)),
            json_bytes: Arc::new(Semaphore::new(json_budget_permits(&config) as usize)),
            store,
            index,
            config,
            saves: std::sync::Mutex::new(HashMap::new()),
            committing: Default::default(),
            retiring: Default::default(),
            inboxes: Default::default(),
            save_ended: tokio::sync::Notify::new(),
            staging,
            events: tx,
            aborted: Default::default(),
            handoff_dir,
            chunk_refs_in_flight: AtomicU64::new(0),
            index_bytes_in_flight: AtomicU64::new(0),
            last_commit_after_last_index_us: AtomicU64::new(0),
            summaries: Default::default(),
            fences: Default::default(),
        });
        tokio::spawn(Self::upload_events(Arc::downgrade(&c), rx));
        tokio::spawn(Self::maintain(Arc::downgrade(&c), Duration::from_millis(c.config.commit_retry_ms)));
        tokio::spawn(Self::poll_splits(Arc::downgrade(&c)));
        tokio::spawn(Self::keep_leases(Arc::downgrade(&c), Duration::from_millis(c.config.commit_retry_ms)));
        c
    }

    /// Every `every`: commits saves that are ready (every rank in, every chunk durable) but
    /// have no root, because the create failed with an error the store adapter's own retries
    /// did not get past; and aborts saves with no progress for `save_idle_abort_ms` (ranks that
    /// died and never came back). Runs until the coordinator is dropped; skips saves another
    /// task holds.
    async fn maintain(me: std::sync::Weak<Coordinator>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { break };
            let idle_max = Duration::from_millis(me.config.save_idle_abort_ms);
            let slots: Vec<SlotRef> = me.saves.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            for slot in slots {
                let Ok(mut g) = slot.try_lock_owned() else { continue };
                let (job, step) = (g.state.job.clone(), g.state.step);
                if g.ready() && g.split.is_none() {
                    // In a task of its own, the save's lock with it: a commit that waits out the
                    // store's retries holds up neither the other saves' retries nor the idle
                    // checks (the next tick skips this save while the task holds it).
                    let me = me.clone();
                    tokio::spawn(async move {
                        match me.commit(&mut g).await {
                            Ok(()) => tracing::info!(job, step, "commit retried in the background succeeded"),
                            Err(e) => {
                                tracing::warn!(job, step, error = %e, "background commit retry failed; trying again later")
                            }
                        }
                    });
                } else if !g.state.phase.is_final() && g.last_progress.elapsed() >= idle_max {
                    match me.may_abort(&g.state).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(job, step, error = %e, "idle split save: cannot record the abort yet");
                            continue;
                        }
                    }
                    let reason = if g.split.is_some() {
                        format!(
                            "no progress for {} s: this node's part is written, but the other nodes' parts never all arrived and no root appeared",
                            idle_max.as_secs()
                        )
                    } else {
                        let missing = g.state.missing_ranks();
                        let shown: Vec<u32> = missing.iter().take(8).copied().collect();
                        format!(
                            "no progress for {} s: {} of {} ranks never sent their index (first {:?}), {} chunks not durable",
                            idle_max.as_secs(),
                            missing.len(),
                            g.state.world_size,
                            shown,
                            g.pending.len()
                        )
                    };
                    if g.state.abort(reason).is_ok() {
                        if let Err(e) = me.retire_aborted(&g.state).await {
                            tracing::error!(job, step, error = %e, "cannot retire an idle save");
                        }
                    }
                }
            }
        }
    }

    /// Turns upload outcomes into index-object writes, commits and aborts. Runs until the
    /// coordinator is dropped.
    ///
    /// The loop never waits on a save: a save's lock is held for the whole of its commit (store
    /// retries included, minutes when the store is down), and the next step of the same job
    /// uploads meanwhile. Each outcome goes to the inbox of every save of its job, and one task
    /// per save with a non-empty inbox takes the save's lock and applies the inbox in order
    /// (`drain_outcomes`): one slow commit holds up no other save, and the tasks waiting on
    /// saves are never more than the saves in flight.
    async fn upload_events(me: std::sync::Weak<Coordinator>, mut rx: mpsc::UnboundedReceiver<UploadEvent>) {
        while let Some(ev) = rx.recv().await {
            let Some(me) = me.upgrade() else { break };
            let job = match &ev {
                UploadEvent::Durable { job, .. } | UploadEvent::Failed { job, .. } => job.clone(),
            };
            for (_, slot) in me.slots_of(&job) {
                let outcome = match &ev {
                    UploadEvent::Durable { hash, .. } => Outcome::Landed(*hash),
                    UploadEvent::Failed { hash, reason, .. } => Outcome::Lost(*hash, reason.clone()),
                };
                // The address names the save while its entry lives: the drain task holds it.
                let key = Arc::as_ptr(&slot) as usize;
                let mut inboxes = me.inboxes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(inbox) = inboxes.get_mut(&key) {
                    inbox.push(outcome);
                    continue;
                }
                inboxes.insert(key, vec![outcome]);
                drop(inboxes);
                tokio::spawn(me.clone().drain_outcomes(slot, key));
            }
        }
    }

    /// Applies a save's inbox under its lock until the inbox is empty, then removes it (under
    /// the inboxes lock, so an outcome queued meanwhile is applied by this task or starts the
    /// next one).
    async fn drain_outcomes(self: Arc<Self>, slot: SlotRef, key: usize) {
        let mut g = slot.lock().await;
        loop {
            let batch = {
                let mut inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
                match inboxes.get_mut(&key) {
                    Some(inbox) if !inbox.is_empty() => std::mem::take(inbox),
                    _ => {
                        inboxes.remove(&key);
                        return;
                    }
                }
            };
            for outcome in batch {
                match outcome {
                    Outcome::Landed(hash) => self.chunk_landed(&mut g, &hash),
                    Outcome::Lost(hash, reason) => self.chunk_lost(&mut g, hash, &reason).await,
                }
            }
            // This task holds the lock already: the commit runs here, and outcomes that arrive
            // meanwhile wait in the inbox for the next round.
            if g.ready() {
                if let Err(e) = self.commit(&mut g).await {
                    tracing::error!(job = g.state.job, step = g.state.step, error = %e, "commit failed");
                }
            }
        }
    }

    /// A chunk of the save in `g` is durable: writes the index objects it completes (the
    /// caller commits once the save is ready). Nothing for a save that ended.
    fn chunk_landed(self: &Arc<Self>, g: &mut Slot, hash: &ChunkHash) {
        if g.state.phase.is_final() {
            return;
        }
        let Some(complete) = g.chunk_durable(hash) else { return };
        g.last_progress = Instant::now();
        for rank in complete {
            self.clone().spawn_index_object_write(g, rank);
        }
    }

    /// A chunk the save in `g` waits for could not be made durable: the save is aborted,
    /// unless the chunk was staged again since (its rank re-sent it) or is durable after all
    /// (a re-send that landed; the index records a chunk before staging lets it go).
    async fn chunk_lost(&self, g: &mut Slot, hash: ChunkHash, reason: &str) {
        let job = g.state.job.clone();
        if g.state.phase.is_final()
            || !g.pending.contains_key(&hash)
            || self.staging.pending_raw_len(&job, &hash).is_some()
        {
            return;
        }
        let j = job.clone();
        if self.blocking(move |i| i.has_chunk(&j, &hash)).await.unwrap_or(false) {
            return;
        }
        if self.may_abort(&g.state).await.unwrap_or(false) {
            let why = format!("chunk {hash} could not be made durable: {reason}");
            if g.state.abort(why).is_ok() {
                if let Err(e) = self.retire_aborted(&g.state).await {
                    tracing::error!(job, error = %e, "cannot retire an aborted save");
                }
            }
        }
    }

    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn saves_in_flight(&self) -> usize {
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Saves in flight of the jobs `pred` accepts (a tenant's).
    pub fn saves_in_flight_where(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).keys().filter(|(j, _)| pred(j)).count()
    }

    /// How long a request waits for a slot before it is refused.
    pub fn busy_wait(&self) -> Duration {
        Duration::from_millis(self.config.busy_wait_ms)
    }

    pub fn chunk_refs_in_flight(&self) -> u64 {
        self.chunk_refs_in_flight.load(Ordering::Relaxed)
    }

    pub fn index_bytes_in_flight(&self) -> u64 {
        self.index_bytes_in_flight.load(Ordering::Relaxed)
    }

    /// What this process's start-up found and did; None before it ended.
    pub fn start_report(&self) -> Option<&RecoveryReport> {
        self.started.get()
    }

    /// The damage the index met since it opened, if any (ckptd is then stopping).
    pub fn index_damage(&self) -> Option<String> {
        self.index.damage_found()
    }

    /// Microseconds from the last rank's index to the root, for the most recent commit.
    pub fn last_commit_after_last_index_us(&self) -> u64 {
        self.last_commit_after_last_index_us.load(Ordering::Relaxed)
    }

    /// Journal syncs since start-up (one sync serves many concurrent requests).
    pub fn journal_flushes(&self) -> u64 {
        self.index.flush_count()
    }

    pub(crate) fn slots_of(&self, job: &str) -> Vec<(SaveKey, SlotRef)> {
        let saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
        saves.iter().filter(|((j, _), _)| j == job).map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    pub(crate) fn save_slot(&self, job: &str, step: u64) -> Option<SlotRef> {
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), step)).cloned()
    }

    /// Adds a save restored from the journal to the in-flight set, its chunk references and
    /// index bytes counted.
    pub(crate) fn track_slot(&self, key: SaveKey, chunk_refs: u64, index_bytes: u64, slot: SlotRef) {
        self.chunk_refs_in_flight.fetch_add(chunk_refs, Ordering::Relaxed);
        self.index_bytes_in_flight.fetch_add(index_bytes, Ordering::Relaxed);
        self.saves.lock().unwrap_or_else(|e| e.into_inner()).insert(key, slot);
    }

    /// Takes a save out of the in-flight set (committed or aborted) and releases its count.
    pub(crate) fn untrack_slot(&self, state: &SaveState) {
        let key = (state.job.clone(), state.step);
        let removed = self.saves.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        // Before the end is announced: a status query woken by it must not find the snapshot.
        self.committing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        if removed.is_some() {
            self.lease_close(&state.job, state.step);
            give_back(&self.chunk_refs_in_flight, state.chunk_refs);
            give_back(&self.index_bytes_in_flight, state.index_bytes);
            self.save_ended.notify_waiters();
        }
    }

    /// How long a request body may send nothing before it is dropped.
    pub fn body_progress_timeout(&self) -> Duration {
        Duration::from_millis(self.config.body_progress_timeout_ms)
    }

    /// How long a request body of `declared` bytes (None: not declared, so up to the JSON
    /// limit) may take to arrive, at `body_min_bytes_per_s`, after a grace of one
    /// `body_progress_timeout`.
    pub fn body_deadline(&self, declared: Option<u64>) -> Duration {
        let bytes = declared.unwrap_or(self.config.shard_index_bytes_max);
        let rate = self.config.body_min_bytes_per_s.max(1);
        self.body_progress_timeout() + Duration::from_millis(bytes.saturating_mul(1000) / rate)
    }

    pub fn body_min_bytes_per_s(&self) -> u64 {
        self.config.body_min_bytes_per_s
    }

    pub fn missing_query_hashes_max(&self) -> usize {
        self.config.missing_query_hashes_max
    }

    /// The largest shard-index body the API accepts.
    pub fn json_body_bytes_max(&self) -> u64 {
        self.config.shard_index_bytes_max
    }

    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, crate::index::IndexError> + Send + 'static,
    {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || f(&index)).await.map_err(join_error)?.map_err(ServiceError::from)
    }

    /// A slot for a chunk transfer, or `Busy` once `busy_wait_ms` has passed without one.
    pub async fn chunk_permit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.permit(&self.chunk_permits, self.config.chunk_requests_max, "chunk transfers").await
    }

    /// A slot for a shard-index request, or `Busy` once `busy_wait_ms` has passed without one.
    pub async fn index_permit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.permit(&self.index_permits, self.config.index_requests_max, "shard-index requests").await
    }

    pub fn json_bytes_in_flight_max(&self) -> u64 {
        self.config.json_bytes_in_flight_max
    }

    /// Bytes of JSON bodies received and not yet answered (`bodies.rs` `json_budget`).
    pub fn json_bytes_in_flight(&self) -> u64 {
        json_budget_permits(&self.config).saturating_sub(self.json_bytes.available_permits() as u64)
    }

    /// A slot from `slots` (`max` of them), waited for at most `busy_wait_ms`.
    pub(crate) async fn permit(
        &self,
        slots: &Arc<Semaphore>,
        max: usize,
        what: &str,
    ) -> Result<OwnedSemaphorePermit, ServiceError> {
        let wait = Duration::from_millis(self.config.busy_wait_ms);
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ServiceError::Busy("shutting down".into())),
            Err(_) => Err(ServiceError::Busy(format!("{max} {what} in progress"))),
        }
    }

    /// An aborted save leaves the in-flight set and the journal, so it no longer counts against
    /// `saves_in_flight_max`; its status stays answerable from a bounded list of recent aborts.
    /// Called with the save's lock held (or for a save not yet in the map, at start-up).
    pub(crate) async fn retire_aborted(&self, state: &SaveState) -> Result<(), ServiceError> {
        const ABORTED_KEPT: usize = 1024;
        // Journalled first: nobody may learn of the abort (a rank woken by the save's end
        // above all) before a power cut can no longer bring the save back to commit.
        let (job, step) = (state.job.clone(), state.step);
        // Test-only: a slow journal, to show nobody learns of the abort before it.
        fail::fail_point!("ckptd::abort::before_journal");
        let journalled = match self.blocking(move |i| i.remove_save(&job, step)).await {
            Ok(()) => self.index.flush().await.map_err(ServiceError::from),
            Err(e) => Err(e),
        };
        // Recorded as aborted before it leaves the in-flight set, so a status query always
        // finds it in one or the other.
        {
            let mut aborted = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
            aborted.retain(|s| !(s.job == state.job && s.step == state.step));
            aborted.push_back(SaveStatus::of(state));
            while aborted.len() > ABORTED_KEPT {
                aborted.pop_front();
            }
        }
        // Out of the in-flight set whether or not the journal took it: a final save must not
        // stay there.
        self.untrack_slot(state);
        journalled?;
        tracing::info!(job = state.job, step = state.step, reason = ?state.error, "save aborted");
        Ok(())
    }

    pub(crate) fn recently_aborted(&self, job: &str, step: Option<u64>) -> Vec<SaveStatus> {
        let aborted = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
        aborted.iter().filter(|s| s.job == job && step.is_none_or(|st| s.step == st)).cloned().collect()
    }
}
