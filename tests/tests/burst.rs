//! Burst absorption: bounded memory under a burst larger than the budget, staged chunks that
//! survive a restart, 503 + retry under backpressure, dedup, compression.

use std::time::Duration;

use ckpt_client::daemon::{DaemonOptions, LocalDaemon};
use ckpt_client::{AsyncSaver, Tensor, Wait};
use ckpt_tests::*;

const MIB: u64 = 1 << 20;

fn opts_with(dir: &std::path::Path, args: &[(&str, String)]) -> DaemonOptions {
    let mut o = DaemonOptions::in_dir(ckptd_exe(), dir);
    for (k, v) in args {
        o.extra_args.push(k.into());
        o.extra_args.push(v.into());
    }
    o
}

/// A config file for settings that have no flag.
fn config_file(dir: &std::path::Path, toml: &str) -> (&'static str, String) {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("ckptd.toml");
    std::fs::write(&p, toml).unwrap();
    ("--config", p.to_string_lossy().into_owned())
}

async fn restore_all(d: &LocalDaemon, job: &str, step: u64, states: &[Vec<Tensor>]) {
    let c = client(d);
    for (r, s) in states.iter().enumerate() {
        assert!(c.load_rank(job, step, r as u32).await.unwrap() == *s, "rank {r} of {job}@{step} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_a_burst_larger_than_the_budget() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0101);
        let dir = tempfile::tempdir().unwrap();
        let budget = 64 * MIB;
        // The store drains at 128 MiB/s while 4 ranks push 256 MiB at once: staging must
        // overflow memory into the spill directory instead of growing.
        let d = start_daemon_with(opts_with(
            dir.path(),
            &[
                ("--staging-memory-bytes-max", budget.to_string()),
                ("--upload-bytes-per-s", (128 * MIB).to_string()),
                ("--compression-level", "0".into()),
            ],
        ))
        .await;
        let c = client(&d);
        let states: Vec<_> = (0..4).map(|r| rank_tensors(seed, r, 4, 64 * MIB)).collect();
        save_step(&c, "burst", 1, &states).await.unwrap();
        let pid = d.pid().unwrap();
        let peak = peak_rss_bytes(pid);
        let s = stats(&d).await;
        eprintln!("ckptd peak RSS {} MiB for a {} MiB budget; stats {s}", peak / MIB, budget / MIB);
        assert!(s["staging"]["chunks_staged_spill"].as_u64().unwrap() > 0, "the burst never overflowed memory: {s}");
        assert!(
            peak <= budget + 128 * MIB,
            "peak RSS {} MiB exceeds budget {} MiB + 128 MiB",
            peak / MIB,
            budget / MIB
        );
        restore_all(&d, "burst", 1, &states).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_with_staged_chunks_uploads_them_and_commits() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0102);
        let dir = tempfile::tempdir().unwrap();
        // No memory staging (everything spills) and an upload pace of 1 byte/s: after the
        // first upload, chunks stay staged on the spill disk.
        let mut d = start_daemon_with(opts_with(
            dir.path(),
            &[("--staging-memory-bytes-max", "0".into()), ("--upload-bytes-per-s", "1".into())],
        ))
        .await;
        let c = client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 8 * MIB)).collect();
        for (r, s) in states.iter().enumerate() {
            c.save(&spec("job", 1, r as u32, 2), s, Wait::Staged).await.unwrap();
        }
        let st = c.save_status("job", 1).await.unwrap();
        assert_eq!(st.phase, ckpt_client::SavePhase::Staged, "all indexes in, chunks only staged");
        let pending = stats(&d).await["staging"]["chunks_pending"].as_u64().unwrap();
        assert!(pending > 10, "chunks should be waiting on the spill disk, {pending} pending");
        d.kill();

        // Restart without the pace: the spilled chunks upload and the step commits with no
        // client action.
        d.options_mut().extra_args.clear();
        d.restart().await.unwrap();
        let c = client(&d);
        let st = c.wait_committed("job", 1).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(&d)));
        assert_eq!(st.phase, ckpt_client::SavePhase::Committed);
        assert!(daemon_log(&d).contains(&format!("spilled_chunks_requeued: {pending}")), "{}", daemon_log(&d));
        restore_all(&d, "job", 1, &states).await;
        assert_manifests_complete(&dir.path().join("store"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_staging_answers_503_with_retry_after_and_clients_retry() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0103);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_file(
            &dir.path().join("cfg"),
            "staging_memory_bytes_max = 8388608\nstaging_spill_bytes_max = 0\nchunk_bytes_max = 4194304\nbusy_wait_ms = 50\ncompression_level = 0\n",
        );
        // Paced to 1 byte/s: the first chunk uploads, the next two fill memory and wait.
        let mut d = start_daemon_with(opts_with(dir.path(), &[cfg.clone(), ("--upload-bytes-per-s", "1".into())])).await;
        let http = reqwest::Client::new();
        let mut statuses = Vec::new();
        for i in 0..4u8 {
            let data = vec![i; 4 * MIB as usize];
            let h = ckpt_core::ChunkHash::of(&data);
            let r = http.put(format!("{}/v1/jobs/j/chunks/{h}", d.url())).body(data).send().await.unwrap();
            statuses.push((r.status().as_u16(), r.headers().get("retry-after").cloned(), r.text().await.unwrap()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, retry_after, body) = &statuses[3];
        assert_eq!(*status, 503, "fourth chunk should be refused: {statuses:?}");
        assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap().to_string()), Some("1".to_string()));
        assert!(body.contains("\"busy\""), "{body}");

        // Unpaced but small: a 32 MiB save through 8 MiB of staging gets 503s and retries.
        d.options_mut().extra_args = vec![cfg.0.into(), cfg.1.clone().into(), "--upload-bytes-per-s".into(), (64 * MIB).to_string().into()];
        d.restart().await.unwrap();
        let c = client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 16 * MIB)).collect();
        save_step(&c, "job", 1, &states).await.unwrap();
        let s = stats(&d).await;
        assert!(s["staging"]["busy_rejections"].as_u64().unwrap() > 0, "no 503 was answered: {s}");
        restore_all(&d, "job", 1, &states).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedup_sends_nothing_for_an_unchanged_checkpoint() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0104);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let states: Vec<_> = (0..3).map(|r| rank_tensors(seed, r, 3, 4 * MIB)).collect();
        save_step(&c, "job", 1, &states).await.unwrap();
        let chunk_files =
            |s: &std::collections::BTreeMap<String, String>| s.keys().filter(|k| k.contains("/chunks/")).count();
        let before = chunk_files(&snapshot(&store));
        let sent: u64 = save_step(&c, "job", 2, &states).await.unwrap().iter().map(|r| r.bytes_sent).sum();
        assert_eq!(sent, 0, "an unchanged checkpoint sent {sent} bytes");
        assert_eq!(chunk_files(&snapshot(&store)), before, "an unchanged checkpoint stored new chunks");
        assert_eq!(c.latest("job").await.unwrap(), Some(2));
        restore_all(&d, "job", 2, &states).await;

        // One changed tensor on one rank sends only that tensor's chunks.
        let mut changed = states.clone();
        changed[1][0] = rank_tensors(seed + 9, 1, 3, 4 * MIB)[0].clone();
        let sent: u64 = save_step(&c, "job", 3, &changed).await.unwrap().iter().map(|r| r.bytes_sent).sum();
        assert_eq!(sent, changed[1][0].data.len() as u64);
        restore_all(&d, "job", 3, &changed).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_and_uncompressed_chunks_restore_identically() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0105);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let mut d = start_daemon_with(opts_with(dir.path(), &[("--compression-level", "3".into())])).await;
        let c = client(&d);
        // Rank tensors: random (incompressible) plus a low-entropy tensor (compressible, like
        // optimizer state early in training or bf16 with few distinct values).
        let states: Vec<Vec<Tensor>> = (0..2u32)
            .map(|r| {
                let mut t = rank_tensors(seed, r, 2, 4 * MIB);
                let smooth: Vec<u8> = (0..4 * MIB as usize).map(|i| ((i / 4096) % 7) as u8 + r as u8).collect();
                // Each rank's own tensor (a whole tensor saved by several ranks must be identical).
                t.push(Tensor::whole(
                    format!("smooth.{r}"),
                    ckpt_client::DType::U8,
                    vec![smooth.len() as u64],
                    smooth.into(),
                ));
                t
            })
            .collect();
        save_step(&c, "job", 1, &states).await.unwrap();
        let codecs: Vec<u8> = snapshot(&store)
            .keys()
            .filter(|k| k.contains("/chunks/"))
            .map(|k| std::fs::read(store.join(k)).unwrap()[5])
            .collect();
        assert!(codecs.contains(&1) && codecs.contains(&0), "expected both zstd and raw chunks, got codecs {codecs:?}");
        assert!(stats(&d).await["staging"]["chunks_compressed"].as_u64().unwrap() > 0);
        restore_all(&d, "job", 1, &states).await;

        // A ckptd with compression off reads compressed chunks and writes raw ones.
        d.options_mut().extra_args = vec!["--compression-level".into(), "0".into()];
        d.restart().await.unwrap();
        restore_all(&d, "job", 1, &states).await;
        let mut next = states.clone();
        for (r, s) in next.iter_mut().enumerate() {
            let smooth: Vec<u8> = (0..4 * MIB as usize).map(|i| ((i / 512) % 5) as u8 + r as u8).collect();
            s[3] =
                Tensor::whole(format!("smooth.{r}"), ckpt_client::DType::U8, vec![smooth.len() as u64], smooth.into());
        }
        save_step(&client(&d), "job", 2, &next).await.unwrap();
        assert_eq!(stats(&d).await["staging"]["chunks_compressed"].as_u64(), Some(0));
        restore_all(&d, "job", 2, &next).await;
        assert!(client(&d).verify("job", 1, |_| {}).await.unwrap().ok());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_save_stalls_only_for_the_copy_and_reuses_its_buffer() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0106);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let state = rank_tensors(seed, 0, 1, 16 * MIB);
        let total: usize = state.iter().map(|t| t.data.len()).sum();
        let saver = AsyncSaver::new(client(&d), total);
        let views: Vec<_> = state.iter().map(Tensor::view).collect();
        let first = saver.save(spec("job", 1, 0, 1), &views, Wait::Committed).await.unwrap();
        assert_eq!(first.bytes, total as u64);
        // The second save must wait for the buffer, and says how long it waited.
        let second = saver.save(spec("job", 2, 0, 1), &views, Wait::Committed).await.unwrap();
        let r1 = first.finish().await.unwrap();
        assert!(second.waited > Duration::ZERO);
        let r2 = second.finish().await.unwrap();
        assert_eq!(r1.status.phase, ckpt_client::SavePhase::Committed);
        assert_eq!(r2.bytes_sent, 0, "step 2 is unchanged");
        let too_big = vec![0u8; total + 1];
        let v = ckpt_client::TensorView { data: &too_big, ..views[0] };
        assert!(saver.save(spec("job", 3, 0, 1), &[v], Wait::Staged).await.is_err(), "state larger than the buffer");
        let back = client(&d).load_rank("job", 2, 0).await.unwrap();
        assert!(back == state);
    })
    .await
}

