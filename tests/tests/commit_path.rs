//! The commit path at scale and under the failures that hit it: a save larger than any one
//! request's limit, a lost acknowledgement of the root, indexes that do not match what is
//! stored, re-sent indexes for committed steps, abandoned saves, and stores written by the
//! previous format.

use std::time::Duration;

use bytes::Bytes;
use ckpt_client::daemon::DaemonOptions;
use ckpt_client::{Client, ClientError, ClientOptions, DType, SavePhase, Tensor, Wait};
use ckpt_core::{ChunkHash, ChunkRef, ShardIndex, TensorEntry};
use ckpt_tests::*;

fn config(dir: &std::path::Path, toml: &str) -> Vec<std::ffi::OsString> {
    let p = dir.join("ckptd.toml");
    std::fs::write(&p, toml).unwrap();
    vec!["--config".into(), p.into_os_string()]
}

fn api_status(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::Api { status, .. } => Some(*status),
        _ => None,
    }
}

/// More chunks in one save than any one request may name (`missing_query_hashes_max` is 100,000):
/// the save commits and every rank restores byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_save_of_150000_chunks_commits_and_restores() {
    bounded(Duration::from_secs(600), async {
        let seed = seed(0x5eed_0801);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.store = "memory://".into();
        let d = start_daemon_with(o).await;
        let c =
            Client::new(&d.url(), ClientOptions { chunk_bytes: 64, node_local: false, ..Default::default() }).unwrap();
        const WORLD: u32 = 8;
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 1_210_000)).collect();
        let chunks: u64 = states.iter().flatten().map(|t| (t.data.len() as u64).div_ceil(64)).sum();
        assert!(chunks > 150_000, "{chunks} chunks");
        let started = std::time::Instant::now();
        save_step(&c, "big", 1, &states).await.unwrap();
        eprintln!("saved {chunks} chunks in {:.1} s", started.elapsed().as_secs_f64());
        let listed = c.list("big").await.unwrap();
        assert_eq!(listed.committed.len(), 1);
        assert!(listed.committed[0].chunks > 150_000, "{:?}", listed.committed[0]);
        for r in 0..WORLD {
            assert!(c.load_rank("big", 1, r).await.unwrap() == states[r as usize], "rank {r}");
        }
    })
    .await
}

/// The root is created but its acknowledgement is lost: the retried create finds the same bytes
/// and the save is committed, once, with no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_root_write_after_a_lost_acknowledgement_is_committed() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0802);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.envs.push(("FAILPOINTS".into(), "ckptd::commit::root_ack_lost=1*return".into()));
        o.extra_args = config(dir.path(), "commit_retry_ms = 100\n");
        let d = start_daemon_with(o).await;
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
        let reports = save_step(&client(&d), "job", 1, &states).await.unwrap();
        assert!(reports.iter().all(|r| r.status.phase == SavePhase::Committed));
        let log = daemon_log(&d);
        assert!(log.contains("injected lost acknowledgement"), "the fail point did not fire:\n{log}");
        assert!(log.contains("root already present with identical bytes; committed"), "{log}");
        assert!(!log.contains("commit conflict"), "{log}");
        let store = dir.path().join("store");
        assert_eq!(stored_manifests(&store).len(), 1);
        assert_manifests_complete(&store);
        for r in 0..2 {
            assert!(client(&d).load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}

/// A shard index whose chunk reference states another length than the stored chunk is refused
/// at index put, and the store is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_mismatched_chunk_reference_is_refused_and_nothing_changes() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let data = Bytes::from(vec![7u8; 100]);
        let hash = ChunkHash::of(&data);
        let s = spec("job", 1, 0, 1);
        c.open_save(&s).await.unwrap();
        c.put_chunk("job", hash, data).await.unwrap();
        wait_uploads_drained(&d).await;
        let index = |len: u64| ShardIndex {
            rank: 0,
            tensors: vec![TensorEntry {
                name: "w".into(),
                dtype: ckpt_core::DType::U8,
                shape: vec![len],
                global_shape: vec![len],
                offsets: vec![0],
                chunks: vec![ChunkRef { hash, len }],
            }],
            metadata: serde_json::Value::Null,
        };
        let store = dir.path().join("store");
        let before = snapshot(&store);
        let err = c.put_shard_index("job", 1, &index(99)).await.unwrap_err();
        assert_eq!(api_status(&err), Some(400), "{err}");
        assert!(err.to_string().contains("is 99 bytes; the stored chunk is 100 bytes"), "{err}");
        assert_eq!(snapshot(&store), before, "a refused index changed the store");
        assert_eq!(c.save_status("job", 1).await.unwrap().phase, SavePhase::Open);
        // The right length commits.
        let status = c.put_shard_index("job", 1, &index(100)).await.unwrap();
        assert_eq!(status.phase, SavePhase::Committed, "{status:?}");
    })
    .await
}

