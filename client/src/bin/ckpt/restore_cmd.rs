//! `ckpt restore` and `ckpt export`: a checkpoint out of ckptd into files other tools read.
//!
//! Layout of `ckpt restore --out DIR` (one rank) or `DIR/rank-NNNNN/` (`--all`):
//! `tNNNNN.bin`, one per tensor, the slice's elements row-major in little-endian byte order
//! (as the trainer's memory holds them on x86 and ARM), and `tensors.json`: the job, step,
//! root hash, rank and world size, and per tensor its name, dtype, shape, global shape,
//! offsets in the global tensor, file and bytes. Every byte is verified before it is written.

use std::path::Path;

use anyhow::Context;
use ckpt_client::{Checkpoint, Client, DType, Tensor};

use crate::output::CliError;

/// Refuses to write into a non-empty directory (or over a file) unless `force`.
pub fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => out.exists(),
    };
    if occupied && !force {
        return Err(CliError::Refused(format!(
            "{} is not empty; pass --force to write into it (files of the same name are replaced)",
            out.display()
        ))
        .into());
    }
    Ok(())
}

/// Removes the `tensors.json` an earlier restore left in `out` and in each of its
/// `rank-NNNNN` directories, before anything is written: a restore that then fails part way
/// must not leave files of this step under another step's label. A rank's `tensors.json` is
/// written last, so one that is there describes every file beside it.
pub fn unlabel(out: &Path) -> anyhow::Result<()> {
    let mut labels = vec![out.join("tensors.json")];
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("rank-") {
                labels.push(e.path().join("tensors.json"));
            }
        }
    }
    for l in labels {
        match std::fs::remove_file(&l) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", l.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes `rank-NNNNN` directories an earlier restore left in `out` beyond `world` ranks (a
/// `--force` restore into it must not leave another world size's ranks beside its own).
pub fn remove_extra_ranks(out: &Path, world: u32) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rank = name.strip_prefix("rank-").filter(|d| d.len() == 5).and_then(|d| d.parse::<u32>().ok());
        if rank.is_some_and(|r| r >= world) && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Writes one rank's tensors and their `tensors.json` into `dir`.
pub fn write_rank(
    dir: &Path,
    cp: &Checkpoint,
    rank: u32,
    world: u32,
    tensors: &[Tensor],
) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut listing = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let file = format!("t{i:05}.bin");
        std::fs::write(dir.join(&file), &t.data).with_context(|| format!("writing {}", dir.join(&file).display()))?;
        listing.push(serde_json::json!({
            "name": t.name, "dtype": t.dtype, "shape": t.shape, "global_shape": t.global_shape,
            "offsets": t.offsets, "file": file, "bytes": t.data.len(),
        }));
    }
    let header = serde_json::json!({
        "job": cp.job(), "step": cp.step(), "root_hash": cp.root.hash, "rank": rank, "world_size": world,
        "byte_order": "little-endian", "tensors": listing,
    });
    // Whole or not at all, after every file it describes.
    let (label, tmp) = (dir.join("tensors.json"), dir.join(".tensors.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&header)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &label).with_context(|| format!("writing {}", label.display()))?;
    Ok(header)
}

/// Rank `rank` of `world` new ranks: every tensor cut evenly by rows (the first ranks take one
/// row more), whatever dimensions it was saved cut along; tensors every rank held whole (and
/// scalars) given whole to each.
pub async fn resharded(client: &Client, cp: &Checkpoint, rank: u32, world: u32) -> anyhow::Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for layout in &cp.root.tensors {
        let rows = layout.global_shape.first().copied().unwrap_or(1);
        let whole = layout.runs.iter().all(|r| r.2 == 0 && r.3 == rows);
        let (start, take) = if whole {
            (0, rows)
        } else {
            let (base, extra) = (rows / world as u64, rows % world as u64);
            let r = rank as u64;
            (r * base + r.min(extra), base + u64::from(r < extra))
        };
        // A rank may get no rows of a short tensor: it still gets the tensor, with none.
        let (data, global_shape) = client
            .load_rows(cp, &layout.name, start, take)
            .await
            .with_context(|| format!("rows {start}..{} of {}", start + take, layout.name))?;
        let mut shape = global_shape.clone();
        let mut offsets = vec![0; global_shape.len()];
        if let (Some(s), Some(o)) = (shape.first_mut(), offsets.first_mut()) {
            *s = take;
            *o = start;
        }
        out.push(Tensor {
            name: layout.name.clone(),
            dtype: layout.dtype,
            shape,
            global_shape,
            offsets,
            data: data.into(),
        });
    }
    Ok(out)
}

fn safetensors_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::Bf16 => S::BF16,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I16 => S::I16,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

/// Writes `tensors` (whole tensors, or one rank's slices) as one safetensors file, with the
/// job, step and root hash in its metadata.
pub fn write_safetensors(path: &Path, cp: &Checkpoint, tensors: &[Tensor]) -> anyhow::Result<()> {
    let mut views = Vec::new();
    for t in tensors {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let view = safetensors::tensor::TensorView::new(safetensors_dtype(t.dtype), shape, &t.data)
            .with_context(|| format!("tensor {}", t.name))?;
        views.push((t.name.clone(), view));
    }
    let meta: std::collections::HashMap<String, String> = [
        ("job".to_string(), cp.job().to_string()),
        ("step".to_string(), cp.step().to_string()),
        ("root_hash".to_string(), cp.root.hash.clone()),
    ]
    .into();
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))
}
