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

/// How `row_pieces` says a slice is cut along another dimension than rows (`load_rows` then
/// assembles the rows element-wise instead).
const NOT_ROWS: &str = "is not a row range";

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
            return Err(bad(format!("rank {} saved a slice that {NOT_ROWS}", shard.rank)));
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
    ///
    /// A tensor saved as slices along other dimensions (the column shards of a tensor-parallel
    /// layer), a scalar, or a tensor with a zero-size dimension is assembled element-wise from
    /// the slices that meet the rows asked for (each of those read whole, every chunk verified).
    pub async fn load_rows(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        rows: u64,
    ) -> Result<(Vec<u8>, Vec<u64>), ClientError> {
        let layout = cp.root.tensor(name).ok_or_else(|| ClientError::InvalidTensor {
            name: name.to_string(),
            reason: format!("not in {}@{}", cp.job(), cp.step()),
        })?;
        if layout.global_shape.is_empty() || layout.global_shape.contains(&0) {
            return self.assemble_rows(cp, name, start, rows).await;
        }
        match self.load_row_slices(cp, name, start, rows).await {
            Err(ClientError::InvalidTensor { reason, .. }) if reason.ends_with(NOT_ROWS) => {
                self.assemble_rows(cp, name, start, rows).await
            }
            other => other,
        }
    }

    async fn load_row_slices(
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

    /// Rows `start..start + rows` of `name` (all of every other dimension; a scalar is one
    /// row), copied element by element out of every distinct saved slice that meets them.
    /// Distinct slices never overlap (the save rule in `ckpt_core::layout`), so the rows are
    /// whole exactly when the elements copied add up to theirs.
    async fn assemble_rows(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        rows: u64,
    ) -> Result<(Vec<u8>, Vec<u64>), ClientError> {
        let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
        let layout = cp.root.tensor(name).ok_or_else(|| bad(format!("not in {}@{}", cp.job(), cp.step())))?;
        let global = layout.global_shape.clone();
        let esize = layout.dtype.size_bytes();
        let (want_off, want_shape) = match global.split_first() {
            None if (start, rows) == (0, 1) => (vec![], vec![]),
            None => return Err(bad(format!("a scalar has one row, not rows {start}+{rows}"))),
            Some((&total, rest)) => {
                if start.checked_add(rows).is_none_or(|end| end > total) {
                    return Err(bad(format!("rows {start}+{rows} are outside its {total} rows")));
                }
                let mut off = vec![0; global.len()];
                off[0] = start;
                (off, [&[rows][..], rest].concat())
            }
        };
        let elements = want_shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let len = elements
            .and_then(|n| n.checked_mul(esize))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad(format!("rows {start}+{rows} are too large to hold")))?;
        let mut out = vec![0u8; len];
        // Every rank whose rows meet the ones asked for (replicas and column shards alike; the
        // distinct slices are told apart below).
        let wanted = start..start.saturating_add(rows.max(1));
        let mut ranks: Vec<u32> = layout
            .runs
            .iter()
            .flat_map(|run| (0..run.ranks()).map(move |i| (run.first_rank() + i, run.rows_of(i))))
            .filter(|(_, r)| r.start < wanted.end && wanted.start < r.end || global.is_empty())
            .map(|(rank, _)| rank)
            .collect();
        ranks.sort_unstable();
        ranks.dedup();
        let mut seen: Vec<(Vec<u64>, Vec<u64>)> = Vec::new();
        let mut copied = 0u64;
        for shard in self.shard_indexes(cp, &ranks).await? {
            let t = shard
                .tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| bad(format!("the root says rank {} holds it, its index does not", shard.rank)))?;
            if t.global_shape != global || t.dtype != layout.dtype || t.shape.len() != global.len() {
                return Err(bad(format!("rank {}'s index disagrees with the root on its type or shape", shard.rank)));
            }
            if seen.iter().any(|(o, sh)| *o == t.offsets && *sh == t.shape) {
                continue;
            }
            seen.push((t.offsets.clone(), t.shape.clone()));
            let Some(meet) = intersect(&t.offsets, &t.shape, &want_off, &want_shape) else { continue };
            let one = ShardIndex { rank: shard.rank, tensors: vec![t.clone()], metadata: serde_json::Value::Null };
            let loaded = self.load_shard(cp.job(), cp.step(), &one, |_| {}).await?;
            let piece = &loaded.first().ok_or_else(|| ClientError::Protocol(format!("{name} did not load")))?.data;
            copied += copy_box(&mut out, (&want_off, &want_shape), piece, (&t.offsets, &t.shape), &meet, esize);
        }
        if Some(copied) != elements {
            return Err(bad(format!(
                "saved slices cover {copied} of the {} elements of rows {start}+{rows}",
                elements.unwrap_or(0)
            )));
        }
        Ok((out, global))
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