/// An index re-sent for a committed step is answered "committed" if it is the committed one and
/// 409 otherwise; it never changes the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_index_for_a_committed_step_gets_409() {
    bounded(Duration::from_secs(60), async {
        let seed = seed(0x5eed_0804);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 256 << 10)).collect();
        save_step(&c, "job", 5, &states).await.unwrap();
        let cp = c.checkpoint("job", 5).await.unwrap();
        let committed = c.shard_index(&cp, 1).await.unwrap();
        let again = c.put_shard_index("job", 5, &committed).await.unwrap();
        assert_eq!(again.phase, SavePhase::Committed);
        let mut other = committed.clone();
        other.metadata = serde_json::json!({ "rank": 1, "changed": true });
        let err = c.put_shard_index("job", 5, &other).await.unwrap_err();
        assert_eq!(api_status(&err), Some(409), "{err}");
        assert!(err.to_string().contains("different index for rank 1"), "{err}");
        assert_eq!(c.checkpoint("job", 5).await.unwrap().root.hash, cp.root.hash);
    })
    .await
}

/// A save whose ranks never all arrive is aborted once it has made no progress for
/// `save_idle_abort_ms`; its slot is freed and the reason is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_save_is_aborted_after_its_timeout_and_frees_its_slot() {
    bounded(Duration::from_secs(60), async {
        let seed = seed(0x5eed_0805);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args =
            config(dir.path(), "save_idle_abort_ms = 1500\ncommit_retry_ms = 100\nsaves_in_flight_max = 1\n");
        let d = start_daemon_with(o).await;
        let c = impatient_client(&d);
        let rank0 = rank_tensors(seed, 0, 2, 64 << 10);
        c.save(&spec("job", 1, 0, 2), &rank0, Wait::Staged).await.unwrap();
        let started = std::time::Instant::now();
        let busy = c.open_save(&spec("job", 2, 0, 1)).await.unwrap_err();
        assert_eq!(api_status(&busy), Some(503), "the only slot is taken: {busy}");
        let aborted = loop {
            let s = c.save_status("job", 1).await.unwrap();
            if s.phase == SavePhase::Aborted {
                break s;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never aborted: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(started.elapsed() >= Duration::from_millis(1000), "aborted too early: {:?}", started.elapsed());
        let reason = aborted.error.unwrap_or_default();
        assert!(reason.contains("no progress") && reason.contains("1 of 2 ranks"), "{reason}");
        let listed = c.list("job").await.unwrap();
        assert!(listed.in_flight.iter().any(|s| s.step == 1 && s.error.as_deref() == Some(reason.as_str())));
        // The slot is free again.
        c.save(&spec("job", 2, 0, 1), &rank_tensors(seed, 0, 1, 64 << 10), Wait::Committed).await.unwrap();
    })
    .await
}

/// Indexes are bounded in bytes as well as in chunk references: ranks whose indexes name no
/// chunk but carry kilobytes of metadata are refused with 400 once their save would hold more
/// than `save_index_bytes_max`, and with 503 once the saves in flight together would hold more
/// than `in_flight_index_bytes_max`, until another save ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_in_flight_are_bounded_in_bytes_not_only_in_chunks() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args = config(
            dir.path(),
            "shard_index_bytes_max = 4096\nsave_index_bytes_max = 5000\nin_flight_index_bytes_max = 8000\n",
        );
        let d = start_daemon_with(o).await;
        let c = impatient_client(&d);
        let index = |rank: u32| ShardIndex { rank, tensors: vec![], metadata: serde_json::json!("m".repeat(2000)) };
        let held = || async { stats(&d).await["index_bytes_in_flight"].as_u64().unwrap() };
        c.open_save(&spec("job", 1, 0, 4)).await.unwrap();
        for rank in 0..2 {
            c.put_shard_index("job", 1, &index(rank)).await.unwrap();
        }
        let two = held().await;
        assert!((4000..5000).contains(&two), "two indexes of 2000 bytes of metadata hold {two} bytes");
        let err = c.put_shard_index("job", 1, &index(2)).await.unwrap_err();
        assert_eq!(api_status(&err), Some(400), "{err}");
        assert!(err.to_string().contains("more than one save may (5000: save_index_bytes_max"), "{err}");
        // A retry of an accepted index is not charged again.
        c.put_shard_index("job", 1, &index(0)).await.unwrap();
        assert_eq!(held().await, two);

        c.open_save(&spec("job", 2, 0, 4)).await.unwrap();
        c.put_shard_index("job", 2, &index(0)).await.unwrap();
        let err = c.put_shard_index("job", 2, &index(1)).await.unwrap_err();
        assert_eq!(api_status(&err), Some(503), "{err}");
        assert!(err.to_string().contains("in_flight_index_bytes_max is 8000"), "{err}");
        assert_eq!(c.save_status("job", 2).await.unwrap().ranks_received, 1, "the refused index was kept");
        assert_eq!(held().await, two + two / 2, "a refused index left its bytes counted");
        c.abort("job", 1).await.unwrap();
        assert_eq!(held().await, two / 2);
        c.put_shard_index("job", 2, &index(1)).await.unwrap();
        assert_eq!(held().await, two);
    })
    .await
}

