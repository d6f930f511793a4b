//! The client: save, restore and verify orchestration over two transports.
//!
//! Design note.
//! * Transports (`transport.rs`): chunk bytes go through the node-local transport
//!   (`node_local.rs`: files in ckptd's handoff directory, direct reads from a local-directory
//!   store) when ckptd is on this host, and over HTTP (`http.rs`, which also carries every other
//!   request, with retries) otherwise or whenever the node-local one declines. The orchestration
//!   here asks them in order and does not care which carried a chunk.
//! * Verification: chunks are verified against their address after they are read, whatever
//!   ckptd checked; manifests are checked against their own hash. No unverified byte is
//!   returned.
//! * Bounds: chunk uploads and downloads in flight per call (`concurrency`), hashes per existence
//!   query (`missing_batch_max`), time waited for a commit (`commit_timeout`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::chunk::chunk_ranges;
use ckpt_core::{validate_job, ChunkHash, ChunkRef, SavePhase, ShardIndex, TensorEntry};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use ckpt_core::save::{CheckpointList, SaveStatus};

use crate::error::ClientError;
use crate::http::{Body, Http, RetryPolicy};
use crate::node_local::NodeLocal;
use crate::restore::{whole_tensor_reads, Read};
use crate::tensor::Tensor;
use crate::transport::{Outcome, Transport};

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
    /// How long a connection may take to open.
    pub connect_timeout: Duration,
    /// Retry (within `attempts_max`) when ckptd cannot be reached at all or did not answer in
    /// time; interactive tools turn it off to fail at once.
    pub retry_unreachable: bool,
    /// How long ckptd may take to answer a request without a body (a query, a delete), and
    /// then send nothing while its answer is read, before the request fails: a stopped or
    /// wedged ckptd accepts connections and never answers. `None`: only `request_timeout`
    /// bounds it. Status waits ask ckptd to answer within half of it; requests that send a
    /// body, and long ones (`gc`), are not bounded by it.
    pub answer_timeout: Option<Duration>,
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
    /// How the node-local path encodes chunks before handing them over (ckptd encodes what
    /// arrives over HTTP with its own settings). Level 0 hands chunks over raw.
    pub encode: ckpt_core::codec::EncodeOptions,
    /// The writer's generation (an elastic agent's restart count). Sent with every save open
    /// and shard index; once a job is fenced at a later generation (`Client::fence`), ckptd
    /// refuses them, so a rank of a replaced generation cannot change the new one's saves.
    pub epoch: Option<u64>,
    /// Bearer token for a ckptd with tenants; unset: `CKPT_TOKEN`, else the first line of the
    /// file `CKPT_TOKEN_FILE` names (`auth.rs`).
    pub token: Option<crate::auth::Token>,
    /// TLS trust and client identity for an https URL; unset paths come from `CKPT_TLS_CA`,
    /// `CKPT_TLS_CERT` and `CKPT_TLS_KEY`.
    pub tls: crate::auth::TlsFiles,
    /// Index objects kept after they are read, by their size on the wire: a reader of many
    /// tensors (an export, a reshard) then fetches each rank's index once, not once per tensor,
    /// as long as the indexes it sweeps fit (least recently used go first; a sweep larger than
    /// the cache mostly misses). 0 keeps none. `manifest` and `verify` always read afresh.
    pub index_cache_bytes: u64,
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
            connect_timeout: Duration::from_secs(5),
            retry_unreachable: true,
            answer_timeout: None,
            commit_timeout: Duration::from_secs(600),
            missing_batch_max: 10_000,
            busy_retry_for: Duration::from_secs(600),
            node_local: true,
            encode: ckpt_core::codec::EncodeOptions::default(),
            epoch: None,
            index_cache_bytes: 64 << 20,
            token: None,
            tls: Default::default(),
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
    /// When each host's ranks save through their own ckptd (one per node, sharing one store):
    /// the ranks `first..end` that this rank's ckptd serves. Needs `ClientOptions::epoch`. The
    /// nodes commit the step once between them, through the store (ARCHITECTURE.md).
    pub node_ranks: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    pub chunks_total: usize,
    pub chunks_sent: usize,
    /// Chunks whose address was known before the save (an `AsyncSaver` found them unchanged
    /// since its last save): not hashed again (ckptd is still asked whether it has them).
    pub chunks_reused: usize,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub status: SaveStatus,
    pub elapsed_ms: u64,
}

