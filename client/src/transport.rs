//! The one interface chunk bytes travel through, whichever way they go.
//!
//! Design note.
//! * The orchestration (`client.rs` for saves, `restore.rs` for reads) holds its transports in
//!   order of preference: the node-local one (`node_local.rs`) when it is enabled, HTTP
//!   (`http.rs`) last. For each chunk it asks them in turn; a transport that cannot carry this
//!   chunk right now (ckptd is on another host, the file is not in the local store, the handoff
//!   directory is refused) answers `Declined` and the next one is asked. HTTP never declines,
//!   so every chunk has a way.
//! * A transport that reads a chunk verifies it against its address before it answers
//!   `Carried`, so no path hands the orchestration unverified bytes; a chunk that is there but
//!   wrong is `Corrupt`, which stops the chain (another transport would read the same bytes).
//! * Reads are blocking calls made on the restore's worker threads, which have entered the
//!   client's runtime: a transport that needs the network drives its future on that runtime.
//! * What is not here: the shared-memory segment hand-over of an `AsyncSaver`, which exists only
//!   for a buffer registered with a node-local ckptd, and can name chunks as well as carry them
//!   (`NodeLocal::put_segment_*`).

use bytes::Bytes;
use ckpt_core::ChunkHash;
use futures::future::BoxFuture;

use crate::error::ClientError;

/// Whether a transport took care of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Carried,
    /// Not this way: ask the next transport.
    Declined,
}

/// Why a read that a transport did attempt failed.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The chunk is there and wrong (or missing where it must be): reading it another way
    /// would not help.
    Corrupt(String),
    Failed(ClientError),
}

/// One way chunk bytes travel between this process and ckptd.
pub(crate) trait Transport: Send + Sync {
    /// Whether chunks come through this host's filesystem (counted by restore reports).
    fn is_local(&self) -> bool;

    /// Gets ready to serve reads (discovery); called once before a batch of reads.
    fn prepare(&self) -> BoxFuture<'_, ()>;

    /// Hands one chunk, whose address is `hash`, to ckptd. `width` is the element width of the
    /// tensor it was cut from, for codecs that group bytes by it.
    fn put<'a>(
        &'a self,
        job: &'a str,
        hash: ChunkHash,
        data: &'a Bytes,
        width: Option<u8>,
    ) -> BoxFuture<'a, Result<Outcome, ClientError>>;

    /// Reads chunk `hash` (exactly `out.len()` raw bytes) into `out` and verifies it there.
    /// Blocking. `scratch` may hold an encoded payload between calls.
    fn read_into(
        &self,
        job: &str,
        hash: ChunkHash,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Outcome, ReadFailure>;
}

/// Reads and hashes a chunk's bytes in pieces of this size: each piece is hashed while it is
/// still in the core's cache (a whole 4 MiB chunk, read and then hashed, has left it by then
/// when several readers share the cores).
pub(crate) const HASH_PIECE: usize = 256 << 10;

/// Checks the address of the bytes a transport read (`actual`) against the one asked for.
pub(crate) fn verified(hash: ChunkHash, actual: ChunkHash, how: &str) -> Result<Outcome, ReadFailure> {
    if actual != hash {
        return Err(ReadFailure::Corrupt(format!("{how} hash to {actual}")));
    }
    Ok(Outcome::Carried)
}
