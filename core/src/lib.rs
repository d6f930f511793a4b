//! ckpt-core: the formats and the protocol of ckpt, with no I/O.
//!
//! Everything here is plain data and pure functions: the chunk format and its content address,
//! shard indexes, manifests, the key layout in the object store, validation of names and steps,
//! and the save state machine that the service drives. The service and the client both depend on
//! this crate, so what one writes the other reads with the same code.

pub mod chunk;
pub mod codec;
pub mod commit;
pub mod error;
pub mod fuzzing;
pub mod gc;
pub mod hash;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod part;
pub mod save;
mod seal;
pub mod shard;
pub mod trace;
pub mod validate;

pub use chunk::{ChunkHeader, Codec, CHUNK_HEADER_BYTES};
pub use commit::{CommitObject, IndexRef, Root, ROOT_FORMAT_VERSION};
pub use error::CoreError;
pub use hash::{ChunkHash, ChunkHasher};
pub use manifest::{Manifest, ManifestSummary, MANIFEST_FORMAT_VERSION};
pub use part::{Part, PartOf};
pub use save::{SavePhase, SaveState};
pub use shard::{ChunkRef, DType, ShardIndex, TensorEntry};
pub use validate::{parse_step, validate_job, Limits};
