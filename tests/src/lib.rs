//! Shared harness for the workspace-level tests: real ckptd processes on loopback, seeded
//! random tensors, and helpers that look at the store directory the way an operator would.

pub mod backend;
pub mod fsync_audit;
pub mod raw_http;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientOptions, DType, SaveSpec, Tensor, Wait};
use ckpt_core::commit::parse_index_object;
use ckpt_core::keys::{parse_key, ParsedKey};
use ckpt_core::{CommitObject, Limits, Manifest};
use rand::{RngCore, SeedableRng};

/// The seed for a test: `CKPT_TEST_SEED` if set, else a fixed default. Printed so a failure
/// can be replayed.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("CKPT_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    eprintln!("test seed: {s} (set CKPT_TEST_SEED to replay)");
    s
}

pub fn ckptd_exe() -> PathBuf {
    find_ckptd().expect("ckptd binary (cargo test --workspace builds it)")
}

/// The `ckpt` CLI binary, next to ckptd.
pub fn ckpt_exe() -> PathBuf {
    let p = ckptd_exe().with_file_name(format!("ckpt{}", std::env::consts::EXE_SUFFIX));
    assert!(p.is_file(), "no ckpt binary at {} (cargo test --workspace builds it)", p.display());
    p
}

/// The trainer's launcher binary, next to ckptd.
pub fn ckpt_train_exe() -> PathBuf {
    let p = ckptd_exe().with_file_name(format!("ckpt-train{}", std::env::consts::EXE_SUFFIX));
    assert!(p.is_file(), "no ckpt-train binary at {} (cargo test --workspace builds it)", p.display());
    p
}

pub async fn start_daemon(dir: &Path) -> LocalDaemon {
    start_daemon_with(DaemonOptions::in_dir(ckptd_exe(), dir)).await
}

pub async fn start_daemon_with(opts: DaemonOptions) -> LocalDaemon {
    let log = opts.log_file.clone();
    match LocalDaemon::start(opts).await {
        Ok(d) => d,
        Err(e) => {
            panic!("starting ckptd: {e}\n--- ckptd log ---\n{}", std::fs::read_to_string(log).unwrap_or_default())
        }
    }
}

/// A client that talks HTTP only, so tests exercise ckptd's staging tier and upload queue.
pub fn client(d: &LocalDaemon) -> Client {
    let opts = ClientOptions { chunk_bytes: 1 << 20, node_local: false, ..ClientOptions::default() };
    Client::new(&d.url(), opts).expect("client")
}

/// A client that uses the node-local path (handoff files, direct verified reads) when it can.
pub fn local_client(d: &LocalDaemon) -> Client {
    let opts = ClientOptions { chunk_bytes: 1 << 20, node_local: true, ..ClientOptions::default() };
    Client::new(&d.url(), opts).expect("client")
}

/// A client that gives up quickly when ckptd is gone or busy (crash and limit tests).
pub fn impatient_client(d: &LocalDaemon) -> Client {
    let opts = ClientOptions {
        chunk_bytes: 1 << 20,
        attempts_max: 2,
        retry_base: Duration::from_millis(10),
        request_timeout: Duration::from_secs(20),
        commit_timeout: Duration::from_secs(20),
        busy_retry_for: Duration::ZERO,
        node_local: false,
        ..ClientOptions::default()
    };
    Client::new(&d.url(), opts).expect("client")
}

/// Seeded random tensors for one rank: a row-slice of two global matrices and a small scalar
/// tensor, `bytes` in all (rounded to whole rows).
pub fn rank_tensors(seed: u64, rank: u32, world: u32, bytes: u64) -> Vec<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((rank as u64) << 32));
    let cols = 256u64;
    let rows = (bytes / 2 / 4 / cols).max(1);
    let mut out = Vec::new();
    for name in ["layers.0.attn.wq", "optim.exp_avg.layers.0.attn.wq"] {
        let mut data = vec![0u8; (rows * cols * 4) as usize];
        rng.fill_bytes(&mut data);
        out.push(Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![rows, cols],
            global_shape: vec![rows * world as u64, cols],
            offsets: vec![rows * rank as u64, 0],
            data: Bytes::from(data),
        });
    }
    out.push(Tensor::whole("step", DType::I64, vec![1], Bytes::copy_from_slice(&7i64.to_le_bytes())));
    out
}

pub fn spec(job: &str, step: u64, rank: u32, world: u32) -> SaveSpec {
    SaveSpec {
        job: job.into(),
        step,
        rank,
        world_size: world,
        metadata: serde_json::json!({ "step": step }),
        rank_metadata: serde_json::json!({ "rank": rank }),
        created_unix_ms: Some(1_700_000_000_000 + step),
        node_ranks: None,
    }
}

