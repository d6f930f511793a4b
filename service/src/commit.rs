//! The commit protocol: a save from open to committed.
//!
//! ```text
//! open ── index per rank (chunks staged or durable, lengths match) ──▶ staged
//!      ── every chunk durable, every rank's index object written ──▶ durable
//!      ── root created with a create-only put ──▶ committed
//! ```
//!
//! Design note.
//! * Commit object: a small root naming one content-addressed index object per rank
//!   (ckpt-core `commit.rs`). A rank's index object is written once every chunk it lists is
//!   durable — at its index put when they already are (the node-local path), when the last of
//!   them lands (upload events), or at commit for any left — and never on staged chunks. Every
//!   index object is in the store before the root is created; the root's create-only put is
//!   the single commit point.
//! * Determinism: the root's bytes depend only on the ranks' indexes and on the creation time
//!   and previous committed step fixed and journalled at open. "Already exists" is answered by
//!   reading the root back: same bytes mean this save is committed (a retry after a lost
//!   acknowledgement, or another ckptd committing the same save); different bytes mean another
//!   writer won, and this save is aborted with a conflict.
//! * Journal: at open the save's fields, at each index put that rank's index (O(1) per put),
//!   at each phase change the fields again; each is flushed (group commit, see `index.rs`)
//!   before the request is acked, so an acked index survives a crash of ckptd (not an index
//!   sled cannot read, which start-up sets aside: see `Config::on_damaged_index`). A committed
//!   save's entry goes with its commit record; its ranks' entries after the answer (16,384 of
//!   them took up to a second to remove), behind a per-key gate (`Coordinator::retiring`)
//!   that a save opened afresh under the same key waits at; a crash in between leaves orphan
//!   ranks that start-up clears.
//! * Validation: an index is accepted only if every chunk it names is staged or durable with
//!   the raw length the index states; an index for a committed step is accepted only if it is
//!   the committed one (else 409); per save and over all saves the chunk references held are
//!   bounded (`save_chunk_refs_max`, `in_flight_chunk_refs_max`).
//! * Retries and cancellation: store calls retry transient errors inside `Store`. A root
//!   create that still fails leaves the save ready; the maintenance task retries it every
//!   `commit_retry_ms`. A save that makes no progress for `save_idle_abort_ms` is aborted.
//! * Crash consistency: chunks are put before they are recorded; index objects before the
//!   root; the root last. At any crash point the store holds either no root for the step or a
//!   complete checkpoint. `recovery.rs` finishes or reports journalled saves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::commit::index_object;
use ckpt_core::keys;
use ckpt_core::{ChunkHash, CommitObject, ManifestSummary, Root, SavePhase, SaveState, ShardIndex};
use futures::StreamExt;

use crate::coordinator::{
    now_unix_ms, Coordinator, InFlight, OpenSave, RetiringGates, SaveKey, SaveStatus, Slot, SlotRef,
};
use crate::error::ServiceError;
use crate::intake::Known;
use crate::store::StoreError;

impl Coordinator {
    /// The committed commit object of a step, from the index's copy.
    pub(crate) async fn committed_object(&self, job: &str, step: u64) -> Result<Option<CommitObject>, ServiceError> {
        let j = job.to_string();
        let Some(bytes) = self.blocking(move |i| i.get_manifest(&j, step)).await? else {
            return Ok(None);
        };
        let limits = self.limits;
        let parsed = tokio::task::spawn_blocking(move || CommitObject::parse(&bytes, &limits))
            .await
            .map_err(crate::error::join_error)?;
        parsed.map(Some).map_err(|e| ServiceError::CorruptManifest { job: job.into(), step, reason: e.to_string() })
    }

