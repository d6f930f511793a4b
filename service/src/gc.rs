//! Retention and garbage collection on ckptd's side: save leases, the condemned view that
//! `missing` answers consult, the commit-time check, and GC runs.
//!
//! Design note. The protocol, and why it is safe with any number of ckptd nodes on one store,
//! is in `ckpt_core::gc`. Here:
//! * Every open makes sure its save has a lease and its job a view before it answers. A save
//!   created here writes its lease first (its store time is the save's opening), then reads the
//!   view and the last sweep: a list written after the lease is held off by the lease, one
//!   written before is in the view. A save restored from the journal, or one whose lease write
//!   failed, gets a lease that claims the earliest time (it holds every sweep while it lives)
//!   and no known sweep (its commit checks every object it names).
//! * Leases are refreshed by their own task every third of `lease_s`, apart from commit
//!   retries, so a slow commit cannot let other saves' leases lapse.
//! * Reading the view applies the last sweep to the chunk records before the new view is
//!   installed, so no lookup trusts a record of a chunk that sweep deleted.
//! * The commit check: a sweep records its keys (`gc/swept.json`) before deleting anything. A
//!   save remembers the sweep it saw when it opened; at commit, if the root names a key of that
//!   sweep or of the next one, the save is aborted (the object may be gone, or about to be);
//!   if more sweeps passed, or the save's opening sweep is unknown, every object the root names
//!   is checked in the store.
//! * One GC run per job at a time, across nodes: the job's lock (`gc_lock.rs`), a lease that
//!   another node takes over once it is `gc_lock_stale_s` old; a run asks it before each step
//!   that changes GC state, and stops when it lapsed. A run is a task of its own, so a caller
//!   that goes away does not cut it short with the lock still held; a node that died mid-run
//!   deletes the locks naming it when it starts again, and a node shutting down stops its
//!   runs, which release their locks before it exits (stopped anywhere, a run leaves what a
//!   crash would, which the protocol survives). This node also keeps the set of jobs it is
//!   collecting, so a second run of one of them is refused without a store round trip, while
//!   runs over other jobs go ahead: one tenant's long GC does not hold another's.
//! * Memory: a run holds the job's chunk and index-object listings and the referenced set,
//!   about 210 bytes per object from a local directory (309 MiB measured for 1.5 M objects on
//!   a fresh heap: 2 GiB per ten million), about 300 through object_store's listing (450 MiB
//!   measured when a local store was listed that way). At most `gc_runs_max` runs (dry or not)
//!   hold that at once; another waits `busy_wait_ms` for a slot, then gets 503.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::gc::{
    Condemned, Lease, LeaseSeen, RetentionPolicy, Swept, CONDEMNED_FORMAT, LEASE_FORMAT, SWEPT_FORMAT,
};
use ckpt_core::keys::{self, ParsedKey};
use ckpt_core::{ChunkHash, CommitObject};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::coordinator::{now_unix_ms, Coordinator, SaveKey};
use crate::error::ServiceError;
use crate::gc_lock::GcLock;

/// A sweep as a node last read it: its number and the keys it deletes.
#[derive(Clone, Default)]
struct SweepSeen {
    seq: u64,
    keys: Arc<HashSet<String>>,
}

/// A lease this node holds.
#[derive(Clone)]
struct LeaseHeld {
    /// The store's time of the save's opening; 0 when unknown (restored or failed to write):
    /// the lease then holds every sweep.
    opened: u64,
    /// When it was last written; `None` before its first write.
    refreshed: Option<Instant>,
    /// The last sweep when the save opened; `None` when unknown.
    sweep: Option<SweepSeen>,
}

pub(crate) struct GcState {
    /// Condemned chunks per job, as last read from the store; only jobs with a lease held here.
    views: Mutex<HashMap<String, HashSet<ChunkHash>>>,
    leases: Mutex<HashMap<SaveKey, LeaseHeld>>,
    /// Slots for runs on this node (`gc_runs_max`).
    runs: Arc<tokio::sync::Semaphore>,
    /// Jobs this node is collecting (not dry runs).
    collecting: Arc<Mutex<HashSet<String>>>,
    /// Cancelled when ckptd shuts down: runs stop and release their locks while the store is
    /// still there, instead of leaving them to the next start of this node (or `gc_lock_stale_s`).
    stop: tokio_util::sync::CancellationToken,
}

impl GcState {
    pub(crate) fn new(runs_max: usize) -> Self {
        GcState {
            views: Default::default(),
            leases: Default::default(),
            runs: Arc::new(tokio::sync::Semaphore::new(runs_max)),
            collecting: Default::default(),
            stop: Default::default(),
        }
    }
}

/// A job in this node's collecting set, taken out when the run ends or its request is dropped.
struct Collecting {
    set: Arc<Mutex<HashSet<String>>>,
    job: String,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.job);
    }
}

