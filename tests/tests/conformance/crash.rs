//! ckptd killed with SIGKILL at several points of a save and restarted: the previous committed
//! checkpoint still loads and verifies, no manifest references a missing chunk, and the
//! interrupted save completes when the client retries (or at restart) — never half-visible.
//!
//! The kills come from fail points compiled into the ckptd these tests start: the process
//! sends itself SIGKILL at the named point, so the crash lands exactly there.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300;
    sigkill_after_some_chunks_of_a_save,
    sigkill_after_all_chunks_before_the_manifest,
    sigkill_right_after_the_manifest,
    sigkill_from_outside_mid_save_then_resume_without_resending,
    a_failed_manifest_write_is_retried_in_the_background,
);

const WORLD: u32 = 2;
/// Distinct chunks step 1 stores: per rank, 8 MiB of random tensors in 1 MiB chunks, plus the
/// small "step" tensor, which is the same on every rank and so stored once.
const STEP1_CHUNKS: u32 = WORLD * 8 + 1;

async fn crash_during_second_save(backend: Backend, failpoint: &str, expect_committed_before_restart: bool) {
    let seed = seed(0x5eed_0003);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut opts = store.daemon_options(dir.path());
    opts.envs.push(("FAILPOINTS".into(), failpoint.into()));
    let mut d = start_daemon_with(opts).await;
    let step1: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 8 << 20)).collect();
    let step2: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed + 1, r, WORLD, 8 << 20)).collect();
    save_step(&impatient_client(&d), "job", 1, &step1).await.unwrap();

    let err = save_step(&impatient_client(&d), "job", 2, &step2).await;
    assert!(err.is_err(), "the save should have lost its ckptd");
    let status = d.wait_exit(Duration::from_secs(30)).await.expect("ckptd should have killed itself");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "ckptd died by SIGKILL at {failpoint}");

    // While ckptd is down, the store alone must be consistent.
    store.assert_complete().await;
    let visible: Vec<u64> = store.manifests().await.iter().map(|m| m.step).collect();
    let expected = if expect_committed_before_restart { vec![1, 2] } else { vec![1] };
    assert_eq!(visible, expected, "manifests in the store right after the crash at {failpoint}");

    d.options_mut().envs.retain(|(k, _)| k != "FAILPOINTS");
    d.restart().await.unwrap();
    let c = client(&d);
    store.assert_complete().await;
    for m in c.list("job").await.unwrap().committed {
        // Whatever is listed as committed is whole.
        assert!(c.verify("job", m.step, |_| {}).await.unwrap().ok(), "step {} does not verify", m.step);
    }
    for r in 0..WORLD {
        assert!(c.load_rank("job", 1, r).await.unwrap() == step1[r as usize], "step 1 rank {r} after the crash");
    }

    // The client retries the interrupted save: it completes.
    save_step(&c, "job", 2, &step2)
        .await
        .unwrap_or_else(|e| panic!("retry after the crash at {failpoint}: {e}\n{}", daemon_log(&d)));
    assert_eq!(c.latest("job").await.unwrap(), Some(2));
    assert_eq!(store.manifests().await.iter().filter(|m| m.step == 2).count(), 1);
    for r in 0..WORLD {
        assert!(c.load_rank("job", 2, r).await.unwrap() == step2[r as usize], "step 2 rank {r} after the retry");
    }
    assert!(c.verify("job", 2, |_| {}).await.unwrap().ok());
    store.assert_complete().await;
}

async fn sigkill_after_some_chunks_of_a_save(backend: Backend) {
    // The crash comes right after the fifth chunk of step 2 is durable.
    let fp = format!("ckptd::chunk::after_put={}*off->return", STEP1_CHUNKS + 4);
    crash_during_second_save(backend, &fp, false).await
}

async fn sigkill_after_all_chunks_before_the_manifest(backend: Backend) {
    crash_during_second_save(backend, "ckptd::commit::before_manifest=1*off->return", false).await
}

async fn sigkill_right_after_the_manifest(backend: Backend) {
    crash_during_second_save(backend, "ckptd::commit::after_manifest=1*off->return", true).await
}

