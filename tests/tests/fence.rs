//! A rank cut off from its group and replaced, still alive (a zombie of an older generation),
//! cannot change a save of the new generation: once the job is fenced at the new generation,
//! ckptd refuses the zombie's opens and shard indexes, and aborts the saves it had in flight.

use std::time::Duration;

use ckpt_client::{Client, ClientOptions, Wait};
use ckpt_tests::*;

fn generation(d: &ckpt_client::daemon::LocalDaemon, epoch: u64) -> Client {
    let opts =
        ClientOptions { chunk_bytes: 1 << 20, node_local: false, epoch: Some(epoch), ..ClientOptions::default() };
    Client::new(&d.url(), opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_of_an_older_generation_cannot_change_the_new_generations_save() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfe_0001);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let (old, new) = (generation(&d, 1), generation(&d, 2));
        let stale: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
        let fresh: Vec<_> = (0..2).map(|r| rank_tensors(seed + 1, r, 2, 1 << 20)).collect();
        old.fence("job", 1).await.unwrap();

        // Generation 1: rank 0's part of step 8 is in when the group is replaced.
        old.save(&spec("job", 8, 0, 2), &stale[0], Wait::Staged).await.unwrap();
        assert_eq!(new.fence("job", 2).await.unwrap(), 2);
        assert_eq!(new.fence("job", 1).await.unwrap(), 2, "a fence is never lowered");
        let status = client(&d).save_status("job", 8).await.unwrap();
        assert_eq!(status.phase.name(), "aborted", "the replaced generation's save in flight is aborted");

        // The zombie (generation 1) goes on: its rank 1 index and a fresh open are refused.
        let err = old.save(&spec("job", 8, 1, 2), &stale[1], Wait::Committed).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{err}");
        let err = old.open_save(&spec("job", 12, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{err}");

        // Generation 2 saves step 8 whole: its bytes, not the zombie's.
        save_step(&new, "job", 8, &fresh).await.unwrap();
        for r in 0..2 {
            assert!(client(&d).load_rank("job", 8, r).await.unwrap() == fresh[r as usize], "rank {r}");
        }
        let err = old
            .put_shard_index(
                "job",
                8,
                &ckpt_core::ShardIndex { rank: 0, tensors: vec![], metadata: serde_json::Value::Null },
            )
            .await;
        assert_eq!(err.unwrap_err().api_code(), Some("fenced"));

        // The fence survives a restart of ckptd.
        let mut d = d;
        d.restart().await.unwrap();
        let err = generation(&d, 1).open_save(&spec("job", 16, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{err}");
        // Writers that name no generation (tools, plain clients) are not fenced.
        client(&d).open_save(&spec("job", 16, 0, 2)).await.unwrap();
    })
    .await
}

/// A fence raise that finds the fence already there (a retry of one whose answer was lost, or
/// that failed before its flush) still journals it before answering and still ends the saves of
/// earlier generations; a save the fence's own generation opened, before or after, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_fence_raise_is_journalled_and_spares_the_new_generations_saves() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfe_0002);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let (old, new) = (generation(&d, 1), generation(&d, 2));
        let state: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 18)).collect();
        old.save(&spec("job", 4, 0, 2), &state[0], Wait::Staged).await.unwrap();
        // Generation 2's first rank opens step 6 before anyone raised the fence.
        new.save(&spec("job", 6, 0, 2), &state[0], Wait::Staged).await.unwrap();
        // Step 8 mixes the generations: generation 1 opened it, generation 2 sent an index.
        old.open_save(&spec("job", 8, 0, 2)).await.unwrap();
        new.save(&spec("job", 8, 1, 2), &state[1], Wait::Staged).await.unwrap();
        let flushes = || async { stats(&d).await["journal_flushes"].as_u64().unwrap() };
        assert_eq!(new.fence("job", 2).await.unwrap(), 2);
        let phase = |step: u64| {
            let c = client(&d);
            async move { c.save_status("job", step).await.unwrap().phase.name() }
        };
        assert_eq!(phase(4).await, "aborted", "generation 1's save outlived the fence");
        assert_eq!(phase(6).await, "open", "the fence's own generation's save was aborted");
        assert_eq!(phase(8).await, "aborted", "a save generation 1 opened outlived the fence");
        let before = flushes().await;
        assert_eq!(new.fence("job", 2).await.unwrap(), 2);
        assert!(flushes().await > before, "a repeated raise was answered without a journal flush");
        assert_eq!(phase(6).await, "open", "a repeated raise aborted the new generation's save");
        new.save(&spec("job", 6, 1, 2), &state[1], Wait::Committed).await.unwrap();
        assert_eq!(phase(6).await, "committed");
    })
    .await
}

/// Fences are kept in the store as well as in the index, and start-up reconciles the two: a
/// raise this node missed (another node's, or one its lost index held) reaches it and ends the
/// saves its journal restores, which name no generation, as the raise's first answer here would
/// have; and a fence only the index kept (an older release's) is written to the store, where a
/// rebuilt index would find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_reconciles_the_fence_with_the_store_and_ends_saves_a_missed_raise_replaced() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfe_0003);
        let dir = tempfile::tempdir().unwrap();
        let mut d = start_daemon(dir.path()).await;
        let fences = dir.path().join("store").join(ckpt_core::keys::fences_prefix("job"));
        let stored = || {
            let mut names: Vec<String> = std::fs::read_dir(&fences)
                .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            names.sort();
            names
        };
        assert_eq!(generation(&d, 1).fence("job", 1).await.unwrap(), 1);
        assert_eq!(stored(), vec![format!("{:020}", 1)], "the raise was not recorded in the store");
        let state: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 18)).collect();
        generation(&d, 1).save(&spec("job", 8, 0, 2), &state[0], Wait::Staged).await.unwrap();
        assert!(d.terminate(Duration::from_secs(20)).await);

        // Another node raised the job to generation 3 meanwhile.
        std::fs::write(fences.join(format!("{:020}", 3)), br#"{"job":"job","epoch":3}"#).unwrap();
        let logged = daemon_log(&d).len();
        d.restart().await.unwrap();
        let log = daemon_log(&d)[logged..].to_string();
        assert!(log.contains("fences_restored: 1"), "{log}");
        let status = client(&d).save_status("job", 8).await.unwrap();
        assert_eq!(status.phase.name(), "aborted", "a save opened before the missed raise lives on");
        let err = generation(&d, 2).open_save(&spec("job", 12, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{err}");
        generation(&d, 3).open_save(&spec("job", 12, 0, 2)).await.unwrap();

        // The store's records lost (a release before fences were recorded there, or a raise
        // that stopped before its record, which comes after its aborts): the index's fence goes
        // back to the store at the next start, and the saves the journal restores are aborted
        // first, as that raise would have.
        generation(&d, 3).save(&spec("job", 20, 0, 2), &state[0], Wait::Staged).await.unwrap();
        assert!(d.terminate(Duration::from_secs(20)).await);
        std::fs::remove_dir_all(&fences).unwrap();
        d.restart().await.unwrap();
        assert_eq!(stored(), vec![format!("{:020}", 3)], "the index's fence was not written to the store");
        let status = client(&d).save_status("job", 20).await.unwrap();
        assert_eq!(status.phase.name(), "aborted", "a save restored past an unfinished raise lives on");
        let err = generation(&d, 2).open_save(&spec("job", 16, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{err}");
    })
    .await
}
