//! A save of several ranks commits once, restores bit for bit on every rank, verifies, and
//! the store holds exactly its root, its index objects and its chunks.

use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300; save_commit_restore_verify);

async fn save_commit_restore_verify(backend: Backend) {
    let seed = seed(0x5eed_0c01);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start_daemon_with(store.daemon_options(dir.path())).await;
    let c = client(&d);
    let states: Vec<_> = (0..3).map(|r| rank_tensors(seed, r, 3, 3 << 20)).collect();
    save_step(&c, "job", 1, &states).await.unwrap();
    // Unchanged ranks send nothing the second time; the changed one sends only its chunks.
    let mut next = states.clone();
    next[2] = rank_tensors(seed + 1, 2, 3, 3 << 20);
    let reports = save_step(&c, "job", 2, &next).await.unwrap();
    assert_eq!(reports[0].bytes_sent + reports[1].bytes_sent, 0, "unchanged ranks resent chunks");
    assert!(reports[2].bytes_sent > 0);

    let stored = store.manifests().await;
    assert_eq!(stored.iter().map(|m| m.step).collect::<Vec<_>>(), vec![1, 2]);
    store.assert_complete().await;
    for (step, s) in [(1u64, &states), (2, &next)] {
        assert!(c.verify("job", step, |_| {}).await.unwrap().ok(), "step {step} does not verify");
        for r in 0..3u32 {
            assert!(c.load_rank("job", step, r).await.unwrap() == s[r as usize], "step {step} rank {r}");
        }
    }
    // Nothing but checkpoint objects under the job (no temporary or probe objects left).
    for k in store.keys().await {
        assert!(ckpt_core::keys::parse_key(&k).is_some(), "stray object {k} in the store");
    }
    assert_eq!(c.latest("job").await.unwrap(), Some(2));
}
