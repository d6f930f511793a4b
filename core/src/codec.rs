//! The chunk codecs: how a chunk's raw bytes become its stored payload and back. ckptd (HTTP
//! uploads, reads it serves) and the client (node-local handoff and direct reads) both encode
//! and decode here, so a chunk written by either path reads the same on the other.
//!
//! * `None`: the payload is the raw bytes.
//! * `Zstd`: one zstd frame of the raw bytes.
//! * `Grouped`: byte-grouped, the layout ZipNN showed suits model weights. For an element width
//!   `w` (2 for bf16/fp16, 4 for fp32, 8 for fp64), byte `p` of every element goes to plane `p`:
//!   the planes holding sign and exponent repeat a few values and compress well, while the low
//!   mantissa planes are noise and are stored as they are instead of being fed to zstd for
//!   nothing. Payload:
//!
//!   ```text
//!   0           width w (2, 4 or 8)
//!   1..1+9w     per plane: kind (0 raw, 1 zstd), stored length u64 little-endian
//!   then        the w plane bodies in order, then the raw tail (raw_len % w bytes)
//!   ```
//!
//! Choosing: a sample of the chunk is measured first (byte entropy per plane, cheap), and only a
//! codec whose sample saves at least `min_savings_pct` is run on the whole chunk, which must then
//! save that much too; otherwise the chunk is stored raw. The element width comes from the
//! tensor's dtype when the writer knows it, and is otherwise guessed among 2 and 4 on the sample.
//!
//! Decoding never trusts the payload: sizes are checked against the header before anything is
//! allocated or written, and `decode_verified_into` checks the content address after decoding.

use std::cell::RefCell;

use crate::chunk::{ChunkHeader, Codec};
use crate::error::CoreError;
use crate::hash::ChunkHash;

/// Bytes measured to choose a codec.
const SAMPLE_BYTES: usize = 64 << 10;
/// Chunks shorter than this are stored raw: a frame's overhead eats what they would save.
const MIN_ENCODED_BYTES: usize = 4096;
const PLANE_RAW: u8 = 0;
const PLANE_ZSTD: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// zstd level; 0 stores every chunk raw.
    pub level: i32,
    /// A codec is used only if it saves at least this share of the bytes.
    pub min_savings_pct: u32,
    /// Element width in bytes, when the writer knows the tensor's dtype.
    pub width_hint: Option<u8>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { level: 3, min_savings_pct: 10, width_hint: None }
    }
}

/// The element width the grouped codec uses for a dtype, if grouping can help it.
pub fn width_for(dtype: crate::DType) -> Option<u8> {
    match dtype.size_bytes() {
        w @ (2 | 4 | 8) => Some(w as u8),
        _ => None,
    }
}

