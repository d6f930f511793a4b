//! The commit object (format version 2): a small root that names one index object per rank.
//!
//! ```text
//! jobs/<job>/manifests/<step:020>.json   root: job, step, world size, metadata, creation time,
//!                                        previous committed step, per rank {hash, bytes} of its
//!                                        index object, and a row layout per tensor name
//! jobs/<job>/indexes/<hh>/<hash>.json    one rank's shard index, content-addressed (blake3 of its bytes)
//! ```
//!
//! Why: a single manifest holding every rank's chunk list is O(world size × chunks) bytes that
//! every restoring rank must fetch and parse (well over 100 MB for a 405B job), and rewriting it
//! per accepted index is O(world size) per request. The root is O(world size) with a small
//! constant (about 90 bytes a rank), a rank's restore reads the root and its own index object,
//! and a resharding rank finds the index objects that hold its rows through the layout.
//!
//! * The root's bytes are a pure function of what the ranks sent and of what was fixed when the
//!   save opened (creation time, previous committed step): a retried create, a lost
//!   acknowledgement or another writer of the same save produces identical bytes, so "already
//!   exists" with the same bytes means committed.
//! * Index objects are written (durably) only once every chunk they list is durable, and all of
//!   them before the root: the root's create-only put is the single commit point.
//! * Layout: for each tensor name, runs of ranks whose slices step regularly through dimension 0
//!   (`RowRun`). A row-split tensor over any number of ranks is one or two runs; replicas are runs
//!   with stride 0. Readers use it only to pick index objects, then check each against it.
//! * Version 1 stores (one manifest with every index inline) stay readable: `CommitObject::parse`
//!   recognises both, and `Root::from_v1` gives the same view of an old manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::hash::ChunkHash;
use crate::manifest::{Manifest, ManifestSummary, MANIFEST_FORMAT};
use crate::seal::{check_common, check_seal, seal, Sealed};
use crate::shard::{DType, ShardIndex};
use crate::validate::Limits;

pub const ROOT_FORMAT: &str = "ckpt.root";
pub const ROOT_FORMAT_VERSION: u32 = 2;

/// Where a rank's index object is: its content address and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IndexRef {
    pub hash: ChunkHash,
    pub bytes: u64,
}

/// Ranks `first_rank .. first_rank + ranks` hold rows `start + i * stride .. + rows` of a
/// tensor's dimension 0 (i counts from 0). Serialised as a 5-element array to keep roots small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRun(pub u32, pub u32, pub u64, pub u64, pub u64);

impl RowRun {
    pub fn first_rank(&self) -> u32 {
        self.0
    }
    pub fn ranks(&self) -> u32 {
        self.1
    }
    /// The rows rank `first_rank + i` holds.
    pub fn rows_of(&self, i: u32) -> Range<u64> {
        let start = self.2.saturating_add((i as u64).saturating_mul(self.4));
        start..start.saturating_add(self.3)
    }
}

/// One global tensor: its type and shape, and which ranks hold which rows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorLayout {
    pub name: String,
    pub dtype: DType,
    pub global_shape: Vec<u64>,
    pub runs: Vec<RowRun>,
}

impl TensorLayout {
    /// Ranks whose slice of this tensor overlaps `rows` of dimension 0, ascending; of ranks
    /// holding the same rows (replicas, byte-identical by the save rule in `layout.rs`) only the
    /// lowest.
    pub fn ranks_overlapping(&self, rows: &Range<u64>) -> Vec<u32> {
        let mut found: Vec<(u64, u64, u32)> = Vec::new();
        for run in &self.runs {
            for i in 0..run.ranks() {
                let r = run.rows_of(i);
                if r.start < rows.end && rows.start < r.end {
                    found.push((r.start, r.end, run.first_rank() + i));
                }
            }
        }
        found.sort_unstable();
        found.dedup_by_key(|(start, end, _)| (*start, *end));
        let mut out: Vec<u32> = found.into_iter().map(|(_, _, rank)| rank).collect();
        out.sort_unstable();
        out
    }

