//! Property tests of the formats and the save state machine. proptest prints the failing case
//! and saves its seed under proptest-regressions/ so a failure replays.

use ckpt_core::commit::{index_object, parse_index_object, RootFields};
use ckpt_core::save::IndexOutcome;
use ckpt_core::{
    ChunkHash, ChunkHeader, ChunkRef, Codec, DType, Limits, Manifest, Root, SavePhase, SaveState, ShardIndex,
    TensorEntry,
};
use proptest::prelude::*;

fn tensor(name: String, data: Vec<u8>, chunk: usize) -> TensorEntry {
    TensorEntry {
        name,
        dtype: DType::U8,
        shape: vec![data.len() as u64],
        global_shape: vec![data.len() as u64],
        offsets: vec![0],
        chunks: data.chunks(chunk).map(|c| ChunkRef { hash: ChunkHash::of(c), len: c.len() as u64 }).collect(),
    }
}

fn shard(rank: u32, seed: u8, tensors: usize) -> ShardIndex {
    ShardIndex {
        rank,
        tensors: (0..tensors)
            .map(|i| tensor(format!("r{rank}.t{i}"), vec![seed.wrapping_add(i as u8); 10 + i * 7], 4))
            .collect(),
        metadata: serde_json::json!({ "seed": seed }),
    }
}

proptest! {
    #[test]
    fn chunk_header_round_trips_and_detects_damage(raw_len in 0u64..1 << 40, zstd in any::<bool>(), seed in any::<[u8; 32]>(), flip in 0usize..48, bit in 0u8..8) {
        let h = ChunkHeader { codec: if zstd { Codec::Zstd } else { Codec::None }, raw_len, hash: ChunkHash(seed) };
        let enc = h.encode();
        prop_assert_eq!(ChunkHeader::decode_header(&enc).unwrap(), h);
        let mut bad = enc;
        bad[flip] ^= 1 << bit;
        // A damaged header never decodes to the same header.
        if let Ok(back) = ChunkHeader::decode_header(&bad) {
            prop_assert_ne!(back, h);
        }
    }

    #[test]
    fn a_damaged_root_or_index_object_is_never_accepted_with_other_content(world in 1u32..6, tensors in 1usize..4, seed in any::<u8>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let ranks: Vec<_> = (0..world).map(|r| shard(r, seed.wrapping_add(r as u8), tensors)).collect();
        let meta = serde_json::json!({"lr": 0.5});
        let fields = RootFields { job: "job", step: 7, world_size: world, created_unix_ms: 123, previous_committed_step: Some(3), metadata: &meta };
        let root = Root::build(fields, ranks.iter().map(|i| (i, index_object(i).1))).unwrap();
        let bytes = root.to_bytes();
        prop_assert_eq!(&Root::from_bytes(&bytes, &Limits::default()).unwrap(), &root);
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] = byte;
        if let Ok(back) = Root::from_bytes(&bad, &Limits::default()) {
            prop_assert_eq!(back, root.clone());
        }
        // An index object is checked against the address the root gives.
        let r = (seed as u32) % world;
        let (obj, reference) = index_object(&ranks[r as usize]);
        prop_assert_eq!(reference, root.ranks[r as usize]);
        let mut bad = obj.clone();
        let i = pos.index(bad.len());
        bad[i] = byte;
        if let Ok(back) = parse_index_object(&bad, &reference, r, world, &Limits::default()) {
            prop_assert_eq!(back, ranks[r as usize].clone());
        }
    }

    #[test]
    fn a_damaged_manifest_is_never_accepted_with_other_content(world in 1u32..4, tensors in 1usize..4, seed in any::<u8>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let ranks: Vec<_> = (0..world).map(|r| shard(r, seed.wrapping_add(r as u8), tensors)).collect();
        let m = Manifest::new("job", 7, world, 123, Some(3), serde_json::json!({"lr": 0.5}), ranks).unwrap();
        let bytes = m.to_bytes();
        prop_assert_eq!(&Manifest::from_bytes(&bytes, &Limits::default()).unwrap(), &m);
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] = byte;
        // Accepted only if the content is unchanged (for example a whitespace byte).
        if let Ok(back) = Manifest::from_bytes(&bad, &Limits::default()) {
            prop_assert_eq!(back, m);
        }
    }

    /// Random sequences of protocol events against the state machine: whatever happens, a
    /// manifest exists only for a save with every rank in, committed and aborted are final,
    /// and a rank's accepted index never changes.
    #[test]
    fn save_state_machine_model(world in 1u32..5, ops in prop::collection::vec((0u8..6, 0u32..6, any::<u8>()), 1..40)) {
        let limits = Limits::default();
        let mut s = SaveState::open("job", 1, world, 0, None, serde_json::Value::Null, &limits).unwrap();
        let mut accepted: std::collections::BTreeMap<u32, ShardIndex> = Default::default();
        for (op, rank, seed) in ops {
            let before = s.phase;
            match op {
                0 | 1 => {
                    let idx = shard(rank, seed % 2, 1);
                    match s.accept_index(idx.clone(), &limits) {
                        Ok(IndexOutcome::New) => {
                            prop_assert_eq!(before, SavePhase::Open);
                            prop_assert!(accepted.insert(rank, idx).is_none());
                        }
                        Ok(IndexOutcome::Duplicate) => prop_assert_eq!(accepted.get(&rank), Some(&idx)),
                        Err(_) => prop_assert!(rank >= world || before != SavePhase::Open || accepted.get(&rank).is_some_and(|a| *a != idx)),
                    }
                }
                2 => {
                    let ok = s.mark_durable().is_ok();
                    prop_assert_eq!(ok, before == SavePhase::Staged);
                }
                3 => {
                    let built = s.root();
                    prop_assert_eq!(built.is_ok(), before == SavePhase::Durable);
                    if let Ok(m) = built {
                        prop_assert_eq!(m.ranks.len() as u32, world);
                        prop_assert!(s.mark_committed(m.hash).is_ok());
                    }
                }
                4 => {
                    let ok = s.abort("test".into()).is_ok();
                    prop_assert_eq!(ok, !before.is_final());
                }
                _ => {
                    let reopened = s.reopen(world, serde_json::Value::Null, None);
                    prop_assert!(reopened.is_ok());
                }
            }
            prop_assert_eq!(s.ranks.len(), accepted.len());
            if matches!(s.phase, SavePhase::Staged | SavePhase::Durable | SavePhase::Committed) {
                prop_assert!(s.all_ranks_in());
            }
            if before.is_final() {
                prop_assert_eq!(s.phase, before, "final phases never change");
            }
        }
    }
}
