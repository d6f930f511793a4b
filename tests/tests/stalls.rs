//! No client can hold the service: connections that send a chunk upload's head and then
//! nothing lose their chunk slot and staging space after `body_progress_timeout_ms`, and a
//! connection that never finishes its request head is closed after `header_read_timeout_ms`.

use std::time::{Duration, Instant};

use ckpt_client::daemon::{DaemonOptions, LocalDaemon};
use ckpt_tests::*;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK_REQUESTS_MAX: usize = 8;
const BODY_PROGRESS_TIMEOUT: Duration = Duration::from_millis(2000);
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(1000);
const STALLED_CONNECTIONS: usize = 200;
const STALLED_BODY_BYTES: u64 = 4 << 20;

async fn start(dir: &std::path::Path) -> LocalDaemon {
    let cfg = dir.join("ckptd.toml");
    // Memory for 4 stalled bodies, so the other stalled slots hold spill files.
    std::fs::write(
        &cfg,
        format!(
            "chunk_requests_max = {CHUNK_REQUESTS_MAX}\nbody_progress_timeout_ms = {}\nheader_read_timeout_ms = {}\n\
             busy_wait_ms = 200\nstaging_memory_bytes_max = {}\ncompression_level = 0\n",
            BODY_PROGRESS_TIMEOUT.as_millis(),
            HEADER_READ_TIMEOUT.as_millis(),
            4 * STALLED_BODY_BYTES,
        ),
    )
    .unwrap();
    let mut o = DaemonOptions::in_dir(ckptd_exe(), dir);
    o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
    start_daemon_with(o).await
}

fn addr(d: &LocalDaemon) -> String {
    d.url().trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// Reads what the server sends until it closes the connection, or `limit` passes (None).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|()| out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_uploads_cannot_hold_the_chunk_slots() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0601);
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

        // Each connection sends the head of a 4 MiB chunk upload and then nothing.
        let mut stalled = Vec::with_capacity(STALLED_CONNECTIONS);
        for _ in 0..STALLED_CONNECTIONS {
            let mut hash = [0u8; 32];
            rng.fill_bytes(&mut hash);
            let hash = ckpt_core::ChunkHash(hash);
            let mut s = TcpStream::connect(addr(&d)).await.unwrap();
            let head = format!(
                "PUT /v1/jobs/stall/chunks/{hash} HTTP/1.1\r\nHost: {}\r\nContent-Length: {STALLED_BODY_BYTES}\r\n\r\n",
                addr(&d)
            );
            s.write_all(head.as_bytes()).await.unwrap();
            stalled.push(s);
        }
        // Every chunk slot is held by a stalled upload once the staging tier holds a
        // reservation for each (memory first, then spill).
        let held = CHUNK_REQUESTS_MAX as u64 * STALLED_BODY_BYTES;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats(&d).await;
            let reserved =
                s["staging"]["memory_bytes"].as_u64().unwrap() + s["staging"]["spill_bytes"].as_u64().unwrap();
            if reserved == held {
                break;
            }
            assert!(Instant::now() < deadline, "the stalled uploads never held every slot: {s}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stalled_since = Instant::now();

        // Another client saves meanwhile: it is refused (busy) until the stalled bodies are
        // dropped, then commits.
        let c = client(&d);
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 3 << 20)).collect();
        let save = save_step(&c, "job", 1, &states);
        let limit = BODY_PROGRESS_TIMEOUT + Duration::from_secs(6);
        match tokio::time::timeout(limit, save).await {
            Ok(r) => {
                r.unwrap();
            }
            Err(_) => panic!("the save did not commit within {limit:?} of the stall: stalled uploads hold the service"),
        }
        eprintln!("save committed {:?} after the slots were all held", stalled_since.elapsed());
        for r in 0..2 {
            assert!(c.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }

        // Each stalled connection got an answer and was closed: 408 for those that held a slot,
        // 503 for those that waited for one in vain.
        let (mut timed_out, mut busy) = (0, 0);
        for s in stalled.iter_mut() {
            let answer = read_until_closed(s, Duration::from_secs(5)).await.expect("a stalled connection stayed open");
            let answer = String::from_utf8_lossy(&answer);
            if answer.starts_with("HTTP/1.1 408") {
                assert!(answer.contains("\"body_stalled\""), "{answer}");
                timed_out += 1;
            } else if answer.starts_with("HTTP/1.1 503") {
                busy += 1;
            } else {
                panic!("unexpected answer to a stalled upload: {answer:?}");
            }
        }
        assert!(timed_out >= CHUNK_REQUESTS_MAX, "{timed_out} stalled uploads timed out, {busy} were busy");
        assert_eq!(timed_out + busy, STALLED_CONNECTIONS);

        // Their staging space is free again and no spill file is left.
        wait_uploads_drained(&d).await;
        let s = stats(&d).await;
        assert_eq!(
            (s["staging"]["memory_bytes"].as_u64(), s["staging"]["spill_bytes"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
        let spill = dir.path().join("state/spill/stall");
        let left: Vec<_> =
            std::fs::read_dir(&spill).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "spill files of stalled uploads left behind: {left:?}");
        assert!(spill.exists(), "no stalled upload went to the spill tier; the test lost its point");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_half_a_request_head_is_closed() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        let mut s = TcpStream::connect(addr(&d)).await.unwrap();
        let opened = Instant::now();
        s.write_all(format!("PUT /v1/jobs/x/chunks/00 HTTP/1.1\r\nHost: {}\r\nContent-Le", addr(&d)).as_bytes())
            .await
            .unwrap();
        let limit = HEADER_READ_TIMEOUT + Duration::from_secs(5);
        let answer = read_until_closed(&mut s, limit)
            .await
            .unwrap_or_else(|| panic!("a half-sent request head kept its connection open for {limit:?}"));
        let after = opened.elapsed();
        eprintln!("closed after {after:?}, having sent {:?}", String::from_utf8_lossy(&answer));
        assert!(
            after >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
            "closed after {after:?}, before the timeout"
        );
        // The service still answers on a fresh connection.
        reqwest::get(format!("{}/healthz", d.url())).await.unwrap().error_for_status().unwrap();
    })
    .await
}
