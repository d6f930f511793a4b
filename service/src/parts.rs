//! A save split over several ckptd nodes: this node's part, and the root built from every
//! node's part. The protocol and its keys are in ckpt-core `part.rs`; this is its I/O.
//!
//! Design note.
//! * State: once its ranks' chunks and index objects are durable, a node writes its part
//!   (idempotent: the same save gives the same bytes) and the slot gets a `SplitWait`. The save
//!   stays `durable` and holds its lease (so no sweep takes what its part names) until a root
//!   for the step appears, written by this node or another.
//! * Looking: one background task polls the waiting saves, each with a gap that doubles from
//!   20 ms to `commit_retry_ms`. A poll reads the root's key; the leader (the node holding
//!   rank 0), and any node that has waited past its takeover time, also lists the parts prefix
//!   and reads the parts it has not read yet. When the parts cover every rank the root is
//!   built from them (`SaveState::root_of_parts`) and created with the same create-only put as
//!   a one-node save's (`commit.rs` `create_root`).
//! * Failure: a root with other bytes, overlapping or damaged parts, or parts that do not make
//!   a checkpoint abort the save with the reason. A part that never comes leaves no root; the
//!   save is aborted after `save_idle_abort_ms`. A node killed at any point finishes from its
//!   journal: it writes its part again and waits, or finds the root and records the commit.
//! * Parts are removed by the node that created the root; GC removes what an abort left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::keys;
use ckpt_core::part::covers;
use ckpt_core::{ChunkHash, CommitObject, Part, PartOf, SaveState};
use futures::StreamExt;

use crate::coordinator::{Coordinator, Slot};
use crate::error::ServiceError;
use crate::store::StoreError;

const FIRST_GAP: Duration = Duration::from_millis(20);
const TICK: Duration = Duration::from_millis(10);

/// A split save whose part is written, waiting for its root.
pub(crate) struct SplitWait {
    written_at: Instant,
    next_poll: Instant,
    gap: Duration,
    /// Parts read so far by first rank, this node's own included.
    parts: BTreeMap<u32, Part>,
}

impl Coordinator {
    /// The commit of a split save on this node, called once its ranks' index objects are
    /// written: the part, then a first look for the root.
    pub(crate) async fn commit_part(&self, slot: &mut Slot) -> Result<(), ServiceError> {
        if slot.split.is_none() {
            let (job, step) = (slot.state.job.clone(), slot.state.step);
            let part = slot.state.part()?;
            let index_objects: Vec<ChunkHash> = part.ranks.iter().map(|r| r.object.hash).collect();
            let chunks: Vec<ChunkHash> = slot.state.ranks.values().flat_map(|r| r.chunk_hashes()).collect();
            if let Err(hole) = self.gc_backstop(&job, step, &index_objects, &chunks).await? {
                return Err(self.abort_held(slot, hole).await);
            }
            fail::fail_point!("ckptd::commit::before_part", |_| crate::coordinator::crash_now(
                "ckptd::commit::before_part"
            ));
            self.store.put_record(&keys::part_key(&job, step, &part.of), Bytes::from(part.to_bytes())).await?;
            fail::fail_point!("ckptd::commit::after_part", |_| crate::coordinator::crash_now(
                "ckptd::commit::after_part"
            ));
            tracing::info!(job, step, first = part.of.first, end = part.of.end, "part written; waiting for the root");
            let now = Instant::now();
            slot.split = Some(SplitWait {
                written_at: now,
                next_poll: now,
                gap: FIRST_GAP,
                parts: [(part.of.first, part)].into(),
            });
        }
        self.poll_split(slot).await
    }

