//! The object-store adapter: every call ckptd makes to the store goes through here.
//!
//! Design note.
//! * Consistency: the store is the source of truth. Chunks are written with plain puts (a chunk's
//!   key is its content hash, so a rewrite writes the same bytes); the manifest is written with a
//!   create-only put and is the commit point.
//! * Retries: one helper retries transient errors with exponential backoff, each wait at most
//!   `RETRY_DELAY_MAX` and drawn between half and all of its delay (callers that failed
//!   together do not retry together), bounded by `store_attempts_max`; errors that say
//!   something about the object (not found, already exists, precondition) are permanent and
//!   returned at once.
//! * Crash consistency: a local directory is opened with fsync, so a put that returned is on disk
//!   (file and directory entry). A put interrupted by a crash leaves at most a temporary file,
//!   which `keys::parse_key` ignores.
//! * Listings of a local directory are walked here rather than through object_store's local
//!   backend (same objects, a third of the stats; see `list_map`), except behind the fault
//!   injection wrapper, whose armed list faults must fire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ckpt_core::keys;
use ckpt_core::ChunkHash;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store location {location:?}: {reason}")]
    Location { location: String, reason: String },
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("object store: {0}")]
    Other(#[source] object_store::Error),
    /// The store holds an object of another length than its referrer says (found before its
    /// body is read).
    #[error("object {key} is {stored} bytes, its referrer says {expected}")]
    Size { key: String, stored: u64, expected: u64 },
    /// A local directory's removal done but not made durable (its directory's fsync failed).
    #[error("local store: {0}")]
    Durable(#[source] crate::durable::DurableError),
}

impl StoreError {
    fn from_os(e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { path, .. } => StoreError::NotFound(path),
            object_store::Error::AlreadyExists { path, .. } => StoreError::AlreadyExists(path),
            other => StoreError::Other(other),
        }
    }

    /// Whether retrying the same call cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Location { .. }
            | StoreError::NotFound(_)
            | StoreError::AlreadyExists(_)
            | StoreError::Size { .. } => true,
            StoreError::Durable(_) => false,
            StoreError::Other(e) => matches!(
                e,
                object_store::Error::Precondition { .. }
                    | object_store::Error::NotModified { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
        }
    }
}

/// The longest wait between two attempts of a store call. Doubling without a cap would, at 12
/// attempts from 250 ms, wait over four minutes before the last, long after the store recovered.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);

/// Whether a file name in a local store is one of object_store's staged puts (`<key>#<n>`,
/// renamed onto `<key>` when complete): what a crash mid-put leaves behind. Its listings hide
/// them.
pub fn is_staged_put_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(key, n)| !key.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    description: String,
    /// The root directory when the store is a local directory (enables the node-local path).
    local_root: Option<std::path::PathBuf>,
    attempts_max: u32,
    retry_base: Duration,
    /// Set when the store is wrapped in `FaultyStore` (`fault_injection`).
    faults: Option<Arc<crate::faults::Faults>>,
}

impl Store {
    /// Opens `location`: `memory://`, `file:///dir` or a plain directory path (created if
    /// missing; local directories always get fsync), or a cloud store: `s3://bucket[/prefix]`,
    /// `gs://bucket[/prefix]`, `az://container[/prefix]` (also the `https://` forms object_store
    /// recognises). Cloud credentials and endpoints come from each SDK's usual environment
    /// variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), overridden by `options` (object_store's
    /// config keys, e.g. `endpoint`, `allow_http`, `region`).
    pub fn open(
        location: &str,
        options: &BTreeMap<String, String>,
        attempts_max: u32,
        retry_base: Duration,
    ) -> Result<Store, StoreError> {
        let bad = |reason: String| StoreError::Location { location: location.into(), reason };
        let store = |inner: Arc<dyn ObjectStore>, description: String, local_root| Store {
            inner,
            description,
            local_root,
            attempts_max: attempts_max.max(1),
            retry_base,
            faults: None,
        };
        let dir = match classify(location, options).map_err(bad)? {
            Location::Memory => return Ok(store(Arc::new(InMemory::new()), "memory://".into(), None)),
            Location::Cloud(inner, description) => return Ok(store(inner, description, None)),
            Location::Local(dir) => dir,
        };
        crate::durable::ensure_dir(&dir).map_err(|e| bad(e.to_string()))?;
        let dir = dir.canonicalize().map_err(|e| bad(e.to_string()))?;
        // Test-only switch (power-loss audit): a local store that does not fsync.
        let fsync = !crate::switch_armed("store::skip_fsync");
        let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?.with_fsync(fsync);
        Ok(store(Arc::new(fs), format!("file://{}", dir.display()), Some(dir)))
    }