/// The saver compares each chunk with what its buffer holds from the last save: unchanged
/// chunks keep their hash, changed ones (even by one byte in the middle) are copied and hashed
/// again, and a chunk changed back is found again by dedup. Every restore matches its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_saver_sends_only_what_changed_and_never_a_stale_hash() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0107);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let original = rank_tensors(seed, 0, 1, 16 * MIB);
        let total: usize = original.iter().map(|t| t.data.len()).sum();
        let saver = AsyncSaver::new(client(&d), total);
        let save = |step: u64, state: Vec<Tensor>| {
            let saver = &saver;
            async move {
                let views: Vec<_> = state.iter().map(Tensor::view).collect();
                saver.save(spec("job", step, 0, 1), &views, Wait::Committed).await.unwrap().finish().await.unwrap()
            }
        };
        let first = save(1, original.clone()).await;
        assert_eq!(first.bytes_sent, total as u64);
        // One byte in the middle of tensor 0's fourth 1 MiB chunk.
        let mut changed = original.clone();
        let mut bytes = changed[0].data.to_vec();
        bytes[3 * MIB as usize + 512 * 1024] ^= 0x01;
        changed[0].data = bytes.into();
        let second = save(2, changed.clone()).await;
        assert_eq!((second.chunks_sent, second.bytes_sent), (1, MIB), "only the changed chunk is sent");
        let third = save(3, original.clone()).await;
        assert_eq!(third.bytes_sent, 0, "the chunk changed back is in the store already");
        let c = client(&d);
        for (step, want) in [(1, &original), (2, &changed), (3, &original)] {
            assert!(c.load_rank("job", step, 0).await.unwrap() == *want, "step {step} restored other bytes");
        }
    })
    .await
}

