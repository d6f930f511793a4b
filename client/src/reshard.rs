//! Reading a checkpoint under another layout, and averaging checkpoints.
//!
//! Resharding: a tensor saved as row slices (dimension 0) by any number of ranks can be read
//! back as any row range; the range is assembled from the overlapping slices of whichever
//! ranks hold them, reading only those ranks' index objects (the root's layout names them) and
//! only the chunks that cover the range, each verified. Gaps and overlaps in the saved layout
//! are errors, never silently filled.
//!
//! Averaging (the Llama 3 recipe averages the checkpoints of its annealing phase): element-wise
//! mean of f32 tensors over several committed checkpoints of one job with one layout, summed in
//! step order so the result is reproducible, saved as a new checkpoint.

use bytes::Bytes;
use ckpt_core::{DType, ShardIndex, TensorEntry};

use crate::checkpoint::Checkpoint;
use crate::client::{Client, SaveSpec, Wait};
use crate::error::ClientError;
use crate::tensor::Tensor;

/// A chunk read planned for a row range: bytes `within` of chunk `hash` go to `dest_at`.
pub(crate) struct PlannedRead {
    pub hash: ckpt_core::ChunkHash,
    pub len: u64,
    pub within: std::ops::Range<usize>,
    pub dest_at: usize,
}

/// One rank's piece of a row-sliced tensor.
struct Piece<'a> {
    entry: &'a TensorEntry,
    first_row: u64,
    rows: u64,
}

/// Checks from the root's layout alone that the saved slices of `name` tile its rows with no gap
/// and no overlap. Returns the tensor's rows and the bytes of one row.
fn check_layout(cp: &Checkpoint, name: &str) -> Result<(u64, u64), ClientError> {
    let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
    let t = cp.root.tensor(name).ok_or_else(|| bad(format!("not in {}@{}", cp.job(), cp.step())))?;
    let Some((&total_rows, rest)) = t.global_shape.split_first() else {
        return Err(bad("saved without a global layout".into()));
    };
    // Replicas (ranks holding the same rows) are byte-identical by the save rule: counted once.
    let mut next = 0;
    for r in &t.row_ranges() {
        if r.start != next {
            return Err(bad(format!("saved slices leave rows {next}..{} uncovered or overlap", r.start)));
        }
        next = r.end;
    }
    if next != total_rows {
        return Err(bad(format!("saved slices cover {next} of {total_rows} rows")));
    }
    Ok((total_rows, rest.iter().product::<u64>() * t.dtype.size_bytes()))
}

/// The pieces of `name` in the fetched indexes, each checked against the layout the root gives.
fn row_pieces<'a>(cp: &Checkpoint, shards: &'a [ShardIndex], name: &str) -> Result<Vec<Piece<'a>>, ClientError> {
    let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
    let layout = cp.root.tensor(name).ok_or_else(|| bad(format!("not in {}@{}", cp.job(), cp.step())))?;
    let mut pieces = Vec::new();
    for shard in shards {
        let t = shard
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad(format!("the root says rank {} holds it, its index does not", shard.rank)))?;
        if t.shape.is_empty() || t.shape.len() != t.global_shape.len() || t.offsets.len() != t.shape.len() {
            return Err(bad(format!("rank {} saved it without a global layout", shard.rank)));
        }
        if t.shape[1..] != t.global_shape[1..] || t.offsets[1..].iter().any(|&o| o != 0) {
            return Err(bad(format!("rank {} saved a slice that is not a row range", shard.rank)));
        }
        if t.global_shape != layout.global_shape || t.dtype != layout.dtype {
            return Err(bad(format!("rank {}'s index disagrees with the root on its type or shape", shard.rank)));
        }
        let rows = t.offsets[0]..t.offsets[0] + t.shape[0];
        if !layout.says(shard.rank, &rows) {
            return Err(bad(format!("rank {}'s index disagrees with the root's layout", shard.rank)));
        }
        pieces.push(Piece { entry: t, first_row: rows.start, rows: t.shape[0] });
    }
    pieces.sort_by_key(|p| p.first_row);
    Ok(pieces)
}

impl Client {
    /// Rows `start..start + rows` of tensor `name` from a committed checkpoint, whatever world
    /// size wrote it. Returns the bytes (row-major) and the tensor's global shape. See
    /// [`Client::load_rows_into`] to read into a buffer you own.
    pub async fn load_rows(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        rows: u64,
    ) -> Result<(Vec<u8>, Vec<u64>), ClientError> {
        let (_, row_bytes) = check_layout(cp, name)?;
        let len = rows.checked_mul(row_bytes).ok_or_else(|| ClientError::InvalidTensor {
            name: name.to_string(),
            reason: format!("{rows} rows are too many"),
        })?;
        let mut out = vec![0u8; len as usize];
        self.load_rows_into(cp, name, start, &mut out).await?;
        let global_shape = cp.root.tensor(name).map(|t| t.global_shape.clone()).unwrap_or_default();
        Ok((out, global_shape))
    }

