//! ckptd on a SeaweedFS cluster of separate processes on loopback (a master, three volume
//! servers, a filer with the S3 gateway; replication 001: two copies on two servers): a volume
//! server SIGKILLed in the middle of a save loses nothing. The save completes through retries,
//! later saves commit, and every committed checkpoint verifies and restores bit for bit.
//! Also: ckptd refuses a store whose create-only put does not hold (the commit relies on it).

use std::time::Duration;

use ckpt_tests::backend::{SeaweedCluster, TestStore};
use ckpt_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_server_killed_mid_save_loses_nothing() {
    let mut cluster = SeaweedCluster::start(3).await;
    let result = bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0c10);
        let dir = tempfile::tempdir().unwrap();
        let store = cluster.store("ckpt-cluster").await;
        let mut o = store.daemon_options(dir.path());
        // The master notices a dead volume server after a few heartbeats; until then writes
        // that land on its volumes fail and are retried (object_store's retries, then ours).
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "store_attempts_max = 12\nstore_retry_base_ms = 250\nupload_concurrency = 4\nupload_bytes_per_s = 16777216\n").unwrap();
        o.extra_args = vec!["--config".into(), cfg.into_os_string()];
        let d = start_daemon_with(o).await;
        let c = client(&d);
        let world = 3u32;
        let states = |s: u64| (0..world).map(|r| rank_tensors(seed + s, r, world, 6 << 20)).collect::<Vec<_>>();
        let s1 = states(1);
        save_step(&c, "job", 1, &s1).await.unwrap();

        // Step 2: the kill lands once some of its chunks are uploaded.
        let s2 = states(2);
        let uploaded_before = stats(&d).await["staging"]["chunks_uploaded"].as_u64().unwrap();
        let save = {
            let c = c.clone();
            let s2 = s2.clone();
            tokio::spawn(async move { save_step(&c, "job", 2, &s2).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while stats(&d).await["staging"]["chunks_uploaded"].as_u64().unwrap() < uploaded_before + 3 {
            assert!(std::time::Instant::now() < deadline, "step 2 uploaded nothing");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (dir, store, d, c, s1, s2, save)
    })
    .await;
    let (_dir, store, d, c, s1, s2, save) = result;
    // The upload pace (16 MiB/s for 36 MiB) keeps the save in flight across the kill.
    assert!(!save.is_finished(), "step 2 finished before the kill; the test would prove nothing");
    cluster.kill_volume(1);
    bounded(Duration::from_secs(300), async {
        let r = save.await.unwrap();
        r.unwrap_or_else(|e| panic!("step 2 after a volume server died: {e}\n{}", daemon_log(&d)));
        let s3: Vec<_> = (0..3u32).map(|r| rank_tensors(99, r, 3, 6 << 20)).collect();
        save_step(&c, "job", 3, &s3).await.unwrap();
        let committed: Vec<u64> = store.manifests().await.iter().map(|m| m.step).collect();
        assert_eq!(committed, vec![1, 2, 3]);
        store.assert_complete().await;
        for (step, s) in [(1u64, &s1), (2, &s2), (3, &s3)] {
            assert!(c.verify("job", step, |_| {}).await.unwrap().ok(), "step {step} does not verify");
            for r in 0..3u32 {
                assert!(c.load_rank("job", step, r).await.unwrap() == s[r as usize], "step {step} rank {r}");
            }
        }
    })
    .await;
    assert!(cluster.volumes[1].1.is_none(), "the volume server was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_create_only_puts_is_refused_at_start() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new(ckpt_tests::backend::Backend::SeaweedFs, dir.path()).await;
        let mut o = store.daemon_options(dir.path());
        // object_store then sends plain puts for create-only ones (no If-None-Match).
        o.envs.push(("AWS_CONDITIONAL_PUT".into(), "disabled".into()));
        o.start_timeout = Duration::from_secs(30);
        let err = ckpt_client::daemon::LocalDaemon::start(o).await.err().expect("ckptd must refuse the store");
        let log = std::fs::read_to_string(dir.path().join("ckptd.log")).unwrap();
        assert!(log.contains("create-only") || log.contains("conditional put"), "{err}\n{log}");
        assert!(store.keys().await.is_empty(), "the refused probe left objects behind");
    })
    .await
}
