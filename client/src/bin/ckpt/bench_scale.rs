//! `ckpt bench-scale`: the commit path at the rank and chunk counts of a 405B job, with tiny
//! real chunks so it fits on one machine.
//!
//! For each world size a fresh ckptd (fsync'd local store) receives one save: every rank opens
//! it, its chunks are uploaded and made durable, then every rank's shard index is sent at once
//! (all in flight together, as 16,384 ranks finishing a save would). Each index has the size of
//! a 405B rank's (`tensors` row-sliced tensors × `chunks_per_tensor` chunk references; one chunk
//! distinct to the rank, the rest from a shared pool so the upload stays small). Measured:
//! index-put latency (p50, p99, and the first and last eighth by completion), the time from the
//! last index to the root (ckptd's own clock), ckptd's peak RSS, the root's bytes and the
//! metadata bytes one rank reads to restore (root plus its index object), which the benchmark
//! then reads back and verifies. Then the checkpoint is read across ranks by fresh clients
//! with `index_cache_mib` of index cache: every tensor opened on all its rows (what an export or
//! a reshard does first: every rank's index object fetched and checked), and one rank of a
//! world an eighth the size reading its rows of every tensor (an elastic restart on fewer
//! nodes). Then GC of the job with retention keeping the last step: dry runs against their limit
//! (`bench_gc`), a real run that retires step 1 and condemns its index objects, and the sweep a
//! grace period later. Optionally a save of `distinct_chunks` distinct chunks (1.5 M for a 405B
//! checkpoint in 4 MiB chunks) through the ordinary save path, and GC's dry runs over it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::{ChunkHash, ChunkRef, DType, ShardIndex, TensorEntry};
use futures::{StreamExt, TryStreamExt};

