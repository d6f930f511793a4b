//! `ckpt bench`: a save burst, restores and incremental saves through a private ckptd, each
//! against the physical floor of the same work on the same bytes, measured in the same run.
//!
//! Design note.
//! * Like for like: every limit is the plainest way to do the same work on the same bytes on
//!   the same disk: for durable saves the bytes written sequentially and fsync'd, one fsync per
//!   file, by one writer, one per rank or 8, buffered and with direct I/O (the best counts; on
//!   a VM whose returned memory is backed again on first touch, buffered writes into fresh
//!   page cache run at a fraction of the disk); for warm restores the bytes read from the page
//!   cache into pre-touched buffers and hashed, all cores; for cold restores
//!   the same with direct I/O. Limits and ckpt runs alternate within each repeat, and each
//!   figure is the median of `--repeat` runs with its min–max, so a noisy disk shows as spread
//!   rather than as a lucky ratio.
//! * Each repeat uses a fresh ckptd and store, so every full save writes every byte.
//! * The trainer's side: ranks are threads of this process, each with its own `AsyncSaver`.
//!   A synthetic training step (arithmetic over a private buffer) runs while saves are in
//!   flight; the table gives the step-time slowdown and every wait a rank has for a save.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ckpt_client::daemon::cpu_seconds;
pub(crate) use ckpt_client::daemon::peak_rss_bytes;
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{AsyncSaver, Client, ClientOptions, DType, RestoreTarget, SaveSpec, Tensor, Wait};
use ckpt_core::chunk::chunk_ranges;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Data {
    /// Random bytes: incompressible, the worst case for the store.
    Random,
    /// fp32 state shaped like a trained checkpoint: weights and AdamW moments of small
    /// magnitude (exponents repeat, mantissas are noise).
    Trained,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Directory on the disk to measure (store, spill and the raw-write file go here).
    #[arg(long, default_value = "ckpt-bench")]
    pub dir: PathBuf,
    /// Ranks saving at once (threads of this process, each with its own saver).
    #[arg(long, default_value_t = 4)]
    pub ranks: u32,
    /// State per rank, in MiB.
    #[arg(long = "mib", value_name = "MIB", default_value_t = 512)]
    pub mib_per_rank: u64,
    /// ckptd's staging memory budget.
    #[arg(long, default_value_t = 1024)]
    pub staging_mib: u64,
    /// Chunk size in MiB.
    #[arg(long, default_value_t = 4)]
    pub chunk_mib: u64,
    /// Seed of the generated state.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How chunk bytes travel.
    #[arg(long, value_enum, default_value_t = Transport::Local)]
    pub transport: Transport,
    /// Nice value for checkpoint background work (ckptd and the savers' threads); 0 runs
    /// it at the trainer's priority.
    #[arg(long, default_value_t = ckpt_client::async_save::BACKGROUND_NICE)]
    pub background_nice: i32,
    /// Runs of every limit and every ckpt figure (interleaved); the table gives medians.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// The state saved: random bytes, or fp32 shaped like a trained checkpoint.
    #[arg(long, value_enum, default_value_t = Data::Random)]
    pub data: Data,
    /// Also stream a burst of this many GiB over HTTP and report ckptd's peak RSS (0: skip).
    #[arg(long, default_value_t = 0)]
    pub rss_burst_gib: u64,
    /// Print JSON instead of the table (the global `--json`).
    #[arg(skip)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Handoff files and direct reads (same host).
    Local,
    /// Over ckptd's HTTP API.
    Http,
}

impl BenchOptions {
    fn node_local(&self) -> bool {
        self.transport == Transport::Local
    }
}

const MIB: u64 = 1 << 20;
/// Size of the benchmark's tensors.
const TENSOR_BYTES: u64 = 64 * MIB;
/// Pieces the limits read and write at a time.
const PIECE: usize = 4 << 20;
/// The warm read limit's other piece size: read and hashed while still in a core's cache, as
/// ckpt's restore does (its transports hash 256 KiB pieces as they land).
const SMALL_PIECE: usize = 256 << 10;
/// The limits' other reader and writer count next to one per core (and one per rank for
/// writes): reads that wait on a disk need several in flight, as ckpt's restore has.
const READERS: usize = 8;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / secs(d)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Every sample of one figure across the repeats.
#[derive(Default, Clone, Serialize)]
pub(crate) struct Samples(pub(crate) Vec<f64>);

impl Samples {
    fn push(&mut self, x: f64) {
        self.0.push(x);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    /// (median, min, max); NaN for no samples.
    pub(crate) fn median_min_max(&self) -> (f64, f64, f64) {
        let v = self.sorted();
        (self.median(), v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN))
    }
    fn show(&self, unit: &str, digits: usize) -> String {
        let (median, min, max) = self.median_min_max();
        match self.0.len() {
            0 => "-".into(),
            1 => format!("{median:.digits$} {unit}"),
            _ => format!("{median:.digits$} {unit} ({min:.digits$}–{max:.digits$})"),
        }
    }
}

#[derive(Serialize)]
struct Row {
    figure: String,
    measured: String,
    limit: String,
    /// Median of the per-repeat ratios (each ckpt run against the limit measured next to it).
    ratio: Option<f64>,
    ratio_range: Option<(f64, f64)>,
    target: String,
    pass: Option<bool>,
}

enum Target {
    AtMost(f64),
    AtLeast(f64),
    Info,
}

