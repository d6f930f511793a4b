//! The local index and journal, in sled.
//!
//! Design note.
//! * What it holds: which chunks of each job are known durable (with their raw length), a copy
//!   of every committed root (for listings and fast reads), and the journal of in-flight saves:
//!   each save's fields under one key and each rank's shard index under its own, so accepting an
//!   index writes O(1) bytes whatever the world size.
//! * Consistency: the object store is the source of truth; this index is a cache of it plus the
//!   journal. Chunks are recorded only after their put returned; manifests only after their
//!   create returned. A chunk the index does not know is looked up in the store before anyone
//!   is told it is missing, so a lagging index costs a re-check, never a wrong answer.
//! * Crash consistency: sled syncs in the background, so the journal is flushed before a request
//!   that changed it is acked. sled's flush is a `sync_file_range` of its log: it neither
//!   flushes the disk's write cache nor persists the file's size, and sled writes values past
//!   its blob threshold (large shard indexes) to files of their own that it never fsyncs. So a
//!   flush here is sled's, then a `syncfs` of the index's filesystem (the group sync of
//!   `durable::FsSync`), which makes the log, the blobs and their directory entries durable. Flushes are grouped: a caller whose writes a flush already in
//!   progress cannot cover waits for the next one, and one flush serves every caller that
//!   wrote before it started, so thousands of concurrent index puts share a handful of syncs. Chunk records are not flushed per put (the store answers for
//!   them after a crash). On start, `Coordinator::recover` reconciles the index with the store:
//!   a missing or foreign index is rebuilt from the store's listings.
//! * Stored bytes per job, kept only where a tenant has a stored-bytes quota (the pass at open
//!   costs about 1.3 s per million chunk records, which a node without quotas need not pay on
//!   every restart): counted once when the index opens (one pass over the chunk records), then
//!   kept in memory, moved by the old value that each chunk record's insert or remove
//!   returns (exact under concurrent writers, with no transaction and no lock around sled), so
//!   a tenant's usage (its quota) is a pass over its jobs, not over every chunk record. Nothing
//!   of it is stored, so a crash, or an older ckptd writing this index, cannot leave a stale
//!   count behind.
//! * Damage: sled checks what it reads against CRCs, at open only for its log's tail, so a
//!   blob or log page a power cut damaged is found by the first read of it. The roots and the
//!   journal are read whole at open (`read_whole`), where start-up can still set the index
//!   aside and rebuild it in the same process (about 1.5 MB a checkpoint of 16,384 ranks; the
//!   chunk records, millions, are not: a pass costs seconds on every start). Damage met later
//!   by any method that touches sled (they all run inside `watched`; a panic of sled's counts
//!   too) is kept (`damage_found`, `damaged`) and marked durably in the index's directory
//!   (`damage-found`) before anyone hears of it, and an index so marked is refused as damaged
//!   at its next open. ckptd stops on it, and its next start sets the index aside (`lib.rs`).
//!   Until then each read of the damaged entry fails; the other entries still answer. (Where
//!   a tenant has a stored-bytes quota, the count at open reads every chunk record too.)
//! * All methods block; async callers run them on blocking threads.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ckpt_core::{ChunkHash, SaveState, ShardIndex};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Sled(#[from] sled::Error),
    /// `at`: where the damage was met (the method that read it; at open, the marker).
    #[error("the index is damaged ({at}): {reason}")]
    Damaged { at: String, reason: String },
    #[error("this index was opened without counting stored bytes (no tenant has a stored-bytes quota)")]
    NotCounted,
    #[error("index: {0}")]
    Durable(#[from] crate::durable::DurableError),
    #[error("index: the sync task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("index: cannot encode {what}: {reason}")]
    Encode { what: String, reason: String },
}

impl IndexError {
    /// Whether the index's own bytes are unreadable (as opposed to the disk being full, the
    /// directory locked by another process or not permitted): what a rebuild can cure. sled
    /// reports a format it does not know as `Unsupported` too, so a sled upgrade that changed
    /// its format would read as damage: Cargo.lock pins it, and such an upgrade needs a
    /// migration of its own.
    pub fn is_damage(&self) -> bool {
        match self {
            IndexError::Damaged { .. } => true,
            IndexError::Sled(
                sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_),
            ) => true,
            // NotFound: a blob file whose directory entry a power cut lost.
            IndexError::Sled(sled::Error::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData | std::io::ErrorKind::NotFound
            ),
            _ => false,
        }
    }

    /// `op: error` when this is damage (see `is_damage`): what `watched` keeps and marks.
    fn damage_met_in(&self, op: &str) -> Option<String> {
        self.is_damage().then(|| format!("{op}: {self}"))
    }
}

/// A journalled save that could not be read: `job@step` (or the raw key) and why.
pub type Unreadable = (String, String);

#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    chunks: sled::Tree,
    /// Stored bytes of each job's chunk records, when counted (see the design note).
    job_bytes: Option<Arc<Mutex<HashMap<String, i64>>>>,
    manifests: sled::Tree,
    saves: sled::Tree,
    save_ranks: sled::Tree,
    flushes: Arc<GroupFlush>,
    /// The index's filesystem, synced after each sled flush (see the design note).
    fs: Arc<crate::durable::FsSync>,
    damage: Arc<DamageFound>,
}

/// The file whose presence marks an index damaged (see the design note).
const DAMAGE_MARKER: &str = "damage-found";

/// The first damage a read of the index met (see the design note).
struct DamageFound {
    marker: std::path::PathBuf,
    /// Taken by the first finder, which marks the index before it publishes `first`.
    claimed: std::sync::atomic::AtomicBool,
    first: tokio::sync::watch::Sender<Option<String>>,
}