    /// Proves the store honours create-only puts, which the commit relies on: creates a probe
    /// object twice under `jobs/` (not a job name, so no listing sees it) and expects the
    /// second to be refused, then removes it. A store that overwrites (or whose conditional put
    /// is switched off) is refused before anything is committed to it.
    pub async fn check_create_only(&self) -> Result<(), StoreError> {
        let nonce: u128 = rand::random();
        let path = Path::from(format!("{}/.create-only-probe-{nonce:032x}", keys::JOBS_PREFIX));
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.retry("probe_create", || self.inner.put_opts(&path, Bytes::from_static(b"1").into(), opts.clone()))
            .await?;
        let second = self.inner.put_opts(&path, Bytes::from_static(b"2").into(), opts.clone()).await;
        let _ = self.inner.delete(&path).await;
        match second.map_err(StoreError::from_os) {
            Err(StoreError::AlreadyExists(_)) => Ok(()),
            Ok(_) => Err(StoreError::Location {
                location: self.description.clone(),
                reason: "the store overwrote an object on a create-only put; commits would not be atomic".into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The same store behind `FaultyStore`, whose faults `faults()` arms (chaos runs and tests).
    pub fn with_faults(mut self) -> Store {
        let faults = Arc::new(crate::faults::Faults::default());
        self.inner = Arc::new(crate::faults::FaultyStore::new(self.inner, faults.clone()));
        self.faults = Some(faults);
        self
    }

    pub fn faults(&self) -> Option<&Arc<crate::faults::Faults>> {
        self.faults.as_ref()
    }

    /// The store as a canonical URL, recorded in the index so a changed store triggers a rebuild.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local_root.as_deref()
    }

    /// Where chunk `hash` of `job` lives when the store is a local directory (the node-local
    /// path writes it there through `adopt.rs`, with the same guarantees as the store's own put).
    pub fn local_chunk_path(&self, job: &str, hash: &ChunkHash) -> Option<std::path::PathBuf> {
        self.local_root.as_ref().map(|root| root.join(keys::chunk_key(job, hash)))
    }

    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        let mut delay = self.retry_base;
        let mut attempt = 1;
        loop {
            match op().await.map_err(StoreError::from_os) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_permanent() || attempt >= self.attempts_max => return Err(e),
                Err(e) => {
                    tracing::warn!(op = what, attempt, error = %e, "transient store error, retrying");
                    crate::metrics::METRICS
                        .store_retries
                        .add(1, &[opentelemetry::KeyValue::new("op", what.to_string())]);
                    tokio::time::sleep(delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0)).await;
                    delay = delay.saturating_mul(2).min(RETRY_DELAY_MAX);
                    attempt += 1;
                }
            }
        }
    }

    pub async fn put_chunk(
        &self,
        job: &str,
        hash: &ChunkHash,
        header: Bytes,
        payload: Bytes,
    ) -> Result<(), StoreError> {
        let path = Path::from(keys::chunk_key(job, hash));
        self.retry("put_chunk", || {
            let body = PutPayload::from_iter([header.clone(), payload.clone()]);
            self.inner.put(&path, body)
        })
        .await
        .map(|_| ())
    }

    pub async fn get_chunk(&self, job: &str, hash: &ChunkHash) -> Result<Bytes, StoreError> {
        let path = Path::from(keys::chunk_key(job, hash));
        self.retry("get_chunk", || async { self.inner.get(&path).await?.bytes().await }).await
    }

