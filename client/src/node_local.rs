//! The node-local transport (see `transport.rs`): chunk bytes through the filesystem when ckptd
//! runs on this host, and an `AsyncSaver`'s shared-memory segment.
//!
//! Design note.
//! * Discovery, once per client: only for a loopback URL, ckptd's `/v1/local` names its handoff
//!   directory and, for a local-directory store, the store's root; each is used only if this
//!   process can write (handoff) or read (store) it.
//! * Saving: a chunk is encoded with the core codec (byte-grouped planes for floating-point
//!   tensors when that pays) and written as a stored chunk file into the handoff directory; ckptd
//!   verifies it and renames it into the store. If ckptd refuses the path (its store is not a
//!   local directory), this client stops trying and uses HTTP.
//! * Reading: a chunk file is read from the store root straight into the caller's buffer,
//!   decoded there if encoded, and verified there. A missing file means "ask ckptd".

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use ckpt_core::codec::EncodeOptions;
use ckpt_core::{ChunkHash, ChunkHasher, ChunkHeader, Codec};
use serde::Deserialize;

use crate::error::ClientError;
use crate::http::Http;
use crate::transport::{verified, Outcome, ReadFailure, Transport, HASH_PIECE};
use futures::future::BoxFuture;

#[derive(Debug, Clone)]
struct LocalPaths {
    handoff_dir: Option<PathBuf>,
    store_root: Option<PathBuf>,
    segment_socket: Option<PathBuf>,
}

/// A shared-memory segment ckptd knows: chunks inside it are handed over by offset. ckptd
/// forgets the segment when `conn` closes.
pub(crate) struct Registered {
    pub token: String,
    _conn: std::os::unix::net::UnixStream,
}

/// Where a save's chunk bytes lie in a registered segment.
#[derive(Clone, Copy)]
pub(crate) struct SegmentView<'a> {
    pub token: &'a str,
    /// Address and length of the segment's mapping in this process.
    pub base: usize,
    pub len: usize,
}

impl SegmentView<'_> {
    /// The offset of `data` in the segment, if it lies wholly inside it.
    fn offset_of(&self, data: &[u8]) -> Option<u64> {
        let at = (data.as_ptr() as usize).checked_sub(self.base)?;
        (at + data.len() <= self.len).then_some(at as u64)
    }
}

pub(crate) struct NodeLocal {
    http: Http,
    enabled: bool,
    encode: EncodeOptions,
    paths: tokio::sync::OnceCell<Option<LocalPaths>>,
    handoff_refused: AtomicBool,
}

/// Why a chunk could not be read from the local store.
enum LocalRead {
    /// Not here (or the path is unavailable): ask ckptd.
    Missing,
    Corrupt(String),
}

impl NodeLocal {
    pub fn new(http: Http, enabled: bool, encode: EncodeOptions) -> NodeLocal {
        NodeLocal { http, enabled, encode, paths: Default::default(), handoff_refused: AtomicBool::new(false) }
    }