/// What a GC run did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub job: String,
    pub dry_run: bool,
    pub policy: RetentionPolicy,
    pub checkpoints_kept: Vec<u64>,
    pub checkpoints_deleted: Vec<u64>,
    pub pinned: Vec<u64>,
    /// Objects deleted by the sweep of the previous run's condemned list, and their bytes.
    pub swept_objects: usize,
    pub swept_bytes: u64,
    /// Why the previous list could not be swept yet.
    pub sweep_deferred: Option<String>,
    /// Objects this run condemned (deleted by a later run), and their bytes.
    pub condemned_objects: usize,
    pub condemned_bytes: u64,
    /// Handoff and spill files, and temporary files a crash left in a local store, older than
    /// the grace period, removed.
    pub stale_local_files: usize,
    /// Parts of split saves that had done their work, removed (`parts.rs`).
    pub parts_removed: usize,
}

/// A GC over every job (`POST /v1/gc`): the runs that finished, the jobs whose run failed, and
/// the jobs not reached because the store stopped answering.
#[derive(Debug, Default, Serialize)]
pub struct GcAllReport {
    pub jobs: Vec<GcReport>,
    pub failed: Vec<GcFailure>,
    pub not_run: Vec<String>,
}

/// One job's failed run in a GC over every job: the error its own request would have had.
#[derive(Debug, Serialize)]
pub struct GcFailure {
    pub job: String,
    pub code: &'static str,
    pub message: String,
}

fn corrupt_record(key: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(format!("record {key} is unreadable: {e}"))
}

/// How long a commit waits for a sweep in progress before it gives up (aborts).
const SWEEP_WAIT: Duration = Duration::from_secs(120);

impl Coordinator {
    fn grace_ms(&self) -> u64 {
        self.config.retention.gc_grace_s.saturating_mul(1000)
    }

    fn lease_ms(&self) -> u64 {
        self.config.retention.lease_s.saturating_mul(1000)
    }

    /// How many jobs' views this node holds (for `/v1/stats`).
    pub(crate) fn gc_views_cached(&self) -> usize {
        self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether `hash` is condemned in this node's view of `job`.
    pub(crate) fn gc_condemned(&self, job: &str, hash: &ChunkHash) -> bool {
        self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).get(job).is_some_and(|v| v.contains(hash))
    }

