//! `ckpt bench-split`: the commit of a save split over ckptd nodes at a cluster's node count,
//! with tiny real chunks.
//!
//! One real ckptd is the leader (ranks 0..ranks_per_node, fault injection on so its LIST calls
//! are counted). The benchmark plays the other nodes: for each it writes into the local store
//! what that node's ckptd would (its ranks' index objects, then its part, built by ckpt-core as
//! ckptd builds it), the parts spread evenly over `spread_s` after the leader's part. Measured:
//! the time from the last part to the commit (the leader's poll gap plus reading the parts and
//! building the root), the leader's LIST calls and root calls (reads, and its create), its peak RSS, the root's bytes,
//! and one rank of the last node restored and verified through the leader.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::commit::index_object;
use ckpt_core::{keys, ChunkHash, ChunkRef, DType, Limits, PartOf, SaveState, ShardIndex, TensorEntry};
use futures::{StreamExt, TryStreamExt};

use crate::bench::peak_rss_bytes;
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientError, ClientOptions, SaveSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct SplitOptions {
    /// Directory for the stores (each removed after its run).
    #[arg(long, default_value = "ckpt-bench-split")]
    pub dir: PathBuf,
    /// Node counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,2048")]
    pub nodes: Vec<u32>,
    /// Ranks each node serves (a host's GPUs).
    #[arg(long, default_value_t = 8)]
    pub ranks_per_node: u32,
    /// Seconds over which the other nodes' parts arrive after the leader's.
    #[arg(long, default_value_t = 10.0)]
    pub spread_s: f64,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitRow {
    pub nodes: u32,
    pub ranks: u32,
    pub spread_s: f64,
    pub commit_after_last_part_ms: f64,
    pub list_calls: u64,
    /// Root reads and the root's create.
    pub root_calls: u64,
    pub leader_peak_rss_mib: f64,
    pub root_bytes: u64,
}

const CHUNK_BYTES: usize = 16;
const POOL: u64 = 256;
const TENSORS: u64 = 3;
const CHUNKS_PER_TENSOR: u64 = 32;
const JOB: &str = "split-bench";
const EPOCH: u64 = 1;

fn io(e: std::io::Error) -> ClientError {
    ClientError::Internal(format!("benchmark i/o: {e}"))
}

/// Writes `bytes` at `key` in a local store as ckptd would see it appear: whole, by rename.
fn put_local(store: &Path, key: &str, bytes: &[u8]) -> Result<(), ClientError> {
    let path = store.join(key);
    std::fs::create_dir_all(path.parent().unwrap_or(store)).map_err(io)?;
    let tmp = path.with_extension("tmp-bench");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

fn index_of(rank: u32, world: u32, pool: &[ChunkRef]) -> ShardIndex {
    let slice = CHUNKS_PER_TENSOR * CHUNK_BYTES as u64;
    let tensors = (0..TENSORS)
        .map(|t| TensorEntry {
            name: format!("layers.{t}.weight"),
            dtype: DType::U8,
            shape: vec![slice],
            global_shape: vec![slice * world as u64],
            offsets: vec![slice * rank as u64],
            chunks: (0..CHUNKS_PER_TENSOR)
                .map(|c| {
                    pool[((rank as u64 * TENSORS * CHUNKS_PER_TENSOR + t * CHUNKS_PER_TENSOR + c) % POOL) as usize]
                        .clone()
                })
                .collect(),
        })
        .collect();
    ShardIndex { rank, tensors, metadata: serde_json::json!({ "rank": rank }) }
}

async fn one(opts: &SplitOptions, nodes: u32) -> Result<SplitRow, ClientError> {
    let rpn = opts.ranks_per_node;
    let world = nodes * rpn;
    let dir = opts.dir.join(format!("nodes-{nodes}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let cfg = dir.join("ckptd.toml");
    std::fs::write(&cfg, "fault_injection = true\n").map_err(io)?;
    let mut o = DaemonOptions::in_dir(find_ckptd()?, &dir);
    o.extra_args = vec!["--config".into(), cfg.into_os_string()];
    let store = PathBuf::from(&o.store);
    let d = LocalDaemon::start(o).await?;
    let url = d.url();
    let http = reqwest::Client::new();
    let t = |e: reqwest::Error| ClientError::Transport { url: url.clone(), source: e };
    let client = Client::new(&url, ClientOptions { node_local: false, epoch: Some(EPOCH), ..Default::default() })?;

    // The chunks every rank refers to, durable through the leader.
    let chunks: Vec<Bytes> = (0..POOL)
        .map(|i| {
            let mut v = (opts.seed as u32 ^ i as u32).to_le_bytes().to_vec();
            v.resize(CHUNK_BYTES, 0x5a);
            Bytes::from(v)
        })
        .collect();
    futures::stream::iter(chunks.iter().cloned())
        .map(|b| {
            let client = &client;
            async move { client.put_chunk(JOB, ChunkHash::of(&b), b).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let pool: Vec<ChunkRef> =
        chunks.iter().map(|b| ChunkRef { hash: ChunkHash::of(b), len: CHUNK_BYTES as u64 }).collect();
    // Wait until they are durable: an index put over staged chunks is fine, but the leader's
    // part is written only once they land.
    loop {
        let s: serde_json::Value =
            http.get(format!("{url}/v1/stats")).send().await.map_err(t)?.json().await.map_err(t)?;
        if s["staging"]["chunks_pending"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The other nodes' parts, built before the clock starts (ckpt-core builds them as ckptd
    // does); their index objects go into the store now, each part later.
    let limits = Limits { world_size_max: world.max(1), ..Limits::default() };
    let meta = serde_json::json!({ "bench": "split" });
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 1..nodes {
        let of = PartOf { first: n * rpn, end: (n + 1) * rpn, epoch: EPOCH };
        let mut s = SaveState::open(JOB, 1, world, 1_700_000_000_000 + n as u64, None, meta.clone(), &limits)
            .and_then(|s| s.split(of))
            .map_err(ClientError::Core)?;
        for r in of.first..of.end {
            let index = index_of(r, world, &pool);
            let (bytes, object) = index_object(&index);
            put_local(&store, &keys::index_key(JOB, &object.hash), &bytes)?;
            s.accept_index(index, &limits).map_err(ClientError::Core)?;
        }
        s.mark_durable().map_err(ClientError::Core)?;
        let part = s.part().map_err(ClientError::Core)?;
        parts.push((keys::part_key(JOB, 1, &of), part.to_bytes()));
    }

    // Count the leader's LIST calls and root reads from here on (a zero-delay fault is a counter).
    for op in ["list", "manifest"] {
        let arm = serde_json::json!({ "kind": "latency", "op": op, "count": 10_000, "delay_ms": 0 });
        http.post(format!("{url}/v1/faults")).json(&arm).send().await.map_err(t)?.error_for_status().map_err(t)?;
    }
    let spec = SaveSpec {
        job: JOB.into(),
        step: 1,
        rank: 0,
        world_size: world,
        metadata: meta.clone(),
        rank_metadata: serde_json::Value::Null,
        created_unix_ms: Some(1_700_000_000_000),
        node_ranks: Some((0, rpn)),
    };
    client.open_save(&spec).await?;
    for r in 0..rpn {
        client.put_shard_index(JOB, 1, &index_of(r, world, &pool)).await?;
    }
    // The leader's part is written once its ranks are in; the others follow over the spread.
    let started = Instant::now();
    let gap = Duration::from_secs_f64(opts.spread_s / parts.len().max(1) as f64);
    for (i, (key, bytes)) in parts.iter().enumerate() {
        let due = started + gap * (i as u32 + 1);
        tokio::time::sleep_until(due.into()).await;
        put_local(&store, key, bytes)?;
    }
    let last_part = Instant::now();
    let status = client.wait_committed(JOB, 1).await?;
    let commit_after_last_part_ms = last_part.elapsed().as_secs_f64() * 1e3;
    let fired: serde_json::Value =
        http.get(format!("{url}/v1/faults")).send().await.map_err(t)?.json().await.map_err(t)?;
    let count = |op: &str| {
        fired["fired"]
            .as_object()
            .map_or(0, |m| m.iter().filter(|(k, _)| k.contains(op)).filter_map(|(_, v)| v.as_u64()).sum())
    };
    let cp = client.checkpoint(JOB, 1).await?;
    if status.manifest_hash.as_deref() != Some(cp.root.hash.as_str()) || cp.root.world_size != world {
        return Err(ClientError::Protocol("the committed root is not the one read back".into()));
    }
    // A rank of the last node, restored through the leader: its index object and chunks verify.
    let shard = client.shard_index(&cp, world - 1).await?;
    client.load_shard(JOB, 1, &shard, |_| {}).await?;
    let row = SplitRow {
        nodes,
        ranks: world,
        spread_s: opts.spread_s,
        commit_after_last_part_ms,
        list_calls: count("list"),
        root_calls: count("manifest"),
        leader_peak_rss_mib: crate::mib(d.pid().and_then(peak_rss_bytes).unwrap_or(0)),
        root_bytes: cp.root.to_bytes().len() as u64,
    };
    drop(d);
    let _ = std::fs::rename(dir.join("ckptd.log"), opts.dir.join(format!("ckptd-split-{nodes}.log")));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

pub async fn run(opts: SplitOptions) -> Result<Vec<SplitRow>, ClientError> {
    let mut rows = Vec::new();
    for &n in &opts.nodes {
        rows.push(one(&opts, n).await?);
    }
    Ok(rows)
}

pub fn print(rows: &[SplitRow]) {
    println!("a save split over nodes: the leader ckptd is real, the other nodes' parts arrive over the spread");
    println!(
        "{:>6} {:>6} {:>8} {:>14} {:>11} {:>11} {:>8} {:>9}",
        "nodes", "ranks", "spread s", "commit after", "LIST calls", "root calls", "RSS MiB", "root B"
    );
    for r in rows {
        println!(
            "{:>6} {:>6} {:>8.1} {:>12.0}ms {:>11} {:>11} {:>8.0} {:>9}",
            r.nodes,
            r.ranks,
            r.spread_s,
            r.commit_after_last_part_ms,
            r.list_calls,
            r.root_calls,
            r.leader_peak_rss_mib,
            r.root_bytes
        );
    }
    println!(
        "(\"commit after\": from the last part in the store to the leader's commit, read by the client; \
         on S3 each LIST call is one page per 1,000 parts)"
    );
}
