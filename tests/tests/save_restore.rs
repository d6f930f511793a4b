//! 8 ranks save 64 MiB each concurrently; the step commits once; every rank restores
//! byte-identical; `ckpt verify` passes. Status queries wait for their commit; chunk reads
//! answer one byte range.

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

/// `GET .../saves/{step}?wait_ms=` answers when the save ends, not at its next poll, and never
/// holds a query past `status_wait_ms_max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_query_waits_for_its_commit_and_no_longer() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0002);
        let dir = tempfile::tempdir().unwrap();
        let mut opts = ckpt_client::daemon::DaemonOptions::in_dir(ckptd_exe(), dir.path());
        opts.envs.push(("CKPTD_CONFIG".into(), dir.path().join("ckptd.toml").to_string_lossy().into_owned()));
        std::fs::write(dir.path().join("ckptd.toml"), "status_wait_ms_max = 5000\n").unwrap();
        let d = start_daemon_with(opts).await;
        let c = client(&d);
        let http = reqwest::Client::new();
        let status = |step: u64, wait: &str| {
            let (http, url) = (http.clone(), format!("{}/v1/jobs/lp/saves/{step}?wait_ms={wait}", d.url()));
            async move {
                let t = std::time::Instant::now();
                let r = http.get(url).send().await.unwrap();
                let code = r.status().as_u16();
                (code, r.json::<serde_json::Value>().await.unwrap(), t.elapsed())
            }
        };
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();

        // Rank 0 in; a query waits; rank 1 arrives 300 ms later and the query answers then.
        c.save(&spec("lp", 1, 0, 2), &states[0], Wait::Staged).await.unwrap();
        let waiting = tokio::spawn(status(1, "20000"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the query answered before its save ended");
        c.save(&spec("lp", 1, 1, 2), &states[1], Wait::Staged).await.unwrap();
        let staged = std::time::Instant::now();
        let (code, body, took) = waiting.await.unwrap();
        let after = staged.elapsed();
        assert_eq!((code, body["phase"].as_str()), (200, Some("committed")), "{body}");
        // ckptd re-looks on its own only every 2 s: an answer this soon after the last rank came
        // from the commit's announcement.
        assert!(after < Duration::from_millis(1000), "answered {after:?} after the last rank (asked {took:?} before)");

        // A save that does not end: held for the wait asked, and at most status_wait_ms_max.
        c.open_save(&spec("lp", 2, 0, 2)).await.unwrap();
        let (code, body, took) = status(2, "400").await;
        assert_eq!(code, 200, "{body}");
        assert_ne!(body["phase"].as_str(), Some("committed"));
        assert!(took >= Duration::from_millis(400) && took < Duration::from_millis(4500), "held {took:?}");
        let (_, _, took) = status(2, "600000").await;
        assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(15), "held {took:?}, max 5 s");
        let (code, body, _) = status(2, "soon").await;
        assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    })
    .await
}

/// A chunk read with a `Range` header gets exactly those bytes (206 and their Content-Range);
/// a range past the end, several ranges, or one that does not parse get 416 with the length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_read_answers_one_byte_range_exactly() {
    bounded(Duration::from_secs(60), async {
        let seed = seed(0x5eed_0a01);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut data = vec![0u8; 10_000];
        rand::RngCore::fill_bytes(&mut rng, &mut data);
        let hash = ckpt_core::ChunkHash::of(&data);
        c.put_chunk("job", hash, bytes::Bytes::from(data.clone())).await.unwrap();
        wait_uploads_drained(&d).await;
        let http = reqwest::Client::new();
        let get = |range: Option<&'static str>| {
            let mut r = http.get(format!("{}/v1/jobs/job/chunks/{hash}", d.url()));
            if let Some(range) = range {
                r = r.header("range", range);
            }
            r.send()
        };
        let whole = get(None).await.unwrap();
        assert_eq!(whole.status(), 200);
        assert!(whole.bytes().await.unwrap() == data);
        for (range, want, content_range) in [
            ("bytes=0-99", &data[..100], "bytes 0-99/10000"),
            ("bytes=1234-5677", &data[1234..5678], "bytes 1234-5677/10000"),
            ("bytes=9990-", &data[9990..], "bytes 9990-9999/10000"),
            ("bytes=-5", &data[9995..], "bytes 9995-9999/10000"),
            ("bytes=9999-20000", &data[9999..], "bytes 9999-9999/10000"),
        ] {
            let r = get(Some(range)).await.unwrap();
            assert_eq!(r.status(), 206, "{range}");
            assert_eq!(r.headers()["content-range"], content_range, "{range}");
            assert!(r.bytes().await.unwrap() == want, "{range}: other bytes");
        }
        for range in ["bytes=10000-10010", "bytes=0-1,5-6", "bytes=5-2", "pages=1-2", "bytes=x-y"] {
            let r = get(Some(range)).await.unwrap();
            assert_eq!(r.status(), 416, "{range}");
            assert_eq!(r.headers()["content-range"], "bytes */10000", "{range}");
        }
    })
    .await
}
