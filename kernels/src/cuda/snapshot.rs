//! Snapshot copies: device state into a caller's (pageable) host buffer through a bounded set
//! of pinned staging slots.
//!
//! Design note. DMA from the device needs page-locked memory, and locking the caller's whole
//! buffer would make pinned memory grow with the state. Instead `slots` pinned buffers of
//! `pinned_bytes / slots` each take turns: while the copy engine fills one, host threads move
//! the previous one into the caller's buffer. A slot is refilled only after its host copy ends,
//! so the pipeline needs the host side to keep up with the link; a pool of `host_threads`
//! splits each chunk for that. The slots are allocated without write-combining: the CPU reads
//! them, and reads from write-combined memory are uncached and slow.
//!
//! Two designs, measured by the device check (BENCHMARKS.md):
//! - (a) [`Snapshotter::snapshot_blocking`]: the caller waits until the host buffer is complete.
//! - (b) [`Snapshotter::snapshot_staged`]: the caller waits only for a device-to-device copy into a
//!   staging buffer kept on the device (as large as the state), then a background thread drains
//!   that copy to the host while training goes on. It costs device memory equal to the state.
//!
//! On the H200 machine (BENCHMARKS.md) (b) stalled the trainer for 2.6% of (a)'s time and still
//! finished the host copy at 0.9x a plain pinned copy's rate, so (b) is the design to use;
//! (a) remains for state too large to keep a second device copy of.
//!
//! The background drain takes the pinned slots and the staging buffer with it and hands them
//! back when it ends; the next snapshot waits for them, so two drains never share a slot.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceSlice, PinnedHostSlice,
};

use super::{CudaError, Device, Result};

/// Below this many words a chunk is copied on the calling thread: handing parts out would cost
/// more.
const PARALLEL_COPY_MIN_WORDS: usize = 1 << 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// Upper bound on the pinned host memory, all slots together.
    pub pinned_bytes: usize,
    /// Number of pinned slots (at least 2, for the copy engine and the host to overlap).
    pub slots: usize,
    /// Threads that move a slot into the caller's buffer.
    pub host_threads: usize,
    /// Write the caller's buffer with non-temporal (streaming) stores where the processor has
    /// them: the buffer is not read back soon, and ordinary stores first read every line they
    /// write, a third more memory traffic while the copy engine is writing too.
    pub streaming_stores: bool,
}

impl Default for SnapshotConfig {
    /// Chosen on an H200 machine with 16 cores (BENCHMARKS.md, issue 14): the host copy is the
    /// bottleneck, so every core helps; four 16 MiB slots kept up with the link better than two
    /// or six, than 8 MiB slots (more per-chunk overhead) and than 64 MiB ones; and streaming
    /// stores won while the copy engine was writing too, though plain ones won a copy alone.
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        SnapshotConfig { pinned_bytes: 64 << 20, slots: 4, host_threads: threads, streaming_stores: true }
    }
}

/// What a drain needs, owned by whichever thread is draining.
struct Stage {
    stream: Arc<CudaStream>,
    slots: Vec<PinnedHostSlice<u32>>,
    /// Recorded after each slot's copy. cudarc tracks this itself only while its context is
    /// in multi-stream mode; our own events make the wait explicit whatever the mode.
    filled: Vec<CudaEvent>,
    device_copy: Option<CudaSlice<u32>>,
    pool: CopyPool,
}

pub struct Snapshotter {
    ctx: Arc<CudaContext>,
    idle: Option<Stage>,
    returning: Option<mpsc::Receiver<Stage>>,
}

/// A snapshot whose device-side copy is taken and whose drain to the host is under way.
pub struct StagedSnapshot {
    /// How long the caller was blocked: the device-to-device copy.
    pub captured_after: Duration,
    drain: JoinHandle<Result<Vec<u32>>>,
}

impl StagedSnapshot {
    /// Waits for the drain and returns the caller's buffer, now holding the snapshot.
    pub fn wait(self) -> Result<Vec<u32>> {
        self.drain.join().map_err(|_| CudaError::DrainLost)?
    }
}

