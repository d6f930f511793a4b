//! 8 ranks save 64 MiB each concurrently; the step commits once; every rank restores
//! byte-identical; `ckpt verify` passes.

use std::time::Duration;

use ckpt_client::Wait;
use ckpt_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_ranks_save_concurrently_commit_once_and_restore_identically() {
    bounded(Duration::from_secs(600), async {
        let seed = seed(0x5eed_0001);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let world = 8u32;
        let states: Vec<_> = (0..world).map(|r| rank_tensors(seed, r, world, 64 << 20)).collect();
        save_step(&c, "llama", 1000, &states).await.unwrap();

        let store = dir.path().join("store");
        let manifests = stored_manifests(&store);
        assert_eq!(manifests.len(), 1, "exactly one manifest for one committed step");
        assert_eq!((manifests[0].step, manifests[0].world_size), (1000, world));
        let list = c.list("llama").await.unwrap();
        assert_eq!(list.committed.iter().map(|m| m.step).collect::<Vec<_>>(), vec![1000]);
        assert!(list.in_flight.is_empty(), "nothing left in flight: {:?}", list.in_flight);
        assert_manifests_complete(&store);

        // A rank that retries after the commit learns it is committed and sends nothing.
        let again = c.save(&spec("llama", 1000, 3, world), &states[3], Wait::Committed).await.unwrap();
        assert_eq!(again.bytes_sent, 0);
        assert_eq!(stored_manifests(&store).len(), 1);

        for r in 0..world {
            let back = c.load_rank("llama", 1000, r).await.unwrap();
            assert!(back == states[r as usize], "rank {r} restored different tensors (seed {seed})");
        }

        let out = tokio::process::Command::new(ckpt_exe())
            .args(["--server", &d.url(), "verify", "llama", "1000"])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ckpt verify failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("llama@1000: ok"), "{stdout}");

        let out = tokio::process::Command::new(ckpt_exe())
            .args(["--server", &d.url(), "--json", "verify", "--all"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reports[0]["corrupt"].as_array().map(Vec::len), Some(0));
        // Verify reads each distinct chunk once; the small "step" tensor is shared by all ranks.
        let m = c.manifest("llama", 1000).await.unwrap();
        let distinct: std::collections::BTreeMap<_, _> =
            m.ranks.iter().flat_map(|r| &r.tensors).flat_map(|t| &t.chunks).map(|ch| (ch.hash, ch.len)).collect();
        let expected_bytes: u64 = distinct.values().sum();
        assert!(expected_bytes >= u64::from(world) * (64 << 20));
        assert_eq!(reports[0]["bytes_checked"].as_u64(), Some(expected_bytes));
    })
    .await
}