    /// One look for the root of a split save whose part is written (see the design note).
    pub(crate) async fn poll_split(&self, slot: &mut Slot) -> Result<(), ServiceError> {
        let (job, step, world) = (slot.state.job.clone(), slot.state.step, slot.state.world_size);
        let Some(of) = slot.state.part else { return Ok(()) };
        let retry = Duration::from_millis(self.config.commit_retry_ms);
        let Some(wait) = slot.split.as_mut() else { return Ok(()) };
        wait.next_poll = Instant::now() + wait.gap;
        wait.gap = (wait.gap * 2).min(retry);
        let waited = wait.written_at.elapsed();
        match self.store.get_manifest(&job, step).await {
            Ok(bytes) => return self.root_found(slot, bytes).await,
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if !of.leads() && waited < self.takeover_after(&of, world) {
            return Ok(());
        }
        if !self.read_parts(slot, &of).await? {
            return Ok(());
        }
        let Some(wait) = slot.split.as_ref() else { return Ok(()) };
        let parts: Vec<&Part> = wait.parts.values().collect();
        let built = SaveState::root_of_parts(&parts, &self.limits);
        let chunks: Vec<ChunkHash> =
            parts.iter().flat_map(|p| p.ranks.iter().flat_map(|r| r.index.chunk_hashes())).collect();
        let part_keys: Vec<String> = parts.iter().map(|p| keys::part_key(&job, step, &p.of)).collect();
        let root = match built {
            Ok(root) => root,
            Err(e) => {
                return Err(self.abort_held(slot, format!("the nodes' parts do not make a checkpoint: {e}")).await)
            }
        };
        if !of.leads() {
            tracing::warn!(job, step, first = of.first, "the leader wrote no root in time; this node builds it");
        }
        self.create_root(slot, root, &chunks).await?;
        // Committed: the parts have done their work. Best effort; GC removes what is left.
        let store = self.store.clone();
        futures::stream::iter(part_keys)
            .for_each_concurrent(self.config.store_requests_max, |k| {
                let store = store.clone();
                async move {
                    if let Err(e) = store.delete_key(&k).await {
                        tracing::debug!(key = k, error = %e, "part not removed; GC will");
                    }
                }
            })
            .await;
        Ok(())
    }

    /// How long a node that does not lead waits before it builds the root itself: the
    /// configured time, plus up to as much again by its place in the world, so at 2,048 nodes
    /// takeovers come one after another rather than all at once.
    fn takeover_after(&self, of: &PartOf, world: u32) -> Duration {
        let base = self.config.part_takeover_ms;
        Duration::from_millis(base.saturating_add(base.saturating_mul(of.first as u64) / world.max(1) as u64))
    }

    /// Lists the save's parts and reads the ones not read yet. True once they cover every rank.
    async fn read_parts(&self, slot: &mut Slot, of: &PartOf) -> Result<bool, ServiceError> {
        let (job, step, world) = (slot.state.job.clone(), slot.state.step, slot.state.world_size);
        let listed = self.store.list_meta(&keys::parts_prefix(&job, step, of.epoch)).await?;
        let mut ranges: Vec<PartOf> = listed
            .iter()
            .filter_map(|(k, _, _)| keys::parse_part_key(k))
            .filter(|(s, e, _, _)| (*s, *e) == (step, of.epoch))
            .map(|(_, _, first, end)| PartOf { first, end, epoch: of.epoch })
            .collect();
        ranges.sort_by_key(|p| (p.first, p.end));
        match covers(&ranges.iter().collect::<Vec<_>>(), world) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => return Err(self.abort_held(slot, e.to_string()).await),
        }
        let Some(wait) = slot.split.as_ref() else { return Ok(false) };
        let unread: Vec<PartOf> = ranges.into_iter().filter(|p| !wait.parts.contains_key(&p.first)).collect();
        let (store, limits) = (self.store.clone(), self.limits);
        let read: Vec<Result<Option<Part>, String>> = futures::stream::iter(unread)
            .map(|want| {
                let (store, job) = (store.clone(), job.clone());
                async move {
                    let key = keys::part_key(&job, step, &want);
                    let Some((bytes, _)) = store.get_record(&key).await.map_err(|e| e.to_string())? else {
                        return Ok(None);
                    };
                    let part = tokio::task::spawn_blocking(move || Part::from_bytes(&bytes, &limits))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("the part of ranks {}..{} is damaged: {e}", want.first, want.end))?;
                    if part.of != want || part.job != job || part.step != step {
                        return Err(format!("the part stored at {key} is of another save"));
                    }
                    Ok(Some(part))
                }
            })
            .buffer_unordered(self.config.store_requests_max)
            .collect()
            .await;
        let mut complete = true;
        for r in read {
            match r {
                Ok(Some(p)) => {
                    if let Some(w) = slot.split.as_mut() {
                        w.parts.insert(p.of.first, p);
                    }
                }
                // Listed, then gone: the root was created meanwhile; the next poll finds it.
                Ok(None) => complete = false,
                Err(e) => return Err(self.abort_held(slot, e).await),
            }
        }
        Ok(complete)
    }

    /// Removes the job's parts that have done their work: those of a committed step (a node
    /// still waiting finds the root by its key), and any older than both the GC grace period
    /// and `save_idle_abort_ms` (their save has ended: committed, or aborted by idleness).
    pub(crate) async fn gc_parts(
        &self,
        job: &str,
        committed: &[u64],
        now_ms: u64,
        dry_run: bool,
    ) -> Result<usize, ServiceError> {
        let old_ms = self.config.retention.gc_grace_s.saturating_mul(1000).max(self.config.save_idle_abort_ms);
        let done: Vec<String> = self
            .store
            .list_meta(&keys::all_parts_prefix(job))
            .await?
            .into_iter()
            .filter(|(k, _, modified)| {
                keys::parse_part_key(k).is_some_and(|(step, ..)| committed.binary_search(&step).is_ok())
                    || modified.saturating_add(old_ms) <= now_ms
            })
            .map(|(k, _, _)| k)
            .collect();
        if !dry_run {
            for k in &done {
                self.store.delete_key(k).await?;
            }
        }
        Ok(done.len())
    }

    /// A root exists for the step of a split save: committed if it names this node's index
    /// objects for this save, a conflict otherwise.
    async fn root_found(&self, slot: &mut Slot, bytes: Bytes) -> Result<(), ServiceError> {
        let (job, step) = (slot.state.job.clone(), slot.state.step);
        let (check, limits) = (bytes.clone(), self.limits);
        let parsed = tokio::task::spawn_blocking(move || CommitObject::parse(&check, &limits))
            .await
            .map_err(crate::error::join_error)?
            .map_err(|e| ServiceError::CorruptManifest { job: job.clone(), step, reason: e.to_string() })?;
        match parsed {
            CommitObject::Root(root) if slot.state.committed_by(&root) => {
                self.finish_commit(&mut slot.state, root.hash.clone(), bytes.to_vec()).await?;
                tracing::info!(job, step, hash = %root.hash, "committed (root found in the store)");
                Ok(())
            }
            _ => {
                crate::metrics::METRICS.commit_conflicts.add(1, &[]);
                let reason = "another writer committed a different checkpoint for this step".to_string();
                Err(self.abort_held(slot, reason).await)
            }
        }
    }

    /// Polls every split save whose next look is due, each in its own task. Runs until the
    /// coordinator is dropped.
    pub(crate) async fn poll_splits(me: std::sync::Weak<Coordinator>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(me) = me.upgrade() else { break };
            let slots: Vec<_> = me.saves.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            let now = Instant::now();
            for slot in slots {
                let Ok(g) = slot.try_lock_owned() else { continue };
                if g.state.phase.is_final() || g.split.as_ref().is_none_or(|w| now < w.next_poll) {
                    continue;
                }
                let me = Arc::clone(&me);
                tokio::spawn(async move {
                    let mut g = g;
                    if let Err(e) = me.poll_split(&mut g).await {
                        tracing::warn!(job = g.state.job, step = g.state.step, error = %e, "split save: look for the root failed");
                    }
                });
            }
        }
    }
}