impl Snapshotter {
    pub fn new(device: &Device, cfg: SnapshotConfig) -> Result<Snapshotter> {
        if cfg.slots < 2 || cfg.host_threads == 0 {
            return Err(CudaError::Invalid(format!("{cfg:?}: need two slots and a thread")));
        }
        let slot_words = cfg.pinned_bytes / cfg.slots / 4;
        if slot_words == 0 {
            return Err(CudaError::Invalid(format!("{cfg:?}: slots smaller than a word")));
        }
        let ctx = device.context().clone();
        let mut slots = Vec::with_capacity(cfg.slots);
        for _ in 0..cfg.slots {
            // SAFETY: u32 has no invalid bit patterns, and every word is written by a copy
            // before it is read.
            slots.push(unsafe { ctx.alloc_pinned_with_flags::<u32>(slot_words, 0) }?);
        }
        let filled = (0..cfg.slots).map(|_| ctx.new_event(None)).collect::<std::result::Result<Vec<_>, _>>()?;
        let stage = Stage {
            stream: ctx.new_stream()?,
            slots,
            filled,
            device_copy: None,
            pool: CopyPool::new(cfg.host_threads, cfg.streaming_stores),
        };
        Ok(Snapshotter { ctx, idle: Some(stage), returning: None })
    }

    /// The caller's thread does not see the stage while a background drain holds it.
    fn take_stage(&mut self) -> Result<Stage> {
        if let Some(stage) = self.idle.take() {
            return Ok(stage);
        }
        let rx = self.returning.take().ok_or(CudaError::DrainLost)?;
        rx.recv().map_err(|_| CudaError::DrainLost)
    }

    /// Design (a): copies `src` into `dst` and returns when `dst` is complete.
    pub fn snapshot_blocking(&mut self, src: &CudaView<'_, u32>, dst: &mut [u32]) -> Result<()> {
        let mut stage = self.take_stage()?;
        let result = stage.drain(src, dst);
        self.idle = Some(stage);
        result
    }

    /// Design (b): copies `src` to a device-side staging buffer, returns once that copy is done
    /// (`src` may then change), and drains the copy into `dst` on a background thread.
    pub fn snapshot_staged(&mut self, src: &CudaView<'_, u32>, mut dst: Vec<u32>) -> Result<StagedSnapshot> {
        if dst.len() != src.len() {
            return Err(CudaError::Invalid(format!("snapshot of {} words into {}", src.len(), dst.len())));
        }
        let started = Instant::now();
        let mut stage = self.take_stage()?;
        let captured = (|| {
            let n = src.len();
            if stage.device_copy.as_ref().is_none_or(|c| c.len() < n) {
                stage.device_copy = None;
                // SAFETY: the copy below writes every word that the drain reads.
                stage.device_copy = Some(unsafe { stage.stream.alloc::<u32>(n.max(1)) }?);
            }
            let copy = stage.device_copy.as_mut().expect("allocated above");
            // After whatever the producer's stream has queued for `src`.
            stage.stream.join(src.stream())?;
            stage.stream.memcpy_dtod(src, &mut copy.slice_mut(..n))?;
            stage.stream.synchronize()
        })();
        if let Err(e) = captured {
            self.idle = Some(stage);
            return Err(e.into());
        }
        let captured_after = started.elapsed();
        let (tx, rx) = mpsc::sync_channel(1);
        self.returning = Some(rx);
        let ctx = self.ctx.clone();
        let drain = std::thread::Builder::new()
            .name("ckpt-snapshot-drain".into())
            .spawn(move || {
                let result = ctx.bind_to_thread().map_err(CudaError::from).and_then(|_| {
                    let copy = stage.device_copy.take().expect("set before the drain");
                    let n = dst.len();
                    let r = stage.drain(&copy.slice(..n), &mut dst);
                    stage.device_copy = Some(copy);
                    r
                });
                // The snapshotter may be gone; the stage is then simply dropped.
                let _ = tx.send(stage);
                result.map(|_| dst)
            })
            .map_err(|e| CudaError::Invalid(format!("cannot start the drain thread: {e}")))?;
        Ok(StagedSnapshot { captured_after, drain })
    }
}

