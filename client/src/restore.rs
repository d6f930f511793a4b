//! Restore into the caller's memory: every chunk is read once, straight into its place in a
//! buffer the caller owns, and verified there.
//!
//! Design note.
//! * Plan, then read: a restore is first turned into a list of reads, each one chunk into one
//!   disjoint piece of a target buffer (a chunk only partly wanted, at the edges of a row
//!   range, is read into a per-worker scratch buffer and the wanted part copied). Sizes are
//!   checked while planning, before a byte is read: a target of the wrong size is refused.
//! * Workers: a fixed number of threads (the cores, or the client's `concurrency` when that is
//!   larger, since reads wait on the disk or the network) take reads from a shared list. Each
//!   asks the client's transports in turn (`transport.rs`: the node-local store when it has the
//!   chunk, else HTTP, streamed into place), which verify the bytes where they landed, hashing
//!   each piece as it arrives. The read-ahead is therefore the workers: no chunk is buffered
//!   beyond the one each worker holds, and memory beyond the targets is one scratch buffer per
//!   worker.
//! * The calling task is moved off the async runtime's worker (`block_in_place`) while the
//!   threads run; HTTP reads run on the runtime through its handle. A current-thread runtime
//!   cannot do this and gets a clear error.
//! * All or nothing: the first failure stops the other workers at their next chunk and is
//!   returned; a target is only reported restored when the whole call succeeded. After an
//!   error the targets hold unspecified bytes.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ckpt_core::{ChunkHash, ShardIndex};
use serde::Serialize;

use crate::client::Client;
use crate::error::ClientError;
use crate::transport::{Outcome, ReadFailure};

/// A tensor's destination: `data` must be exactly the tensor's bytes (row-major, its dtype's
/// little-endian encoding).
pub struct RestoreTarget<'a> {
    pub name: &'a str,
    pub data: &'a mut [u8],
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub tensors: usize,
    pub chunks: usize,
    pub bytes: u64,
    /// Chunks read from the node-local store (the rest came over HTTP).
    pub chunks_local: usize,
    pub elapsed_ms: u64,
}

/// One read: chunk `hash` of `len` raw bytes, of which `within` lands in `dest`.
pub(crate) struct Read<'a> {
    pub hash: ChunkHash,
    pub len: u64,
    pub within: Range<usize>,
    pub dest: &'a mut [u8],
}

/// Splits `buf` into the whole-chunk reads of a tensor's chunk list.
pub(crate) fn whole_tensor_reads<'a>(
    name: &str,
    chunks: &[ckpt_core::ChunkRef],
    buf: &'a mut [u8],
    reads: &mut Vec<Read<'a>>,
) -> Result<(), ClientError> {
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    if total != buf.len() as u64 {
        return Err(ClientError::InvalidTensor {
            name: name.to_string(),
            reason: format!("the buffer is {} bytes, the checkpoint holds {total}", buf.len()),
        });
    }
    range_reads(chunks, 0..total, buf, reads)
}

/// Splits `dest` (exactly `want`'s length) into the reads of bytes `want` of a slice whose
/// chunks are `chunks`: whole chunks, and parts of the chunks at either end. An error, never
/// bytes left unread, when the chunks do not hold them all.
pub(crate) fn range_reads<'a>(
    chunks: &[ckpt_core::ChunkRef],
    want: Range<u64>,
    dest: &'a mut [u8],
    reads: &mut Vec<Read<'a>>,
) -> Result<(), ClientError> {
    if dest.len() as u64 != want.end.saturating_sub(want.start) {
        return Err(ClientError::Internal(format!(
            "bytes {}..{} planned into {} bytes",
            want.start,
            want.end,
            dest.len()
        )));
    }
    let (from, to) = (want.start, want.end);
    let mut rest = dest;
    let mut at = 0u64;
    for c in chunks {
        let (lo, hi) = (at, at + c.len);
        at = hi;
        let (a, b) = (want.start.max(lo), want.end.min(hi));
        if a < b {
            let (here, tail) = std::mem::take(&mut rest).split_at_mut((b - a) as usize);
            reads.push(Read { hash: c.hash, len: c.len, within: (a - lo) as usize..(b - lo) as usize, dest: here });
            rest = tail;
        }
        if at >= want.end {
            break;
        }
    }
    if !rest.is_empty() {
        return Err(ClientError::Protocol(format!("the chunks of a slice hold {at} bytes, not bytes {from}..{to}")));
    }
    Ok(())
}

