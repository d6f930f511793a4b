//! Retention and garbage collection on ckptd's side: save leases, the condemned view that
//! `missing` answers consult, the commit-time backstop, and GC runs.
//!
//! Design note. The protocol, and why it is safe with any number of ckptd nodes on one store,
//! is in `ckpt_core::gc`. Here:
//! * A save's lease is written (and its store time read back) when the save's slot is created,
//!   before the open is answered, and refreshed by the maintenance task every third of
//!   `lease_s`; it is deleted when the save leaves the in-flight set. A save restored from the
//!   journal gets a lease at the next maintenance tick.
//! * The condemned view of a job is read from the store when one of its saves opens on this
//!   node; from then on `lookup` answers "missing" for condemned chunks (except for the index
//!   put's own check, which a save that opened before the list needs, and which the sweep
//!   waits for through the lease).
//! * One GC run at a time per node (a lock); runs on several nodes at once are harmless but
//!   wasteful (the deploy files run one).
//! * Memory: a run holds the job's chunk and index-object listings and the referenced set, a
//!   few hundred bytes per object: about a gigabyte for ten million objects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
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

#[derive(Default)]
pub(crate) struct GcState {
    /// Condemned chunks per job, as last read from the store.
    views: Mutex<HashMap<String, HashSet<ChunkHash>>>,
    /// Leases this node holds: the store's time of their first write, and when last refreshed.
    leases: Mutex<HashMap<SaveKey, (u64, Instant)>>,
    run: tokio::sync::Mutex<()>,
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
    /// Handoff and spill files older than the grace period, removed.
    pub stale_local_files: usize,
}

fn corrupt_record(key: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(format!("GC record {key} is unreadable: {e}"))
}

impl Coordinator {
    fn grace_ms(&self) -> u64 {
        self.config.retention.gc_grace_s.saturating_mul(1000)
    }

    fn lease_ms(&self) -> u64 {
        self.config.retention.lease_s.saturating_mul(1000)
    }