/// A chunk put's answer says what it promises: `staged` for a chunk in the staging tier (not
/// yet in the store), `durable` only once the chunk is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_put_answers_say_staged_until_the_chunk_is_durable() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        // A pace of 1 byte/s: the first upload goes at once, the next waits for hours.
        let d = start_daemon_with(opts_with(dir.path(), &[("--upload-bytes-per-s", "1".into())])).await;
        let http = reqwest::Client::new();
        let put = |data: Vec<u8>| {
            let hash = ckpt_core::ChunkHash::of(&data);
            let r = http.put(format!("{}/v1/jobs/job/chunks/{hash}", d.url())).body(data).send();
            async move {
                let r = r.await.unwrap();
                (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
            }
        };
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let (status, body) = put(a.clone()).await;
        assert_eq!(
            (status, body["state"].as_str(), body["written"].as_bool()),
            (201, Some("staged"), Some(true)),
            "{body}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while stats(&d).await["staging"]["chunks_uploaded"].as_u64() != Some(1) {
            assert!(std::time::Instant::now() < deadline, "the first chunk never became durable");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = put(b.clone()).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("staged")), "{body}");
        let (status, body) = put(b).await;
        assert_eq!(
            (status, body["state"].as_str(), body["written"].as_bool()),
            (200, Some("staged"), Some(false)),
            "a chunk waiting for upload is not durable: {body}"
        );
        let (status, body) = put(a).await;
        assert_eq!(
            (status, body["state"].as_str(), body["written"].as_bool()),
            (200, Some("durable"), Some(false)),
            "{body}"
        );
    })
    .await
}