    pub async fn has_chunk(&self, job: &str, hash: &ChunkHash) -> Result<bool, StoreError> {
        let path = Path::from(keys::chunk_key(job, hash));
        match self.retry("head_chunk", || self.inner.head(&path)).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The raw length named by a stored chunk's header, read with a ranged get of the header
    /// alone; `None` when the chunk is not stored.
    pub async fn chunk_raw_len(&self, job: &str, hash: &ChunkHash) -> Result<Option<u64>, StoreError> {
        let path = Path::from(keys::chunk_key(job, hash));
        let head = match self
            .retry("get_chunk_header", || self.inner.get_range(&path, 0..ckpt_core::CHUNK_HEADER_BYTES as u64))
            .await
        {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let head: &[u8; ckpt_core::CHUNK_HEADER_BYTES] = head.as_ref().try_into().map_err(|_| {
            StoreError::Other(object_store::Error::Generic {
                store: "ckpt",
                source: format!("chunk {hash} is shorter than its header").into(),
            })
        })?;
        let header = ckpt_core::ChunkHeader::decode_header(head).map_err(|e| {
            StoreError::Other(object_store::Error::Generic {
                store: "ckpt",
                source: format!("chunk {hash}: {e}").into(),
            })
        })?;
        if header.hash != *hash {
            return Err(StoreError::Other(object_store::Error::Generic {
                store: "ckpt",
                source: format!("chunk {hash}: its header names chunk {}", header.hash).into(),
            }));
        }
        Ok(Some(header.raw_len))
    }

    /// A rank's index object. Content-addressed, so a rewrite writes the same bytes and a plain
    /// put is idempotent; the local store fsyncs it (and any directory it creates) before returning.
    pub async fn put_index_object(&self, job: &str, hash: &ChunkHash, bytes: Bytes) -> Result<(), StoreError> {
        let path = Path::from(keys::index_key(job, hash));
        self.retry("put_index", || self.inner.put(&path, bytes.clone().into())).await.map(|_| ())
    }

    pub async fn get_index_object(&self, job: &str, hash: &ChunkHash) -> Result<Bytes, StoreError> {
        let path = Path::from(keys::index_key(job, hash));
        self.retry("get_index", || async { self.inner.get(&path).await?.bytes().await }).await
    }

    /// An index object a root names, `size` bytes by the root: refused as `Size` when the
    /// store's object has another length, before its body is read (damage may have made it any
    /// length; reading it whole first would hold all of it).
    pub async fn get_index_object_sized(&self, job: &str, hash: &ChunkHash, size: u64) -> Result<Bytes, StoreError> {
        let path = Path::from(keys::index_key(job, hash));
        let got = self
            .retry("get_index", || async {
                let r = self.inner.get(&path).await?;
                if r.meta.size != size {
                    return Ok(Err(r.meta.size));
                }
                r.bytes().await.map(Ok)
            })
            .await?;
        got.map_err(|stored| StoreError::Size { key: path.to_string(), stored, expected: size })
    }

    /// The commit point: create the manifest only if no manifest exists for the step.
    pub async fn create_manifest(&self, job: &str, step: u64, bytes: Bytes) -> Result<(), StoreError> {
        let path = Path::from(keys::manifest_key(job, step));
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.retry("create_manifest", || self.inner.put_opts(&path, bytes.clone().into(), opts.clone()))
            .await
            .map(|_| ())
    }

    pub async fn get_manifest(&self, job: &str, step: u64) -> Result<Bytes, StoreError> {
        let path = Path::from(keys::manifest_key(job, step));
        self.retry("get_manifest", || async { self.inner.get(&path).await?.bytes().await }).await
    }

    /// Deletes a root, durably. A removal a power cut undid would bring the root back after GC
    /// may have swept what only it referenced.
    pub async fn delete_manifest(&self, job: &str, step: u64) -> Result<(), StoreError> {
        self.delete_durably(&keys::manifest_key(job, step)).await
    }

    /// Deletes `key`, durably: on a local directory the removal is fsync'd before this returns
    /// (object_store's fsync covers writes only). For removals that are answered as done one
    /// by one (a root, a pin); many at once (a GC sweep) share one `Coordinator::sync_local_store`.
    pub async fn delete_durably(&self, key: &str) -> Result<(), StoreError> {
        self.delete_key(key).await?;
        let Some(dir) = self.local_root.as_ref().and_then(|root| root.join(key).parent().map(|d| d.to_path_buf()))
        else {
            return Ok(());
        };
        if crate::switch_armed("store::skip_delete_sync") {
            return Ok(());
        }
        let at = dir.clone();
        match tokio::task::spawn_blocking(move || crate::durable::sync_dir(&dir)).await {
            // No directory, no root in it to bring back (a delete of a root already gone).
            Ok(Err(e)) if e.io().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) => Ok(()),
            Ok(r) => r.map_err(StoreError::Durable),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Only a runtime shutting down cancels a blocking task.
            Err(join) => Err(StoreError::Durable(crate::durable::DurableError::Sync {
                path: at,
                source: std::io::Error::other(join.to_string()),
            })),
        }
    }

    pub async fn list_jobs(&self) -> Result<Vec<String>, StoreError> {
        let prefix = Path::from(keys::JOBS_PREFIX);
        let listing = self.retry("list_jobs", || self.inner.list_with_delimiter(Some(&prefix))).await?;
        let mut jobs: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|j| ckpt_core::validate_job(j).is_ok())
            .collect();
        jobs.sort();
        Ok(jobs)
    }