/// Where box a (`a_off`, `a_shape`) and box b meet, per dimension `lo..hi`; `None` if they do
/// not (or either holds no element). A scalar meets a scalar.
fn intersect(a_off: &[u64], a_shape: &[u64], b_off: &[u64], b_shape: &[u64]) -> Option<Vec<std::ops::Range<u64>>> {
    let mut meet = Vec::with_capacity(a_off.len());
    for d in 0..a_off.len() {
        let lo = a_off[d].max(b_off[d]);
        let hi = (a_off[d].saturating_add(a_shape[d])).min(b_off[d].saturating_add(b_shape[d]));
        if lo >= hi {
            return None;
        }
        meet.push(lo..hi);
    }
    Some(meet)
}

/// Copies the elements of `meet` (global coordinates) from `src`, a row-major box at `src_off`
/// of shape `src_shape`, into `dst`, one at `dst_off` of shape `dst_shape`, a run along the
/// last dimension at a time. Returns the elements copied.
fn copy_box(
    dst: &mut [u8],
    (dst_off, dst_shape): (&[u64], &[u64]),
    src: &[u8],
    (src_off, src_shape): (&[u64], &[u64]),
    meet: &[std::ops::Range<u64>],
    esize: u64,
) -> u64 {
    let strides = |shape: &[u64]| {
        let mut s = vec![1u64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (ds, ss) = (strides(dst_shape), strides(src_shape));
    let Some(last) = meet.len().checked_sub(1) else {
        dst[..esize as usize].copy_from_slice(&src[..esize as usize]);
        return 1;
    };
    let run = (meet[last].end - meet[last].start) * esize;
    let mut at: Vec<u64> = meet.iter().map(|r| r.start).collect();
    let mut copied = 0;
    loop {
        let d_el: u64 = (0..=last).map(|d| (at[d] - dst_off[d]) * ds[d]).sum();
        let s_el: u64 = (0..=last).map(|d| (at[d] - src_off[d]) * ss[d]).sum();
        let (d_at, s_at) = ((d_el * esize) as usize, (s_el * esize) as usize);
        dst[d_at..d_at + run as usize].copy_from_slice(&src[s_at..s_at + run as usize]);
        copied += meet[last].end - meet[last].start;
        // The next run: count up the dimensions before the last, odometer-wise.
        let mut d = last;
        loop {
            if d == 0 {
                return copied;
            }
            d -= 1;
            at[d] += 1;
            if at[d] < meet[d].end {
                break;
            }
            at[d] = meet[d].start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_copied_into_place_whatever_dimension_they_were_cut_along() {
        // A 4x6 tensor of u16 (element i = i), cut into a 2x2 grid of 2x3 boxes.
        let global = [4u64, 6];
        let whole: Vec<u8> = (0u16..24).flat_map(|i| i.to_le_bytes()).collect();
        let piece = |off: [u64; 2]| -> Vec<u8> {
            (0..2u64)
                .flat_map(|r| (0..3u64).map(move |c| ((off[0] + r) * global[1] + off[1] + c) as u16))
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        // Rows 1..3, all columns.
        let (want_off, want_shape) = ([1u64, 0], [2u64, 6]);
        let mut out = vec![0u8; 2 * 6 * 2];
        let mut copied = 0;
        for off in [[0, 0], [0, 3], [2, 0], [2, 3]] {
            let meet = intersect(&off, &[2, 3], &want_off, &want_shape).unwrap();
            copied += copy_box(&mut out, (&want_off, &want_shape), &piece(off), (&off, &[2, 3]), &meet, 2);
        }
        assert_eq!(copied, 12);
        assert_eq!(out, whole[6 * 2..18 * 2]);
        assert!(intersect(&[0, 0], &[2, 3], &[2, 0], &[2, 6]).is_none(), "boxes that only touch do not meet");
        assert!(intersect(&[0, 0], &[0, 3], &[0, 0], &[2, 6]).is_none(), "an empty box meets nothing");
        // A scalar is one element.
        let mut one = [0u8; 8];
        assert_eq!(copy_box(&mut one, (&[], &[]), &7u64.to_le_bytes(), (&[], &[]), &[], 8), 1);
        assert_eq!(u64::from_le_bytes(one), 7);
    }
}
