//! `ckpt restore` and `ckpt export`: a checkpoint out of ckptd into files other tools read.
//!
//! Layout of `ckpt restore --out DIR` (one rank) or `DIR/rank-NNNNN/` (`--all`):
//! `tNNNNN.bin`, one per tensor, the slice's elements row-major in little-endian byte order
//! (as the trainer's memory holds them on x86 and ARM), and `tensors.json`: the job, step,
//! root hash, rank and world size, and per tensor its name, dtype, shape, global shape,
//! offsets in the global tensor, file and bytes. Every byte is verified before it is written.
//!
//! Design note: a 405B checkpoint is terabytes and one tensor of it can be gigabytes, so no
//! tensor is held whole. Each is streamed to its file in blocks of at most `--buffer-mib`
//! (a rank's slice as byte ranges of it, a resharded or exported tensor as blocks of rows read
//! through a `RowReader`), one block in memory at a time. A safetensors file's header is
//! known from the layout before any data is read, so it is written first and the data after
//! it, into a temporary file renamed into place once every byte is written and synced.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ckpt_client::{Checkpoint, Client, DType, ShardIndex, TensorEntry};

use crate::output::CliError;

/// One tensor to write: its description and where its bytes come from.
pub struct Planned<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub global_shape: Vec<u64>,
    pub offsets: Vec<u64>,
    source: Source<'a>,
}

enum Source<'a> {
    /// A rank's saved slice, as it saved it.
    Slice(&'a TensorEntry),
    /// Rows of the global tensor, whatever layout saved it.
    Rows(Range<u64>),
}

impl Planned<'_> {
    /// Its bytes; an error for a shape too large to address (only a hostile root has one).
    pub fn bytes(&self) -> anyhow::Result<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_bytes(), |n, &d| n.checked_mul(d))
            .with_context(|| format!("tensor {}: shape {:?} is too large", self.name, self.shape))
    }
}

/// A rank's tensors as it saved them.
pub fn as_saved(shard: &ShardIndex) -> Vec<Planned<'_>> {
    shard
        .tensors
        .iter()
        .map(|e| Planned {
            name: e.name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            global_shape: e.global_shape.clone(),
            offsets: e.offsets.clone(),
            source: Source::Slice(e),
        })
        .collect()
}

/// Rank `rank` of `world` new ranks: every tensor cut evenly by rows (the first ranks take one
/// row more), whatever dimensions it was saved cut along; tensors every rank held whole (and
/// scalars) given whole to each. Rank 0 of 1 is every tensor whole.
pub fn resharded(cp: &Checkpoint, rank: u32, world: u32) -> Vec<Planned<'static>> {
    cp.root
        .tensors
        .iter()
        .map(|layout| {
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
            let mut shape = layout.global_shape.clone();
            let mut offsets = vec![0; shape.len()];
            if let (Some(s), Some(o)) = (shape.first_mut(), offsets.first_mut()) {
                *s = take;
                *o = start;
            }
            Planned {
                name: layout.name.clone(),
                dtype: layout.dtype,
                shape,
                global_shape: layout.global_shape.clone(),
                offsets,
                source: Source::Rows(start..start + take),
            }
        })
        .collect()
}

