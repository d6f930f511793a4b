//! Reading a checkpoint under another layout, and averaging checkpoints.
//!
//! Resharding: any row range of a tensor can be read back whatever layout saved it. A
//! [`RowReader`] is opened on a row range of one tensor: it fetches the index objects of the
//! ranks the root names for those rows (one rank per distinct row range while every slice is
//! full-width; every rank meeting the rows once a slice cut along another dimension is found;
//! through the client's index cache, so readers of a checkpoint's many tensors fetch each index
//! once) and keeps only this tensor's entries, one per distinct saved box. Each read then takes, from
//! each box that meets the rows asked for, only the bytes of the rows that meet (a slice's rows
//! are contiguous in it, row-major): a full-width slice's bytes land straight in place; a
//! slice cut along columns is read into a scratch buffer of its meeting rows and copied
//! element-wise. Memory is the caller's buffer, the boxes' scratch (at most the same size), one
//! chunk per read worker and the entries, so a tensor of any size can be streamed in blocks of
//! rows. Every chunk is verified. Gaps and overlaps in the saved layout are errors, never
//! silently filled: the root's distinct row ranges must tile the rows (a grid whose column
//! groups are cut at different rows is refused), the boxes met by a read must not overlap, and
//! they must hold every element asked for.
//!
//! Averaging (the Llama 3 recipe averages the checkpoints of its annealing phase): element-wise
//! mean of f32 tensors over several committed checkpoints of one job with one layout, summed in
//! step order so the result is reproducible, saved as a new checkpoint.

use std::ops::Range;

use bytes::Bytes;
use ckpt_core::commit::TensorLayout;
use ckpt_core::{DType, TensorEntry};

use crate::checkpoint::Checkpoint;
use crate::client::{Client, SaveSpec, Wait};
use crate::error::ClientError;
use crate::restore::{range_reads, Read, RestoreReport};
use crate::tensor::Tensor;

/// Checks from the root's layout alone that the saved slices of a tensor with dimensions tile
/// its rows with no gap and no overlap (ranks holding the same rows, replicas or column shards,
/// counted once).
fn check_rows_tiled(layout: &TensorLayout) -> Result<(), String> {
    let total_rows = layout.global_shape.first().copied().unwrap_or(1);
    let mut next = 0;
    for r in &layout.row_ranges() {
        if r.start != next {
            return Err(format!("saved slices leave rows {next}..{} uncovered or overlap", r.start));
        }
        next = r.end;
    }
    if next != total_rows {
        return Err(format!("saved slices cover {next} of {total_rows} rows"));
    }
    Ok(())
}

/// Whether a saved slice holds whole rows (all of every dimension after the first).
fn full_width(e: &TensorEntry) -> bool {
    !e.shape.is_empty() && e.shape[1..] == e.global_shape[1..]
}

/// Bytes of one row of a box of `shape` (a scalar is one row of one element); `None` when a
/// hostile shape overflows.
fn row_bytes_of(shape: &[u64], esize: u64) -> Option<u64> {
    shape.iter().skip(1).try_fold(esize, |n, &d| n.checked_mul(d))
}

/// One tensor of a committed checkpoint, opened for reading rows of a range; see the module
/// note. Made by [`Client::row_reader`].
pub struct RowReader<'c> {
    client: &'c Client,
    job: String,
    step: u64,
    name: String,
    esize: u64,
    row_bytes: u64,
    global: Vec<u64>,
    /// The rows it was opened for (`0..1` for a scalar).
    rows: Range<u64>,
    /// The distinct saved boxes meeting `rows`, each as the entry of one rank that holds it.
    slices: Vec<TensorEntry>,
}