impl Stage {
    /// Device -> pinned slot -> `dst`, chunk by chunk; the copy engine fills slot k+1.. while
    /// the host empties slot k.
    fn drain(&mut self, src: &CudaView<'_, u32>, dst: &mut [u32]) -> Result<()> {
        let n = src.len();
        if dst.len() != n {
            return Err(CudaError::Invalid(format!("snapshot of {n} words into {}", dst.len())));
        }
        let slot_words = self.slots[0].len();
        let chunks = n.div_ceil(slot_words);
        let ring = self.slots.len();
        let range = |k: usize| k * slot_words..((k + 1) * slot_words).min(n);
        self.stream.join(src.stream())?;
        for k in 0..chunks.min(ring) {
            self.fill(src, range(k), k)?;
        }
        for k in 0..chunks {
            let r = range(k);
            let s = k % ring;
            // Waits for this slot's copy only: the later slots' copies keep running.
            self.filled[s].synchronize()?;
            let host = self.slots[s].as_slice()?;
            self.pool.copy(&host[..r.len()], &mut dst[r]);
            if k + ring < chunks {
                self.fill(src, range(k + ring), s)?;
            }
        }
        Ok(())
    }
}

impl Stage {
    /// Queues the copy of `src[words]` into slot `s` and marks its end.
    fn fill(&mut self, src: &CudaView<'_, u32>, words: std::ops::Range<usize>, s: usize) -> Result<()> {
        let len = words.len();
        let view = src.slice(words);
        self.stream.context().bind_to_thread()?;
        let (ptr, _read) = view.device_ptr(&self.stream);
        let host = self.slots[s].as_mut_slice()?;
        // cudarc's memcpy_dtoh copies as many elements as the destination holds, which for a
        // short last chunk reads past the source; the raw call takes the exact length.
        // SAFETY: `host[..len]` is page-locked and stays untouched until `filled[s]` completes;
        // `ptr` covers `len` words.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..len], ptr, self.stream.cu_stream()) }?;
        Ok(self.filled[s].record(&self.stream)?)
    }
}

/// Threads that split a host-to-host copy: one thread's memcpy moves far less than the host
/// link delivers. They live as long as the pool, because spawning per chunk costs tens of
/// microseconds, a visible part of a chunk's time.
pub struct CopyPool {
    workers: Vec<(mpsc::Sender<Piece>, JoinHandle<()>)>,
    done: mpsc::Receiver<()>,
    streaming: bool,
}

/// A part of one copy, handed to a worker; the pool's `copy` waits for every part before it
/// returns, so the borrowed memory outlives the raw pointers.
struct Piece {
    src: *const u32,
    dst: *mut u32,
    len: usize,
}

// SAFETY: a piece is only a description of memory that `CopyPool::copy` keeps borrowed until
// the worker reports it done.
unsafe impl Send for Piece {}

