//! A client on ckptd's host asks for the node-local path. On a local-directory store chunks are
//! handed over as files and adopted (nothing goes through the upload queue); on any other
//! store ckptd refuses adoption and the client falls back to HTTP for good. Either way the
//! save commits and restores bit for bit.

use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300; node_local_save_adopts_or_falls_back_to_http);

async fn node_local_save_adopts_or_falls_back_to_http(backend: Backend) {
    let seed = seed(0x5eed_0c02);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start_daemon_with(store.daemon_options(dir.path())).await;
    let lc = local_client(&d);
    let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 4 << 20)).collect();
    save_step(&lc, "job", 1, &states).await.unwrap();
    let uploaded = stats(&d).await["staging"]["chunks_uploaded"].as_u64().unwrap();
    match backend {
        Backend::Local => assert_eq!(uploaded, 0, "a local store should have adopted every chunk"),
        Backend::SeaweedFs => assert!(uploaded > 0, "chunks should have gone over HTTP to the upload queue"),
    }
    for r in 0..2 {
        assert!(lc.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
    }
    assert!(lc.verify("job", 1, |_| {}).await.unwrap().ok());
    store.assert_complete().await;
}
