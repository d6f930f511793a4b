//! Parts: how a save split over several ckptd nodes commits with the store as the only
//! coordination.
//!
//! ```text
//! jobs/<job>/parts/<step:020>/<epoch:020>/<first:010>-<end:010>.json
//!     one node's part of a save: its ranks first..end, each rank's shard index and the
//!     reference of its index object (already durable), and the save's fields as that node
//!     opened it; sealed by its own hash
//! ```
//!
//! Design note.
//! * A node writes its part once every chunk and index object of its ranks is durable. The
//!   root is a pure function of the parts: ranks, layout and sizes from all of them, creation
//!   time, previous committed step and metadata from the part holding rank 0 (every part must
//!   carry the same metadata). So whichever node builds it, the root has the same bytes, and
//!   the root's create-only put stays the single commit point.
//! * Who looks: the node holding rank 0 (the leader) lists the step's parts prefix, one LIST
//!   (a page per 1,000 parts) per poll, polls backing off to `commit_retry_ms`; every other
//!   node only reads the root's key. A node whose part has waited `part_takeover_ms` (later the
//!   higher its first rank, so takeovers are staggered) lists too, so a leader that died after
//!   writing its part does not stop the commit. At 2,048 nodes that is a few LIST pages per
//!   poll from one node, not a LIST per node per checkpoint; the leader reads each part once.
//! * Parts are named by the writer's epoch (the elastic agent's generation). One decision per
//!   (step, epoch) is created create-only next to the parts: "commit" by the node about to
//!   create the root, "abort" by any node aborting its share. Whichever is first holds: a node
//!   told "commit" keeps waiting for the root instead of aborting, a builder told "abort" does
//!   not create the root, and a save aborted in an epoch cannot be opened again in it (the
//!   trainer retries with a new epoch), so parts of two attempts are never mixed.
//! * A part is not a commit: parts of a save that never commits stay invisible (no root).

use serde::{Deserialize, Serialize};

use crate::commit::IndexRef;
use crate::error::CoreError;
use crate::seal::{check_seal, seal, Sealed};
use crate::shard::ShardIndex;
use crate::validate::{validate_job, validate_world_size, Limits};

pub const PART_FORMAT: &str = "ckpt.part";
pub const PART_FORMAT_VERSION: u32 = 1;

/// The ranks a node serves in a save split over nodes, `first..end`, and the writers' epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOf {
    pub first: u32,
    pub end: u32,
    pub epoch: u64,
}

impl PartOf {
    pub fn contains(&self, rank: u32) -> bool {
        (self.first..self.end).contains(&rank)
    }

    pub fn ranks(&self) -> u32 {
        self.end - self.first
    }

    /// The node holding rank 0 leads: it lists the parts and writes the root.
    pub fn leads(&self) -> bool {
        self.first == 0
    }

    pub fn check(&self, world_size: u32) -> Result<(), CoreError> {
        if self.first >= self.end || self.end > world_size {
            return Err(CoreError::InvalidManifest(format!(
                "node ranks {}..{} are not a non-empty range within world size {world_size}",
                self.first, self.end
            )));
        }
        Ok(())
    }
}

/// One rank in a part: its index and where its (durable) index object is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRank {
    pub object: IndexRef,
    pub index: ShardIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub format: String,
    pub version: u32,
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub of: PartOf,
    /// The save's fields as this node opened it; the root takes rank 0's part's.
    pub created_unix_ms: u64,
    pub previous_committed_step: Option<u64>,
    pub metadata: serde_json::Value,
    /// Ranks `of.first..of.end`, in order.
    pub ranks: Vec<PartRank>,
    pub hash: String,
}

impl Sealed for Part {
    fn hash_field(&mut self) -> &mut String {
        &mut self.hash
    }
}

impl Part {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Seals a part built by `SaveState::part`.
    pub(crate) fn sealed(mut self) -> Part {
        self.hash = seal(&self);
        self
    }

    /// Parses and checks a stored part: format, seal, and that it holds exactly its ranks.
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Part, CoreError> {
        let bad = |m: String| CoreError::InvalidManifest(format!("part: {m}"));
        let p: Part = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a part: {e}")))?;
        if p.format != PART_FORMAT || p.version != PART_FORMAT_VERSION {
            return Err(bad(format!(
                "format {:?} version {} (this ckptd reads {PART_FORMAT} version {PART_FORMAT_VERSION})",
                p.format, p.version
            )));
        }
        check_seal(&p)?;
        validate_job(&p.job)?;
        validate_world_size(p.world_size, limits)?;
        p.of.check(p.world_size)?;
        if p.ranks.len() != p.of.ranks() as usize {
            return Err(bad(format!("{} ranks for {}..{}", p.ranks.len(), p.of.first, p.of.end)));
        }
        for (r, pr) in (p.of.first..).zip(&p.ranks) {
            if pr.index.rank != r {
                return Err(bad(format!("rank {} where rank {r} belongs", pr.index.rank)));
            }
            pr.index.validate(p.world_size, limits)?;
        }
        Ok(p)
    }
}

/// What the first node to decide said about a split save (`keys::part_decision_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Commit,
    Abort,
}

/// The stored form of a decision (`keys::part_decision_key`), written and read by this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub decision: Decision,
}

/// Whether `parts` (sorted by first rank) cover ranks 0..world_size exactly once.
pub fn covers(parts: &[&PartOf], world_size: u32) -> Result<bool, CoreError> {
    let mut next = 0u32;
    for p in parts {
        if p.first < next {
            return Err(CoreError::InvalidManifest(format!(
                "parts overlap at rank {} (nodes were given different rank ranges in one epoch)",
                p.first
            )));
        }
        if p.first > next {
            return Ok(false);
        }
        next = p.end;
    }
    Ok(next == world_size)
}
