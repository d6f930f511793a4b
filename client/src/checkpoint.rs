//! Reading a committed checkpoint's metadata: its root, and only the index objects a reader
//! needs.
//!
//! A restoring rank reads the root (about 90 bytes a rank) and its own index object; a
//! resharding rank reads the root and the index objects its rows live in (the root's layout
//! names them). Every root is checked against its own hash and against the job and step asked
//! for; every index object against the address and length the root gives and the rank it must
//! be. Version-1 checkpoints (one manifest with every index inline) read the same way.
//!
//! Design note: index objects are content-addressed and immutable, so a parsed one is kept
//! (`IndexCache`, least recently used out first, bounded by `ClientOptions::index_cache_bytes`
//! of wire size) and never goes stale. An export or reshard reads every tensor through the
//! indexes of the ranks holding it; at a 405B layout (a tensor's rows over about a thousand
//! ranks, thousands of tensors) that would otherwise be millions of index fetches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ckpt_core::commit::{parse_index_object, IndexRef};
use ckpt_core::{CommitObject, Limits, Manifest, Root, ShardIndex};
use futures::{StreamExt, TryStreamExt};

use crate::client::Client;
use crate::error::ClientError;
use crate::http::Body;

/// A committed checkpoint as a reader first sees it: its root. A version-1 manifest carries its
/// indexes inline.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub root: Root,
    inline: Option<std::sync::Arc<Vec<ShardIndex>>>,
}

impl Checkpoint {
    pub fn job(&self) -> &str {
        &self.root.job
    }
    pub fn step(&self) -> u64 {
        self.root.step
    }
    pub fn world_size(&self) -> u32 {
        self.root.world_size
    }
    pub fn metadata(&self) -> &serde_json::Value {
        &self.root.metadata
    }
}

/// A reader accepts what any ckptd may have written; its own configured limits are ckptd's.
fn reader_limits() -> Limits {
    Limits {
        world_size_max: u32::MAX,
        tensors_per_rank_max: usize::MAX,
        chunk_bytes_max: u64::MAX,
        ..Limits::default()
    }
}

impl Client {
    /// A committed checkpoint's root, checked against its own hash and against the job and step
    /// asked for.
    pub async fn checkpoint(&self, job: &str, step: u64) -> Result<Checkpoint, ClientError> {
        ckpt_core::validate_job(job)?;
        let bytes =
            self.request(reqwest::Method::GET, &format!("/v1/jobs/{job}/checkpoints/{step}"), Body::Empty).await?;
        let corrupt = |reason: String| ClientError::CorruptManifest { job: job.into(), step, reason };
        let parsed = tokio::task::spawn_blocking(move || CommitObject::parse(&bytes, &reader_limits()))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .map_err(|e| corrupt(e.to_string()))?;
        if parsed.job() != job || parsed.step() != step {
            return Err(corrupt(format!("it is the root of {}@{}", parsed.job(), parsed.step())));
        }
        match parsed {
            CommitObject::Root(root) => Ok(Checkpoint { root, inline: None }),
            CommitObject::V1(m) => {
                let root = Root::from_v1(&m).map_err(|e| corrupt(e.to_string()))?;
                Ok(Checkpoint { root, inline: Some(std::sync::Arc::new(m.ranks)) })
            }
        }
    }

    /// Rank `rank`'s shard index of a checkpoint, fetched by the address its root gives and
    /// checked against it.
    pub async fn shard_index(&self, cp: &Checkpoint, rank: u32) -> Result<ShardIndex, ClientError> {
        Ok(Arc::unwrap_or_clone(self.shared_index(cp, rank, Cache::Use).await?))
    }

    /// [`Client::shard_index`], shared with the client's index cache unless `cache` says not.
    async fn shared_index(&self, cp: &Checkpoint, rank: u32, cache: Cache) -> Result<Arc<ShardIndex>, ClientError> {
        let no_rank =
            || ClientError::NoSuchRank { job: cp.job().into(), step: cp.step(), rank, world_size: cp.world_size() };
        if let Some(inline) = &cp.inline {
            return inline.get(rank as usize).cloned().map(Arc::new).ok_or_else(no_rank);
        }
        let r = *cp.root.ranks.get(rank as usize).ok_or_else(no_rank)?;
        let world = cp.world_size();
        let key = (cp.job().to_string(), r, rank, world);
        if cache == Cache::Use {
            if let Some(hit) = self.indexes.get(&key) {
                return Ok(hit);
            }
        }
        let bytes: Bytes = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{}/indexes/{}", cp.job(), r.hash), Body::Empty)
            .await?;
        self.indexes.fetched.fetch_add(1, Ordering::Relaxed);
        let parsed = tokio::task::spawn_blocking(move || parse_index_object(&bytes, &r, rank, world, &reader_limits()))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .map_err(|e| ClientError::CorruptManifest {
                job: cp.job().into(),
                step: cp.step(),
                reason: e.to_string(),
            })?;
        let parsed = Arc::new(parsed);
        if cache == Cache::Use {
            self.indexes.put(key, parsed.clone());
        }
        Ok(parsed)
    }

    /// Index objects this client has fetched from ckptd so far (each cache miss, and every read
    /// that bypasses the cache): what a reader of many tensors pays in metadata round trips.
    pub fn index_objects_fetched(&self) -> u64 {
        self.indexes.fetched.load(Ordering::Relaxed)
    }

