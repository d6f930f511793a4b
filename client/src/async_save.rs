//! Asynchronous save: the trainer's stall is one copy into a reused staging buffer.
//!
//! Design note. `AsyncSaver` owns one buffer of fixed capacity, allocated and touched once so
//! the copy never page-faults. It also remembers the last save's layout and chunk hashes: the
//! copy compares each chunk with the bytes already in the buffer first, skips the copy of an
//! unchanged one and reuses its hash, so an incremental save hashes only what changed (the
//! compare reads what the copy would have written, so the stall stays one copy's cost). `save` waits for the buffer (only if the previous save still
//! holds it, and reports how long), copies the caller's tensors into it, and returns; hashing,
//! dedup and upload run in a background task over zero-copy slices of the buffer. When that
//! task ends, the buffer is recycled for the next save. Host memory for async saves is
//! therefore bounded by the capacity, not by the number of saves in flight.
//!
//! On ckptd's host the buffer is a memfd registered with ckptd once (a shared-memory segment,
//! see ckptd's `segments.rs`): changed chunks are then handed over by offset, and ckptd copies,
//! names and stores them; this process neither hashes them nor writes them anywhere.
//!
//! Change detection is one of two passes, chosen per saver (`ChangeDetection`): `Compare` reads
//! each chunk of the caller's tensors and the buffer's copy of it (memcmp); `Fingerprint` reads
//! only the caller's chunk and compares its 128-bit fingerprint (`ckpt_kernels`) with the one
//! taken at the last save. The second is what a GPU trainer needs (its state is in device memory:
//! the fingerprints run there and only changed chunks cross to the host); on the CPU it costs
//! more arithmetic per byte than memcmp, which the ticket reports (`detect`). Either way an
//! unchanged chunk is neither copied nor hashed again (ckptd is still asked whether it has it).
//! By fingerprint, a changed chunk whose 128-bit fingerprint equals its old one would keep its old
//! hash and bytes. A change to one 32-bit word always shows; changes to several words must cancel
//! in both 64-bit lanes, which for the worst structured pairs (the same bit set in one word and
//! cleared in another) has a chance of about 2^-62 (`ckpt_kernels::fingerprint` explains; it is
//! not cryptographic). That is why `Compare` stays available and a save without a previous one (a
//! new saver, a restart) hashes everything.
//!
//! The background part runs on the saver's own small runtime whose threads are niced
//! (`background_nice`, default 19): hashing, dedup queries and uploads yield the CPU to the
//! trainer, whose next step should not pay for the last checkpoint. Dropping the saver cancels
//! saves still in flight; call `SaveTicket::finish` first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::DType;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::client::{Client, SaveReport, SaveSpec, Wait};
use crate::error::ClientError;
use crate::tensor::Tensor;

/// A tensor borrowed from the trainer for the duration of the copy.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub global_shape: &'a [u64],
    pub offsets: &'a [u64],
    pub data: &'a [u8],
}

impl Tensor {
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            global_shape: &self.global_shape,
            offsets: &self.offsets,
            data: &self.data,
        }
    }
}

/// The staging buffer and what the last save left in it.
#[derive(Default)]
struct Staging {
    buf: Buf,
    last: Option<Last>,
}

/// The staging buffer's memory: a memfd shared with ckptd when this host's ckptd takes
/// segments (chunks are then handed over by offset, with no copy into the page cache), else
/// ordinary heap memory.
enum Buf {
    Heap(Vec<u8>),
    Shared(Arc<SharedBuf>),
}

impl Default for Buf {
    fn default() -> Self {
        Buf::Heap(Vec::new())
    }
}

struct SharedBuf {
    map: memmap2::MmapMut,
    file: std::fs::File,
    /// Registered with ckptd at the first save (`None` inside: ckptd declined).
    registered: tokio::sync::OnceCell<Option<crate::node_local::Registered>>,
}

/// Lends the shared buffer to `Bytes` slices for the background part of a save.
struct SharedOwner(Arc<SharedBuf>);

