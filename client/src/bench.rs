//! `ckpt bench`: the burst benchmark. Measures the machine's limits and ckpt against them in
//! one run, and prints one table of figures, limits and ratios.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::chunk::chunk_ranges;
use ckpt_core::{ChunkHash, ChunkRef, DType, ShardIndex, TensorEntry};
use rand::{RngCore, SeedableRng};

use crate::async_save::AsyncSaver;
use crate::client::{Client, ClientOptions, SaveSpec, Wait};
use crate::error::ClientError;
use crate::local::{find_ckptd, DaemonOptions, LocalDaemon};
use crate::tensor::Tensor;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub dir: PathBuf,
    pub ranks: u32,
    pub mib_per_rank: u64,
    pub staging_mib: u64,
    pub chunk_mib: u64,
    /// Also push a burst of this many GiB (streamed, not held by the benchmark) and report
    /// ckptd's peak RSS for it; 0 skips it.
    pub rss_burst_gib: u64,
    pub seed: u64,
    /// Use the node-local path (handoff files, direct reads) instead of HTTP for chunk bytes.
    pub node_local: bool,
    /// Nice value for checkpoint background work: ckptd and the savers' background threads.
    pub background_nice: i32,
}

const MIB: u64 = 1 << 20;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / secs(d)
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

struct Row {
    figure: String,
    value: String,
    limit: String,
    ratio: Option<f64>,
    target: String,
    pass: Option<bool>,
}

enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Row {
    /// A figure with a target: the verdict is derived from the ratio, so the two cannot disagree.
    fn checked(figure: impl Into<String>, value: String, limit: String, ratio: f64, target: Target) -> Row {
        let (target, pass) = match target {
            Target::AtMost(t) => (format!("<= {t}"), ratio <= t),
            Target::AtLeast(t) => (format!(">= {t}"), ratio >= t),
        };
        Row { figure: figure.into(), value, limit, ratio: Some(ratio), target, pass: Some(pass) }
    }

    /// A figure shown for information, without a verdict.
    fn info(figure: impl Into<String>, value: String, limit: String, ratio: Option<f64>, note: &str) -> Row {
        Row { figure: figure.into(), value, limit, ratio, target: note.into(), pass: None }
    }

    /// ckptd's peak RSS against its staging budget plus the documented 128 MiB allowance.
    fn rss(figure: String, rss: u64, budget: u64) -> Row {
        let bound = budget + 128 * MIB;
        Row::checked(
            figure,
            format!("{} MiB", rss / MIB),
            format!("budget {} MiB + 128", budget / MIB),
            rss as f64 / bound as f64,
            Target::AtMost(1.0),
        )
    }
}

fn random_rank(seed: u64, rank: u32, bytes: u64) -> Vec<u8> {
    let mut v = vec![0u8; bytes as usize];
    rand::rngs::StdRng::seed_from_u64(seed ^ ((rank as u64 + 1) << 40)).fill_bytes(&mut v);
    v
}

/// Size of the benchmark's tensors.
const TENSOR_BYTES: u64 = 64 * MIB;

