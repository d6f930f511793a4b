//! sled deleted while ckptd is stopped: on start it rebuilds from the store and lists the same
//! checkpoints.

use std::time::Duration;

use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300; index_deleted_while_stopped_is_rebuilt_from_the_store);

async fn index_deleted_while_stopped_is_rebuilt_from_the_store(backend: Backend) {
    let seed = seed(0x5eed_0006);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut d = start_daemon_with(store.daemon_options(dir.path())).await;
    let c = client(&d);
    let mut states = Vec::new();
    for step in [1u64, 2, 3] {
        let s: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 2 << 20)).collect();
        save_step(&c, "alpha", step, &s).await.unwrap();
        states.push(s);
    }
    let beta: Vec<_> = (0..3).map(|r| rank_tensors(seed + 100, r, 3, 1 << 20)).collect();
    save_step(&c, "beta", 50, &beta).await.unwrap();
    c.delete("alpha", 1, false).await.unwrap();

    let jobs = c.jobs().await.unwrap();
    let alpha = c.list("alpha").await.unwrap();
    let beta_list = c.list("beta").await.unwrap();
    assert_eq!(alpha.committed.iter().map(|m| m.step).collect::<Vec<_>>(), vec![2, 3]);

    assert!(d.terminate(Duration::from_secs(20)).await, "ckptd did not stop cleanly on SIGTERM");
    let state_dir = dir.path().join("state");
    std::fs::remove_dir_all(&state_dir).unwrap();
    assert!(!state_dir.exists());
    d.restart().await.unwrap();
    let c = client(&d);
    assert!(daemon_log(&d).contains("rebuilt: true"), "start-up did not report a rebuild");

    assert_eq!(c.jobs().await.unwrap(), jobs);
    assert_eq!(c.list("alpha").await.unwrap(), alpha);
    assert_eq!(c.list("beta").await.unwrap(), beta_list);
    // The chunk index is rebuilt too: nothing of step 3 counts as missing.
    let m = c.manifest("alpha", 3).await.unwrap();
    assert!(c.missing("alpha", m.chunk_set().into_iter().collect()).await.unwrap().is_empty());
    for r in 0..2 {
        assert!(c.load_rank("alpha", 3, r).await.unwrap() == states[2][r as usize]);
    }
    assert!(c.verify("beta", 50, |_| {}).await.unwrap().ok());
}