    /// The indexes of `ranks`, fetched concurrently, in the order given.
    pub async fn shard_indexes(&self, cp: &Checkpoint, ranks: &[u32]) -> Result<Vec<ShardIndex>, ClientError> {
        let shared = self.shared_indexes(cp, ranks, Cache::Use).await?;
        Ok(shared.into_iter().map(Arc::unwrap_or_clone).collect())
    }

    /// [`Client::shard_indexes`], shared with the client's index cache unless `cache` says not.
    pub(crate) async fn shared_indexes(
        &self,
        cp: &Checkpoint,
        ranks: &[u32],
        cache: Cache,
    ) -> Result<Vec<Arc<ShardIndex>>, ClientError> {
        futures::stream::iter(ranks.iter().map(|&r| self.shared_index(cp, r, cache)))
            .buffered(self.options().concurrency.max(1))
            .try_collect()
            .await
    }

    /// The whole checkpoint: its root and every rank's index. For tools that need every rank
    /// (show, verify, average); a rank's restore needs only `checkpoint` and `shard_index`.
    /// Every index object is read from ckptd afresh (verify vouches for the stored bytes).
    pub async fn manifest(&self, job: &str, step: u64) -> Result<Manifest, ClientError> {
        let cp = self.checkpoint(job, step).await?;
        let ranks: Vec<u32> = (0..cp.world_size()).collect();
        let shared = self.shared_indexes(&cp, &ranks, Cache::Bypass).await?;
        let indexes: Vec<ShardIndex> = shared.into_iter().map(Arc::unwrap_or_clone).collect();
        Manifest::assemble(&cp.root, indexes).map_err(|e| ClientError::CorruptManifest {
            job: job.into(),
            step,
            reason: e.to_string(),
        })
    }
}

/// Whether a read of an index object may be answered from, and fill, the client's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cache {
    Use,
    Bypass,
}

/// Index objects read lately, parsed, by their address (content-addressed, so an entry is never
/// stale) and the rank and world size they were checked for. Bounded by the objects' sizes on
/// the wire; the least recently used go first.
pub(crate) struct IndexCache {
    max: u64,
    /// The entries, least recently used first, each with its size; and their total.
    inner: Mutex<(IndexMap, u64)>,
    /// Index objects fetched from ckptd by the client that owns the cache.
    fetched: AtomicU64,
}

/// The job (index objects are stored per job), the address and length the root gives, and the
/// rank and world size the object was checked for: a hit is what parsing those bytes again
/// would give.
type IndexKey = (String, IndexRef, u32, u32);
type IndexMap = hashlink::LinkedHashMap<IndexKey, (Arc<ShardIndex>, u64)>;

impl IndexCache {
    pub(crate) fn new(max_bytes: u64) -> IndexCache {
        IndexCache {
            max: max_bytes,
            inner: Mutex::new((hashlink::LinkedHashMap::new(), 0)),
            fetched: AtomicU64::new(0),
        }
    }

    fn get(&self, key: &IndexKey) -> Option<Arc<ShardIndex>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.to_back(key).map(|(index, _)| index.clone())
    }

    /// Keeps `index` under `key`, counted at the length its address gives.
    fn put(&self, key: IndexKey, index: Arc<ShardIndex>) {
        let len = key.1.bytes;
        if len > self.max {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, held) = &mut *g;
        if let Some((_, bytes)) = map.insert(key, (index, len)) {
            *held -= bytes;
        }
        *held += len;
        while *held > self.max {
            match map.pop_front() {
                Some((_, (_, bytes))) => *held -= bytes,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_core::ChunkHash;

    fn index(rank: u32) -> Arc<ShardIndex> {
        Arc::new(ShardIndex { rank, tensors: vec![], metadata: serde_json::Value::Null })
    }

    #[test]
    fn the_index_cache_keeps_the_recently_used_within_its_bytes() {
        let cache = IndexCache::new(100);
        let sized = |i: u8, bytes| ("job".to_string(), IndexRef { hash: ChunkHash::of(&[i]), bytes }, u32::from(i), 8);
        let key = |i: u8| sized(i, 40);
        for i in 0..3 {
            cache.put(key(i), index(u32::from(i)));
        }
        // 120 bytes over 100: the first in went.
        assert!(cache.get(&key(0)).is_none());
        assert_eq!(cache.get(&key(1)).unwrap().rank, 1);
        // 1 was used after 2: 2 goes next.
        cache.put(key(3), index(3));
        assert!(cache.get(&key(2)).is_none());
        assert!(cache.get(&key(1)).is_some() && cache.get(&key(3)).is_some());
        // An object larger than the whole cache is not kept, and evicts nothing.
        cache.put(sized(4, 101), index(4));
        assert!(cache.get(&sized(4, 101)).is_none() && cache.get(&key(1)).is_some());
        // The same key again replaces its entry without counting it twice.
        cache.put(key(3), index(3));
        assert!(cache.get(&key(1)).is_some() && cache.get(&key(3)).is_some());
        // A cache of 0 bytes keeps nothing.
        let off = IndexCache::new(0);
        off.put(sized(5, 1), index(5));
        assert!(off.get(&sized(5, 1)).is_none());
    }
}
