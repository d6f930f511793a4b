//! ckptd's `/metrics` (Prometheus text, from its OpenTelemetry meter) moves during a save: bytes
//! staged and uploaded, the stage, durable and commit latency histograms, the commit count, and
//! on a restore the bytes served and the restore latency.

use std::time::Duration;

use ckpt_tests::*;

fn metric(text: &str, name: &str) -> f64 {
    prometheus_sum(text, name)
}

async fn scrape(d: &ckpt_client::daemon::LocalDaemon) -> String {
    let r = reqwest::get(format!("{}/metrics", d.url())).await.unwrap();
    assert!(r.status().is_success(), "/metrics answered {}", r.status());
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_during_a_save_and_a_restore() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0d01);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let before = scrape(&d).await;
        assert_eq!(metric(&before, "ckpt_uploaded_bytes_total"), 0.0, "{before}");
        assert!(before.contains("ckpt_upload_queue_depth"), "gauges are exported from the start: {before}");

        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 4 << 20)).collect();
        let reports = save_step(&c, "job", 1, &states).await.unwrap();
        wait_uploads_drained(&d).await;
        let sent: u64 = reports.iter().map(|r| r.bytes_sent).sum();
        let puts: usize = reports.iter().map(|r| r.chunks_sent).sum();
        let after = scrape(&d).await;
        let m = |name: &str| metric(&after, name);
        // Both ranks send the chunk they share (the small "step" tensor); the put that finds it
        // already staged stages nothing. So: every distinct chunk once, at most every put.
        let (staged, raw_up) = (m("ckpt_staged_bytes_total"), m("ckpt_uploaded_raw_bytes_total"));
        assert!(staged >= raw_up && staged <= sent as f64, "staged {staged}, uploaded {raw_up}, sent {sent}\n{after}");
        assert!(raw_up >= sent as f64 - 64.0 && m("ckpt_uploaded_bytes_total") > 0.0, "{after}");
        let chunks = m("ckpt_chunks_uploaded_total");
        assert!(chunks >= 8.0, "{after}");
        let stage_count = m("ckpt_stage_duration_seconds_count");
        assert!(stage_count >= chunks && stage_count <= puts as f64, "one stage latency per chunk staged\n{after}");
        assert_eq!(m("ckpt_durable_duration_seconds_count"), chunks, "one durable latency per chunk uploaded");
        assert!(m("ckpt_durable_duration_seconds_sum") > 0.0);
        assert_eq!(m("ckpt_saves_committed_total"), 1.0);
        assert_eq!(m("ckpt_commit_duration_seconds_count"), 1.0);
        assert_eq!(m("ckpt_saves_in_flight"), 0.0);
        assert_eq!(m("ckpt_upload_queue_depth"), 0.0);

        // A restore over HTTP: bytes served and one latency sample per chunk.
        for r in 0..2u32 {
            assert!(c.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
        let restored = scrape(&d).await;
        assert!(metric(&restored, "ckpt_served_bytes_total") >= sent as f64, "{restored}");
        assert!(metric(&restored, "ckpt_restore_chunk_duration_seconds_count") >= chunks);
        // A second save of the same state sends nothing, so staged bytes do not move.
        save_step(&c, "job", 2, &states).await.unwrap();
        let again = scrape(&d).await;
        assert_eq!(metric(&again, "ckpt_staged_bytes_total"), staged);
        assert_eq!(metric(&again, "ckpt_saves_committed_total"), 2.0);
    })
    .await
}
