//! Two ckptd processes on the same store race to commit the same step: exactly one root; the
//! other reports success if its root is identical and a conflict otherwise. On S3 the only
//! arbiter is the store's create-only put (`If-None-Match: *`).

use ckpt_client::{ClientError, Wait};
use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300; two_daemons_race_to_commit_the_same_step);

async fn two_daemons_race_to_commit_the_same_step(backend: Backend) {
    let seed = seed(0x5eed_0005);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let a = start_daemon_with(store.daemon_options(&dir.path().join("a"))).await;
    let b = start_daemon_with(store.daemon_options(&dir.path().join("b"))).await;
    let (ca, cb) = (client(&a), client(&b));
    let world = 2u32;
    let states: Vec<_> = (0..world).map(|r| rank_tensors(seed, r, world, 4 << 20)).collect();

    // Identical content through both: both succeed, one root.
    for c in [&ca, &cb] {
        c.save(&spec("job", 1, 0, world), &states[0], Wait::Staged).await.unwrap();
    }
    let s1 = spec("job", 1, 1, world);
    let (ra, rb) = tokio::join!(ca.save(&s1, &states[1], Wait::Committed), cb.save(&s1, &states[1], Wait::Committed));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.status.manifest_hash, rb.status.manifest_hash);
    let manifests = store.manifests().await;
    assert_eq!(manifests.len(), 1);
    assert_eq!(Some(&manifests[0].hash), ra.status.manifest_hash.as_ref());

    // Different content (metadata differs): exactly one wins, the other reports a conflict.
    let mut sa = spec("job", 2, 0, world);
    sa.metadata = serde_json::json!({ "writer": "a" });
    let mut sb = sa.clone();
    sb.metadata = serde_json::json!({ "writer": "b" });
    ca.save(&sa, &states[0], Wait::Staged).await.unwrap();
    cb.save(&sb, &states[0], Wait::Staged).await.unwrap();
    let (mut sa1, mut sb1) = (sa.clone(), sb.clone());
    sa1.rank = 1;
    sb1.rank = 1;
    let (ra, rb) = tokio::join!(ca.save(&sa1, &states[1], Wait::Committed), cb.save(&sb1, &states[1], Wait::Committed));
    let conflict = |e: &ClientError| e.api_code() == Some("conflict") || matches!(e, ClientError::Aborted { .. });
    let winner = match (&ra, &rb) {
        (Ok(_), Err(e)) if conflict(e) => "a",
        (Err(e), Ok(_)) if conflict(e) => "b",
        other => panic!("expected exactly one success and one conflict, got {other:?}"),
    };
    let step2: Vec<_> = store.manifests().await.into_iter().filter(|m| m.step == 2).collect();
    assert_eq!(step2.len(), 1, "exactly one root for step 2");
    assert_eq!(step2[0].metadata["writer"], winner, "the stored root is the winner's");
    // The loser says so when asked, and both daemons serve the winner's checkpoint.
    let loser = if winner == "a" { &cb } else { &ca };
    let st = loser.save_status("job", 2).await.unwrap();
    assert_eq!(st.phase, ckpt_client::SavePhase::Aborted);
    assert!(st.error.unwrap_or_default().contains("another writer"));
    assert_eq!(ca.manifest("job", 2).await.unwrap().hash, step2[0].hash);
    assert_eq!(cb.manifest("job", 2).await.unwrap().hash, step2[0].hash);
}