    pub(crate) async fn committed_summary(
        &self,
        job: &str,
        step: u64,
    ) -> Result<Option<ManifestSummary>, ServiceError> {
        let key = (job.to_string(), step);
        if let Some(s) = self.summaries.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Some(s.clone()));
        }
        let Some(summary) = self.committed_object(job, step).await?.map(|c| c.summary()) else { return Ok(None) };
        let mut cache = self.summaries.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= crate::coordinator::SUMMARIES_KEPT {
            cache.clear();
        }
        cache.insert(key, summary.clone());
        Ok(Some(summary))
    }

    /// The job's generation fence (0 when none was set).
    async fn fence_of(&self, job: &str) -> Result<u64, ServiceError> {
        let clears = {
            let cache = self.fences.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = cache.by_job.get(job) {
                return Ok(*f);
            }
            cache.clears
        };
        let read = || {
            let j = job.to_string();
            self.blocking(move |i| i.fence(&j))
        };
        let f = read().await?.unwrap_or(0);
        if let Some(kept) = self.cache_fence(job, f, Some(clears)) {
            return Ok(kept);
        }
        // The cache was cleared while the index was read: a raise acked meanwhile may have been
        // cached and dropped. A second read, begun after the clear, sees it.
        Ok(f.max(read().await?.unwrap_or(0)))
    }

    /// Caches a fence read (`read_since`: the cache's clears when the read began) or raised,
    /// and returns the fence to apply. Never below what the cache holds, so a read that began
    /// before a raise cannot put the old fence back; nor cached at all when the cache was
    /// cleared since the read began (the raise it missed may have been cached, then cleared):
    /// then `None`. Bounded like the summaries: cleared when full (the index answers a miss).
    fn cache_fence(&self, job: &str, fence: u64, read_since: Option<u64>) -> Option<u64> {
        let mut cache = self.fences.lock().unwrap_or_else(|p| p.into_inner());
        if read_since.is_some_and(|n| n != cache.clears) {
            return None;
        }
        if cache.by_job.len() >= crate::coordinator::FENCES_KEPT && !cache.by_job.contains_key(job) {
            cache.by_job.clear();
            cache.clears += 1;
        }
        let kept = cache.by_job.entry(job.to_string()).or_insert(fence);
        *kept = (*kept).max(fence);
        Some(*kept)
    }

    /// Records `fence` in the store, where an index rebuilt from the store (or another node
    /// starting) finds it again, and removes the job's lower fence keys: one per restart of
    /// the job would otherwise pile up. A removal that fails is left to the next raise.
    pub(crate) async fn record_fence(&self, job: &str, fence: u64) -> Result<(), ServiceError> {
        if fence == 0 {
            // Refuses no one; nothing to keep.
            return Ok(());
        }
        let body = serde_json::to_vec(&serde_json::json!({ "job": job, "epoch": fence }))
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        match self.store.create_record(&keys::fence_key(job, fence), Bytes::from(body)).await {
            Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        for (key, _) in self.fence_records(job).await?.into_iter().filter(|(_, e)| *e < fence) {
            if let Err(e) = self.store.delete_key(&key).await {
                tracing::warn!(job, key, error = %e, "cannot remove a lower fence record");
            }
        }
        Ok(())
    }

    /// The highest fence recorded in the store for `job`, if any.
    pub(crate) async fn stored_fence(&self, job: &str) -> Result<Option<u64>, ServiceError> {
        Ok(self.fence_records(job).await?.into_iter().map(|(_, e)| e).max())
    }

    /// The job's fence records in the store: each key with the epoch it names.
    async fn fence_records(&self, job: &str) -> Result<Vec<(String, u64)>, ServiceError> {
        let listed = self.store.list_meta(&keys::fences_prefix(job)).await?;
        Ok(listed.into_iter().filter_map(|(key, _, _)| keys::parse_fence_key(&key).map(|e| (key, e))).collect())
    }

    /// Refuses a writer whose generation the job has been fenced past. Writers that name no
    /// generation are not fenced (plain clients, tools).
    pub async fn check_fence(&self, job: &str, epoch: Option<u64>) -> Result<(), ServiceError> {
        let Some(epoch) = epoch else { return Ok(()) };
        let fence = self.fence_of(job).await?;
        if epoch < fence {
            return Err(ServiceError::Fenced { job: job.into(), epoch, fence });
        }
        Ok(())
    }

    /// Raises the job's fence to `epoch` (never lowers it), journalled and recorded in the
    /// store before the answer, and aborts the saves in flight so none of them commits a
    /// replaced generation's indexes.
    pub async fn raise_fence(&self, job: &str, epoch: u64) -> Result<u64, ServiceError> {
        let current = self.fence_of(job).await?;
        let fence = if epoch > current {
            let j = job.to_string();
            // The index keeps the higher of two raises at once; that is the fence from now on.
            self.blocking(move |i| i.raise_fence(&j, epoch)).await?
        } else {
            current
        };
        // Enforced at once: refusing a replaced generation before the raise is durable is safe,
        // and a raise that fails below must not leave the old fence cached.
        if fence > current {
            self.cache_fence(job, fence, None);
        }
        // Also when the fence was already there: the raise that put it may have failed before
        // its flush, and this answer promises it is journalled.
        self.index.flush().await?;
        if fence > current {
            tracing::info!(job, epoch = fence, "job fenced: writers of earlier generations are refused");
        }
        // Every raise, a repeated one too (the first may have stopped before its aborts), ends
        // the saves of replaced generations: those an earlier generation opened or fed. A
        // save only the fence's own generation touched stays; so, at a repeated raise, does
        // one that names no generation (opened by a plain client, or restored from the
        // journal, which keeps no generation), which the first raise ended if it was there.
        let repeated = fence <= current;
        let reason = format!("fenced at generation {fence}");
        for ((_, step), slot) in self.slots_of(job) {
            let mut g = slot.lock().await;
            // Checked under the lock it is aborted under: it may have committed or been aborted
            // meanwhile, or the step may be a new save by now (a new generation's).
            let same = self.save_slot(job, step).is_some_and(|now| Arc::ptr_eq(&now, &slot));
            let replaced = match g.epoch {
                Some(e) => e < fence,
                None => !repeated,
            };
            if !same || g.state.phase.is_final() || !replaced {
                continue;
            }
            if !self.abort_unless_decided(&mut g, reason.clone()).await? {
                tracing::debug!(job, step, "save not aborted at the fence: decided for commit on another node");
            }
        }
        // Last, so a store that refuses it fails the answer after the aborts, not before them
        // (a retry is a repeated raise, which spares saves that name no generation).
        self.record_fence(job, fence).await?;
        Ok(fence)
    }

    /// Aborts `g`'s save and journals it, unless another node has decided it for commit
    /// (then false, and nothing changes).
    async fn abort_unless_decided(&self, g: &mut Slot, reason: String) -> Result<bool, ServiceError> {
        if !self.may_abort(&g.state).await? {
            return Ok(false);
        }
        g.state.abort(reason)?;
        self.retire_aborted(&g.state).await?;
        Ok(true)
    }

    #[tracing::instrument(name = "save.open", skip(self, req), fields(job = %job, step = step))]
    pub async fn open_save(&self, job: &str, step: u64, req: OpenSave) -> Result<SaveStatus, ServiceError> {
        self.check_fence(job, req.epoch).await?;
        if let Some(m) = self.committed_summary(job, step).await? {
            if m.world_size != req.world_size {
                return Err(ServiceError::Conflict(format!(
                    "{job}@{step} is committed with world size {}, not {}",
                    m.world_size, req.world_size
                )));
            }
            return Ok(SaveStatus::committed(&m));
        }
        let part = match req.node_ranks {
            Some([first, end]) if (first, end) != (0, req.world_size) => {
                let Some(epoch) = req.epoch else {
                    return Err(ServiceError::BadRequest(
                        "a save split over nodes (node_ranks) needs the writers' epoch: it names the save's parts"
                            .into(),
                    ));
                };
                let p = ckpt_core::PartOf { first, end, epoch };
                p.check(req.world_size).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
                Some(p)
            }
            _ => None,
        };
        let (slot, created) = match self.save_slot(job, step) {
            Some(s) => (s, false),
            None => {
                // A committed (and since deleted) save of this key may still have ranks
                // journalled: they go before a slot exists, so a `Busy` here leaves none behind
                // for a retry or another rank to journal into unwaited.
                self.wait_retired(job, step).await?;
                if let Some(p) = part {
                    if self.decided(job, step, p.epoch).await? == Some(ckpt_core::part::Decision::Abort) {
                        return Err(ServiceError::Conflict(format!(
                            "{job}@{step} was aborted in epoch {} on some node; retry the step with a new epoch",
                            p.epoch
                        )));
                    }
                }
                let j = job.to_string();
                let previous = self.blocking(move |i| i.committed_before(&j, step)).await?;
                let created_ms = req.created_unix_ms.unwrap_or_else(now_unix_ms);
                let state = SaveState::open(
                    job,
                    step,
                    req.world_size,
                    created_ms,
                    previous,
                    req.metadata.clone(),
                    &self.limits,
                )?;
                let state = match part {
                    Some(p) => state.split(p)?,
                    None => state,
                };
                let mut saves = self.saves.lock().unwrap_or_else(|e| e.into_inner());
                // Another open of the same save may have raced past the lookup above.
                if let Some(s) = saves.get(&(job.to_string(), step)) {
                    (s.clone(), false)
                } else {
                    if saves.len() >= self.config.saves_in_flight_max {
                        return Err(ServiceError::Busy(format!(
                            "{} saves in flight, the configured maximum",
                            saves.len()
                        )));
                    }
                    let slot = Arc::new(tokio::sync::Mutex::new(Slot::new(state)));
                    saves.insert((job.to_string(), step), slot.clone());
                    (slot, true)
                }
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
        let before = (g.state.metadata.clone(), g.state.part);
        g.state.reopen(req.world_size, req.metadata, part)?;
        g.note_epoch(req.epoch);
        // Opening again is not progress: a client re-opening a save it never feeds would
        // otherwise keep it, and its slot, from the idle abort for ever.
        if created {
            g.last_progress = Instant::now();
        }
        if created || !g.journalled || (&g.state.metadata, g.state.part) != (&before.0, before.1) {
            // A save opened afresh may reuse the key of an aborted one: its ranks go first.
            let fresh = created;
            let (job_s, header) = (job.to_string(), g.state.clone_fields());
            self.blocking(move |i| {
                if fresh {
                    i.remove_save(&job_s, step)?;
                }
                i.put_save(&header)
            })
            .await?;
            self.index.flush().await?;
            g.journalled = true;
        }
        // Before any answer: GC on any node must see this save in flight, and this save's
        // `missing` answers must honour the job's condemned list (`gc.rs`).
        self.gc_open(job, step, created).await?;
        Ok(SaveStatus::of(&g.state))
    }

    /// Journals the save's fields (not its ranks'); flushed before returning.
    async fn journal(&self, state: &SaveState) -> Result<(), ServiceError> {
        let header = state.clone_fields();
        self.blocking(move |i| i.put_save(&header)).await?;
        self.index.flush().await?;
        Ok(())
    }

    /// Accepts one rank's index. The save's lock is held only for the in-memory update and the
    /// journal write; the chunk lookups come before it and the journal sync after it, so
    /// thousands of ranks' puts proceed together and share syncs (see the design note).
    #[tracing::instrument(name = "save.index", skip(self, index), fields(job = %job, step = step, rank = index.rank))]
    pub async fn put_shard_index(
        &self,
        job: &str,
        step: u64,
        index: ShardIndex,
        epoch: Option<u64>,
    ) -> Result<SaveStatus, ServiceError> {
        if let Some(committed) = self.committed_object(job, step).await? {
            return self.compare_with_committed(&committed, &index);
        }
        let slot = self
            .save_slot(job, step)
            .ok_or_else(|| ServiceError::NotFound(format!("no save {job}@{step} is open; open it first")))?;
        let rank = index.rank;
        let (world_size, retry) = {
            let g = slot.lock().await;
            (g.state.world_size, g.state.ranks.get(&rank) == Some(&index))
        };
        if retry {
            // A retry of an accepted index: nothing to check or journal again, but the answer
            // must not precede the journal sync the first attempt may not have seen through.
            self.index.flush().await?;
            return self.settle(job, step, &slot).await;
        }
        index.validate(world_size, &self.limits)?;
        let refs: u64 = index.tensors.iter().map(|t| t.chunks.len() as u64).sum();
        let not_durable = self.check_chunks(job, &index).await?;
        // The index object's bytes are also the journal entry: serialised once, outside the lock.
        let (object_bytes, object_ref) = index_object(&index);
        let object_bytes = Bytes::from(object_bytes);
        let complete = {
            let mut g = slot.lock().await;
            if g.state.phase.is_final() {
                drop(g);
                return match self.committed_object(job, step).await? {
                    Some(c) => self.compare_with_committed(&c, &index),
                    None => Err(ServiceError::Conflict(format!("save {job}@{step} was aborted"))),
                };
            }
            if g.state.ranks.get(&rank) == Some(&index) {
                drop(g);
                self.index.flush().await?;
                return self.settle(job, step, &slot).await;
            }
            if g.state.chunk_refs + refs > self.config.save_chunk_refs_limit() {
                return Err(ServiceError::BadRequest(format!(
                    "save {job}@{step} would hold {} chunk references, more than one save may ({}: \
                     save_chunk_refs_max, at most in_flight_chunk_refs_max)",
                    g.state.chunk_refs + refs,
                    self.config.save_chunk_refs_limit()
                )));
            }
            if g.state.index_bytes + object_ref.bytes > self.config.save_index_bytes_limit() {
                return Err(ServiceError::BadRequest(format!(
                    "save {job}@{step} would hold {} bytes of shard indexes, more than one save may ({}: \
                     save_index_bytes_max, at most in_flight_index_bytes_max)",
                    g.state.index_bytes + object_ref.bytes,
                    self.config.save_index_bytes_limit()
                )));
            }
            // Taken now against the limits, not checked now and added later: puts for other
            // saves run between here and the accept. Given back if anything below fails.
            let refs_taken = InFlight::take(&self.chunk_refs_in_flight, refs, self.config.in_flight_chunk_refs_max)
                .map_err(|held| {
                    ServiceError::Busy(format!(
                        "saves in flight hold {held} chunk references; in_flight_chunk_refs_max is {}",
                        self.config.in_flight_chunk_refs_max
                    ))
                })?;
            let bytes_taken =
                InFlight::take(&self.index_bytes_in_flight, object_ref.bytes, self.config.in_flight_index_bytes_max)
                    .map_err(|held| {
                        ServiceError::Busy(format!(
                            "saves in flight hold {held} bytes of shard indexes; in_flight_index_bytes_max is {}",
                            self.config.in_flight_index_bytes_max
                        ))
                    })?;
            // A chunk staged at the lookup may have landed since, and its upload event found no
            // pending entry: only what is still staged now stays pending.
            let pending = self.still_staged(job, not_durable, rank).await?;
            // Checked, then journalled, then applied: a failed journal write changes nothing.
            g.state.check_index(&index, &self.limits)?;
            g.note_epoch(epoch);
            let completes = g.state.ranks.len() + 1 == g.state.expected_ranks().len();
            // The save's own journal entry changes only when its phase does (the last rank in),
            // or was never written (its opener's request failed or was cancelled).
            let header = (completes || !g.journalled).then(|| {
                let mut h = g.state.clone_fields();
                if completes {
                    h.phase = SavePhase::Staged;
                }
                h
            });
            let (j, journal_bytes) = (job.to_string(), object_bytes.clone());
            self.blocking(move |i| {
                i.put_save_rank(&j, step, rank, &journal_bytes)?;
                header.map_or(Ok(()), |h| i.put_save(&h))
            })
            .await?;
            g.journalled = true;
            g.state.accept_index_with(index, object_ref, &self.limits)?;
            if g.state.all_ranks_in() {
                g.all_in_at = Some(Instant::now());
            }
            // Now the save's own counts: `untrack_slot` gives them back when it ends.
            refs_taken.keep();
            bytes_taken.keep();
            g.add_pending(rank, pending);
            g.last_progress = Instant::now();
            // Every chunk of this rank is durable already (the node-local path, or uploads
            // that finished first): its index object is written below, outside the lock.
            g.rank_complete(rank).then(|| g.index_objects.clone())
        };
        self.index.flush().await?;
        if let Some(objects) = complete {
            if let Some(claim) = objects.begin(rank) {
                let put = self.store.put_index_object(job, &object_ref.hash, object_bytes).await;
                claim.finish(put.is_ok());
                put?;
            }
        }
        self.settle(job, step, &slot).await
    }

    /// Of `hashes`, the ones the staging tier still holds; the others must be durable by now
    /// (the index records a chunk before the staging tier lets go of it), else the upload failed
    /// and the rank must send the chunk again.
    async fn still_staged(&self, job: &str, hashes: Vec<ChunkHash>, rank: u32) -> Result<Vec<ChunkHash>, ServiceError> {
        let (staged, landed): (Vec<ChunkHash>, Vec<ChunkHash>) =
            hashes.into_iter().partition(|h| self.staging.pending_raw_len(job, h).is_some());
        if landed.is_empty() {
            return Ok(staged);
        }
        let j = job.to_string();
        let lost: Vec<ChunkHash> = self
            .blocking(move |i| {
                landed.into_iter().filter_map(|h| i.has_chunk(&j, &h).map(|d| (!d).then_some(h)).transpose()).collect()
            })
            .await?;
        if let Some(first) = lost.first() {
            return Err(ServiceError::UnknownChunks { rank, count: lost.len(), first: *first });
        }
        Ok(staged)
    }

    /// Commits the save if it is ready, and answers its status.
    async fn settle(&self, job: &str, step: u64, slot: &SlotRef) -> Result<SaveStatus, ServiceError> {
        let mut g = slot.lock().await;
        if g.ready() {
            self.commit(&mut g).await?;
        }
        if g.state.phase == SavePhase::Committed {
            return Ok(SaveStatus::of(&g.state));
        }
        if g.state.phase == SavePhase::Aborted {
            return Err(ServiceError::Conflict(format!(
                "save {job}@{step} was aborted: {}",
                g.state.error.clone().unwrap_or_default()
            )));
        }
        Ok(SaveStatus::of(&g.state))
    }

    /// Checks that every chunk `index` names is staged or durable with the raw length the index
    /// states. Returns the chunks not durable yet.
    async fn check_chunks(&self, job: &str, index: &ShardIndex) -> Result<Vec<ChunkHash>, ServiceError> {
        let mut refs: Vec<(ChunkHash, u64)> =
            index.tensors.iter().flat_map(|t| t.chunks.iter().map(|c| (c.hash, c.len))).collect();
        refs.sort_unstable();
        refs.dedup();
        if let Some(w) = refs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ServiceError::BadRequest(format!(
                "rank {}'s index names chunk {} with two lengths",
                index.rank, w[0].0
            )));
        }
        let hashes: Vec<ChunkHash> = refs.iter().map(|r| r.0).collect();
        // A save that opened before the job's condemned list was answered "present" for
        // chunks on it; the sweep waits for such saves (`gc.rs`), so they are trusted here.
        let known = self.lookup_trusting_condemned(job, &hashes, true).await?;
        let mut missing = Vec::new();
        let mut not_durable = Vec::new();
        for ((hash, len), k) in refs.iter().zip(known) {
            let raw_len = match k {
                Known::Missing => {
                    missing.push(*hash);
                    continue;
                }
                Known::Staged { raw_len } => {
                    not_durable.push(*hash);
                    Some(raw_len)
                }
                Known::Durable { raw_len } => raw_len,
            };
            if let Some(actual) = raw_len.filter(|a| a != len) {
                return Err(ServiceError::BadRequest(format!(
                    "rank {}'s index says chunk {hash} is {len} bytes; the stored chunk is {actual} bytes",
                    index.rank
                )));
            }
        }
        if let Some(first) = missing.first() {
            return Err(ServiceError::UnknownChunks { rank: index.rank, count: missing.len(), first: *first });
        }
        Ok(not_durable)
    }

    /// An index re-sent for a committed step is fine only if it is the committed one.
    fn compare_with_committed(&self, c: &CommitObject, index: &ShardIndex) -> Result<SaveStatus, ServiceError> {
        let summary = c.summary();
        let same = match c {
            CommitObject::Root(r) => {
                r.ranks.get(index.rank as usize).is_some_and(|committed| *committed == index_object(index).1)
            }
            CommitObject::V1(m) => m.ranks.get(index.rank as usize) == Some(index),
        };
        if !same {
            return Err(ServiceError::Conflict(format!(
                "{}@{} is committed with a different index for rank {}",
                summary.job, summary.step, index.rank
            )));
        }
        Ok(SaveStatus::committed(&summary))
    }

    /// Writes every index object not written yet (each rank's chunks must all be durable), at
    /// most `store_requests_max` at a time, and waits for writes other tasks have in flight.
    /// Serialises a bounded batch at a time, so the bytes held stay small whatever the world size.
    async fn write_index_objects(&self, g: &Slot) -> Result<(), ServiceError> {
        let job: Arc<str> = g.state.job.as_str().into();
        let width = self.config.store_requests_max;
        let objects = g.index_objects.clone();
        // Writes started by index puts get this long to finish; then the commit gives up its
        // lock and the maintenance task tries again.
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ranks: Vec<u32> = g.state.ranks.keys().copied().filter(|r| !objects.is_written(*r)).collect();
            for batch in ranks.chunks(width * 4) {
                let items: Vec<_> = batch
                    .iter()
                    .filter_map(|r| g.state.ranks.get(r))
                    .filter_map(|index| {
                        let claim = objects.begin(index.rank)?;
                        let (bytes, r) = index_object(index);
                        Some((claim, r.hash, Bytes::from(bytes)))
                    })
                    .collect();
                let (store, job) = (self.store.clone(), job.clone());
                let results: Vec<Result<(), StoreError>> = futures::stream::iter(items)
                    .map(move |(claim, hash, bytes)| {
                        let (store, job) = (store.clone(), job.clone());
                        async move {
                            let put = store.put_index_object(&job, &hash, bytes).await;
                            claim.finish(put.is_ok());
                            put
                        }
                    })
                    .buffer_unordered(width)
                    .collect()
                    .await;
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            match objects.counts() {
                (written, _) if written == g.state.ranks.len() => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(ServiceError::Internal(format!(
                        "{}@{}: index objects not all written after 60 s",
                        g.state.job, g.state.step
                    )))
                }
                // A write another task started failed or was dropped: claim it again.
                (_, 0) => continue,
                // Writes started by index puts are still in flight: wait for them.
                _ => objects.changed(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// Writes one rank's index object in the background, once the last of its chunks landed.
    /// A failure is only logged: the commit writes whatever is left.
    pub(crate) fn spawn_index_object_write(self: Arc<Self>, g: &Slot, rank: u32) {
        let Some(index) = g.state.ranks.get(&rank) else { return };
        let Some(claim) = g.index_objects.begin(rank) else { return };
        let (bytes, r) = index_object(index);
        let job = g.state.job.clone();
        tokio::spawn(async move {
            let put = self.store.put_index_object(&job, &r.hash, Bytes::from(bytes)).await;
            claim.finish(put.is_ok());
            if let Err(e) = put {
                tracing::warn!(job, rank, error = %e, "index object write failed; the commit retries it");
            }
        });
    }

    /// Moves a ready save (every rank in, every chunk durable) to committed. Called with the
    /// save's lock held.
    pub(crate) async fn commit(&self, slot: &mut Slot) -> Result<(), ServiceError> {
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let (job, step) = (slot.state.job.clone(), slot.state.step);
        // In the save's trace whichever task runs it (an index put, an upload landing, a retry).
        let span = tracing::info_span!("save.commit", job = %job, step, world_size = slot.state.world_size);
        let _ = span.set_parent(crate::save_context(&job, step));
        let started = Instant::now();
        let _shown = Committing::show(self, &slot.state);
        let result = self.commit_inner(slot).instrument(span).await;
        // A split save's part may be written and its root still to come.
        if result.is_ok() && slot.state.phase == SavePhase::Committed {
            crate::metrics::METRICS.commit_seconds.record(started.elapsed().as_secs_f64(), &[]);
            crate::metrics::METRICS.saves_committed.add(1, &[]);
        }
        result
    }

    async fn commit_inner(&self, slot: &mut Slot) -> Result<(), ServiceError> {
        let (job, step) = (slot.state.job.clone(), slot.state.step);
        // The last put's journal sync and index object, and the wait for the save's lock.
        let before_commit_ms = slot.all_in_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        let started = Instant::now();
        if slot.state.phase == SavePhase::Staged {
            if !slot.pending.is_empty() {
                return Err(ServiceError::Internal(format!(
                    "{job}@{step}: {} referenced chunks are not durable yet",
                    slot.pending.len()
                )));
            }
            slot.state.mark_durable()?;
            self.journal(&slot.state).await?;
        }
        let durable_journal_ms = started.elapsed().as_millis() as u64;
        let started = Instant::now();
        let index_objects_at_commit = slot.state.world_size as usize - slot.index_objects.counts().0;
        self.write_index_objects(slot).await?;
        let index_objects_ms = started.elapsed().as_millis() as u64;
        if slot.state.part.is_some() {
            return self.commit_part(slot).await;
        }
        let started = Instant::now();
        let root = slot.state.root()?;
        let root_build_ms = started.elapsed().as_millis() as u64;
        let chunks: Vec<ChunkHash> = slot.state.ranks.values().flat_map(|r| r.chunk_hashes()).collect();
        self.create_root(slot, root, &chunks).await?;
        tracing::info!(
            job,
            step,
            before_commit_ms,
            durable_journal_ms,
            index_objects_at_commit,
            index_objects_ms,
            root_build_ms,
            "commit timings"
        );
        Ok(())
    }

    /// The commit point, for a save on one node and for the node that builds a split save's
    /// root: checks that no sweep took what the root names, creates the root (create-only) and
    /// records the commit. A root already there with other bytes aborts the save (conflict).
    pub(crate) async fn create_root(
        &self,
        slot: &mut Slot,
        root: Root,
        chunks: &[ChunkHash],
    ) -> Result<(), ServiceError> {
        let (job, step) = (slot.state.job.clone(), slot.state.step);
        fail::fail_point!("ckptd::commit::before_manifest", |_| crate::coordinator::crash_now(
            "ckptd::commit::before_manifest"
        ));
        let bytes = Bytes::from(root.to_bytes());
        let index_objects: Vec<ChunkHash> = root.ranks.iter().map(|r| r.hash).collect();
        let started = Instant::now();
        if let Err(hole) = self.gc_backstop(&job, step, &index_objects, chunks).await? {
            tracing::error!(job, step, "{hole}");
            return Err(self.abort_held(slot, hole).await);
        }
        let created = async {
            fail::fail_point!("ckptd::commit::manifest_put", |_| Err(StoreError::Other(
                object_store::Error::Generic { store: "failpoint", source: "injected transient failure".into() }
            )));
            let r = self.store.create_manifest(&job, step, bytes.clone()).await;
            // The root was written but the answer is lost, as a dropped connection would lose it.
            fail::fail_point!("ckptd::commit::root_ack_lost", r.is_ok(), |_| Err(StoreError::Other(
                object_store::Error::Generic { store: "failpoint", source: "injected lost acknowledgement".into() }
            )));
            r
        };
        let backstop_ms = started.elapsed().as_millis() as u64;
        let started = Instant::now();
        match created.await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => {
                let existing = self.store.get_manifest(&job, step).await?;
                if existing != bytes {
                    crate::metrics::METRICS.commit_conflicts.add(1, &[]);
                    let reason = "another writer committed a different checkpoint for this step".to_string();
                    tracing::warn!(job, step, "commit conflict: {reason}");
                    return Err(self.abort_decided(slot, reason).await);
                }
                // Present is not durable: a create whose directory sync failed, or a ckptd
                // killed before it, leaves the root visible and unsynced.
                self.sync_local_store().await?;
                tracing::info!(job, step, "root already present with identical bytes; committed");
            }
            Err(e) => {
                tracing::warn!(job, step, error = %e, "root create failed; the save stays ready for a retry");
                return Err(e.into());
            }
        }
        fail::fail_point!("ckptd::commit::after_manifest", |_| crate::coordinator::crash_now(
            "ckptd::commit::after_manifest"
        ));
        let root_create_ms = started.elapsed().as_millis() as u64;
        let started = Instant::now();
        self.finish_commit(&mut slot.state, root.hash.clone(), bytes.to_vec()).await?;
        let record_ms = started.elapsed().as_millis() as u64;
        let after_last_index_us = slot.all_in_at.map_or(0, |t| t.elapsed().as_micros() as u64);
        self.last_commit_after_last_index_us.store(after_last_index_us, Ordering::Relaxed);
        tracing::info!(
            job,
            step,
            world_size = slot.state.world_size,
            hash = %root.hash,
            root_bytes = bytes.len(),
            after_last_index_us,
            backstop_ms,
            root_create_ms,
            record_ms,
            "committed"
        );
        Ok(())
    }

    /// Aborts a save whose lock the caller holds, and answers the error to return. A split save
    /// is aborted only if no node has decided to commit it (`parts.rs`); otherwise it keeps
    /// waiting for its root.
    pub(crate) async fn abort_held(&self, slot: &mut Slot, reason: String) -> ServiceError {
        match self.may_abort(&slot.state).await {
            Ok(true) => self.abort_decided(slot, reason).await,
            Ok(false) => ServiceError::Internal(format!(
                "{}@{}: not aborted ({reason}): the save is decided for commit; waiting for its root",
                slot.state.job, slot.state.step
            )),
            Err(e) => e,
        }
    }

    /// Aborts a save whose lock the caller holds, whatever the other nodes decided (a root of
    /// another save is in the store, or the abort is decided).
    pub(crate) async fn abort_decided(&self, slot: &mut Slot, reason: String) -> ServiceError {
        let (job, step) = (slot.state.job.clone(), slot.state.step);
        if let Err(e) = slot.state.abort(reason.clone()) {
            return e.into();
        }
        if let Err(e) = self.retire_aborted(&slot.state).await {
            return e;
        }
        ServiceError::Conflict(format!("{job}@{step}: {reason}"))
    }

    pub(crate) async fn finish_commit(
        &self,
        state: &mut SaveState,
        hash: String,
        bytes: Vec<u8>,
    ) -> Result<(), ServiceError> {
        state.mark_committed(hash)?;
        let (job, step) = (state.job.clone(), state.step);
        // The save's ranks are removed after the answer, behind a gate a fresh open of the
        // same key waits at: at 16,384 ranks their removal was most of the commit's time.
        let gate = Retiring::begin(&self.retiring, (job.clone(), step))?;
        let recorded = self
            .blocking(move |i| {
                i.put_manifest(&job, step, &bytes)?;
                i.remove_save_entry(&job, step)
            })
            .await;
        // Out of the in-flight set whatever happened (a final save must not stay there), but
        // only once the index knows the commit: a status query in between must find one or
        // the other, never neither.
        self.untrack_slot(state);
        let index = self.index.clone();
        let remove_ranks = move || {
            fail::fail_point!("ckptd::commit::before_rank_removal");
            let (job, step) = &gate.key;
            if let Err(e) = index.remove_save_ranks(job, *step) {
                // Orphans: cleared at the next start (`remove_orphan_ranks`).
                tracing::warn!(job, step, error = %e, "removing a committed save's ranks failed");
            }
            drop(gate);
        };
        if recorded.is_ok() {
            tokio::task::spawn_blocking(remove_ranks);
        } else {
            // The save's entry may still be there: its ranks stay with it.
            drop(remove_ranks);
        }
        recorded?;
        self.index.flush().await?;
        Ok(())
    }

    /// Waits until the ranks of a committed save under this key are removed (`Retiring`),
    /// at most `busy_wait_ms`; then `Busy`, for the client to retry.
    async fn wait_retired(&self, job: &str, step: u64) -> Result<(), ServiceError> {
        let gate = self.retiring.lock().unwrap_or_else(|e| e.into_inner()).get(&(job.to_string(), step)).cloned();
        let Some(gate) = gate else { return Ok(()) };
        let wait = Duration::from_millis(self.config.busy_wait_ms);
        let passed = tokio::time::timeout(wait, gate.lock()).await.is_ok();
        if !passed {
            return Err(ServiceError::Busy(format!(
                "{job}@{step}: the ranks of its last commit are still being removed"
            )));
        }
        Ok(())
    }

    pub async fn save_status(&self, job: &str, step: u64) -> Result<SaveStatus, ServiceError> {
        let key = (job.to_string(), step);
        if let Some(slot) = self.save_slot(job, step) {
            return Ok(self.slot_status(&key, &slot).await);
        }
        if let Some(m) = self.committed_summary(job, step).await? {
            return Ok(SaveStatus::committed(&m));
        }
        if let Some(a) = self.recently_aborted(job, Some(step)).pop() {
            return Ok(a);
        }
        Err(ServiceError::NotFound(format!("no save {job}@{step}")))
    }

    /// A save's status without waiting out its commit, which holds the save's lock for as long
    /// as the store takes: while it runs, the status it began with is answered (marked
    /// `committing`). Anything else holds the lock briefly; a commit that begins while this
    /// waits is seen at the next look.
    pub(crate) async fn slot_status(&self, key: &SaveKey, slot: &SlotRef) -> SaveStatus {
        loop {
            if let Some(s) = self.committing.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
                return s.clone();
            }
            if let Ok(g) = tokio::time::timeout(Duration::from_millis(50), slot.lock()).await {
                return SaveStatus::of(&g.state);
            }
        }
    }

    /// `save_status` once the save has ended (committed or aborted), or after `wait` (at most
    /// `status_wait_ms_max`), whichever comes first: a client waiting for its commit learns of
    /// it when it happens rather than at its next poll.
    pub async fn save_status_wait(&self, job: &str, step: u64, wait: Duration) -> Result<SaveStatus, ServiceError> {
        // The cap is validated (at most an hour), so the deadline cannot overflow.
        let deadline = Instant::now() + wait.min(Duration::from_millis(self.config.status_wait_ms_max));
        loop {
            // Listening before looking: an end between the look and the wait is not missed.
            let ended = self.save_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let s = self.save_status(job, step).await?;
            let now = Instant::now();
            if matches!(s.phase, SavePhase::Committed | SavePhase::Aborted) || now >= deadline {
                return Ok(s);
            }
            // Every end is announced (commits and aborts both leave the in-flight set); the
            // periodic look is a safety net, rare enough not to contend for the save's lock.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_secs(2)), ended).await;
        }
    }

    pub async fn abort_save(&self, job: &str, step: u64, reason: &str) -> Result<SaveStatus, ServiceError> {
        let slot = self
            .save_slot(job, step)
            .ok_or_else(|| ServiceError::NotFound(format!("no save {job}@{step} in flight")))?;
        let mut g = slot.lock().await;
        if g.state.phase != SavePhase::Aborted && !self.abort_unless_decided(&mut g, reason.to_string()).await? {
            return Err(ServiceError::Conflict(format!(
                "{job}@{step} is decided for commit on another node; it cannot be aborted now"
            )));
        }
        Ok(SaveStatus::of(&g.state))
    }
}

/// A save's status shown to status queries while its commit runs (see
/// `Coordinator::committing`); taken back when the commit returns, however it ends.
struct Committing<'a> {
    coordinator: &'a Coordinator,
    key: SaveKey,
}