/// Opening a save again is not progress: a client that re-opens its saves every few moments
/// cannot keep them, and their slots, from the idle abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_opening_a_save_does_not_keep_it_from_the_idle_abort() {
    bounded(Duration::from_secs(60), async {
        let seed = seed(0x5eed_0806);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args = config(dir.path(), "save_idle_abort_ms = 1500\ncommit_retry_ms = 100\n");
        let d = start_daemon_with(o).await;
        let c = impatient_client(&d);
        c.save(&spec("job", 1, 0, 2), &rank_tensors(seed, 0, 2, 64 << 10), Wait::Staged).await.unwrap();
        let started = std::time::Instant::now();
        // The abort shows in the status, or as a re-open that found the save gone and opened
        // it afresh (no rank in yet).
        loop {
            let s = c.save_status("job", 1).await.unwrap();
            if s.phase == SavePhase::Aborted {
                let reason = s.error.unwrap_or_default();
                assert!(reason.contains("no progress"), "{reason}");
                break;
            }
            let again = c.open_save(&spec("job", 1, 0, 2)).await.unwrap();
            if again.ranks_received == 0 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "re-opens kept the idle save alive: {s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(1000), "aborted too early: {:?}", started.elapsed());
    })
    .await
}

/// A store written by the previous format (one manifest with every index inline) still lists,
/// restores and verifies, and new checkpoints written over it use the new format and name the
/// old one as their predecessor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_the_previous_format_restores() {
    bounded(Duration::from_secs(60), async {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(fixtures.join("store-v1"))
            .arg(dir.path().join("store"))
            .status()
            .unwrap();
        assert!(status.success());
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures.join("store-v1.expected.json")).unwrap()).unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let steps: Vec<u64> = c.list("legacy").await.unwrap().committed.iter().map(|m| m.step).collect();
        assert_eq!(steps, vec![10, 20]);
        for step in [10u64, 20] {
            assert_eq!(c.checkpoint("legacy", step).await.unwrap().root.version, 1);
            for rank in 0..2u32 {
                let tensors = c.load_rank("legacy", step, rank).await.unwrap();
                let want = &expected[step.to_string()][rank as usize];
                assert_eq!(tensors.len(), want.as_object().unwrap().len());
                for t in &tensors {
                    assert_eq!(
                        want[&t.name].as_str(),
                        Some(blake3::hash(&t.data).to_hex().as_str()),
                        "{step} rank {rank} {}",
                        t.name
                    );
                }
            }
            assert!(c.verify("legacy", step, |_| {}).await.unwrap().ok());
            let cp = c.checkpoint("legacy", step).await.unwrap();
            let (rows, shape) = c.load_rows(&cp, "layers.0.attn.wq", 10, 20).await.unwrap();
            assert_eq!((rows.len(), shape), (20 * 256 * 4, vec![48, 256]));
        }
        let t = vec![Tensor::whole("w", DType::U8, vec![3], Bytes::from_static(b"new"))];
        c.save(&spec("legacy", 30, 0, 1), &t, Wait::Committed).await.unwrap();
        let cp = c.checkpoint("legacy", 30).await.unwrap();
        assert_eq!((cp.root.version, cp.root.previous_committed_step), (2, Some(20)));
        assert!(c.load_rank("legacy", 30, 0).await.unwrap() == t);
    })
    .await
}

