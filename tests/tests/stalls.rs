//! No client can hold the service: connections that send a chunk upload's head and then
//! nothing lose their chunk slot and staging space after `body_progress_timeout_ms`, one whose
//! body trickles in slower than `body_min_bytes_per_s` loses them at its deadline, one that does
//! not read the chunk it asked for holds its slot only until its writes have stalled for
//! `body_progress_timeout_ms`, a connection that never finishes its request head is closed
//! after `header_read_timeout_ms`, and JSON bodies held at once stay within
//! `json_bytes_in_flight_max`.

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
const BODY_MIN_BYTES_PER_S: u64 = 1000;

async fn start(dir: &std::path::Path) -> LocalDaemon {
    let cfg = dir.join("ckptd.toml");
    // Memory for 4 stalled bodies, so the other stalled slots hold spill files.
    std::fs::write(
        &cfg,
        format!(
            "chunk_requests_max = {CHUNK_REQUESTS_MAX}\nbody_progress_timeout_ms = {}\nheader_read_timeout_ms = {}\n\
             busy_wait_ms = 200\nstaging_memory_bytes_max = {}\ncompression_level = 0\nbody_min_bytes_per_s = {BODY_MIN_BYTES_PER_S}\n",
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
async fn read_until_closed(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Option<Vec<u8>> {
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

/// A body that sends a byte every quarter second never trips the progress timeout (it restarts
/// at every frame), but it must keep `body_min_bytes_per_s` once the progress timeout has
/// passed: it is dropped with 408 then, well before the deadline its declared length earned,
/// and its staging space freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_is_dropped_once_it_falls_behind_the_pace() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        let declared: u64 = 3000;
        let deadline = BODY_PROGRESS_TIMEOUT + Duration::from_millis(declared * 1000 / BODY_MIN_BYTES_PER_S);
        let hash = ckpt_core::ChunkHash::of(&vec![7u8; declared as usize]);
        let s = TcpStream::connect(addr(&d)).await.unwrap();
        let (mut rx, mut tx) = s.into_split();
        let head = format!(
            "PUT /v1/jobs/trickle/chunks/{hash} HTTP/1.1\r\nHost: {}\r\nContent-Length: {declared}\r\n\r\n",
            addr(&d)
        );
        tx.write_all(head.as_bytes()).await.unwrap();
        let opened = Instant::now();
        let trickle = tokio::spawn(async move {
            for _ in 0..declared {
                if tx.write_all(&[7u8]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let limit = deadline + Duration::from_secs(10);
        let answer = read_until_closed(&mut rx, limit)
            .await
            .unwrap_or_else(|| panic!("a trickling body was still being read {limit:?} after its head"));
        trickle.abort();
        let after = opened.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        eprintln!("answered after {after:?}: {answer}");
        assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("\"body_too_slow\""), "{answer}");
        assert!(
            after >= BODY_PROGRESS_TIMEOUT - Duration::from_millis(200),
            "dropped after {after:?}, before it had {BODY_PROGRESS_TIMEOUT:?} to get going"
        );
        assert!(
            after + Duration::from_millis(1500) < deadline,
            "dropped after {after:?}: at its deadline {deadline:?}, not when it fell behind the pace"
        );
        // Its reservation is released.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = stats(&d).await;
            let reserved =
                s["staging"]["memory_bytes"].as_u64().unwrap() + s["staging"]["spill_bytes"].as_u64().unwrap();
            if reserved == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the trickling body's staging space was not released: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Clients that ask for a chunk and never read it: the chunk being sent holds its transfer slot
/// (so the bytes in flight stay bounded), and once the writes have made no progress for
/// `body_progress_timeout_ms` the connection is closed, the answer cut short, and the slot free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_that_never_read_lose_their_slots_when_their_writes_stall() {
    bounded(Duration::from_secs(90), async {
        let seed = seed(0x5eed_0603);
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        // Larger than what loopback's socket buffers absorb, so the writes do stall.
        let mut data = vec![0u8; 32 << 20];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        let hash = ckpt_core::ChunkHash::of(&data);
        let url = format!("{}/v1/jobs/read/chunks/{hash}", d.url());
        let http = reqwest::Client::new();
        let put = http.put(&url).body(data.clone()).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.text().await.unwrap_or_default());
        // Reads come from the store: wait for the upload.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http.get(&url).send().await.unwrap().status().is_success() {
            assert!(Instant::now() < deadline, "the chunk never reached the store");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Each unread request is answered 200 (its status line read, nothing more): it holds a
        // slot. One refused because another held the slot for a moment is asked again.
        let mut stalled = Vec::with_capacity(CHUNK_REQUESTS_MAX);
        let deadline = Instant::now() + Duration::from_secs(20);
        while stalled.len() < CHUNK_REQUESTS_MAX {
            assert!(Instant::now() < deadline, "the unread requests never all got a slot");
            let mut s = TcpStream::connect(addr(&d)).await.unwrap();
            let head = format!("GET /v1/jobs/read/chunks/{hash} HTTP/1.1\r\nHost: {}\r\n\r\n", addr(&d));
            s.write_all(head.as_bytes()).await.unwrap();
            let mut status = [0u8; 12];
            s.read_exact(&mut status).await.unwrap();
            match &status {
                b"HTTP/1.1 200" => stalled.push(s),
                b"HTTP/1.1 503" => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("an unread request was answered {}", String::from_utf8_lossy(other)),
            }
        }
        let asked = Instant::now();
        // Every slot is held by an answer no one reads: another reader is told to come back.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = http.get(&url).send().await.unwrap();
            if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            assert!(r.status().is_success(), "{}", r.status());
            assert!(Instant::now() < deadline, "unread answers do not hold their slots");
        }
        // Once their writes stall past the timeout, the slots are free again.
        let deadline = asked + BODY_PROGRESS_TIMEOUT + Duration::from_secs(8);
        let got = loop {
            let r = http.get(&url).send().await.unwrap();
            if r.status().is_success() {
                break r.bytes().await.unwrap();
            }
            assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
            assert!(Instant::now() < deadline, "readers that never read held the chunk slots past their write stall");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("a slot was free {:?} after the unread requests", asked.elapsed());
        assert!(got.as_ref() == data.as_slice());
        // Each unread answer was cut short and its connection closed. (Every one was writing
        // when `asked` was taken, so all have stalled past the timeout by now; reading one
        // sooner would let it go on.)
        tokio::time::sleep_until((asked + BODY_PROGRESS_TIMEOUT + Duration::from_secs(2)).into()).await;
        for s in stalled.iter_mut() {
            let answer =
                read_until_closed(s, Duration::from_secs(10)).await.expect("an unread answer's connection stayed open");
            assert!(answer.len() < data.len(), "an unread answer was sent whole ({} bytes)", answer.len());
        }
    })
    .await
}

/// A reader that takes its answer a little at a time never stalls a write, yet must not keep
/// its transfer slot for hours: the answer gets the deadline a request body of its length would
/// (the progress timeout, then its length at `body_min_bytes_per_s`), and past it the
/// connection is closed, the answer cut short, and the slot free. So is an index object's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_that_read_too_slowly_lose_their_slots_at_the_answers_deadline() {
    bounded(Duration::from_secs(120), async {
        const RATE: u64 = 4 << 20;
        // Also the write stall: long enough that the reader below, which frees the socket's
        // send buffer (its writer is woken once a third of it is free) within a second or two,
        // never stalls a write.
        const PROGRESS: Duration = Duration::from_millis(3000);
        let seed = seed(0x5eed_0604);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(
            &cfg,
            format!(
                "chunk_requests_max = 1\nbody_progress_timeout_ms = {}\nbody_min_bytes_per_s = {RATE}\n\
                 busy_wait_ms = 200\ncompression_level = 0\n",
                PROGRESS.as_millis()
            ),
        )
        .unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let mut data = vec![0u8; 32 << 20];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        let hash = ckpt_core::ChunkHash::of(&data);
        let path = format!("/v1/jobs/slow/chunks/{hash}");
        let http = reqwest::Client::new();
        let put = http.put(format!("{}{path}", d.url())).body(data.clone()).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.text().await.unwrap_or_default());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http.get(format!("{}{path}", d.url())).send().await.unwrap().status().is_success() {
            assert!(Instant::now() < deadline, "the chunk never reached the store");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let answer_deadline = PROGRESS + Duration::from_millis((data.len() as u64) * 1000 / RATE);

        // A reader with a 256 KiB receive buffer taking 64 KiB every 50 ms (about 1.3 MB/s): its
        // writes always progress, and it would take about 25 s to read the chunk, past the
        // answer's deadline (11 s).
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(256 << 10).unwrap();
        let mut s = sock.connect(addr(&d).parse().unwrap()).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", addr(&d)).as_bytes()).await.unwrap();
        let asked = Instant::now();
        // Slow until told to hurry, then as fast as it can (what the kernel had buffered before
        // the connection was closed still arrives first).
        let hurry = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let hurry = hurry.clone();
            tokio::spawn(async move {
                let mut got = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return got,
                        Ok(n) => got += n,
                    }
                    if !hurry.load(std::sync::atomic::Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        // The slot is held meanwhile: another reader is told to come back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = http.get(format!("{}{path}", d.url())).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE, "the slow answer holds no slot");
        // Free again once the answer's deadline has passed.
        let got = loop {
            let r = http.get(format!("{}{path}", d.url())).send().await.unwrap();
            if r.status().is_success() {
                break r.bytes().await.unwrap();
            }
            assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                asked.elapsed() < answer_deadline + Duration::from_secs(5),
                "a slow reader held the chunk slot {:?} past its answer's deadline {answer_deadline:?}",
                asked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let freed = asked.elapsed();
        assert!(got.as_ref() == data.as_slice());
        assert!(freed >= answer_deadline - Duration::from_millis(200), "freed after {freed:?}, before its deadline");
        hurry.store(true, std::sync::atomic::Ordering::Relaxed);
        let read = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the slow reader's connection was not closed")
            .unwrap();
        eprintln!("the slot was free after {freed:?}; the slow reader got {read} bytes before the close");
        assert!(read < data.len(), "the slow reader was sent the whole chunk");
    })
    .await
}

/// At most `connections_max` connections are served; another waits in the listen backlog until
/// one closes (here the idle ones, at `header_read_timeout_ms`), and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_one_to_close() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(
            &cfg,
            format!("connections_max = 2\nheader_read_timeout_ms = {}\n", HEADER_READ_TIMEOUT.as_millis()),
        )
        .unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        // The daemon's own readiness checks are closed by now; two idle connections fill it.
        tokio::time::sleep(HEADER_READ_TIMEOUT + Duration::from_millis(500)).await;
        let _idle: Vec<TcpStream> = futures::future::join_all((0..2).map(|_| TcpStream::connect(addr(&d))))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let asked = Instant::now();
        let mut s = TcpStream::connect(addr(&d)).await.unwrap();
        s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", addr(&d)).as_bytes())
            .await
            .unwrap();
        let answer = read_until_closed(&mut s, Duration::from_secs(10)).await.expect("never answered");
        let after = asked.elapsed();
        eprintln!("answered after {after:?}");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        assert!(after >= HEADER_READ_TIMEOUT / 2, "served at once ({after:?}) past connections_max");
    })
    .await
}

/// A JSON body with a digest is read, for its check, only up to its route's limit: a fence's
/// body (4 KiB at most) that declares 64 MiB is refused with 413 once 4 KiB are in, not read
/// on (and held) until the rest comes or the body stalls; so is an existence query declared
/// past what `missing_query_hashes_max` hashes take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_check_reads_no_more_than_its_routes_limit() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        let digest = blake3::hash(b"{}").to_hex();
        for path in ["/v1/jobs/j/fence", "/v1/jobs/j/chunks/missing"] {
            let method = if path.ends_with("fence") { "PUT" } else { "POST" };
            let (mut rx, mut tx) = TcpStream::connect(addr(&d)).await.unwrap().into_split();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 x-ckpt-body-blake3: {digest}\r\nContent-Length: {}\r\n\r\n",
                addr(&d),
                64u64 << 20,
            );
            tx.write_all(head.as_bytes()).await.unwrap();
            // More than either limit, then nothing; read meanwhile, since the answer comes
            // before the rest is read.
            let writer = tokio::spawn(async move {
                for _ in 0..128 {
                    if tx.write_all(&[b' '; 64 << 10]).await.is_err() {
                        return;
                    }
                }
                std::future::pending::<()>().await;
            });
            let sent = Instant::now();
            let answer = read_until_closed(&mut rx, BODY_PROGRESS_TIMEOUT + Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("{path}: no answer"));
            writer.abort();
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 413"), "{path} (after {:?}): {answer}", sent.elapsed());
        }
    })
    .await
}