impl CopyPool {
    /// A pool that copies on `threads` threads, the caller's included, with streaming stores
    /// if `streaming` (see [`SnapshotConfig::streaming_stores`]).
    pub fn new(threads: usize, streaming: bool) -> CopyPool {
        let (done_tx, done) = mpsc::channel();
        let workers = (1..threads.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel::<Piece>();
                let done_tx = done_tx.clone();
                let handle = std::thread::spawn(move || {
                    while let Ok(p) = rx.recv() {
                        // SAFETY: see `Piece`; the parts of one copy do not overlap.
                        let (src, dst) = unsafe {
                            (std::slice::from_raw_parts(p.src, p.len), std::slice::from_raw_parts_mut(p.dst, p.len))
                        };
                        copy_words(src, dst, streaming);
                        if done_tx.send(()).is_err() {
                            break;
                        }
                    }
                });
                (tx, handle)
            })
            .collect();
        CopyPool { workers, done, streaming }
    }

    /// `dst.copy_from_slice(src)`, split over the pool's threads.
    pub fn copy(&self, src: &[u32], dst: &mut [u32]) {
        assert_eq!(src.len(), dst.len(), "copy needs equal lengths");
        let len = src.len();
        if self.workers.is_empty() || len < PARALLEL_COPY_MIN_WORDS {
            copy_words(src, dst, self.streaming);
            return;
        }
        // Parts a multiple of 4 KiB, so no two threads write one page.
        let part = len.div_ceil(self.workers.len() + 1).next_multiple_of(1024);
        // Disjoint parts from split_at, so the caller's part and the workers' never alias.
        let (head, mut tail) = dst.split_at_mut(part.min(len));
        let (src_head, mut src_tail) = src.split_at(part.min(len));
        let mut sent = 0;
        for (tx, _) in &self.workers {
            if tail.is_empty() {
                break;
            }
            let n = part.min(tail.len());
            let (d, rest) = std::mem::take(&mut tail).split_at_mut(n);
            let (s, src_rest) = src_tail.split_at(n);
            // A worker only stops when the pool is dropped; if one were gone, returning (or
            // unwinding) while others still write into `dst` would be unsound.
            tx.send(Piece { src: s.as_ptr(), dst: d.as_mut_ptr(), len: n }).unwrap_or_else(|_| std::process::abort());
            sent += 1;
            tail = rest;
            src_tail = src_rest;
        }
        copy_words(src_head, head, self.streaming);
        for _ in 0..sent {
            self.done.recv().unwrap_or_else(|_| std::process::abort());
        }
    }
}

/// `dst.copy_from_slice(src)`, with non-temporal stores for the 16-byte-aligned middle when
/// `streaming` and the processor is x86-64 (where SSE2, and so `movntdq`, is always present).
fn copy_words(src: &[u32], dst: &mut [u32], streaming: bool) {
    #[cfg(target_arch = "x86_64")]
    if streaming {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let len = src.len();
        let head = ((16 - dst.as_ptr() as usize % 16) % 16 / 4).min(len);
        let body = (len - head) / 4;
        dst[..head].copy_from_slice(&src[..head]);
        // SAFETY: `body` 16-byte blocks lie inside both slices after `head` words; the
        // destination blocks are 16-byte aligned, as the streaming store needs, and the source
        // is read unaligned. The fence orders the weakly-ordered streaming stores before
        // whatever signals the copy done.
        unsafe {
            let s = src.as_ptr().add(head) as *const __m128i;
            let d = dst.as_mut_ptr().add(head) as *mut __m128i;
            for i in 0..body {
                _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
            }
            _mm_sfence();
        }
        let done = head + 4 * body;
        dst[done..].copy_from_slice(&src[done..]);
        return;
    }
    let _ = streaming;
    dst.copy_from_slice(src);
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        for (tx, handle) in self.workers.drain(..) {
            drop(tx);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_words, CopyPool};

    #[test]
    fn pooled_copy_copies_everything() {
        for threads in [1, 3, 8] {
            for streaming in [false, true] {
                let pool = CopyPool::new(threads, streaming);
                for n in [0, 5, 1 << 18, (1 << 20) + 7, (1 << 19) + 1] {
                    let src: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
                    let mut dst = vec![0u32; n];
                    pool.copy(&src, &mut dst);
                    assert!(dst == src, "n={n} threads={threads} streaming={streaming}");
                }
            }
        }
    }

    #[test]
    fn streaming_copy_handles_every_alignment() {
        let src: Vec<u32> = (0..1000u32).collect();
        for start in 0..4 {
            for len in [0, 1, 3, 4, 5, 17, 900] {
                let mut dst = vec![0u32; 1000];
                copy_words(&src[start..start + len], &mut dst[start..start + len], true);
                assert_eq!(&dst[start..start + len], &src[start..start + len]);
                assert!(dst[..start].iter().chain(&dst[start + len..]).all(|v| *v == 0));
            }
        }
    }
}