    /// Distinct row ranges held, sorted by start (replicas counted once).
    pub fn row_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> =
            self.runs.iter().flat_map(|run| (0..run.ranks()).map(move |i| run.rows_of(i))).collect();
        out.sort_by_key(|r| (r.start, r.end));
        out.dedup();
        out
    }

    /// Whether the layout says `rank` holds `rows` (exactly) of this tensor.
    pub fn says(&self, rank: u32, rows: &Range<u64>) -> bool {
        self.runs.iter().any(|run| {
            rank >= run.first_rank()
                && rank - run.first_rank() < run.ranks()
                && run.rows_of(rank - run.first_rank()) == *rows
        })
    }
}

/// Dimension-0 rows of a slice; a scalar (no dimensions) is row 0.
fn slice_rows(offsets: &[u64], shape: &[u64]) -> Range<u64> {
    let start = offsets.first().copied().unwrap_or(0);
    start..start.saturating_add(shape.first().copied().unwrap_or(1))
}

/// The canonical bytes of a rank's index object and their address. Compact JSON with fields in
/// declaration order and sorted maps, so the same index always has the same address.
pub fn index_object(index: &ShardIndex) -> (Vec<u8>, IndexRef) {
    // Serialising plain structs, strings and serde_json values cannot fail.
    let bytes = serde_json::to_vec(index).unwrap_or_default();
    let r = IndexRef { hash: ChunkHash::of(&bytes), bytes: bytes.len() as u64 };
    (bytes, r)
}

/// Parses an index object fetched by its reference, checking its length, its address, that it
/// is the index of `rank`, and its structure.
pub fn parse_index_object(
    bytes: &[u8],
    expected: &IndexRef,
    rank: u32,
    world_size: u32,
    limits: &Limits,
) -> Result<ShardIndex, CoreError> {
    let bad = |m: String| CoreError::InvalidShardIndex(format!("index object of rank {rank}: {m}"));
    if bytes.len() as u64 != expected.bytes {
        return Err(bad(format!("{} bytes, the root says {}", bytes.len(), expected.bytes)));
    }
    let actual = ChunkHash::of(bytes);
    if actual != expected.hash {
        return Err(bad(format!("content hashes to {actual}, the root names {}", expected.hash)));
    }
    let index: ShardIndex = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a shard index: {e}")))?;
    if index.rank != rank {
        return Err(bad(format!("it is the index of rank {}", index.rank)));
    }
    index.validate(world_size, limits)?;
    Ok(index)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub format: String,
    pub version: u32,
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    pub created_unix_ms: u64,
    /// The newest step committed before this save opened, if any.
    pub previous_committed_step: Option<u64>,
    /// Free-form trainer metadata for the whole checkpoint.
    pub metadata: serde_json::Value,
    /// Logical bytes of all ranks' tensors.
    pub bytes: u64,
    /// Distinct chunks referenced.
    pub chunks: u64,
    /// Rank r's index object is `ranks[r]`.
    pub ranks: Vec<IndexRef>,
    /// One entry per tensor name, sorted by name.
    pub tensors: Vec<TensorLayout>,
    /// blake3 of this root serialised with `hash` set to "".
    pub hash: String,
}

/// A tensor's type, global shape and (rank, rows) slices, gathered while a root is built.
type Slices<'a> = (DType, &'a [u64], Vec<(u32, Range<u64>)>);

impl Sealed for Root {
    fn hash_field(&mut self) -> &mut String {
        &mut self.hash
    }
}

/// What the caller knows about a save when it builds its root.
pub struct RootFields<'a> {
    pub job: &'a str,
    pub step: u64,
    pub world_size: u32,
    pub created_unix_ms: u64,
    pub previous_committed_step: Option<u64>,
    pub metadata: &'a serde_json::Value,
}