impl Client {
    /// Opens tensor `name` of `cp` for reading rows within `rows` (a scalar has the one row
    /// `0..1`): checks the root's layout and fetches the index objects that hold those rows.
    pub async fn row_reader(
        &self,
        cp: &Checkpoint,
        name: &str,
        rows: Range<u64>,
    ) -> Result<RowReader<'_>, ClientError> {
        let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
        let layout = cp.root.tensor(name).ok_or_else(|| bad(format!("not in {}@{}", cp.job(), cp.step())))?;
        let global = layout.global_shape.clone();
        let row_bytes = row_bytes_of(&global, layout.dtype.size_bytes())
            .ok_or_else(|| bad(format!("its shape {global:?} is too large to address")))?;
        match global.first() {
            None if rows == (0..1) => {}
            None => return Err(bad(format!("a scalar has one row, not rows {}..{}", rows.start, rows.end))),
            Some(&total) => {
                if rows.start > rows.end || rows.end > total {
                    return Err(bad(format!("rows {}..{} are outside its {total} rows", rows.start, rows.end)));
                }
                // A tensor with no elements has nothing to tile (empty slices are not recorded
                // as covering anything by the save rule).
                if !global.contains(&0) {
                    check_rows_tiled(layout).map_err(bad)?;
                }
            }
        }
        // A scalar's holders all hold its one element; otherwise the lowest rank of each
        // distinct row range is enough unless some slice turns out not to be full-width.
        let meeting = |r: &Range<u64>| global.is_empty() || (r.start < rows.end && rows.start < r.end);
        let mut ranks: Vec<u32> = if global.is_empty() {
            layout.runs.first().map(|run| vec![run.first_rank()]).unwrap_or_default()
        } else {
            layout.ranks_overlapping(&rows)
        };
        let mut slices = self.slices_of(cp, layout, &ranks).await?;
        if slices.iter().any(|e| !full_width(e)) && !global.is_empty() {
            ranks = layout
                .runs
                .iter()
                .flat_map(|run| (0..run.ranks()).map(move |i| (run.first_rank() + i, run.rows_of(i))))
                .filter(|(_, r)| meeting(r))
                .map(|(rank, _)| rank)
                .collect();
            ranks.sort_unstable();
            ranks.dedup();
            slices = self.slices_of(cp, layout, &ranks).await?;
        }
        Ok(RowReader {
            client: self,
            job: cp.job().to_string(),
            step: cp.step(),
            name: name.to_string(),
            esize: layout.dtype.size_bytes(),
            row_bytes,
            global,
            rows,
            slices,
        })
    }

    /// This tensor's entries in the indexes of `ranks`, each checked against the root, one per
    /// distinct box.
    async fn slices_of(
        &self,
        cp: &Checkpoint,
        layout: &TensorLayout,
        ranks: &[u32],
    ) -> Result<Vec<TensorEntry>, ClientError> {
        let name = &layout.name;
        let bad = |reason: String| ClientError::InvalidTensor { name: name.clone(), reason };
        let mut slices: Vec<TensorEntry> = Vec::new();
        // Boxes seen, by offsets and shape: a lookup, not a scan of `slices` (quadratic in the
        // ranks, seconds per tensor at 16,384).
        let mut boxes = std::collections::HashSet::new();
        for shard in self.shared_indexes(cp, ranks, crate::checkpoint::Cache::Use).await? {
            let e = shard
                .tensors
                .iter()
                .find(|t| t.name == *name)
                .cloned()
                .ok_or_else(|| bad(format!("the root says rank {} holds it, its index does not", shard.rank)))?;
            if e.global_shape != layout.global_shape || e.dtype != layout.dtype {
                return Err(bad(format!("rank {}'s index disagrees with the root on its type or shape", shard.rank)));
            }
            if let (Some(&first), Some(&rows)) = (e.offsets.first(), e.shape.first()) {
                if !layout.says(shard.rank, &(first..first + rows)) {
                    return Err(bad(format!("rank {}'s index disagrees with the root's layout", shard.rank)));
                }
            }
            // Replicas hold the same box, byte-identical by the save rule: read once.
            if boxes.insert((e.offsets.clone(), e.shape.clone())) {
                slices.push(e);
            }
        }
        Ok(slices)
    }

    /// Rows `start..start + rows` of tensor `name` from a committed checkpoint, whatever world
    /// size and layout wrote it (row slices, column shards, replicas). Returns the bytes
    /// (row-major) and the tensor's global shape. See [`Client::load_rows_into`] to read into a
    /// buffer you own, and [`Client::row_reader`] to read a large range in blocks.
    pub async fn load_rows(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        rows: u64,
    ) -> Result<(Vec<u8>, Vec<u64>), ClientError> {
        let end = start.checked_add(rows).ok_or_else(|| ClientError::InvalidTensor {
            name: name.to_string(),
            reason: format!("rows {start}+{rows} are outside it"),
        })?;
        let reader = self.row_reader(cp, name, start..end).await?;
        let len = reader.bytes_of(rows)?;
        let mut out = vec![0u8; len];
        reader.read_rows(start, rows, &mut out).await?;
        Ok((out, reader.global.clone()))
    }

    /// Rows `start..start + out.len() / row_bytes` of tensor `name` of a committed checkpoint,
    /// whatever world size wrote it, into `out` (exactly the rows' bytes). Reads only the index
    /// objects of the ranks holding those rows and only the chunks covering them.
    pub async fn load_rows_into(
        &self,
        cp: &Checkpoint,
        name: &str,
        start: u64,
        out: &mut [u8],
    ) -> Result<RestoreReport, ClientError> {
        let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
        let layout = cp.root.tensor(name).ok_or_else(|| bad(format!("not in {}@{}", cp.job(), cp.step())))?;
        let row_bytes = row_bytes_of(&layout.global_shape, layout.dtype.size_bytes()).unwrap_or(0);
        if row_bytes == 0 || out.len() as u64 % row_bytes != 0 {
            return Err(bad(format!("the buffer is {} bytes, not a whole number of {row_bytes}-byte rows", out.len())));
        }
        let rows = out.len() as u64 / row_bytes;
        let end = start.checked_add(rows).ok_or_else(|| bad(format!("rows {start}+{rows} are outside it")))?;
        self.row_reader(cp, name, start..end).await?.read_rows(start, rows, out).await
    }
}