impl AsRef<[u8]> for SharedOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Heap(v) => v.len(),
            Buf::Shared(s) => s.map.len(),
        }
    }

    /// Whether nothing else holds the buffer (a shared one may still be lent to slices).
    fn is_free(&self) -> bool {
        match self {
            Buf::Heap(_) => true,
            Buf::Shared(s) => Arc::strong_count(s) == 1,
        }
    }

    /// The bytes to copy into; `None` if a shared buffer is still lent out.
    fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        match self {
            Buf::Heap(v) => Some(&mut v[..]),
            Buf::Shared(s) => Arc::get_mut(s).map(|s| &mut s.map[..]),
        }
    }

    /// A memfd of `capacity` bytes, mapped and touched, or heap memory if that fails.
    fn allocate(capacity: usize, shared: bool) -> Buf {
        if shared && capacity > 0 {
            match SharedBuf::create(capacity) {
                Ok(s) => return Buf::Shared(Arc::new(s)),
                Err(e) => tracing::debug!(error = %e, "no shared staging buffer; using heap memory"),
            }
        }
        Buf::Heap(touched(capacity))
    }
}

impl SharedBuf {
    fn create(capacity: usize) -> std::io::Result<SharedBuf> {
        let fd = nix::sys::memfd::memfd_create(c"ckpt-staging", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
        let file = std::fs::File::from(fd);
        file.set_len(capacity as u64)?;
        // SAFETY: the memfd is private to this process until it is passed to ckptd, which only
        // reads it with pread; nothing else resizes it while mapped.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        // Writing every page now moves the page faults out of the trainer's stall.
        map.fill(1);
        Ok(SharedBuf { map, file, registered: Default::default() })
    }
}

#[derive(PartialEq, Eq)]
struct Layout {
    chunk_bytes: u64,
    tensors: Vec<(String, usize)>,
}

/// The layout of the last save and the hash of each of its chunks, in order, with each
/// chunk's fingerprint when the saver detects changes by fingerprint.
struct Last {
    layout: Layout,
    hashes: Vec<ckpt_core::ChunkHash>,
    fingerprints: Vec<ckpt_kernels::Fingerprint>,
}

/// How a save finds the chunks that did not change since the last one (see the module note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeDetection {
    /// Compare each chunk with the staging buffer's copy of it, byte for byte.
    #[default]
    Compare,
    /// Compare each chunk's fingerprint with the last save's.
    Fingerprint,
}

pub struct AsyncSaver {
    client: Client,
    buffer: Arc<Mutex<Staging>>,
    capacity: usize,
    runtime: Option<tokio::runtime::Runtime>,
    detect: ChangeDetection,
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The nice value of checkpoint background work. Nice is a weight per thread, and a save
/// runs several background threads per rank (hashing, handoff, ckptd's own): at nice 10 those
/// together took a third of the cores from two ranks' steps on the 2-core bench machine (step
/// time +76%), at 19 a tenth (BENCHMARKS.md).
pub const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread's priority. On Linux the nice value is per thread, and threads
/// inherit it from their creator.
fn nice_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread (who = 0) has no memory-safety preconditions.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// A save in progress. The stall is over when you hold one.
pub struct SaveTicket {
    /// Time the caller was blocked copying its tensors.
    pub stall: Duration,
    /// Time spent waiting for the previous save to release the buffer, before the copy.
    pub waited: Duration,
    pub bytes: u64,
    /// Chunks copied into the staging buffer (changed, or the first save).
    pub chunks_copied: usize,
    /// Chunks found unchanged since the last save: not copied, and their hash reused.
    pub chunks_unchanged: usize,
    /// Part of `stall` spent finding unchanged chunks (the fingerprint pass, or the compares).
    pub detect: Duration,
    released: Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<Result<SaveReport, ClientError>>,
}

impl SaveTicket {
    /// Whether ckptd holds every byte of this save and the staging buffer is free for the next
    /// one (or the save failed): a save started now does not wait for the buffer.
    pub fn buffer_released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::Acquire) || self.handle.is_finished()
    }

    /// Whether the background part has ended (committed, staged or failed, as `finish` will say).
    pub fn is_done(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the background part of the save (as chosen by its `Wait`).
    pub async fn finish(self) -> Result<SaveReport, ClientError> {
        self.handle.await.map_err(|e| ClientError::Internal(format!("save task failed: {e}")))?
    }
}

