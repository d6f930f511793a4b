//! ckpt-kernels: what the GPU side of checkpointing computes, as CPU reference implementations
//! that a GPU twin must match bit for bit.
//!
//! Architecture Invariant: no I/O and no dependencies; every function here is a pure function of
//! its input bits, so a GPU kernel can be checked against it on the same bytes.

pub mod fingerprint;

pub use fingerprint::{fingerprint_f32, fingerprint_words, Fingerprint};
