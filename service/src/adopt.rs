//! Node-local adopt: a chunk file that a client on this host wrote into the handoff directory
//! becomes a chunk object of the local-directory store.
//!
//! Design note.
//! * Trust: clients can write the handoff directory, so what a name there points to may change
//!   at any moment. The file is opened once, with `O_NOFOLLOW` (a symbolic link is refused) and
//!   `O_NONBLOCK` (a FIFO cannot stall the open), and every check is made through that fd and
//!   never through the name again: a regular file, exactly one link (a hard link would give
//!   someone a second, writable name for what becomes a store object), at most a chunk in
//!   size, a header naming this chunk, and the blake3 of the payload (a raw payload) or of what
//!   it decodes to (an encoded one: clients compress with the core codec before handing over).
//! * Rename, not copy: after the checks the file's bytes are made durable (a group `syncfs`
//!   shared with concurrent adopts, `durable::FsSync`) and its handoff name is renamed to a
//!   private temporary name in the chunk's store directory. Then the inode at
//!   that name must be the one verified (same dev and ino) and still have one link; if not, the
//!   handoff name was swapped after the checks, the stranger is removed and the adopt refused
//!   (400), and nothing is recorded. Only then is the private name renamed onto the chunk's key,
//!   and a second group sync makes the entry durable.
//!   Renaming straight onto the key and checking afterwards would race with concurrent adopts
//!   of the same chunk (identical tensors on several ranks): one adopt would see the other's
//!   inode and remove it. Copying every chunk through the fd would close the remaining gap (a
//!   process that still holds a writable fd on the file, such as its writer, can change the
//!   bytes after the check; the link count says nothing about open fds) at the price of a
//!   second copy of every checkpoint byte, which is what this path exists to avoid. Readers
//!   verify every chunk against its address (clients always, ckptd before serving), so such a
//!   change is caught as a corrupt chunk, never returned as data.
//! * Another filesystem: when the handoff directory and the store are on different filesystems
//!   the rename fails with EXDEV. The file is then copied through the verified fd into a
//!   temporary file in the store, hashed again while copying (what is stored is what was
//!   hashed), fsync'd and renamed into place, and the handoff file is removed.
//! * Durability: on return the chunk is durable under its key (file fsync'd before the rename,
//!   directories through `durable.rs`). A crash in between leaves at most a temporary file in
//!   the store (ignored by key parsing) or the handoff file (the client's retry sends it again).
//! * Bounds: a raw file is streamed through a fixed buffer; an encoded one is read and decoded
//!   whole, at most a chunk's size of each, on the adopting thread.
//!   Everything here blocks: call it from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ckpt_core::{ChunkHash, ChunkHeader, Codec, CoreError, CHUNK_HEADER_BYTES};

use crate::durable::{self, DurableError, FsSync};

const READ_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("handoff file {} is {what}, not a regular file", .path.display())]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("handoff file {} has {nlink} links; only a file with a single name is adopted", .path.display())]
    Linked { path: PathBuf, nlink: u64 },
    #[error("handoff file {} is {len} bytes, more than a stored chunk ({max})", .path.display())]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("cannot open handoff file {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("handoff file {}'s header does not name chunk {hash}", .path.display())]
    WrongHeader { path: PathBuf, hash: ChunkHash },
    #[error("handoff file {}: {source}", .path.display())]
    Chunk { path: PathBuf, source: CoreError },
    #[error("handoff file {} was replaced or changed while it was adopted", .path.display())]
    Swapped { path: PathBuf },
    #[error("cannot read handoff file {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("shared-memory segment: {0}")]
    Segment(String),
    #[error("the segment's bytes hash to {actual}, not {expected}")]
    SegmentMismatch { expected: ChunkHash, actual: ChunkHash },
    #[error(transparent)]
    Durable(#[from] DurableError),
}

impl AdoptError {
    /// The client's file is not acceptable (400), as opposed to ckptd failing to store it.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, AdoptError::Read { .. } | AdoptError::Durable(_))
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdoptError::Chunk { source: CoreError::HashMismatch { .. }, .. } | AdoptError::SegmentMismatch { .. } => {
                "hash_mismatch"
            }
            AdoptError::Chunk { .. } => "invalid_chunk",
            AdoptError::Read { .. } | AdoptError::Durable(_) => "io_error",
            _ => "handoff_refused",
        }
    }
}

