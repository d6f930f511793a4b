//! Start-up: reconcile the index with the store, then finish or report journalled saves.
//!
//! Design note.
//! * The store is the source of truth. An index that is missing or describes another store is
//!   rebuilt from the store's listings (roots and chunks; one sled could not open was set
//!   aside before, see `Config::on_damaged_index`); roots added or removed behind the index's
//!   back are picked up. A listing can be stale, so a root leaves the index only when a read of
//!   its key says it is gone.
//! * Fences are kept in both and reconciled both ways, after the journalled saves of a job
//!   whose two differ are aborted (the journal keeps no generation, and the raise's first
//!   answer here would have ended them), so a start that stops part-way does it all again. The
//!   store's fence comes from a listing: on a store whose listings lag, a raise moments before
//!   a rebuild could be missed.
//! * A journalled save whose step has a root in the store is committed if that root is the one
//!   the journal builds (same bytes; for a version-1 manifest, the same content) and aborted as
//!   a conflict otherwise. Any other journalled save gets its slot back with its pending chunks
//!   recomputed rank by rank; a ready one commits now, the others wait for their ranks (chunks
//!   staged only in memory died with the process; clients re-send what `missing` reports).
//! * Spilled chunks are re-queued last, so their upload events find the slots.

use std::collections::BTreeSet;
use std::sync::Arc;

use ckpt_core::{CommitObject, SavePhase};
use futures::{StreamExt, TryStreamExt};

use crate::coordinator::{Coordinator, RecoveryReport, Slot};
use crate::error::ServiceError;
use crate::intake::Known;
use crate::store::StoreError;