/// Saves every rank of a step concurrently and waits for the commit; returns each rank's report.
pub async fn save_step(
    client: &Client,
    job: &str,
    step: u64,
    states: &[Vec<Tensor>],
) -> Result<Vec<ckpt_client::SaveReport>, ckpt_client::ClientError> {
    let world = states.len() as u32;
    let futs = states.iter().enumerate().map(|(r, t)| {
        let s = spec(job, step, r as u32, world);
        async move { client.save(&s, t, Wait::Committed).await }
    });
    futures::future::try_join_all(futs).await
}

/// Every file under `dir`, relative path → blake3 of its content.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().into_owned();
                out.insert(rel, blake3::hash(&bytes).to_hex().to_string());
            }
        }
    }
    out
}

/// The committed checkpoints in a store directory, read the way an operator would: each root
/// (or version-1 manifest) parsed and checked, and every index object it names read from the
/// store and checked against it. Panics, naming the file, on anything missing or damaged.
pub fn stored_manifests(store: &Path) -> Vec<Manifest> {
    let files = snapshot(store);
    manifests_from(files.keys().map(String::as_str), |key| std::fs::read(store.join(key)).ok())
}

/// The committed checkpoints among `keys`, with `read` giving an object's bytes (`None`:
/// missing): the one parser behind [`stored_manifests`] and `backend::TestStore::manifests`.
pub fn manifests_from<'a>(
    keys: impl Iterator<Item = &'a str>,
    read: impl Fn(&str) -> Option<Vec<u8>>,
) -> Vec<Manifest> {
    let mut out = Vec::new();
    for rel in keys {
        if let Some(ParsedKey::Manifest { job, step }) = parse_key(rel) {
            let bytes = read(rel).unwrap_or_else(|| panic!("root {rel} listed but unreadable"));
            let root = match CommitObject::parse(&bytes, &Limits::default()) {
                Ok(CommitObject::Root(root)) => root,
                Ok(CommitObject::V1(m)) => {
                    out.push(m);
                    continue;
                }
                Err(e) => panic!("root {rel}: {e}"),
            };
            let ranks = root
                .ranks
                .iter()
                .enumerate()
                .map(|(rank, r)| {
                    let key = ckpt_core::keys::index_key(&job, &r.hash);
                    let b = read(&key)
                        .unwrap_or_else(|| panic!("{job}@{step}: index object of rank {rank} ({key}) is missing"));
                    parse_index_object(&b, r, rank as u32, root.world_size, &Limits::default())
                        .unwrap_or_else(|e| panic!("{job}@{step}: {e}"))
                })
                .collect();
            out.push(Manifest::assemble(&root, ranks).unwrap_or_else(|e| panic!("{job}@{step}: {e}")));
        }
    }
    out.sort_by_key(|m| (m.job.clone(), m.step));
    out
}

/// Asserts the store-level invariant: every index object and every chunk a root references is
/// in the store.
pub fn assert_manifests_complete(store: &Path) {
    for m in stored_manifests(store) {
        for h in m.chunk_set() {
            let key = ckpt_core::keys::chunk_key(&m.job, &h);
            assert!(store.join(&key).is_file(), "checkpoint {}@{} references missing chunk {h}", m.job, m.step);
        }
    }
}

pub fn chunk_path(store: &Path, job: &str, hash: &ckpt_core::ChunkHash) -> PathBuf {
    store.join(ckpt_core::keys::chunk_key(job, hash))
}

/// Runs a test body under a time limit, so a hung daemon fails the test instead of CI.
pub async fn bounded<F: std::future::Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("test exceeded its {limit:?} bound"))
}

pub fn daemon_log(d: &LocalDaemon) -> String {
    std::fs::read_to_string(&d.options().log_file).unwrap_or_default()
}

/// Arms a store fault in a ckptd started with `--fault-injection` (`service/src/faults.rs`).
pub async fn arm(d: &LocalDaemon, fault: serde_json::Value) {
    let r = reqwest::Client::new().post(format!("{}/v1/faults", d.url())).json(&fault).send().await.unwrap();
    assert_eq!(r.status(), 204, "arming {fault}: {}", r.text().await.unwrap_or_default());
}

/// How often faults of one `kind:op` (e.g. `latency:list`) fired in that ckptd.
pub async fn fired(d: &LocalDaemon, key: &str) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("{}/v1/faults", d.url())).await.unwrap().json().await.unwrap();
    v["fired"][key].as_u64().unwrap_or(0)
}

/// ckptd's `/v1/stats`.
pub async fn stats(d: &LocalDaemon) -> serde_json::Value {
    reqwest::get(format!("{}/v1/stats", d.url())).await.expect("stats").json().await.expect("stats json")
}

/// Waits until ckptd has no staged chunk left to upload.
pub async fn wait_uploads_drained(d: &LocalDaemon) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = stats(d).await;
        if s["staging"]["chunks_pending"].as_u64() == Some(0) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "uploads did not drain: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    ckpt_client::daemon::peak_rss_bytes(pid).expect("VmHWM in /proc status")
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus text; 0 when absent.
pub fn prometheus_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