    async fn paths(&self) -> Option<&LocalPaths> {
        let http = &self.http;
        if !self.enabled {
            return None;
        }
        self.paths
            .get_or_init(|| async {
                let host = reqwest::Url::parse(http.base()).ok()?.host_str()?.to_string();
                if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1") {
                    return None;
                }
                #[derive(Deserialize)]
                struct Local {
                    handoff_dir: Option<PathBuf>,
                    store_root: Option<PathBuf>,
                    #[serde(default)]
                    segment_socket: Option<PathBuf>,
                }
                let l: Local = http.get_json("/v1/local").await.ok()?;
                let handoff_dir = l.handoff_dir.filter(|d| {
                    let probe = d.join(format!("probe-{}", std::process::id()));
                    let ok = std::fs::write(&probe, b"").is_ok();
                    let _ = std::fs::remove_file(&probe);
                    ok
                });
                let store_root = l.store_root.filter(|d| d.is_dir());
                tracing::debug!(?handoff_dir, ?store_root, segment_socket = ?l.segment_socket, "node-local path");
                Some(LocalPaths { handoff_dir, store_root, segment_socket: l.segment_socket })
            })
            .await
            .as_ref()
    }

    /// The local store's root once discovery has found one this process can read.
    fn store_root(&self) -> Option<&Path> {
        self.paths.get().and_then(|p| p.as_ref()).and_then(|l| l.store_root.as_deref())
    }

    /// Registers the memfd `file` with ckptd as a shared-memory segment; `None` when ckptd
    /// offers no segment socket or refuses (the saver then hands over files).
    pub async fn register_segment(&self, file: &std::fs::File) -> Option<Registered> {
        let socket = self.paths().await?.segment_socket.clone()?;
        let file = file.try_clone().ok()?;
        let registered = tokio::task::spawn_blocking(move || register_blocking(&socket, &file)).await.ok()?;
        match registered {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "segment registration refused; using handoff files");
                None
            }
        }
    }

    /// Hands a chunk lying in a registered segment to ckptd by its offset, unnamed: ckptd
    /// hashes its own copy and answers the address and whether it wrote the chunk (false: the
    /// job had it). Ok(None) when the chunk is not in the segment or ckptd refuses the path
    /// (the caller hashes it and uses another one).
    pub async fn put_segment_unnamed(
        &self,
        job: &str,
        data: &Bytes,
        width: Option<u8>,
        seg: SegmentView<'_>,
    ) -> Result<Option<(ChunkHash, bool)>, ClientError> {
        #[derive(Deserialize)]
        struct Adopted {
            hash: ChunkHash,
            written: bool,
        }
        let Some(offset) = seg.offset_of(data) else { return Ok(None) };
        let body = self.segment_body(seg.token, offset, data.len() as u64, width);
        let adopted: Option<Adopted> = post_segment(&self.http, &format!("/v1/jobs/{job}/chunks/adopt"), &body).await?;
        Ok(adopted.map(|a| (a.hash, a.written)))
    }

    /// Hands a chunk lying in a registered segment to ckptd by its offset, naming it (ckptd
    /// checks the address): for chunks whose hash the saver already knows but ckptd lacks.
    /// Ok(false) when the chunk is not in the segment or ckptd refuses the path (the caller
    /// uses another one).
    pub async fn put_segment_chunk(
        &self,
        job: &str,
        hash: ChunkHash,
        data: &Bytes,
        width: Option<u8>,
        seg: SegmentView<'_>,
    ) -> Result<bool, ClientError> {
        let Some(offset) = seg.offset_of(data) else { return Ok(false) };
        let body = self.segment_body(seg.token, offset, data.len() as u64, width);
        let adopted: Option<serde_json::Value> =
            post_segment(&self.http, &format!("/v1/jobs/{job}/chunks/{hash}/adopt"), &body).await?;
        Ok(adopted.is_some())
    }

    fn segment_body(&self, token: &str, offset: u64, len: u64, width: Option<u8>) -> serde_json::Value {
        serde_json::json!({ "segment": token, "offset": offset, "len": len, "width": width, "level": self.encode.level })
    }

    /// Hands a chunk to ckptd as a file. Ok(false) when the path is not available (the caller
    /// sends it over HTTP).
    async fn handoff(&self, job: &str, hash: ChunkHash, data: &Bytes, width: Option<u8>) -> Result<bool, ClientError> {
        if self.handoff_refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let Some(dir) = self.paths().await.and_then(|l| l.handoff_dir.clone()) else { return Ok(false) };
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!("{hash}.{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(&name);
        let (p, d, opts) = (path.clone(), data.clone(), EncodeOptions { width_hint: width, ..self.encode });
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let (codec, encoded) = ckpt_core::codec::encode(&d, &opts);
            let header = ChunkHeader { codec, raw_len: d.len() as u64, hash };
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&header.encode())?;
            f.write_all(encoded.as_deref().unwrap_or(&d))
        })
        .await
        .map_err(|e| ClientError::Internal(e.to_string()))?;
        if let Err(e) = written {
            tracing::debug!(error = %e, "handoff write failed; using HTTP");
            let _ = std::fs::remove_file(&path);
            return Ok(false);
        }
        let r: Result<serde_json::Value, _> = self
            .http
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
}

/// Hands chunks over as files in ckptd's handoff directory and reads them straight from its
/// local-directory store; declines whatever the host or the store does not allow.
impl Transport for NodeLocal {
    fn is_local(&self) -> bool {
        true
    }