use crate::bench::{peak_rss_bytes, Samples};
use crate::bench_gc::GcRow;
use crate::bench_rebuild::RebuildRow;
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientError, ClientOptions, SaveSpec, Tensor, Wait};

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleOptions {
    /// Directory for the stores (each removed after its run).
    #[arg(long, default_value = "ckpt-bench-scale")]
    pub dir: PathBuf,
    /// World sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    pub worlds: Vec<u32>,
    /// Row-sliced tensors in each rank's index.
    #[arg(long, default_value_t = 3)]
    pub tensors: u32,
    /// Chunk references per tensor (3 x 32 per rank is a 405B rank's ~96 at 16,384 ranks).
    #[arg(long, default_value_t = 32)]
    pub chunks_per_tensor: u32,
    /// Also save this many distinct chunks through the ordinary save path (1500000 for a
    /// 405B checkpoint in 4 MiB chunks; 0 skips it).
    #[arg(long, default_value_t = 0)]
    pub distinct_chunks: u64,
    /// Ranks for the distinct-chunk save.
    #[arg(long, default_value_t = 64)]
    pub distinct_ranks: u32,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Index cache of the clients that read the checkpoint back, MiB.
    #[arg(long, default_value_t = 64)]
    pub index_cache_mib: u64,
    /// Dry GC runs of each save's job, interleaved with their limit, before a real run that
    /// collects the first step (0 skips GC). ckptd is restarted first, and one more dry run,
    /// not timed, measures GC's memory on its fresh heap.
    #[arg(long, default_value_t = 3)]
    pub gc_runs: usize,
    /// Starts of ckptd with its index removed (rebuilt from the store), each interleaved with
    /// a plain restart and the limit, after GC (0 skips them).
    #[arg(long, default_value_t = 3)]
    pub rebuild_runs: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorldRow {
    pub world: u32,
    pub chunk_refs: u64,
    pub put_p50_ms: f64,
    pub put_p99_ms: f64,
    pub put_first_eighth_ms: f64,
    pub put_last_eighth_ms: f64,
    /// The same puts for the next step from `FIXED_CLIENTS` clients at a time: the cost of one
    /// put, without the queueing of thousands in flight.
    pub fixed_clients_p50_ms: f64,
    pub fixed_clients_p99_ms: f64,
    pub fixed_clients_first_eighth_ms: f64,
    pub fixed_clients_last_eighth_ms: f64,
    pub burst_s: f64,
    pub commit_after_last_index_ms: f64,
    pub ckptd_peak_rss_mib: f64,
    pub root_bytes: u64,
    pub restore_metadata_bytes: u64,
    pub journal_syncs: u64,
    /// Every tensor opened on all its rows, as an export or a reshard to another layout opens
    /// them, by a fresh client: seconds, and the index objects it fetched.
    pub sweep_open_s: (f64, f64, f64),
    pub sweep_index_fetches: u64,
    /// The sweep's limit: every rank's index object fetched once and parsed, the plainest way.
    /// Both as (median, min, max) of `SWEEP_RUNS` interleaved runs, seconds.
    pub sweep_limit_s: (f64, f64, f64),
    /// A restart on an eighth of the ranks: one new rank's rows of every tensor (eight old
    /// ranks' slices) opened and read by a fresh client: seconds, index objects fetched.
    pub eighth_rank_s: f64,
    pub eighth_rank_index_fetches: u64,
    /// GC with retention keeping the last step only (step 1's index objects are garbage).
    pub gc: Option<GcRow>,
    pub rebuild: Option<RebuildRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DistinctRow {
    pub ranks: u32,
    pub chunks: u64,
    pub save_s: f64,
    pub committed: bool,
    pub ckptd_peak_rss_mib: f64,
    pub root_bytes: u64,
    pub gc: Option<GcRow>,
    pub rebuild: Option<RebuildRow>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    pub worlds: Vec<WorldRow>,
    pub distinct: Option<DistinctRow>,
}

const CHUNK_BYTES: usize = 16;
/// ckptd's settings for these runs (before its `[retention]` table).
const CONFIG: &str = "chunk_requests_max = 256\nupload_concurrency = 16\n";
/// The shortest grace period ckptd takes, so the sweep runs a second after its list.
const GC_GRACE_S: u64 = 1;
/// Concurrent index puts in the second measurement (the issue measured 16 clients).
pub const FIXED_CLIENTS: usize = 16;
const POOL: usize = 1024;

fn chunk(seed: u64, kind: u8, a: u64, b: u64) -> Bytes {
    let mut v = Vec::with_capacity(CHUNK_BYTES);
    v.push(kind);
    v.extend_from_slice(&(seed as u32).to_le_bytes());
    v.extend_from_slice(&(a as u32).to_le_bytes());
    v.extend_from_slice(&(b as u32).to_le_bytes());
    v.resize(CHUNK_BYTES, 0xa5);
    Bytes::from(v)
}

async fn start(dir: &std::path::Path, toml: &str) -> Result<LocalDaemon, ClientError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| ClientError::Internal(format!("benchmark i/o: {e}")))?;
    let cfg = dir.join("ckptd.toml");
    std::fs::write(&cfg, toml).map_err(|e| ClientError::Internal(format!("benchmark i/o: {e}")))?;
    let mut d = DaemonOptions::in_dir(find_ckptd()?, dir);
    d.extra_args = vec!["--config".into(), cfg.into_os_string()];
    LocalDaemon::start(d).await
}

async fn stats(c: &reqwest::Client, url: &str) -> Result<serde_json::Value, ClientError> {
    let t = |e: reqwest::Error| ClientError::Transport { url: url.into(), source: e };
    c.get(format!("{url}/v1/stats")).send().await.map_err(t)?.json().await.map_err(t)
}

