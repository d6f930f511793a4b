//! The node-local path: chunks handed to ckptd as files and adopted into a local store, chunks
//! read straight from the store and verified by the client; HTTP as the fallback.

use std::time::Duration;

use ckpt_client::daemon::DaemonOptions;
use ckpt_client::ClientError;
use ckpt_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoff_save_and_direct_restore_are_identical_and_verified() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0201);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let lc = local_client(&d);
        let states: Vec<_> = (0..4).map(|r| rank_tensors(seed, r, 4, 8 << 20)).collect();
        save_step(&lc, "job", 1, &states).await.unwrap();
        let s = stats(&d).await;
        assert_eq!(s["staging"]["chunks_staged_memory"].as_u64(), Some(0), "chunks went over HTTP: {s}");
        assert_eq!(s["staging"]["chunks_uploaded"].as_u64(), Some(0), "chunks went through the upload queue: {s}");
        assert_manifests_complete(&store);
        let handoff_left = std::fs::read_dir(dir.path().join("state/handoff")).unwrap().count();
        assert_eq!(handoff_left, 0, "adopted files must leave the handoff directory");
        // Both read paths return the same verified bytes.
        let hc = client(&d);
        for r in 0..4 {
            assert!(lc.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
            assert!(hc.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
        // A bit flipped in the store is caught on the direct read path too.
        let m = lc.manifest("job", 1).await.unwrap();
        let victim = m.ranks[2].tensors[1].chunks[0].hash;
        let p = chunk_path(&store, "job", &victim);
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() - 7;
        b[at] ^= 0x40;
        std::fs::write(&p, b).unwrap();
        match lc.load_rank("job", 1, 2).await {
            Err(e @ ClientError::CorruptChunk { .. }) => assert!(e.to_string().contains(&victim.to_hex()), "{e}"),
            other => panic!("expected a corrupt chunk, got {:?}", other.map(|t| t.len())),
        }
        let report = lc.verify("job", 1, |_| {}).await.unwrap();
        assert_eq!(report.corrupt.iter().map(|c| c.hash).collect::<Vec<_>>(), vec![victim]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_local_store_the_client_falls_back_to_http() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0202);
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.store = "memory://".into();
        let d = start_daemon_with(o).await;
        let lc = local_client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 4 << 20)).collect();
        save_step(&lc, "job", 1, &states).await.unwrap();
        assert!(
            stats(&d).await["staging"]["chunks_uploaded"].as_u64().unwrap() > 0,
            "chunks should have gone over HTTP"
        );
        for r in 0..2 {
            assert!(lc.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handoffs_are_refused_and_store_nothing() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let handoff = dir.path().join("state/handoff");
        let http = reqwest::Client::new();
        let adopt = |hash: ckpt_core::ChunkHash, file: String| {
            let http = http.clone();
            let url = format!("{}/v1/jobs/job/chunks/{hash}/adopt", d.url());
            async move {
                let r = http.post(url).json(&serde_json::json!({ "file": file })).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<serde_json::Value>().await.unwrap())
            }
        };
        let before = snapshot(&store);
        let payload = vec![3u8; 5000];
        let hash = ckpt_core::ChunkHash::of(&payload);
        // Header names the chunk, payload does not match it.
        let header = ckpt_core::ChunkHeader { codec: ckpt_core::Codec::None, raw_len: 5000, hash };
        let mut bad = header.encode().to_vec();
        bad.extend_from_slice(&[4u8; 5000]);
        std::fs::write(handoff.join("bad"), &bad).unwrap();
        let (status, body) = adopt(hash, "bad".into()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("hash_mismatch")), "{body}");
        // Paths that leave the handoff directory, and links.
        std::fs::write(dir.path().join("outside"), &bad).unwrap();
        for name in ["../outside", "/etc/passwd", ".hidden", ""] {
            let (status, body) = adopt(hash, name.into()).await;
            assert_eq!(status, 400, "{name:?}: {body}");
        }
        let mut good = header.encode().to_vec();
        good.extend_from_slice(&payload);
        std::fs::write(dir.path().join("target"), &good).unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), handoff.join("link")).unwrap();
        let (status, body) = adopt(hash, "link".into()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("handoff_refused")), "a symlink: {body}");
        // A file with a second name: whoever holds the other name could change a stored chunk.
        std::fs::write(handoff.join("good"), &good).unwrap();
        std::fs::hard_link(handoff.join("good"), dir.path().join("alias")).unwrap();
        let (status, body) = adopt(hash, "good".into()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("handoff_refused")), "a hard link: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("2 links"), "{body}");
        // A FIFO must be refused, not waited on.
        let fifo = std::ffi::CString::new(handoff.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and has no other preconditions.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let (status, body) = adopt(hash, "fifo".into()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("handoff_refused")), "a fifo: {body}");
        assert_eq!(snapshot(&store), before, "refused handoffs changed the store");
        let missing = lc_missing(&d, hash).await;
        assert_eq!(missing, vec![hash.to_hex()], "a refused chunk must not be recorded");
        // And the well-formed one is adopted once it has a single name.
        std::fs::remove_file(dir.path().join("alias")).unwrap();
        let (status, body) = adopt(hash, "good".into()).await;
        assert_eq!((status, body["state"].as_str()), (200, Some("durable")), "{body}");
        assert!(chunk_path(&store, "job", &hash).is_file());
        assert!(!handoff.join("good").exists(), "an adopted file leaves the handoff directory");
    })
    .await
}

/// The chunks of `job` ckptd reports missing among `hash` (hex).
async fn lc_missing(d: &ckpt_client::daemon::LocalDaemon, hash: ckpt_core::ChunkHash) -> Vec<String> {
    let url = format!("{}/v1/jobs/job/chunks/missing", d.url());
    let body = serde_json::json!({ "hashes": [hash.to_hex()] });
    let r: serde_json::Value = reqwest::Client::new().post(url).json(&body).send().await.unwrap().json().await.unwrap();
    r["missing"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect()
}

/// The handoff directory on another filesystem than the store (a tmpfs): the rename fails with
/// EXDEV and ckptd copies through the verified fd instead; the save and restore are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoff_directory_on_another_filesystem_than_the_store() {
    use std::os::unix::fs::MetadataExt;
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0203);
        let dir = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm")
            .expect("this test needs a writable /dev/shm (a tmpfs) as a second filesystem");
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let handoff = shm.path().join("handoff");
        let (dev_store, dev_handoff) =
            (std::fs::metadata(&store).unwrap().dev(), std::fs::metadata(shm.path()).unwrap().dev());
        assert_ne!(
            dev_store, dev_handoff,
            "/dev/shm and the test's temporary directory are one filesystem here, so this test cannot \
             exercise a cross-filesystem handoff"
        );
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, format!("handoff_dir = {:?}\n", handoff.to_str().unwrap())).unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let lc = local_client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 6 << 20)).collect();
        save_step(&lc, "job", 1, &states).await.unwrap();
        let s = stats(&d).await;
        assert_eq!(s["staging"]["chunks_staged_memory"].as_u64(), Some(0), "chunks went over HTTP: {s}");
        assert_eq!(s["staging"]["chunks_uploaded"].as_u64(), Some(0), "chunks went through the upload queue: {s}");
        assert_manifests_complete(&store);
        assert_eq!(std::fs::read_dir(&handoff).unwrap().count(), 0, "copied handoff files must be removed");
        for r in 0..2 {
            assert!(lc.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}