impl Client {
    /// Restores rank `rank`'s tensors of `job`@`step` into `targets` (any subset of the rank's
    /// tensors, each buffer exactly the tensor's size), every chunk verified where it lands.
    /// Reads the root and this rank's index object only.
    pub async fn restore_rank_into(
        &self,
        job: &str,
        step: u64,
        rank: u32,
        targets: &mut [RestoreTarget<'_>],
    ) -> Result<RestoreReport, ClientError> {
        let cp = self.checkpoint(job, step).await?;
        let shard = self.shard_index(&cp, rank).await?;
        self.restore_shard_into(job, step, &shard, targets).await
    }

    /// [`Client::restore_rank_into`] for a shard index the caller already holds.
    pub async fn restore_shard_into(
        &self,
        job: &str,
        step: u64,
        shard: &ShardIndex,
        targets: &mut [RestoreTarget<'_>],
    ) -> Result<RestoreReport, ClientError> {
        let mut reads = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in targets.iter_mut() {
            if !seen.insert(t.name) {
                return Err(ClientError::InvalidTensor { name: t.name.into(), reason: "named twice".into() });
            }
            let entry = shard.tensors.iter().find(|e| e.name == t.name).ok_or_else(|| ClientError::InvalidTensor {
                name: t.name.to_string(),
                reason: format!("rank {} of {job}@{step} has no such tensor", shard.rank),
            })?;
            whole_tensor_reads(t.name, &entry.chunks, t.data, &mut reads)?;
        }
        let mut report = self.read_all(job, step, reads).await?;
        report.tensors = targets.len();
        Ok(report)
    }

    /// Reads every planned chunk into place on the worker threads, stopping at the first
    /// failure; see the module note.
    pub(crate) async fn read_all(
        &self,
        job: &str,
        step: u64,
        reads: Vec<Read<'_>>,
    ) -> Result<RestoreReport, ClientError> {
        let (report, mut failures) = self.read_each(job, step, reads, true).await?;
        match failures.pop() {
            Some((_, e)) => Err(e),
            None => Ok(report),
        }
    }

    /// Reads every planned chunk into place; with `stop_at_first` false, every read is tried and
    /// each failure is returned with its chunk (verification reports them all).
    pub(crate) async fn read_each(
        &self,
        job: &str,
        step: u64,
        reads: Vec<Read<'_>>,
        stop_at_first: bool,
    ) -> Result<(RestoreReport, Vec<(ChunkHash, ClientError)>), ClientError> {
        let started = Instant::now();
        let handle = tokio::runtime::Handle::current();
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            return Err(ClientError::Internal(
                "restoring into buffers needs a multi-threaded tokio runtime (the reads run on worker threads)".into(),
            ));
        }
        for t in &self.transports {
            t.prepare().await;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        // Reads wait on the disk or the network as well as on the cores: `concurrency` reads
        // in flight keep a cold disk busy while others are hashed. (One worker per core with
        // read-ahead hints for the next chunks instead made cold restores slower: BENCHMARKS.md.)
        let workers = cores.max(self.opts.concurrency).min(reads.len()).max(1);
        let (chunks, bytes) = (reads.len(), reads.iter().map(|r| r.within.len() as u64).sum::<u64>());
        let scratch_len = reads.iter().filter(|r| r.within.len() as u64 != r.len).map(|r| r.len).max().unwrap_or(0);
        let queue = Mutex::new(reads);
        let failed = AtomicBool::new(false);
        let failures: Mutex<Vec<(ChunkHash, ClientError)>> = Mutex::new(Vec::new());
        let local_count = AtomicU64::new(0);
        let work = || {
            let _runtime = handle.enter();
            let mut scratch = vec![0u8; scratch_len as usize];
            let mut encoded = Vec::new();
            loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let Some(read) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return };
                let whole = read.within.len() as u64 == read.len;
                let Read { hash, len, within, dest } = read;
                let buf: &mut [u8] = if whole { dest } else { &mut scratch[..len as usize] };
                let outcome = self.read_one(job, step, hash, buf, &mut encoded);
                match outcome {
                    Ok(local) => {
                        if local {
                            local_count.fetch_add(1, Ordering::Relaxed);
                        }
                        if !whole {
                            dest.copy_from_slice(&scratch[within]);
                        }
                    }
                    Err(e) => {
                        failures.lock().unwrap_or_else(|e| e.into_inner()).push((hash, e));
                        if stop_at_first {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
        };
        tokio::task::block_in_place(|| {
            std::thread::scope(|sc| {
                for _ in 0..workers {
                    sc.spawn(work);
                }
            })
        });
        let report = RestoreReport {
            tensors: 0,
            chunks,
            bytes,
            chunks_local: local_count.into_inner() as usize,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        Ok((report, failures.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    /// One chunk into `out`, verified, by the first transport that carries it. Returns whether
    /// it came through the local filesystem. Blocking.
    fn read_one(
        &self,
        job: &str,
        step: u64,
        hash: ChunkHash,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<bool, ClientError> {
        for t in &self.transports {
            match t.read_into(job, hash, out, scratch) {
                Ok(Outcome::Carried) => return Ok(t.is_local()),
                Ok(Outcome::Declined) => {}
                Err(ReadFailure::Corrupt(reason)) => {
                    return Err(ClientError::CorruptChunk { job: job.into(), step, hash, reason })
                }
                Err(ReadFailure::Failed(e)) => return Err(e),
            }
        }
        Err(ClientError::Internal(format!("no transport read chunk {hash}")))
    }

    /// Bytes `range` of one rank's saved slice `entry` (from a shard index of `job`@`step`) into
    /// `out`, exactly their length: only the chunks they touch are read, each verified. For
    /// streaming a slice too large to hold in blocks.
    pub async fn load_slice_range(
        &self,
        job: &str,
        step: u64,
        entry: &ckpt_core::TensorEntry,
        range: Range<u64>,
        out: &mut [u8],
    ) -> Result<RestoreReport, ClientError> {
        self.load_slice_ranges(job, step, &[(entry, range)], out).await
    }

    /// [`Client::load_slice_range`] for several slices at once, their bytes one after another
    /// in `out` (exactly their total length), every chunk read in one parallel batch: many
    /// small tensors (norms, biases) cost one round of reads, not one each.
    pub async fn load_slice_ranges(
        &self,
        job: &str,
        step: u64,
        parts: &[(&ckpt_core::TensorEntry, Range<u64>)],
        out: &mut [u8],
    ) -> Result<RestoreReport, ClientError> {
        let mut reads = Vec::new();
        let mut rest = out;
        for (entry, range) in parts {
            let total: u64 = entry.chunks.iter().map(|c| c.len).sum();
            let len = range.end.checked_sub(range.start).filter(|_| range.end <= total);
            let Some(here) = len.and_then(|n| usize::try_from(n).ok()).filter(|&n| n <= rest.len()) else {
                return Err(ClientError::InvalidTensor {
                    name: entry.name.clone(),
                    reason: format!(
                        "bytes {}..{} of a {total}-byte slice into the {} bytes of the buffer left",
                        range.start,
                        range.end,
                        rest.len()
                    ),
                });
            };
            let (dest, tail) = std::mem::take(&mut rest).split_at_mut(here);
            range_reads(&entry.chunks, range.clone(), dest, &mut reads)?;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(ClientError::Internal(format!("{} bytes of the buffer left over", rest.len())));
        }
        let mut report = self.read_all(job, step, reads).await?;
        report.tensors = parts.len();
        Ok(report)
    }
}