/// The rank's state as fp32 tensors of 64 MiB (the last may be shorter).
fn as_tensors(rank: u32, ranks: u32, data: &Bytes) -> Vec<Tensor> {
    let piece = TENSOR_BYTES;
    chunk_ranges(data.len() as u64, piece)
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

/// Wall time from a common start until every rank's copy is done, the way the save's stall is
/// measured: with more ranks than cores, the slowest single thread depends on how the scheduler
/// interleaves them (the same copy measured 0.057 to 0.095 s here), so the median of three runs.
///
/// `piece` is the size of each memcpy call: the tensor size for "the same tensors", or the whole
/// rank for one contiguous copy (glibc switches to a faster path for very large copies, which no
/// trainer holding separate tensors can use).
fn limit_memcpy(sources: &[Bytes], piece: usize) -> Duration {
    let mut dsts: Vec<Vec<u8>> = sources.iter().map(|s| vec![1u8; s.len()]).collect();
    let mut runs: Vec<Duration> = (0..3)
        .map(|_| {
            let barrier = std::sync::Barrier::new(sources.len() + 1);
            std::thread::scope(|sc| {
                for (s, d) in sources.iter().zip(dsts.iter_mut()) {
                    let barrier = &barrier;
                    sc.spawn(move || {
                        barrier.wait();
                        for (dp, sp) in d.chunks_mut(piece).zip(s.chunks(piece)) {
                            dp.copy_from_slice(sp);
                        }
                    });
                }
                barrier.wait();
                Instant::now()
            })
            .elapsed()
        })
        .collect();
    runs.sort();
    runs[1]
}

fn limit_write_read(dir: &Path, sources: &[Bytes]) -> std::io::Result<(Duration, Duration, u64)> {
    let path = dir.join("raw-limit.bin");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut total = 0u64;
    for s in sources {
        for piece in s.chunks(4 * MIB as usize) {
            f.write_all(piece)?;
            total += piece.len() as u64;
        }
    }
    f.sync_data()?;
    drop(f);
    let write = t.elapsed();
    let t = Instant::now();
    let mut f = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    while f.read(&mut buf)? > 0 {}
    let read = t.elapsed();
    std::fs::remove_file(&path)?;
    Ok((write, read, total))
}

fn limit_blake3(sources: &[Bytes], chunk: u64) -> Duration {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let pieces: Vec<&[u8]> = sources.iter().flat_map(|s| s.chunks(chunk as usize)).collect();
    let t = Instant::now();
    std::thread::scope(|sc| {
        for part in pieces.chunks(pieces.len().div_ceil(threads).max(1)) {
            sc.spawn(move || {
                for p in part {
                    std::hint::black_box(blake3::hash(p));
                }
            });
        }
    });
    t.elapsed()
}

async fn start(opts: &BenchOptions, sub: &str) -> Result<LocalDaemon, ClientError> {
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
    LocalDaemon::start(d).await
}

/// Bytes of all files under `dir`: what the store holds, whichever path wrote it.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

pub async fn run(opts: BenchOptions) -> Result<(), ClientError> {
    let io = |e: std::io::Error| ClientError::Internal(format!("benchmark i/o: {e}"));
    std::fs::create_dir_all(&opts.dir).map_err(io)?;
    let (n, per_rank) = (opts.ranks, opts.mib_per_rank * MIB);
    let total = n as u64 * per_rank;
    println!(
        "ckpt bench: {n} ranks x {} MiB = {} MiB, staging {} MiB, chunks {} MiB, transport {}, background nice {}, in {}",
        opts.mib_per_rank,
        total / MIB,
        opts.staging_mib,
        opts.chunk_mib,
        if opts.node_local { "node-local" } else { "http" },
        opts.background_nice,
        opts.dir.display()
    );
    let sources: Vec<Bytes> = (0..n).map(|r| Bytes::from(random_rank(opts.seed, r, per_rank))).collect();

    // 1. The machine's limits, on the same bytes and the same disk.
    let memcpy = limit_memcpy(&sources, TENSOR_BYTES as usize);
    let memcpy_contiguous = limit_memcpy(&sources, per_rank as usize);
    let (write, read, raw_bytes) = limit_write_read(&opts.dir, &sources).map_err(io)?;
    let hash = limit_blake3(&sources, opts.chunk_mib * MIB);
    let (write_bw, read_bw, hash_bw) = (mibps(raw_bytes, write), mibps(raw_bytes, read), mibps(total, hash));
    println!("limits: memcpy of the tensors {:.3}s (one contiguous copy per rank {:.3}s), fsync'd write {write_bw:.0} MiB/s, read {read_bw:.0} MiB/s, blake3 {hash_bw:.0} MiB/s", secs(memcpy), secs(memcpy_contiguous));

    // 2. The burst through ckptd.
    let daemon = start(&opts, "run").await?;
    let url = daemon.url();
    let copts =
        ClientOptions { chunk_bytes: opts.chunk_mib * MIB, node_local: opts.node_local, ..ClientOptions::default() };
    let client = Client::new(&url, copts)?;
    let savers: Vec<AsyncSaver> = (0..n)
        .map(|_| AsyncSaver::with_background_nice(client.clone(), per_rank as usize, opts.background_nice))
        .collect();
    let states: Vec<Vec<Tensor>> = (0..n).map(|r| as_tensors(r, n, &sources[r as usize])).collect();
    let spec = |step: u64, rank: u32| SaveSpec {
        job: "bench".into(),
        step,
        rank,
        world_size: n,
        metadata: serde_json::json!({ "bench": true }),
        rank_metadata: serde_json::Value::Null,
        created_unix_ms: None,
    };
    // Every rank calls save at the same instant on its own thread, as the memcpy reference's
    // threads copy at once; the stall is the time until the last rank can resume.
    let burst_start = Instant::now();
    let (stall_first, tickets) = timed_saves(&savers, &states, |r| spec(1, r), Wait::Staged)?;
    let copy_only = tickets.iter().map(|t| t.stall).max().unwrap_or_default();
    println!(
        "first save: {:.3} s until every rank resumed; longest copy inside a save {:.3} s",
        secs(stall_first),
        secs(copy_only)
    );
    let mut sent_full = 0;
    for t in tickets {
        sent_full += t.finish().await?.bytes_sent;
    }
    let staged = burst_start.elapsed();
    client.wait_committed("bench", 1).await?;
    let committed = burst_start.elapsed();
    let chunks_dir = opts.dir.join("run").join("store").join(ckpt_core::keys::chunks_prefix("bench"));
    let stored_full = dir_bytes(&chunks_dir);

    let t = Instant::now();
    let restored = futures::future::try_join_all((0..n).map(|r| client.load_rank("bench", 1, r))).await?;
    let restore = t.elapsed();
    for (r, back) in restored.iter().enumerate() {
        if *back != states[r] {
            return Err(ClientError::Internal(format!("rank {r} restored different bytes")));
        }
    }
    drop(restored);

    // Two more saves of the unchanged state (cheap: dedup sends nothing) give the stall three
    // samples, like the memcpy reference; the median is reported.
    let mut stalls = vec![stall_first];
    for step in [10u64, 11] {
        let (d, tickets) = timed_saves(&savers, &states, |r| spec(step, r), Wait::Committed)?;
        for t in tickets {
            t.finish().await?;
        }
        stalls.push(d);
    }
    stalls.sort();
    let stall = stalls[1];
    println!("stall samples: {:?}", stalls.iter().map(|d| format!("{:.3}s", secs(*d))).collect::<Vec<_>>());

    // 3. Incremental: 10% of each rank's chunks (rounded, evenly spaced) change.
    let chunk = (opts.chunk_mib * MIB) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed + 1);
    let mut chunks_changed = 0usize;
    let mut chunks_all = 0usize;
    let changed: Vec<Bytes> = sources
        .iter()
        .map(|s| {
            let mut v = s.to_vec();
            let count = v.len().div_ceil(chunk);
            let picks = ((count as f64 * 0.1).round() as usize).max(1);
            let chosen: std::collections::BTreeSet<usize> = (0..picks).map(|k| k * count / picks).collect();
            chunks_changed += chosen.len();
            chunks_all += count;
            for (i, c) in v.chunks_mut(chunk).enumerate() {
                if chosen.contains(&i) {
                    rng.fill_bytes(c);
                }
            }
            Bytes::from(v)
        })
        .collect();
    println!(
        "incremental: {chunks_changed} of {chunks_all} chunks changed ({:.1}%)",
        100.0 * chunks_changed as f64 / chunks_all as f64
    );
    let states2: Vec<Vec<Tensor>> = (0..n).map(|r| as_tensors(r, n, &changed[r as usize])).collect();
    let mut sent_incr = 0;
    let tickets =
        futures::future::try_join_all(savers.iter().zip(states2.iter()).enumerate().map(|(r, (saver, st))| {
            let views: Vec<_> = st.iter().map(Tensor::view).collect();
            let sp = spec(2, r as u32);
            async move { saver.save(sp, &views, Wait::Committed).await }
        }))
        .await?;
    for t in tickets {
        sent_incr += t.finish().await?.bytes_sent;
    }
    let stored_incr = dir_bytes(&chunks_dir) - stored_full;
    let rss = daemon.pid().and_then(peak_rss_bytes).unwrap_or(0);
    drop(daemon);
    drop(savers);

    let budget = opts.staging_mib * MIB;
    let lim = read_bw.min(hash_bw);
    let mut rows = vec![
        Row::checked(
            "trainer stall (all ranks saving at once)",
            format!("{:.3} s", secs(stall)),
            format!("memcpy of the same tensors, all ranks at once {:.3} s", secs(memcpy)),
            secs(stall) / secs(memcpy),
            Target::AtMost(1.2),
        ),
        Row::info(
            "trainer stall vs one contiguous memcpy per rank",
            format!("{:.3} s", secs(stall)),
            format!("contiguous memcpy {:.3} s", secs(memcpy_contiguous)),
            Some(secs(stall) / secs(memcpy_contiguous)),
            "(lower bound, for reference)",
        ),
        Row::info(
            "all staged (acked)",
            format!("{:.2} s, {:.0} MiB/s", secs(staged), mibps(total, staged)),
            "-".into(),
            None,
            "-",
        ),
        Row::checked(
            "committed (durable) throughput",
            format!("{:.0} MiB/s ({:.2} s)", mibps(total, committed), secs(committed)),
            format!("fsync'd write {write_bw:.0} MiB/s"),
            mibps(total, committed) / write_bw,
            Target::AtLeast(0.8),
        ),
        Row::checked(
            "restore + verify throughput",
            format!("{:.0} MiB/s ({:.2} s)", mibps(total, restore), secs(restore)),
            format!("min(read {read_bw:.0}, blake3 {hash_bw:.0}) MiB/s"),
            mibps(total, restore) / lim,
            Target::AtLeast(0.8),
        ),
        Row::rss(format!("ckptd peak RSS, {} MiB burst", total / MIB), rss, budget),
        Row::checked(
            "incremental (10% changed): bytes sent",
            format!("{} MiB", sent_incr / MIB),
            format!("full save {} MiB", sent_full / MIB),
            sent_incr as f64 / sent_full.max(1) as f64,
            Target::AtMost(0.11),
        ),
        Row::checked(
            "incremental (10% changed): bytes stored",
            format!("{} MiB", stored_incr / MIB),
            format!("full save {} MiB", stored_full / MIB),
            stored_incr as f64 / stored_full.max(1) as f64,
            Target::AtMost(0.11),
        ),
    ];

    if opts.rss_burst_gib > 0 {
        rows.push(rss_burst(&opts).await?);
    }
    print_table(&rows);
    Ok(())
}

