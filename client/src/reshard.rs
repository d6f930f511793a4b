//! Reading a checkpoint under another layout, and averaging checkpoints.
//!
//! Resharding: a tensor saved as row slices (dimension 0) by any number of ranks can be read
//! back as any row range; the range is assembled from the overlapping slices of whichever
//! ranks hold them, fetching only the chunks that cover it, each verified. Gaps and overlaps
//! in the saved layout are errors, never silently filled.
//!
//! Averaging (the Llama 3 recipe averages the checkpoints of its annealing phase): element-wise
//! mean of f32 tensors over several committed checkpoints of one job with one layout, summed in
//! step order so the result is reproducible, saved as a new checkpoint.

use bytes::Bytes;
use ckpt_core::{DType, Manifest, TensorEntry};
use futures::{StreamExt, TryStreamExt};

use crate::client::{Client, SaveSpec, Wait};
use crate::error::ClientError;
use crate::tensor::Tensor;

/// One rank's piece of a row-sliced tensor.
struct Piece<'a> {
    entry: &'a TensorEntry,
    first_row: u64,
    rows: u64,
}

fn row_pieces<'a>(m: &'a Manifest, name: &str) -> Result<(Vec<Piece<'a>>, u64, u64), ClientError> {
    let mut pieces = Vec::new();
    let mut global: Option<&[u64]> = None;
    let bad = |reason: String| ClientError::InvalidTensor { name: name.to_string(), reason };
    for shard in &m.ranks {
        for t in shard.tensors.iter().filter(|t| t.name == name) {
            if t.shape.is_empty() || t.shape.len() != t.global_shape.len() || t.offsets.len() != t.shape.len() {
                return Err(bad(format!("rank {} saved it without a global layout", shard.rank)));
            }
            if t.shape[1..] != t.global_shape[1..] || t.offsets[1..].iter().any(|&o| o != 0) {
                return Err(bad(format!("rank {} saved a slice that is not a row range", shard.rank)));
            }
            match global {
                Some(g) if g != t.global_shape.as_slice() => {
                    return Err(bad(format!("ranks disagree on the global shape ({g:?} and {:?})", t.global_shape)))
                }
                _ => global = Some(&t.global_shape),
            }
            pieces.push(Piece { entry: t, first_row: t.offsets[0], rows: t.shape[0] });
        }
    }
    let g = global.ok_or_else(|| bad(format!("not in {}@{}", m.job, m.step)))?;
    let dtype = pieces[0].entry.dtype;
    if pieces.iter().any(|p| p.entry.dtype != dtype) {
        return Err(bad("ranks saved it with different dtypes".into()));
    }
    let row_bytes = g[1..].iter().product::<u64>() * dtype.size_bytes();
    pieces.sort_by_key(|p| p.first_row);
    let mut next = 0;
    for p in &pieces {
        if p.first_row != next {
            return Err(bad(format!("saved slices leave rows {next}..{} uncovered or overlap", p.first_row)));
        }
        next += p.rows;
    }
    if next != g[0] {
        return Err(bad(format!("saved slices cover {next} of {} rows", g[0])));
    }
    Ok((pieces, g[0], row_bytes))
}

impl Client {
    /// Rows `start..start + rows` of tensor `name` from a committed checkpoint, whatever world
    /// size wrote it. Returns the bytes (row-major) and the tensor's global shape.
    pub async fn load_rows(
        &self,
        m: &Manifest,
        name: &str,
        start: u64,
        rows: u64,
    ) -> Result<(Vec<u8>, Vec<u64>), ClientError> {
        let (pieces, total_rows, row_bytes) = row_pieces(m, name)?;
        let end = start.checked_add(rows).filter(|&e| e <= total_rows).ok_or_else(|| ClientError::InvalidTensor {
            name: name.to_string(),
            reason: format!("rows {start}+{rows} are outside its {total_rows} rows"),
        })?;
        let global_shape = pieces[0].entry.global_shape.clone();
        let mut out = vec![0u8; (rows * row_bytes) as usize];
        // (chunk, byte range wanted inside the chunk, where it goes in `out`)
        let mut wanted = Vec::new();
        for p in &pieces {
            let lo = start.max(p.first_row);
            let hi = end.min(p.first_row + p.rows);
            if lo >= hi {
                continue;
            }
            let (want_lo, want_hi) = ((lo - p.first_row) * row_bytes, (hi - p.first_row) * row_bytes);
            let mut at = 0u64;
            for c in &p.entry.chunks {
                let (c_lo, c_hi) = (at, at + c.len);
                at = c_hi;
                let (a, b) = (want_lo.max(c_lo), want_hi.min(c_hi));
                if a < b {
                    let dest = (lo - start) * row_bytes + (a - want_lo);
                    wanted.push((c.hash, c.len, (a - c_lo) as usize..(b - c_lo) as usize, dest as usize));
                }
            }
        }
        let fetched: Vec<_> = futures::stream::iter(wanted)
            .map(|(hash, len, range, dest)| async move {
                let data = self.fetch_chunk(&m.job, m.step, hash, len).await?;
                if data.len() as u64 != len {
                    return Err(ClientError::Protocol(format!(
                        "chunk {hash} is {} bytes, the index says {len}",
                        data.len()
                    )));
                }
                Ok::<_, ClientError>((data, range, dest))
            })
            .buffered(self.options().concurrency.max(1))
            .try_collect()
            .await?;
        for (data, range, dest) in fetched {
            out[dest..dest + range.len()].copy_from_slice(&data[range]);
        }
        Ok((out, global_shape))
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
                let tensors = self.load_rank_from(m, rank, |_| {}).await?;
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
            };
            self.save(&spec, &tensors, Wait::Staged).await?;
        }
        self.wait_committed(out_job, last).await?;
        Ok(last)
    }
}