async fn sigkill_from_outside_mid_save_then_resume_without_resending(backend: Backend) {
    {
        let seed = seed(0x5eed_0004);
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new(backend, dir.path()).await;
        let mut d = start_daemon_with(store.daemon_options(dir.path())).await;
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 8 << 20)).collect();
        let c = client(&d);
        // Rank 0 finishes its part; rank 1 never starts: the save is half done. Once ckptd
        // reports nothing left to upload, rank 0's chunks are durable.
        c.save(&spec("job", 5, 0, WORLD), &states[0], ckpt_client::Wait::Staged).await.unwrap();
        wait_uploads_drained(&d).await;
        d.kill();
        d.restart().await.unwrap();
        let c = client(&d);
        let list = c.list("job").await.unwrap();
        assert!(list.committed.is_empty(), "a half-done save must not be visible");
        assert_eq!(list.in_flight.len(), 1);
        assert_eq!(list.in_flight[0].ranks_received, 1, "rank 0's acked index survived the crash");
        // Rank 0's chunks are durable: its retry sends nothing.
        let again = c.save(&spec("job", 5, 0, WORLD), &states[0], ckpt_client::Wait::Staged).await.unwrap();
        assert_eq!(again.bytes_sent, 0, "durable chunks were sent again");
        c.save(&spec("job", 5, 1, WORLD), &states[1], ckpt_client::Wait::Committed).await.unwrap();
        for r in 0..WORLD {
            assert!(c.load_rank("job", 5, r).await.unwrap() == states[r as usize]);
        }
        store.assert_complete().await;
    }
}

/// A manifest create that keeps failing past the store adapter's retries leaves the save ready
/// but uncommitted; ckptd retries the commit in the background, with no client action.
///
/// Step 1 commits at its first attempt; then ten creates fail. Step 2 holds the same bytes,
/// so every chunk is durable before its indexes arrive and no upload event tries to commit it:
/// only the last index's put does, and it is answered with that attempt's failure. From then on
/// only the background retry (every `commit_retry_ms`) can commit it.
async fn a_failed_manifest_write_is_retried_in_the_background(backend: Backend) {
    let seed = seed(0x5eed_0004);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut opts = store.daemon_options(dir.path());
    opts.envs.push(("FAILPOINTS".into(), "ckptd::commit::manifest_put=1*off->10*return->off".into()));
    let cfg = dir.path().join("ckptd.toml");
    std::fs::write(&cfg, "commit_retry_ms = 200\n").unwrap();
    opts.extra_args.extend(["--config".into(), cfg.into_os_string()]);
    let d = start_daemon_with(opts).await;
    // No client retries: a retried index put would try to commit too.
    let once = ckpt_client::ClientOptions { attempts_max: 1, ..client(&d).options().clone() };
    let c = ckpt_client::Client::new(&d.url(), once).unwrap();
    let state: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 1 << 20)).collect();
    save_step(&c, "job", 1, &state).await.unwrap();
    for (r, t) in state.iter().enumerate() {
        let last = r as u32 == WORLD - 1;
        let put = c.save(&spec("job", 2, r as u32, WORLD), t, ckpt_client::Wait::Staged).await;
        match put {
            Ok(s) => {
                assert!(!last, "the last index's commit attempt did not fail: {s:?}\n{}", daemon_log(&d));
                assert_eq!(s.bytes_sent, 0, "step 2's chunks were not all durable already");
            }
            Err(e) => assert!(last, "rank {r}: {e}"),
        }
    }
    let committed = bounded(Duration::from_secs(20), async {
        loop {
            if let Ok(s) = c.save_status("job", 2).await {
                if s.phase == ckpt_client::SavePhase::Committed {
                    return s;
                }
                assert_ne!(s.phase, ckpt_client::SavePhase::Aborted, "{s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(committed.manifest_hash.is_some());
    // The status answers from the index as soon as the root is recorded; the retry logs its
    // success only after the journal sync that follows.
    let logged = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon_log(&d).contains("commit retried in the background succeeded") {
        assert!(std::time::Instant::now() < logged, "{}", daemon_log(&d));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in 0..WORLD {
        assert!(c.load_rank("job", 2, r).await.unwrap() == state[r as usize]);
    }
    store.assert_complete().await;
}