/// What an encoder reuses from chunk to chunk: the plane buffer of the grouped codec and a zstd
/// context. A fresh pair per chunk costs megabytes of first-touch page faults and allocations;
/// a service bounds its encoders by holding a fixed number of these.
#[derive(Default)]
pub struct Workspace {
    planes: Vec<u8>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Workspace {
    /// `data` as one zstd frame at `level`, with the reused context.
    fn compress(&mut self, data: &[u8], level: i32) -> Option<Vec<u8>> {
        if self.zstd.as_ref().map(|(l, _)| *l) != Some(level) {
            self.zstd = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        self.zstd.as_mut()?.1.compress(data).ok()
    }
}

thread_local! {
    /// The workspace of [`encode`], one per thread.
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Encodes `raw` with this thread's workspace. `None` as payload means "store the raw bytes"
/// (the caller keeps its buffer).
pub fn encode(raw: &[u8], opts: &EncodeOptions) -> (Codec, Option<Vec<u8>>) {
    WORKSPACE.with(|ws| encode_with(raw, opts, &mut ws.borrow_mut()))
}

/// [`encode`] with the caller's workspace.
pub fn encode_with(raw: &[u8], opts: &EncodeOptions, ws: &mut Workspace) -> (Codec, Option<Vec<u8>>) {
    if opts.level == 0 || raw.len() < MIN_ENCODED_BYTES {
        return (Codec::None, None);
    }
    let worth =
        |original: usize, stored: usize| (stored as u64) * 100 <= original as u64 * (100 - opts.min_savings_pct as u64);
    let sample = &raw[..raw.len().min(SAMPLE_BYTES)];
    let widths: &[u8] = match opts.width_hint {
        Some(w) if matches!(w, 2 | 4 | 8) => &[w][..],
        Some(_) => &[],
        None => &[2, 4],
    };
    // Estimated stored bytes of the sample for each candidate, from order-0 byte entropy: what
    // zstd's entropy stage alone achieves, so a conservative guess that costs one pass.
    let (mut codec, mut width, mut est) = (Codec::Zstd, 0u8, entropy_bytes(sample.iter().copied()));
    for &w in widths {
        let planes: f64 =
            (0..w as usize).map(|p| entropy_bytes(sample.iter().skip(p).step_by(w as usize).copied())).sum();
        // Grouping costs a transposition: it must win clearly.
        if planes < est * 0.97 {
            (codec, width, est) = (Codec::Grouped, w, planes);
        }
    }
    if !worth(sample.len(), est as usize) {
        // Order-0 entropy misses repeats (a counter, a pattern): zstd on a small piece decides.
        let piece = &sample[..sample.len().min(16 << 10)];
        match ws.compress(piece, opts.level) {
            Some(c) if worth(piece.len(), c.len()) => codec = Codec::Zstd,
            _ => return (Codec::None, None),
        }
    }
    let payload = match codec {
        Codec::Grouped => Some(encode_grouped(raw, width, opts, ws)),
        _ => ws.compress(raw, opts.level),
    };
    match payload {
        Some(p) if worth(raw.len(), p.len()) => (codec, Some(p)),
        _ => (Codec::None, None),
    }
}

thread_local! {
    /// Plane buffer of the decoder, reused across chunks, so steady-state decoding allocates
    /// nothing.
    static PLANES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Order-0 entropy of the bytes, as the bytes it would take to store them.
fn entropy_bytes(bytes: impl Iterator<Item = u8>) -> f64 {
    let mut counts = [0u64; 256];
    let mut n = 0u64;
    for b in bytes {
        counts[b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -(c as f64) * p.log2()
        })
        .sum();
    bits / 8.0
}

fn encode_grouped(raw: &[u8], w: u8, opts: &EncodeOptions, ws: &mut Workspace) -> Vec<u8> {
    let wu = w as usize;
    let n = raw.len() / wu;
    let mut planes = std::mem::take(&mut ws.planes);
    {
        planes.clear();
        planes.resize(n * wu, 0);
        split_planes(&raw[..n * wu], wu, &mut planes);
        let mut table = Vec::with_capacity(1 + 9 * wu);
        table.push(w);
        let mut bodies: Vec<u8> = Vec::with_capacity(raw.len() / 2);
        for p in 0..wu {
            let plane = &planes[p * n..(p + 1) * n];
            let sample = &plane[..plane.len().min(SAMPLE_BYTES / wu)];
            // A plane of noise (a mantissa's low byte) is stored as it is without trying zstd.
            let promising = entropy_bytes(sample.iter().copied()) < sample.len() as f64 * 0.97;
            let compressed = if promising { ws.compress(plane, opts.level) } else { None };
            match compressed {
                Some(c) if c.len() < plane.len() => {
                    table.push(PLANE_ZSTD);
                    table.extend_from_slice(&(c.len() as u64).to_le_bytes());
                    bodies.extend_from_slice(&c);
                }
                _ => {
                    table.push(PLANE_RAW);
                    table.extend_from_slice(&(plane.len() as u64).to_le_bytes());
                    bodies.extend_from_slice(plane);
                }
            }
        }
        table.extend_from_slice(&bodies);
        table.extend_from_slice(&raw[n * wu..]);
        ws.planes = planes;
        table
    }
}

/// `planes[p*n + i] = elems[i*w + p]`.
fn split_planes(elems: &[u8], w: usize, planes: &mut [u8]) {
    let n = elems.len() / w;
    match w {
        2 => split_n::<2>(elems, planes, n),
        4 => split_n::<4>(elems, planes, n),
        8 => split_n::<8>(elems, planes, n),
        _ => unreachable!("widths are checked"),
    }
}

fn split_n<const W: usize>(elems: &[u8], planes: &mut [u8], n: usize) {
    let mut outs: [&mut [u8]; W] = split_mut::<W>(planes, n);
    for (i, e) in elems.chunks_exact(W).enumerate() {
        for (p, out) in outs.iter_mut().enumerate() {
            out[i] = e[p];
        }
    }
}

fn join_n<const W: usize>(planes: &[u8], out: &mut [u8], n: usize) {
    let ins: [&[u8]; W] = std::array::from_fn(|p| &planes[p * n..(p + 1) * n]);
    for (i, e) in out.chunks_exact_mut(W).enumerate() {
        for (b, plane) in e.iter_mut().zip(ins.iter()) {
            *b = plane[i];
        }
    }
}

fn split_mut<const W: usize>(planes: &mut [u8], n: usize) -> [&mut [u8]; W] {
    let mut rest = planes;
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        head
    })
}

/// Decodes a payload into `out`, which must be exactly the header's raw length. Does not check
/// the content address: see [`decode_verified_into`].
pub fn decode_into(header: &ChunkHeader, payload: &[u8], out: &mut [u8]) -> Result<(), CoreError> {
    let bad = |why: String| CoreError::InvalidChunk(why);
    if out.len() as u64 != header.raw_len {
        return Err(bad(format!("the header says {} bytes, the reader expects {}", header.raw_len, out.len())));
    }
    match header.codec {
        Codec::None => {
            if payload.len() != out.len() {
                return Err(bad(format!(
                    "payload is {} bytes but the header says {} (truncated or torn write)",
                    payload.len(),
                    header.raw_len
                )));
            }
            out.copy_from_slice(payload);
        }
        Codec::Zstd => {
            let n = zstd::bulk::decompress_to_buffer(payload, out)
                .map_err(|e| bad(format!("zstd payload does not decode: {e}")))?;
            if n != out.len() {
                return Err(bad(format!("decodes to {n} bytes, the header says {}", out.len())));
            }
        }
        Codec::Grouped => decode_grouped(payload, out)?,
    }
    Ok(())
}

fn decode_grouped(payload: &[u8], out: &mut [u8]) -> Result<(), CoreError> {
    let bad = |why: String| CoreError::InvalidChunk(format!("grouped payload: {why}"));
    let w = *payload.first().ok_or_else(|| bad("empty".into()))? as usize;
    if !matches!(w, 2 | 4 | 8) {
        return Err(bad(format!("element width {w}")));
    }
    let table_len = 1 + 9 * w;
    if payload.len() < table_len {
        return Err(bad("shorter than its plane table".into()));
    }
    let n = out.len() / w;
    let tail = out.len() - n * w;
    let mut offset = table_len as u64;
    let mut planes_at = Vec::with_capacity(w);
    for p in 0..w {
        let d = &payload[1 + 9 * p..1 + 9 * (p + 1)];
        let kind = d[0];
        let len = u64::from_le_bytes(d[1..9].try_into().expect("8 bytes"));
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= payload.len() as u64)
            .ok_or_else(|| bad("plane overruns".into()))?;
        if kind == PLANE_RAW && len != n as u64 || kind > PLANE_ZSTD {
            return Err(bad(format!("plane {p} of kind {kind} is {len} bytes for {n} elements")));
        }
        planes_at.push((kind, offset as usize..end as usize));
        offset = end;
    }
    if payload.len() as u64 - offset != tail as u64 {
        return Err(bad(format!("tail is {} bytes, expected {tail}", payload.len() as u64 - offset)));
    }
    PLANES.with(|planes| -> Result<(), CoreError> {
        let mut planes = planes.borrow_mut();
        planes.clear();
        planes.resize(n * w, 0);
        for (p, (kind, range)) in planes_at.into_iter().enumerate() {
            let dst = &mut planes[p * n..(p + 1) * n];
            let body = &payload[range];
            if kind == PLANE_RAW {
                dst.copy_from_slice(body);
            } else {
                let got = zstd::bulk::decompress_to_buffer(body, dst)
                    .map_err(|e| bad(format!("plane {p} does not decode: {e}")))?;
                if got != n {
                    return Err(bad(format!("plane {p} decodes to {got} bytes, expected {n}")));
                }
            }
        }
        let (elems, rest) = out.split_at_mut(n * w);
        match w {
            2 => join_n::<2>(&planes, elems, n),
            4 => join_n::<4>(&planes, elems, n),
            _ => join_n::<8>(&planes, elems, n),
        }
        rest.copy_from_slice(&payload[offset as usize..]);
        Ok(())
    })
}

/// Decodes into `out` and checks the result against the header's address and `expected`.
pub fn decode_verified_into(
    header: &ChunkHeader,
    payload: &[u8],
    expected: &ChunkHash,
    out: &mut [u8],
) -> Result<(), CoreError> {
    if header.hash != *expected {
        return Err(CoreError::InvalidChunk(format!("the header names chunk {}", header.hash)));
    }
    decode_into(header, payload, out)?;
    expected.verify(out)
}

/// Decodes a whole stored chunk (header and payload) into a new buffer, verified.
pub fn decode_stored(stored: &[u8], expected: &ChunkHash) -> Result<Vec<u8>, CoreError> {
    let (header, payload) = ChunkHeader::decode(stored)?;
    let len = usize::try_from(header.raw_len).map_err(|_| CoreError::InvalidChunk("too large".into()))?;
    // A hostile header could claim any length: a payload cannot expand beyond zstd's ratio bound.
    if header.codec != Codec::None && (len as u64) > (payload.len() as u64).saturating_mul(ZSTD_MAX_RATIO) + 4096 {
        return Err(CoreError::InvalidChunk(format!("{} payload bytes cannot decode to {len}", payload.len())));
    }
    let mut out = vec![0u8; len];
    decode_verified_into(&header, payload, expected, &mut out)?;
    Ok(out)
}

/// zstd expands at most ~32,000-fold (a block of one repeated byte); used only to refuse
/// absurd headers before allocating.
const ZSTD_MAX_RATIO: u64 = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkHeader;

