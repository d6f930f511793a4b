//! The save state machine, as data. The service owns the I/O; this module owns the rules.
//!
//! ```text
//!   open ──all ranks' indexes in──▶ staged ──every chunk durable──▶ durable ──manifest created──▶ committed
//!     └──────────────┴──────────────────────┴──── abort (conflict, operator, bad data) ──▶ aborted
//! ```
//!
//! * A rank's shard index is accepted only while the save is open, and a second copy of the same
//!   rank's index is accepted only if identical, so a client may retry any request.
//! * The root (the commit object) is built only in `durable`, so it never references a chunk
//!   that is not durable (the service checks durability before calling `mark_durable`).
//! * The root's bytes depend only on what the ranks sent and on what was fixed at open
//!   (creation time, previous committed step), so every writer of the save builds the same bytes.
//! * Journal: the service stores the save's fields (`ranks` is not serialised) and each rank's
//!   index under its own key, so accepting an index costs O(1) journal bytes, not O(world size).
//! * `committed` and `aborted` are final. A save is never committed twice: the state is the
//!   journal entry, and the create-only manifest put is the arbiter between processes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::commit::{index_object, IndexRef, Root, RootFields};
use crate::error::CoreError;
use crate::layout::SliceMap;
use crate::part::{Part, PartOf, PartRank, PART_FORMAT, PART_FORMAT_VERSION};
use crate::shard::ShardIndex;
use crate::validate::{validate_job, validate_world_size, Limits};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SavePhase {
    Open,
    Staged,
    Durable,
    Committed,
    Aborted,
}