impl RowReader<'_> {
    /// The tensor's shape across every rank.
    pub fn global_shape(&self) -> &[u64] {
        &self.global
    }

    /// Bytes of one row (of a scalar, its one element); 0 when a later dimension is empty.
    pub fn row_bytes(&self) -> u64 {
        self.row_bytes
    }

    /// Bytes of `rows` rows, or an error when they could not be held.
    pub fn bytes_of(&self, rows: u64) -> Result<usize, ClientError> {
        rows.checked_mul(self.row_bytes()).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
            ClientError::InvalidTensor { name: self.name.clone(), reason: format!("{rows} rows are too large to hold") }
        })
    }

    /// Rows `start..start + rows` (within the ones it was opened for) into `out`, exactly
    /// their bytes, every chunk read verified.
    pub async fn read_rows(&self, start: u64, rows: u64, out: &mut [u8]) -> Result<RestoreReport, ClientError> {
        let bad = |reason: String| ClientError::InvalidTensor { name: self.name.clone(), reason };
        let end = start.checked_add(rows).filter(|&e| start >= self.rows.start && e <= self.rows.end);
        if end.is_none() {
            return Err(bad(format!(
                "rows {start}+{rows} are outside rows {}..{} it was opened for",
                self.rows.start, self.rows.end
            )));
        }
        if out.len() != self.bytes_of(rows)? {
            return Err(bad(format!("the buffer is {} bytes, {rows} rows are {}", out.len(), self.bytes_of(rows)?)));
        }
        if rows == 0 {
            return Ok(RestoreReport { tensors: 1, ..RestoreReport::default() });
        }
        let (want_off, want_shape) = match self.global.split_first() {
            None => (vec![], vec![]),
            Some((_, rest)) => {
                let mut off = vec![0; self.global.len()];
                off[0] = start;
                (off, [&[rows][..], rest].concat())
            }
        };
        let elements = want_shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("rows {start}+{rows} are too large to hold")))?;
        let (esize, row_bytes) = (self.esize, self.row_bytes());
        // Full-width slices land in place (their ranges of `out` are disjoint by the save rule,
        // checked below); the others go through scratch boxes of their meeting rows.
        let mut direct: Vec<(usize, Part<'_>)> = Vec::new();
        let mut boxed: Vec<Part<'_>> = Vec::new();
        for e in &self.slices {
            let Some(meet) = intersect(&e.offsets, &e.shape, &want_off, &want_shape) else { continue };
            let src = match meet.first() {
                None => 0..esize,
                Some(m) => {
                    let srb = row_bytes_of(&e.shape, esize)
                        .ok_or_else(|| bad(format!("a slice of shape {:?} is too large", e.shape)))?;
                    (m.start - e.offsets[0]) * srb..(m.end - e.offsets[0]) * srb
                }
            };
            match meet.first() {
                Some(m) if full_width(e) => {
                    direct.push((((m.start - start) * row_bytes) as usize, Part { e, src, meet }))
                }
                _ => boxed.push(Part { e, src, meet }),
            }
        }
        direct.sort_by_key(|(at, _)| *at);
        // The save rule keeps distinct boxes apart; a server that broke it must not get an
        // overlap and a gap of the same size past the element count below.
        let mut meets: Vec<&[Range<u64>]> =
            direct.iter().map(|(_, p)| &p.meet[..]).chain(boxed.iter().map(|p| &p.meet[..])).collect();
        meets.sort_by_key(|m| m.first().map(|r| r.start));
        for (i, a) in meets.iter().enumerate() {
            let a_end = a.first().map(|r| r.end);
            for b in meets[i + 1..].iter().take_while(|b| b.first().map(|r| r.start) < a_end) {
                // Two meets (never empty in any dimension) overlap where they do in every one.
                if a.iter().zip(b.iter()).all(|(x, y)| x.start < y.end && y.start < x.end) {
                    return Err(bad(format!("saved slices overlap in rows {start}+{rows}")));
                }
            }
        }
        let mut scratch: Vec<Vec<u8>> = boxed.iter().map(|p| vec![0u8; p.len()]).collect();
        let mut copied = 0u64;
        let mut report = {
            let mut reads: Vec<Read<'_>> = Vec::new();
            let mut rest: &mut [u8] = &mut *out;
            let mut at = 0usize;
            for (dest, p) in &direct {
                if *dest < at || dest + p.len() > at + rest.len() {
                    return Err(bad("saved slices overlap".into()));
                }
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(dest - at);
                let (here, tail) = tail.split_at_mut(p.len());
                range_reads(&p.e.chunks, p.src.clone(), here, &mut reads)?;
                copied += p.len() as u64 / esize;
                rest = tail;
                at = dest + p.len();
            }
            for (p, buf) in boxed.iter().zip(scratch.iter_mut()) {
                range_reads(&p.e.chunks, p.src.clone(), buf, &mut reads)?;
            }
            self.client.read_all(&self.job, self.step, reads).await?
        };
        for (p, buf) in boxed.iter().zip(&scratch) {
            let (src_off, src_shape): (Vec<u64>, Vec<u64>) = match p.meet.first() {
                None => (vec![], vec![]),
                Some(m) => {
                    ([&[m.start][..], &p.e.offsets[1..]].concat(), [&[m.end - m.start][..], &p.e.shape[1..]].concat())
                }
            };
            copied += copy_box(out, (&want_off, &want_shape), buf, (&src_off, &src_shape), &p.meet, esize);
        }
        if copied != elements {
            return Err(bad(format!("saved slices cover {copied} of the {elements} elements of rows {start}+{rows}")));
        }
        report.tensors = 1;
        Ok(report)
    }
}

/// What one saved box gives a read of rows: bytes `src` of its slice `e` (its rows that meet),
/// which are the elements `meet` in global coordinates.
struct Part<'e> {
    e: &'e TensorEntry,
    src: Range<u64>,
    meet: Vec<Range<u64>>,
}

impl Part<'_> {
    fn len(&self) -> usize {
        (self.src.end - self.src.start) as usize
    }
}

impl Client {
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