    /// Committed steps of a job, ascending.
    pub async fn list_manifest_steps(&self, job: &str) -> Result<Vec<u64>, StoreError> {
        let owner = job.to_string();
        let mut steps = self
            .list_map("list_manifests", keys::manifests_prefix(job), move |key, _, _| match keys::parse_key(key) {
                Some(keys::ParsedKey::Manifest { job, step }) if job == owner => Some(step),
                _ => None,
            })
            .await?;
        steps.sort_unstable();
        Ok(steps)
    }

    /// Every chunk stored for a job with its stored size, sent to `batches` as the listing goes
    /// (a directory of a local store, a page of `LIST_BATCH` of an object store), so that the
    /// receiver indexes one batch while the next is listed. Stops, without an error, when the
    /// receiver is gone. A retried object-store listing starts again from its first object, so
    /// a chunk can come twice.
    pub async fn list_chunks_batched(
        &self,
        job: &str,
        batches: tokio::sync::mpsc::Sender<Vec<(ChunkHash, u64)>>,
    ) -> Result<(), StoreError> {
        let owner = job.to_string();
        let f = move |key: &str, size, _| match keys::parse_key(key) {
            Some(keys::ParsedKey::Chunk { job, hash }) if job == owner => Some((hash, size)),
            _ => None,
        };
        let prefix = keys::chunks_prefix(job);
        if let Some(root) = self.walkable_root() {
            return walk_blocking(move || walk_local(&root, &prefix, &f, &mut |b| batches.blocking_send(b).is_ok()))
                .await;
        }
        let prefix = Path::from(prefix);
        self.retry("list_chunks", || async {
            let mut pages = self.inner.list(Some(&prefix)).try_chunks(LIST_BATCH);
            while let Some(page) = pages.try_next().await.map_err(|e| e.1)? {
                let batch = page.iter().filter_map(|m| f(m.location.as_ref(), m.size, 0)).collect();
                if batches.send(batch).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
        .await
    }

    /// Small records (pins, leases, GC lists) by key, written with a plain put.
    pub async fn put_record(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = Path::from(key);
        self.retry("put_record", || self.inner.put(&path, bytes.clone().into())).await.map(|_| ())
    }

    /// A record created only if absent (`AlreadyExists` otherwise): a lock.
    pub async fn create_record(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = Path::from(key);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.retry("create_record", || self.inner.put_opts(&path, bytes.clone().into(), opts.clone())).await.map(|_| ())
    }

    /// A record's bytes and modification time (the store's clock, Unix ms); `None` if absent.
    pub async fn get_record(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        let path = Path::from(key);
        let got = self
            .retry("get_record", || async {
                let r = self.inner.get(&path).await?;
                let modified = r.meta.last_modified.timestamp_millis().max(0) as u64;
                Ok((r.bytes().await?, modified))
            })
            .await;
        match got {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// An object's modification time (the store's clock, Unix ms); `None` if absent.
    pub async fn modified_ms(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = Path::from(key);
        match self.retry("head", || self.inner.head(&path)).await {
            Ok(m) => Ok(Some(m.last_modified.timestamp_millis().max(0) as u64)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes an object; one already gone is fine.
    pub async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        let path = Path::from(key);
        match self.retry("delete", || self.inner.delete(&path)).await {
            Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix`: key, stored size, modification time (Unix ms).
    pub async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.list_map("list", prefix.to_string(), |key, size, modified| Some((key.to_string(), size, modified))).await
    }

    /// Every object under `prefix` (a whole path segment, as object_store's listings take it),
    /// mapped by `f(key, stored size, modification time in Unix ms)`; `None` leaves it out.
    /// A local directory is walked here, one stat per file relative to its open directory:
    /// object_store's local listing stats each file three times by its full path and builds a
    /// URL for it, which made a rebuild of 1.5 M chunks take five times the plainest walk.
    /// Its rules are kept: staged puts are hidden, links are followed, an entry removed
    /// while the walk runs is skipped. A store wrapped for fault injection lists through the
    /// wrapper, so armed list faults fire.
    async fn list_map<T, F>(&self, what: &str, prefix: String, f: F) -> Result<Vec<T>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&str, u64, u64) -> Option<T> + Send + Sync + 'static,
    {
        if let Some(root) = self.walkable_root() {
            return walk_blocking(move || {
                let mut all = Vec::new();
                walk_local(&root, &prefix, &f, &mut |batch| {
                    all.extend(batch);
                    true
                })?;
                Ok(all)
            })
            .await;
        }
        let prefix = Path::from(prefix);
        let f = &f;
        self.retry(what, || {
            self.inner
                .list(Some(&prefix))
                .try_filter_map(|m| {
                    let ms = m.last_modified.timestamp_millis().max(0) as u64;
                    futures::future::ready(Ok(f(m.location.as_ref(), m.size, ms)))
                })
                .try_collect::<Vec<_>>()
        })
        .await
    }

    /// A cheap call that proves the store answers.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let prefix = Path::from(keys::JOBS_PREFIX);
        self.inner.list_with_delimiter(Some(&prefix)).await.map(|_| ()).map_err(StoreError::from_os)
    }

    /// The root a listing walks itself (see `list_map`): a local directory not wrapped for
    /// fault injection.
    fn walkable_root(&self) -> Option<std::path::PathBuf> {
        self.local_root.clone().filter(|_| self.faults.is_none())
    }
}

/// Objects an object-store listing hands on at once (`Store::list_chunks_batched`).
const LIST_BATCH: usize = 4096;

/// Runs a walk of a local store off the async runtime, its I/O errors as the store's.
async fn walk_blocking<T: Send + 'static>(
    walk: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(walk)
        .await
        .map_err(|e| StoreError::Other(object_store::Error::JoinError { source: e }))?
        .map_err(|e| StoreError::Other(object_store::Error::Generic { store: "LocalFileSystem", source: e.into() }))
}

/// Whether object_store's local listing hides a file of this name: a staged put, `<key>#<n>`
/// split at the first `#` (`is_staged_put_name`, for ckptd's own clean-up, splits at the last).
fn listing_hides(name: &str) -> bool {
    name.split_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `Store::list_map` on a local directory store rooted at `root`. What `f` keeps goes to
/// `emit` a directory at a time; the walk stops when `emit` says false. A directory that
/// contains itself through a link is an error, as it is to object_store's listing.
fn walk_local<T>(
    root: &std::path::Path,
    prefix: &str,
    f: &impl Fn(&str, u64, u64) -> Option<T>,
    emit: &mut dyn FnMut(Vec<T>) -> bool,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::unix::fs::MetadataExt;
    // Gone between its listing and its stat: removed mid-walk, which a listing skips.
    let gone = |e: &std::io::Error| matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory);
    // Each directory to read, with the (device, inode) of each directory above it.
    let mut dirs = vec![(prefix.trim_matches('/').to_string(), Vec::<(u64, u64)>::new())];
    let mut key = String::new();
    while let Some((dir, mut above)) = dirs.pop() {
        let path = root.join(&dir);
        let here = match std::fs::metadata(&path) {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if above.contains(&here) {
            return Err(std::io::Error::other(format!("filesystem loop: {} contains itself", path.display())));
        }
        above.push(here);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            // Keys are UTF-8; a name that is not cannot be one (object_store's listing fails on it).
            let Ok(name) = entry.file_name().into_string() else { continue };
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let meta = if kind.is_dir() {
                None
            } else if kind.is_symlink() {
                // A broken link is left out, as object_store's listing leaves it out.
                std::fs::metadata(entry.path()).ok()
            } else {
                match entry.metadata() {
                    Ok(m) => Some(m),
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e),
                }
            };
            key.clear();
            if !dir.is_empty() {
                key.push_str(&dir);
                key.push('/');
            }
            key.push_str(&name);
            match meta {
                Some(m) if m.is_file() => {
                    if listing_hides(&name) {
                        continue;
                    }
                    let modified = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                    found.extend(f(&key, m.len(), modified));
                }
                Some(m) if !m.is_dir() => {}
                _ if kind.is_dir() || kind.is_symlink() => dirs.push((key.clone(), above.clone())),
                _ => {}
            }
        }
        if !found.is_empty() && !emit(found) {
            break;
        }
    }
    Ok(())
}

/// Checks a store location and its options without any I/O: a cloud URL must build (scheme,
/// bucket, option keys); a local path must not name a file.
pub fn check_location(location: &str, options: &BTreeMap<String, String>) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::Location { location: location.into(), reason };
    if let Location::Local(path) = classify(location, options).map_err(bad)? {
        if path.is_file() {
            return Err(bad("names a file, not a directory".into()));
        }
    }
    Ok(())
}

/// What a store location names; building a cloud store does no I/O.
enum Location {
    Memory,
    Local(std::path::PathBuf),
    Cloud(Arc<dyn ObjectStore>, String),
}

/// The one parse of a store location, for `Store::open` and `check_location`.
fn classify(location: &str, options: &BTreeMap<String, String>) -> Result<Location, String> {
    if location == "memory://" {
        return Ok(Location::Memory);
    }
    let dir = if let Some(rest) = location.strip_prefix("file://") {
        let url = url::Url::parse(location).map_err(|e| e.to_string())?;
        url.to_file_path().map_err(|_| format!("{rest:?} is not an absolute local path"))?
    } else if location.contains("://") {
        let (inner, description) = open_cloud(location, options)?;
        return Ok(Location::Cloud(inner, description));
    } else {
        std::path::PathBuf::from(location)
    };
    if !options.is_empty() {
        return Err("store_options apply to cloud stores only".into());
    }
    Ok(Location::Local(dir))
}

/// A cloud store from its URL: the scheme's builder reads its SDK's environment, `options`
/// override it, and a path after the bucket becomes a key prefix. The description keeps the
/// URL without credentials (object_store reads those from the environment and options only).
fn open_cloud(location: &str, options: &BTreeMap<String, String>) -> Result<(Arc<dyn ObjectStore>, String), String> {
    use object_store::ObjectStoreScheme;
    let url = url::Url::parse(location).map_err(|e| e.to_string())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the store URL; use the environment or store_options".into());
    }
    let (scheme, prefix) = ObjectStoreScheme::parse(&url)
        .map_err(|_| "this URL scheme is not supported; use s3://, gs://, az://, file:// or a directory".to_string())?;
    let prefix = Path::parse(prefix).map_err(|e| e.to_string())?;
    let unknown = |k: &str, e: object_store::Error| format!("store option {k:?}: {e}");
    let inner: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(location);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|e| unknown(k, e))?, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(location);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|e| unknown(k, e))?, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(location);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|e| unknown(k, e))?, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        other => {
            return Err(format!("{other:?} stores are not supported; use s3://, gs://, az://, file:// or a directory"))
        }
    };
    let inner = if prefix.parts().count() == 0 { inner } else { Arc::new(PrefixStore::new(inner, prefix)) };
    let mut shown = url.clone();
    shown.set_query(None);
    Ok((inner, shown.to_string().trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
        v.sort();
        v
    }

    /// The local walk must list what object_store's own local listing lists (the store wrapped
    /// for fault injection lists through it), on a directory holding what a store can: objects
    /// at several depths, a staged put a crash left, a temporary file of an adopt, links, and
    /// names that share a prefix without sharing its segment.
    #[tokio::test]
    async fn the_local_walk_lists_what_object_stores_listing_lists() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &BTreeMap::new(), 1, Duration::from_millis(1)).unwrap();
        let wrapped = store.clone().with_faults();
        for (job, n) in [("a", 40u8), ("ab", 3)] {
            for i in 0..n {
                let hash = ChunkHash::of(&[i, n]);
                store.put_chunk(job, &hash, Bytes::new(), Bytes::from(vec![i; i as usize])).await.unwrap();
            }
            for step in [1u64, 20] {
                store.put_record(&keys::manifest_key(job, step), Bytes::from_static(b"{}")).await.unwrap();
            }
        }
        let root = store.local_root().unwrap().to_path_buf();
        let fanout = root.join(keys::chunk_key("a", &ChunkHash::of(&[0, 40]))).parent().unwrap().to_path_buf();
        std::fs::write(fanout.join("0123#7"), b"staged").unwrap();
        std::fs::write(fanout.join(".tmp-adopt-1"), b"temp").unwrap();
        std::fs::write(root.join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("outside"), fanout.join("linked")).unwrap();
        std::os::unix::fs::symlink(root.join("missing"), fanout.join("broken")).unwrap();
        std::fs::create_dir_all(root.join("jobs/a/chunks/zz/empty")).unwrap();
        std::fs::write(root.join("jobs/a/chunks/zz/x#y#3"), b"listed").unwrap();
        std::fs::write(root.join("jobs/a/chunks/zz/#4"), b"hidden").unwrap();
        // A linked directory is walked into, as object_store follows it.
        std::os::unix::fs::symlink(root.join("jobs/ab/chunks"), fanout.join("linked-dir")).unwrap();

        for prefix in ["jobs/a", "jobs/a/chunks", "jobs/ab/", "jobs", "jobs/none", "outside", ""] {
            let walked = sorted(store.list_meta(prefix).await.unwrap());
            let listed = sorted(wrapped.list_meta(prefix).await.unwrap());
            assert_eq!(walked, listed, "prefix {prefix:?}");
        }
        let walked = sorted(store.list_meta("jobs/a").await.unwrap());
        assert!(walked.iter().any(|(k, _, _)| k.ends_with("/.tmp-adopt-1")) && walked.len() > 40, "{walked:?}");
        assert!(walked.iter().any(|(k, _, _)| k.contains("/linked-dir/")), "{walked:?}");
        assert!(
            !walked.iter().any(|(k, _, _)| k.ends_with("#7") || k.ends_with("/#4") || k.ends_with("/broken")),
            "{walked:?}"
        );
        // A directory that contains itself through a link fails both listings.
        std::os::unix::fs::symlink(root.join("jobs/ab"), root.join("jobs/ab/loop")).unwrap();
        let (walked, listed) = (store.list_meta("jobs/ab").await, wrapped.list_meta("jobs/ab").await);
        assert!(walked.is_err() && listed.is_err(), "a link loop: walked {walked:?}, listed {listed:?}");
        std::fs::remove_file(root.join("jobs/ab/loop")).unwrap();

        async fn listed_chunks(store: &Store, job: &str) -> Vec<(ChunkHash, u64)> {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let listing = store.list_chunks_batched(job, tx);
            let collect = async {
                let mut all = Vec::new();
                while let Some(batch) = rx.recv().await {
                    all.extend(batch);
                }
                all
            };
            let (listed, all) = tokio::join!(listing, collect);
            listed.unwrap();
            sorted(all)
        }
        for job in ["a", "ab"] {
            let chunks = listed_chunks(&store, job).await;
            assert_eq!(chunks, listed_chunks(&wrapped, job).await);
            assert_eq!(chunks.len(), if job == "a" { 40 } else { 3 });
            assert_eq!(store.list_manifest_steps(job).await.unwrap(), vec![1, 20]);
            assert_eq!(wrapped.list_manifest_steps(job).await.unwrap(), vec![1, 20]);
        }
    }
}