/// JSON bodies held at once are bounded in bytes, each taking its declared length once its
/// first bytes arrive: three shard indexes that declare 60 KB, send most of it and stall hold
/// 180 KB of a 200 KB budget, so a 30 KB existence query waits `busy_wait_ms` and gets 503
/// while a 15 KB one is answered, and the 30 KB one goes through once a stalled connection
/// closes. A body that declares a length and sends nothing holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_in_flight_are_bounded_in_bytes() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(
            &cfg,
            "shard_index_bytes_max = 65536\njson_bytes_in_flight_max = 200000\nbusy_wait_ms = 200\n\
             body_progress_timeout_ms = 20000\n",
        )
        .unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let held = || async { stats(&d).await["json_bytes_in_flight"].as_u64().unwrap() };
        let stall = |rank: u32, sent: usize| {
            let head = format!(
                "PUT /v1/jobs/j/saves/1/ranks/{rank} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: 60001\r\n\r\n",
                addr(&d),
            );
            let addr = addr(&d);
            async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&vec![b' '; sent]).await.unwrap();
                s
            }
        };
        let mut stalled = vec![stall(9, 0).await];
        for rank in 0..3 {
            stalled.push(stall(rank, 60_000).await);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while held().await != 3 * 60_001 {
            assert!(Instant::now() < deadline, "the stalled bodies hold {} bytes, not 3 x 60001", held().await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let query = |bytes: usize| {
            let mut body = br#"{"hashes":[]}"#.to_vec();
            body.resize(bytes, b' ');
            reqwest::Client::new()
                .post(format!("{}/v1/jobs/j/chunks/missing", d.url()))
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let r = query(30_000).await.unwrap();
        assert_eq!(r.status(), 503);
        let text = r.text().await.unwrap();
        assert!(text.contains("json_bytes_in_flight_max"), "{text}");
        let r = query(15_000).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        drop(stalled.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = query(30_000).await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the budget a closed connection held never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// A JSON body that declares no length (chunked) gets its route's deadline and the pace: an
/// existence query (here at most 10 hashes, about 5 KB) that trickles is dropped once it falls
/// behind `body_min_bytes_per_s`, at the latest at its own limit's deadline, never after the
/// minute a shard index's limit would give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_gets_its_routes_deadline() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(
            &cfg,
            format!(
                "shard_index_bytes_max = 65536\nmissing_query_hashes_max = 10\nbody_min_bytes_per_s = {BODY_MIN_BYTES_PER_S}\n\
                 body_progress_timeout_ms = {}\n",
                BODY_PROGRESS_TIMEOUT.as_millis()
            ),
        )
        .unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let route_limit: u64 = 10 * 70 + 4096;
        let deadline = BODY_PROGRESS_TIMEOUT + Duration::from_millis(route_limit * 1000 / BODY_MIN_BYTES_PER_S);
        let (mut rx, mut tx) = TcpStream::connect(addr(&d)).await.unwrap().into_split();
        let head = format!(
            "POST /v1/jobs/j/chunks/missing HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
            addr(&d)
        );
        tx.write_all(head.as_bytes()).await.unwrap();
        let opened = Instant::now();
        let trickle = tokio::spawn(async move {
            loop {
                if tx.write_all(b"1\r\n \r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let limit = deadline + Duration::from_secs(10);
        let answer = read_until_closed(&mut rx, limit)
            .await
            .unwrap_or_else(|| panic!("a trickling chunked query was still being read {limit:?} after its head"));
        trickle.abort();
        let after = opened.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("\"body_too_slow\""), "{answer}");
        assert!(after >= BODY_PROGRESS_TIMEOUT - Duration::from_millis(200), "dropped after {after:?}, too soon");
        assert!(after <= deadline + Duration::from_secs(1), "dropped after {after:?}, past its deadline {deadline:?}");
    })
    .await
}