/// What `adopt` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// Bytes of the stored chunk (header and payload).
    pub stored_len: u64,
    /// Length of the chunk's raw bytes (the stored payload may be encoded).
    pub raw_len: u64,
    /// True when the handoff file was on another filesystem and was copied, not renamed.
    pub copied: bool,
}

/// Verifies the handoff file `handoff` as stored chunk `hash` of at most `stored_bytes_max`
/// bytes and makes it the durable file `dest`. See the module note. Blocking.
pub fn adopt(
    handoff: &Path,
    dest: &Path,
    hash: ChunkHash,
    stored_bytes_max: u64,
    fs: &FsSync,
) -> Result<Adopted, AdoptError> {
    adopt_with_hook(handoff, dest, hash, stored_bytes_max, fs, || {})
}

/// `adopt` with `before_rename` called between the checks and the rename (tests race it).
fn adopt_with_hook(
    handoff: &Path,
    dest: &Path,
    hash: ChunkHash,
    stored_bytes_max: u64,
    fs: &FsSync,
    before_rename: impl FnOnce(),
) -> Result<Adopted, AdoptError> {
    let path = handoff.to_path_buf();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(handoff)
        .map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => AdoptError::NotRegular { path: path.clone(), what: "a symbolic link" },
        _ => AdoptError::Open { path: path.clone(), source },
    })?;
    let meta = file.metadata().map_err(|source| AdoptError::Read { path: path.clone(), source })?;
    if !meta.file_type().is_file() {
        let what = if meta.is_dir() { "a directory" } else { "a special file" };
        return Err(AdoptError::NotRegular { path, what });
    }
    if meta.nlink() != 1 {
        return Err(AdoptError::Linked { path, nlink: meta.nlink() });
    }
    let len = meta.len();
    if len > stored_bytes_max {
        return Err(AdoptError::TooLarge { path, len, max: stored_bytes_max });
    }
    let mut header = [0u8; CHUNK_HEADER_BYTES];
    file.read_exact_at(&mut header, 0).map_err(|source| match source.kind() {
        io::ErrorKind::UnexpectedEof => AdoptError::Chunk {
            path: path.clone(),
            source: CoreError::InvalidChunk(format!("{len} bytes, shorter than a chunk header")),
        },
        _ => AdoptError::Read { path: path.clone(), source },
    })?;
    let header =
        ChunkHeader::decode_header(&header).map_err(|source| AdoptError::Chunk { path: path.clone(), source })?;
    if header.hash != hash {
        return Err(AdoptError::WrongHeader { path, hash });
    }
    let (raw_len, payload_digest) = if header.codec == Codec::None {
        if header.raw_len.checked_add(CHUNK_HEADER_BYTES as u64) != Some(len) {
            return Err(AdoptError::Chunk {
                path,
                source: CoreError::InvalidChunk(format!(
                    "payload is {} bytes but the header says {} (truncated or torn write)",
                    len.saturating_sub(CHUNK_HEADER_BYTES as u64),
                    header.raw_len
                )),
            });
        }
        let actual = read_payload(&file, &path, len, None)?;
        if actual != hash {
            return Err(AdoptError::Chunk { path, source: CoreError::HashMismatch { expected: hash, actual } });
        }
        (header.raw_len, actual)
    } else {
        verify_encoded(&file, &path, len, &header, stored_bytes_max)?
    };
    // Test-only switch (power-loss audit): adopt the file without syncing its bytes.
    let skip_fsync = crate::switch_armed("adopt::skip_fsync");
    // The bytes are durable before the name points at them (a power cut never leaves a torn
    // chunk under its key); the group sync shares the flush with concurrent adopts.
    if !skip_fsync {
        fs.sync()?;
    }

    before_rename();

    let dir = dest.parent().ok_or_else(|| DurableError::NoParent { path: dest.into() })?;
    // Durably: the copy path below (another filesystem) has no group sync to cover it.
    durable::ensure_dir(dir)?;
    let tmp = durable::temp_path(dest);
    match std::fs::rename(handoff, &tmp) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            return copy_in(&file, &path, dest, payload_digest, len, raw_len)
        }
        Err(source) => return Err(DurableError::Rename { from: path, to: tmp, source }.into()),
    }
    // The name was resolved again by the rename: it must still be the inode verified above,
    // and nobody may have given it a second name since the first check.
    let moved = std::fs::symlink_metadata(&tmp).ok().map(|m| (m.dev(), m.ino()));
    let nlink = file.metadata().map(|m| m.nlink()).unwrap_or(0);
    if moved != Some((meta.dev(), meta.ino())) || nlink != 1 {
        remove_any(&tmp);
        tracing::warn!(path = %path.display(), "handoff file swapped or linked during adopt; refused");
        return Err(AdoptError::Swapped { path });
    }
    if let Err(e) = durable::rename_unsynced(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    if !skip_fsync {
        fs.sync()?;
    }
    Ok(Adopted { stored_len: len, raw_len, copied: false })
}