    /// Reads the job's last sweep and condemned list from the store: the sweep is applied to
    /// the chunk records first, then the list becomes the view `lookup` consults. Returns the
    /// sweep.
    async fn gc_refresh_view(&self, job: &str) -> Result<SweepSeen, ServiceError> {
        let key = keys::swept_key(job);
        let sweep = match self.store.get_record(&key).await? {
            Some((bytes, _)) => {
                let swept: Swept = parse_record(&key, bytes).await?;
                self.apply_sweep(job, &swept).await?;
                SweepSeen { seq: swept.seq, keys: Arc::new(swept.keys.into_iter().collect()) }
            }
            None => SweepSeen::default(),
        };
        let key = keys::condemned_key(job);
        let view: HashSet<ChunkHash> = match self.store.get_record(&key).await? {
            Some((bytes, _)) => {
                let list: Condemned = parse_record(&key, bytes).await?;
                list.keys
                    .iter()
                    .filter_map(|k| match keys::parse_key(k) {
                        Some(ParsedKey::Chunk { hash, .. }) => Some(hash),
                        _ => None,
                    })
                    .collect()
            }
            None => HashSet::new(),
        };
        // Installed only while a save of the job holds a lease here (see `lease_close`): a GC
        // run's refresh racing the job's last save out would otherwise leave it for good.
        let leases = self.gc.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.keys().any(|(j, _)| j == job) {
            self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).insert(job.to_string(), view);
        }
        drop(leases);
        Ok(sweep)
    }

    /// Drops the chunk records a sweep made false; all of the job's records if this node
    /// missed a sweep (a later lookup asks the store).
    async fn apply_sweep(&self, job: &str, swept: &Swept) -> Result<(), ServiceError> {
        let j = job.to_string();
        let seen = self.blocking(move |i| i.gc_seen(&j)).await?;
        if swept.seq <= seen {
            return Ok(());
        }
        let hashes: Vec<ChunkHash> = swept
            .keys
            .iter()
            .filter_map(|k| match keys::parse_key(k) {
                Some(ParsedKey::Chunk { hash, .. }) => Some(hash),
                _ => None,
            })
            .collect();
        let (j, seq, consecutive) = (job.to_string(), swept.seq, swept.seq == seen + 1);
        self.blocking(move |i| {
            if consecutive {
                i.remove_chunks(&j, &hashes)?;
            } else {
                let n = i.clear_job_chunks(&j)?;
                tracing::info!(job = j, forgotten = n, "missed a GC sweep; chunk records will be read from the store");
            }
            i.set_gc_seen(&j, seq)
        })
        .await?;
        self.index.flush().await?;
        Ok(())
    }

    fn lease_body(&self, job: &str, step: u64, opened: Option<u64>) -> Result<Bytes, ServiceError> {
        let lease = Lease {
            format: LEASE_FORMAT.into(),
            job: job.into(),
            step,
            node: self.node_id.clone(),
            opened_store_ms: opened,
        };
        serde_json::to_vec(&lease).map(Bytes::from).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    fn lease_held(&self, job: &str, step: u64) -> Option<LeaseHeld> {
        self.gc.leases.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), step)).cloned()
    }

    /// Takes a lease for a save in flight here; false (and nothing kept) when the save has
    /// ended. Under the leases lock, so `lease_close` of a save ending now comes after.
    fn start_lease(&self, job: &str, step: u64, held: LeaseHeld) -> bool {
        let key = (job.to_string(), step);
        let mut leases = self.gc.leases.lock().unwrap_or_else(|e| e.into_inner());
        if !self.saves.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&key) {
            return false;
        }
        leases.insert(key, held);
        true
    }

    /// Updates a lease still held: one closed while its write was under way stays closed.
    fn update_lease(&self, job: &str, step: u64, held: LeaseHeld) {
        if let Some(h) = self.gc.leases.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&(job.to_string(), step)) {
            *h = held;
        }
    }

    /// Before any open of a save is answered: its lease is in the store and its job's view is
    /// loaded. A save `created` by this open gets a fresh lease; any other save without one (a
    /// restored save, or an earlier open that failed half-way) gets the conservative one.
    pub(crate) async fn gc_open(&self, job: &str, step: u64, created: bool) -> Result<(), ServiceError> {
        let held = self.lease_held(job, step);
        if (created || held.is_none())
            && !self.start_lease(job, step, LeaseHeld { opened: 0, refreshed: None, sweep: None })
        {
            // The save ended meanwhile (a restored one keep_leases found): nothing to hold.
            return Ok(());
        }
        let held = self.lease_held(job, step);
        if held.as_ref().is_some_and(|h| h.refreshed.is_none()) {
            let key = keys::lease_key(job, step, &self.node_id);
            if created {
                self.store.put_record(&key, self.lease_body(job, step, None)?).await?;
                let opened = self.store.modified_ms(&key).await?.unwrap_or(0);
                let sweep = self.gc_refresh_view(job).await?;
                self.update_lease(job, step, LeaseHeld { opened, refreshed: Some(Instant::now()), sweep: Some(sweep) });
                return Ok(());
            }
            self.store.put_record(&key, self.lease_body(job, step, Some(0))?).await?;
            self.update_lease(job, step, LeaseHeld { opened: 0, refreshed: Some(Instant::now()), sweep: None });
        }
        let loaded = self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).contains_key(job);
        if !loaded {
            self.gc_refresh_view(job).await?;
        }
        Ok(())
    }

    /// Forgets the lease of a save that left the in-flight set and deletes it in the background
    /// (a lease left behind only lapses).
    pub(crate) fn lease_close(&self, job: &str, step: u64) {
        let key = (job.to_string(), step);
        let mut leases = self.gc.leases.lock().unwrap_or_else(|e| e.into_inner());
        // A new save opened under the same key since this one left the in-flight set: the lease
        // (and its record) is the new save's now. Same order as `start_lease`: leases, then saves.
        if self.saves.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&key) {
            return;
        }
        if leases.remove(&key).is_some() {
            // A job's view serves only its saves in flight here, and the next open loads it
            // again: dropped with the job's last lease, so views do not pile up with every job
            // this node has seen. Under the leases lock: an open sets its lease before it looks
            // for the view, so it either holds this off or finds the view gone and loads it.
            if !leases.keys().any(|(j, _)| j == job) {
                self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).remove(job);
            }
            drop(leases);
            let (store, key) = (self.store.clone(), keys::lease_key(job, step, &self.node_id));
            tokio::spawn(async move {
                if let Err(e) = store.delete_key(&key).await {
                    tracing::warn!(key, error = %e, "cannot delete a save lease; it will lapse");
                }
            });
        }
    }

    /// Runs until the coordinator is dropped: every save in flight has a lease, refreshed
    /// every third of `lease_s` (a restored save gets the conservative one and its job's view).
    pub(crate) async fn keep_leases(me: std::sync::Weak<Coordinator>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { break };
            let tracked: Vec<SaveKey> = me.saves.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
            let refresh_after = Duration::from_millis(me.lease_ms() / 3);
            for (job, step) in tracked {
                let result = match me.lease_held(&job, step) {
                    None => me.gc_open(&job, step, false).await,
                    Some(h) if h.refreshed.is_none_or(|at| at.elapsed() >= refresh_after) => {
                        let key = keys::lease_key(&job, step, &me.node_id);
                        match me.lease_body(&job, step, Some(h.opened)) {
                            Ok(body) => me.store.put_record(&key, body).await.map_err(ServiceError::from).map(|()| {
                                me.update_lease(&job, step, LeaseHeld { refreshed: Some(Instant::now()), ..h });
                            }),
                            Err(e) => Err(e),
                        }
                    }
                    Some(_) => Ok(()),
                };
                if let Err(e) = result {
                    tracing::warn!(job, step, error = %e, "cannot write a save lease");
                }
            }
        }
    }

    /// The last sweep of `job`, once it is done (waiting up to `SWEEP_WAIT` for one in
    /// progress whose run still holds the GC lock); `None` when there never was one.
    async fn finished_sweep(&self, job: &str) -> Result<Result<Option<Swept>, String>, ServiceError> {
        let key = keys::swept_key(job);
        let deadline = Instant::now() + SWEEP_WAIT;
        loop {
            let Some((bytes, _)) = self.store.get_record(&key).await? else { return Ok(Ok(None)) };
            let swept: Swept = parse_record(&key, bytes).await?;
            if swept.done {
                return Ok(Ok(Some(swept)));
            }
            if !crate::gc_lock::is_held(&self.store, job, self.lock_stale()).await? {
                return Ok(Ok(Some(swept)));
            }
            if Instant::now() >= deadline {
                return Ok(Err(format!("a GC sweep of job {job} is still deleting after {} s", SWEEP_WAIT.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The commit-time check (see the design note). Err names why the save must not commit.
    pub(crate) async fn gc_backstop(
        &self,
        job: &str,
        step: u64,
        index_objects: &[ChunkHash],
        chunks: &[ChunkHash],
    ) -> Result<Result<(), String>, ServiceError> {
        let swept = match self.finished_sweep(job).await? {
            Err(why) => return Ok(Err(why)),
            Ok(None) => return Ok(Ok(())),
            Ok(Some(s)) => s,
        };
        self.apply_sweep(job, &swept).await?;
        let named = || {
            index_objects.iter().map(|h| keys::index_key(job, h)).chain(chunks.iter().map(|h| keys::chunk_key(job, h)))
        };
        let opened_with = self.lease_held(job, step).and_then(|h| h.sweep);
        let suspects: BTreeSet<String> = match &opened_with {
            // The sweep the save opened with may have been deleting while it answered.
            Some(at_open) if swept.seq == at_open.seq => named().filter(|k| at_open.keys.contains(k)).collect(),
            // And the one after it too.
            Some(at_open) if swept.seq == at_open.seq + 1 => {
                let latest: HashSet<&str> = swept.keys.iter().map(String::as_str).collect();
                named().filter(|k| at_open.keys.contains(k) || latest.contains(k.as_str())).collect()
            }
            // Sweeps this save did not see: every object.
            _ => named().collect(),
        };
        let store = self.store.clone();
        let missing: Vec<String> = futures::stream::iter(suspects)
            .map(|k| {
                let store = store.clone();
                async move { store.modified_ms(&k).await.map(|m| (k, m.is_none())) }
            })
            .buffer_unordered(self.config.store_requests_max)
            .try_filter_map(|(k, gone)| async move { Ok(gone.then_some(k)) })
            .try_collect()
            .await?;
        Ok(match missing.first() {
            None => Ok(()),
            Some(k) => Err(format!(
                "{} objects the checkpoint names were garbage-collected while the save was in flight (first {k}); save it again",
                missing.len()
            )),
        })
    }

    /// The chunks and index objects the given committed checkpoints reference. Fails if any
    /// cannot be read: a mark must never run on an incomplete picture.
    async fn gc_referenced(
        &self,
        job: &str,
        steps: &[u64],
    ) -> Result<(HashSet<ChunkHash>, HashSet<ChunkHash>), ServiceError> {
        let mut chunks = HashSet::new();
        let mut wanted: HashMap<ChunkHash, (ckpt_core::IndexRef, u32, u32, u64)> = HashMap::new();
        for &step in steps {
            let bytes = self.manifest_bytes(job, step).await?;
            let limits = self.limits;
            let parsed = tokio::task::spawn_blocking(move || CommitObject::parse(&bytes, &limits))
                .await
                .map_err(crate::error::join_error)?
                .map_err(|e| ServiceError::CorruptManifest { job: job.into(), step, reason: e.to_string() })?;
            match parsed {
                CommitObject::V1(m) => chunks.extend(m.chunk_set()),
                CommitObject::Root(root) => {
                    for (rank, r) in root.ranks.iter().enumerate() {
                        wanted.entry(r.hash).or_insert((*r, rank as u32, root.world_size, step));
                    }
                }
            }
        }
        let indexes: HashSet<ChunkHash> = wanted.keys().copied().collect();
        let limits = self.limits;
        futures::stream::iter(wanted.into_values())
            .map(|(r, rank, world, step)| async move {
                // Its length checked against the root's before its body is read: one longer
                // than the root says is as damaged as a shorter one, and may be huge.
                let bytes = match self.store.get_index_object_sized(job, &r.hash, r.bytes).await {
                    Err(crate::store::StoreError::Size { stored, .. }) => {
                        return Err(ServiceError::CorruptManifest {
                            job: job.into(),
                            step,
                            reason: format!("index object {}: {stored} bytes, the root says {}", r.hash, r.bytes),
                        });
                    }
                    Err(crate::store::StoreError::NotFound(_)) => {
                        // GC alone deletes index objects, one run per job at a time: one a kept
                        // root names and the store lacks was lost.
                        return Err(ServiceError::CorruptManifest {
                            job: job.into(),
                            step,
                            reason: format!("index object {} of rank {rank} is missing", r.hash),
                        });
                    }
                    got => got?,
                };
                // Its size and hash checked against the root as it is parsed, off the runtime.
                let job = job.to_string();
                tokio::task::spawn_blocking(move || {
                    ckpt_core::commit::parse_index_object(&bytes, &r, rank, world, &limits)
                        .map(|index| index.chunk_hashes().collect::<Vec<_>>())
                        .map_err(|e| ServiceError::CorruptManifest {
                            job,
                            step,
                            reason: format!("index object {}: {e}", r.hash),
                        })
                })
                .await
                .map_err(crate::error::join_error)?
            })
            .buffer_unordered(self.config.store_requests_max)
            // Into the set as each list arrives: at 16,384 ranks the lists hold ~1.57 M references,
            // most of them to the same chunks.
            .try_for_each(|list| {
                chunks.extend(list);
                std::future::ready(Ok(()))
            })
            .await?;
        Ok((chunks, indexes))
    }

    /// The job's live and lapsed leases, as GC sees them.
    async fn gc_leases(&self, job: &str) -> Result<Vec<LeaseSeen>, ServiceError> {
        let mut out = Vec::new();
        for (key, _, modified) in self.store.list_meta(&keys::leases_prefix(job)).await? {
            let Some((bytes, _)) = self.store.get_record(&key).await? else { continue };
            let lease: Lease = serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&key, e))?;
            out.push(LeaseSeen {
                step: lease.step,
                opened_ms: lease.opened_store_ms.unwrap_or(modified),
                refreshed_ms: modified,
            });
        }
        Ok(out)
    }

    /// Pins or unpins a committed checkpoint: retention never deletes a pinned one.
    pub async fn pin(&self, job: &str, step: u64, pinned: bool) -> Result<(), ServiceError> {
        let key = keys::pin_key(job, step);
        if !pinned {
            // Unpinning what is not pinned is a mistake worth saying (a typo in the step).
            if self.store.get_record(&key).await?.is_none() {
                return Err(ServiceError::NotFound(format!("{job}@{step} is not pinned")));
            }
            // Durably: the unpin is answered as done, and a pin a power cut brought back would
            // keep the checkpoint from retention for good.
            return Ok(self.store.delete_durably(&key).await?);
        }
        if self.committed_summary(job, step).await?.is_none()
            && self.store.get_record(&keys::manifest_key(job, step)).await?.is_none()
        {
            return Err(ServiceError::NotFound(format!("no checkpoint {job}@{step}")));
        }
        Ok(self.store.put_record(&key, Bytes::from_static(b"{}")).await?)
    }

    async fn pinned(&self, job: &str) -> Result<BTreeSet<u64>, ServiceError> {
        Ok(self
            .store
            .list_meta(&keys::pins_prefix(job))
            .await?
            .iter()
            .filter_map(|(k, _, _)| keys::parse_pin_key(k))
            .collect())
    }

    /// One GC run over `job`: retention, the sweep of the previous run's list, a new mark.
    /// Holds the job's GC lock (not for a dry run, which changes nothing). The run is a task
    /// of its own: a caller that gives up, or whose connection drops, does not cancel it half
    /// way, which would leave the job's lock in the store until it goes stale hours later.
    pub async fn gc(self: &Arc<Self>, job: &str, dry_run: bool) -> Result<GcReport, ServiceError> {
        let (me, job) = (self.clone(), job.to_string());
        tokio::spawn(async move { me.gc_locked(&job, dry_run).await }).await.map_err(crate::error::join_error)?
    }

    #[tracing::instrument(name = "gc", skip(self), fields(job = %job, dry_run))]
    async fn gc_locked(&self, job: &str, dry_run: bool) -> Result<GcReport, ServiceError> {
        let stopping = || ServiceError::Busy(format!("ckptd is shutting down; the GC of {job} did not run to its end"));
        let _collecting = if dry_run { None } else { Some(self.start_collecting(job)?) };
        let _slot = tokio::select! {
            slot = self.permit(&self.gc.runs, self.config.retention.gc_runs_max, "GC runs on this node (gc_runs_max)") => slot?,
            _ = self.gc.stop.cancelled() => return Err(stopping()),
        };
        if self.gc.stop.is_cancelled() {
            return Err(stopping());
        }
        if dry_run {
            // Nothing to release: a dry run just ends, answered.
            return tokio::select! {
                r = self.gc_run(job, None) => r,
                _ = self.gc.stop.cancelled() => Err(stopping()),
            };
        }
        let lock = GcLock::acquire(&self.store, job, &self.node_id, self.lock_stale()).await?;
        let report = {
            let run = self.gc_run(job, Some(&lock));
            tokio::pin!(run);
            let every = lock.refresh_every();
            let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Biased: a rewrite that is due goes before the run's next step, so a run
                // woken from a stall (its store call and its rewrite both ready) learns it has
                // lost the lock from the lock itself, before the run takes another step.
                tokio::select! {
                    biased;
                    // A run stopped anywhere is what a crash leaves, which GC is built to
                    // survive; only the lock would outlive it.
                    _ = self.gc.stop.cancelled() => {
                        tracing::warn!(job, "ckptd is shutting down: the GC run stops before it ends");
                        break Err(stopping());
                    }
                    _ = refresh.tick() => {
                        // Test-only switch: a run whose rewrites never happen, so that its
                        // lease lapses while it runs and the run's own checks must stop it.
                        let skip = crate::switch_armed("gc::skip_lock_refresh");
                        if skip {
                            continue;
                        }
                        if let Err(e) = lock.refresh(&self.store).await {
                            tracing::error!(job, error = %e, "the GC run lost its lock");
                            break Err(e);
                        }
                    }
                    r = &mut run => break r,
                }
            }
        };
        lock.release(&self.store).await;
        report
    }

    /// At shutdown: stops this node's GC runs (each releases its lock as it ends) and refuses
    /// new ones.
    pub fn stop_gc_runs(&self) {
        self.gc.stop.cancel();
    }

    /// Waits, up to `wait`, until the runs `stop_gc_runs` stopped have released their locks.
    /// Returns the jobs still being collected when the wait ended (their locks are released
    /// at this node's next start).
    pub async fn gc_runs_ended(&self, wait: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left: Vec<String> =
                self.gc.collecting.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start_collecting(&self, job: &str) -> Result<Collecting, ServiceError> {
        if !self.gc.collecting.lock().unwrap_or_else(|e| e.into_inner()).insert(job.to_string()) {
            return Err(ServiceError::Conflict(format!(
                "a GC of job {job} is already running on this node; try later"
            )));
        }
        Ok(Collecting { set: self.gc.collecting.clone(), job: job.to_string() })
    }

    fn lock_stale(&self) -> Duration {
        Duration::from_secs(self.config.retention.gc_lock_stale_s)
    }

    /// One run; `lock` is `None` for a dry run. Every step that deletes or rewrites GC state
    /// first asks the lock whether this run still holds it (`GcLock::ensure`).
    async fn gc_run(&self, job: &str, lock: Option<&GcLock>) -> Result<GcReport, ServiceError> {
        let dry_run = lock.is_none();
        let fence = || lock.map_or(Ok(()), GcLock::ensure);
        // The previous list and the leases first, the roots after: a save that commits in
        // between is held by its lease or is in the listing of roots.
        let list_key = keys::condemned_key(job);
        let list = match self.store.get_record(&list_key).await? {
            Some((bytes, list_ms)) => Some((parse_record::<Condemned>(&list_key, bytes).await?, list_ms)),
            None => None,
        };
        let now = now_unix_ms();
        let decision = match &list {
            Some((_, list_ms)) => {
                let leases = self.gc_leases(job).await?;
                Some(ckpt_core::gc::sweep_allowed(*list_ms, now, self.grace_ms(), self.lease_ms(), &leases))
            }
            None => None,
        };
        let policy = self.config.retention.policy_for(job);
        let committed = self.store.list_manifest_steps(job).await?;
        let pinned = self.pinned(job).await?;
        let delete: BTreeSet<u64> = policy.to_delete(&committed, &pinned).into_iter().collect();
        let kept: Vec<u64> = committed.iter().copied().filter(|s| !delete.contains(s)).collect();
        let mut report = GcReport {
            job: job.into(),
            dry_run,
            policy,
            checkpoints_kept: kept.clone(),
            checkpoints_deleted: delete.iter().copied().collect(),
            pinned: pinned.iter().copied().collect(),
            ..GcReport::default()
        };
        // What the kept checkpoints reference before any root goes: a kept root or index object
        // that cannot be read stops the run while the checkpoints retention would retire (the
        // last good ones, perhaps) are still there.
        let (ref_chunks, ref_indexes) = self.gc_referenced(job, &kept).await?;
        if !dry_run {
            for &step in &delete {
                fence()?;
                self.remove_root(job, step, "retention").await?;
            }
        }
        let referenced = |key: &str| match keys::parse_key(key) {
            Some(ParsedKey::Chunk { hash, .. }) => ref_chunks.contains(&hash),
            Some(ParsedKey::Index { hash, .. }) => ref_indexes.contains(&hash),
            _ => true,
        };
        let mut objects = self.store.list_meta(&keys::chunks_prefix(job)).await?;
        objects.extend(self.store.list_meta(&keys::indexes_prefix(job)).await?);

        let mut list_left = false;
        let mut swept: HashSet<String> = HashSet::new();
        if let (Some((list, list_ms)), Some(decision)) = (&list, decision) {
            match decision {
                Ok(()) => {
                    let current: HashMap<&str, (u64, u64)> =
                        objects.iter().map(|(k, s, m)| (k.as_str(), (*s, *m))).collect();
                    // Still there, not rewritten since the list (a condemned chunk sent again is
                    // live), and still unreferenced; each is looked at again just before its
                    // delete.
                    let doomed: Vec<(String, u64)> = list
                        .keys
                        .iter()
                        .filter_map(|k| {
                            current.get(k.as_str()).filter(|(_, m)| m <= list_ms).map(|(s, _)| (k.clone(), *s))
                        })
                        .filter(|(k, _)| !referenced(k))
                        .collect();
                    swept = doomed.iter().map(|(k, _)| k.clone()).collect();
                    if dry_run {
                        report.swept_objects = doomed.len();
                        report.swept_bytes = doomed.iter().map(|(_, s)| s).sum();
                    } else if let Some(lock) = lock {
                        let (n, bytes) = self.sweep(job, *list_ms, doomed, lock).await?;
                        report.swept_objects = n;
                        report.swept_bytes = bytes;
                        fence()?;
                        self.store.delete_key(&list_key).await?;
                    }
                }
                Err(why) => {
                    report.sweep_deferred = Some(why);
                    list_left = true;
                }
            }
        }
        if !list_left {
            let grace = self.grace_ms();
            let condemned: Vec<(String, u64)> = objects
                .iter()
                .filter(|(k, _, m)| m.saturating_add(grace) <= now && !referenced(k) && !swept.contains(k))
                .map(|(k, s, _)| (k.clone(), *s))
                .collect();
            report.condemned_objects = condemned.len();
            report.condemned_bytes = condemned.iter().map(|(_, s)| s).sum();
            if !dry_run && !condemned.is_empty() {
                let list = Condemned {
                    format: CONDEMNED_FORMAT.into(),
                    job: job.into(),
                    marked_unix_ms: now,
                    bytes: report.condemned_bytes,
                    keys: condemned.into_iter().map(|(k, _)| k).collect(),
                };
                let body = serde_json::to_vec(&list).map_err(|e| ServiceError::Internal(e.to_string()))?;
                fence()?;
                self.store.put_record(&list_key, Bytes::from(body)).await?;
            }
        }
        // Saves in flight here read the list when they opened; the new one applies to them
        // too from now on (on other nodes, from their next save).
        if !dry_run && self.saves.lock().unwrap_or_else(|e| e.into_inner()).keys().any(|(j, _)| j == job) {
            self.gc_refresh_view(job).await?;
        }
        report.stale_local_files = self.gc_local_files(dry_run).await?;
        if let Some(root) = self.store.local_root() {
            fence()?;
            report.stale_local_files += self.gc_store_leftovers(root.to_path_buf(), job, &objects, dry_run).await?;
        }
        report.parts_removed = self.gc_parts(job, &committed, now, lock).await?;
        tracing::info!(job, dry_run, ?report, "gc");
        Ok(report)
    }

    /// Records the sweep (its keys, for the commit check and other nodes' chunk records), then
    /// deletes each key unless it was written again since the list. Returns what it deleted.
    async fn sweep(
        &self,
        job: &str,
        list_ms: u64,
        doomed: Vec<(String, u64)>,
        lock: &GcLock,
    ) -> Result<(usize, u64), ServiceError> {
        if doomed.is_empty() {
            return Ok((0, 0));
        }
        let key = keys::swept_key(job);
        let seq = match self.store.get_record(&key).await? {
            Some((bytes, _)) => parse_record::<Swept>(&key, bytes).await?.seq,
            None => 0,
        } + 1;
        let swept = Swept {
            format: SWEPT_FORMAT.into(),
            job: job.into(),
            seq,
            list_store_ms: list_ms,
            keys: doomed.iter().map(|(k, _)| k.clone()).collect(),
            done: false,
        };
        let body = serde_json::to_vec(&swept).map_err(|e| ServiceError::Internal(e.to_string()))?;
        lock.ensure()?;
        self.store.put_record(&key, Bytes::from(body)).await?;
        let store = &self.store;
        let deleted: Vec<Option<u64>> = futures::stream::iter(doomed)
            .map(|(k, size)| async move {
                lock.ensure()?;
                match store.modified_ms(&k).await? {
                    Some(m) if m <= list_ms => {
                        lock.ensure()?;
                        store.delete_key(&k).await.map(|()| Some(size)).map_err(ServiceError::from)
                    }
                    _ => Ok(None),
                }
            })
            .buffer_unordered(self.config.store_requests_max)
            .try_collect()
            .await?;
        // The removals are reported as done: on a local store they are made durable together.
        self.sync_local_store().await?;
        let swept = Swept { done: true, ..swept };
        let body = serde_json::to_vec(&swept).map_err(|e| ServiceError::Internal(e.to_string()))?;
        lock.ensure()?;
        self.store.put_record(&key, Bytes::from(body)).await?;
        self.apply_sweep(job, &swept).await?;
        let sizes: Vec<u64> = deleted.into_iter().flatten().collect();
        tracing::info!(job, seq, objects = sizes.len(), "gc sweep deleted unreferenced objects");
        Ok((sizes.len(), sizes.iter().sum()))
    }

    /// Temporary files a crash left in the local store at `root`, older than the grace period (younger
    /// ones may be writes in progress): ckptd's own beside chunks (`durable::temp_path`, which
    /// the listing `objects` shows) and object_store's staged puts (`<key>#<n>`) beside index
    /// objects, roots and records, which its listings hide, so the job's directories other
    /// than `chunks/` (the large one, whose puts are ckptd's own) are walked. Never objects:
    /// nothing references them.
    async fn gc_store_leftovers(
        &self,
        root: std::path::PathBuf,
        job: &str,
        objects: &[(String, u64, u64)],
        dry_run: bool,
    ) -> Result<usize, ServiceError> {
        let grace = Duration::from_millis(self.grace_ms());
        let mut found: Vec<std::path::PathBuf> = objects
            .iter()
            .filter(|(k, _, _)| k.rsplit('/').next().is_some_and(crate::durable::is_temp_name))
            .map(|(k, _, _)| root.join(k))
            .collect();
        let job_dir = root.join(keys::JOBS_PREFIX).join(job);
        let n = tokio::task::spawn_blocking(move || {
            let mut dirs = vec![job_dir.clone()];
            while let Some(dir) = dirs.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                for e in rd.flatten() {
                    let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                    if is_dir && !(dir == job_dir && e.file_name() == "chunks") {
                        dirs.push(e.path());
                    } else if !is_dir && crate::store::is_staged_put_name(&e.file_name().to_string_lossy()) {
                        found.push(e.path());
                    }
                }
            }
            remove_stale(found, grace, dry_run)
        })
        .await
        .map_err(crate::error::join_error)?;
        Ok(n)
    }

    /// Handoff files and temporary spill files older than the grace period: what clients or
    /// uploads that died left behind on this node.
    async fn gc_local_files(&self, dry_run: bool) -> Result<usize, ServiceError> {
        let grace = Duration::from_millis(self.grace_ms());
        let (handoff, spill) = (self.handoff_dir.clone(), self.config.spill_dir());
        let n = tokio::task::spawn_blocking(move || {
            let mut candidates: Vec<std::path::PathBuf> = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&handoff) {
                candidates.extend(rd.flatten().map(|e| e.path()));
            }
            // Each tenant's handoff directory too (`remove_stale` takes regular files only, never
            // through a link).
            if let Ok(tenants) = std::fs::read_dir(handoff.join("tenants")) {
                for dir in tenants.flatten().filter(|d| d.file_type().is_ok_and(|t| t.is_dir())) {
                    if let Ok(rd) = std::fs::read_dir(dir.path()) {
                        candidates.extend(rd.flatten().map(|e| e.path()));
                    }
                }
            }
            if let Ok(jobs) = std::fs::read_dir(&spill) {
                for dir in jobs.flatten() {
                    if let Ok(rd) = std::fs::read_dir(dir.path()) {
                        candidates.extend(
                            rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()),
                        );
                    }
                }
            }
            remove_stale(candidates, grace, dry_run)
        })
        .await
        .map_err(crate::error::join_error)?;
        Ok(n)
    }

    /// GC over every job in the store, one after another. A job whose run fails (its lock held
    /// elsewhere, a record that does not parse, a store error on its objects) is reported and
    /// the next job runs: one bad job must not keep garbage in every job listed after it. A
    /// store that stops answering ends the round, since every job after it would fail the same
    /// way after its retries, and so does ckptd shutting down; the jobs not reached are named.
    pub async fn gc_all(self: &Arc<Self>, dry_run: bool) -> Result<GcAllReport, ServiceError> {
        let jobs = self.store.list_jobs().await?;
        let mut out = GcAllReport::default();
        for (i, job) in jobs.iter().enumerate() {
            if self.gc.stop.is_cancelled() {
                out.not_run = jobs[i..].to_vec();
                break;
            }
            match self.gc(job, dry_run).await {
                Ok(report) => out.jobs.push(report),
                Err(e) => {
                    tracing::warn!(job = %job, error = %e, "GC of this job failed; going on with the next");
                    let transient = matches!(&e, ServiceError::Store(s) if !s.is_permanent());
                    out.failed.push(GcFailure { job: job.clone(), code: e.code(), message: e.to_string() });
                    // Retries ran out: on this job's objects only (one prefix failing), or on
                    // the store itself? The readiness probe's listing tells them apart.
                    if transient {
                        if let Err(p) = self.store.probe().await {
                            tracing::warn!(error = %p, "the store does not answer; the GC round ends here");
                            out.not_run = jobs[i + 1..].to_vec();
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Parses a store record (GC list, lease, sweep record, split-save decision) off the async
/// runtime (lists can be large).
pub(crate) async fn parse_record<T: serde::de::DeserializeOwned + Send + 'static>(
    key: &str,
    bytes: Bytes,
) -> Result<T, ServiceError> {
    let k = key.to_string();
    tokio::task::spawn_blocking(move || serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&k, e)))
        .await
        .map_err(crate::error::join_error)?
}

/// Of `paths`, the regular files (never through a link) last modified at least `grace` ago,
/// removed unless `dry_run`: how many. Blocking.
fn remove_stale(mut paths: Vec<std::path::PathBuf>, grace: Duration, dry_run: bool) -> usize {
    paths.retain(|p| {
        std::fs::symlink_metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= grace)
    });
    if !dry_run {
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
    }
    paths.len()
}