fn row(figure: &str, measured: String, limit: String, ratios: &Samples, target: Target) -> Row {
    let r = ratios.median();
    let v = ratios.sorted();
    let range = (v.len() > 1).then(|| (v[0], v[v.len() - 1]));
    let ratio = (!v.is_empty()).then_some(r);
    let (target, pass) = match target {
        Target::AtMost(t) => (format!("<= {t}"), ratio.map(|r| r <= t)),
        Target::AtLeast(t) => (format!(">= {t}"), ratio.map(|r| r >= t)),
        Target::Info => ("(info)".into(), None),
    };
    Row { figure: figure.into(), measured, limit, ratio, ratio_range: range, target, pass }
}

/// One rank's state as bytes.
fn rank_bytes(data: Data, seed: u64, rank: u32, bytes: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((rank as u64 + 1) << 40));
    let mut v = vec![0u8; bytes as usize];
    match data {
        Data::Random => rng.fill_bytes(&mut v),
        Data::Trained => {
            // Thirds: weights ~ N(0, 0.02), first moments ~ N(0, 1e-3), second moments ~ 1e-6
            // scaled squares: the magnitudes of a trained fp32 checkpoint with AdamW state.
            let third = v.len() / 12 * 4;
            for (i, c) in v.chunks_exact_mut(4).enumerate() {
                let g: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                let x = match (i * 4) / third.max(4) {
                    0 => g * 0.02,
                    1 => g * 1e-3,
                    _ => g * g * 1e-6,
                };
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    v
}

fn as_tensors(rank: u32, ranks: u32, data: &Bytes) -> Vec<Tensor> {
    chunk_ranges(data.len() as u64, TENSOR_BYTES)
        .enumerate()
        .map(|(i, r)| {
            let elems = (r.end - r.start) / 4;
            Tensor {
                name: format!("layers.{i}.weight"),
                dtype: DType::F32,
                shape: vec![elems],
                global_shape: vec![elems * ranks as u64],
                offsets: vec![elems * rank as u64],
                data: data.slice(r.start as usize..r.end as usize),
            }
        })
        .collect()
}

/// Runs `f(i)` on one thread per item at the same instant; returns the time until the last
/// finished.
fn all_at_once<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> (Duration, Vec<T>) {
    let barrier = std::sync::Barrier::new(n + 1);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let (f, barrier) = (&f, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let out: Vec<T> = hs.into_iter().map(|h| h.join().expect("benchmark thread")).collect();
        (t.elapsed(), out)
    })
}

/// The copy floor of a save's stall: every rank copies its tensors into a pre-touched buffer
/// at once, one memcpy per tensor or per 4 MiB piece, whichever is faster (glibc picks another
/// strategy for very large copies, so the piece size matters).
fn limit_memcpy(sources: &[Bytes], dsts: &mut [Vec<u8>]) -> Duration {
    let cells: Vec<std::sync::Mutex<&mut Vec<u8>>> = dsts.iter_mut().map(std::sync::Mutex::new).collect();
    [TENSOR_BYTES as usize, PIECE]
        .into_iter()
        .map(|piece| {
            all_at_once(sources.len(), |i| {
                let mut d = cells[i].lock().unwrap();
                for (dp, sp) in d.chunks_mut(piece).zip(sources[i].chunks(piece)) {
                    dp.copy_from_slice(sp);
                }
            })
            .0
        })
        .min()
        .unwrap_or_default()
}

/// The durable-write floor: the same bytes written sequentially by `writers` threads, one file
/// each, each fsync'd once, and the directory fsync'd.
fn limit_write(
    dir: &Path,
    sources: &[Bytes],
    writers: usize,
    direct: bool,
) -> std::io::Result<(Duration, Vec<PathBuf>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let all: Vec<&[u8]> = sources.iter().flat_map(|s| s.chunks(PIECE)).collect();
    let per = all.len().div_ceil(writers);
    let paths: Vec<PathBuf> = (0..writers).map(|w| dir.join(format!("limit-{w}.bin"))).collect();
    // Direct I/O wants aligned memory: each writer copies a piece into its own aligned buffer
    // (touched before the clock starts) and writes that, as ckptd does.
    let mut bounces: Vec<Vec<u8>> = (0..if direct { writers } else { 0 }).map(|_| vec![1u8; PIECE + 4096]).collect();
    let bounces: Vec<std::sync::Mutex<&mut Vec<u8>>> = bounces.iter_mut().map(std::sync::Mutex::new).collect();
    let (d, results) = all_at_once(writers, |w| -> std::io::Result<()> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let mut f = o.open(&paths[w])?;
        for p in all.iter().skip(w * per).take(per) {
            if direct {
                let mut bounce = bounces[w].lock().unwrap_or_else(|e| e.into_inner());
                let at = bounce.as_ptr().align_offset(4096);
                let padded = p.len().next_multiple_of(4096);
                bounce[at..at + p.len()].copy_from_slice(p);
                f.write_all(&bounce[at..at + padded])?;
            } else {
                f.write_all(p)?;
            }
        }
        f.sync_data()
    });
    results.into_iter().collect::<std::io::Result<()>>()?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok((d, paths))
}

/// The warm-restore floor: the limit files read with `threads` threads straight into the same
/// pre-touched buffers ckpt restores into, in the same 4 MiB pieces, each hashed where it
/// landed. `limit_write` put piece k of the concatenated ranks into file k / per.
fn limit_read_into(paths: &[PathBuf], dsts: &mut [Vec<u8>], threads: usize, piece: usize) -> std::io::Result<Duration> {
    use std::os::unix::fs::FileExt;
    let files: Vec<std::fs::File> = paths.iter().map(std::fs::File::open).collect::<std::io::Result<_>>()?;
    let mut pieces: Vec<&mut [u8]> = dsts.iter_mut().flat_map(|d| d.chunks_mut(piece)).collect();
    let per = pieces.len().div_ceil(paths.len());
    let mut jobs = Vec::with_capacity(pieces.len());
    let mut at = vec![0u64; paths.len()];
    for (k, dst) in pieces.drain(..).enumerate() {
        let f = k / per;
        jobs.push((f, at[f], dst));
        at[f] += jobs.last().map_or(0, |j| j.2.len() as u64);
    }
    jobs.reverse();
    let queue = std::sync::Mutex::new(jobs);
    let (d, results) = all_at_once(threads, |_| -> std::io::Result<()> {
        loop {
            let Some((f, off, dst)) = queue.lock().unwrap().pop() else { return Ok(()) };
            files[f].read_exact_at(dst, off)?;
            std::hint::black_box(blake3::hash(dst));
        }
    });
    results.into_iter().collect::<std::io::Result<()>>()?;
    Ok(d)
}

