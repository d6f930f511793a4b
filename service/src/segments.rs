//! Shared-memory segments: the node-local save path without a page-cache copy on the client.
//!
//! Design note.
//! * Why: a handoff file costs the client a copy of every byte into freshly allocated page
//!   cache, the kernel's writeback of it later, and ckptd a read back for verification. On the
//!   2-core bench VM the fresh page cache alone ran at 230-400 MiB/s per core (the hypervisor
//!   backs returned guest memory again on first touch), a third of the disk. Here the client's
//!   staging buffer is a memfd that it maps once and passes to ckptd; ckptd copies each chunk
//!   out of it into a reused, aligned buffer, verifies that copy, and writes it to the store
//!   with `O_DIRECT`: one copy, one hash and a DMA per byte on ckptd's side, no page cache.
//! * Registration: a client connects to the unix socket named by `/v1/local`, sends one byte
//!   with the memfd attached (`SCM_RIGHTS`), and reads back a random 128-bit token that names
//!   the segment in adopt requests over HTTP. The fd is the client's own capability: ckptd
//!   never opens a path the client names, and the token is only ever sent to that client.
//!   Only a memfd is accepted (it answers `F_GET_SEALS`): no pipe, socket or file on a slow
//!   filesystem can stall a read. The segment lives until the client closes the connection.
//! * Trust: the client can change or shrink the memfd at any time. ckptd reads it with `pread`
//!   (a short read is a refusal, never a fault: nothing is mapped), and what it verifies is its
//!   own private copy, which is exactly what it writes.
//! * Bounds: at most `segments_max` segments (connections beyond it are closed at once), a
//!   registration must complete within `REGISTER_TIMEOUT`, and aligned buffers are pooled, one
//!   per chunk request in flight at most (`chunk_requests_max`).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_core::codec::EncodeOptions;
use ckpt_core::{ChunkHash, ChunkHeader, CHUNK_HEADER_BYTES};

use crate::adopt::{AdoptError, Adopted};
use crate::durable::FsSync;

const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffers made ready when a segment registers: about the chunk requests one host's savers
/// keep in flight, sized for the clients' default chunk.
const PREWARM_BUFFERS: usize = 32;
const PREWARM_CHUNK_BYTES: usize = 4 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths: the largest logical block size in
/// common use, a multiple of what any local filesystem asks.
pub const DIRECT_ALIGN: usize = 4096;

/// A registered segment: the client's memfd.
pub struct Segment {
    pub file: File,
}

pub struct Segments {
    map: Mutex<HashMap<String, Arc<Segment>>>,
    /// Chunks stored from segments since start.
    stored: std::sync::atomic::AtomicU64,
    max: usize,
    buffers: Mutex<Vec<AlignedBuf>>,
    buffers_max: usize,
    /// A prewarm is running: registrations at the same moment must not each fill the pool.
    warming: std::sync::atomic::AtomicBool,
    encoders: Arc<crate::encoders::Encoders>,
}

impl Segments {
    pub fn new(max: usize, buffers_max: usize, encoders: Arc<crate::encoders::Encoders>) -> Segments {
        Segments {
            map: Default::default(),
            stored: Default::default(),
            max,
            buffers: Default::default(),
            buffers_max,
            warming: Default::default(),
            encoders,
        }
    }

    pub fn get(&self, token: &str) -> Option<Arc<Segment>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For `/v1/stats`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "registered": self.len(),
            "chunks_stored": self.stored.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn insert(&self, seg: Segment) -> Option<String> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max {
            return None;
        }
        let token = format!("{:032x}", rand::random::<u128>());
        map.insert(token.clone(), Arc::new(seg));
        Some(token)
    }

    fn remove(&self, token: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
    }

    /// An aligned buffer of at least `len` bytes, from the pool when one is free. Reused
    /// buffers matter: fresh memory costs a page fault per page on every chunk.
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => pool.swap_remove(i),
            None => AlignedBuf::new(len),
        }
    }

    /// Fills the pool with touched buffers for chunks of up to `PREWARM_CHUNK_BYTES`, up to
    /// `PREWARM_BUFFERS` of them, so a segment's first save does not fault in fresh memory per
    /// chunk (on the bench VM first-touch faults took a sixth of ckptd's CPU in a first save).
    fn prewarm(&self) {
        use std::sync::atomic::Ordering;
        if self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let want = PREWARM_BUFFERS.min(self.buffers_max);
        let len = CHUNK_HEADER_BYTES + PREWARM_CHUNK_BYTES;
        let have = {
            let pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter().filter(|b| b.capacity() >= len).count()
        };
        for _ in have..want {
            let mut b = AlignedBuf::new(len);
            b.as_mut_slice().fill(0);
            self.give_back(b);
        }
        self.warming.store(false, Ordering::Release);
    }

    /// Keeps `buf` for reuse, if the pool has room and `buf` is of the default chunk size or
    /// smaller (larger chunks are rare; keeping their buffers would hold up to
    /// `chunk_requests_max` × `chunk_bytes_max` for good).
    pub fn give_back(&self, buf: AlignedBuf) {
        if buf.capacity() > (CHUNK_HEADER_BYTES + PREWARM_CHUNK_BYTES).next_multiple_of(DIRECT_ALIGN) {
            return;
        }
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < self.buffers_max {
            pool.push(buf);
        }
    }
}

