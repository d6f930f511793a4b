//! Retention and garbage collection: the policy, the records GC keeps in the store, and the
//! decisions, as pure functions (ckptd's `gc.rs` does the I/O).
//!
//! Design note (the protocol, for any number of ckptd nodes on one store).
//! * Retention deletes roots: a checkpoint disappears atomically with its root. What only
//!   deleted roots referenced (chunks, index objects) is garbage, found by mark and sweep.
//! * Mark: every chunk and index object not referenced by a committed root, and older than the
//!   grace period (so nothing an in-flight save just wrote), is *condemned*: its key goes in
//!   `gc/condemned.json`. Nothing is deleted yet.
//! * The hazard is a chunk a save relies on without having written it: a `missing` query
//!   answered "present", after which the client never sends it. Once a condemned list exists,
//!   every node answers "missing" for condemned chunks (it reads the list when a save opens), so
//!   the client sends them again and the rewrite gives them a new modification time.
//! * Sweep (a later GC run, at least the grace period after the list): allowed only when every
//!   live lease (a save in flight on some node, `gc/leases/<step>.<node>`, refreshed while the
//!   save lives) opened after the list was written: each such save read the list when it opened.
//!   A save that opened before waits for the sweep, or the sweep waits for it. Then the sweep
//!   deletes each condemned key still unreferenced and not rewritten since the list.
//! * The commit check: a sweep records its keys in `gc/swept.json` before deleting anything
//!   (and marks it done after), and each delete first checks that the object was not written
//!   again since the list. A save remembers the sweep it saw when it opened. At commit it waits
//!   for a sweep in progress to finish, then looks up in the store every object its root names
//!   that the sweep it opened with or the next one listed (either may have deleted while the
//!   save was answered "present"); one that is gone aborts the save, visibly. If more sweeps
//!   passed, or the save's opening is unknown (restored after a crash of its node, whose lease
//!   lapsed), every object the root names is looked up. Once a sweep is done nothing deletes
//!   an object the save names until the save ends: a later list is held by the save's lease.
//! * A GC run reads the condemned list and the leases before it lists the roots: a save that
//!   commits in between either still held its lease or is among the roots.
//! * Times compared with each other are the store's clock (objects' modification times); the
//!   grace period and lease expiry are compared with the GC node's clock, which only needs to be
//!   roughly right. Store clocks may count whole seconds (S3's `Last-Modified`), so equal times
//!   count as "before the list": a lease opened in the list's second holds the sweep, and a
//!   chunk rewritten in that second is swept only if no root names it and no save holds it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Which committed checkpoints of a job to keep. With nothing set, every checkpoint is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the newest N committed checkpoints.
    pub keep_last: Option<u64>,
    /// Keep every checkpoint whose step is a multiple of K.
    pub keep_every: Option<u64>,
}

impl RetentionPolicy {
    pub fn is_active(&self) -> bool {
        self.keep_last.is_some() || self.keep_every.is_some()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.keep_last == Some(0) {
            return Err("keep_last must be at least 1 (the newest checkpoint is always kept)".into());
        }
        if self.keep_every == Some(0) {
            return Err("keep_every must be positive".into());
        }
        Ok(())
    }

    /// The steps to delete among `committed` (any order): everything the policy does not keep,
    /// never a pinned step, never the newest.
    pub fn to_delete(&self, committed: &[u64], pinned: &BTreeSet<u64>) -> Vec<u64> {
        if !self.is_active() {
            return Vec::new();
        }
        let mut steps: Vec<u64> = committed.to_vec();
        steps.sort_unstable();
        steps.dedup();
        let newest = steps.last().copied();
        let last_n: BTreeSet<u64> = match self.keep_last {
            Some(n) => steps.iter().rev().take(n as usize).copied().collect(),
            None => BTreeSet::new(),
        };
        steps
            .into_iter()
            .filter(|s| {
                Some(*s) != newest
                    && !pinned.contains(s)
                    && !last_n.contains(s)
                    && self.keep_every.is_none_or(|k| s % k != 0)
            })
            .collect()
    }
}

pub const CONDEMNED_FORMAT: &str = "ckpt.gc.condemned";
pub const LEASE_FORMAT: &str = "ckpt.gc.lease";
pub const SWEPT_FORMAT: &str = "ckpt.gc.swept";