impl Root {
    /// Builds and seals the root of a save from every rank's index (in rank order) and its
    /// index object's reference. Fails if a rank is missing or the layout is inconsistent.
    pub fn build<'a>(
        f: RootFields<'_>,
        ranks: impl Iterator<Item = (&'a ShardIndex, IndexRef)>,
    ) -> Result<Root, CoreError> {
        let mut refs = Vec::with_capacity(f.world_size as usize);
        let mut bytes = 0u64;
        let mut distinct = std::collections::HashSet::new();
        let mut slices: BTreeMap<&str, Slices<'_>> = BTreeMap::new();
        for (index, r) in ranks {
            if index.rank as usize != refs.len() {
                return Err(CoreError::InvalidManifest(format!("index of rank {} out of order", index.rank)));
            }
            refs.push(r);
            bytes = bytes.saturating_add(index.byte_len());
            for t in &index.tensors {
                distinct.extend(t.chunks.iter().map(|c| c.hash));
                let e = slices.entry(&t.name).or_insert((t.dtype, &t.global_shape, Vec::new()));
                if e.0 != t.dtype || e.1 != t.global_shape.as_slice() {
                    return Err(CoreError::InvalidManifest(format!(
                        "tensor {:?} has different types or global shapes on different ranks",
                        t.name
                    )));
                }
                e.2.push((index.rank, slice_rows(&t.offsets, &t.shape)));
            }
        }
        let tensors = slices
            .into_iter()
            .map(|(name, (dtype, global_shape, s))| TensorLayout {
                name: name.to_string(),
                dtype,
                global_shape: global_shape.to_vec(),
                runs: runs_of(&s),
            })
            .collect();
        let mut root = Root {
            format: ROOT_FORMAT.into(),
            version: ROOT_FORMAT_VERSION,
            job: f.job.into(),
            step: f.step,
            world_size: f.world_size,
            created_unix_ms: f.created_unix_ms,
            previous_committed_step: f.previous_committed_step,
            metadata: f.metadata.clone(),
            bytes,
            chunks: distinct.len() as u64,
            ranks: refs,
            tensors,
            hash: String::new(),
        };
        root.check_structure(&Limits { world_size_max: u32::MAX, ..Limits::default() })?;
        root.hash = seal(&root);
        Ok(root)
    }

