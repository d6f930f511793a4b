//! A bit flipped in one stored chunk is reported by `ckpt verify` and by restore, naming the
//! chunk and the checkpoint; restore never returns the bad bytes. The damage is done in the
//! store itself, behind ckptd's back.

use bytes::Bytes;
use ckpt_client::ClientError;
use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300; flipped_bit_and_torn_chunk_are_reported_and_never_restored);

async fn flipped_bit_and_torn_chunk_are_reported_and_never_restored(backend: Backend) {
    let seed = seed(0x5eed_0002);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start_daemon_with(store.daemon_options(dir.path())).await;
    let c = client(&d);
    let old: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 4 << 20)).collect();
    let new: Vec<_> = (0..2).map(|r| rank_tensors(seed + 1, r, 2, 4 << 20)).collect();
    save_step(&c, "job", 10, &old).await.unwrap();
    save_step(&c, "job", 20, &new).await.unwrap();

    let m = c.manifest("job", 20).await.unwrap();
    let victim = m.ranks[1].tensors[0].chunks[1].hash;
    let key = TestStore::chunk_key("job", &victim);
    let mut bytes = store.get(&key).await.expect("stored chunk").to_vec();
    let bit = (seed as usize) % (8 * (bytes.len() - ckpt_core::CHUNK_HEADER_BYTES));
    bytes[ckpt_core::CHUNK_HEADER_BYTES + bit / 8] ^= 1 << (bit % 8);
    store.put(&key, Bytes::from(bytes)).await;

    // The CLI names the chunk and the checkpoint, and exits 1.
    let out = tokio::process::Command::new(ckpt_exe())
        .args(["--server", &d.url(), "verify", "job", "20"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verify must fail: {stdout}");
    assert!(stdout.contains("job@20: CORRUPT"), "{stdout}");
    assert!(stdout.contains(&victim.to_hex()), "{stdout}");
    assert!(stdout.contains("rank 1 tensor layers.0.attn.wq"), "{stdout}");

    // Restore refuses, naming the chunk and the checkpoint.
    match c.load_rank("job", 20, 1).await {
        Err(e @ ClientError::CorruptChunk { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&victim.to_hex()) && msg.contains("job@20"), "{msg}");
        }
        Err(e) => panic!("expected a corrupt-chunk error, got {e}"),
        Ok(_) => panic!("restore returned data from a corrupted chunk"),
    }
    // The CLI restore fails and writes no tensor file.
    let out_dir = dir.path().join("restored");
    let out = tokio::process::Command::new(ckpt_exe())
        .args(["--server", &d.url(), "restore", "job", "20", "--rank", "1", "--out"])
        .arg(&out_dir)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&victim.to_hex()));
    assert!(!out_dir.join("t00000.bin").exists(), "restore wrote bytes of a corrupted checkpoint");

    // The other rank and the previous checkpoint are intact: a trainer can fall back.
    assert!(c.load_rank("job", 20, 0).await.unwrap() == new[0]);
    assert!(c.verify("job", 10, |_| {}).await.unwrap().ok());
    for r in 0..2 {
        assert!(c.load_rank("job", 10, r).await.unwrap() == old[r as usize]);
    }

    // A torn write (truncated chunk) is caught the same way.
    let torn = m.ranks[0].tensors[1].chunks[0].hash;
    let key = TestStore::chunk_key("job", &torn);
    let whole = store.get(&key).await.expect("stored chunk");
    store.put(&key, whole.slice(..whole.len() / 2)).await;
    let report = c.verify("job", 20, |_| {}).await.unwrap();
    let bad: Vec<_> = report.corrupt.iter().map(|c| c.hash).collect();
    let mut expected = vec![victim, torn];
    expected.sort();
    assert_eq!(bad, expected, "verify must report exactly the two damaged chunks");
}