impl Coordinator {
    /// Runs before ckptd serves requests.
    pub async fn recover(&self) -> Result<RecoveryReport, ServiceError> {
        let mut report = RecoveryReport::default();
        // What a killed ckptd left visible in a local store may not be durable yet (a root or a
        // chunk renamed into place before its sync): everything found below is trusted, so it
        // is made durable first.
        self.sync_local_store().await?;
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
        report.gc_locks_released =
            crate::gc_lock::release_dead(&self.store, &self.node_id, &jobs, self.config.store_requests_max).await?;
        // Each job's roots and fence listed concurrently (one job after another, start-up paid
        // two round trips per job); the chunk listings of a rebuild stay one job at a time, as
        // one job's can hold millions of entries.
        let listed: Vec<(String, Vec<u64>, Option<u64>)> = futures::stream::iter(jobs.clone())
            .map(|job| async move {
                let steps = self.store.list_manifest_steps(&job).await?;
                let fence = self.stored_fence(&job).await?;
                Ok::<_, ServiceError>((job, steps, fence))
            })
            .buffered(self.config.store_requests_max.max(1))
            .try_collect()
            .await?;
        let mut in_store = BTreeSet::new();
        // Fences live in the index and the store, and each learns the other's higher one (a
        // rebuilt index gets its fences back, a raise another node made reaches this one, one
        // only this index kept reaches the store). Where they differ, a raise was missed here or
        // stopped before its last step (`raise_fence` records in the store after its aborts),
        // so the job's journalled saves, which name no generation, are aborted as the raise's
        // first answer would have; only then are the two made equal, so a start that stops in
        // between finds them different again. (index's, store's) by job.
        let mut fences: std::collections::BTreeMap<String, (Option<u64>, Option<u64>)> =
            self.blocking(|i| i.fences()).await?.into_iter().map(|(job, f)| (job, (Some(f), None))).collect();
        for (job, steps, stored) in listed {
            let job = &job;
            in_store.extend(steps.into_iter().map(|step| (job.clone(), step)));
            if stored.is_some() {
                fences.entry(job.clone()).or_default().1 = stored;
            }
            if report.rebuilt {
                report.chunks_indexed += self.index_listed_chunks(job).await?;
            }
        }
        fences.retain(|_, (kept, stored)| kept != stored);
        let in_index: BTreeSet<(String, u64)> = self.blocking(|i| i.all_manifests()).await?.into_iter().collect();
        for (job, step) in in_store.difference(&in_index) {
            let bytes = self.store.get_manifest(job, *step).await?;
            if let Err(e) = CommitObject::parse(&bytes, &self.limits) {
                tracing::error!(job, step, error = %e, "root in the store is damaged; not indexed");
                continue;
            }
            let (j, s) = (job.clone(), *step);
            self.blocking(move |i| i.put_manifest(&j, s, &bytes)).await?;
            report.manifests_added += 1;
        }
        for (job, step) in in_index.difference(&in_store) {
            // A listing may be stale (eventually consistent stores, a lagging replica); a read
            // of the key is not. Only a root that is really gone leaves the index.
            match self.store.get_manifest(job, *step).await {
                Ok(_) => {
                    tracing::warn!(job, step, "the store's listing left out a committed root; kept");
                    report.manifests_unlisted += 1;
                    continue;
                }
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let (j, s) = (job.clone(), *step);
            self.blocking(move |i| i.remove_manifest(&j, s)).await?;
            report.manifests_dropped += 1;
        }
        if report.rebuilt {
            self.blocking(move |i| i.set_store_description(&store_desc)).await?;
        }
        self.index.flush().await?;

        let orphans = self.blocking(|i| i.remove_orphan_ranks()).await?;
        if orphans > 0 {
            tracing::warn!(orphans, "journalled ranks without a save removed");
        }
        let (saves, unreadable) = self.blocking(|i| i.all_saves()).await?;
        for (save, reason) in &unreadable {
            tracing::error!(save, reason, "journalled save unreadable; forgotten (its ranks send it again)");
        }
        report.saves_unreadable = unreadable.len();
        for mut save in saves {
            let (job, step) = (save.job.clone(), save.step);
            if save.phase == SavePhase::Aborted {
                self.retire_aborted(&save).await?;
                continue;
            }
            if save.phase == SavePhase::Committed {
                let (j, s) = (job.clone(), step);
                self.blocking(move |i| i.remove_save(&j, s)).await?;
                continue;
            }
            if in_store.contains(&(job.clone(), step)) {
                let stored = self.store.get_manifest(&job, step).await?;
                // The stored root's hash when it is the one this journalled save commits as.
                let same = match CommitObject::parse(&stored, &self.limits) {
                    Ok(CommitObject::Root(r)) => save.committed_by(&r).then_some(r.hash),
                    Ok(CommitObject::V1(m)) => (save.part.is_none()
                        && m.world_size == save.world_size
                        && m.metadata == save.metadata
                        && m.created_unix_ms == save.created_unix_ms
                        && m.ranks.iter().eq(save.ranks.values()))
                    .then_some(m.hash),
                    Err(_) => None,
                };
                if let Some(hash) = same {
                    if save.phase == SavePhase::Staged {
                        save.mark_durable()?;
                    }
                    self.finish_commit(&mut save, hash, stored.to_vec()).await?;
                    report.saves_committed += 1;
                    tracing::info!(job, step, "journalled save found committed in the store");
                    continue;
                }
                save.abort("another writer committed a different checkpoint for this step".into())?;
                self.retire_aborted(&save).await?;
                report.saves_aborted += 1;
                continue;
            }
            if let Some(&(kept, stored)) = fences.get(&job) {
                // Unless another node decided it for commit.
                if self.may_abort(&save).await? {
                    let fence = kept.max(stored).unwrap_or(0);
                    save.abort(format!("fenced at generation {fence} by a raise this node missed or did not finish"))?;
                    self.retire_aborted(&save).await?;
                    report.saves_aborted += 1;
                    continue;
                }
            }
            let mut slot = Slot::new(save);
            let ranks: Vec<u32> = slot.state.ranks.keys().copied().collect();
            for rank in ranks {
                let hashes: Vec<_> = slot.state.ranks[&rank].chunk_hashes().collect();
                let known = self.lookup_trusting_condemned(&job, &hashes, false).await?;
                let pending =
                    hashes.iter().zip(known).filter(|(_, k)| !matches!(k, Known::Durable { .. })).map(|(h, _)| *h);
                slot.add_pending(rank, pending.collect::<Vec<_>>());
            }
            let (chunk_refs, index_bytes) = (slot.state.chunk_refs, slot.state.index_bytes);
            let slot = Arc::new(tokio::sync::Mutex::new(slot));
            self.track_slot((job.clone(), step), chunk_refs, index_bytes, slot.clone());
            let mut g = slot.lock().await;
            if g.ready() {
                match self.commit(&mut g).await {
                    Ok(()) => report.saves_resumed += 1,
                    Err(e) => tracing::error!(job, step, error = %e, "journalled save could not be committed"),
                }
            } else if matches!(g.state.phase, SavePhase::Staged | SavePhase::Durable) {
                tracing::info!(
                    job,
                    step,
                    chunks = g.pending.len(),
                    "journalled save waits for chunks to become durable"
                );
            }
        }
        if !fences.is_empty() {
            // The aborts durable before the fences agree.
            self.index.flush().await?;
        }
        for (job, (kept, stored)) in fences {
            let fence = kept.max(stored).unwrap_or(0);
            if kept < Some(fence) {
                let j = job.clone();
                self.blocking(move |i| i.raise_fence(&j, fence)).await?;
                tracing::info!(job, epoch = fence, was = ?kept, "fence restored from the store");
                report.fences_restored += 1;
            }
            if stored < Some(fence) {
                self.record_fence(&job, fence).await?;
            }
        }
        self.index.flush().await?;
        report.spilled_chunks_requeued = self.staging.recover_spill(&self.index).await?;
        Ok(report)
    }

    /// A rebuild's chunk records of `job`, from the store's listing: each batch is written to
    /// the index while the next is listed (listing and indexing took about as long as each
    /// other; one after the other, a rebuild of 1.5 M chunks paid both). Returns the chunks
    /// indexed.
    async fn index_listed_chunks(&self, job: &str) -> Result<usize, ServiceError> {
        let (batches, mut listed) = tokio::sync::mpsc::channel::<Vec<_>>(REBUILD_BATCHES_QUEUED);
        let j = job.to_string();
        let indexed = self.blocking(move |i| {
            let mut added = 0;
            while let Some(mut batch) = listed.blocking_recv() {
                added += i.put_chunks(&j, &mut batch)?;
            }
            Ok(added)
        });
        // An indexing error drops the receiver, which ends the listing; a listing error drops
        // the sender, which ends the indexing. Either way both finish, and the failure is returned
        // (the listing's, if both failed).
        let (listing, indexed) = tokio::join!(self.store.list_chunks_batched(job, batches), indexed);
        listing?;
        indexed
    }
}

/// Listed batches of chunks a rebuild holds while the index catches up (a batch is a directory
/// of a local store, a few thousand chunks, or a page of an object store's listing).
const REBUILD_BATCHES_QUEUED: usize = 4;
