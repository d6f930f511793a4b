//! The embedded trainer: a small Llama 3 model trained by data-parallel rank processes with
//! ZeRO-sharded state, checkpointed asynchronously through ckptd, restarted by an elastic
//! agent from the last committed checkpoint when a rank dies or hangs.

pub mod collective;
pub mod config;
pub mod data;
pub mod flight;
pub mod model;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod replica;
pub mod spec;

/// Little-endian f32 values of `bytes` (the checkpoint and wire format); a trailing partial
/// value is ignored.
pub fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