/// Index puts of a wide save are O(1) each and share journal syncs: 512 ranks, all at once,
/// through 64 index-request slots (the rest wait for one, or are told to retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_index_puts_share_journal_syncs() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args = config(dir.path(), "index_requests_max = 64\n");
        let d = start_daemon_with(o).await;
        let c = client(&d);
        const WORLD: u32 = 512;
        let states: Vec<Vec<Tensor>> = (0..WORLD)
            .map(|r| {
                vec![Tensor {
                    name: "w".into(),
                    dtype: DType::U8,
                    shape: vec![8],
                    global_shape: vec![8 * WORLD as u64],
                    offsets: vec![8 * r as u64],
                    data: Bytes::from(format!("rank{r:04}").into_bytes()),
                }]
            })
            .collect();
        let before = stats(&d).await["journal_flushes"].as_u64().unwrap();
        save_step(&c, "wide", 1, &states).await.unwrap();
        let flushes = stats(&d).await["journal_flushes"].as_u64().unwrap() - before;
        // Without grouping: one sync per open, per index put and per phase change (over 1,024).
        assert!(flushes < WORLD as u64, "{flushes} journal syncs for {WORLD} ranks");
        let cp = c.checkpoint("wide", 1).await.unwrap();
        assert!(cp.root.to_bytes().len() < 100 * WORLD as usize, "root of {} bytes", cp.root.to_bytes().len());
        for r in [0, 255, 511] {
            assert!(c.load_rank("wide", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}

/// A chunk file in a local store that the index does not know (left by a killed ckptd, or
/// renamed into place by a write still waiting for its sync) may not be durable yet: a put of
/// that chunk is answered `durable` only after a sync of the store's filesystem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_found_in_the_store_but_not_in_the_index_is_synced_before_it_is_called_durable() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let data: Vec<u8> = (0..1u32 << 16).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let hash = ChunkHash::of(&data);
        let http = reqwest::Client::new();
        let put = |job: &str| http.put(format!("{}/v1/jobs/{job}/chunks/{hash}", d.url())).body(data.clone()).send();
        assert!(put("a").await.unwrap().status().is_success());
        wait_uploads_drained(&d).await;
        // The same stored file under job b's key, as a write ckptd did not live to record.
        let store = dir.path().join("store");
        let (from, to) = (chunk_path(&store, "a", &hash), chunk_path(&store, "b", &hash));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
        let syncs = || async { stats(&d).await["store_syncs"].as_u64().unwrap() };
        let before = syncs().await;
        let r = put("b").await.unwrap();
        assert!(r.status().is_success());
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["state"], "durable", "{answer}");
        assert!(syncs().await > before, "a chunk found only in the store was answered durable without a sync");
    })
    .await
}

