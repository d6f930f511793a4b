//! Restore into the caller's buffers: byte-identical and verified on both transports, row ranges
//! across ranks and chunk edges, wrongly sized buffers refused before any read, a corrupt chunk
//! failing the whole call; and chunks the node-local path stored compressed reading back
//! identically through every reader.

use std::time::Duration;

use bytes::Bytes;
use ckpt_client::{Client, ClientError, DType, RestoreTarget, Tensor};
use ckpt_core::{ChunkHeader, Codec};
use ckpt_tests::*;
use rand::{Rng, SeedableRng};

/// Restores every tensor of `rank` into fresh buffers through `restore_rank_into`.
async fn restore_into(
    c: &Client,
    job: &str,
    step: u64,
    rank: u32,
    like: &[Tensor],
) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut bufs: Vec<Vec<u8>> = like.iter().map(|t| vec![0xA5u8; t.data.len()]).collect();
    let mut targets: Vec<RestoreTarget<'_>> =
        like.iter().zip(bufs.iter_mut()).map(|(t, b)| RestoreTarget { name: &t.name, data: b }).collect();
    let report = c.restore_rank_into(job, step, rank, &mut targets).await?;
    assert_eq!(report.tensors, like.len());
    assert_eq!(report.bytes, like.iter().map(|t| t.data.len() as u64).sum::<u64>());
    Ok(bufs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_buffers_is_identical_verified_and_all_or_nothing() {
    bounded(Duration::from_secs(240), async {
        let seed = seed(0x5eed_0901);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let (lc, hc) = (local_client(&d), client(&d));
        let states: Vec<_> = (0..3).map(|r| rank_tensors(seed, r, 3, 6 << 20)).collect();
        save_step(&hc, "job", 1, &states).await.unwrap();
        for (r, st) in states.iter().enumerate() {
            for (c, path) in [(&lc, "node-local"), (&hc, "http")] {
                let bufs = restore_into(c, "job", 1, r as u32, st).await.unwrap();
                for (t, b) in st.iter().zip(&bufs) {
                    assert!(t.data[..] == b[..], "rank {r} tensor {} differs on the {path} path", t.name);
                }
            }
        }
        let local = lc.restore_rank_into("job", 1, 0, &mut []).await.unwrap();
        assert_eq!(local.chunks, 0, "an empty target list reads nothing");

        // A buffer one byte short is refused before a byte is read: the other target is untouched.
        let st = &states[1];
        let mut a = vec![0xA5u8; st[0].data.len()];
        let mut b = vec![0xA5u8; st[1].data.len() - 1];
        let mut targets =
            [RestoreTarget { name: &st[0].name, data: &mut a }, RestoreTarget { name: &st[1].name, data: &mut b }];
        match hc.restore_rank_into("job", 1, 1, &mut targets).await {
            Err(ClientError::InvalidTensor { name, reason }) => {
                assert_eq!(name, st[1].name);
                assert!(reason.contains("buffer"), "{reason}");
            }
            other => panic!("a short buffer must be refused, got {other:?}"),
        }
        assert!(a.iter().all(|&x| x == 0xA5), "nothing is read when the plan is refused");
        let mut c = vec![0u8; 8];
        let mut unknown = [RestoreTarget { name: "no.such.tensor", data: &mut c }];
        assert!(matches!(
            hc.restore_rank_into("job", 1, 1, &mut unknown).await,
            Err(ClientError::InvalidTensor { .. })
        ));

        // One flipped bit in one stored chunk fails the whole call on both paths.
        let m = hc.manifest("job", 1).await.unwrap();
        let victim = m.ranks[2].tensors[0].chunks[1].hash;
        let p = chunk_path(&store, "job", &victim);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x08;
        std::fs::write(&p, bytes).unwrap();
        for c in [&lc, &hc] {
            match restore_into(c, "job", 1, 2, &states[2]).await {
                Err(ClientError::CorruptChunk { hash, .. }) => assert_eq!(hash, victim),
                other => panic!("a corrupt chunk must fail the restore, got {:?}", other.map(|b| b.len())),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_ranges_across_ranks_and_chunk_edges_land_in_place() {
    bounded(Duration::from_secs(240), async {
        let seed = seed(0x5eed_0902);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let hc = client(&d);
        // 4 ranks x 2,000 rows of 1 KiB: chunks of 1 MiB end mid-row-range, ranks end mid-chunk.
        let states: Vec<_> = (0..4).map(|r| rank_tensors(seed, r, 4, 4_096_000)).collect();
        save_step(&hc, "job", 1, &states).await.unwrap();
        let name = &states[0][0].name;
        let rows_per_rank = states[0][0].shape[0];
        let row_bytes = states[0][0].shape[1] * 4;
        let global: Vec<u8> = states.iter().flat_map(|s| s[0].data.to_vec()).collect();
        let cp = hc.checkpoint("job", 1).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let total_rows = rows_per_rank * 4;
        for c in [&local_client(&d), &hc] {
            for _ in 0..6 {
                let start = rng.random_range(0..total_rows - 1);
                let rows = rng.random_range(1..=total_rows - start);
                let mut out = vec![0u8; (rows * row_bytes) as usize];
                c.load_rows_into(&cp, name, start, &mut out).await.unwrap();
                let want = &global[(start * row_bytes) as usize..((start + rows) * row_bytes) as usize];
                assert!(out == want, "rows {start}+{rows} differ");
            }
            let mut ragged = vec![0u8; row_bytes as usize + 1];
            assert!(c.load_rows_into(&cp, name, 0, &mut ragged).await.is_err(), "not a whole number of rows");
            let mut past_end = vec![0u8; 2 * row_bytes as usize];
            assert!(c.load_rows_into(&cp, name, total_rows - 1, &mut past_end).await.is_err(), "past the last row");
        }
    })
    .await
}

/// fp32 values shaped like trained weights: small, so sign and exponent bytes repeat.
fn trained_like(seed: u64, elems: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Bytes::from((0..elems).flat_map(|_| (rng.random::<f32>() * 0.02 - 0.01).to_le_bytes()).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_the_node_local_path_compressed_restore_identically() {
    bounded(Duration::from_secs(240), async {
        let seed = seed(0x5eed_0903);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let lc = local_client(&d);
        let elems = 3 << 18;
        let state = vec![
            Tensor::whole("w", DType::F32, vec![elems as u64], trained_like(seed, elems)),
            Tensor::whole("noise", DType::U8, vec![1 << 20], {
                let mut v = vec![0u8; 1 << 20];
                rand::rngs::StdRng::seed_from_u64(seed + 1).fill(&mut v[..]);
                Bytes::from(v)
            }),
        ];
        save_step(&lc, "job", 1, std::slice::from_ref(&state)).await.unwrap();
        let s = stats(&d).await;
        assert_eq!(s["staging"]["chunks_uploaded"].as_u64(), Some(0), "chunks went through HTTP: {s}");
        let m = lc.manifest("job", 1).await.unwrap();
        let codec_of = |h: &ckpt_core::ChunkHash| {
            let stored = std::fs::read(chunk_path(&store, "job", h)).unwrap();
            ChunkHeader::decode(&stored).unwrap().0.codec
        };
        let w = m.ranks[0].tensors.iter().find(|t| t.name == "w").unwrap();
        for c in &w.chunks {
            assert_eq!(codec_of(&c.hash), Codec::Grouped, "fp32 weights are stored byte-grouped");
        }
        let noise = m.ranks[0].tensors.iter().find(|t| t.name == "noise").unwrap();
        assert_eq!(codec_of(&noise.chunks[0].hash), Codec::None, "random bytes are stored raw");
        let stored: u64 =
            w.chunks.iter().map(|c| std::fs::metadata(chunk_path(&store, "job", &c.hash)).unwrap().len()).sum();
        assert!(stored < (elems as u64 * 4) * 9 / 10, "byte grouping saved too little: {stored} bytes");
        // Direct reads decode in place; ckptd decodes for HTTP readers; verify checks them all.
        let hc = client(&d);
        for c in [&lc, &hc] {
            let bufs = restore_into(c, "job", 1, 0, &state).await.unwrap();
            assert!(bufs[0][..] == state[0].data[..] && bufs[1][..] == state[1].data[..]);
            assert!(c.load_rank("job", 1, 0).await.unwrap() == state);
        }
        assert!(hc.verify("job", 1, |_| {}).await.unwrap().ok());
    })
    .await
}