    fn prepare(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.paths().await;
        })
    }

    fn put<'a>(
        &'a self,
        job: &'a str,
        hash: ChunkHash,
        data: &'a Bytes,
        width: Option<u8>,
    ) -> BoxFuture<'a, Result<Outcome, ClientError>> {
        Box::pin(async move {
            let carried = self.handoff(job, hash, data, width).await?;
            Ok(if carried { Outcome::Carried } else { Outcome::Declined })
        })
    }

    fn read_into(
        &self,
        job: &str,
        hash: ChunkHash,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Outcome, ReadFailure> {
        // Discovery is `prepare`'s job; before it (or without a readable store) reads decline.
        let Some(root) = self.store_root() else {
            return Ok(Outcome::Declined);
        };
        match read_chunk_into(&root.join(ckpt_core::keys::chunk_key(job, &hash)), hash, out, scratch) {
            Ok(actual) => verified(hash, actual, "stored bytes"),
            Err(LocalRead::Missing) => Ok(Outcome::Declined),
            Err(LocalRead::Corrupt(reason)) => Err(ReadFailure::Corrupt(reason)),
        }
    }
}

/// Reads one stored chunk file into `out` (exactly its raw length), decoding it in place if
/// encoded, and returns the address of what landed there (a raw payload is hashed piece by
/// piece as it is read); the caller compares. Blocking. `scratch` holds an encoded payload
/// between reads.
fn read_chunk_into(
    path: &Path,
    hash: ChunkHash,
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<ChunkHash, LocalRead> {
    use std::io::Read;
    let corrupt = |why: String| LocalRead::Corrupt(why);
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LocalRead::Missing),
        Err(e) => return Err(corrupt(format!("reading {}: {e}", path.display()))),
    };
    let size = f.metadata().map_err(|e| corrupt(e.to_string()))?.len();
    let mut head = [0u8; ckpt_core::CHUNK_HEADER_BYTES];
    f.read_exact(&mut head).map_err(|_| corrupt("stored chunk is shorter than its header".into()))?;
    let header = ChunkHeader::decode_header(&head).map_err(|e| corrupt(e.to_string()))?;
    if header.hash != hash || header.raw_len != out.len() as u64 {
        return Err(corrupt(format!("header names chunk {} of {} bytes", header.hash, header.raw_len)));
    }
    let payload_len = size - ckpt_core::CHUNK_HEADER_BYTES as u64;
    if header.codec == Codec::None {
        if payload_len != header.raw_len {
            return Err(corrupt(format!(
                "payload is {payload_len} bytes, the header says {} (torn write)",
                header.raw_len
            )));
        }
        let mut hasher = ChunkHasher::default();
        for piece in out.chunks_mut(HASH_PIECE) {
            f.read_exact(piece).map_err(|e| corrupt(e.to_string()))?;
            hasher.update(piece);
        }
        return Ok(hasher.finish());
    }
    if payload_len > out.len() as u64 + (1 << 20) {
        return Err(corrupt(format!("an encoded payload of {payload_len} bytes for {} raw bytes", out.len())));
    }
    scratch.clear();
    f.read_to_end(scratch).map_err(|e| corrupt(e.to_string()))?;
    ckpt_core::codec::decode_into(&header, scratch, out).map_err(|e| corrupt(e.to_string()))?;
    Ok(ChunkHash::of(out))
}

/// Connects to ckptd's segment socket, sends one byte with `file` attached and reads the
/// token line. Blocking, bounded by socket timeouts.
fn register_blocking(socket: &Path, file: &std::fs::File) -> std::io::Result<Registered> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let conn = std::os::unix::net::UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(std::time::Duration::from_secs(10)))?;
    let fds = [file.as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(b"s")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    let mut line = String::new();
    std::io::BufReader::new(&conn).read_line(&mut line)?;
    let token = line.trim();
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(std::io::Error::other(format!("ckptd answered {token:?}")));
    }
    conn.set_read_timeout(None)?;
    Ok(Registered { token: token.to_string(), _conn: conn })
}

/// Sends a segment adopt. Ok(None) when ckptd refuses it (a closed segment, a store that is not
/// a local directory, a hash mismatch): the caller sends the bytes another way.
async fn post_segment<T: serde::de::DeserializeOwned>(
    http: &Http,
    path: &str,
    body: &serde_json::Value,
) -> Result<Option<T>, ClientError> {
    match http.send_json(reqwest::Method::POST, path, body).await {
        Ok(answer) => Ok(Some(answer)),
        Err(e) if e.api_code().is_some() => {
            tracing::debug!(error = %e, "segment adopt refused; using another path");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