impl<'a> Committing<'a> {
    fn show(coordinator: &'a Coordinator, state: &SaveState) -> Committing<'a> {
        let key = (state.job.clone(), state.step);
        let shown = SaveStatus { committing: true, ..SaveStatus::of(state) };
        coordinator.committing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), shown);
        Committing { coordinator, key }
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.coordinator.committing.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// The gate of a committed save whose journalled ranks are being removed (`finish_commit`):
/// locked while it lives, and out of `Coordinator::retiring` when it goes, on every path (the
/// removal done or failed, its task panicking or never run, the commit cancelled), so no entry
/// outlives its removal.
struct Retiring {
    key: SaveKey,
    gate: Arc<tokio::sync::Mutex<()>>,
    gates: Arc<RetiringGates>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Retiring {
    fn begin(gates: &Arc<RetiringGates>, key: SaveKey) -> Result<Retiring, ServiceError> {
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let held = gate.clone().try_lock_owned().map_err(|e| ServiceError::Internal(e.to_string()))?;
        gates.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), gate.clone());
        Ok(Retiring { key, gate, gates: gates.clone(), _held: held })
    }
}

impl Drop for Retiring {
    fn drop(&mut self) {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        // A later commit of the same key may have put its own gate here.
        if gates.get(&self.key).is_some_and(|g| Arc::ptr_eq(g, &self.gate)) {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retiring_gate_leaves_the_map_when_it_goes_and_only_its_own_entry() {
        let gates: Arc<RetiringGates> = Default::default();
        let key = ("job".to_string(), 3);
        let first = Retiring::begin(&gates, key.clone()).unwrap();
        let waiter = gates.lock().unwrap().get(&key).cloned().unwrap();
        assert!(waiter.try_lock().is_err(), "the gate is shut while its removal runs");
        // A later commit of the same key: the first gate going must not take the second's entry.
        let second = Retiring::begin(&gates, key.clone()).unwrap();
        drop(first);
        assert!(waiter.try_lock().is_ok(), "the first gate opened when it went");
        assert!(gates.lock().unwrap().get(&key).is_some_and(|g| Arc::ptr_eq(g, &second.gate)));
        drop(second);
        assert!(gates.lock().unwrap().is_empty(), "no entry outlives its removal");
    }
}
