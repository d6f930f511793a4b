//! ckpt-client: the async client library for ckptd.
//!
//! A rank saves its tensors with [`Client::save`]: the tensors are cut into fixed-size chunks,
//! each chunk is hashed (blake3, on blocking threads), ckptd is asked which hashes it lacks, only
//! those are sent, and then the rank's shard index. ckptd commits the step once every rank's
//! index is in. [`Client::load_rank`] reads a rank's tensors back and verifies every chunk
//! before returning a byte of it.

pub mod async_save;
pub mod auth;
pub mod checkpoint;
pub mod client;
pub mod daemon;
pub mod error;
mod http;
mod node_local;
pub mod reshard;
pub mod restore;
pub mod tensor;
mod transport;

pub use async_save::{AsyncSaver, ChangeDetection, SaveTicket, TensorView};
pub use auth::{TlsFiles, Token};
pub use checkpoint::Checkpoint;
pub use client::{Client, ClientOptions, SaveReport, SaveSpec, VerifyReport, Wait};
pub use error::ClientError;
pub use reshard::RowReader;
pub use restore::{RestoreReport, RestoreTarget};
pub use tensor::Tensor;

pub use ckpt_core::{DType, Manifest, ManifestSummary, SavePhase, ShardIndex, TensorEntry};