    /// The reads that assemble `len` bytes of rows from row `start` of `name`, in order: each
    /// names a chunk, the part of it wanted, and where that part goes.
    pub(crate) async fn plan_rows(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        len: u64,
    ) -> Result<Vec<PlannedRead>, ClientError> {
        let (total_rows, row_bytes) = check_layout(cp, name)?;
        let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
        if row_bytes == 0 || len % row_bytes != 0 {
            return Err(bad(format!("the buffer is {len} bytes, not a whole number of {row_bytes}-byte rows")));
        }
        let rows = len / row_bytes;
        let end = start
            .checked_add(rows)
            .filter(|&e| e <= total_rows)
            .ok_or_else(|| bad(format!("rows {start}+{rows} are outside its {total_rows} rows")))?;
        let layout = cp.root.tensor(name).ok_or_else(|| ClientError::Protocol(format!("{name} left the layout")))?;
        let ranks = layout.ranks_overlapping(&(start..end));
        let shards = self.shard_indexes(cp, &ranks).await?;
        let pieces = row_pieces(cp, &shards, name)?;
        let mut plan = Vec::new();
        // Replicas hold the same rows: the first piece covering a row wins.
        let mut next_row = start;
        for p in &pieces {
            let lo = next_row.max(p.first_row);
            let hi = end.min(p.first_row + p.rows);
            if lo >= hi || lo != next_row {
                continue;
            }
            next_row = hi;
            let (want_lo, want_hi) = ((lo - p.first_row) * row_bytes, (hi - p.first_row) * row_bytes);
            let mut at = 0u64;
            for c in &p.entry.chunks {
                let (c_lo, c_hi) = (at, at + c.len);
                at = c_hi;
                let (a, b) = (want_lo.max(c_lo), want_hi.min(c_hi));
                if a < b {
                    let dest_at = ((lo - start) * row_bytes + (a - want_lo)) as usize;
                    plan.push(PlannedRead {
                        hash: c.hash,
                        len: c.len,
                        within: (a - c_lo) as usize..(b - c_lo) as usize,
                        dest_at,
                    });
                }
            }
        }
        if next_row != end {
            return Err(bad(format!("rows {next_row}..{end} are in no rank's index")));
        }
        Ok(plan)
    }

    /// Averages f32 tensors `names` over the committed checkpoints `steps` of `job` (same world
    /// size and layout) and saves the result as `out_job` at the last of `steps`, every rank
    /// keeping its layout. Returns the step written.
    pub async fn average_checkpoints(
        &self,
        job: &str,
        steps: &[u64],
        names: &[&str],
        out_job: &str,
    ) -> Result<u64, ClientError> {
        let last = *steps.last().ok_or_else(|| ClientError::InvalidTensor {
            name: names.join(","),
            reason: "no checkpoints to average".into(),
        })?;
        let mut manifests = Vec::with_capacity(steps.len());
        for &s in steps {
            manifests.push(self.manifest(job, s).await?);
        }
        let world = manifests[0].world_size;
        for m in &manifests {
            if m.world_size != world {
                return Err(ClientError::InvalidTensor {
                    name: names.join(","),
                    reason: format!("step {} has {} ranks, step {} has {world}", m.step, m.world_size, steps[0]),
                });
            }
        }
        for rank in 0..world {
            let mut sums: Vec<(TensorEntry, Vec<f32>)> = Vec::new();
            for m in &manifests {
                let tensors = self.load_shard(&m.job, m.step, &m.ranks[rank as usize], |_| {}).await?;
                for (i, t) in tensors.iter().filter(|t| names.contains(&t.name.as_str())).enumerate() {
                    if t.dtype != DType::F32 {
                        return Err(ClientError::InvalidTensor {
                            name: t.name.clone(),
                            reason: "only f32 tensors can be averaged".into(),
                        });
                    }
                    let values = t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                    if m.step == steps[0] {
                        let entry = m.ranks[rank as usize].tensors.iter().find(|e| e.name == t.name).cloned();
                        let entry = entry
                            .ok_or_else(|| ClientError::Protocol(format!("{} vanished from its index", t.name)))?;
                        sums.push((entry, values.collect()));
                    } else {
                        let (entry, acc) = sums.get_mut(i).ok_or_else(|| ClientError::InvalidTensor {
                            name: t.name.clone(),
                            reason: format!("not in step {} of rank {rank}", steps[0]),
                        })?;
                        if entry.name != t.name || entry.shape != t.shape || entry.offsets != t.offsets {
                            return Err(ClientError::InvalidTensor {
                                name: t.name.clone(),
                                reason: format!("layout differs between steps {} and {}", steps[0], m.step),
                            });
                        }
                        for (a, v) in acc.iter_mut().zip(values) {
                            *a += v;
                        }
                    }
                }
            }
            let n = manifests.len() as f32;
            let tensors: Vec<Tensor> = sums
                .into_iter()
                .map(|(entry, acc)| {
                    let bytes: Vec<u8> = acc.iter().flat_map(|a| (a / n).to_le_bytes()).collect();
                    Tensor::from_entry(&entry, Bytes::from(bytes))
                })
                .collect();
            let spec = SaveSpec {
                job: out_job.to_string(),
                step: last,
                rank,
                world_size: world,
                metadata: serde_json::json!({ "averaged_from": { "job": job, "steps": steps } }),
                rank_metadata: serde_json::Value::Null,
                created_unix_ms: Some(manifests[manifests.len() - 1].created_unix_ms),
                node_ranks: None,
            };
            self.save(&spec, &tensors, Wait::Staged).await?;
        }
        self.wait_committed(out_job, last).await?;
        Ok(last)
    }
}