impl DamageFound {
    /// Keeps and marks `reason` if it is the first damage found. Blocks (the marker's fsync).
    fn found(&self, reason: String) {
        if self.claimed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(damage = reason, "the index is damaged; marked, so that its next open refuses it");
        // Marked before anyone hears of it: whoever stops on it stops with the mark durable.
        if let Err(e) = crate::durable::write_new(&self.marker, |f| std::io::Write::write_all(f, reason.as_bytes())) {
            // Unmarked, the next start may serve until it meets the damage again.
            tracing::error!(error = %e, marker = %self.marker.display(), "cannot mark the damaged index");
        }
        self.first.send_replace(Some(reason));
    }
}

/// Group commit of sled flushes (see the design note).
#[derive(Default)]
struct GroupFlush {
    /// Counts callers that asked for a flush; a flush covers every ticket issued before it began.
    tickets: AtomicU64,
    /// The highest ticket a completed flush covers.
    covered: AtomicU64,
    /// Held while a flush runs.
    running: tokio::sync::Mutex<()>,
    flushes: AtomicU64,
}

/// A durable chunk as the index knows it. `raw_len` is unknown for records rebuilt from a
/// listing (the listing gives the stored size only); callers read the chunk's header then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub stored_len: u64,
    pub raw_len: Option<u64>,
}

const RAW_LEN_UNKNOWN: u64 = u64::MAX;

const STORE_KEY: &[u8] = b"store";
fn le_u64(v: &[u8]) -> u64 {
    v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

fn job_key(job: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(job.len() + 1 + suffix.len());
    k.extend_from_slice(job.as_bytes());
    k.push(0);
    k.extend_from_slice(suffix);
    k
}

fn job_prefix(job: &str) -> Vec<u8> {
    job_key(job, &[])
}

fn split_step_key(key: &[u8]) -> Option<(String, u64)> {
    let nul = key.iter().position(|&b| b == 0)?;
    let job = std::str::from_utf8(&key[..nul]).ok()?.to_string();
    let step: [u8; 8] = key[nul + 1..].try_into().ok()?;
    Some((job, u64::from_be_bytes(step)))
}

fn rank_key(job: &str, step: u64, rank: u32) -> Vec<u8> {
    let mut k = job_key(job, &step.to_be_bytes());
    k.extend_from_slice(&rank.to_be_bytes());
    k
}

/// Every job's stored bytes, from one pass over the chunk records (at open, before anyone else
/// can write).
fn count_job_bytes(chunks: &sled::Tree) -> Result<HashMap<String, i64>, IndexError> {
    let mut totals = HashMap::<String, i64>::new();
    for kv in chunks.iter() {
        let (k, v) = kv?;
        let Some(nul) = k.iter().position(|&b| b == 0) else { continue };
        let total = totals.entry(String::from_utf8_lossy(&k[..nul]).into_owned()).or_default();
        *total = total.saturating_add(le_u64(&v) as i64);
    }
    Ok(totals)
}

/// A chunk record: its stored length, then its raw length (`RAW_LEN_UNKNOWN` if not known).
fn chunk_value(stored_len: u64, raw_len: Option<u64>) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&stored_len.to_le_bytes());
    v[8..].copy_from_slice(&raw_len.unwrap_or(RAW_LEN_UNKNOWN).to_le_bytes());
    v
}

/// Reads every entry of `tree`, so that damage sled would find only when a page is read (a
/// blob or a log segment a power cut left zeroed: it checks their CRCs then, not at open) is
/// found at open, where the index can still be set aside and rebuilt in the same process. The
/// roots and the journal are read whole this way; the chunk records, millions of small entries
/// at about 1.3 s per million, are not (damage met in them later stops ckptd, see `watched`).
fn read_whole(name: &str, tree: &sled::Tree) -> Result<(), IndexError> {
    for entry in tree.iter() {
        if let Err(e) = entry.map(std::hint::black_box) {
            let e = IndexError::from(e);
            return Err(match e.is_damage() {
                true => IndexError::Damaged { at: format!("open, reading the {name} tree"), reason: e.to_string() },
                false => e,
            });
        }
    }
    Ok(())
}