impl SavePhase {
    pub fn name(self) -> &'static str {
        match self {
            SavePhase::Open => "open",
            SavePhase::Staged => "staged",
            SavePhase::Durable => "durable",
            SavePhase::Committed => "committed",
            SavePhase::Aborted => "aborted",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, SavePhase::Committed | SavePhase::Aborted)
    }

    fn may_become(self, to: SavePhase) -> bool {
        use SavePhase::*;
        matches!(
            (self, to),
            (Open, Staged) | (Staged, Durable) | (Durable, Committed) | (Open | Staged | Durable, Aborted)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveState {
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub created_unix_ms: u64,
    /// The newest step committed before this save opened, fixed then so the root is a pure
    /// function of the save.
    #[serde(default)]
    pub previous_committed_step: Option<u64>,
    pub metadata: serde_json::Value,
    /// Journalled per rank by the service, not with the save's fields; read from older
    /// journals that held them inline.
    #[serde(default, skip_serializing)]
    pub ranks: BTreeMap<u32, ShardIndex>,
    /// Each received index's object reference (derived from `ranks`).
    #[serde(skip)]
    pub refs: BTreeMap<u32, IndexRef>,
    /// Chunk references in the received indexes (derived from `ranks`).
    #[serde(skip)]
    pub chunk_refs: u64,
    /// The received indexes' object bytes (derived from `ranks`): what holding them costs,
    /// metadata and names included, where `chunk_refs` counts only their chunks.
    #[serde(skip)]
    pub index_bytes: u64,
    /// The slices received so far, for the overlap rule (derived from `ranks`).
    #[serde(skip)]
    slices: SliceMap,
    pub phase: SavePhase,
    /// Why the save was aborted.
    pub error: Option<String>,
    /// Set once committed.
    pub manifest_hash: Option<String>,
    /// Set when the save is split over ckptd nodes: the ranks this node serves (`part.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartOf>,
}

/// Whether an accepted shard index was new or a retry of one already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOutcome {
    New,
    Duplicate,
}

impl SaveState {
    pub fn open(
        job: &str,
        step: u64,
        world_size: u32,
        created_unix_ms: u64,
        previous_committed_step: Option<u64>,
        metadata: serde_json::Value,
        limits: &Limits,
    ) -> Result<SaveState, CoreError> {
        validate_job(job)?;
        validate_world_size(world_size, limits)?;
        if previous_committed_step.is_some_and(|p| p >= step) {
            return Err(CoreError::Conflict {
                job: job.into(),
                step,
                reason: "the previous committed step is not before this step".into(),
            });
        }
        Ok(SaveState {
            job: job.into(),
            step,
            world_size,
            created_unix_ms,
            previous_committed_step,
            metadata,
            ranks: BTreeMap::new(),
            refs: BTreeMap::new(),
            chunk_refs: 0,
            index_bytes: 0,
            slices: SliceMap::default(),
            phase: SavePhase::Open,
            error: None,
            manifest_hash: None,
            part: None,
        })
    }

    /// Makes this save one node's part of a save split over nodes (before any index).
    pub fn split(mut self, part: PartOf) -> Result<SaveState, CoreError> {
        part.check(self.world_size)?;
        self.part = Some(part);
        Ok(self)
    }

    /// The save's fields without its ranks' indexes: what the journal keeps under the save's
    /// own key (each rank's index has its own).
    pub fn clone_fields(&self) -> SaveState {
        SaveState {
            job: self.job.clone(),
            step: self.step,
            world_size: self.world_size,
            created_unix_ms: self.created_unix_ms,
            previous_committed_step: self.previous_committed_step,
            metadata: self.metadata.clone(),
            ranks: BTreeMap::new(),
            refs: BTreeMap::new(),
            chunk_refs: 0,
            index_bytes: 0,
            slices: SliceMap::default(),
            phase: self.phase,
            error: self.error.clone(),
            manifest_hash: self.manifest_hash.clone(),
            part: self.part,
        }
    }

    fn conflict(&self, reason: String) -> CoreError {
        CoreError::Conflict { job: self.job.clone(), step: self.step, reason }
    }

    /// A second open of the same save (another rank, or a retry) must agree on the world size,
    /// and on the metadata if both carry some. Metadata given late fills in a save opened
    /// without it.
    pub fn reopen(
        &mut self,
        world_size: u32,
        metadata: serde_json::Value,
        part: Option<PartOf>,
    ) -> Result<(), CoreError> {
        if world_size != self.world_size {
            return Err(self.conflict(format!("opened with world size {}, not {world_size}", self.world_size)));
        }
        if part != self.part {
            // A save opened whole that holds no index yet may still be split: its first open
            // came from a ckptd that did not know split saves (a rolling upgrade).
            let adoptable = self.part.is_none() && self.ranks.is_empty() && self.phase == SavePhase::Open;
            match part {
                Some(p) if adoptable => {
                    p.check(self.world_size)?;
                    self.part = Some(p);
                }
                _ => return Err(self.conflict(format!("opened for node ranks {:?}, not {part:?}", self.part))),
            }
        }
        if !metadata.is_null() {
            if self.metadata.is_null() && self.phase == SavePhase::Open {
                self.metadata = metadata;
            } else if metadata != self.metadata {
                return Err(self.conflict("opened with different metadata".into()));
            }
        }
        Ok(())
    }

    pub fn accept_index(&mut self, index: ShardIndex, limits: &Limits) -> Result<IndexOutcome, CoreError> {
        let r = index_object(&index).1;
        self.accept_index_with(index, r, limits)
    }

    /// As `accept_index`, with the index object's reference already computed by the caller
    /// (`commit::index_object`), so a service can serialise outside its lock.
    pub fn accept_index_with(
        &mut self,
        index: ShardIndex,
        object: IndexRef,
        limits: &Limits,
    ) -> Result<IndexOutcome, CoreError> {
        if self.check_index(&index, limits)? == IndexOutcome::Duplicate {
            return Ok(IndexOutcome::Duplicate);
        }
        self.insert_rank(index, Some(object));
        if self.all_ranks_in() {
            self.transition(SavePhase::Staged)?;
        }
        Ok(IndexOutcome::New)
    }

    /// Whether `accept_index` would take `index` (and as what), changing nothing: a service
    /// journals an index between this check and accepting it.
    pub fn check_index(&self, index: &ShardIndex, limits: &Limits) -> Result<IndexOutcome, CoreError> {
        index.validate(self.world_size, limits)?;
        if let Some(p) = self.part.filter(|p| !p.contains(index.rank)) {
            return Err(CoreError::InvalidManifest(format!(
                "rank {} is not among this node's ranks {}..{} of the save",
                index.rank, p.first, p.end
            )));
        }
        if let Some(held) = self.ranks.get(&index.rank) {
            return if held == index {
                Ok(IndexOutcome::Duplicate)
            } else {
                Err(self.conflict(format!("rank {} already sent a different shard index", index.rank)))
            };
        }
        if self.phase != SavePhase::Open {
            return Err(self.conflict(format!("save is {}, it takes no new shard index", self.phase.name())));
        }
        self.slices.check(index)?;
        Ok(IndexOutcome::New)
    }

    fn insert_rank(&mut self, index: ShardIndex, object: Option<IndexRef>) {
        self.slices.insert(&index);
        let object = object.unwrap_or_else(|| index_object(&index).1);
        self.index_bytes += object.bytes;
        self.refs.insert(index.rank, object);
        self.chunk_refs += index.tensors.iter().map(|t| t.chunks.len() as u64).sum::<u64>();
        self.ranks.insert(index.rank, index);
    }

    /// Restores the indexes journalled for this save after a restart. A crash between a rank's
    /// journal entry and the save's own can leave every rank in while the save says open; that
    /// save is staged.
    pub fn restore_ranks(&mut self, ranks: impl IntoIterator<Item = ShardIndex>) -> Result<(), CoreError> {
        for index in ranks {
            if index.rank >= self.world_size {
                return Err(CoreError::RankOutOfRange { rank: index.rank, world_size: self.world_size });
            }
            self.insert_rank(index, None);
        }
        if self.phase == SavePhase::Open && self.all_ranks_in() {
            self.transition(SavePhase::Staged)?;
        }
        Ok(())
    }

    /// Every rank this node expects (all of them, or its part's) is in.
    pub fn all_ranks_in(&self) -> bool {
        self.ranks.len() == self.expected_ranks().len()
    }

    pub fn expected_ranks(&self) -> std::ops::Range<u32> {
        self.part.map_or(0..self.world_size, |p| p.first..p.end)
    }

    pub fn missing_ranks(&self) -> Vec<u32> {
        self.expected_ranks().filter(|r| !self.ranks.contains_key(r)).collect()
    }

    /// The caller has checked that every chunk in `chunks()` is durable.
    pub fn mark_durable(&mut self) -> Result<(), CoreError> {
        self.transition(SavePhase::Durable)
    }

    /// The commit object. Only in `durable`: every chunk it names is durable.
    pub fn root(&self) -> Result<Root, CoreError> {
        if self.phase != SavePhase::Durable {
            return Err(self.invalid(SavePhase::Committed));
        }
        self.build_root()
    }

    /// This node's part of a split save. Only in `durable`, like the root.
    pub fn part(&self) -> Result<Part, CoreError> {
        let Some(of) = self.part else {
            return Err(CoreError::InvalidManifest("the save is not split over nodes".into()));
        };
        if self.phase != SavePhase::Durable {
            return Err(self.invalid(SavePhase::Committed));
        }
        let ranks = self
            .ranks
            .values()
            .map(|i| PartRank {
                object: self.refs.get(&i.rank).copied().unwrap_or_else(|| index_object(i).1),
                index: i.clone(),
            })
            .collect();
        Ok(Part {
            format: PART_FORMAT.into(),
            version: PART_FORMAT_VERSION,
            job: self.job.clone(),
            step: self.step,
            world_size: self.world_size,
            of,
            created_unix_ms: self.created_unix_ms,
            previous_committed_step: self.previous_committed_step,
            metadata: self.metadata.clone(),
            ranks,
            hash: String::new(),
        }
        .sealed())
    }

    /// The root of a split save from every node's part (sorted by first rank, covering the
    /// world): the same bytes whichever node builds it. Every rank's index passes the same
    /// checks as on one node (the overlap rule across all ranks); parts that disagree on the
    /// save's identity or metadata are a conflict.
    pub fn root_of_parts(parts: &[&Part], limits: &Limits) -> Result<Root, CoreError> {
        let lead = parts
            .first()
            .filter(|p| p.of.first == 0)
            .ok_or_else(|| CoreError::InvalidManifest("no part holds rank 0".into()))?;
        let mut all = SaveState::open(
            &lead.job,
            lead.step,
            lead.world_size,
            lead.created_unix_ms,
            lead.previous_committed_step,
            lead.metadata.clone(),
            limits,
        )?;
        for p in parts.iter().copied() {
            if (p.job.as_str(), p.step, p.world_size, p.of.epoch)
                != (lead.job.as_str(), lead.step, lead.world_size, lead.of.epoch)
            {
                return Err(all.conflict(format!("the part of ranks {}..{} is of another save", p.of.first, p.of.end)));
            }
            if p.metadata != lead.metadata {
                return Err(all.conflict(format!(
                    "the part of ranks {}..{} carries other metadata than rank 0's",
                    p.of.first, p.of.end
                )));
            }
            for r in &p.ranks {
                all.check_index(&r.index, limits)?;
                all.insert_rank(r.index.clone(), Some(r.object));
            }
        }
        if !all.all_ranks_in() {
            return Err(CoreError::InvalidManifest(format!("parts miss ranks {:?}", all.missing_ranks())));
        }
        all.build_root()
    }

    /// Whether `root` commits this save: for a save on one node, the root it builds; for a
    /// node's part of a split save, a root of the same save naming this node's index objects.
    pub fn committed_by(&self, root: &Root) -> bool {
        match self.part {
            None => self.all_ranks_in() && self.build_root().is_ok_and(|b| b == *root),
            Some(p) => {
                (root.job.as_str(), root.step, root.world_size) == (self.job.as_str(), self.step, self.world_size)
                    && root.metadata == self.metadata
                    && self.all_ranks_in()
                    && root.ranks.get(p.first as usize..p.end as usize).is_some_and(|committed| {
                        committed
                            .iter()
                            .zip(self.ranks.values())
                            .all(|(c, i)| *c == self.refs.get(&i.rank).copied().unwrap_or_else(|| index_object(i).1))
                    })
            }
        }
    }

    /// The root this save commits as, in any phase once every rank is in; recovery compares it
    /// with a root found in the store.
    pub fn build_root(&self) -> Result<Root, CoreError> {
        let fields = RootFields {
            job: &self.job,
            step: self.step,
            world_size: self.world_size,
            created_unix_ms: self.created_unix_ms,
            previous_committed_step: self.previous_committed_step,
            metadata: &self.metadata,
        };
        Root::build(
            fields,
            self.ranks.values().map(|i| (i, self.refs.get(&i.rank).copied().unwrap_or_else(|| index_object(i).1))),
        )
    }

    pub fn mark_committed(&mut self, manifest_hash: String) -> Result<(), CoreError> {
        self.transition(SavePhase::Committed)?;
        self.manifest_hash = Some(manifest_hash);
        Ok(())
    }

    pub fn abort(&mut self, reason: String) -> Result<(), CoreError> {
        self.transition(SavePhase::Aborted)?;
        self.error = Some(reason);
        Ok(())
    }

    fn invalid(&self, to: SavePhase) -> CoreError {
        CoreError::InvalidTransition { job: self.job.clone(), step: self.step, from: self.phase.name(), to: to.name() }
    }

    fn transition(&mut self, to: SavePhase) -> Result<(), CoreError> {
        if !self.phase.may_become(to) {
            return Err(self.invalid(to));
        }
        if to == SavePhase::Staged {
            debug_assert!(self.all_ranks_in());
        }
        self.phase = to;
        Ok(())
    }
}

/// What the service reports about a save; the same type on both ends of the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveStatus {
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub phase: SavePhase,
    pub ranks_received: u32,
    pub error: Option<String>,
    pub manifest_hash: Option<String>,
    /// The ranks this node serves when the save is split over nodes; a ckptd that does not know
    /// split saves leaves it out, which is how a client tells it would wait for every rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartOf>,
    /// Its commit is under way: every rank is in and the root is being written. Left out when
    /// false (and by a ckptd that does not report it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committing: bool,
}