/// Checks an encoded handoff file: its payload must decode to the header's raw length and hash
/// to its address. Returns the raw length and the blake3 of the payload as stored.
fn verify_encoded(
    file: &File,
    path: &Path,
    len: u64,
    header: &ChunkHeader,
    stored_bytes_max: u64,
) -> Result<(u64, ChunkHash), AdoptError> {
    let raw_max = stored_bytes_max - CHUNK_HEADER_BYTES as u64;
    if header.raw_len > raw_max {
        return Err(AdoptError::TooLarge { path: path.into(), len: header.raw_len, max: raw_max });
    }
    let mut payload = vec![0u8; (len - CHUNK_HEADER_BYTES as u64) as usize];
    file.read_exact_at(&mut payload, CHUNK_HEADER_BYTES as u64)
        .map_err(|source| AdoptError::Read { path: path.into(), source })?;
    let mut raw = vec![0u8; header.raw_len as usize];
    ckpt_core::codec::decode_verified_into(header, &payload, &header.hash, &mut raw)
        .map_err(|source| AdoptError::Chunk { path: path.into(), source })?;
    Ok((header.raw_len, ChunkHash(*blake3::hash(&payload).as_bytes())))
}

/// The EXDEV path: copies the whole stored chunk through the verified fd into `dest`, hashing
/// the payload as it goes (it must be what was verified), and removes the handoff file once
/// the copy is durable.
fn copy_in(
    file: &File,
    path: &Path,
    dest: &Path,
    payload_digest: ChunkHash,
    len: u64,
    raw_len: u64,
) -> Result<Adopted, AdoptError> {
    let written = durable::write_new(dest, |out| {
        let actual = read_payload(file, path, len, Some(out)).map_err(io::Error::other)?;
        if actual != payload_digest {
            // Changed since it was verified: fail the write so nothing lands under the key.
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("copied bytes hash to {actual}")));
        }
        Ok(())
    });
    match written {
        Ok(()) => {}
        Err(DurableError::Write { source, .. }) if source.kind() == io::ErrorKind::InvalidData => {
            return Err(AdoptError::Swapped { path: path.into() });
        }
        Err(e) => return Err(e.into()),
    }
    // The chunk is durable; a handoff file left by a failed removal is only clutter.
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove an adopted handoff file");
    }
    Ok(Adopted { stored_len: len, raw_len, copied: true })
}

/// Reads bytes `0..len` of `file` (header, then payload) through a fixed buffer, copying them
/// to `out` if given, and returns the blake3 of the payload. A file shorter than `len` is a
/// read error.
fn read_payload(file: &File, path: &Path, len: u64, mut out: Option<&mut File>) -> Result<ChunkHash, AdoptError> {
    use std::io::Write;
    let err = |source: io::Error| AdoptError::Read { path: path.into(), source };
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut hasher = blake3::Hasher::new();
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at).map_err(err)?;
        let payload_from = (CHUNK_HEADER_BYTES as u64).saturating_sub(at).min(n as u64) as usize;
        hasher.update(&buf[payload_from..n]);
        if let Some(out) = out.as_deref_mut() {
            out.write_all(&buf[..n]).map_err(err)?;
        }
        at += n as u64;
    }
    Ok(ChunkHash(*hasher.finalize().as_bytes()))
}