/// Chunks hashed, asked about and sent as one batch of a save's pipeline.
const SAVE_BATCH_CHUNKS: usize = 64;

/// Bytes read at once by `verify` (the buffer it holds).
const VERIFY_BATCH_BYTES: u64 = 256 << 20;

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

#[derive(Clone)]
pub struct Client {
    pub(crate) http: Http,
    pub(crate) opts: ClientOptions,
    pub(crate) node_local: Arc<NodeLocal>,
    /// In order of preference; HTTP, last, never declines.
    pub(crate) transports: Vec<Arc<dyn Transport>>,
    pub(crate) indexes: Arc<crate::checkpoint::IndexCache>,
}

impl Client {
    pub fn new(base_url: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let retry = RetryPolicy {
            attempts_max: opts.attempts_max,
            retry_unreachable: opts.retry_unreachable,
            base: opts.retry_base,
            max: opts.retry_max,
            busy_retry_for: opts.busy_retry_for,
        };
        let security = crate::http::Security {
            token: crate::auth::resolve_token(&opts.token)?,
            tls: crate::auth::resolve_tls(&opts.tls),
        };
        let http = Http::new(
            base_url,
            opts.request_timeout,
            opts.connect_timeout,
            opts.answer_timeout,
            opts.concurrency.max(1) * 2,
            retry,
            &security,
        )?;
        let node_local = Arc::new(NodeLocal::new(http.clone(), opts.node_local, opts.encode));
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        if opts.node_local {
            transports.push(node_local.clone());
        }
        transports.push(Arc::new(http.clone()));
        let indexes = Arc::new(crate::checkpoint::IndexCache::new(opts.index_cache_bytes));
        Ok(Client { http, opts, node_local, transports, indexes })
    }

    /// The same client with its own connection pool and node-local discovery, for use on
    /// another runtime (connections belong to the runtime that opened them).
    pub fn detached(&self) -> Result<Client, ClientError> {
        Client::new(self.http.base(), self.opts.clone())
    }