impl SaveStatus {
    pub fn of(s: &SaveState) -> SaveStatus {
        SaveStatus {
            job: s.job.clone(),
            step: s.step,
            world_size: s.world_size,
            phase: s.phase,
            ranks_received: s.ranks.len() as u32,
            error: s.error.clone(),
            manifest_hash: s.manifest_hash.clone(),
            part: s.part,
            committing: false,
        }
    }

    pub fn committed(m: &crate::manifest::ManifestSummary) -> SaveStatus {
        SaveStatus {
            job: m.job.clone(),
            step: m.step,
            world_size: m.world_size,
            phase: SavePhase::Committed,
            ranks_received: m.world_size,
            error: None,
            manifest_hash: Some(m.hash.clone()),
            part: None,
            committing: false,
        }
    }
}

/// A job's checkpoints: committed ones (oldest first) and saves in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointList {
    pub job: String,
    pub committed: Vec<crate::manifest::ManifestSummary>,
    pub in_flight: Vec<SaveStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::tests::tensor;

    fn index(rank: u32) -> ShardIndex {
        // Each rank its own tensor: ranks saving one whole tensor must save identical bytes.
        ShardIndex {
            rank,
            tensors: vec![tensor(&format!("w{rank}"), &[rank as u8; 10], 4)],
            metadata: serde_json::Value::Null,
        }
    }

    #[test]
    fn overlapping_slices_must_be_identical_replicas() {
        let l = Limits::default();
        let mut s = SaveState::open("j", 5, 3, 1, None, serde_json::Value::Null, &l).unwrap();
        let whole = |rank, fill: u8| ShardIndex {
            rank,
            tensors: vec![tensor("w", &[fill; 10], 4)],
            metadata: serde_json::Value::Null,
        };
        s.accept_index(whole(0, 1), &l).unwrap();
        s.accept_index(whole(1, 1), &l).unwrap();
        let err = s.accept_index(whole(2, 2), &l).unwrap_err();
        assert!(err.to_string().contains("replicas must be identical"), "{err}");
        assert_eq!(s.ranks.len(), 2, "a refused index is not kept");
    }

    #[test]
    fn happy_path() {
        let l = Limits::default();
        let mut s = SaveState::open("j", 5, 2, 1, None, serde_json::Value::Null, &l).unwrap();
        assert_eq!(s.accept_index(index(1), &l).unwrap(), IndexOutcome::New);
        assert_eq!(s.phase, SavePhase::Open);
        assert_eq!(s.missing_ranks(), vec![0]);
        assert!(s.root().is_err(), "no root before durable");
        assert_eq!(s.accept_index(index(1), &l).unwrap(), IndexOutcome::Duplicate);
        s.accept_index(index(0), &l).unwrap();
        assert_eq!(s.phase, SavePhase::Staged);
        assert_eq!(s.chunk_refs, 6);
        let objects = [index(0), index(1)].iter().map(|i| index_object(i).0.len() as u64).sum::<u64>();
        assert_eq!(s.index_bytes, objects);
        assert!(s.root().is_err(), "no root before durable");
        s.mark_durable().unwrap();
        let m = s.root().unwrap();
        assert_eq!(m.ranks.len(), 2);
        assert_eq!(m.chunks, 4, "identical chunks are one chunk");
        // The journal holds the fields without the ranks; restoring the ranks gives the same root.
        let mut back: SaveState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert!(back.ranks.is_empty());
        back.restore_ranks(s.ranks.values().cloned()).unwrap();
        assert_eq!(back.root().unwrap().to_bytes(), m.to_bytes());
        s.mark_committed(m.hash.clone()).unwrap();
        assert!(s.abort("late".into()).is_err(), "committed is final");
        assert!(s.mark_durable().is_err());
    }

    #[test]
    fn conflicts_and_bad_input() {
        let l = Limits::default();
        let mut s = SaveState::open("j", 5, 2, 1, None, serde_json::json!({"a": 1}), &l).unwrap();
        assert!(s.reopen(3, serde_json::Value::Null, None).is_err(), "world size differs");
        assert!(s.reopen(2, serde_json::json!({"a": 2}), None).is_err(), "metadata differs");
        let part = PartOf { first: 0, end: 1, epoch: 1 };
        s.reopen(2, serde_json::Value::Null, None).unwrap();
        s.reopen(2, serde_json::json!({"a": 1}), None).unwrap();
        assert!(matches!(s.accept_index(index(2), &l), Err(CoreError::RankOutOfRange { .. })));
        s.accept_index(index(0), &l).unwrap();
        assert!(s.reopen(2, serde_json::Value::Null, Some(part)).is_err(), "split once an index is in");
        let mut other = index(0);
        other.metadata = serde_json::json!("x");
        assert!(matches!(s.accept_index(other, &l), Err(CoreError::Conflict { .. })));
        s.abort("operator".into()).unwrap();
        assert!(s.accept_index(index(1), &l).is_err(), "aborted takes nothing");
        assert!(SaveState::open("j", 1, 0, 0, None, serde_json::Value::Null, &l).is_err());
        assert!(SaveState::open("../x", 1, 1, 0, None, serde_json::Value::Null, &l).is_err());
    }

    #[test]
    fn transition_table() {
        use SavePhase::*;
        let all = [Open, Staged, Durable, Committed, Aborted];
        let allowed: Vec<_> =
            all.iter().flat_map(|a| all.iter().map(move |b| (*a, *b))).filter(|(a, b)| a.may_become(*b)).collect();
        assert_eq!(
            allowed,
            vec![
                (Open, Staged),
                (Open, Aborted),
                (Staged, Durable),
                (Staged, Aborted),
                (Durable, Committed),
                (Durable, Aborted)
            ]
        );
    }

    /// A world of `world` ranks saved by one node, and the same save split at `cuts` over nodes.
    fn one_and_split(world: u32, cuts: &[u32], l: &Limits) -> (Root, Vec<Part>) {
        let meta = serde_json::json!({"m": 1});
        let mut one = SaveState::open("j", 9, world, 77, Some(3), meta.clone(), l).unwrap();
        for r in 0..world {
            one.accept_index(index(r), l).unwrap();
        }
        one.mark_durable().unwrap();
        let bounds: Vec<u32> = std::iter::once(0).chain(cuts.iter().copied()).chain([world]).collect();
        let parts = bounds
            .windows(2)
            .map(|w| {
                let of = PartOf { first: w[0], end: w[1], epoch: 4 };
                // Only rank 0's node's fields reach the root; the others' clocks differ.
                let created = if w[0] == 0 { 77 } else { 1000 + w[0] as u64 };
                let mut s =
                    SaveState::open("j", 9, world, created, Some(3), meta.clone(), l).unwrap().split(of).unwrap();
                for r in w[0]..w[1] {
                    s.accept_index(index(r), l).unwrap();
                }
                assert!(s.all_ranks_in() && s.phase == SavePhase::Staged);
                assert!(s.root().is_err());
                s.mark_durable().unwrap();
                let p = s.part().unwrap();
                assert_eq!(Part::from_bytes(&p.to_bytes(), l).unwrap(), p);
                p
            })
            .collect();
        (one.root().unwrap(), parts)
    }

    #[test]
    fn a_split_save_commits_the_root_one_node_would() {
        let l = Limits::default();
        let (root, parts) = one_and_split(7, &[2, 3, 6], &l);
        let split = SaveState::root_of_parts(&parts.iter().collect::<Vec<_>>(), &l).unwrap();
        assert_eq!(split.to_bytes(), root.to_bytes(), "same bytes whoever builds the root");
        // Each node recognises the root as its save's commit; another save's root it does not.
        for p in &parts {
            let mut s = SaveState::open("j", 9, 7, 5, Some(3), p.metadata.clone(), &l).unwrap().split(p.of).unwrap();
            s.restore_ranks(p.ranks.iter().map(|r| r.index.clone())).unwrap();
            assert!(s.committed_by(&root));
        }
        let (other, _) = one_and_split(8, &[], &l);
        let mut s =
            SaveState::open("j", 9, 7, 5, Some(3), parts[1].metadata.clone(), &l).unwrap().split(parts[1].of).unwrap();
        s.restore_ranks(parts[1].ranks.iter().map(|r| r.index.clone())).unwrap();
        assert!(!s.committed_by(&other));
    }

    #[test]
    fn parts_that_do_not_fit_are_refused() {
        let l = Limits::default();
        let (_, parts) = one_and_split(6, &[3], &l);
        let of = |f, e| PartOf { first: f, end: e, epoch: 4 };
        assert!(crate::part::covers(&[&of(0, 3), &of(3, 6)], 6).unwrap());
        assert!(!crate::part::covers(&[&of(0, 3)], 6).unwrap(), "a part is missing");
        assert!(!crate::part::covers(&[&of(3, 6)], 6).unwrap());
        assert!(crate::part::covers(&[&of(0, 3), &of(2, 6)], 6).is_err(), "overlap");
        assert!(SaveState::root_of_parts(&parts[1..].iter().collect::<Vec<_>>(), &l).is_err(), "no rank 0");
        assert!(SaveState::root_of_parts(&parts[..1].iter().collect::<Vec<_>>(), &l).is_err(), "ranks missing");
        let mut meta = parts.clone();
        meta[1].metadata = serde_json::json!({"m": 2});
        assert!(matches!(
            SaveState::root_of_parts(&meta.iter().collect::<Vec<_>>(), &l),
            Err(CoreError::Conflict { .. })
        ));
        let mut epoch = parts.clone();
        epoch[1].of.epoch = 5;
        assert!(matches!(
            SaveState::root_of_parts(&epoch.iter().collect::<Vec<_>>(), &l),
            Err(CoreError::Conflict { .. })
        ));
        // A damaged part is refused when read.
        let mut bytes = parts[1].to_bytes();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        assert!(Part::from_bytes(&bytes, &l).is_err());
        // A node takes no index of a rank outside its part.
        let mut s = SaveState::open("j", 9, 6, 5, None, serde_json::Value::Null, &l).unwrap().split(of(3, 6)).unwrap();
        assert!(s.accept_index(index(1), &l).is_err());
        assert!(SaveState::open("j", 9, 6, 5, None, serde_json::Value::Null, &l).unwrap().split(of(3, 7)).is_err());
        s.accept_index(index(3), &l).unwrap();
        assert_eq!(s.missing_ranks(), vec![4, 5]);
        assert!(s.reopen(6, serde_json::Value::Null, None).is_err(), "a split save stays split");
        // A save opened whole and still empty (by a ckptd that did not know splits) takes one.
        let mut whole = SaveState::open("j", 9, 6, 5, None, serde_json::Value::Null, &l).unwrap();
        whole.reopen(6, serde_json::Value::Null, Some(of(3, 6))).unwrap();
        assert_eq!(whole.part, Some(of(3, 6)));
        assert!(whole.reopen(6, serde_json::Value::Null, Some(of(0, 3))).is_err());
    }

    #[test]
    fn a_status_says_committing_only_when_it_is() {
        let s = SaveState::open("j", 5, 2, 1, None, serde_json::Value::Null, &Limits::default()).unwrap();
        let quiet = serde_json::to_value(SaveStatus::of(&s)).unwrap();
        assert!(quiet.get("committing").is_none(), "{quiet}");
        let busy = SaveStatus { committing: true, ..SaveStatus::of(&s) };
        let wire = serde_json::to_value(&busy).unwrap();
        assert_eq!(wire["committing"], true, "{wire}");
        let back: SaveStatus = serde_json::from_value(wire).unwrap();
        assert_eq!(back, busy);
        // A ckptd that does not report it reads as not committing.
        let old: SaveStatus = serde_json::from_value(quiet).unwrap();
        assert!(!old.committing);
    }
}