/// The cold-restore floor: reads `paths` in 4 MiB ranges with `threads` threads, each range in
/// order in pieces of `piece` bytes (at most 4 MiB) into a pre-touched aligned buffer, each
/// piece hashed as it lands; with `direct`, through O_DIRECT (nothing from the page cache),
/// without it through the page cache, whose read-ahead then fetches a range's next piece while
/// the last one is hashed.
fn limit_read_hash(paths: &[PathBuf], direct: bool, threads: usize, piece: usize) -> std::io::Result<Duration> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut jobs = Vec::new();
    for p in paths {
        let len = std::fs::metadata(p)?.len();
        for at in (0..len).step_by(PIECE) {
            jobs.push((p.clone(), at, (len - at).min(PIECE as u64) as usize));
        }
    }
    jobs.reverse();
    let queue = std::sync::Mutex::new(jobs);
    let (d, results) = all_at_once(threads, |_| -> std::io::Result<()> {
        // 4 KiB-aligned for O_DIRECT, touched before the clock matters.
        let mut raw = vec![1u8; PIECE + 4096];
        let off = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[off..off + PIECE];
        let mut files: std::collections::HashMap<PathBuf, std::fs::File> = Default::default();
        while let Some((p, at, n)) = queue.lock().unwrap().pop() {
            if !files.contains_key(&p) {
                let mut o = std::fs::OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                files.insert(p.clone(), o.open(&p)?);
            }
            let f = &files[&p];
            let mut pos = 0;
            while pos < n {
                let k = (n - pos).min(piece);
                let want = if direct { k.next_multiple_of(4096) } else { k };
                let mut got = 0;
                while got < k {
                    let r = f.read_at(&mut buf[got..want], at + (pos + got) as u64)?;
                    if r == 0 {
                        break;
                    }
                    got += r;
                }
                std::hint::black_box(blake3::hash(&buf[..k]));
                pos += k;
            }
        }
        Ok(())
    });
    results.into_iter().collect::<std::io::Result<()>>()?;
    Ok(d)
}