    /// Registers an `AsyncSaver`'s shared staging buffer with ckptd (see `node_local.rs`).
    pub(crate) async fn register_segment(&self, file: &std::fs::File) -> Option<crate::node_local::Registered> {
        self.node_local.register_segment(file).await
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn base_url(&self) -> &str {
        self.http.base()
    }

    pub(crate) async fn request(&self, method: reqwest::Method, path: &str, body: Body) -> Result<Bytes, ClientError> {
        self.http.request(method, path, body).await
    }

    pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.http.get_json(path).await
    }

    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.http.send_json(method, path, body).await
    }

    pub async fn health(&self) -> Result<(), ClientError> {
        self.http.request_once(reqwest::Method::GET, "/readyz").await
    }

    // ---- saving ------------------------------------------------------------------------------

    /// Saves one rank's tensors as part of step `spec.step`. Safe to call again after any
    /// failure: what ckptd already has is not sent twice.
    pub async fn save(&self, spec: &SaveSpec, tensors: &[Tensor], wait: Wait) -> Result<SaveReport, ClientError> {
        self.save_known(spec, tensors, wait, &[], None).await.map(|(r, _)| r)
    }

    /// `save` where `known[i]`, when given, is the hash of the `i`-th chunk (in tensor order),
    /// already known to the caller (the async saver knows which chunks did not change since
    /// its last save); those are not hashed again. Returns every chunk's hash in that order.
    pub(crate) async fn save_known(
        &self,
        spec: &SaveSpec,
        tensors: &[Tensor],
        wait: Wait,
        known: &[Option<ChunkHash>],
        segment: Option<crate::node_local::SegmentView<'_>>,
    ) -> Result<(SaveReport, Vec<ChunkHash>), ClientError> {
        // Every request of the save carries the save's trace (see `ckpt_core::trace`).
        let traceparent = ckpt_core::trace::save_traceparent(&spec.job, spec.step, spec.rank);
        crate::http::TRACEPARENT.scope(traceparent, self.save_traced(spec, tensors, wait, known, segment)).await
    }

    async fn save_traced(
        &self,
        spec: &SaveSpec,
        tensors: &[Tensor],
        wait: Wait,
        known: &[Option<ChunkHash>],
        segment: Option<crate::node_local::SegmentView<'_>>,
    ) -> Result<(SaveReport, Vec<ChunkHash>), ClientError> {
        let started = Instant::now();
        validate_job(&spec.job)?;
        for t in tensors {
            t.check()?;
        }
        let job = &spec.job;
        let status = self.open_save(spec).await?;
        if status.phase == SavePhase::Committed {
            let report = SaveReport {
                chunks_total: 0,
                chunks_sent: 0,
                chunks_reused: 0,
                bytes_total: 0,
                bytes_sent: 0,
                status,
                elapsed_ms: started.elapsed().as_millis() as u64,
            };
            return Ok((report, Vec::new()));
        }

        // A pipeline: chunks are hashed on blocking threads, asked about in batches, and the
        // missing ones sent, with the next batch hashing while the last one uploads. A chunk in
        // a registered shared-memory segment skips all that: ckptd copies it out, names it, and
        // stores it unless the job has it (`sent` below: `Some(bytes written)`).
        let mut pieces = Vec::new();
        for (ti, t) in tensors.iter().enumerate() {
            for r in chunk_ranges(t.data.len() as u64, self.opts.chunk_bytes) {
                let i = pieces.len();
                pieces.push((ti, t.data.slice(r.start as usize..r.end as usize), known.get(i).copied().flatten()));
            }
        }
        let chunks_total = pieces.len();
        let chunks_reused = pieces.iter().filter(|(_, _, k)| k.is_some()).count();
        let bytes_total: u64 = pieces.iter().map(|(_, b, _)| b.len() as u64).sum();
        let hash_workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) * 2;
        let in_flight =
            if segment.is_some() { hash_workers.max(self.opts.concurrency.max(1) * 2) } else { hash_workers };
        let hashed = futures::stream::iter(pieces)
            .map(|(ti, b, known)| async move {
                if let Some(h) = known {
                    return Ok((ti, h, b, None));
                }
                if let Some(seg) = segment {
                    let width = ckpt_core::codec::width_for(tensors[ti].dtype);
                    if let Some((h, written)) = self.node_local.put_segment_unnamed(job, &b, width, seg).await? {
                        let sent = if written { b.len() as u64 } else { 0 };
                        return Ok((ti, h, b, Some(sent)));
                    }
                }
                tokio::task::spawn_blocking(move || (ti, ChunkHash::of(&b), b, None))
                    .await
                    .map_err(|e| ClientError::Internal(format!("hashing task failed: {e}")))
            })
            .buffered(in_flight);
        let sent: std::sync::Mutex<HashSet<ChunkHash>> = Default::default();
        let batches: Vec<Vec<(usize, ChunkHash, u64, u64)>> = hashed
            .try_chunks(SAVE_BATCH_CHUNKS)
            .map_err(|e| e.1)
            .map_ok(|batch| {
                let sent = &sent;
                async move {
                    // Each distinct hash is asked about and sent once per save.
                    let mut fresh: BTreeMap<ChunkHash, (Bytes, Option<u8>)> = BTreeMap::new();
                    {
                        let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                        for (ti, h, b, _) in batch.iter().filter(|c| c.3.is_none()) {
                            if !sent.contains(h) {
                                fresh.entry(*h).or_insert((b.clone(), ckpt_core::codec::width_for(tensors[*ti].dtype)));
                            }
                        }
                    }
                    let missing = if fresh.is_empty() {
                        Vec::new()
                    } else {
                        self.missing(job, fresh.keys().copied().collect()).await?
                    };
                    sent.lock().unwrap_or_else(|e| e.into_inner()).extend(fresh.keys().copied());
                    let sent_bytes: Vec<(ChunkHash, u64)> =
                        missing.iter().filter_map(|h| fresh.get(h).map(|(b, _)| (*h, b.len() as u64))).collect();
                    futures::stream::iter(missing)
                        .map(|h| {
                            let (data, width) = fresh.get(&h).cloned().unwrap_or_default();
                            async move { self.put_chunk_typed(job, h, data, width, segment).await }
                        })
                        .buffer_unordered(self.opts.concurrency.max(1))
                        .try_collect::<Vec<()>>()
                        .await?;
                    Ok::<_, ClientError>(
                        batch
                            .into_iter()
                            .map(|(ti, h, b, by_segment)| {
                                let sent_len = by_segment
                                    .unwrap_or_else(|| sent_bytes.iter().find(|(s, _)| *s == h).map_or(0, |(_, l)| *l));
                                (ti, h, b.len() as u64, sent_len)
                            })
                            .collect(),
                    )
                }
            })
            .try_buffered(2)
            .try_collect()
            .await?;
        let mut index = ShardIndex {
            rank: spec.rank,
            tensors: tensors
                .iter()
                .map(|t| TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    global_shape: t.global_shape.clone(),
                    offsets: t.offsets.clone(),
                    chunks: Vec::new(),
                })
                .collect(),
            metadata: spec.rank_metadata.clone(),
        };
        let (mut chunks_sent, mut bytes_sent) = (0, 0);
        let mut hashes = Vec::with_capacity(chunks_total);
        let mut counted = HashSet::new();
        for (ti, h, len, sent_len) in batches.into_iter().flatten() {
            index.tensors[ti].chunks.push(ChunkRef { hash: h, len });
            hashes.push(h);
            if sent_len > 0 && counted.insert(h) {
                chunks_sent += 1;
                bytes_sent += sent_len;
            }
        }

        let mut status: SaveStatus =
            self.send_json(reqwest::Method::PUT, &self.index_path(job, spec.step, spec.rank), &index).await?;
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
        let report = SaveReport {
            chunks_total,
            chunks_sent,
            chunks_reused,
            bytes_total,
            bytes_sent,
            status,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        Ok((report, hashes))
    }

    /// Opens (or re-opens) the save `spec` belongs to. Idempotent.
    pub async fn open_save(&self, spec: &SaveSpec) -> Result<SaveStatus, ClientError> {
        validate_job(&spec.job)?;
        let open = serde_json::json!({
            "world_size": spec.world_size,
            "metadata": spec.metadata,
            "created_unix_ms": spec.created_unix_ms,
            "epoch": self.opts.epoch,
            "node_ranks": spec.node_ranks.map(|(first, end)| [first, end]),
        });
        let status: SaveStatus =
            self.send_json(reqwest::Method::PUT, &format!("/v1/jobs/{}/saves/{}", spec.job, spec.step), &open).await?;
        // A ckptd that does not know split saves ignores node_ranks and would wait for every
        // rank of the world; it answers without naming a part (a rolling upgrade half done).
        if let Some((first, end)) = spec.node_ranks.filter(|r| *r != (0, spec.world_size)) {
            if status.phase != SavePhase::Committed && status.part.map(|p| (p.first, p.end)) != Some((first, end)) {
                return Err(ClientError::Protocol(format!(
                    "ckptd at {} does not serve ranks {first}..{end} of a save split over nodes \
                     (it answered {:?}); every node of the job needs a ckptd that knows split saves",
                    self.base_url(),
                    status.part
                )));
            }
        }
        Ok(status)
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

    /// Sends one chunk: through the first transport that carries it (node-local, then HTTP).
    pub async fn put_chunk(&self, job: &str, hash: ChunkHash, data: Bytes) -> Result<(), ClientError> {
        self.put_chunk_typed(job, hash, data, None, None).await
    }

    /// `put_chunk` knowing the element width of the tensor the chunk is cut from (the
    /// node-local path's codec groups bytes by it) and, for an `AsyncSaver`'s shared staging
    /// buffer, the segment ckptd can copy it from.
    async fn put_chunk_typed(
        &self,
        job: &str,
        hash: ChunkHash,
        data: Bytes,
        width: Option<u8>,
        segment: Option<crate::node_local::SegmentView<'_>>,
    ) -> Result<(), ClientError> {
        if let Some(seg) = segment {
            if self.node_local.put_segment_chunk(job, hash, &data, width, seg).await? {
                return Ok(());
            }
        }
        for t in &self.transports {
            if t.put(job, hash, &data, width).await? == Outcome::Carried {
                return Ok(());
            }
        }
        Err(ClientError::Internal(format!("no transport carried chunk {hash}")))
    }

    /// Sends one rank's shard index (its chunks must already be staged or durable). For
    /// callers that stream their own chunks; `save` does this for you.
    pub async fn put_shard_index(&self, job: &str, step: u64, index: &ShardIndex) -> Result<SaveStatus, ClientError> {
        self.send_json(reqwest::Method::PUT, &self.index_path(job, step, index.rank), index).await
    }

    fn index_path(&self, job: &str, step: u64, rank: u32) -> String {
        match self.opts.epoch {
            Some(e) => format!("/v1/jobs/{job}/saves/{step}/ranks/{rank}?epoch={e}"),
            None => format!("/v1/jobs/{job}/saves/{step}/ranks/{rank}"),
        }
    }

    /// Fences `job` at `epoch`: from now on ckptd refuses save opens and shard indexes that
    /// carry an older epoch (a replaced generation's ranks). Never lowers the fence; returns it.
    pub async fn fence(&self, job: &str, epoch: u64) -> Result<u64, ClientError> {
        validate_job(job)?;
        #[derive(Deserialize)]
        struct Fence {
            epoch: u64,
        }
        let f: Fence = self
            .send_json(reqwest::Method::PUT, &format!("/v1/jobs/{job}/fence"), &serde_json::json!({ "epoch": epoch }))
            .await?;
        Ok(f.epoch)
    }

    pub async fn save_status(&self, job: &str, step: u64) -> Result<SaveStatus, ClientError> {
        self.get_json(&format!("/v1/jobs/{job}/saves/{step}")).await
    }

    /// Waits until the step is committed or aborted, or `commit_timeout` passes. Each status
    /// query asks ckptd to hold its answer until the save ends (up to 10 s, and half the
    /// request timeout), so the commit is seen when it happens, not at the next poll.
    pub async fn wait_committed(&self, job: &str, step: u64) -> Result<SaveStatus, ClientError> {
        let deadline = Instant::now() + self.opts.commit_timeout;
        let hold = Duration::from_secs(10)
            .min(self.opts.request_timeout / 2)
            .min(self.opts.answer_timeout.map_or(Duration::MAX, |t| t / 2));
        let mut delay = Duration::from_millis(10);
        loop {
            let wait = deadline.saturating_duration_since(Instant::now()).min(hold);
            let asked = Instant::now();
            let path = format!("/v1/jobs/{job}/saves/{step}?wait_ms={}", wait.as_millis());
            let s: SaveStatus = self.get_json(&path).await?;
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
                // An answer well before the wait asked (an older ckptd, a low
                // `status_wait_ms_max`) is polled again with a backoff, as before.
                _ if asked.elapsed() < wait / 2 => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
                _ => {}
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

    /// Fetches one chunk of `len` raw bytes and verifies it. ckptd's own verification failure
    /// and a mismatch on arrival are both reported as `CorruptChunk`.
    pub async fn fetch_chunk(&self, job: &str, step: u64, hash: ChunkHash, len: u64) -> Result<Bytes, ClientError> {
        let mut buf = vec![0u8; len as usize];
        let read = Read { hash, len, within: 0..len as usize, dest: &mut buf };
        self.read_all(job, step, vec![read]).await?;
        Ok(Bytes::from(buf))
    }

    /// Reads rank `rank`'s tensors of a committed checkpoint, every chunk verified. Reads the
    /// root and this rank's index object, nothing of the other ranks.
    pub async fn load_rank(&self, job: &str, step: u64, rank: u32) -> Result<Vec<Tensor>, ClientError> {
        let cp = self.checkpoint(job, step).await?;
        let shard = self.shard_index(&cp, rank).await?;
        self.load_shard(job, step, &shard, |_| {}).await
    }

    /// The tensors of one rank's shard index of `job`@`step`, in new buffers; `progress` is
    /// called with each tensor's length once it is verified. See
    /// [`Client::restore_shard_into`] to restore into buffers you own.
    pub async fn load_shard(
        &self,
        job: &str,
        step: u64,
        shard: &ShardIndex,
        progress: impl Fn(u64),
    ) -> Result<Vec<Tensor>, ClientError> {
        let mut bufs = Vec::with_capacity(shard.tensors.len());
        for t in &shard.tensors {
            let len = t.byte_len().ok_or_else(|| ClientError::Protocol(format!("tensor {} is too large", t.name)))?;
            bufs.push(vec![0u8; len as usize]);
        }
        let mut reads = Vec::new();
        for (t, buf) in shard.tensors.iter().zip(bufs.iter_mut()) {
            whole_tensor_reads(&t.name, &t.chunks, buf, &mut reads)?;
        }
        self.read_all(job, step, reads).await?;
        Ok(shard
            .tensors
            .iter()
            .zip(bufs)
            .map(|(t, buf)| {
                progress(buf.len() as u64);
                Tensor::from_entry(t, Bytes::from(buf))
            })
            .collect())
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
        let mut report =
            VerifyReport { job: job.into(), step, chunks_checked: 0, bytes_checked: 0, corrupt: Vec::new() };
        // Distinct chunks in batches of at most VERIFY_BATCH_BYTES, read into one reused buffer.
        let all: Vec<(ChunkHash, u64)> = used_by.iter().map(|(h, (len, _))| (*h, *len)).collect();
        let mut buffer = Vec::new();
        let mut at = 0;
        while at < all.len() {
            let mut end = at;
            let mut bytes = 0u64;
            while end < all.len() && (end == at || bytes + all[end].1 <= VERIFY_BATCH_BYTES) {
                bytes += all[end].1;
                end += 1;
            }
            buffer.resize(bytes as usize, 0);
            let batch: Vec<ChunkRef> = all[at..end].iter().map(|&(hash, len)| ChunkRef { hash, len }).collect();
            let mut reads = Vec::with_capacity(batch.len());
            whole_tensor_reads("verify batch", &batch, &mut buffer, &mut reads)?;
            let (_, failures) = self.read_each(job, step, reads, false).await?;
            let mut failed = HashSet::new();
            for (h, e) in failures {
                match e {
                    ClientError::CorruptChunk { reason, .. } => {
                        failed.insert(h);
                        report.corrupt.push(CorruptChunk { hash: h, used_by: used_by[&h].1.clone(), reason })
                    }
                    ClientError::Protocol(reason) => {
                        failed.insert(h);
                        report.corrupt.push(CorruptChunk { hash: h, used_by: used_by[&h].1.clone(), reason })
                    }
                    other => return Err(other),
                }
            }
            for &(h, len) in &all[at..end] {
                report.chunks_checked += 1;
                if !failed.contains(&h) {
                    report.bytes_checked += len;
                }
                progress(len);
            }
            at = end;
        }
        report.corrupt.sort_by_key(|c| c.hash);
        Ok(report)
    }

    /// Deletes a committed checkpoint. The newest one is refused unless `force`.
    /// Runs retention and garbage collection over `job` (every job with `None`); with
    /// `dry_run`, reports what would go without deleting anything. The answer is ckptd's
    /// report as JSON: `{"jobs": [report]}` for one job; for every job, `POST /v1/gc`'s
    /// `{jobs, failed, not_run}` (a job whose run failed is in `failed`, the others ran).
    pub async fn gc(&self, job: Option<&str>, dry_run: bool) -> Result<serde_json::Value, ClientError> {
        let path = match job {
            Some(j) => {
                validate_job(j)?;
                format!("/v1/jobs/{j}/gc?dry_run={dry_run}")
            }
            None => format!("/v1/gc?dry_run={dry_run}"),
        };
        // A run over millions of objects outlasts `request_timeout`; ckptd finishes it even if
        // this call gives up (six hours is ckptd's default `gc_lock_stale_s`).
        const GC_WAIT: Duration = Duration::from_secs(6 * 3600);
        let bytes = self.http.request_long(reqwest::Method::POST, &path, GC_WAIT).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("gc answer is not JSON: {e}")))?;
        Ok(match job {
            Some(_) => serde_json::json!({ "jobs": [v] }),
            None => v,
        })
    }

    /// Pins (or unpins) a committed checkpoint: retention never deletes a pinned one.
    pub async fn pin(&self, job: &str, step: u64, pinned: bool) -> Result<(), ClientError> {
        validate_job(job)?;
        let path = format!("/v1/jobs/{job}/checkpoints/{step}/pin");
        if !pinned {
            return self.http.delete_idempotent(&path).await;
        }
        self.request(reqwest::Method::PUT, &path, Body::Empty).await.map(|_| ())
    }

    pub async fn delete(&self, job: &str, step: u64, force: bool) -> Result<(), ClientError> {
        validate_job(job)?;
        let q = if force { "?force=true" } else { "" };
        self.http.delete_idempotent(&format!("/v1/jobs/{job}/checkpoints/{step}{q}")).await
    }
}