    fn round_trip(raw: &[u8], opts: &EncodeOptions) -> Codec {
        let (codec, payload) = encode(raw, opts);
        let hash = ChunkHash::of(raw);
        let header = ChunkHeader { codec, raw_len: raw.len() as u64, hash };
        let payload = payload.unwrap_or_else(|| raw.to_vec());
        let mut out = vec![0xAAu8; raw.len()];
        decode_verified_into(&header, &payload, &hash, &mut out).unwrap();
        assert_eq!(out, raw);
        codec
    }

    /// fp32 values like a trained layer's: small normal values, so sign and exponent bytes repeat.
    fn weights(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n * 4 + 3);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            let v = ((u - 0.5) * 0.04) as f32;
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    #[test]
    fn trained_like_fp32_is_grouped_and_saves_more_than_zstd() {
        let raw = weights(1 << 18, 7);
        let opts = EncodeOptions { width_hint: Some(4), ..Default::default() };
        let (codec, payload) = encode(&raw, &opts);
        assert_eq!(codec, Codec::Grouped);
        let grouped = payload.unwrap().len();
        let plain = zstd::bulk::compress(&raw, 3).unwrap().len();
        assert!(grouped < plain, "grouped {grouped} should beat plain zstd {plain}");
        assert_eq!(round_trip(&raw, &opts), Codec::Grouped);
        // Without the hint the sample test finds the width.
        assert_eq!(round_trip(&raw, &EncodeOptions::default()), Codec::Grouped);
    }