/// Streams one planned tensor's bytes into `w`, at most `buffer` bytes held at a time (at
/// least one row). Calls `progress` with the bytes of each block written.
pub async fn stream(
    client: &Client,
    cp: &Checkpoint,
    t: &Planned<'_>,
    buffer: u64,
    w: &mut impl Write,
    progress: &mut impl FnMut(u64),
) -> anyhow::Result<()> {
    let mut put = |w: &mut dyn Write, bytes: &[u8]| -> anyhow::Result<()> {
        tokio::task::block_in_place(|| w.write_all(bytes))?;
        progress(bytes.len() as u64);
        Ok(())
    };
    let mut buf = Vec::new();
    match &t.source {
        Source::Slice(entry) => {
            // Blocks end on chunk boundaries, so that no chunk is read twice: as many whole
            // chunks as fit in `buffer`, and at least one.
            let mut ends = entry.chunks.iter().scan(0u64, |at, c| {
                *at += c.len;
                Some(*at)
            });
            let (mut at, mut end) = (0u64, ends.next());
            while let Some(mut to) = end {
                end = ends.next();
                while let Some(next) = end.filter(|&e| e - at <= buffer) {
                    to = next;
                    end = ends.next();
                }
                buf.resize(usize::try_from(to - at)?, 0);
                client.load_slice_range(cp.job(), cp.step(), entry, at..to, &mut buf).await?;
                put(w, &buf)?;
                at = to;
            }
        }
        Source::Rows(rows) => {
            let reader = client.row_reader(cp, &t.name, rows.clone()).await?;
            let row_bytes = reader.row_bytes();
            // A later dimension of size 0: no bytes at all, but the rows are still checked.
            let per_block = buffer.checked_div(row_bytes).map_or(rows.end - rows.start, |n| n.max(1));
            let mut start = rows.start;
            loop {
                let n = per_block.min(rows.end - start);
                buf.resize(reader.bytes_of(n)?, 0);
                reader.read_rows(start, n, &mut buf).await?;
                put(w, &buf)?;
                start += n;
                if start >= rows.end {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Warns when reading every tensor across ranks will fetch index objects more than once: the
/// root's indexes together exceed the index cache, so a tensor's sweep over its ranks evicts
/// what the next tensor needs.
pub fn warn_if_indexes_overflow(cp: &Checkpoint, cache_mib: u64) {
    let total: u64 = cp.root.ranks.iter().map(|r| r.bytes).sum();
    if total > cache_mib.saturating_mul(1 << 20) {
        eprintln!(
            "note: the {} ranks' index objects take {} MiB, more than --index-cache-mib {cache_mib}: \
             they may be fetched again for each tensor (raise it to fetch each once)",
            cp.world_size(),
            total.div_ceil(1 << 20)
        );
    }
}

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

/// Removes the files an earlier restore left in `dir` that a restore of `keep` tensors will
/// not replace: tensor files numbered `keep` and above, and the partial files of one that was
/// interrupted. A `--force` restore of fewer tensors (or of `--all` over one rank, where `keep`
/// is 0) must leave only files its `tensors.json` lists. Only names a restore writes are
/// touched; anything else of the user's in `dir` stays.
pub fn remove_stale_files(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let numbered = |name: &str| {
        name.strip_prefix('t')
            .and_then(|n| n.strip_suffix(".bin"))
            .filter(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = match name.strip_prefix('.') {
            Some(hidden) => {
                hidden == "tensors.json.tmp" || hidden.strip_suffix(".partial").and_then(numbered).is_some()
            }
            None => numbered(&name).is_some_and(|i| i >= keep),
        };
        if stale && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Writes one rank's tensors, each to its own file, then their `tensors.json`, into `dir`.
/// All or nothing: each tensor is streamed into `.tNNNNN.bin.partial`, and only once every one
/// of the rank's bytes has been read and verified, and the filesystem synced, are they renamed
/// into place, the renames synced, and the label written, synced and renamed last (a failure
/// anywhere, a corrupt chunk above all, leaves no file of this rank; after a power cut too a
/// `tensors.json` describes whole files). Consecutive small slices (norms, biases) are read in
/// one batch of up to `buffer` bytes, and one `syncfs` covers every file: a rank of thousands
/// of small tensors costs neither a round of reads nor an fsync per tensor.
pub async fn write_rank(
    client: &Client,
    cp: &Checkpoint,
    (rank, world): (u32, u32),
    tensors: &[Planned<'_>],
    dir: &Path,
    buffer: u64,
    progress: &mut impl FnMut(u64),
) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_stale_files(dir, tensors.len())?;
    // Opened before any file is written: `syncfs` reports a write-back error only to a
    // descriptor opened before it happened (Linux 5.8 and later).
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let (label, label_tmp) = (dir.join("tensors.json"), dir.join(".tensors.json.tmp"));
    let mut partial: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut renamed = 0;
    let mut labelled = false;
    let mut listing = Vec::new();
    let written = async {
        let mut i = 0;
        while i < tensors.len() {
            if let Some((lens, buf)) = read_small_slices(client, cp, &tensors[i..], buffer).await? {
                let mut at = 0usize;
                for (k, &n) in lens.iter().enumerate() {
                    let (file, mut w) = begin_file(dir, i + k, &mut partial)?;
                    tokio::task::block_in_place(|| w.write_all(&buf[at..at + n]))?;
                    end_file(w, file, &tensors[i + k], &mut listing)?;
                    progress(n as u64);
                    at += n;
                }
                i += lens.len();
            } else {
                let t = &tensors[i];
                let (file, mut w) = begin_file(dir, i, &mut partial)?;
                stream(client, cp, t, buffer, &mut w, progress).await.with_context(|| format!("tensor {}", t.name))?;
                end_file(w, file, t, &mut listing)?;
                i += 1;
            }
        }
        let sync_dir =
            || tokio::task::block_in_place(|| d.sync_all()).with_context(|| format!("syncing {}", dir.display()));
        // Every file's bytes on disk before any of them is renamed into place, and the renames
        // durable before the label that describes them.
        tokio::task::block_in_place(|| nix::unistd::syncfs(&d))
            .with_context(|| format!("syncing {}", dir.display()))?;
        for (tmp, path) in &partial {
            std::fs::rename(tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            renamed += 1;
        }
        sync_dir()?;
        // Whole or not at all, after every file it describes.
        let header = serde_json::json!({
            "job": cp.job(), "step": cp.step(), "root_hash": cp.root.hash, "rank": rank, "world_size": world,
            "byte_order": "little-endian", "tensors": listing,
        });
        let mut f = std::fs::File::create(&label_tmp).with_context(|| format!("creating {}", label_tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&header)?)
            .with_context(|| format!("writing {}", label_tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", label_tmp.display()))?;
        std::fs::rename(&label_tmp, &label).with_context(|| format!("writing {}", label.display()))?;
        labelled = true;
        sync_dir()?;
        anyhow::Ok(header)
    }
    .await;
    match written {
        Ok(header) => Ok(header),
        Err(e) => {
            for (i, (tmp, path)) in partial.iter().enumerate() {
                let _ = std::fs::remove_file(if i < renamed { path } else { tmp });
            }
            let _ = std::fs::remove_file(if labelled { &label } else { &label_tmp });
            Err(e)
        }
    }
}

/// Reads the rank's slices at the head of `tensors` that fit in `buffer` together, each whole,
/// in one batch of reads. Returns each one's length and their bytes one after another, or
/// `None` when fewer than two fit (the caller streams the first alone).
async fn read_small_slices<'p>(
    client: &Client,
    cp: &Checkpoint,
    tensors: impl IntoIterator<Item = &'p Planned<'p>>,
    buffer: u64,
) -> anyhow::Result<Option<(Vec<usize>, Vec<u8>)>> {
    let mut batch: Vec<(&TensorEntry, Range<u64>)> = Vec::new();
    let mut total = 0u64;
    for t in tensors {
        let Source::Slice(entry) = t.source else { break };
        let n = t.bytes()?;
        if total.saturating_add(n) > buffer {
            break;
        }
        total += n;
        batch.push((entry, 0..n));
    }
    let [(first, _), .., (last, _)] = batch.as_slice() else { return Ok(None) };
    let mut buf = vec![0u8; usize::try_from(total)?];
    client
        .load_slice_ranges(cp.job(), cp.step(), &batch, &mut buf)
        .await
        .with_context(|| format!("tensors {} to {}", first.name, last.name))?;
    Ok(Some((batch.iter().map(|(_, r)| r.end as usize).collect(), buf)))
}

/// Creates tensor `i`'s partial file in `dir`, noted in `partial` (with where it goes) so that
/// a failure removes it. Returns the file's name and a writer to it.
fn begin_file(
    dir: &Path,
    i: usize,
    partial: &mut Vec<(PathBuf, PathBuf)>,
) -> anyhow::Result<(String, std::io::BufWriter<std::fs::File>)> {
    let file = format!("t{i:05}.bin");
    let (path, tmp) = (dir.join(&file), dir.join(format!(".{file}.partial")));
    let created = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()));
    partial.push((tmp, path));
    Ok((file, std::io::BufWriter::new(created?)))
}

/// Flushes tensor `t`'s file `file` (synced later, with every other) and lists it.
fn end_file(
    w: std::io::BufWriter<std::fs::File>,
    file: String,
    t: &Planned<'_>,
    listing: &mut Vec<serde_json::Value>,
) -> anyhow::Result<()> {
    w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {file}"))?;
    listing.push(serde_json::json!({
        "name": t.name, "dtype": t.dtype, "shape": t.shape, "global_shape": t.global_shape,
        "offsets": t.offsets, "file": file, "bytes": t.bytes()?,
    }));
    Ok(())
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

/// The safetensors header for `tensors` in the order their data follows: 8 bytes of header
/// length, then the JSON, padded with spaces to a multiple of 8 (as the format's own writer
/// does, so that every tensor's data starts aligned). The same checkpoint always gives the same
/// bytes, so that an export can be checked against another by its hash.
fn safetensors_header(cp: &Checkpoint, tensors: &[&Planned<'_>]) -> anyhow::Result<Vec<u8>> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut at = 0usize;
    for t in tensors {
        let len = usize::try_from(t.bytes()?)?;
        let shape = t.shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>()?;
        infos.push((
            t.name.clone(),
            safetensors::tensor::TensorInfo { dtype: safetensors_dtype(t.dtype), shape, data_offsets: (at, at + len) },
        ));
        at = at.checked_add(len).context("the tensors are too large for one file")?;
    }
    // The format's own `Metadata` checks the offsets, but it keeps the free-form metadata in a
    // HashMap, whose order changes from run to run: the JSON is written here, keys sorted.
    safetensors::tensor::Metadata::new(None, infos.clone()).context("building the safetensors header")?;
    let meta = std::collections::BTreeMap::from([
        ("job", cp.job().to_string()),
        ("step", cp.step().to_string()),
        ("root_hash", cp.root.hash.clone()),
    ]);
    let mut json = serde_json::to_vec(&SafetensorsHeader { meta, tensors: &infos })?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// The header's JSON object: `__metadata__` first, then the tensors in data order.
struct SafetensorsHeader<'a> {
    meta: std::collections::BTreeMap<&'static str, String>,
    tensors: &'a [(String, safetensors::tensor::TensorInfo)],
}

impl serde::Serialize for SafetensorsHeader<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        map.serialize_entry("__metadata__", &self.meta)?;
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

/// Writes `tensors` (whole tensors, or one rank's slices) as one safetensors file at `path`,
/// with the job, step and root hash in its metadata: streamed into a temporary file beside it,
/// synced, and renamed over `path` only once complete.
pub async fn write_safetensors(
    client: &Client,
    cp: &Checkpoint,
    tensors: &[Planned<'_>],
    path: &Path,
    buffer: u64,
    progress: &mut impl FnMut(u64),
) -> anyhow::Result<()> {
    // By falling alignment, then name, as the format's own writer orders them.
    let mut order: Vec<&Planned<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| {
        let key = |t: &Planned<'_>| std::cmp::Reverse(safetensors_dtype(t.dtype));
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
    let header = safetensors_header(cp, &order)?;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".partial");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let written = async {
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&header)?;
        // Consecutive small slices (of `--rank`) in one batch of reads, as in `write_rank`.
        let mut i = 0;
        while i < order.len() {
            if let Some((lens, buf)) = read_small_slices(client, cp, order[i..].iter().copied(), buffer).await? {
                tokio::task::block_in_place(|| w.write_all(&buf))?;
                progress(buf.len() as u64);
                i += lens.len();
            } else {
                let t = order[i];
                stream(client, cp, t, buffer, &mut w, progress).await.with_context(|| format!("tensor {}", t.name))?;
                i += 1;
            }
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        tokio::task::block_in_place(|| file.sync_all())?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", tmp.display())));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", parent.display()))
}

/// The tensors `--tensor GLOB` asks for: every tensor when none is given.
pub struct Only(Vec<glob::Pattern>);

impl Only {
    pub fn parse(globs: &[String]) -> anyhow::Result<Only> {
        let patterns = globs
            .iter()
            .map(|g| glob::Pattern::new(g).map_err(|e| CliError::Usage(format!("--tensor {g:?} is not a glob: {e}"))));
        Ok(Only(patterns.collect::<Result<_, _>>()?))
    }

    fn wants(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| p.matches(name))
    }

    /// Refuses a glob that matches no tensor of the checkpoint (a typo would otherwise write
    /// less than was meant, silently).
    pub fn check(&self, cp: &Checkpoint) -> anyhow::Result<()> {
        for p in &self.0 {
            if !cp.root.tensors.iter().any(|t| p.matches(&t.name)) {
                return Err(CliError::NotFound(format!(
                    "--tensor {:?} matches no tensor of {}@{}",
                    p.as_str(),
                    cp.job(),
                    cp.step()
                ))
                .into());
            }
        }
        Ok(())
    }

    pub fn keep<'a>(&self, tensors: Vec<Planned<'a>>) -> Vec<Planned<'a>> {
        tensors.into_iter().filter(|t| self.wants(&t.name)).collect()
    }

    /// `keep` for a single rank's tensors: a rank that holds none of those asked for is
    /// refused, not written as an empty file.
    pub fn keep_some<'a>(&self, tensors: Vec<Planned<'a>>, rank: u32) -> anyhow::Result<Vec<Planned<'a>>> {
        let kept = self.keep(tensors);
        if kept.is_empty() && !self.0.is_empty() {
            let globs: Vec<&str> = self.0.iter().map(glob::Pattern::as_str).collect();
            return Err(CliError::NotFound(format!("rank {rank} holds no tensor matching --tensor {globs:?}")).into());
        }
        Ok(kept)
    }
}