/// Removes whatever a swapped-in name turned out to be.
fn remove_any(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        tracing::error!(path = %p.display(), error = %e, "cannot remove a swapped-in handoff file from the store");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(dir: &Path) -> FsSync {
        FsSync::open(dir).unwrap()
    }

    fn stored(payload: &[u8]) -> (ChunkHash, Vec<u8>) {
        let hash = ChunkHash::of(payload);
        let mut out = ChunkHeader { codec: Codec::None, raw_len: payload.len() as u64, hash }.encode().to_vec();
        out.extend_from_slice(payload);
        (hash, out)
    }

    /// Files under `dir`, recursively, relative.
    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_verified_file_is_renamed_into_place() {
        let t = tempfile::tempdir().unwrap();
        let (hash, bytes) = stored(&[7u8; 3 << 20]);
        let handoff = t.path().join("handoff-file");
        std::fs::write(&handoff, &bytes).unwrap();
        let dest = t.path().join("store/chunks/ab/chunk");
        let a = adopt(&handoff, &dest, hash, 64 << 20, &fs(t.path())).unwrap();
        assert_eq!(a, Adopted { stored_len: bytes.len() as u64, raw_len: 3 << 20, copied: false });
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!handoff.exists());
        assert_eq!(files(&t.path().join("store")), vec!["chunks/ab/chunk"], "temporary files left behind");
    }

    #[test]
    fn an_encoded_file_is_verified_by_what_it_decodes_to() {
        let t = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = (0..1u32 << 18).flat_map(|i| ((i % 97) as f32 * 0.01).to_le_bytes()).collect();
        let hash = ChunkHash::of(&raw);
        let opts = ckpt_core::codec::EncodeOptions { width_hint: Some(4), ..Default::default() };
        let (codec, payload) = ckpt_core::codec::encode(&raw, &opts);
        let payload = payload.expect("compressible");
        let mut bytes = ChunkHeader { codec, raw_len: raw.len() as u64, hash }.encode().to_vec();
        bytes.extend_from_slice(&payload);
        let dest = t.path().join("store/chunks/ab/chunk");
        // A damaged payload is refused and nothing is stored.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let handoff = t.path().join("bad");
        std::fs::write(&handoff, &bad).unwrap();
        assert!(matches!(adopt(&handoff, &dest, hash, 2 << 20, &fs(t.path())).unwrap_err(), AdoptError::Chunk { .. }));
        assert!(!dest.exists());
        let handoff = t.path().join("good");
        std::fs::write(&handoff, &bytes).unwrap();
        let a = adopt(&handoff, &dest, hash, 2 << 20, &fs(t.path())).unwrap();
        assert_eq!(a, Adopted { stored_len: bytes.len() as u64, raw_len: raw.len() as u64, copied: false });
        assert_eq!(ckpt_core::codec::decode_stored(&std::fs::read(&dest).unwrap(), &hash).unwrap(), raw);
        // Decoding to more than a chunk is refused before allocating it.
        std::fs::write(&handoff, &bytes).unwrap();
        assert!(matches!(
            adopt(&handoff, &dest, hash, 64 << 10, &fs(t.path())).unwrap_err(),
            AdoptError::TooLarge { .. }
        ));
    }

    #[test]
    fn a_file_swapped_between_check_and_rename_is_refused_and_nothing_is_stored() {
        let t = tempfile::tempdir().unwrap();
        let (hash, bytes) = stored(&[1u8; 100_000]);
        let mut other = bytes.clone();
        *other.last_mut().unwrap() ^= 1;
        let handoff = t.path().join("h");
        std::fs::write(&handoff, &bytes).unwrap();
        let dest = t.path().join("store/chunks/ab/chunk");
        let swap = || {
            let evil = t.path().join("evil");
            std::fs::write(&evil, &other).unwrap();
            std::fs::rename(&evil, &handoff).unwrap();
        };
        let e = adopt_with_hook(&handoff, &dest, hash, 64 << 20, &fs(t.path()), swap).unwrap_err();
        assert!(matches!(e, AdoptError::Swapped { .. }), "{e}");
        assert!(e.is_refusal());
        assert!(files(&t.path().join("store")).is_empty(), "{:?}", files(&t.path().join("store")));
    }

    #[test]
    fn a_second_name_made_between_check_and_rename_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (hash, bytes) = stored(&[2u8; 5000]);
        let handoff = t.path().join("h");
        std::fs::write(&handoff, &bytes).unwrap();
        let dest = t.path().join("store/chunks/ab/chunk");
        let link = || std::fs::hard_link(&handoff, t.path().join("alias")).unwrap();
        let e = adopt_with_hook(&handoff, &dest, hash, 64 << 20, &fs(t.path()), link).unwrap_err();
        assert!(matches!(e, AdoptError::Swapped { .. }), "{e}");
        assert!(files(&t.path().join("store")).is_empty());
    }

    #[test]
    fn links_special_files_and_bad_sizes_are_refused_without_reading_further() {
        let t = tempfile::tempdir().unwrap();
        let (hash, bytes) = stored(&[3u8; 5000]);
        let dest = t.path().join("store/chunks/ab/chunk");
        let good = t.path().join("good");
        std::fs::write(&good, &bytes).unwrap();

        std::os::unix::fs::symlink(&good, t.path().join("sym")).unwrap();
        let e = adopt(&t.path().join("sym"), &dest, hash, 1 << 20, &fs(t.path())).unwrap_err();
        assert!(matches!(e, AdoptError::NotRegular { what: "a symbolic link", .. }), "{e}");

        std::fs::hard_link(&good, t.path().join("hard")).unwrap();
        let e = adopt(&t.path().join("hard"), &dest, hash, 1 << 20, &fs(t.path())).unwrap_err();
        assert!(matches!(e, AdoptError::Linked { nlink: 2, .. }), "{e}");
        std::fs::remove_file(t.path().join("hard")).unwrap();

        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and has no other preconditions.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = adopt(&fifo, &dest, hash, 1 << 20, &fs(t.path())).unwrap_err();
        assert!(matches!(e, AdoptError::NotRegular { .. }), "{e}");

        let e = adopt(&good, &dest, hash, 4000, &fs(t.path())).unwrap_err();
        assert!(matches!(e, AdoptError::TooLarge { .. }), "{e}");
        let wrong = ChunkHash::of(b"another chunk");
        assert!(matches!(
            adopt(&good, &dest, wrong, 1 << 20, &fs(t.path())).unwrap_err(),
            AdoptError::WrongHeader { .. }
        ));
        std::fs::write(&good, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(adopt(&good, &dest, hash, 1 << 20, &fs(t.path())).unwrap_err().code(), "invalid_chunk");
        let mut flipped = bytes.clone();
        flipped[4000] ^= 0x10;
        std::fs::write(&good, &flipped).unwrap();
        assert_eq!(adopt(&good, &dest, hash, 1 << 20, &fs(t.path())).unwrap_err().code(), "hash_mismatch");
        assert!(!dest.exists());
        assert!(good.exists(), "a refused file is left to its writer");
    }

    #[test]
    fn a_handoff_file_on_another_filesystem_is_copied_through_the_verified_fd() {
        let shm = tempfile::tempdir_in("/dev/shm").expect("this test needs a writable /dev/shm (a tmpfs)");
        let t = tempfile::tempdir().unwrap();
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_ne!(dev(shm.path()), dev(t.path()), "/dev/shm is not another filesystem here; the test proves nothing");
        let (hash, bytes) = stored(&[9u8; (2 << 20) + 17]);
        let handoff = shm.path().join("h");
        std::fs::write(&handoff, &bytes).unwrap();
        let dest = t.path().join("store/chunks/ab/chunk");
        let a = adopt(&handoff, &dest, hash, 64 << 20, &fs(t.path())).unwrap();
        assert_eq!(
            a,
            Adopted {
                stored_len: bytes.len() as u64,
                raw_len: (bytes.len() - CHUNK_HEADER_BYTES) as u64,
                copied: true
            }
        );
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!handoff.exists(), "the handoff file must be removed after the copy");
        assert_eq!(files(&t.path().join("store")), vec!["chunks/ab/chunk"]);
    }
}
