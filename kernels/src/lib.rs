//! ckpt-kernels: what the GPU side of checkpointing computes, as CPU reference implementations
//! that a GPU twin must match bit for bit, and (feature `cuda`) the GPU twins themselves.
//!
//! Architecture Invariant: without the `cuda` feature there is no I/O and no dependency; every
//! function here is a pure function of its input bits, so a GPU kernel can be checked against
//! it on the same bytes. The `cuda` feature adds the device side (cudarc, loading libcuda,
//! NVRTC and NCCL at run time) and never changes what the CPU functions compute.

pub mod cast;
pub mod fingerprint;
pub mod incremental;
pub mod partition;
pub mod pattern;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod nccl;

pub use cast::{bf16_to_f32, bf16_to_f32_slice, f32_to_bf16, f32_to_bf16_slice};
pub use fingerprint::{fingerprint_bytes, fingerprint_f32, fingerprint_words, Fingerprint};
pub use incremental::{changed_chunks, chunk_fingerprints, ChangedChunks};
pub use partition::owned_range;