fn touched(capacity: usize) -> Vec<u8> {
    // Writing every page now moves the page faults out of the trainer's stall.
    vec![1u8; capacity]
}

impl AsyncSaver {
    /// A saver whose background work runs at nice [`BACKGROUND_NICE`].
    pub fn new(client: Client, capacity_bytes: usize) -> AsyncSaver {
        Self::with_background_nice(client, capacity_bytes, BACKGROUND_NICE)
    }

    /// `background_nice` 0 keeps the background work at the caller's priority.
    pub fn with_background_nice(client: Client, capacity_bytes: usize, background_nice: i32) -> AsyncSaver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // Few threads: nice is a weight per thread, so every extra background thread takes
            // another share of the cores from training steps.
            .worker_threads(1)
            .max_blocking_threads(16)
            .thread_name("ckpt-save")
            .on_thread_start(move || nice_this_thread(background_nice))
            .enable_all()
            .build()
            .ok();
        if runtime.is_none() {
            tracing::warn!("cannot start the background save runtime; saves run on the caller's runtime");
        }
        // Its own connection pool: a connection opened on the caller's runtime is driven only
        // while the caller is inside that runtime, so a save reusing one would wait for the
        // caller's next `block_on` (it made saves after a restore take a whole checkpoint
        // interval in the demo).
        let client = client.detached().unwrap_or(client);
        let staging = Staging { buf: Buf::allocate(capacity_bytes, client.options().node_local), last: None };
        AsyncSaver {
            client,
            buffer: Arc::new(Mutex::new(staging)),
            capacity: capacity_bytes,
            runtime,
            detect: ChangeDetection::default(),
        }
    }

    /// The same saver finding unchanged chunks by `detect`.
    pub fn with_change_detection(mut self, detect: ChangeDetection) -> AsyncSaver {
        self.detect = detect;
        self
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Copies `tensors` into the staging buffer and returns; the save continues in the
    /// background. Fails at once if the tensors do not fit the buffer.
    pub async fn save(
        &self,
        spec: SaveSpec,
        tensors: &[TensorView<'_>],
        wait: Wait,
    ) -> Result<SaveTicket, ClientError> {
        let total: usize = tensors.iter().map(|t| t.data.len()).sum();
        if total > self.capacity {
            return Err(ClientError::InvalidTensor {
                name: tensors.first().map(|t| t.name.to_string()).unwrap_or_default(),
                reason: format!("the state is {total} bytes, the staging buffer holds {}", self.capacity),
            });
        }
        let asked = Instant::now();
        let mut guard = self.buffer.clone().lock_owned().await;
        let waited = asked.elapsed();

        let started = Instant::now();
        let Staging { mut buf, mut last } = std::mem::take(&mut *guard);
        if buf.len() < self.capacity || buf.as_mut_slice().is_none() {
            buf = Buf::allocate(self.capacity, self.client.options().node_local);
            // A new buffer holds none of the last save's bytes: nothing in it may be reused.
            last = None;
        }
        let chunk = self.client.options().chunk_bytes;
        let layout = Layout {
            chunk_bytes: chunk,
            tensors: tensors.iter().map(|t| (t.name.to_string(), t.data.len())).collect(),
        };
        // The buffer still holds the last save's bytes: a chunk identical to its bytes there (by
        // compare or by fingerprint) is not copied (it is already in place) and keeps its hash.
        let last = last.filter(|l| l.layout == layout);
        let mut known = Vec::new();
        let mut fingerprints = Vec::new();
        let mut detect = Duration::ZERO;
        let mut ranges = Vec::with_capacity(tensors.len());
        let mut at = 0;
        let Some(bytes) = buf.as_mut_slice() else {
            return Err(ClientError::Internal("staging buffer still lent out".into()));
        };
        for t in tensors {
            for r in ckpt_core::chunk::chunk_ranges(t.data.len() as u64, chunk) {
                let (src, dst) =
                    (&t.data[r.start as usize..r.end as usize], at + r.start as usize..at + r.end as usize);
                let i = known.len();
                let looked = Instant::now();
                let same = match self.detect {
                    ChangeDetection::Compare => {
                        last.as_ref().and_then(|l| l.hashes.get(i).copied()).filter(|_| bytes[dst.clone()] == *src)
                    }
                    ChangeDetection::Fingerprint => {
                        // Positions are the chunk's words in the buffer: a chunk that moved
                        // counts as changed.
                        let fp = ckpt_kernels::fingerprint_bytes(src, (dst.start / 4) as u64);
                        fingerprints.push(fp);
                        last.as_ref()
                            .filter(|l| l.fingerprints.get(i) == Some(&fp))
                            .and_then(|l| l.hashes.get(i).copied())
                    }
                };
                detect += looked.elapsed();
                if same.is_none() {
                    bytes[dst].copy_from_slice(src);
                }
                known.push(same);
            }
            ranges.push(at..at + t.data.len());
            at += t.data.len();
        }
        let stall = started.elapsed();
        let chunks_unchanged = known.iter().filter(|k| k.is_some()).count();
        let chunks_copied = known.len() - chunks_unchanged;

        let (frozen, shared) = match buf {
            Buf::Heap(v) => (Bytes::from(v), None),
            Buf::Shared(s) => (Bytes::from_owner(SharedOwner(s.clone())), Some(s)),
        };
        let owned: Vec<Tensor> = tensors
            .iter()
            .zip(ranges)
            .map(|(t, r)| Tensor {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                global_shape: t.global_shape.to_vec(),
                offsets: t.offsets.to_vec(),
                data: frozen.slice(r),
            })
            .collect();
        let client = self.client.clone();
        let capacity = self.capacity;
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = released.clone();
        let work = async move {
            // The buffer is released as soon as ckptd holds every byte (staged or durable) and
            // this rank's index: the next save need not wait for this one's commit.
            let registered = match &shared {
                Some(s) => s.registered.get_or_init(|| client.register_segment(&s.file)).await.as_ref(),
                None => None,
            };
            let segment = shared.as_ref().zip(registered).map(|(s, r)| crate::node_local::SegmentView {
                token: &r.token,
                base: s.map.as_ptr() as usize,
                len: s.map.len(),
            });
            let result = client.save_known(&spec, &owned, Wait::Staged, &known, segment).await;
            drop(owned);
            let buf = match shared {
                None => frozen.try_into_mut().ok().map(|m| Buf::Heap(Vec::from(m))),
                Some(s) => {
                    drop(frozen);
                    Some(Buf::Shared(s))
                }
            };
            *guard = match buf {
                // The hashes describe the buffer's bytes only if every chunk was hashed.
                Some(buf) if buf.is_free() => Staging {
                    buf,
                    last: result.as_ref().ok().filter(|(_, h)| h.len() == known.len()).map(|(_, h)| Last {
                        layout,
                        hashes: h.clone(),
                        fingerprints,
                    }),
                },
                _ => {
                    tracing::warn!("staging buffer still shared after a save; allocating a fresh one");
                    Staging { buf: Buf::allocate(capacity, client.options().node_local), last: None }
                }
            };
            drop(guard);
            release.store(true, std::sync::atomic::Ordering::Release);
            let mut report = result?.0;
            if wait == Wait::Committed && report.status.phase != ckpt_core::SavePhase::Committed {
                report.status = client.wait_committed(&spec.job, spec.step).await?;
            }
            report.elapsed_ms = asked.elapsed().as_millis() as u64;
            Ok(report)
        };
        let handle = match &self.runtime {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        };
        Ok(SaveTicket { stall, waited, bytes: total as u64, chunks_copied, chunks_unchanged, detect, released, handle })
    }
}