/// A byte buffer whose usable part starts at a `DIRECT_ALIGN` boundary.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let len = len.next_multiple_of(DIRECT_ALIGN);
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start }
    }

    pub fn capacity(&self) -> usize {
        self.raw.len() - DIRECT_ALIGN
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        &mut self.raw[self.start..self.start + cap]
    }
}

/// A chunk copied out of a segment, in an aligned buffer with room for its header: the
/// private copy that is verified, encoded and written.
pub struct CopiedChunk {
    buf: AlignedBuf,
    len: usize,
    pub hash: ChunkHash,
}

/// Copies `len` bytes at `offset` of `seg` into a pooled aligned buffer and hashes the copy;
/// when the client named the chunk (`expected`), the copy must hash to that. Give the result
/// to [`write_chunk`] or back with [`Segments::discard`]. Blocking.
pub fn copy_chunk(
    segments: &Segments,
    seg: &Segment,
    offset: u64,
    len: u64,
    expected: Option<ChunkHash>,
) -> Result<CopiedChunk, AdoptError> {
    use std::os::unix::fs::FileExt;
    let (h, raw_len) = (CHUNK_HEADER_BYTES, len as usize);
    let mut buf = segments.buffer(h + raw_len);
    let image = buf.as_mut_slice();
    let read = seg.file.read_exact_at(&mut image[h..h + raw_len], offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => AdoptError::Segment(format!(
            "it holds fewer than {} bytes (offset {offset} + {len})",
            offset.saturating_add(len)
        )),
        _ => AdoptError::Segment(format!("cannot read it: {e}")),
    });
    let checked = read.and_then(|()| {
        let actual = ChunkHash::of(&image[h..h + raw_len]);
        match expected {
            Some(hash) if hash != actual => Err(AdoptError::SegmentMismatch { expected: hash, actual }),
            _ => Ok(actual),
        }
    });
    match checked {
        Ok(hash) => Ok(CopiedChunk { buf, len: raw_len, hash }),
        Err(e) => {
            segments.give_back(buf);
            Err(e)
        }
    }
}

impl Segments {
    /// Returns a copied chunk's buffer to the pool without writing it (already stored).
    pub fn discard(&self, chunk: CopiedChunk) {
        self.give_back(chunk.buf);
    }
}

/// Encodes a copied chunk as `encode` decides and writes the stored chunk durably at `dest`
/// (direct I/O, group-synced: see `durable::write_new_grouped`). Blocking.
pub fn write_chunk(
    segments: &Segments,
    chunk: CopiedChunk,
    dest: &Path,
    fs: &FsSync,
    encode: &EncodeOptions,
) -> Result<Adopted, AdoptError> {
    let CopiedChunk { mut buf, len: raw_len, hash } = chunk;
    let h = CHUNK_HEADER_BYTES;
    let image = buf.as_mut_slice();
    let (codec, encoded) = segments.encoders.encode(&image[h..h + raw_len], encode);
    let payload_len = match encoded {
        Some(e) => {
            image[h..h + e.len()].copy_from_slice(&e);
            e.len()
        }
        None => raw_len,
    };
    image[..h].copy_from_slice(&ChunkHeader { codec, raw_len: raw_len as u64, hash }.encode());
    let total = h + payload_len;
    write_image(segments, buf, total, dest, fs)?;
    segments.stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Adopted { stored_len: total as u64, raw_len: raw_len as u64, copied: false })
}