/// Streams `rss_burst_gib` of distinct chunks from `ranks` concurrent ranks without holding
/// them (chunks are generated as they are sent) and reports ckptd's peak RSS.
async fn rss_burst(opts: &BenchOptions) -> Result<Row, ClientError> {
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
                })
                .await?;
            let refs = futures::StreamExt::buffered(
                futures::stream::iter((0..chunks_per_rank).map(|i| {
                    let client = client.clone();
                    async move {
                        let data = tokio::task::spawn_blocking(move || {
                            let mut v = vec![0u8; chunk as usize];
                            rand::rngs::StdRng::seed_from_u64(seed ^ ((rank as u64) << 48) ^ i).fill_bytes(&mut v);
                            let h = ChunkHash::of(&v);
                            (h, Bytes::from(v))
                        })
                        .await
                        .map_err(|e| ClientError::Internal(e.to_string()))?;
                        client.put_chunk("rss", data.0, data.1).await?;
                        Ok::<_, ClientError>(ChunkRef { hash: data.0, len: chunk })
                    }
                })),
                4,
            );
            let chunks: Vec<ChunkRef> = futures::TryStreamExt::try_collect(refs).await?;
            let elems = chunks_per_rank * chunk;
            let index = ShardIndex {
                rank,
                tensors: vec![TensorEntry {
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
    let budget = opts.staging_mib * MIB;
    let total = chunks_per_rank * chunk * n as u64;
    println!("rss burst: {} MiB committed in {:.1} s", total / MIB, secs(elapsed));
    Ok(Row::rss(format!("ckptd peak RSS, {} MiB streamed burst", total / MIB), rss, budget))
}

/// Starts every rank's save at the same instant, each on its own thread, and returns the time
/// until the last save call returned, with the tickets.
fn timed_saves(
    savers: &[AsyncSaver],
    states: &[Vec<Tensor>],
    spec: impl Fn(u32) -> SaveSpec + Sync,
    wait: Wait,
) -> Result<(Duration, Vec<crate::async_save::SaveTicket>), ClientError> {
    let handle = tokio::runtime::Handle::current();
    let barrier = std::sync::Barrier::new(savers.len() + 1);
    tokio::task::block_in_place(|| {
        std::thread::scope(|sc| {
            let threads: Vec<_> = savers
                .iter()
                .zip(states.iter())
                .enumerate()
                .map(|(r, (saver, st))| {
                    let (handle, barrier, sp) = (handle.clone(), &barrier, spec(r as u32));
                    sc.spawn(move || {
                        let views: Vec<_> = st.iter().map(Tensor::view).collect();
                        barrier.wait();
                        let ticket = handle.block_on(saver.save(sp, &views, wait))?;
                        Ok::<_, ClientError>((Instant::now(), ticket))
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            let done = threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err(ClientError::Internal("rank thread panicked".into()))))
                .collect::<Result<Vec<_>, _>>()?;
            let last = done.iter().map(|(t, _)| *t).max().unwrap_or(start);
            Ok((last.duration_since(start), done.into_iter().map(|(_, t)| t).collect()))
        })
    })
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | measured | limit | ratio | target | |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let ratio = r.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let pass = match r.pass {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        };
        println!("| {} | {} | {} | {} | {} | {} |", r.figure, r.value, r.limit, ratio, r.target, pass);
    }
}