impl Index {
    /// Opens (or creates) the index in `dir`; sled's page cache holds at most `cache_bytes`.
    /// With `count_stored_bytes`, each job's stored bytes are counted now and kept
    /// (`stored_bytes_where`).
    pub fn open(dir: &Path, cache_bytes: u64, count_stored_bytes: bool) -> Result<Index, IndexError> {
        crate::durable::ensure_dir(dir)?;
        let marker = dir.join(DAMAGE_MARKER);
        if std::fs::symlink_metadata(&marker).is_ok() {
            let found = std::fs::read_to_string(&marker).unwrap_or_else(|e| format!("the marker is unreadable: {e}"));
            return Err(IndexError::Damaged { at: "marked while in use".into(), reason: found });
        }
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).open()?;
        let fs = crate::durable::FsSync::open(dir)?;
        // What sled created or recovered at open is durable before anything is acked.
        fs.sync()?;
        let chunks = db.open_tree("chunks")?;
        let job_bytes = if count_stored_bytes { Some(Arc::new(Mutex::new(count_job_bytes(&chunks)?))) } else { None };
        let (manifests, saves, save_ranks) =
            (db.open_tree("manifests")?, db.open_tree("saves")?, db.open_tree("save_ranks")?);
        for (name, tree) in [("manifests", &manifests), ("saves", &saves), ("save_ranks", &save_ranks)] {
            read_whole(name, tree)?;
        }
        let damage = Arc::new(DamageFound {
            marker,
            claimed: std::sync::atomic::AtomicBool::new(false),
            first: tokio::sync::watch::Sender::new(None),
        });
        Ok(Index {
            chunks,
            job_bytes,
            manifests,
            saves,
            save_ranks,
            flushes: Arc::new(GroupFlush::default()),
            fs: Arc::new(fs),
            damage,
            db,
        })
    }

    /// Moves `job`'s count from a record of `old` to one of `new` (None: no record). Counts are
    /// added and taken in any order, so concurrent writers of one record still sum exactly: each
    /// one's `old` is what the previous one left.
    fn count(&self, job: &str, old: Option<&[u8]>, new: Option<&[u8]>) {
        let Some(job_bytes) = &self.job_bytes else { return };
        let (old, new) = (old.map_or(0, le_u64) as i64, new.map_or(0, le_u64) as i64);
        if old == new {
            return;
        }
        let mut counts = job_bytes.lock().unwrap_or_else(|e| e.into_inner());
        // Signed: a remove's subtraction may land before the addition of the put it follows;
        // readers see such a moment as zero.
        let total = match counts.get_mut(job) {
            Some(t) => t,
            None => counts.entry(job.to_string()).or_default(),
        };
        *total = total.saturating_add(new - old);
        if *total == 0 {
            counts.remove(job);
        }
    }

    /// Writes (`Some`) or removes (`None`) one chunk record, and counts the change.
    /// Returns whether a record was there before.
    fn set_chunk_record(&self, job: &str, hash: &ChunkHash, value: Option<[u8; 16]>) -> Result<bool, IndexError> {
        let key = job_key(job, &hash.0);
        let old = match value {
            Some(v) => self.chunks.insert(key, &v)?,
            None => self.chunks.remove(key)?,
        };
        self.count(job, old.as_deref(), value.as_ref().map(|v| v.as_slice()));
        Ok(old.is_some())
    }

    /// The first damage found since open: `op: error`.
    pub fn damage_found(&self) -> Option<String> {
        self.damage.first.borrow().clone()
    }

    /// Waits for the first damage found, and returns it.
    pub async fn damaged(&self) -> String {
        let mut found = self.damage.first.subscribe();
        let kept = found.wait_for(Option::is_some).await.ok().and_then(|d| d.clone());
        match kept {
            Some(d) => d,
            // Never: the sender lives as long as this index.
            None => std::future::pending().await,
        }
    }

    /// Runs `f`, the body of `op`, and keeps the damage it meets (see the design note).
    fn watched<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T, IndexError>) -> Result<T, IndexError> {
        // Test-only: `FAILPOINTS=ckptd::index::damaged=return(<op>)` makes `op` meet damage.
        let injected = (|| {
            fail::fail_point!("ckptd::index::damaged", |named: Option<String>| named.as_deref() == Some(op));
            false
        })();
        let r = match injected {
            true => Err(IndexError::Damaged { at: op.into(), reason: "injected (ckptd::index::damaged)".into() }),
            // sled panics on some damage rather than returning it. A bug of ours in a method
            // body would be taken for damage too: the index is then rebuilt, which costs time,
            // never a checkpoint (the store holds them all).
            false => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                let reason = format!("panicked (in sled, or a bug): {}", what.unwrap_or_default());
                Err(IndexError::Damaged { at: op.into(), reason })
            }),
        };
        if let Some(reason) = r.as_ref().err().and_then(|e| e.damage_met_in(op)) {
            self.damage.found(reason);
        }
        r
    }

    /// Makes every write this caller made before the call durable, sharing the sync with
    /// concurrent callers.
    pub async fn flush(&self) -> Result<(), IndexError> {
        let r = self.grouped_flush().await;
        if let Some(reason) = r.as_ref().err().and_then(|e| e.damage_met_in("flush")) {
            let damage = self.damage.clone();
            // The damage is the answer, even where the marking task cannot run.
            let _ = tokio::task::spawn_blocking(move || damage.found(reason)).await;
        }
        r
    }

    async fn grouped_flush(&self) -> Result<(), IndexError> {
        let g = &self.flushes;
        let ticket = g.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = g.running.lock().await;
        if g.covered.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket issued so far belongs to a caller that finished its writes before taking it.
        let covers = g.tickets.load(Ordering::SeqCst);
        self.db.flush_async().await?;
        let fs = self.fs.clone();
        tokio::task::spawn_blocking(move || fs.sync()).await??;
        g.flushes.fetch_add(1, Ordering::Relaxed);
        g.covered.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    /// Syncs done since start-up (for stats and the scale benchmark).
    pub fn flush_count(&self) -> u64 {
        self.flushes.flushes.load(Ordering::Relaxed)
    }

    /// The store this index describes, if it was ever reconciled with one.
    pub fn store_description(&self) -> Result<Option<String>, IndexError> {
        self.watched("store_description", || {
            Ok(self.db.get(STORE_KEY)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
        })
    }

    pub fn set_store_description(&self, d: &str) -> Result<(), IndexError> {
        self.watched("set_store_description", || {
            self.db.insert(STORE_KEY, d.as_bytes())?;
            Ok(())
        })
    }

    /// The generation fence of `job`, if one was set.
    pub fn fence(&self, job: &str) -> Result<Option<u64>, IndexError> {
        self.watched("fence", || Ok(self.db.get(fence_key(job))?.and_then(|v| be_u64(&v))))
    }

    /// Every job's fence in this index.
    pub fn fences(&self) -> Result<Vec<(String, u64)>, IndexError> {
        self.watched("fences", || {
            let mut out = Vec::new();
            for kv in self.db.scan_prefix(FENCE_PREFIX) {
                let (k, v) = kv?;
                if let (Ok(job), Some(f)) = (std::str::from_utf8(&k[FENCE_PREFIX.len()..]), be_u64(&v)) {
                    out.push((job.to_string(), f));
                }
            }
            Ok(out)
        })
    }

    /// Raises the job's fence to `epoch`, never lowers it (two raises at once leave the higher),
    /// and returns the fence now stored.
    pub fn raise_fence(&self, job: &str, epoch: u64) -> Result<u64, IndexError> {
        self.watched("raise_fence", || {
            let stored = self.db.update_and_fetch(fence_key(job), |old| {
                Some(old.and_then(be_u64).unwrap_or(0).max(epoch).to_be_bytes().to_vec())
            })?;
            Ok(stored.and_then(|v| be_u64(&v)).unwrap_or(epoch))
        })
    }

    /// Forgets everything; used before a rebuild from the store. Fences stay: one raised by a
    /// ckptd that kept it only here (an older release, or a raise whose store record failed) is
    /// not in the store until start-up copies it there, and forgetting it would let a replaced
    /// generation write again.
    pub fn clear(&self) -> Result<(), IndexError> {
        self.watched("clear", || {
            // The store's identity first: a crash part-way leaves an index that is rebuilt again.
            self.db.remove(STORE_KEY)?;
            self.chunks.clear()?;
            if let Some(job_bytes) = &self.job_bytes {
                job_bytes.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            self.manifests.clear()?;
            self.saves.clear()?;
            self.save_ranks.clear()?;
            Ok(())
        })
    }

    pub fn has_chunk(&self, job: &str, hash: &ChunkHash) -> Result<bool, IndexError> {
        self.watched("has_chunk", || Ok(self.chunks.contains_key(job_key(job, &hash.0))?))
    }

    pub fn put_chunk(
        &self,
        job: &str,
        hash: &ChunkHash,
        stored_len: u64,
        raw_len: Option<u64>,
    ) -> Result<(), IndexError> {
        self.watched("put_chunk", || self.set_chunk_record(job, hash, Some(chunk_value(stored_len, raw_len))).map(drop))
    }

    /// `put_chunk` for each of a batch (raw lengths unknown), in key order: a rebuild from the
    /// store. Returns how many were not already recorded.
    pub fn put_chunks(&self, job: &str, batch: &mut [(ChunkHash, u64)]) -> Result<usize, IndexError> {
        self.watched("put_chunks", || {
            // sled inserts in key order touch one leaf after another; a listing's order is random.
            batch.sort_unstable_by_key(|(h, _)| *h);
            let mut added = 0;
            for (hash, stored_len) in batch.iter() {
                added += usize::from(!self.set_chunk_record(job, hash, Some(chunk_value(*stored_len, None)))?);
            }
            Ok(added)
        })
    }

    pub fn get_chunk(&self, job: &str, hash: &ChunkHash) -> Result<Option<ChunkRecord>, IndexError> {
        self.watched("get_chunk", || {
            let Some(v) = self.chunks.get(job_key(job, &hash.0))? else { return Ok(None) };
            // Records written before raw lengths were kept hold the stored length alone.
            let stored_len = le_u64(&v);
            let raw_len = v.get(8..16).map(le_u64).filter(|&r| r != RAW_LEN_UNKNOWN);
            Ok(Some(ChunkRecord { stored_len, raw_len }))
        })
    }

    /// Forgets chunk records (GC deleted the chunks; a later lookup asks the store).
    pub fn remove_chunks(&self, job: &str, hashes: &[ChunkHash]) -> Result<(), IndexError> {
        self.watched("remove_chunks", || {
            for h in hashes {
                self.set_chunk_record(job, h, None)?;
            }
            Ok(())
        })
    }

    /// Forgets every chunk record of a job (a GC sweep this node did not see happened).
    pub fn clear_job_chunks(&self, job: &str) -> Result<usize, IndexError> {
        self.watched("clear_job_chunks", || {
            let prefix = job_prefix(job);
            let keys: Vec<_> = self.chunks.scan_prefix(&prefix).keys().collect::<Result<_, _>>()?;
            for k in &keys {
                let hash = k[prefix.len()..].try_into().ok().map(ChunkHash);
                match hash {
                    Some(h) => {
                        self.set_chunk_record(job, &h, None)?;
                    }
                    None => {
                        self.chunks.remove(k)?;
                    }
                }
            }
            Ok(keys.len())
        })
    }

    /// Keeps `id` as this node's id (the one `<data_dir>/node_id` holds; see `lib.rs`).
    pub fn set_node_id(&self, id: &str) -> Result<(), IndexError> {
        self.watched("set_node_id", || {
            self.db.insert(b"node_id", id.as_bytes())?;
            Ok(())
        })
    }

    /// This node's id, made once (random) and kept: it names the node's save leases.
    pub fn node_id(&self) -> Result<String, IndexError> {
        self.watched("node_id", || {
            if let Some(v) = self.db.get(b"node_id")? {
                return Ok(String::from_utf8_lossy(&v).into_owned());
            }
            let id = format!("{:016x}", rand::random::<u64>());
            self.db.insert(b"node_id", id.as_bytes())?;
            Ok(id)
        })
    }

    /// The last GC sweep of `job` this node applied to its chunk records.
    pub fn gc_seen(&self, job: &str) -> Result<u64, IndexError> {
        self.watched("gc_seen", || {
            let key = [b"gcseen\0".as_slice(), job.as_bytes()].concat();
            Ok(self.db.get(key)?.and_then(|v| be_u64(&v)).unwrap_or(0))
        })
    }

    pub fn set_gc_seen(&self, job: &str, seq: u64) -> Result<(), IndexError> {
        self.watched("set_gc_seen", || {
            let key = [b"gcseen\0".as_slice(), job.as_bytes()].concat();
            self.db.insert(key, &seq.to_be_bytes())?;
            Ok(())
        })
    }

    /// Stored bytes of the durable chunks of every job `pred` accepts: one counter per job
    /// (a tenant's usage), so the cost grows with the number of jobs, not of chunks.
    /// [`IndexError::NotCounted`] unless the index was opened counting them.
    pub fn stored_bytes_where(&self, pred: impl Fn(&str) -> bool) -> Result<u64, IndexError> {
        let counts = self.job_bytes.as_ref().ok_or(IndexError::NotCounted)?.lock().unwrap_or_else(|e| e.into_inner());
        Ok(counts.iter().filter(|(job, _)| pred(job)).fold(0u64, |t, (_, b)| t.saturating_add((*b).max(0) as u64)))
    }

    pub fn put_manifest(&self, job: &str, step: u64, bytes: &[u8]) -> Result<(), IndexError> {
        self.watched("put_manifest", || {
            self.manifests.insert(job_key(job, &step.to_be_bytes()), bytes)?;
            Ok(())
        })
    }

    pub fn get_manifest(&self, job: &str, step: u64) -> Result<Option<Vec<u8>>, IndexError> {
        self.watched("get_manifest", || Ok(self.manifests.get(job_key(job, &step.to_be_bytes()))?.map(|v| v.to_vec())))
    }

    pub fn remove_manifest(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.watched("remove_manifest", || {
            self.manifests.remove(job_key(job, &step.to_be_bytes()))?;
            Ok(())
        })
    }

    /// Committed steps of a job, ascending (keys are big-endian, so sled's order is step order).
    pub fn manifest_steps(&self, job: &str) -> Result<Vec<u64>, IndexError> {
        self.watched("manifest_steps", || {
            let mut steps = Vec::new();
            for kv in self.manifests.scan_prefix(job_prefix(job)) {
                let (k, _) = kv?;
                if let Some((_, step)) = split_step_key(&k) {
                    steps.push(step);
                }
            }
            Ok(steps)
        })
    }

    /// The newest committed step of `job` before `step`.
    pub fn committed_before(&self, job: &str, step: u64) -> Result<Option<u64>, IndexError> {
        self.watched("committed_before", || {
            let range = job_key(job, &0u64.to_be_bytes())..job_key(job, &step.to_be_bytes());
            match self.manifests.range(range).next_back() {
                Some(kv) => Ok(split_step_key(&kv?.0).map(|(_, s)| s)),
                None => Ok(None),
            }
        })
    }

    /// Every (job, step) with a manifest in the index.
    pub fn all_manifests(&self) -> Result<Vec<(String, u64)>, IndexError> {
        self.watched("all_manifests", || {
            let mut out = Vec::new();
            for kv in self.manifests.iter() {
                let (k, _) = kv?;
                if let Some(js) = split_step_key(&k) {
                    out.push(js);
                }
            }
            Ok(out)
        })
    }

    pub fn jobs(&self) -> Result<Vec<String>, IndexError> {
        self.watched("jobs", || {
            let mut jobs = std::collections::BTreeSet::new();
            for tree in [&self.manifests, &self.saves] {
                for kv in tree.iter() {
                    let (k, _) = kv?;
                    if let Some((job, _)) = split_step_key(&k) {
                        jobs.insert(job);
                    }
                }
            }
            Ok(jobs.into_iter().collect())
        })
    }

    /// Journals a save's fields (its ranks' indexes are journalled one by one with `put_save_rank`).
    pub fn put_save(&self, save: &SaveState) -> Result<(), IndexError> {
        self.watched("put_save", || {
            let bytes = serde_json::to_vec(save).map_err(|e| IndexError::Encode {
                what: format!("{}@{}", save.job, save.step),
                reason: e.to_string(),
            })?;
            self.saves.insert(job_key(&save.job, &save.step.to_be_bytes()), bytes)?;
            Ok(())
        })
    }

    /// Journals one rank's index as its serialised bytes (the index object's bytes).
    pub fn put_save_rank(&self, job: &str, step: u64, rank: u32, bytes: &[u8]) -> Result<(), IndexError> {
        self.watched("put_save_rank", || {
            self.save_ranks.insert(rank_key(job, step, rank), bytes)?;
            Ok(())
        })
    }

    /// Forgets a save and its ranks' indexes. O(world size), once per save. The ranks go
    /// first: a crash in between leaves a save that lost ranks (its clients re-send them), never
    /// ranks without a save that a later save of the same step would inherit.
    pub fn remove_save(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.watched("remove_save", || {
            self.remove_save_ranks(job, step)?;
            self.remove_save_entry(job, step)
        })
    }

    /// Forgets a save's journalled ranks: the costly half of `remove_save` (16,384 index
    /// entries are about 140 MB, hundreds of milliseconds to remove).
    pub fn remove_save_ranks(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.watched("remove_save_ranks", || {
            let mut batch = sled::Batch::default();
            for kv in self.save_ranks.scan_prefix(job_key(job, &step.to_be_bytes())) {
                batch.remove(kv?.0);
            }
            self.save_ranks.apply_batch(batch)?;
            Ok(())
        })
    }

    /// Forgets a save's own entry, leaving its ranks: only for a committed save whose ranks
    /// the caller removes next, and with the key guarded until it has (`finish_commit`); a
    /// crash in between leaves orphans that `remove_orphan_ranks` clears at start-up.
    pub fn remove_save_entry(&self, job: &str, step: u64) -> Result<(), IndexError> {
        self.watched("remove_save_entry", || {
            self.saves.remove(job_key(job, &step.to_be_bytes()))?;
            Ok(())
        })
    }

    /// Removes journalled ranks whose save has no entry (left by a crash inside an older
    /// `remove_save`). Start-up only: O(journalled ranks).
    pub fn remove_orphan_ranks(&self) -> Result<usize, IndexError> {
        self.watched("remove_orphan_ranks", || {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.save_ranks.iter() {
                let (k, _) = kv?;
                let save_key = k.get(..k.len().saturating_sub(4)).unwrap_or_default();
                if !self.saves.contains_key(save_key)? {
                    batch.remove(k);
                    n += 1;
                }
            }
            self.save_ranks.apply_batch(batch)?;
            Ok(n)
        })
    }

    /// Every journalled save with the indexes of the ranks it received, and the saves whose
    /// entries cannot be read (a damaged entry; one an incompatible ckptd wrote), as the
    /// entry's key and why: those are forgotten here, their ranks with them, so their ranks send
    /// them again as after any lost journal, instead of one unreadable entry keeping ckptd down.
    pub fn all_saves(&self) -> Result<(Vec<SaveState>, Vec<Unreadable>), IndexError> {
        self.watched("all_saves", || {
            let (mut out, mut unreadable) = (Vec::new(), Vec::new());
            for kv in self.saves.iter() {
                let (k, v) = kv?;
                match self.journalled_save(&v)? {
                    Ok(save) => out.push(save),
                    Err(reason) => unreadable.push((k, reason)),
                }
            }
            let mut dropped = Vec::with_capacity(unreadable.len());
            for (k, reason) in unreadable {
                let mut batch = sled::Batch::default();
                for kv in self.save_ranks.scan_prefix(&k) {
                    batch.remove(kv?.0);
                }
                self.save_ranks.apply_batch(batch)?;
                self.saves.remove(&k)?;
                let name = match split_step_key(&k) {
                    Some((job, step)) => format!("{job}@{step}"),
                    None => String::from_utf8_lossy(&k).into_owned(),
                };
                dropped.push((name, reason));
            }
            Ok((out, dropped))
        })
    }

    /// A journalled save's entry and its ranks' indexes, or why they cannot be read.
    fn journalled_save(&self, entry: &[u8]) -> Result<Result<SaveState, String>, IndexError> {
        let mut save: SaveState = match serde_json::from_slice(entry) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut ranks = Vec::new();
        for kv in self.save_ranks.scan_prefix(job_key(&save.job, &save.step.to_be_bytes())) {
            let (_, v) = kv?;
            let index = match serde_json::from_slice::<ShardIndex>(&v) {
                Ok(i) => i,
                Err(e) => return Ok(Err(format!("a rank's index: {e}"))),
            };
            if index.rank < save.world_size {
                ranks.push(index);
            } else {
                tracing::warn!(
                    job = save.job,
                    step = save.step,
                    rank = index.rank,
                    "journalled rank outside the save's world; dropped"
                );
            }
        }
        Ok(save.restore_ranks(ranks).map(|()| save).map_err(|e| e.to_string()))
    }
}

const FENCE_PREFIX: &[u8] = b"fence\0";

fn fence_key(job: &str) -> Vec<u8> {
    [FENCE_PREFIX, job.as_bytes()].concat()
}

/// A big-endian u64 value; `None` for bytes of another length.
fn be_u64(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `dir` again once the previous handle's background flusher has let go of sled's
    /// file lock (it outlives the handle by a moment, longer on a loaded machine).
    fn reopen(dir: &Path) -> Index {
        try_reopen(dir).unwrap_or_else(|e| panic!("reopening the index: {e}"))
    }

    fn try_reopen(dir: &Path) -> Result<Index, IndexError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Index::open(dir, 1 << 20, true) {
                Err(IndexError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    /// sled checks a blob's CRC when it reads it: at open only for what its log's tail still
    /// holds (that value is then lost quietly), otherwise on the first read. A root past its
    /// blob threshold (a large world's), written before two clean restarts and then zeroed or
    /// lost by a power cut, must be found at open, where start-up can still set the index
    /// aside, or every read of that checkpoint on this node fails.
    #[test]
    fn a_damaged_or_missing_blob_is_found_at_open() {
        for how in ["removed", "zeroed"] {
            let dir = tempfile::tempdir().unwrap();
            let root: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
            {
                let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
                idx.put_manifest("job", 7, &root).unwrap();
                idx.put_chunk("job", &ChunkHash::of(b"c"), 10, None).unwrap();
                idx.db.flush().unwrap();
            }
            for _ in 0..2 {
                let idx = reopen(dir.path());
                for i in 0..5000u32 {
                    idx.put_chunk("job", &ChunkHash::of(&i.to_le_bytes()), 10, None).unwrap();
                }
                assert_eq!(idx.get_manifest("job", 7).unwrap().map(|r| r.len()), Some(root.len()));
                idx.db.flush().unwrap();
            }
            let blobs: Vec<_> = walk(&dir.path().join("blobs"));
            assert!(!blobs.is_empty(), "sled wrote no blob for a {} byte value", root.len());
            for b in &blobs {
                match how {
                    "zeroed" => std::fs::write(b, vec![0u8; std::fs::metadata(b).unwrap().len() as usize]).unwrap(),
                    _ => std::fs::remove_file(b).unwrap(),
                }
            }
            match try_reopen(dir.path()) {
                Ok(idx) => {
                    panic!("{how}: opened; the root reads {:?}", idx.get_manifest("job", 7).map(|r| r.map(|r| r.len())))
                }
                Err(e) => assert!(e.is_damage(), "{how}: not damage: {e}"),
            }
        }

        fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
            let mut files = Vec::new();
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    files.extend(walk(&e.path()));
                } else {
                    files.push(e.path());
                }
            }
            files
        }
    }

    /// Damage met after open, by any method (here sled's own errors for a lost blob and a
    /// panic, as a read of a damaged page gives them): the first is kept and marked before it is
    /// published, later ones leave it as it is, the other entries still answer, and the next
    /// open refuses the index as damaged.
    #[test]
    fn damage_met_after_open_is_kept_marked_and_refused_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
            idx.put_chunk("job", &ChunkHash::of(b"c"), 10, None).unwrap();
            let lost = || Err::<(), _>(sled::Error::Io(std::io::ErrorKind::NotFound.into()).into());
            let e = idx.watched("get_chunk", lost).unwrap_err();
            assert!(e.is_damage(), "a lost blob is not damage: {e}");
            let found = idx.damage_found().expect("the damage was not kept");
            assert!(found.starts_with("get_chunk: "), "{found}");
            assert_eq!(std::fs::read_to_string(dir.path().join(DAMAGE_MARKER)).unwrap(), found);
            let waited = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(idx.damaged());
            assert_eq!(waited, found);
            let e = idx.watched("all_saves", || -> Result<(), IndexError> { panic!("sled: bad page") }).unwrap_err();
            assert!(e.is_damage() && e.to_string().contains("sled: bad page"), "{e}");
            assert_eq!(idx.damage_found(), Some(found.clone()), "a later damage replaced the first");
            // Errors that are not damage leave nothing behind.
            let other = Index::open(&dir.path().join("other"), 1 << 20, false).unwrap();
            assert!(other.watched("stored_bytes", || Err::<(), _>(IndexError::NotCounted)).is_err());
            assert_eq!(other.damage_found(), None);
            assert!(!dir.path().join("other").join(DAMAGE_MARKER).exists());
            assert!(idx.has_chunk("job", &ChunkHash::of(b"c")).unwrap(), "the other entries stopped answering");
        }
        match try_reopen(dir.path()) {
            Ok(_) => panic!("a marked index opened"),
            Err(e) => assert!(e.is_damage() && e.to_string().contains("get_chunk"), "{e}"),
        }
    }

    /// sled's own flush leaves the disk cache, the log's size and blob files volatile; each
    /// flush (and the open) ends with a syncfs of the index's filesystem, shared by callers.
    #[tokio::test]
    async fn every_flush_ends_with_a_sync_of_the_index_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index"), 1 << 20, false).unwrap();
        assert_eq!(idx.fs.syncs(), 1, "what sled made at open was not synced");
        idx.set_store_description("s").unwrap();
        idx.flush().await.unwrap();
        assert_eq!((idx.flush_count(), idx.fs.syncs()), (1, 2), "a flush did not sync the filesystem");
        let (a, b) = (idx.clone(), idx.clone());
        a.set_store_description("t").unwrap();
        let (ra, rb) = tokio::join!(a.flush(), b.flush());
        ra.unwrap();
        rb.unwrap();
        assert!(idx.fs.syncs() >= 3 && idx.fs.syncs() <= 4, "{} syncs", idx.fs.syncs());
    }

    #[test]
    fn an_unreadable_journalled_save_is_forgotten_with_its_ranks_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path(), 1 << 20, false).unwrap();
        let limits = ckpt_core::Limits::default();
        for step in [4u64, 5, 6] {
            let save = SaveState::open("j", step, 2, 1, None, serde_json::Value::Null, &limits).unwrap();
            idx.put_save(&save).unwrap();
            idx.put_save_rank("j", step, 0, br#"{"rank":0,"tensors":[],"metadata":null}"#).unwrap();
        }
        // Step 5's entry damaged; step 6's rank index damaged.
        idx.saves.insert(job_key("j", &5u64.to_be_bytes()), &b"{not json"[..]).unwrap();
        idx.put_save_rank("j", 6, 1, b"\x00garbage").unwrap();
        let (saves, unreadable) = idx.all_saves().unwrap();
        assert_eq!(saves.iter().map(|s| s.step).collect::<Vec<_>>(), vec![4]);
        assert_eq!(saves[0].ranks.len(), 1, "the readable save lost its rank");
        let names: Vec<&str> = unreadable.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["j@5", "j@6"]);
        assert!(unreadable[1].1.contains("a rank's index"), "{:?}", unreadable[1]);
        // Forgotten, ranks and all: the next start finds only step 4.
        assert_eq!(idx.save_ranks.len(), 1);
        let (saves, unreadable) = idx.all_saves().unwrap();
        assert_eq!((saves.len(), unreadable.len()), (1, 0));
    }

    #[test]
    fn a_fence_is_only_ever_raised() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(idx.fence("j").unwrap(), None);
        assert_eq!(idx.raise_fence("j", 7).unwrap(), 7);
        // A raise to a lower generation (one that read the fence before the first raise) keeps
        // the higher.
        assert_eq!(idx.raise_fence("j", 5).unwrap(), 7);
        assert_eq!(idx.fence("j").unwrap(), Some(7));
        assert_eq!(idx.raise_fence("j", 9).unwrap(), 9);
        assert_eq!(idx.fence("other").unwrap(), None);
    }

    #[test]
    fn survives_reopen_and_orders_steps() {
        let dir = tempfile::tempdir().unwrap();
        let h = ChunkHash::of(b"a");
        {
            let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
            idx.put_chunk("j", &h, 10, Some(4)).unwrap();
            for step in [300u64, 2, 10] {
                idx.put_manifest("j", step, b"{}").unwrap();
            }
            idx.put_manifest("j2", 1, b"{}").unwrap();
            idx.db.flush().unwrap();
        }
        let idx = reopen(dir.path());
        assert!(idx.has_chunk("j", &h).unwrap());
        assert_eq!(idx.get_chunk("j", &h).unwrap(), Some(ChunkRecord { stored_len: 10, raw_len: Some(4) }));
        assert_eq!(idx.committed_before("j", 10).unwrap(), Some(2));
        assert_eq!(idx.committed_before("j", 2).unwrap(), None);
        assert_eq!(idx.committed_before("j", 1000).unwrap(), Some(300));
        assert!(!idx.has_chunk("j2", &h).unwrap(), "chunks are per job");
        assert_eq!(idx.manifest_steps("j").unwrap(), vec![2, 10, 300]);
        assert_eq!(idx.jobs().unwrap(), vec!["j".to_string(), "j2".to_string()]);
        idx.clear().unwrap();
        assert!(idx.all_manifests().unwrap().is_empty());
    }

    /// Every job's bytes by brute force over the chunk records: what the counters must say.
    fn scanned(idx: &Index, pred: impl Fn(&str) -> bool) -> u64 {
        idx.chunks
            .iter()
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| {
                let nul = k.iter().position(|&b| b == 0).unwrap();
                pred(std::str::from_utf8(&k[..nul]).unwrap())
            })
            .map(|(_, v)| le_u64(&v))
            .sum()
    }

    #[test]
    fn job_byte_counters_follow_the_chunk_records() {
        let dir = tempfile::tempdir().unwrap();
        let seed: u64 = 0x1dec_0de5;
        let mut rng = seed;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        let jobs = ["a/x", "a/y", "b/z"];
        type Owns = fn(&str) -> bool;
        let tenants: [(&str, Owns); 3] =
            [("a", |j| j.starts_with("a/")), ("b", |j| j.starts_with("b/")), ("all", |_| true)];
        {
            let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
            for op in 0..600 {
                let job = jobs[next() as usize % 3];
                let h = ChunkHash::of(&(next() % 40).to_le_bytes());
                match next() % 10 {
                    0..=4 => idx.put_chunk(job, &h, next() % 10_000, Some(4)).unwrap(),
                    5 => {
                        // A rebuild's batch (hashes can repeat in it): what was not recorded
                        // before is counted as added.
                        let mut batch: Vec<_> =
                            (0..4).map(|_| (ChunkHash::of(&(next() % 40).to_le_bytes()), next() % 10_000)).collect();
                        let new: std::collections::BTreeSet<_> = batch
                            .iter()
                            .filter(|(h, _)| idx.get_chunk(job, h).unwrap().is_none())
                            .map(|(h, _)| *h)
                            .collect();
                        assert_eq!(idx.put_chunks(job, &mut batch).unwrap(), new.len(), "seed {seed:#x}, op {op}");
                        assert!(batch.iter().all(|(h, _)| idx.get_chunk(job, h).unwrap().is_some()));
                    }
                    6..=8 => idx.remove_chunks(job, &[h]).unwrap(),
                    _ => {
                        idx.clear_job_chunks(job).unwrap();
                    }
                }
                for (name, pred) in &tenants {
                    assert_eq!(
                        idx.stored_bytes_where(pred).unwrap(),
                        scanned(&idx, pred),
                        "seed {seed:#x}, op {op}, tenant {name}"
                    );
                }
            }
            assert!(scanned(&idx, |_| true) > 0, "seed {seed:#x}: the run should end with chunks stored");
            idx.db.flush().unwrap();
        }
        // Reopened, the counts are taken again from the records.
        let idx = reopen(dir.path());
        for (_, pred) in &tenants {
            assert_eq!(idx.stored_bytes_where(pred).unwrap(), scanned(&idx, pred));
        }
        idx.clear().unwrap();
        assert_eq!(idx.stored_bytes_where(|_| true).unwrap(), 0);
    }

    /// The counts come from the records alone: records written behind the index's back (as
    /// by an older ckptd) are counted when it is opened.
    #[test]
    fn counts_are_taken_from_the_records_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
            for (i, job) in ["a/x", "a/x", "b/z"].iter().enumerate() {
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&(100 * (i as u64 + 1)).to_le_bytes());
                idx.chunks.insert(job_key(job, &ChunkHash::of(&[i as u8]).0), &v).unwrap();
            }
            assert_eq!(idx.stored_bytes_where(|_| true).unwrap(), 0, "written behind the counts");
            idx.db.flush().unwrap();
        }
        let idx = reopen(dir.path());
        assert_eq!(idx.stored_bytes_where(|j| j == "a/x").unwrap(), 300);
        assert_eq!(idx.stored_bytes_where(|j| j == "b/z").unwrap(), 300);
    }

    /// Without a stored-bytes quota nothing is counted (no pass at open), and asking says so
    /// rather than answering zero.
    #[test]
    fn an_index_opened_without_counting_refuses_to_answer() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path(), 1 << 20, false).unwrap();
        idx.put_chunk("j", &ChunkHash::of(b"a"), 10, Some(4)).unwrap();
        idx.remove_chunks("j", &[ChunkHash::of(b"a")]).unwrap();
        assert!(matches!(idx.stored_bytes_where(|_| true), Err(IndexError::NotCounted)));
    }

    /// Writers racing on the same records (puts of new lengths, removes, a job cleared) leave
    /// counts equal to the records.
    #[test]
    fn concurrent_writers_leave_exact_counts() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path(), 1 << 20, true).unwrap();
        let seed = 0xc0_ffee_u64;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let idx = &idx;
                s.spawn(move || {
                    let mut r = seed ^ t;
                    for _ in 0..2000 {
                        r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let job = ["a/x", "b/z"][(r >> 60) as usize & 1];
                        let h = ChunkHash::of(&((r >> 40) % 8).to_le_bytes());
                        match (r >> 20) % 16 {
                            0..=9 => idx.put_chunk(job, &h, (r >> 8) % 1000 + 1, None).unwrap(),
                            10..=14 => idx.remove_chunks(job, &[h]).unwrap(),
                            _ => {
                                let _ = idx.clear_job_chunks(job).unwrap();
                            }
                        }
                    }
                });
            }
        });
        for job in ["a/x", "b/z"] {
            assert_eq!(
                idx.stored_bytes_where(|j| j == job).unwrap(),
                scanned(&idx, |j| j == job),
                "seed {seed:#x}, {job}"
            );
        }
        assert_eq!(idx.stored_bytes_where(|_| true).unwrap(), scanned(&idx, |_| true), "seed {seed:#x}");
    }
}
