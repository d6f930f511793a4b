//! proptest twins of the fuzz targets in `fuzz/` (cargo-fuzz): the same properties
//! (`ckpt_core::fuzzing`) on generated inputs, so CI checks them on every change. Inputs are
//! biased toward the formats (valid documents with bytes changed) as well as raw noise.

use ckpt_core::commit::{index_object, RootFields};
use ckpt_core::{fuzzing, ChunkHash, ChunkHeader, ChunkRef, Codec, DType, Root, ShardIndex, TensorEntry};
use proptest::prelude::*;

fn valid_index(rank: u32, data: &[u8]) -> Vec<u8> {
    let index = ShardIndex {
        rank,
        tensors: vec![TensorEntry {
            name: "w".into(),
            dtype: DType::U8,
            shape: vec![data.len() as u64],
            global_shape: vec![data.len() as u64],
            offsets: vec![0],
            chunks: data.chunks(7).map(|c| ChunkRef { hash: ChunkHash::of(c), len: c.len() as u64 }).collect(),
        }],
        metadata: serde_json::json!({ "rank": rank }),
    };
    serde_json::to_vec(&index).unwrap()
}

fn stored(data: &[u8]) -> Vec<u8> {
    let header = ChunkHeader { codec: Codec::None, raw_len: data.len() as u64, hash: ChunkHash::of(data) };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(data);
    out
}

/// Changes `flips` bytes of `bytes` at positions and values from `noise`.
fn mutate(mut bytes: Vec<u8>, noise: &[(usize, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, v) in noise {
            let n = bytes.len();
            bytes[at % n] = *v;
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn commit_objects(noise in proptest::collection::vec(any::<u8>(), 0..512), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4)) {
        fuzzing::commit_object(&noise);
        let index = ShardIndex { rank: 0, tensors: vec![], metadata: serde_json::Value::Null };
        let meta = serde_json::json!({ "lr": 0.1 });
        let fields = RootFields { job: "job", step: 7, world_size: 1, created_unix_ms: 1, previous_committed_step: None, metadata: &meta };
        let root = Root::build(fields, [(&index, index_object(&index).1)].into_iter()).unwrap().to_bytes();
        fuzzing::commit_object(&root);
        fuzzing::commit_object(&mutate(root, &flips));
    }

    #[test]
    fn shard_indexes(data in proptest::collection::vec(any::<u8>(), 0..64), rank in 0u32..8, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3)) {
        let doc = valid_index(rank, &data);
        fuzzing::shard_index(&doc);
        fuzzing::shard_index(&mutate(doc, &flips));
        fuzzing::shard_index(&data);
    }

    #[test]
    fn stored_chunks(data in proptest::collection::vec(any::<u8>(), 0..256), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3)) {
        let s = stored(&data);
        fuzzing::stored_chunk(&s);
        fuzzing::stored_chunk(&mutate(s, &flips));
        fuzzing::stored_chunk(&data);
    }

    #[test]
    fn store_keys(key in "(jobs/)?[a-z0-9._/-]{0,40}(/chunks/[0-9a-f]{2}/[0-9a-f]{64}|/manifests/[0-9]{20}\\.json|/parts/[0-9]{20}/[0-9]{20}/[0-9]{10}-[0-9]{10}\\.json)?", any_key in "\\PC{0,80}") {
        fuzzing::store_key(&key);
        fuzzing::store_key(&any_key);
    }
}