    #[test]
    fn noise_is_raw_zeros_and_patterns_are_zstd() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(round_trip(&noise, &EncodeOptions::default()), Codec::None);
        assert_eq!(round_trip(&vec![0u8; 1 << 20], &EncodeOptions::default()), Codec::Zstd);
        let counter: Vec<u8> = (0..1u32 << 20).map(|i| i as u8).collect();
        assert_ne!(round_trip(&counter, &EncodeOptions::default()), Codec::None, "repeats are found");
        assert_eq!(round_trip(&vec![0u8; 1 << 20], &EncodeOptions { level: 0, ..Default::default() }), Codec::None);
    }

    #[test]
    fn odd_lengths_and_every_width() {
        for w in [2u8, 4, 8] {
            for extra in 0..w as usize {
                let mut raw = weights(5000, w as u64 + extra as u64);
                raw.extend(std::iter::repeat_n(3u8, extra));
                let opts = EncodeOptions { width_hint: Some(w), min_savings_pct: 0, ..Default::default() };
                round_trip(&raw, &opts);
                let payload = encode_grouped(&raw, w, &opts, &mut Workspace::default());
                let header =
                    ChunkHeader { codec: Codec::Grouped, raw_len: raw.len() as u64, hash: ChunkHash::of(&raw) };
                let mut out = vec![0u8; raw.len()];
                decode_verified_into(&header, &payload, &header.hash, &mut out).unwrap();
                assert_eq!(out, raw, "width {w}, tail {extra}");
            }
        }
    }

    #[test]
    fn a_reused_workspace_encodes_exactly_as_a_fresh_one() {
        // One workspace across levels, widths and codecs: leftovers (a larger plane buffer, a
        // context at another level) must never change a payload.
        let mut ws = Workspace::default();
        let inputs = [weights(1 << 16, 4), weights(3 << 14, 2), vec![0u8; 1 << 16], weights(5001, 8)];
        for level in [3, 1, 3, 9] {
            for (i, raw) in inputs.iter().enumerate() {
                for hint in [None, Some(2), Some(4), Some(8)] {
                    let opts = EncodeOptions { level, width_hint: hint, min_savings_pct: 0 };
                    let reused = encode_with(raw, &opts, &mut ws);
                    let fresh = encode_with(raw, &opts, &mut Workspace::default());
                    assert_eq!(reused, fresh, "input {i}, level {level}, width {hint:?}");
                }
            }
        }
    }

    #[test]
    fn damaged_payloads_are_errors_not_panics() {
        let raw = weights(1 << 14, 3);
        let opts = EncodeOptions { width_hint: Some(4), min_savings_pct: 0, ..Default::default() };
        let payload = encode_grouped(&raw, 4, &opts, &mut Workspace::default());
        let header = ChunkHeader { codec: Codec::Grouped, raw_len: raw.len() as u64, hash: ChunkHash::of(&raw) };
        let mut out = vec![0u8; raw.len()];
        for cut in [0, 1, 10, 37, payload.len() / 2, payload.len() - 1] {
            assert!(decode_verified_into(&header, &payload[..cut], &header.hash, &mut out).is_err(), "cut at {cut}");
        }
        for i in (0..payload.len()).step_by(97) {
            let mut bad = payload.clone();
            bad[i] ^= 0x40;
            assert!(decode_verified_into(&header, &bad, &header.hash, &mut out).is_err(), "flip at {i}");
        }
        let mut wrong_size = vec![0u8; raw.len() - 1];
        assert!(decode_into(&header, &payload, &mut wrong_size).is_err());
        let mut lying = header.encode().to_vec();
        lying[5] = 1;
        lying[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        lying.extend_from_slice(&[0u8; 100]);
        assert!(decode_stored(&lying, &header.hash).is_err(), "a header claiming a TiB is refused before allocating");
    }
}
