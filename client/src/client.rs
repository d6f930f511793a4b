//! The HTTP client for ckptd.
//!
//! Design note.
//! * Retries: every request is retried on transient failures (ckptd unreachable, 502/503/504,
//!   which includes ckptd's "busy" answer) with exponential backoff, up to `attempts_max`. Every
//!   request of the protocol is idempotent (chunk puts are content-addressed, opens and shard
//!   indexes are accepted again when identical), so a retry after a lost answer is safe.
//! * Verification: chunks are verified against their address after download, whatever ckptd
//!   checked; manifests are checked against their own hash. No unverified byte is returned.
//! * Bounds: chunk uploads and downloads in flight per call (`concurrency`), hashes per existence
//!   query (`missing_batch_max`), time waited for a commit (`commit_timeout`).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::chunk::chunk_ranges;
use ckpt_core::{validate_job, ChunkHash, ChunkRef, SavePhase, ShardIndex, TensorEntry};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use ckpt_core::save::{CheckpointList, SaveStatus};

use crate::error::ClientError;
use crate::tensor::Tensor;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Size of the chunks tensors are cut into.
    pub chunk_bytes: u64,
    /// Chunk transfers in flight per call.
    pub concurrency: usize,
    /// Attempts per request before a transient error is returned.
    pub attempts_max: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Timeout of a single HTTP request.
    pub request_timeout: Duration,
    /// How long `Wait::Committed` waits for the step to commit.
    pub commit_timeout: Duration,
    pub missing_batch_max: usize,
    /// How long a request keeps retrying while ckptd answers "busy" (staging full): a burst
    /// waits for the store to drain rather than failing.
    pub busy_retry_for: Duration,
    /// Use the node-local path when ckptd runs on this host (loopback URL): chunks are handed
    /// over as files in ckptd's handoff directory, and read straight from a local-directory
    /// store, every byte verified here. Falls back to HTTP whenever the path is not available.
    pub node_local: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            chunk_bytes: 4 << 20,
            concurrency: 8,
            attempts_max: 8,
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            request_timeout: Duration::from_secs(120),
            commit_timeout: Duration::from_secs(600),
            missing_batch_max: 10_000,
            busy_retry_for: Duration::from_secs(600),
            node_local: true,
        }
    }
}

/// What `save` waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// This rank's chunks are staged in ckptd (memory or spill disk) and its shard index is
    /// accepted; ckptd makes them durable and commits the step when every rank's index is in.
    Staged,
    /// The step is committed (every rank done, manifest written).
    Committed,
}

/// Identifies one rank's part of a save.
#[derive(Debug, Clone)]
pub struct SaveSpec {
    pub job: String,
    pub step: u64,
    pub rank: u32,
    pub world_size: u32,
    /// Checkpoint-wide metadata; ranks that pass some must pass the same.
    pub metadata: serde_json::Value,
    /// This rank's own metadata (data cursor, RNG state, ...).
    pub rank_metadata: serde_json::Value,
    /// Fixes the manifest's creation time; see ckptd's open-save API.
    pub created_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    pub chunks_total: usize,
    pub chunks_sent: usize,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub status: SaveStatus,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorruptChunk {
    pub hash: ChunkHash,
    /// (rank, tensor) pairs that use the chunk.
    pub used_by: Vec<(u32, String)>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub job: String,
    pub step: u64,
    pub chunks_checked: usize,
    pub bytes_checked: u64,
    pub corrupt: Vec<CorruptChunk>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.corrupt.is_empty()
    }
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiErrorInner,
}

#[derive(Deserialize)]
struct ApiErrorInner {
    code: String,
    message: String,
}