/// What a GC mark found unreferenced: chunk and index-object keys, with their stored sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    pub format: String,
    pub job: String,
    /// When the mark ran (the GC node's clock; informational: the sweep uses the object's
    /// modification time, the store's clock).
    pub marked_unix_ms: u64,
    pub keys: Vec<String>,
    pub bytes: u64,
}

/// A save in flight on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub format: String,
    pub job: String,
    pub step: u64,
    pub node: String,
    /// The store's time of the lease's first write (the save's opening on this node); `None`
    /// in that first write itself, whose modification time then says it.
    pub opened_store_ms: Option<u64>,
}

/// The last sweep that deleted anything. Nodes apply it to their chunk records (a record of
/// a deleted chunk would answer "present"); one that missed a sweep (`seq` jumped) forgets all
/// its records of the job and asks the store again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swept {
    pub format: String,
    pub job: String,
    /// Counts sweeps of the job, from 1.
    pub seq: u64,
    /// The keys this sweep deletes (each unless written again since the list).
    pub keys: Vec<String>,
    /// Written true once every delete is done; a sweep whose run died (its GC lock gone or
    /// stale) deletes nothing more either.
    #[serde(default)]
    pub done: bool,
    /// The store's time of the condemned list the sweep deleted from: a save that opened
    /// before it may have been answered "present" for something now gone.
    pub list_store_ms: u64,
}

/// A lease as a GC run sees it: when its save opened and when the lease was last refreshed
/// (both the store's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSeen {
    pub step: u64,
    pub opened_ms: u64,
    pub refreshed_ms: u64,
}

/// Whether the list written at `list_ms` (store clock) may be swept at `now_ms`: the grace
/// period has passed and no live lease (refreshed within `lease_ms`) belongs to a save that
/// opened before the list. Returns why not, naming the saves in the way.
pub fn sweep_allowed(
    list_ms: u64,
    now_ms: u64,
    grace_ms: u64,
    lease_ms: u64,
    leases: &[LeaseSeen],
) -> Result<(), String> {
    if now_ms < list_ms.saturating_add(grace_ms) {
        return Err(format!(
            "the condemned list is {} s old; the grace period is {} s",
            now_ms.saturating_sub(list_ms) / 1000,
            grace_ms / 1000
        ));
    }
    let blocking: Vec<u64> = leases
        .iter()
        .filter(|l| l.refreshed_ms.saturating_add(lease_ms) > now_ms && l.opened_ms <= list_ms)
        .map(|l| l.step)
        .collect();
    if !blocking.is_empty() {
        return Err(format!("saves in flight since before the condemned list: steps {blocking:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_last_n_every_kth_pinned_and_the_newest() {
        let steps: Vec<u64> = (1..=10).map(|s| s * 100).collect();
        let pinned: BTreeSet<u64> = [300].into();
        let keep2 = RetentionPolicy { keep_last: Some(2), keep_every: None };
        assert_eq!(keep2.to_delete(&steps, &pinned), vec![100, 200, 400, 500, 600, 700, 800]);
        let every = RetentionPolicy { keep_last: Some(1), keep_every: Some(500) };
        assert_eq!(every.to_delete(&steps, &BTreeSet::new()), vec![100, 200, 300, 400, 600, 700, 800, 900]);
        // Off: nothing goes. The newest is never deleted, whatever the policy says.
        assert!(RetentionPolicy::default().to_delete(&steps, &pinned).is_empty());
        let only_every = RetentionPolicy { keep_last: None, keep_every: Some(7) };
        assert_eq!(only_every.to_delete(&[5, 13], &BTreeSet::new()), vec![5]);
        assert!(RetentionPolicy { keep_last: Some(0), keep_every: None }.validate().is_err());
    }

    #[test]
    fn a_sweep_waits_for_the_grace_period_and_for_saves_older_than_the_list() {
        let live_old = LeaseSeen { step: 7, opened_ms: 900, refreshed_ms: 1_900 };
        let live_new = LeaseSeen { step: 8, opened_ms: 1_100, refreshed_ms: 1_900 };
        let dead_old = LeaseSeen { step: 6, opened_ms: 500, refreshed_ms: 600 };
        assert!(sweep_allowed(1_000, 1_500, 1_000, 1_000, &[]).unwrap_err().contains("grace"));
        assert!(sweep_allowed(1_000, 2_000, 1_000, 1_000, &[live_old]).unwrap_err().contains("[7]"));
        sweep_allowed(1_000, 2_000, 1_000, 1_000, &[live_new, dead_old]).unwrap();
    }
}