/// Writes a stored chunk that arrived another way (an HTTP upload bound for a local-directory
/// store) as segment chunks are written: copied into a pooled aligned buffer, then direct I/O
/// and group syncs, instead of a buffered write and two fsyncs per chunk. Blocking.
pub fn write_stored(
    segments: &Segments,
    header: &[u8],
    payload: &[u8],
    dest: &Path,
    fs: &FsSync,
) -> Result<(), AdoptError> {
    let total = header.len() + payload.len();
    let mut buf = segments.buffer(total);
    let image = buf.as_mut_slice();
    image[..header.len()].copy_from_slice(header);
    image[header.len()..total].copy_from_slice(payload);
    write_image(segments, buf, total, dest, fs)
}

/// Writes `buf[..total]` durably at `dest` and gives the buffer back to the pool.
fn write_image(
    segments: &Segments,
    mut buf: AlignedBuf,
    total: usize,
    dest: &Path,
    fs: &FsSync,
) -> Result<(), AdoptError> {
    let image = buf.as_mut_slice();
    // The tail of the last block is written and then cut off: no stale bytes on the way.
    let padded = total.next_multiple_of(DIRECT_ALIGN);
    image[total..padded].fill(0);
    let written = crate::durable::write_new_grouped(dest, image, total as u64, DIRECT_ALIGN, fs);
    segments.give_back(buf);
    written?;
    Ok(())
}

/// Binds the registration socket at `path` (a stale socket file from an earlier run is
/// replaced) and serves registrations until the runtime stops. Returns `None` when the path is
/// too long for a unix socket or cannot be bound: clients then use handoff files.
pub fn listen(path: &Path, segments: Arc<Segments>) -> Option<PathBuf> {
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().len() > 100 {
        tracing::warn!(path = %path.display(), "segment socket path too long; shared-memory saves are off");
        return None;
    }
    let _ = std::fs::remove_file(path);
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot bind the segment socket; shared-memory saves are off");
            return None;
        }
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(segments.max));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "segment socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // One permit per connection, registered or still registering.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(max = segments.max, "segment refused: segments_max reached");
                continue;
            };
            let segments = segments.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_registration(stream, segments).await {
                    tracing::debug!(error = %e, "segment registration failed");
                }
                drop(permit);
            });
        }
    });
    Some(path.to_path_buf())
}

async fn serve_registration(stream: tokio::net::UnixStream, segments: Arc<Segments>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fd = tokio::time::timeout(REGISTER_TIMEOUT, receive_fd(&stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no segment sent in time"))??;
    let file = File::from(fd);
    // SAFETY: fcntl on an fd this function owns; F_GET_SEALS passes no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) } < 0 {
        let mut s = stream;
        let _ = s.write_all(b"error: only a memfd is accepted\n").await;
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a memfd"));
    }
    let Some(token) = segments.insert(Segment { file }) else {
        let mut s = stream;
        let _ = s.write_all(b"error: segments_max reached\n").await;
        return Ok(());
    };
    let warm = segments.clone();
    // Before the answer: the client's first chunks then find the buffers ready.
    if let Err(e) = tokio::task::spawn_blocking(move || warm.prewarm()).await {
        segments.remove(&token);
        return Err(std::io::Error::other(e));
    }
    let mut s = stream;
    let answer = format!("{token}\n");
    let served = async {
        s.write_all(answer.as_bytes()).await?;
        // The segment lives as long as the client keeps this connection; anything it sends is
        // ignored, and end of file or an error ends it.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let r = served.await;
    segments.remove(&token);
    r
}

/// Receives one byte carrying one fd.
async fn receive_fd(stream: &tokio::net::UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    loop {
        stream.readable().await?;
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = [std::io::IoSliceMut::new(&mut byte)];
            // Room for every fd one message can carry (SCM_MAX_FD): a truncated message would
            // leave fds in this process that nothing here owns. All of them are closed below
            // except the first.
            let mut space = nix::cmsg_space!([RawFd; 253]);
            let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    fds.extend(list);
                }
            }
            Ok((msg.bytes, fds))
        });
        match got {
            Ok((bytes, fds)) => {
                // SAFETY: each fd was just received by this process and is owned by nobody else.
                let owned: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
                if bytes == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before sending"));
                }
                return owned
                    .into_iter()
                    .next()
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no fd attached"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