/// What ckptd's `/v1/local` says, checked to be usable from this process.
#[derive(Debug, Clone)]
struct LocalPaths {
    handoff_dir: Option<std::path::PathBuf>,
    store_root: Option<std::path::PathBuf>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    opts: ClientOptions,
    local: std::sync::Arc<tokio::sync::OnceCell<Option<LocalPaths>>>,
    handoff_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub(crate) enum Body {
    Empty,
    Json(Vec<u8>),
    Bytes(Bytes),
}

impl Client {
    pub fn new(base_url: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .pool_max_idle_per_host(opts.concurrency.max(1) * 2)
            .build()
            .map_err(|e| ClientError::Internal(format!("building the http client: {e}")))?;
        Ok(Client {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            opts,
            local: Default::default(),
            handoff_refused: Default::default(),
        })
    }

    /// The node-local paths, discovered once. None unless enabled, ckptd is on a loopback
    /// address, and the directories it names are usable here.
    async fn local_paths(&self) -> Option<&LocalPaths> {
        if !self.opts.node_local {
            return None;
        }
        self.local
            .get_or_init(|| async {
                let host = reqwest::Url::parse(&self.base).ok()?.host_str()?.to_string();
                if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1") {
                    return None;
                }
                #[derive(Deserialize)]
                struct Local {
                    handoff_dir: Option<std::path::PathBuf>,
                    store_root: Option<std::path::PathBuf>,
                }
                let l: Local = self.get_json("/v1/local").await.ok()?;
                let handoff_dir = l.handoff_dir.filter(|d| {
                    let probe = d.join(format!("probe-{}", std::process::id()));
                    let ok = std::fs::write(&probe, b"").is_ok();
                    let _ = std::fs::remove_file(&probe);
                    ok
                });
                let store_root = l.store_root.filter(|d| d.is_dir());
                tracing::debug!(?handoff_dir, ?store_root, "node-local path");
                Some(LocalPaths { handoff_dir, store_root })
            })
            .await
            .as_ref()
    }

