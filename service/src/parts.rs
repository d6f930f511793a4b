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
//!   a checkpoint abort the save with the reason; a store error only fails this poll. Every
//!   abort of a split save first creates the step's decision "abort" (create-only); a builder
//!   creates "commit" before the root. Whichever is first holds, so no node reports "aborted"
//!   for a step whose root then appears, and an epoch whose save aborted is never reused. A
//!   part that never comes leaves no root; the save is aborted after `save_idle_abort_ms`. A
//!   node killed at any point finishes from its journal: it writes its part again and waits,
//!   or finds the root and records the commit.
//! * Parts are removed by the node that created the root; GC removes what an abort left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::keys;
use ckpt_core::part::{covers, Decision, DecisionRecord};
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
        // The root is built off the runtime (16,384 ranks' indexes are checked against each
        // other), from the parts the listing named.
        let Some(wait) = slot.split.as_mut() else { return Ok(()) };
        let parts = std::mem::take(&mut wait.parts);
        let limits = self.limits;
        let (built, parts) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Part> = parts.values().collect();
            let built = SaveState::root_of_parts(&refs, &limits).map(|root| {
                let chunks: Vec<ChunkHash> =
                    refs.iter().flat_map(|p| p.ranks.iter().flat_map(|r| r.index.chunk_hashes())).collect();
                (root, chunks)
            });
            (built, parts)
        })
        .await
        .map_err(crate::error::join_error)?;
        let part_keys: Vec<String> = parts.values().map(|p| keys::part_key(&job, step, &p.of)).collect();
        if let Some(wait) = slot.split.as_mut() {
            wait.parts = parts;
        }
        let (root, chunks) = match built {
            Ok(b) => b,
            Err(e) => {
                return Err(self.abort_held(slot, format!("the nodes' parts do not make a checkpoint: {e}")).await)
            }
        };
        if self.decide(&job, step, of.epoch, Decision::Commit).await? == Decision::Abort {
            return Err(self.abort_decided(slot, "a node aborted its share of the save".into()).await);
        }
        if !of.leads() {
            tracing::warn!(job, step, first = of.first, "the leader wrote no root in time; this node builds it");
        }
        self.create_root(slot, root, &chunks).await?;
        crate::metrics::METRICS.saves_committed.add(1, &[]);
        // Committed: the parts have done their work. Best effort, off the save's lock; GC
        // removes what is left.
        let (store, width) = (self.store.clone(), self.config.store_requests_max);
        tokio::spawn(async move {
            futures::stream::iter(part_keys)
                .for_each_concurrent(width, |k| {
                    let store = store.clone();
                    async move {
                        if let Err(e) = store.delete_key(&k).await {
                            tracing::debug!(key = k, error = %e, "part not removed; GC will");
                        }
                    }
                })
                .await;
        });
        Ok(())
    }

    /// Creates the save's decision unless one exists, and answers the one in force.
    async fn decide(&self, job: &str, step: u64, epoch: u64, want: Decision) -> Result<Decision, ServiceError> {
        let key = keys::part_decision_key(job, step, epoch);
        let body = serde_json::to_vec(&DecisionRecord { decision: want })
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        match self.store.create_record(&key, Bytes::from(body)).await {
            Ok(()) => {
                tracing::info!(job, step, epoch, decision = ?want, "split save decided");
                Ok(want)
            }
            Err(StoreError::AlreadyExists(_)) => self
                .decided(job, step, epoch)
                .await?
                .ok_or_else(|| ServiceError::Internal(format!("{job}@{step}: the decision vanished; trying again"))),
            Err(e) => Err(e.into()),
        }
    }

    /// The decision taken for a split save in `epoch`, if any.
    pub(crate) async fn decided(&self, job: &str, step: u64, epoch: u64) -> Result<Option<Decision>, ServiceError> {
        let key = keys::part_decision_key(job, step, epoch);
        let Some((bytes, _)) = self.store.get_record(&key).await? else { return Ok(None) };
        let d: DecisionRecord = crate::gc::parse_record(&key, bytes).await?;
        Ok(Some(d.decision))
    }

    /// Whether this node may abort its share of a save: always for a save on one node; for a
    /// split save, unless a builder decided to commit it (then the root is coming).
    pub(crate) async fn may_abort(&self, state: &SaveState) -> Result<bool, ServiceError> {
        let Some(of) = state.part else { return Ok(true) };
        if state.phase.is_final() {
            return Ok(true);
        }
        // A root already there is this save's commit (or a conflict the poll reports): never
        // tell ranks "aborted" for a step whose root is in the store.
        match self.store.get_manifest(&state.job, state.step).await {
            Ok(_) => return Ok(false),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.decide(&state.job, state.step, of.epoch, Decision::Abort).await? == Decision::Abort)
    }

    /// How long a node that does not lead waits before it builds the root itself: the
    /// configured time, plus up to as much again by its place in the world, so at 2,048 nodes
    /// takeovers come one after another rather than all at once.
    fn takeover_after(&self, of: &PartOf, world: u32) -> Duration {
        let base = self.config.part_takeover_ms;
        Duration::from_millis(base.saturating_add(base.saturating_mul(of.first as u64) / world.max(1) as u64))
    }

    /// Lists the save's parts and reads the ones not read yet. True once they cover every rank
    /// (the parts kept are then exactly the ones listed). A decision to abort ends the save.
    async fn read_parts(&self, slot: &mut Slot, of: &PartOf) -> Result<bool, ServiceError> {
        let (job, step, world) = (slot.state.job.clone(), slot.state.step, slot.state.world_size);
        let listed = self.store.list_meta(&keys::parts_prefix(&job, step, of.epoch)).await?;
        let decision_key = keys::part_decision_key(&job, step, of.epoch);
        if listed.iter().any(|(k, _, _)| *k == decision_key)
            && self.decided(&job, step, of.epoch).await? == Some(Decision::Abort)
        {
            return Err(self.abort_decided(slot, "a node aborted its share of the save".into()).await);
        }
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
        let Some(wait) = slot.split.as_mut() else { return Ok(false) };
        wait.parts.retain(|first, p| ranges.iter().any(|r| r.first == *first && r.end == p.of.end));
        let unread: Vec<PartOf> = ranges.into_iter().filter(|p| !wait.parts.contains_key(&p.first)).collect();
        let (store, limits) = (self.store.clone(), self.limits);
        // Ok(None): listed, then gone (the root was created meanwhile; the next poll finds it).
        // Err(Ok(e)): the store failed (this poll fails). Err(Err(why)): the part is bad.
        type Read = Result<Option<Part>, Result<ServiceError, String>>;
        let read: Vec<Read> = futures::stream::iter(unread)
            .map(|want| {
                let (store, job) = (store.clone(), job.clone());
                async move {
                    let key = keys::part_key(&job, step, &want);
                    let Some((bytes, _)) = store.get_record(&key).await.map_err(|e| Ok(e.into()))? else {
                        return Ok(None);
                    };
                    let part = tokio::task::spawn_blocking(move || Part::from_bytes(&bytes, &limits))
                        .await
                        .map_err(|e| Ok(crate::error::join_error(e)))?
                        .map_err(|e| Err(format!("the part of ranks {}..{} is damaged: {e}", want.first, want.end)))?;
                    if part.of != want || part.job != job || part.step != step {
                        return Err(Err(format!("the part stored at {key} is of another save")));
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
                Ok(None) => complete = false,
                Err(Ok(e)) => return Err(e),
                Err(Err(why)) => return Err(self.abort_held(slot, why).await),
            }
        }
        Ok(complete)
    }

    /// Removes the job's parts and decisions that have done their work: those of a committed
    /// step (a node still waiting finds the root by its key), and any older than both the GC
    /// grace period and `save_idle_abort_ms` (their save has ended: committed, or aborted by
    /// idleness; an aborted epoch's decision goes with them, and with it the refusal to reopen
    /// that epoch, long after any trainer moved on).
    pub(crate) async fn gc_parts(
        &self,
        job: &str,
        committed: &[u64],
        now_ms: u64,
        lock: Option<&crate::gc_lock::GcLock>,
    ) -> Result<usize, ServiceError> {
        let old_ms = self.config.retention.gc_grace_s.saturating_mul(1000).max(self.config.save_idle_abort_ms);
        let done: Vec<String> = self
            .store
            .list_meta(&keys::all_parts_prefix(job))
            .await?
            .into_iter()
            .filter(|(k, _, modified)| {
                keys::parse_parts_step(k).is_some_and(|step| {
                    committed.binary_search(&step).is_ok() || modified.saturating_add(old_ms) <= now_ms
                })
            })
            .map(|(k, _, _)| k)
            .collect();
        if let Some(lock) = lock {
            for k in &done {
                lock.ensure()?;
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
                crate::metrics::METRICS.saves_committed.add(1, &[]);
                tracing::info!(job, step, hash = %root.hash, "committed (root found in the store)");
                Ok(())
            }
            _ => {
                crate::metrics::METRICS.commit_conflicts.add(1, &[]);
                let reason = "another writer committed a different checkpoint for this step".to_string();
                Err(self.abort_decided(slot, reason).await)
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