/// An abort is journalled before anyone learns of it: a rank that saw `aborted` must not find
/// the save back, ready to commit, after a power cut. The journal is slowed (a failpoint); the
/// first status query that says `aborted` comes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nobody_learns_of_an_abort_before_it_is_journalled() {
    bounded(Duration::from_secs(60), async {
        const SLOW: Duration = Duration::from_millis(1500);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.envs.push(("FAILPOINTS".into(), format!("ckptd::abort::before_journal=sleep({})", SLOW.as_millis())));
        let d = start_daemon_with(o).await;
        let c = client(&d);
        let state = rank_tensors(seed(0xab_0001), 0, 2, 1 << 16);
        c.save(&spec("job", 3, 0, 2), &state, Wait::Staged).await.unwrap();
        let started = std::time::Instant::now();
        let abort = {
            let c = c.clone();
            tokio::spawn(async move { c.abort("job", 3).await })
        };
        let seen = loop {
            let s = c.save_status("job", 3).await.unwrap();
            if s.phase == SavePhase::Aborted {
                break started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(20), "the abort never showed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        abort.await.unwrap().unwrap();
        assert!(
            seen >= SLOW - Duration::from_millis(100),
            "a status query saw the abort after {seen:?}, before its journal"
        );
    })
    .await
}

/// A committed save's journalled ranks are removed after its commit is answered (at 16,384
/// ranks their removal was most of the commit's time), behind a gate: a save opened afresh under
/// the same key (the checkpoint deleted and its step saved again) waits for the removal, which
/// would otherwise take the new save's ranks with it. The removal is slowed (a failpoint) past
/// `busy_wait_ms`, so the open is first refused (503) and retried by the client: a refused open
/// must leave nothing that lets the retry skip the gate. The new save's rank must still be
/// journalled after a SIGKILL and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_saved_again_keeps_its_ranks_while_the_last_commits_are_removed() {
    bounded(Duration::from_secs(90), async {
        const SLOW: Duration = Duration::from_millis(3000);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.envs.push(("FAILPOINTS".into(), format!("ckptd::commit::before_rank_removal=sleep({})", SLOW.as_millis())));
        o.extra_args = config(dir.path(), "busy_wait_ms = 200\n");
        let mut d = start_daemon_with(o).await;
        let c = client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed(0xab_0002), r, 2, 1 << 16)).collect();
        save_step(&c, "job", 3, &states).await.unwrap();
        c.delete("job", 3, true).await.unwrap();
        c.save(&spec("job", 3, 0, 2), &states[0], Wait::Staged).await.unwrap();
        // The removal began before the delete: it has ended by now; another commit's journal
        // syncs make it durable (else the kill would lose it, and with it what it took).
        tokio::time::sleep(SLOW).await;
        save_step(&c, "other", 1, &states).await.unwrap();
        d.kill();
        d.restart().await.unwrap();
        let s = client(&d).save_status("job", 3).await.unwrap();
        assert_eq!((s.ranks_received, s.world_size), (1, 2), "the new save's rank 0 was lost from the journal: {s:?}");
        assert!(!matches!(s.phase, SavePhase::Committed | SavePhase::Aborted), "{s:?}");
    })
    .await
}