async fn wait_drained(c: &reqwest::Client, url: &str) -> Result<(), ClientError> {
    loop {
        if stats(c, url).await?["staging"]["chunks_pending"].as_u64() == Some(0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// p50, p99, and the mean latency of the first and last eighth of puts to complete, in ms.
fn summarise(mut lat: Vec<(Duration, Duration)>) -> (f64, f64, f64, f64) {
    lat.sort_by_key(|(_, done)| *done);
    let eighth = (lat.len() / 8).max(1);
    let mean = |s: &[(Duration, Duration)]| s.iter().map(|(l, _)| ms(*l)).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&lat[..eighth]), mean(&lat[lat.len() - eighth..]));
    let mut sorted: Vec<Duration> = lat.iter().map(|(l, _)| *l).collect();
    sorted.sort();
    (ms(quantile(&sorted, 0.5)), ms(quantile(&sorted, 0.99)), first, last)
}

/// Lets one process hold a socket per simulated rank.
fn raise_open_files_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass; no other memory is involved.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn open_all(client: &Client, specs: Vec<SaveSpec>) -> Result<(), ClientError> {
    futures::stream::iter(specs.iter().map(|s| client.open_save(s)))
        .buffer_unordered(512)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// The index rebuild's timings (`bench_rebuild.rs`), unless `--rebuild-runs 0`.
async fn rebuild(
    d: &mut LocalDaemon,
    store: &std::path::Path,
    opts: &ScaleOptions,
) -> Result<Option<RebuildRow>, ClientError> {
    if opts.rebuild_runs == 0 {
        return Ok(None);
    }
    Ok(Some(crate::bench_rebuild::measure(d, store, opts.rebuild_runs).await?))
}

async fn one_world(opts: &ScaleOptions, world: u32) -> Result<WorldRow, ClientError> {
    let dir = opts.dir.join(format!("world-{world}"));
    let mut d = start(&dir, &format!("{CONFIG}[retention]\nkeep_last = 1\ngc_grace_s = {GC_GRACE_S}\n")).await?;
    let url = d.url();
    let http = reqwest::Client::new();
    let client = Client::new(&url, ClientOptions { node_local: false, ..ClientOptions::default() })?;
    let job = format!("scale-{world}");
    let (seed, t, c) = (opts.seed, opts.tensors as u64, opts.chunks_per_tensor as u64);
    let spec = |rank: u32, step: u64| SaveSpec {
        job: job.clone(),
        step,
        rank,
        world_size: world,
        metadata: serde_json::json!({ "bench": "scale" }),
        rank_metadata: serde_json::Value::Null,
        created_unix_ms: Some(1_700_000_000_000),
        node_ranks: None,
    };
    open_all(&client, (0..world).map(|r| spec(r, 1)).collect()).await?;
    // The chunks: one distinct to each rank, and a shared pool.
    let pool: Vec<Bytes> = (0..POOL as u64).map(|i| chunk(seed, 1, i, 0)).collect();
    let own: Vec<Bytes> = (0..world as u64).map(|r| chunk(seed, 2, world as u64, r)).collect();
    let uploads: Vec<Bytes> = pool.iter().chain(own.iter()).cloned().collect();
    futures::stream::iter(uploads)
        .map(|b| {
            let (client, job) = (&client, &job);
            async move { client.put_chunk(job, ChunkHash::of(&b), b).await }
        })
        .buffer_unordered(256)
        .try_collect::<Vec<_>>()
        .await?;
    wait_drained(&http, &url).await?;
    let pool_refs: Vec<ChunkRef> =
        pool.iter().map(|b| ChunkRef { hash: ChunkHash::of(b), len: CHUNK_BYTES as u64 }).collect();
    let mut indexes: Vec<ShardIndex> = (0..world)
        .map(|r| {
            let slice = c * CHUNK_BYTES as u64;
            let tensors = (0..t)
                .map(|ti| TensorEntry {
                    name: format!("layers.{ti}.weight"),
                    dtype: DType::U8,
                    shape: vec![slice],
                    global_shape: vec![slice * world as u64],
                    offsets: vec![slice * r as u64],
                    chunks: (0..c)
                        .map(|ci| {
                            if ti == 0 && ci == 0 {
                                ChunkRef { hash: ChunkHash::of(&own[r as usize]), len: CHUNK_BYTES as u64 }
                            } else {
                                pool_refs[((r as u64 * t * c + ti * c + ci) % POOL as u64) as usize].clone()
                            }
                        })
                        .collect(),
                })
                .collect();
            ShardIndex { rank: r, tensors, metadata: serde_json::json!({ "rank": r }) }
        })
        .collect();
    let syncs_before = stats(&http, &url).await?["journal_flushes"].as_u64().unwrap_or(0);
    let started = Instant::now();
    let puts = indexes.iter().map(|index| {
        let (client, job) = (&client, &job);
        async move {
            let t0 = Instant::now();
            client.put_shard_index(job, 1, index).await.map(|_| (t0.elapsed(), started.elapsed()))
        }
    });
    let lat: Vec<(Duration, Duration)> = futures::future::try_join_all(puts).await?;
    let burst_s = started.elapsed().as_secs_f64();
    let status = client.wait_committed(&job, 1).await?;
    let st = stats(&http, &url).await?;
    let (p50, p99, first, last) = summarise(lat);
    // The next step's puts from a fixed number of clients; its indexes differ from step 1's in
    // their metadata, so that once step 1 is retired its index objects are garbage for GC.
    for i in &mut indexes {
        i.metadata = serde_json::json!({ "rank": i.rank, "step": 2 });
    }
    open_all(&client, (0..world).map(|r| spec(r, 2)).collect()).await?;
    let started = Instant::now();
    let fixed: Vec<(Duration, Duration)> = futures::stream::iter(indexes.iter())
        .map(|index| {
            let (client, job) = (&client, &job);
            async move {
                let t0 = Instant::now();
                client.put_shard_index(job, 2, index).await.map(|_| (t0.elapsed(), started.elapsed()))
            }
        })
        .buffer_unordered(FIXED_CLIENTS)
        .try_collect()
        .await?;
    client.wait_committed(&job, 2).await?;
    let (f50, f99, ffirst, flast) = summarise(fixed);
    // What one rank reads to restore: the root and its own index object, checked and read back.
    let cp = client.checkpoint(&job, 1).await?;
    let root_bytes = cp.root.to_bytes().len() as u64;
    let probe = world / 2;
    let shard = client.shard_index(&cp, probe).await?;
    let restored = client.load_shard(&job, 1, &shard, |_| {}).await?;
    if restored.len() != t as usize {
        return Err(ClientError::Protocol(format!("rank {probe} restored {} tensors", restored.len())));
    }
    let reader = || {
        let index_cache_bytes = opts.index_cache_mib << 20;
        Client::new(&url, ClientOptions { node_local: false, index_cache_bytes, ..ClientOptions::default() })
    };
    let (slice, names) = (c * CHUNK_BYTES as u64, (0..t).map(|ti| format!("layers.{ti}.weight")));
    // The sweep, interleaved with its limit: the same index objects fetched and parsed the
    // plainest way (one GET each at the client's concurrency, serde into a `ShardIndex`, no
    // checks, no cache), each by a fresh client.
    let (mut sweeps, mut limits, mut sweep_index_fetches) = (Vec::new(), Vec::new(), 0);
    for run in 0..SWEEP_RUNS {
        // Alternately first, so that neither always runs on what the other left warm.
        if run % 2 == 1 {
            limits.push(plain_index_fetches(&url, &cp).await?);
        }
        let sweep = reader()?;
        let started = Instant::now();
        for name in names.clone() {
            sweep.row_reader(&cp, &name, 0..slice * world as u64).await?;
        }
        sweeps.push(started.elapsed().as_secs_f64());
        sweep_index_fetches = sweep.index_objects_fetched();
        if run % 2 == 0 {
            limits.push(plain_index_fetches(&url, &cp).await?);
        }
    }
    let eighth = reader()?;
    let started = Instant::now();
    let old = probe.min(world.saturating_sub(8)) as u64;
    let rows = old * slice..(old + 8.min(world as u64)) * slice;
    for name in names {
        let r = eighth.row_reader(&cp, &name, rows.clone()).await?;
        let mut buf = vec![0u8; r.bytes_of(rows.end - rows.start)?];
        r.read_rows(rows.start, rows.end - rows.start, &mut buf).await?;
    }
    let eighth_rank_s = started.elapsed().as_secs_f64();
    // Before GC, which restarts ckptd.
    let peak_rss_mib = crate::mib(d.pid().and_then(peak_rss_bytes).unwrap_or(0));
    let gc = if opts.gc_runs > 0 {
        // Step 1's index objects become old enough to be condemned.
        let grace = Duration::from_millis(GC_GRACE_S * 1000 + 100);
        tokio::time::sleep(grace).await;
        let store = dir.join("store");
        Some(crate::bench_gc::measure(&mut d, &store, &job, &[2], opts.gc_runs, Some((1, world as u64, grace))).await?)
    } else {
        None
    };
    let rebuild = rebuild(&mut d, &dir.join("store"), opts).await?;
    let row = WorldRow {
        world,
        chunk_refs: world as u64 * t * c,
        put_p50_ms: p50,
        put_p99_ms: p99,
        put_first_eighth_ms: first,
        put_last_eighth_ms: last,
        fixed_clients_p50_ms: f50,
        fixed_clients_p99_ms: f99,
        fixed_clients_first_eighth_ms: ffirst,
        fixed_clients_last_eighth_ms: flast,
        burst_s,
        commit_after_last_index_ms: st["last_commit_after_last_index_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        ckptd_peak_rss_mib: peak_rss_mib,
        root_bytes,
        restore_metadata_bytes: root_bytes + cp.root.ranks[probe as usize].bytes,
        journal_syncs: st["journal_flushes"].as_u64().unwrap_or(0).saturating_sub(syncs_before),
        sweep_open_s: Samples(sweeps).median_min_max(),
        sweep_index_fetches,
        sweep_limit_s: Samples(limits).median_min_max(),
        eighth_rank_s,
        eighth_rank_index_fetches: eighth.index_objects_fetched(),
        gc,
        rebuild,
    };
    if status.manifest_hash.as_deref() != Some(cp.root.hash.as_str()) {
        return Err(ClientError::Protocol("the committed root is not the one read back".into()));
    }
    drop(d);
    // The store goes; ckptd's log stays, for the commit's own timings.
    let _ = std::fs::rename(dir.join("ckptd.log"), opts.dir.join(format!("ckptd-world-{world}.log")));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

async fn distinct(opts: &ScaleOptions) -> Result<DistinctRow, ClientError> {
    let dir = opts.dir.join("distinct");
    let mut d = start(&dir, &format!("{CONFIG}[retention]\ngc_grace_s = {GC_GRACE_S}\n")).await?;
    let url = d.url();
    let ranks = opts.distinct_ranks.max(1);
    let per_rank = opts.distinct_chunks.div_ceil(ranks as u64);
    let client = Client::new(
        &url,
        ClientOptions {
            chunk_bytes: CHUNK_BYTES as u64,
            node_local: false,
            concurrency: 64,
            ..ClientOptions::default()
        },
    )?;
    let job = "scale-distinct".to_string();
    let started = Instant::now();
    futures::stream::iter(0..ranks)
        .map(|r| {
            let (client, job, seed) = (&client, &job, opts.seed);
            async move {
                let data: Vec<u8> = (0..per_rank).flat_map(|i| chunk(seed, 3, r as u64, i).to_vec()).collect();
                let t = Tensor {
                    name: "w".into(),
                    dtype: DType::U8,
                    shape: vec![data.len() as u64],
                    global_shape: vec![data.len() as u64 * ranks as u64],
                    offsets: vec![data.len() as u64 * r as u64],
                    data: Bytes::from(data),
                };
                let spec = SaveSpec {
                    job: job.clone(),
                    step: 1,
                    rank: r,
                    world_size: ranks,
                    metadata: serde_json::Value::Null,
                    rank_metadata: serde_json::Value::Null,
                    created_unix_ms: Some(1_700_000_000_000),
                    node_ranks: None,
                };
                client.save(&spec, &[t], Wait::Staged).await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?;
    let status = client.wait_committed(&job, 1).await?;
    let save_s = started.elapsed().as_secs_f64();
    let cp = client.checkpoint(&job, 1).await?;
    let peak_rss_mib = crate::mib(d.pid().and_then(peak_rss_bytes).unwrap_or(0));
    let gc = if opts.gc_runs > 0 {
        Some(crate::bench_gc::measure(&mut d, &dir.join("store"), &job, &[1], opts.gc_runs, None).await?)
    } else {
        None
    };
    let rebuild = rebuild(&mut d, &dir.join("store"), opts).await?;
    let row = DistinctRow {
        ranks,
        chunks: cp.root.chunks,
        save_s,
        committed: status.manifest_hash.is_some(),
        ckptd_peak_rss_mib: peak_rss_mib,
        root_bytes: cp.root.to_bytes().len() as u64,
        gc,
        rebuild,
    };
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

/// Interleaved runs of the sweep and of its limit.
const SWEEP_RUNS: usize = 3;

/// Seconds to fetch every rank's index object of `cp` once with plain GETs, at the client's
/// default concurrency, and parse each into a `ShardIndex`.
async fn plain_index_fetches(url: &str, cp: &ckpt_client::Checkpoint) -> Result<f64, ClientError> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let parsed: Vec<ShardIndex> = futures::stream::iter(cp.root.ranks.iter().map(|r| {
        let (http, at) = (&http, format!("{url}/v1/jobs/{}/indexes/{}", cp.job(), r.hash));
        async move {
            let bad = |e: String| ClientError::Protocol(format!("plain index fetch: {e}"));
            let answer =
                http.get(at).send().await.and_then(|a| a.error_for_status()).map_err(|e| bad(e.to_string()))?;
            let bytes = answer.bytes().await.map_err(|e| bad(e.to_string()))?;
            serde_json::from_slice::<ShardIndex>(&bytes).map_err(|e| bad(e.to_string()))
        }
    }))
    .buffer_unordered(ClientOptions::default().concurrency.max(1))
    .try_collect()
    .await?;
    if parsed.len() != cp.root.ranks.len() {
        return Err(ClientError::Protocol(format!("{} of {} index objects parsed", parsed.len(), cp.root.ranks.len())));
    }
    Ok(started.elapsed().as_secs_f64())
}

pub async fn run(opts: ScaleOptions) -> Result<ScaleReport, ClientError> {
    raise_open_files_limit();
    let mut worlds = Vec::new();
    for &w in &opts.worlds {
        worlds.push(one_world(&opts, w).await?);
    }
    let distinct = if opts.distinct_chunks > 0 { Some(distinct(&opts).await?) } else { None };
    Ok(ScaleReport { worlds, distinct })
}

/// The table `ckpt bench-scale` prints, with the targets checked against the smallest
/// world size measured.
pub fn print(r: &ScaleReport) {
    println!("index puts, every rank's in flight at once (a burst) and {FIXED_CLIENTS} at a time (one put's cost):");
    println!(
        "{:>6} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>10} {:>7} {:>9} {:>10} {:>6}",
        "ranks",
        "chunk refs",
        "burst s",
        "p50",
        "p99",
        "1st 1/8",
        "last 1/8",
        "p50",
        "p99",
        "1st 1/8",
        "last 1/8",
        "commit",
        "RSS MiB",
        "root B",
        "restore B",
        "syncs"
    );
    for w in &r.worlds {
        println!(
            "{:>6} {:>10} {:>8.2} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms | {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms | {:>8.1}ms {:>7.0} {:>9} {:>10} {:>6}",
            w.world,
            w.chunk_refs,
            w.burst_s,
            w.put_p50_ms,
            w.put_p99_ms,
            w.put_first_eighth_ms,
            w.put_last_eighth_ms,
            w.fixed_clients_p50_ms,
            w.fixed_clients_p99_ms,
            w.fixed_clients_first_eighth_ms,
            w.fixed_clients_last_eighth_ms,
            w.commit_after_last_index_ms,
            w.ckptd_peak_rss_mib,
            w.root_bytes,
            w.restore_metadata_bytes,
            w.journal_syncs
        );
    }
    println!("reading across ranks, each by a fresh client (all tensors opened and its limit: median [min-max] of {SWEEP_RUNS}):");
    println!(
        "{:>6} {:>24} {:>14} {:>24} {:>6} | {:>22} {:>14}",
        "ranks",
        "all tensors opened",
        "index fetches",
        "limit: plain fetch+parse",
        "ratio",
        "one rank of W/8 reads",
        "index fetches"
    );
    let span = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} s [{lo:.2}-{hi:.2}]");
    for w in &r.worlds {
        println!(
            "{:>6} {:>24} {:>14} {:>24} {:>6} | {:>20.3} s {:>14}",
            w.world,
            span(w.sweep_open_s),
            w.sweep_index_fetches,
            span(w.sweep_limit_s),
            // The limit fetches each index once: a sweep whose cache made it fetch some
            // again does other work, and gets no ratio.
            if w.sweep_index_fetches == w.world as u64 {
                format!("{:.2}", w.sweep_open_s.0 / w.sweep_limit_s.0.max(1e-9))
            } else {
                "-".to_string()
            },
            w.eighth_rank_s,
            w.eighth_rank_index_fetches
        );
    }
    if let (Some(small), Some(big)) = (r.worlds.first(), r.worlds.last()) {
        let ratio = big.fixed_clients_p99_ms / small.fixed_clients_p99_ms.max(1e-6);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "targets at {} ranks: p99 of one index put ({FIXED_CLIENTS} clients) {:.2}x its value at {} ranks (<= 2x: {}); \
             commit {:.0} ms after the last index (<= 1000 ms: {}); restore metadata {:.2} MiB (<= 2 MiB: {})",
            big.world,
            ratio,
            small.world,
            verdict(ratio <= 2.0),
            big.commit_after_last_index_ms,
            verdict(big.commit_after_last_index_ms <= 1000.0),
            big.restore_metadata_bytes as f64 / (1 << 20) as f64,
            verdict(big.restore_metadata_bytes <= 2 << 20)
        );
        println!(
            "(a burst's latency is queueing: with every rank's put in flight at once, p99 is the time to serve \
             them all, {:.1}x from {} to {} ranks for {:.1}x the ranks)",
            big.put_p99_ms / small.put_p99_ms.max(1e-6),
            small.world,
            big.world,
            big.world as f64 / small.world as f64
        );
    }
    let mut gc: Vec<(String, &GcRow)> =
        r.worlds.iter().filter_map(|w| Some((format!("{} ranks", w.world), w.gc.as_ref()?))).collect();
    gc.extend(r.distinct.iter().filter_map(|d| Some((format!("{} chunks", d.chunks), d.gc.as_ref()?))));
    if !gc.is_empty() {
        crate::bench_gc::print(&gc);
    }
    let mut rebuilds: Vec<(String, &RebuildRow)> =
        r.worlds.iter().filter_map(|w| Some((format!("{} ranks", w.world), w.rebuild.as_ref()?))).collect();
    rebuilds.extend(r.distinct.iter().filter_map(|d| Some((format!("{} chunks", d.chunks), d.rebuild.as_ref()?))));
    if !rebuilds.is_empty() {
        println!();
        println!(
            "{:<18} {:>12} {:>24} {:>24} {:>24} {:>14}",
            "index rebuilt",
            "chunks",
            "start, index removed",
            "start, index kept",
            "limit (plain listing)",
            "rebuild/limit"
        );
        let span = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} s [{lo:.2}-{hi:.2}]");
        for (what, b) in rebuilds {
            println!(
                "{:<18} {:>12} {:>24} {:>24} {:>24} {:>14.2}",
                what,
                b.chunks,
                span(b.rebuild_s),
                span(b.restart_s),
                span(b.limit_s),
                (b.rebuild_s.0 - b.restart_s.0) / b.limit_s.0.max(1e-9)
            );
        }
        println!("(rebuild/limit: what the removed index adds to a start, over the plain listing of the same files)");
    }
    if let Some(dr) = &r.distinct {
        println!(
            "distinct-chunk save: {} ranks, {} distinct chunks, committed {} in {:.1} s, ckptd peak RSS {:.0} MiB, root {} bytes",
            dr.ranks, dr.chunks, dr.committed, dr.save_s, dr.ckptd_peak_rss_mib, dr.root_bytes
        );
    }
}