/// Drops the page cache of `dir`'s files, or of `dir` itself if it is a file (they are clean:
/// fsync'd).
/// Every file under `dir` (or `dir` itself if it is a file).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.is_file() {
            out.push(d);
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Drops the files' pages from the page cache (written back first).
fn drop_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for p in files_under(dir) {
        if let Ok(f) = std::fs::File::open(&p) {
            let _ = f.sync_data();
            // SAFETY: advisory call on an fd this function owns.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Reads every file once so a following read finds it in the page cache: ckptd writes chunks
/// with direct I/O, so a store just written is not cached.
fn warm_cache(dir: &Path) {
    for p in files_under(dir) {
        if let Ok(mut f) = std::fs::File::open(&p) {
            let _ = std::io::copy(&mut f, &mut std::io::sink());
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    files_under(dir).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

async fn start(opts: &BenchOptions, sub: &str) -> Result<LocalDaemon> {
    let dir = opts.dir.join(sub);
    let _ = std::fs::remove_dir_all(&dir);
    let mut d = DaemonOptions::in_dir(find_ckptd()?, &dir);
    d.nice = opts.background_nice;
    d.extra_args = vec![
        "--staging-memory-bytes-max".into(),
        (opts.staging_mib * MIB).to_string().into(),
        "--chunk-bytes-max".into(),
        (opts.chunk_mib.max(1) * MIB).to_string().into(),
    ];
    Ok(LocalDaemon::start(d).await?)
}

fn spec(step: u64, rank: u32, world: u32) -> SaveSpec {
    SaveSpec {
        job: "bench".into(),
        step,
        rank,
        world_size: world,
        metadata: serde_json::json!({ "bench": true }),
        rank_metadata: serde_json::Value::Null,
        created_unix_ms: None,
        node_ranks: None,
    }
}

/// Every rank's save called at the same instant on its own thread; returns the time until the
/// last call returned (the stall) and the tickets.
fn timed_saves(
    savers: &[AsyncSaver],
    states: &[Vec<Tensor>],
    step: u64,
    wait: Wait,
) -> Result<(Duration, Vec<ckpt_client::SaveTicket>)> {
    let handle = tokio::runtime::Handle::current();
    let n = savers.len() as u32;
    let (d, tickets) = tokio::task::block_in_place(|| {
        all_at_once(savers.len(), |r| {
            let views: Vec<_> = states[r].iter().map(Tensor::view).collect();
            handle.block_on(savers[r].save(spec(step, r as u32, n), &views, wait))
        })
    });
    Ok((d, tickets.into_iter().collect::<Result<Vec<_>, _>>()?))
}

/// Restores every rank into `bufs` at once; returns the wall time.
async fn restore_all(client: &Client, step: u64, states: &[Vec<Tensor>], bufs: &mut [Vec<u8>]) -> Result<Duration> {
    // Each rank restores on its own thread, as rank processes do: a restore occupies its
    // caller while its workers run, so ranks joined in one task would restore one by one.
    let handle = tokio::runtime::Handle::current();
    let cells: Vec<std::sync::Mutex<&mut Vec<u8>>> = bufs.iter_mut().map(std::sync::Mutex::new).collect();
    let (d, results) = tokio::task::block_in_place(|| {
        all_at_once(states.len(), |r| {
            let mut buf = cells[r].lock().unwrap();
            let mut targets = Vec::with_capacity(states[r].len());
            let mut rest = &mut buf[..];
            for t in &states[r] {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(t.data.len());
                targets.push(RestoreTarget { name: &t.name, data: head });
                rest = tail;
            }
            handle.block_on(client.restore_rank_into("bench", step, r as u32, &mut targets))
        })
    });
    for r in results {
        r?;
    }
    Ok(d)
}

/// A training step's arithmetic over `work`: a fixed amount of single-threaded compute on a
/// cache-resident buffer (a trainer's step is compute-bound; on GPUs it is not on these cores
/// at all, so this is the harsher case).
fn synthetic_step(work: &mut [f32]) -> Duration {
    let t = Instant::now();
    for _ in 0..200 {
        for x in work.iter_mut() {
            *x = x.mul_add(0.999_9, 1e-4);
        }
    }
    std::hint::black_box(&work);
    t.elapsed()
}

#[derive(Default)]
struct Figures {
    memcpy: Samples,
    stall: Samples,
    stall_ratio: Samples,
    write_limit: Samples,
    committed: Samples,
    committed_ratio: Samples,
    warm_limit: Samples,
    warm: Samples,
    warm_ratio: Samples,
    cold_limit: Samples,
    cold: Samples,
    cold_ratio: Samples,
    stored_ratio: Samples,
    incr_time: Samples,
    incr_time_ratio: Samples,
    incr_bytes_ratio: Samples,
    incr_stored_ratio: Samples,
    wait_total: Samples,
    wait_ratio: Samples,
    wait_prev: Samples,
    interval: Samples,
    step_base: Samples,
    step_busy: Samples,
    slowdown: Samples,
    ckptd_rss: Samples,
    save_cpu: Samples,
    save_cpu_share: Samples,
    cpu_budget_ratio: Samples,
    allocs_save: Samples,
    allocs_restore: Samples,
    self_rss: Samples,
}

pub async fn run(opts: BenchOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let (n, per_rank) = (opts.ranks, opts.mib_per_rank * MIB);
    let total = n as u64 * per_rank;
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(2);
    let header = format!(
        "ckpt bench: {n} ranks x {} MiB = {} MiB of {:?} data, chunks {} MiB, staging {} MiB, transport {}, background nice {}, {} repeats, {cores} cores, load {} (before), in {}",
        opts.mib_per_rank,
        total / MIB,
        opts.data,
        opts.chunk_mib,
        opts.staging_mib,
        if opts.node_local() { "node-local" } else { "http" },
        opts.background_nice,
        opts.repeat,
        load_average(),
        opts.dir.display()
    );
    if !opts.json {
        println!("{header}");
    }
    let sources: Vec<Bytes> = (0..n).map(|r| Bytes::from(rank_bytes(opts.data, opts.seed, r, per_rank))).collect();
    let states: Vec<Vec<Tensor>> = (0..n).map(|r| as_tensors(r, n, &sources[r as usize])).collect();
    // Pre-touched buffers: the memcpy floor's destinations, then the restores' targets.
    let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![1u8; per_rank as usize]).collect();
    let mut f = Figures::default();
    let mut save_bytes = (0u64, 0u64);

    for rep in 0..opts.repeat {
        // Limits first in this repeat: the durable write and the reads of its files.
        let mut best_write = Duration::MAX;
        let mut limit_files = Vec::new();
        let mut counts = vec![1, n as usize, READERS];
        counts.dedup();
        // Buffered, then direct I/O (what ckptd's node-local writes use); the best counts.
        let ways: Vec<(usize, bool)> = counts.iter().flat_map(|&w| [(w, false), (w, true)]).collect();
        for (writers, direct) in ways {
            for p in limit_files.drain(..) {
                let _ = std::fs::remove_file::<PathBuf>(p);
            }
            let (d, paths) = limit_write(&opts.dir, &sources, writers, direct).context("limit: fsync'd write")?;
            best_write = best_write.min(d);
            limit_files = paths;
        }
        let write_bw = mibps(total, best_write);
        f.write_limit.push(write_bw);
        // Warm: the files are read once untimed, so every byte comes from the page cache.
        limit_read_hash(&limit_files, false, cores, PIECE).context("limit: warming the page cache")?;
        let mut warm_limit = 0f64;
        // Pieces of 4 MiB, and of the size ckpt hashes while a piece is in the cache.
        for threads in [cores, READERS] {
            for piece in [PIECE, SMALL_PIECE] {
                let d = limit_read_into(&limit_files, &mut bufs, threads, piece).context("limit: warm read")?;
                warm_limit = warm_limit.max(mibps(total, d));
            }
        }
        f.warm_limit.push(warm_limit);
        for p in limit_files {
            let _ = std::fs::remove_file(p);
        }

        // The burst through ckptd.
        let sub = format!("run-{rep}");
        let daemon = start(&opts, &sub).await?;
        let copts = ClientOptions {
            chunk_bytes: opts.chunk_mib * MIB,
            node_local: opts.node_local(),
            ..ClientOptions::default()
        };
        let client = Client::new(&daemon.url(), copts)?;
        let savers: Vec<AsyncSaver> = (0..n)
            .map(|_| AsyncSaver::with_background_nice(client.clone(), per_rank as usize, opts.background_nice))
            .collect();
        // The copy floor right before the stall it bounds, in the same memory state.
        let memcpy = limit_memcpy(&sources, &mut bufs);
        f.memcpy.push(secs(memcpy));
        let burst = Instant::now();
        let allocs = crate::allocations();
        let ckptd_cpu = daemon.pid().and_then(cpu_seconds).unwrap_or(0.0);
        let (stall, tickets) = timed_saves(&savers, &states, 1, Wait::Committed)?;
        // The save's CPU beyond the trainer's copy: ckptd's, and this process's after the stall
        // (the savers' background work).
        let bench_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0);
        let (mut sent_full, mut chunks_full) = (0, 0);
        for t in tickets {
            let r = t.finish().await?;
            (sent_full, chunks_full) = (sent_full + r.bytes_sent, chunks_full + r.chunks_sent);
        }
        let committed = burst.elapsed();
        let save_cpu = daemon.pid().and_then(cpu_seconds).unwrap_or(0.0) - ckptd_cpu
            + cpu_seconds(std::process::id()).unwrap_or(0.0)
            - bench_cpu;
        f.save_cpu.push(save_cpu);
        f.save_cpu_share.push(save_cpu / (cores as f64 * secs(committed)));
        f.allocs_save.push((crate::allocations() - allocs) as f64 / chunks_full.max(1) as f64);
        f.stall.push(secs(stall));
        f.stall_ratio.push(secs(stall) / secs(memcpy));
        f.committed.push(mibps(total, committed));
        f.committed_ratio.push(mibps(total, committed) / write_bw);
        let chunks_dir = opts.dir.join(&sub).join("store").join(ckpt_core::keys::chunks_prefix("bench"));
        let stored_full = dir_bytes(&chunks_dir);
        f.stored_ratio.push(stored_full as f64 / total as f64);

        // Restores: warm (every store file read once first), then with its pages dropped.
        warm_cache(&opts.dir.join(&sub).join("store"));
        let allocs = crate::allocations();
        let warm = restore_all(&client, 1, &states, &mut bufs).await?;
        f.allocs_restore.push((crate::allocations() - allocs) as f64 / chunks_full.max(1) as f64);
        for (r, b) in bufs.iter().enumerate() {
            if b[..] != sources[r][..] {
                bail!("rank {r} restored different bytes");
            }
        }
        f.warm.push(mibps(total, warm));
        f.warm_ratio.push(mibps(total, warm) / warm_limit);
        // The cold floor reads the very files the cold restore reads, just before it: files
        // written at another moment can sit elsewhere on the disk, or in a cache of the host's
        // (limits on separate files read slower than ckpt's own cold restore, 0.8x of it).
        // Direct reads, and buffered reads from a dropped cache in 4 MiB or 256 KiB pieces (as
        // ckpt reads, so read-ahead overlaps the hashing); as many readers as the cores,
        // `READERS`, or as ckpt's restores together (each rank `READERS`).
        let store_files = files_under(&chunks_dir);
        let mut cold_limit = 0f64;
        for threads in [cores, READERS, READERS * n as usize] {
            for (direct, piece) in [(true, PIECE), (false, PIECE), (false, SMALL_PIECE)] {
                drop_cache(&chunks_dir);
                let d = limit_read_hash(&store_files, direct, threads, piece).context("limit: cold read")?;
                cold_limit = cold_limit.max(mibps(total, d));
            }
        }
        f.cold_limit.push(cold_limit);
        drop_cache(&opts.dir.join(&sub).join("store"));
        let cold = restore_all(&client, 1, &states, &mut bufs).await?;
        f.cold.push(mibps(total, cold));
        f.cold_ratio.push(mibps(total, cold) / cold_limit);

        // Incremental: 10% of each rank's chunks change (evenly spaced), the rest dedup.
        let (incr_time, sent_incr, stored_incr) = incremental(&opts, &savers, &sources, rep, &chunks_dir).await?;
        f.incr_time.push(secs(incr_time));
        f.incr_time_ratio.push(secs(incr_time) / secs(committed));
        f.incr_bytes_ratio.push(sent_incr as f64 / sent_full.max(1) as f64);
        f.incr_stored_ratio.push(stored_incr as f64 / stored_full.max(1) as f64);
        save_bytes = (sent_full, stored_full);

        // The trainer's side: steps with and without a save in flight, every wait counted.
        let trainer = trainer_side(&savers, &mut bufs, n, committed).await?;
        f.wait_total.push(trainer.wait_total);
        f.wait_prev.push(trainer.wait_prev);
        f.interval.push(trainer.interval_steps);
        f.wait_ratio.push(trainer.wait_total / secs(memcpy));
        f.step_base.push(trainer.step_base * 1e3);
        f.step_busy.push(trainer.step_busy * 1e3);
        f.slowdown.push(trainer.step_busy / trainer.step_base - 1.0);
        // What the save needs against what training can give it at a 10% slowdown over one
        // checkpoint interval: above 1, a save cannot finish in the background before the next
        // one without slowing steps by more than 10% (see BENCHMARKS.md).
        let interval_s = trainer.interval_steps * trainer.step_base;
        f.cpu_budget_ratio.push(save_cpu / (0.10 * cores as f64 * interval_s));

        drop(savers);
        f.ckptd_rss.push(daemon.pid().and_then(peak_rss_bytes).unwrap_or(0) as f64 / MIB as f64);
        drop(daemon);
        let _ = std::fs::remove_dir_all(opts.dir.join(&sub));
        if !opts.json {
            println!(
                "repeat {}: stall {:.3}s (memcpy {:.3}s), committed {:.0} MiB/s (fsync'd write {:.0}), restore warm {:.0} MiB/s (limit {:.0}), cold {:.0} MiB/s (limit {:.0}), load {}",
                rep + 1,
                secs(stall),
                secs(memcpy),
                mibps(total, committed),
                write_bw,
                mibps(total, warm),
                warm_limit,
                mibps(total, cold),
                cold_limit,
                load_average()
            );
        }
    }
    f.self_rss.push(peak_rss_bytes(std::process::id()).unwrap_or(0) as f64 / MIB as f64);
    let burst_rss = if opts.rss_burst_gib > 0 { Some(rss_burst(&opts).await?) } else { None };

    let rows = vec![
        row(
            "trainer stall (copy, all ranks at once)",
            f.stall.show("s", 3),
            format!("memcpy of the same tensors {}", f.memcpy.show("s", 3)),
            &f.stall_ratio,
            Target::AtMost(1.2),
        ),
        row(
            "total trainer wait per checkpoint (earlier commit + buffer + copy), saves in a row",
            f.wait_total.show("s", 3),
            format!("memcpy {}", f.memcpy.show("s", 3)),
            &f.wait_ratio,
            Target::AtMost(1.2),
        ),
        row(
            "  of which waiting for an earlier save's commit",
            f.wait_prev.show("s", 3),
            "-".into(),
            &Samples::default(),
            Target::Info,
        ),
        row(
            "  checkpoint interval (2x the idle save's time, at most 300 steps)",
            format!("{} steps of {}", f.interval.show("", 0), f.step_base.show("ms", 1)),
            "-".into(),
            &Samples::default(),
            Target::Info,
        ),
        row(
            "step-time slowdown with a save in flight",
            format!("{} vs {} without", f.step_busy.show("ms", 1), f.step_base.show("ms", 1)),
            "steps without a save, same run".into(),
            &f.slowdown,
            Target::AtMost(0.10),
        ),
        row(
            "  CPU of one full save beyond the trainer's copy (ckptd + savers' background)",
            f.save_cpu.show("core-s", 2),
            "share of all cores while the idle save ran".into(),
            &f.save_cpu_share,
            Target::Info,
        ),
        row(
            "  that CPU / 10% of the cores over one checkpoint interval",
            "-".into(),
            "above 1: wait <= 1.2x and slowdown <= 10% cannot both hold here".into(),
            &f.cpu_budget_ratio,
            Target::Info,
        ),
        row(
            "durable save (call to committed)",
            f.committed.show("MiB/s", 0),
            format!("sequential fsync'd write, best of buffered and direct {}", f.write_limit.show("MiB/s", 0)),
            &f.committed_ratio,
            Target::AtLeast(if opts.node_local() { 0.8 } else { 0.6 }),
        ),
        row(
            "bytes stored / raw bytes",
            format!("{} of {} MiB sent", save_bytes.1 / MIB, save_bytes.0 / MIB),
            "raw bytes".into(),
            &f.stored_ratio,
            if opts.data == Data::Trained { Target::AtMost(0.85) } else { Target::Info },
        ),
        row(
            "restore + verify into buffers, warm",
            f.warm.show("MiB/s", 0),
            format!("read + blake3 (4 MiB or 256 KiB pieces, 2 or 8 threads) {}", f.warm_limit.show("MiB/s", 0)),
            &f.warm_ratio,
            Target::AtLeast(0.8),
        ),
        row(
            "restore + verify into buffers, cold",
            f.cold.show("MiB/s", 0),
            format!(
                "the same chunk files read + blake3, best of O_DIRECT and dropped-cache reads (4 MiB or 256 KiB pieces) {}",
                f.cold_limit.show("MiB/s", 0)
            ),
            &f.cold_ratio,
            Target::AtLeast(0.8),
        ),
        row(
            "incremental (10% changed): call to committed",
            f.incr_time.show("s", 3),
            "full save's time".into(),
            &f.incr_time_ratio,
            Target::AtMost(0.2),
        ),
        row(
            "incremental (10% changed): bytes sent",
            "-".into(),
            "full save's bytes".into(),
            &f.incr_bytes_ratio,
            Target::AtMost(0.11),
        ),
        row(
            "incremental (10% changed): bytes stored",
            "-".into(),
            "full save's stored bytes".into(),
            &f.incr_stored_ratio,
            Target::AtMost(0.11),
        ),
        row(
            "ckptd peak RSS",
            f.ckptd_rss.show("MiB", 0),
            format!("staging budget {} MiB + 128", opts.staging_mib),
            &Samples(f.ckptd_rss.0.iter().map(|r| r / (opts.staging_mib + 128) as f64).collect()),
            Target::AtMost(1.0),
        ),
        row(
            &format!("ckptd peak RSS, {} GiB streamed over HTTP", opts.rss_burst_gib),
            burst_rss.map_or("-".into(), |r| format!("{r:.0} MiB")),
            format!("staging budget {} MiB + 128", opts.staging_mib),
            &Samples(burst_rss.into_iter().map(|r| r / (opts.staging_mib + 128) as f64).collect()),
            Target::AtMost(1.0),
        ),
        row(
            &format!("client heap allocations per chunk ({})", if opts.node_local() { "node-local" } else { "http" }),
            format!("save {}, restore {}", f.allocs_save.show("", 1), f.allocs_restore.show("", 1)),
            "-".into(),
            &Samples::default(),
            Target::Info,
        ),
        row(
            "bench process peak RSS (all ranks' state, sources, savers)",
            f.self_rss.show("MiB", 0),
            format!("{} MiB of state", total / MIB),
            &Samples::default(),
            Target::Info,
        ),
    ];
    if opts.json {
        let figures = serde_json::json!({
            "memcpy_s": f.memcpy, "stall_s": f.stall, "write_limit_mibps": f.write_limit,
            "committed_mibps": f.committed, "warm_limit_mibps": f.warm_limit, "warm_mibps": f.warm,
            "cold_limit_mibps": f.cold_limit, "cold_mibps": f.cold, "incremental_s": f.incr_time,
            "wait_total_s": f.wait_total, "step_base_ms": f.step_base, "step_busy_ms": f.step_busy,
            "ckptd_rss_mib": f.ckptd_rss, "save_cpu_core_s": f.save_cpu, "save_cpu_share": f.save_cpu_share,
            "cpu_budget_ratio": f.cpu_budget_ratio,
        });
        let out = serde_json::json!({
            "bench": { "ranks": n, "mib_per_rank": opts.mib_per_rank, "data": opts.data, "chunk_mib": opts.chunk_mib,
                       "transport": if opts.node_local() { "node-local" } else { "http" }, "repeat": opts.repeat,
                       "cores": cores, "load_after": load_average() },
            "rows": rows,
            "samples": figures,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("load after: {}", load_average());
        print_table(&rows);
    }
    Ok(())
}

async fn incremental(
    opts: &BenchOptions,
    savers: &[AsyncSaver],
    sources: &[Bytes],
    rep: usize,
    chunks_dir: &Path,
) -> Result<(Duration, u64, u64)> {
    let n = sources.len() as u32;
    let chunk = (opts.chunk_mib * MIB) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed + 1 + rep as u64);
    let changed: Vec<Bytes> = sources
        .iter()
        .map(|s| {
            let mut v = s.to_vec();
            let count = v.len().div_ceil(chunk);
            let picks = ((count as f64 * 0.1).round() as usize).max(1);
            let chosen: std::collections::BTreeSet<usize> = (0..picks).map(|k| k * count / picks).collect();
            for (i, c) in v.chunks_mut(chunk).enumerate() {
                if chosen.contains(&i) {
                    // A training update: every value of the chunk moves a little.
                    for x in c.chunks_exact_mut(4) {
                        let f = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                        x.copy_from_slice(&(f * (1.0 + rng.random::<f32>() * 1e-3)).to_le_bytes());
                    }
                }
            }
            Bytes::from(v)
        })
        .collect();
    let states: Vec<Vec<Tensor>> = (0..n).map(|r| as_tensors(r, n, &changed[r as usize])).collect();
    let before = dir_bytes(chunks_dir);
    let t = Instant::now();
    let (_, tickets) = timed_saves(savers, &states, 2, Wait::Committed)?;
    let mut sent = 0;
    for t in tickets {
        sent += t.finish().await?.bytes_sent;
    }
    Ok((t.elapsed(), sent, dir_bytes(chunks_dir) - before))
}

/// One rank's samples, in seconds: total wait per checkpoint, the part spent on the previous
/// save, step times without and with a save in flight, and steps between checkpoints.
#[derive(Default)]
struct RankTrace {
    waits: Vec<f64>,
    prev_waits: Vec<f64>,
    idle: Vec<f64>,
    busy: Vec<f64>,
    intervals: Vec<f64>,
}

struct TrainerSide {
    wait_total: f64,
    wait_prev: f64,
    interval_steps: f64,
    step_base: f64,
    step_busy: f64,
}

/// Each rank thread trains (synthetic steps) and checkpoints every `interval` steps: twice the
/// time the idle burst took to commit (capped at 300 steps), so saves follow each other with
/// little slack. A save needs only the staging buffer, which the previous save releases when
/// ckptd holds its bytes; at most two saves are awaited, as in the trainer, so a third waits for
/// the oldest commit. Every wait is counted. Returns the median total wait per checkpoint
/// (earlier commit, buffer, copy), the interval, and the median step times with and without a
/// save in flight.
async fn trainer_side(savers: &[AsyncSaver], bufs: &mut [Vec<u8>], n: u32, full_save: Duration) -> Result<TrainerSide> {
    let handle = tokio::runtime::Handle::current();
    let cells: Vec<std::sync::Mutex<&mut Vec<u8>>> = bufs.iter_mut().map(std::sync::Mutex::new).collect();
    let per_rank = tokio::task::block_in_place(|| {
        all_at_once(n as usize, |r| -> Result<RankTrace> {
            let mut state = cells[r].lock().unwrap();
            let mut work = vec![1.0f32; 64 << 10];
            let base: Vec<f64> = (0..10).map(|_| secs(synthetic_step(&mut work))).collect();
            let interval = ((2.0 * secs(full_save) / median(&base)).ceil() as usize).clamp(1, 300);
            let mut trace = RankTrace { idle: base, ..RankTrace::default() };
            let mut pending: std::collections::VecDeque<ckpt_client::SaveTicket> = Default::default();
            for c in 0..3u64 {
                // The update before a checkpoint: every chunk changes, so each save is full.
                for x in state.iter_mut().step_by(1 << 20) {
                    *x = x.wrapping_add(1);
                }
                let t = Instant::now();
                while pending.len() >= 2 {
                    if let Some(p) = pending.pop_front() {
                        handle.block_on(p.finish())?;
                    }
                }
                let prev = t.elapsed();
                let st = as_tensors_view(r as u32, n, &state);
                let views: Vec<_> = st.iter().map(|v| v.view()).collect();
                let ticket = handle.block_on(savers[r].save(spec(10 + c, r as u32, n), &views, Wait::Committed))?;
                trace.waits.push(secs(prev) + secs(ticket.waited) + secs(ticket.stall));
                trace.prev_waits.push(secs(prev));
                for _ in 0..interval {
                    let d = secs(synthetic_step(&mut work));
                    if pending.iter().chain(std::iter::once(&ticket)).all(|t| t.is_done()) {
                        trace.idle.push(d);
                    } else {
                        trace.busy.push(d);
                    }
                }
                trace.intervals.push(interval as f64);
                pending.push_back(ticket);
            }
            while let Some(p) = pending.pop_front() {
                handle.block_on(p.finish())?;
            }
            // Steps after the last commit, with nothing in flight.
            trace.idle.extend((0..10).map(|_| secs(synthetic_step(&mut work))));
            Ok(trace)
        })
    })
    .1;
    let mut all = RankTrace::default();
    for r in per_rank {
        let t = r?;
        all.waits.extend(t.waits);
        all.prev_waits.extend(t.prev_waits);
        all.idle.extend(t.idle);
        all.busy.extend(t.busy);
        all.intervals.extend(t.intervals);
    }
    Ok(TrainerSide {
        wait_total: median(&all.waits),
        wait_prev: median(&all.prev_waits),
        interval_steps: median(&all.intervals),
        step_base: median(&all.idle),
        step_busy: if all.busy.is_empty() { median(&all.idle) } else { median(&all.busy) },
    })
}

/// Tensor views over a rank's mutable state (the same layout as `as_tensors`).
struct OwnedView<'a> {
    name: String,
    shape: [u64; 1],
    global: [u64; 1],
    offsets: [u64; 1],
    data: &'a [u8],
}

impl OwnedView<'_> {
    fn view(&self) -> ckpt_client::TensorView<'_> {
        ckpt_client::TensorView {
            name: &self.name,
            dtype: DType::F32,
            shape: &self.shape,
            global_shape: &self.global,
            offsets: &self.offsets,
            data: self.data,
        }
    }
}

fn as_tensors_view(rank: u32, ranks: u32, data: &[u8]) -> Vec<OwnedView<'_>> {
    chunk_ranges(data.len() as u64, TENSOR_BYTES)
        .enumerate()
        .map(|(i, r)| {
            let elems = (r.end - r.start) / 4;
            OwnedView {
                name: format!("layers.{i}.weight"),
                shape: [elems],
                global: [elems * ranks as u64],
                offsets: [elems * rank as u64],
                data: &data[r.start as usize..r.end as usize],
            }
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    Samples(v.to_vec()).median()
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | measured (median, min–max) | limit | ratio (median, min–max) | target | |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let ratio = match (r.ratio, r.ratio_range) {
            (Some(x), Some((lo, hi))) => format!("{x:.2} ({lo:.2}–{hi:.2})"),
            (Some(x), None) => format!("{x:.2}"),
            _ => "-".into(),
        };
        let pass = match r.pass {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        };
        println!("| {} | {} | {} | {} | {} | {} |", r.figure, r.measured, r.limit, ratio, r.target, pass);
    }
}

/// Streams `rss_burst_gib` of distinct chunks from `ranks` concurrent ranks over HTTP without
/// holding them (chunks are generated as they are sent) and returns ckptd's peak RSS in MiB.
async fn rss_burst(opts: &BenchOptions) -> Result<f64> {
    let daemon = start(opts, "rss").await?;
    // HTTP on purpose: that is the path whose bytes ckptd stages in its own memory.
    let client = Client::new(&daemon.url(), ClientOptions { node_local: false, ..ClientOptions::default() })?;
    let (n, chunk) = (opts.ranks, opts.chunk_mib * MIB);
    let per_rank = opts.rss_burst_gib * (1 << 30) / n as u64;
    let chunks_per_rank = per_rank / chunk;
    let t = Instant::now();
    futures::future::try_join_all((0..n).map(|rank| {
        let client = client.clone();
        let seed = opts.seed;
        async move {
            client
                .open_save(&SaveSpec {
                    job: "rss".into(),
                    step: 1,
                    rank,
                    world_size: n,
                    metadata: serde_json::Value::Null,
                    rank_metadata: serde_json::Value::Null,
                    created_unix_ms: None,
                    node_ranks: None,
                })
                .await?;
            let refs = futures::StreamExt::buffered(
                futures::stream::iter((0..chunks_per_rank).map(|i| {
                    let client = client.clone();
                    async move {
                        let data = tokio::task::spawn_blocking(move || {
                            let mut v = vec![0u8; chunk as usize];
                            rand::rngs::StdRng::seed_from_u64(seed ^ ((rank as u64) << 48) ^ i).fill_bytes(&mut v);
                            let h = ckpt_core::ChunkHash::of(&v);
                            (h, Bytes::from(v))
                        })
                        .await
                        .map_err(|e| ckpt_client::ClientError::Internal(e.to_string()))?;
                        client.put_chunk("rss", data.0, data.1).await?;
                        Ok::<_, ckpt_client::ClientError>(ckpt_core::ChunkRef { hash: data.0, len: chunk })
                    }
                })),
                4,
            );
            let chunks: Vec<ckpt_core::ChunkRef> = futures::TryStreamExt::try_collect(refs).await?;
            let elems = chunks_per_rank * chunk;
            let index = ckpt_core::ShardIndex {
                rank,
                tensors: vec![ckpt_core::TensorEntry {
                    name: "state".into(),
                    dtype: DType::U8,
                    shape: vec![elems],
                    global_shape: vec![elems * n as u64],
                    offsets: vec![elems * rank as u64],
                    chunks,
                }],
                metadata: serde_json::Value::Null,
            };
            client.put_shard_index("rss", 1, &index).await
        }
    }))
    .await?;
    client.wait_committed("rss", 1).await?;
    let elapsed = t.elapsed();
    let rss = daemon.pid().and_then(peak_rss_bytes).unwrap_or(0);
    let total = chunks_per_rank * chunk * n as u64;
    if !opts.json {
        println!("rss burst: {} MiB committed in {:.1} s", total / MIB, secs(elapsed));
    }
    Ok(rss as f64 / MIB as f64)
}