    /// Hands a chunk to ckptd as a file when the node-local path is available. Returns false
    /// when it is not (the caller sends it over HTTP).
    async fn handoff_chunk(&self, job: &str, hash: ChunkHash, data: &Bytes) -> Result<bool, ClientError> {
        use std::sync::atomic::Ordering;
        if self.handoff_refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some(dir) = self.local_paths().await.and_then(|l| l.handoff_dir.clone()) else { return Ok(false) };
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!("{hash}.{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(&name);
        let (p, d) = (path.clone(), data.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let header = ckpt_core::ChunkHeader { codec: ckpt_core::Codec::None, raw_len: d.len() as u64, hash };
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&header.encode())?;
            f.write_all(&d)
        })
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))?;
        if let Err(e) = written {
            tracing::debug!(error = %e, "handoff write failed; using HTTP");
            let _ = std::fs::remove_file(&path);
            return Ok(false);
        }
        let r: Result<serde_json::Value, _> = self
            .send_json(
                reqwest::Method::POST,
                &format!("/v1/jobs/{job}/chunks/{hash}/adopt"),
                &serde_json::json!({ "file": name }),
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                if e.api_code() == Some("conflict") {
                    // The store is not a local directory: stop trying for this client.
                    self.handoff_refused.store(true, Ordering::Relaxed);
                    return Ok(false);
                }
                Err(e)
            }
        }
    }

    /// Node-local restore of a whole tensor: every chunk's payload is read from the local store
    /// straight into its place in the tensor and verified there, on all cores. None when the
    /// path is unavailable or a chunk file is missing (the caller then reads through ckptd).
    async fn read_local_tensor(
        &self,
        job: &str,
        step: u64,
        t: &TensorEntry,
        len: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let Some(root) = self.local_paths().await.and_then(|l| l.store_root.clone()) else { return Ok(None) };
        let chunks: Vec<(ChunkHash, u64, std::path::PathBuf)> =
            t.chunks.iter().map(|c| (c.hash, c.len, root.join(ckpt_core::keys::chunk_key(job, &c.hash)))).collect();
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let result = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, (ChunkHash, String)> {
            let mut buf = vec![0u8; len as usize];
            let mut groups: Vec<Vec<(usize, &mut [u8])>> = (0..workers).map(|_| Vec::new()).collect();
            let mut rest = &mut buf[..];
            for (i, (_, clen, _)) in chunks.iter().enumerate() {
                let (slice, tail) = std::mem::take(&mut rest).split_at_mut(*clen as usize);
                groups[i % workers].push((i, slice));
                rest = tail;
            }
            let outcomes: Vec<Result<(), LocalRead>> = std::thread::scope(|sc| {
                let handles: Vec<_> = groups
                    .into_iter()
                    .map(|g| {
                        let chunks = &chunks;
                        sc.spawn(move || {
                            for (i, slice) in g {
                                let (hash, _, path) = &chunks[i];
                                read_chunk_into(path, *hash, slice)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(Err(LocalRead::Missing))).collect()
            });
            for o in outcomes {
                match o {
                    Ok(()) => {}
                    Err(LocalRead::Missing) => return Ok(None),
                    Err(LocalRead::Corrupt(h, why)) => return Err((h, why)),
                }
            }
            Ok(Some(buf))
        })
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))?;
        result.map_err(|(hash, reason)| ClientError::CorruptChunk { job: job.into(), step, hash, reason })
    }

    /// Reads and verifies a chunk straight from a local-directory store. None when the path is
    /// not available or the file is not there (the caller asks ckptd).
    async fn read_local_chunk(
        &self,
        job: &str,
        step: u64,
        hash: ChunkHash,
        len: u64,
    ) -> Result<Option<Bytes>, ClientError> {
        let Some(root) = self.local_paths().await.and_then(|l| l.store_root.clone()) else { return Ok(None) };
        let path = root.join(ckpt_core::keys::chunk_key(job, &hash));
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            read_chunk_into(&path, hash, &mut buf).map(|()| Bytes::from(buf))
        })
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))?;
        match read {
            Ok(b) => Ok(Some(b)),
            Err(LocalRead::Missing) => Ok(None),
            Err(LocalRead::Corrupt(_, reason)) => {
                Err(ClientError::CorruptChunk { job: job.into(), step, hash, reason })
            }
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn request_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Body,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req = match body {
            Body::Empty => req,
            Body::Json(b) => req.header("content-type", "application/json").body(b.clone()),
            Body::Bytes(b) => req.header("content-type", "application/octet-stream").body(b.clone()),
        };
        let transport = |source| ClientError::Transport { url: url.clone(), source };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ApiErrorBody>(&bytes) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => ("http_error".to_string(), String::from_utf8_lossy(&bytes).chars().take(500).collect()),
        };
        Err(ClientError::Api { status: status.as_u16(), code, message })
    }

    /// One request with retries on transient failures.
    pub(crate) async fn request(&self, method: reqwest::Method, path: &str, body: Body) -> Result<Bytes, ClientError> {
        self.request_with(method, path, body, &[]).await
    }

    async fn request_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, ClientError> {
        let mut delay = self.opts.retry_base;
        let mut attempt = 1;
        let busy_deadline = Instant::now() + self.opts.busy_retry_for;
        loop {
            match self.request_once(method.clone(), path, &body, headers).await {
                Err(e) if e.api_code() == Some("busy") && Instant::now() < busy_deadline => {
                    tracing::debug!(path, "ckptd busy, backing off");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) if e.is_transient() && attempt < self.opts.attempts_max => {
                    tracing::debug!(path, attempt, error = %e, "transient failure, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.opts.retry_max);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.request(reqwest::Method::GET, path, Body::Empty).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Internal(e.to_string()))?;
        let bytes = self.request(method, path, Body::Json(body)).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    pub async fn health(&self) -> Result<(), ClientError> {
        self.request_once(reqwest::Method::GET, "/readyz", &Body::Empty, &[]).await.map(|_| ())
    }

    // ---- saving ------------------------------------------------------------------------------

    /// Saves one rank's tensors as part of step `spec.step`. Safe to call again after any
    /// failure: what ckptd already has is not sent twice.
    pub async fn save(&self, spec: &SaveSpec, tensors: &[Tensor], wait: Wait) -> Result<SaveReport, ClientError> {
        let started = Instant::now();
        validate_job(&spec.job)?;
        for t in tensors {
            t.check()?;
        }
        let job = &spec.job;
        let status = self.open_save(spec).await?;
        if status.phase == SavePhase::Committed {
            return Ok(SaveReport {
                chunks_total: 0,
                chunks_sent: 0,
                bytes_total: 0,
                bytes_sent: 0,
                status,
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }

        let (index, chunks) = self.chunk_and_hash(spec.rank, tensors, spec.rank_metadata.clone()).await?;
        let bytes_total = chunks.iter().map(|(_, b)| b.len() as u64).sum();
        let chunks_total = chunks.len();
        let mut unique: BTreeMap<ChunkHash, Bytes> = BTreeMap::new();
        for (h, b) in chunks {
            unique.entry(h).or_insert(b);
        }
        let missing = self.missing(job, unique.keys().copied().collect()).await?;
        let bytes_sent: u64 = missing.iter().filter_map(|h| unique.get(h)).map(|b| b.len() as u64).sum();
        let chunks_sent = missing.len();
        futures::stream::iter(missing)
            .map(|h| {
                let data = unique.get(&h).cloned().unwrap_or_default();
                async move { self.put_chunk(job, h, data).await }
            })
            .buffer_unordered(self.opts.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;

        let mut status: SaveStatus = self
            .send_json(reqwest::Method::PUT, &format!("/v1/jobs/{job}/saves/{}/ranks/{}", spec.step, spec.rank), &index)
            .await?;
        if wait == Wait::Committed {
            status = self.wait_committed(job, spec.step).await?;
        }
        if status.phase == SavePhase::Aborted {
            return Err(ClientError::Aborted {
                job: job.clone(),
                step: spec.step,
                reason: status.error.unwrap_or_default(),
            });
        }
        Ok(SaveReport {
            chunks_total,
            chunks_sent,
            bytes_total,
            bytes_sent,
            status,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Opens (or re-opens) the save `spec` belongs to. Idempotent.
    pub async fn open_save(&self, spec: &SaveSpec) -> Result<SaveStatus, ClientError> {
        validate_job(&spec.job)?;
        let open = serde_json::json!({
            "world_size": spec.world_size,
            "metadata": spec.metadata,
            "created_unix_ms": spec.created_unix_ms,
        });
        self.send_json(reqwest::Method::PUT, &format!("/v1/jobs/{}/saves/{}", spec.job, spec.step), &open).await
    }

    /// Cuts tensors into chunks and hashes them on blocking threads, all cores at once.
    async fn chunk_and_hash(
        &self,
        rank: u32,
        tensors: &[Tensor],
        metadata: serde_json::Value,
    ) -> Result<(ShardIndex, Vec<(ChunkHash, Bytes)>), ClientError> {
        let mut pieces = Vec::new();
        for (ti, t) in tensors.iter().enumerate() {
            for r in chunk_ranges(t.data.len() as u64, self.opts.chunk_bytes) {
                pieces.push((ti, t.data.slice(r.start as usize..r.end as usize)));
            }
        }
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) * 2;
        let hashed: Vec<(usize, ChunkHash, Bytes)> = futures::stream::iter(pieces)
            .map(|(ti, b)| async move {
                tokio::task::spawn_blocking(move || (ti, ChunkHash::of(&b), b))
                    .await
                    .map_err(|e| ClientError::Internal(format!("hashing task failed: {e}")))
            })
            .buffered(workers)
            .try_collect()
            .await?;
        let mut entries: Vec<TensorEntry> = tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                global_shape: t.global_shape.clone(),
                offsets: t.offsets.clone(),
                chunks: Vec::new(),
            })
            .collect();
        let mut chunks = Vec::with_capacity(hashed.len());
        for (ti, h, b) in hashed {
            entries[ti].chunks.push(ChunkRef { hash: h, len: b.len() as u64 });
            chunks.push((h, b));
        }
        Ok((ShardIndex { rank, tensors: entries, metadata }, chunks))
    }

    /// Which of `hashes` the job lacks, asked in bounded batches.
    pub async fn missing(&self, job: &str, hashes: Vec<ChunkHash>) -> Result<Vec<ChunkHash>, ClientError> {
        #[derive(Deserialize)]
        struct Missing {
            missing: Vec<ChunkHash>,
        }
        let mut out = Vec::new();
        for batch in hashes.chunks(self.opts.missing_batch_max.max(1)) {
            let m: Missing = self
                .send_json(
                    reqwest::Method::POST,
                    &format!("/v1/jobs/{job}/chunks/missing"),
                    &serde_json::json!({ "hashes": batch }),
                )
                .await?;
            out.extend(m.missing);
        }
        Ok(out)
    }

    /// Sends one chunk: through the node-local path when available, else over HTTP.
    pub async fn put_chunk(&self, job: &str, hash: ChunkHash, data: Bytes) -> Result<(), ClientError> {
        if self.handoff_chunk(job, hash, &data).await? {
            return Ok(());
        }
        self.request(reqwest::Method::PUT, &format!("/v1/jobs/{job}/chunks/{hash}"), Body::Bytes(data))
            .await
            .map(|_| ())
    }

    /// Sends one rank's shard index (its chunks must already be staged or durable). For
    /// callers that stream their own chunks; `save` does this for you.
    pub async fn put_shard_index(&self, job: &str, step: u64, index: &ShardIndex) -> Result<SaveStatus, ClientError> {
        self.send_json(reqwest::Method::PUT, &format!("/v1/jobs/{job}/saves/{step}/ranks/{}", index.rank), index).await
    }

    pub async fn save_status(&self, job: &str, step: u64) -> Result<SaveStatus, ClientError> {
        self.get_json(&format!("/v1/jobs/{job}/saves/{step}")).await
    }

    /// Polls until the step is committed or aborted, or `commit_timeout` passes.
    pub async fn wait_committed(&self, job: &str, step: u64) -> Result<SaveStatus, ClientError> {
        let deadline = Instant::now() + self.opts.commit_timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            let s = self.save_status(job, step).await?;
            match s.phase {
                SavePhase::Committed => return Ok(s),
                SavePhase::Aborted => {
                    return Err(ClientError::Aborted { job: job.into(), step, reason: s.error.unwrap_or_default() })
                }
                _ if Instant::now() >= deadline => {
                    return Err(ClientError::Timeout(format!(
                        "{job}@{step} not committed after {:?} ({} of {} ranks in, {})",
                        self.opts.commit_timeout,
                        s.ranks_received,
                        s.world_size,
                        s.phase.name()
                    )))
                }
                _ => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    pub async fn abort(&self, job: &str, step: u64) -> Result<SaveStatus, ClientError> {
        let bytes = self.request(reqwest::Method::DELETE, &format!("/v1/jobs/{job}/saves/{step}"), Body::Empty).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    // ---- reading -----------------------------------------------------------------------------

    pub async fn jobs(&self) -> Result<Vec<String>, ClientError> {
        #[derive(Deserialize)]
        struct Jobs {
            jobs: Vec<String>,
        }
        Ok(self.get_json::<Jobs>("/v1/jobs").await?.jobs)
    }

    pub async fn list(&self, job: &str) -> Result<CheckpointList, ClientError> {
        validate_job(job)?;
        self.get_json(&format!("/v1/jobs/{job}/checkpoints")).await
    }

    /// The newest committed step, or None if the job has none.
    pub async fn latest(&self, job: &str) -> Result<Option<u64>, ClientError> {
        Ok(self.list(job).await?.committed.last().map(|m| m.step))
    }

    /// Fetches one chunk and verifies it. ckptd's own verification failure and a mismatch on
    /// arrival are both reported as `CorruptChunk`.
    pub async fn fetch_chunk(&self, job: &str, step: u64, hash: ChunkHash, len: u64) -> Result<Bytes, ClientError> {
        if let Some(raw) = self.read_local_chunk(job, step, hash, len).await? {
            return Ok(raw);
        }
        let corrupt = |reason: String| ClientError::CorruptChunk { job: job.into(), step, hash, reason };
        let bytes =
            // This client verifies every byte below, so ckptd need not hash the chunk too.
            match self
                .request_with(
                    reqwest::Method::GET,
                    &format!("/v1/jobs/{job}/chunks/{hash}"),
                    Body::Empty,
                    &[("x-ckpt-client-verifies", "true")],
                )
                .await
            {
                Ok(b) => b,
                Err(ClientError::Api { code, message, .. }) if code == "chunk_corrupt" => {
                    let detail = message.split_once("corrupt in the store: ").map_or(message.as_str(), |(_, d)| d);
                    return Err(corrupt(format!("ckptd found it corrupt in the store ({detail})")));
                }
                Err(ClientError::Api { code, .. }) if code == "not_found" => {
                    return Err(corrupt("missing from the store".into()))
                }
                Err(e) => return Err(e),
            };
        let data = bytes.clone();
        tokio::task::spawn_blocking(move || hash.verify(&data))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .map_err(|e| match e {
                ckpt_core::CoreError::HashMismatch { actual, .. } => {
                    corrupt(format!("bytes received hash to {actual}"))
                }
                other => corrupt(other.to_string()),
            })?;
        Ok(bytes)
    }

    /// Reads rank `rank`'s tensors of a committed checkpoint, every chunk verified. Reads the
    /// root and this rank's index object, nothing of the other ranks.
    pub async fn load_rank(&self, job: &str, step: u64, rank: u32) -> Result<Vec<Tensor>, ClientError> {
        let cp = self.checkpoint(job, step).await?;
        let shard = self.shard_index(&cp, rank).await?;
        self.load_shard(job, step, &shard, |_| {}).await
    }

    /// The tensors of one rank's shard index of `job`@`step`; `progress` is called with each
    /// chunk's length as it is verified.
    pub async fn load_shard(
        &self,
        job: &str,
        step: u64,
        shard: &ShardIndex,
        progress: impl Fn(u64),
    ) -> Result<Vec<Tensor>, ClientError> {
        let mut out = Vec::with_capacity(shard.tensors.len());
        for t in &shard.tensors {
            let len = t.byte_len().ok_or_else(|| ClientError::Protocol(format!("tensor {} is too large", t.name)))?;
            if let Some(buf) = self.read_local_tensor(job, step, t, len).await? {
                progress(len);
                out.push(Tensor::from_entry(t, Bytes::from(buf)));
                continue;
            }
            let mut buf = Vec::with_capacity(len as usize);
            let mut fetches =
                futures::stream::iter(t.chunks.iter().map(|c| self.fetch_chunk(job, step, c.hash, c.len)))
                    .buffered(self.opts.concurrency.max(1));
            let mut i = 0;
            while let Some(chunk) = fetches.next().await {
                let chunk = chunk?;
                let expected = t.chunks[i].len;
                if chunk.len() as u64 != expected {
                    return Err(ClientError::Protocol(format!(
                        "chunk {} is {} bytes, the index says {expected}",
                        t.chunks[i].hash,
                        chunk.len()
                    )));
                }
                buf.extend_from_slice(&chunk);
                progress(expected);
                i += 1;
            }
            out.push(Tensor::from_entry(t, Bytes::from(buf)));
        }
        Ok(out)
    }

    /// Re-reads and re-hashes every distinct chunk of a checkpoint, and reports every bad one
    /// with the ranks and tensors that use it. Does not stop at the first.
    pub async fn verify(&self, job: &str, step: u64, progress: impl Fn(u64)) -> Result<VerifyReport, ClientError> {
        let m = self.manifest(job, step).await?;
        let mut used_by: BTreeMap<ChunkHash, (u64, Vec<(u32, String)>)> = BTreeMap::new();
        for r in &m.ranks {
            for t in &r.tensors {
                for c in &t.chunks {
                    let e = used_by.entry(c.hash).or_insert((c.len, Vec::new()));
                    if !e.1.iter().any(|(rr, n)| *rr == r.rank && *n == t.name) {
                        e.1.push((r.rank, t.name.clone()));
                    }
                }
            }
        }
        let mut results = futures::stream::iter(
            used_by.iter().map(|(h, (len, _))| async move { (*h, *len, self.fetch_chunk(job, step, *h, *len).await) }),
        )
        .buffer_unordered(self.opts.concurrency.max(1));
        let mut report =
            VerifyReport { job: job.into(), step, chunks_checked: 0, bytes_checked: 0, corrupt: Vec::new() };
        let mut seen = HashSet::new();
        while let Some((h, len, r)) = results.next().await {
            seen.insert(h);
            report.chunks_checked += 1;
            match r {
                Ok(b) if b.len() as u64 == len => report.bytes_checked += len,
                Ok(b) => report.corrupt.push(CorruptChunk {
                    hash: h,
                    used_by: used_by[&h].1.clone(),
                    reason: format!("chunk is {} bytes, the index says {len}", b.len()),
                }),
                Err(ClientError::CorruptChunk { reason, .. }) => {
                    report.corrupt.push(CorruptChunk { hash: h, used_by: used_by[&h].1.clone(), reason })
                }
                Err(e) => return Err(e),
            }
            progress(len);
        }
        report.corrupt.sort_by_key(|c| c.hash);
        debug_assert_eq!(seen.len(), used_by.len());
        Ok(report)
    }

    /// Deletes a committed checkpoint. The newest one is refused unless `force`.
    pub async fn delete(&self, job: &str, step: u64, force: bool) -> Result<(), ClientError> {
        validate_job(job)?;
        let q = if force { "?force=true" } else { "" };
        self.request(reqwest::Method::DELETE, &format!("/v1/jobs/{job}/checkpoints/{step}{q}"), Body::Empty)
            .await
            .map(|_| ())
    }
}

enum LocalRead {
    Missing,
    Corrupt(ChunkHash, String),
}

/// Reads one stored chunk into `out` (exactly its raw length) and verifies it there.
fn read_chunk_into(path: &std::path::Path, hash: ChunkHash, out: &mut [u8]) -> Result<(), LocalRead> {
    use std::io::Read;
    let corrupt = |why: String| LocalRead::Corrupt(hash, why);
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LocalRead::Missing),
        Err(e) => return Err(corrupt(format!("reading {}: {e}", path.display()))),
    };
    let size = f.metadata().map_err(|e| corrupt(e.to_string()))?.len();
    let mut head = [0u8; ckpt_core::CHUNK_HEADER_BYTES];
    f.read_exact(&mut head).map_err(|_| corrupt("stored chunk is shorter than its header".into()))?;
    let header = ckpt_core::ChunkHeader::decode_header(&head).map_err(|e| corrupt(e.to_string()))?;
    if header.hash != hash || header.raw_len != out.len() as u64 {
        return Err(corrupt(format!("header names chunk {} of {} bytes", header.hash, header.raw_len)));
    }
    let payload_len = size - ckpt_core::CHUNK_HEADER_BYTES as u64;
    match header.codec {
        ckpt_core::Codec::None => {
            if payload_len != header.raw_len {
                return Err(corrupt(format!(
                    "payload is {payload_len} bytes, the header says {} (torn write)",
                    header.raw_len
                )));
            }
            f.read_exact(out).map_err(|e| corrupt(e.to_string()))?;
        }
        ckpt_core::Codec::Zstd => {
            let mut payload = Vec::with_capacity(payload_len as usize);
            f.read_to_end(&mut payload).map_err(|e| corrupt(e.to_string()))?;
            let n = zstd::bulk::decompress_to_buffer(&payload, out)
                .map_err(|e| corrupt(format!("zstd payload does not decode: {e}")))?;
            if n != out.len() {
                return Err(corrupt(format!("decodes to {n} bytes, the header says {}", out.len())));
            }
        }
    }
    let actual = ChunkHash::of(out);
    if actual != hash {
        return Err(corrupt(format!("stored bytes hash to {actual}")));
    }
    Ok(())
}