    /// The same view of a version-1 manifest, whose indexes are inline.
    pub fn from_v1(m: &Manifest) -> Result<Root, CoreError> {
        let fields = RootFields {
            job: &m.job,
            step: m.step,
            world_size: m.world_size,
            created_unix_ms: m.created_unix_ms,
            previous_committed_step: m.previous_committed_step,
            metadata: &m.metadata,
        };
        let mut root = Root::build(fields, m.ranks.iter().map(|r| (r, index_object(r).1)))?;
        root.version = 1;
        root.format = MANIFEST_FORMAT.into();
        root.hash = m.hash.clone();
        Ok(root)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a stored version-2 root: format, version, hash and structure.
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Root, CoreError> {
        let r: Root =
            serde_json::from_slice(bytes).map_err(|e| CoreError::InvalidManifest(format!("not a root: {e}")))?;
        if r.format != ROOT_FORMAT || r.version != ROOT_FORMAT_VERSION {
            return Err(CoreError::InvalidManifest(format!("format {:?} version {}", r.format, r.version)));
        }
        check_seal(&r)?;
        r.check_structure(limits)?;
        Ok(r)
    }

    fn check_structure(&self, limits: &Limits) -> Result<(), CoreError> {
        let (prev, step) = (self.previous_committed_step, self.step);
        check_common(&self.job, self.world_size, self.ranks.len(), "index objects", prev, step, limits)?;
        let mut names = BTreeSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(CoreError::InvalidManifest(format!("tensor {:?} appears twice in the layout", t.name)));
            }
            for run in &t.runs {
                if run.ranks() == 0 || run.first_rank() as u64 + run.ranks() as u64 > self.world_size as u64 {
                    return Err(CoreError::InvalidManifest(format!(
                        "tensor {:?}: a layout run names ranks outside the world",
                        t.name
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorLayout> {
        self.tensors.binary_search_by(|t| t.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }

    pub fn summary(&self) -> ManifestSummary {
        ManifestSummary {
            job: self.job.clone(),
            step: self.step,
            world_size: self.world_size,
            created_unix_ms: self.created_unix_ms,
            bytes: self.bytes,
            chunks: self.chunks,
            hash: self.hash.clone(),
        }
    }
}

/// Compresses (rank, rows) slices, sorted by rank, into runs that step regularly.
fn runs_of(slices: &[(u32, Range<u64>)]) -> Vec<RowRun> {
    let mut runs: Vec<RowRun> = Vec::new();
    for (rank, rows) in slices {
        let len = rows.end - rows.start;
        if let Some(last) = runs.last_mut() {
            if *rank == last.0 + last.1 && len == last.3 {
                if last.1 == 1 && rows.start >= last.2 {
                    last.4 = rows.start - last.2;
                    last.1 += 1;
                    continue;
                }
                if Some(rows.start) == (last.1 as u64).checked_mul(last.4).and_then(|d| d.checked_add(last.2)) {
                    last.1 += 1;
                    continue;
                }
            }
        }
        runs.push(RowRun(*rank, 1, rows.start, len, 0));
    }
    runs
}

/// A stored commit object of either format version.
#[derive(Debug, Clone)]
pub enum CommitObject {
    Root(Root),
    /// A version-1 manifest with every rank's index inline.
    V1(Manifest),
}

impl CommitObject {
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<CommitObject, CoreError> {
        #[derive(Deserialize)]
        struct Head {
            format: String,
        }
        let head: Head = serde_json::from_slice(bytes)
            .map_err(|e| CoreError::InvalidManifest(format!("not a commit object: {e}")))?;
        match head.format.as_str() {
            ROOT_FORMAT => Root::from_bytes(bytes, limits).map(CommitObject::Root),
            MANIFEST_FORMAT => Manifest::from_bytes(bytes, limits).map(CommitObject::V1),
            other => Err(CoreError::InvalidManifest(format!("unknown format {other:?}"))),
        }
    }

    pub fn summary(&self) -> ManifestSummary {
        match self {
            CommitObject::Root(r) => r.summary(),
            CommitObject::V1(m) => m.summary(),
        }
    }

    pub fn job(&self) -> &str {
        match self {
            CommitObject::Root(r) => &r.job,
            CommitObject::V1(m) => &m.job,
        }
    }

    pub fn step(&self) -> u64 {
        match self {
            CommitObject::Root(r) => r.step,
            CommitObject::V1(m) => m.step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{ChunkRef, TensorEntry};

    fn rows_index(rank: u32, rows: u64, world: u32) -> ShardIndex {
        let data = vec![rank as u8; (rows * 4) as usize];
        ShardIndex {
            rank,
            tensors: vec![TensorEntry {
                name: "w".into(),
                dtype: DType::U8,
                shape: vec![rows, 4],
                global_shape: vec![rows * world as u64, 4],
                offsets: vec![rows * rank as u64, 0],
                chunks: vec![ChunkRef { hash: ChunkHash::of(&data), len: data.len() as u64 }],
            }],
            metadata: serde_json::Value::Null,
        }
    }

    fn fields(world: u32) -> (serde_json::Value, u32) {
        (serde_json::json!({"b": 1, "a": [1, 2]}), world)
    }

    fn build(indexes: &[ShardIndex]) -> Root {
        let (meta, world) = fields(indexes.len() as u32);
        let f = RootFields {
            job: "job",
            step: 9,
            world_size: world,
            created_unix_ms: 5,
            previous_committed_step: Some(3),
            metadata: &meta,
        };
        Root::build(f, indexes.iter().map(|i| (i, index_object(i).1))).unwrap()
    }

    #[test]
    fn root_is_deterministic_sealed_and_small() {
        let world = 1024;
        let indexes: Vec<_> = (0..world).map(|r| rows_index(r, 3, world)).collect();
        let root = build(&indexes);
        let again = build(&indexes);
        assert_eq!(root.to_bytes(), again.to_bytes(), "same input, same bytes");
        assert_eq!(Root::from_bytes(&root.to_bytes(), &Limits::default()).unwrap(), root);
        assert_eq!(root.tensors[0].runs, vec![RowRun(0, world, 0, 3, 3)], "a row split is one run");
        assert!(root.to_bytes().len() < 100 * world as usize, "{} bytes", root.to_bytes().len());
        let mut damaged = root.to_bytes();
        let at = damaged.len() / 2;
        damaged[at] ^= 1;
        assert!(Root::from_bytes(&damaged, &Limits::default()).is_err());
    }

    #[test]
    fn layout_finds_the_ranks_holding_rows() {
        let world = 8;
        let mut indexes: Vec<_> = (0..world).map(|r| rows_index(r, 10, world)).collect();
        // The last rank holds fewer rows, as an uneven split does.
        indexes[7] = rows_index(7, 10, world);
        indexes[7].tensors[0].shape = vec![5, 4];
        let data = vec![7u8; 20];
        indexes[7].tensors[0].chunks = vec![ChunkRef { hash: ChunkHash::of(&data), len: 20 }];
        let root = build(&indexes);
        let t = root.tensor("w").unwrap();
        assert_eq!(t.runs.len(), 2);
        assert_eq!(t.ranks_overlapping(&(15..25)), vec![1, 2]);
        assert_eq!(t.ranks_overlapping(&(70..75)), vec![7]);
        assert!(t.says(7, &(70..75)));
        assert!(!t.says(7, &(70..80)));
        assert!(t.ranks_overlapping(&(75..80)).is_empty());
    }

    #[test]
    fn replicas_are_a_run_with_stride_zero() {
        let s: Vec<(u32, Range<u64>)> = (0..6).map(|r| (r, 0..4)).collect();
        assert_eq!(runs_of(&s), vec![RowRun(0, 6, 0, 4, 0)]);
        let t = TensorLayout { name: "w".into(), dtype: DType::U8, global_shape: vec![4], runs: runs_of(&s) };
        assert_eq!(t.ranks_overlapping(&(1..2)), vec![0], "one replica is read");
        assert_eq!(t.row_ranges(), vec![0..4]);
        let irregular = vec![(0, 0..4), (1, 10..14), (2, 12..16)];
        assert_eq!(runs_of(&irregular).len(), 2);
    }

    #[test]
    fn index_objects_are_checked_against_their_reference() {
        let i = rows_index(1, 2, 2);
        let (bytes, r) = index_object(&i);
        let l = Limits::default();
        assert_eq!(parse_index_object(&bytes, &r, 1, 2, &l).unwrap(), i);
        assert!(parse_index_object(&bytes, &r, 0, 2, &l).is_err(), "another rank's index");
        let mut flipped = bytes.clone();
        flipped[10] ^= 1;
        assert!(parse_index_object(&flipped, &r, 1, 2, &l).is_err());
        assert!(parse_index_object(&bytes[..bytes.len() - 1], &r, 1, 2, &l).is_err());
    }

    #[test]
    fn an_index_object_survives_a_parse_with_the_same_address() {
        // Journalled indexes are parsed back at a restart; their addresses must not move, floats
        // in a rank's metadata included.
        let mut i = rows_index(0, 2, 1);
        i.metadata = serde_json::json!({ "lr": 0.1 + 0.2, "loss": 2.718_281_7e-3 * 7.1, "tiny": 5e-324 });
        let (bytes, r) = index_object(&i);
        let back: ShardIndex = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(index_object(&back), (bytes, r));
    }

    #[test]
    fn both_versions_parse() {
        let indexes: Vec<_> = (0..2).map(|r| rows_index(r, 2, 2)).collect();
        let root = build(&indexes);
        assert!(matches!(CommitObject::parse(&root.to_bytes(), &Limits::default()), Ok(CommitObject::Root(_))));
        let v1 = Manifest::new("job", 9, 2, 5, Some(3), fields(2).0, indexes).unwrap();
        let parsed = CommitObject::parse(&v1.to_bytes(), &Limits::default()).unwrap();
        assert!(matches!(parsed, CommitObject::V1(_)));
        let view = Root::from_v1(&v1).unwrap();
        assert_eq!((view.ranks, view.tensors, view.bytes), (root.ranks, root.tensors, root.bytes));
        assert_eq!(parsed.summary().hash, v1.hash);
    }
}