    /// Whether `hash` is condemned in this node's view of `job`.
    pub(crate) fn gc_condemned(&self, job: &str, hash: &ChunkHash) -> bool {
        self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).get(job).is_some_and(|v| v.contains(hash))
    }

    /// A condemned chunk written again (sent by a client told it was missing) is live: its new
    /// modification time keeps it from the sweep, so it no longer needs resending.
    pub(crate) fn gc_rewritten(&self, job: &str, hash: &ChunkHash) {
        if let Some(v) = self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).get_mut(job) {
            v.remove(hash);
        }
    }

    /// Reads the job's condemned list and last sweep from the store: the first becomes the
    /// view `lookup` consults, the second is applied to the chunk records.
    pub(crate) async fn gc_refresh_view(&self, job: &str) -> Result<(), ServiceError> {
        let key = keys::condemned_key(job);
        let view: HashSet<ChunkHash> = match self.store.get_record(&key).await? {
            Some((bytes, _)) => {
                let list: Condemned = serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&key, e))?;
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
        self.gc.views.lock().unwrap_or_else(|e| e.into_inner()).insert(job.to_string(), view);
        let key = keys::swept_key(job);
        if let Some((bytes, _)) = self.store.get_record(&key).await? {
            let swept: Swept = serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&key, e))?;
            self.apply_sweep(job, &swept).await?;
        }
        Ok(())
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

    /// Writes the lease of a save that just opened on this node and reads its store time back.
    pub(crate) async fn lease_open(&self, job: &str, step: u64) -> Result<(), ServiceError> {
        let key = keys::lease_key(job, step, &self.node_id);
        self.store.put_record(&key, self.lease_body(job, step, None)?).await?;
        let opened = self.store.modified_ms(&key).await?.unwrap_or_else(now_unix_ms);
        self.gc
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((job.to_string(), step), (opened, Instant::now()));
        Ok(())
    }

    /// Forgets the lease of a save that left the in-flight set and deletes it in the background
    /// (a lease left behind only lapses).
    pub(crate) fn lease_close(&self, job: &str, step: u64) {
        if self.gc.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&(job.to_string(), step)).is_some() {
            let (store, key) = (self.store.clone(), keys::lease_key(job, step, &self.node_id));
            tokio::spawn(async move {
                if let Err(e) = store.delete_key(&key).await {
                    tracing::warn!(key, error = %e, "cannot delete a save lease; it will lapse");
                }
            });
        }
    }

    /// Maintenance: a lease for every save in flight, refreshed every third of `lease_s`.
    pub(crate) async fn lease_refresh_all(&self) {
        let tracked: Vec<SaveKey> = self.saves.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let every = Duration::from_millis(self.lease_ms() / 3);
        for (job, step) in tracked {
            let held = self.gc.leases.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.clone(), step)).copied();
            let result = match held {
                None => self.lease_open(&job, step).await,
                Some((opened, at)) if at.elapsed() >= every => {
                    let key = keys::lease_key(&job, step, &self.node_id);
                    match self.lease_body(&job, step, Some(opened)) {
                        Ok(body) => self.store.put_record(&key, body).await.map_err(ServiceError::from).map(|()| {
                            self.gc
                                .leases
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert((job.clone(), step), (opened, Instant::now()));
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

    /// The commit-time backstop: if a sweep deleted anything since this save opened on this
    /// node, every index object and chunk the root names must still exist. Err names the first
    /// missing one.
    pub(crate) async fn gc_backstop(
        &self,
        job: &str,
        step: u64,
        index_objects: Vec<ChunkHash>,
        chunks: Vec<ChunkHash>,
    ) -> Result<Result<(), String>, ServiceError> {
        let key = keys::swept_key(job);
        let Some((bytes, _)) = self.store.get_record(&key).await? else { return Ok(Ok(())) };
        let swept: Swept = serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&key, e))?;
        let opened =
            self.gc.leases.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), step)).map(|l| l.0);
        if opened.is_some_and(|o| o > swept.list_store_ms) {
            return Ok(Ok(()));
        }
        self.apply_sweep(job, &swept).await?;
        let wanted: Vec<String> = index_objects
            .iter()
            .map(|h| keys::index_key(job, h))
            .chain(chunks.iter().collect::<BTreeSet<_>>().into_iter().map(|h| keys::chunk_key(job, h)))
            .collect();
        let store = self.store.clone();
        let missing: Vec<String> = futures::stream::iter(wanted)
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
        let mut wanted: HashMap<ChunkHash, (ckpt_core::IndexRef, u32, u32)> = HashMap::new();
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
                        wanted.entry(r.hash).or_insert((*r, rank as u32, root.world_size));
                    }
                }
            }
        }
        let indexes: HashSet<ChunkHash> = wanted.keys().copied().collect();
        let limits = self.limits;
        let lists: Vec<Vec<ChunkHash>> = futures::stream::iter(wanted.into_values())
            .map(|(r, rank, world)| async move {
                let bytes = self.index_object_bytes(job, r.hash).await?;
                let index = ckpt_core::commit::parse_index_object(&bytes, &r, rank, world, &limits)
                    .map_err(|e| ServiceError::Internal(format!("index object {} of {job}: {e}", r.hash)))?;
                Ok::<_, ServiceError>(index.chunk_hashes().collect())
            })
            .buffer_unordered(self.config.store_requests_max)
            .try_collect()
            .await?;
        chunks.extend(lists.into_iter().flatten());
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
            return Ok(self.store.delete_key(&key).await?);
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
    #[tracing::instrument(name = "gc", skip(self), fields(job = %job, dry_run))]
    pub async fn gc(&self, job: &str, dry_run: bool) -> Result<GcReport, ServiceError> {
        let _one = self.gc.run.lock().await;
        let policy = self.config.retention.policy_for(job);
        let committed = self.store.list_manifest_steps(job).await?;
        let pinned = self.pinned(job).await?;
        let delete = policy.to_delete(&committed, &pinned);
        let kept: Vec<u64> = committed.iter().copied().filter(|s| !delete.contains(s)).collect();
        let mut report = GcReport {
            job: job.into(),
            dry_run,
            policy,
            checkpoints_kept: kept.clone(),
            checkpoints_deleted: delete.clone(),
            pinned: pinned.iter().copied().collect(),
            ..GcReport::default()
        };
        if !dry_run {
            for &step in &delete {
                self.remove_root(job, step, "retention").await?;
            }
        }
        let (ref_chunks, ref_indexes) = self.gc_referenced(job, &kept).await?;
        let referenced = |key: &str| match keys::parse_key(key) {
            Some(ParsedKey::Chunk { hash, .. }) => ref_chunks.contains(&hash),
            Some(ParsedKey::Index { hash, .. }) => ref_indexes.contains(&hash),
            _ => true,
        };
        let mut objects = self.store.list_meta(&keys::chunks_prefix(job)).await?;
        objects.extend(self.store.list_meta(&keys::indexes_prefix(job)).await?);
        let now = now_unix_ms();

        let list_key = keys::condemned_key(job);
        let mut list_left = false;
        let mut swept: HashSet<String> = HashSet::new();
        if let Some((bytes, list_ms)) = self.store.get_record(&list_key).await? {
            let list: Condemned = serde_json::from_slice(&bytes).map_err(|e| corrupt_record(&list_key, e))?;
            let leases = self.gc_leases(job).await?;
            match ckpt_core::gc::sweep_allowed(list_ms, now, self.grace_ms(), self.lease_ms(), &leases) {
                Ok(()) => {
                    let current: HashMap<&str, (u64, u64)> =
                        objects.iter().map(|(k, s, m)| (k.as_str(), (*s, *m))).collect();
                    // Still there, not rewritten since the list (a condemned chunk sent again is
                    // live), and still unreferenced.
                    let doomed: Vec<(String, u64)> = list
                        .keys
                        .iter()
                        .filter_map(|k| {
                            current.get(k.as_str()).filter(|(_, m)| *m <= list_ms).map(|(s, _)| (k.clone(), *s))
                        })
                        .filter(|(k, _)| !referenced(k))
                        .collect();
                    report.swept_objects = doomed.len();
                    report.swept_bytes = doomed.iter().map(|(_, s)| s).sum();
                    swept = doomed.iter().map(|(k, _)| k.clone()).collect();
                    if !dry_run {
                        self.sweep(job, list_ms, doomed.into_iter().map(|(k, _)| k).collect()).await?;
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
                self.store.put_record(&list_key, Bytes::from(body)).await?;
            }
        }
        // Saves in flight here read the list when they opened; the new one applies to them
        // too from now on (on other nodes, from their next save).
        if !dry_run && self.saves.lock().unwrap_or_else(|e| e.into_inner()).keys().any(|(j, _)| j == job) {
            self.gc_refresh_view(job).await?;
        }
        report.stale_local_files = self.gc_local_files(dry_run).await?;
        tracing::info!(job, dry_run, ?report, "gc");
        Ok(report)
    }

    /// Records the sweep, then deletes: a commit that checks `swept.json` after this point
    /// knows to look for holes.
    async fn sweep(&self, job: &str, list_ms: u64, doomed: Vec<String>) -> Result<(), ServiceError> {
        if doomed.is_empty() {
            return Ok(());
        }
        let key = keys::swept_key(job);
        let seq = match self.store.get_record(&key).await? {
            Some((bytes, _)) => serde_json::from_slice::<Swept>(&bytes).map_err(|e| corrupt_record(&key, e))?.seq,
            None => 0,
        } + 1;
        let swept =
            Swept { format: SWEPT_FORMAT.into(), job: job.into(), seq, list_store_ms: list_ms, keys: doomed.clone() };
        let body = serde_json::to_vec(&swept).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.store.put_record(&key, Bytes::from(body)).await?;
        let store = self.store.clone();
        futures::stream::iter(doomed)
            .map(|k| {
                let store = store.clone();
                async move { store.delete_key(&k).await }
            })
            .buffer_unordered(self.config.store_requests_max)
            .try_collect::<Vec<()>>()
            .await?;
        self.apply_sweep(job, &swept).await?;
        tracing::info!(job, seq, objects = swept.keys.len(), "gc sweep deleted unreferenced objects");
        Ok(())
    }

    /// Handoff files and temporary spill files older than the grace period: what clients or
    /// uploads that died left behind on this node.
    async fn gc_local_files(&self, dry_run: bool) -> Result<usize, ServiceError> {
        let grace = Duration::from_millis(self.grace_ms());
        let (handoff, spill) = (self.handoff_dir.clone(), self.config.spill_dir());
        let n = tokio::task::spawn_blocking(move || {
            let old = |p: &std::path::Path| {
                std::fs::symlink_metadata(p)
                    .ok()
                    .filter(|m| m.is_file())
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= grace)
            };
            let mut stale: Vec<std::path::PathBuf> = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&handoff) {
                stale.extend(rd.flatten().map(|e| e.path()).filter(|p| old(p)));
            }
            if let Ok(jobs) = std::fs::read_dir(&spill) {
                for dir in jobs.flatten() {
                    if let Ok(rd) = std::fs::read_dir(dir.path()) {
                        stale.extend(
                            rd.flatten()
                                .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                                .map(|e| e.path())
                                .filter(|p| old(p)),
                        );
                    }
                }
            }
            if !dry_run {
                for p in &stale {
                    let _ = std::fs::remove_file(p);
                }
            }
            stale.len()
        })
        .await
        .map_err(crate::error::join_error)?;
        Ok(n)
    }

    /// GC over every job in the store.
    pub async fn gc_all(&self, dry_run: bool) -> Result<Vec<GcReport>, ServiceError> {
        let mut out = Vec::new();
        for job in self.store.list_jobs().await? {
            out.push(self.gc(&job, dry_run).await?);
        }
        Ok(out)
    }
}
