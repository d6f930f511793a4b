//! Shared-memory segments: an `AsyncSaver` on ckptd's host hands its staging buffer to ckptd as
//! a memfd, and chunks go to the store by offset (copied out, verified, written with direct
//! I/O). Hostile registrations and adopts are refused and store nothing.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::time::Duration;

use ckpt_client::{AsyncSaver, Wait};
use ckpt_tests::*;

async fn segment_socket(d: &ckpt_client::daemon::LocalDaemon) -> std::path::PathBuf {
    let l: serde_json::Value = reqwest::get(format!("{}/v1/local", d.url())).await.unwrap().json().await.unwrap();
    l["segment_socket"].as_str().expect("ckptd offers a segment socket").into()
}

/// Registers `file` as a segment the way the client does; returns the connection (the segment
/// lives while it is open) and ckptd's answer line.
fn register(socket: &std::path::Path, file: &std::fs::File) -> (std::os::unix::net::UnixStream, String) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let fds = [file.as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(b"s")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    (conn, line.trim().to_string())
}

/// Segments ckptd still holds, polled for up to 5 s until none is left (a closed connection
/// is noticed asynchronously).
async fn registered_after_a_while(d: &ckpt_client::daemon::LocalDaemon) -> u64 {
    let mut left = u64::MAX;
    for _ in 0..100 {
        left = stats(d).await["segments"]["registered"].as_u64().unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    left
}

fn memfd(bytes: &[u8]) -> std::fs::File {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(c"test-segment", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_saver_hands_chunks_over_shared_memory() {
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0a01);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let lc = local_client(&d);
        let mut states: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 6 << 20)).collect();
        let savers: Vec<AsyncSaver> = (0..2).map(|_| AsyncSaver::new(lc.clone(), 8 << 20)).collect();
        for step in 1..=2u64 {
            let mut tickets = Vec::new();
            for (r, s) in savers.iter().enumerate() {
                let views: Vec<_> = states[r].iter().map(|t| t.view()).collect();
                tickets.push(s.save(spec("job", step, r as u32, 2), &views, Wait::Committed).await.unwrap());
            }
            for t in tickets {
                t.finish().await.unwrap();
            }
            let s = stats(&d).await;
            assert!(s["segments"]["chunks_stored"].as_u64().unwrap() > 0, "no chunk came through a segment: {s}");
            assert_eq!(s["segments"]["registered"].as_u64(), Some(2), "one segment per saver: {s}");
            assert_eq!(s["staging"]["chunks_staged_memory"].as_u64(), Some(0), "chunks went over HTTP: {s}");
            assert_eq!(std::fs::read_dir(dir.path().join("state/handoff")).unwrap().count(), 0);
            assert_manifests_complete(&store);
            // Restored over HTTP, so ckptd reads and verifies what it wrote with direct I/O.
            let hc = client(&d);
            for r in 0..2 {
                assert!(hc.load_rank("job", step, r).await.unwrap() == states[r as usize], "step {step} rank {r}");
            }
            // The next step changes one tensor of each rank: the reused shared buffer must carry
            // the new bytes, never the old ones.
            for st in states.iter_mut() {
                let mut b = st[0].data.to_vec();
                b.iter_mut().for_each(|x| *x = x.wrapping_add(1));
                st[0].data = b.into();
            }
        }
        drop(savers);
        assert_eq!(registered_after_a_while(&d).await, 0, "segments outlived their savers");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_segments_and_adopts_are_refused_and_store_nothing() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let socket = segment_socket(&d).await;
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hash = ckpt_core::ChunkHash::of(&payload);
        let seg = memfd(&payload);
        let (conn, token) = register(&socket, &seg);
        assert_eq!(token.len(), 32, "ckptd answered {token:?}");
        let http = reqwest::Client::new();
        let adopt = |hash: ckpt_core::ChunkHash, body: serde_json::Value| {
            let http = http.clone();
            let url = format!("{}/v1/jobs/job/chunks/{hash}/adopt", d.url());
            async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
            }
        };
        let before = snapshot(&store);
        let other = ckpt_core::ChunkHash::of(b"something else");
        let cases = [
            (other, serde_json::json!({ "segment": token, "offset": 0, "len": 5000 }), "hash_mismatch"),
            (hash, serde_json::json!({ "segment": token, "offset": 1, "len": 5000 }), "handoff_refused"),
            (hash, serde_json::json!({ "segment": token, "offset": u64::MAX - 10, "len": 5000 }), "handoff_refused"),
            (hash, serde_json::json!({ "segment": token, "offset": 0, "len": 0 }), "bad_request"),
            (hash, serde_json::json!({ "segment": token, "offset": 0, "len": 1u64 << 40 }), "bad_request"),
            (hash, serde_json::json!({ "segment": "0".repeat(32), "offset": 0, "len": 5000 }), "handoff_refused"),
            (hash, serde_json::json!({ "segment": token, "file": "x", "offset": 0, "len": 5000 }), "bad_request"),
        ];
        for (h, body, code) in cases {
            let (status, answer) = adopt(h, body.clone()).await;
            assert_eq!((status, answer["error"]["code"].as_str()), (400, Some(code)), "{body}: {answer}");
        }
        assert_eq!(snapshot(&store), before, "refused adopts changed the store");
        // Several fds in one message: ckptd keeps none of them (a truncated message would have
        // left the extra fds open in ckptd, one leak per attempt).
        let pid = d.pid().expect("ckptd's pid");
        let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        let before = open_fds();
        for _ in 0..20 {
            use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
            let (a, b, c) = (memfd(b"a"), memfd(b"b"), memfd(b"c"));
            let conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let fds = [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()];
            let msg = [std::io::IoSlice::new(b"s")];
            sendmsg::<()>(conn.as_raw_fd(), &msg, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
        }
        let mut after = usize::MAX;
        for _ in 0..100 {
            after = open_fds();
            if after <= before + 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(after <= before + 2, "ckptd holds {after} fds after 20 multi-fd registrations, {before} before");
        // A file that is not a memfd is refused at registration.
        let plain = std::fs::File::create(dir.path().join("plain")).unwrap();
        let (_c, answer) = register(&socket, &plain);
        assert!(answer.starts_with("error:"), "a regular file was accepted: {answer}");
        // The well-formed adopt stores the chunk, and it reads back verified.
        let (status, answer) = adopt(hash, serde_json::json!({ "segment": token, "offset": 0, "len": 5000 })).await;
        assert_eq!((status, answer["state"].as_str()), (200, Some("durable")), "{answer}");
        let stored = std::fs::read(chunk_path(&store, "job", &hash)).unwrap();
        let header =
            ckpt_core::ChunkHeader::decode_header(stored[..ckpt_core::CHUNK_HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!((header.hash, header.raw_len), (hash, 5000));
        let mut raw = vec![0u8; 5000];
        ckpt_core::codec::decode_verified_into(&header, &stored[ckpt_core::CHUNK_HEADER_BYTES..], &hash, &mut raw)
            .unwrap();
        assert_eq!(raw, payload);
        // Unnamed: ckptd names the chunk from its own copy, and stores a chunk once.
        let unnamed = |body: serde_json::Value| {
            let http = http.clone();
            let url = format!("{}/v1/jobs/job/chunks/adopt", d.url());
            async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
            }
        };
        let head = ckpt_core::ChunkHash::of(&payload[..4000]);
        for written in [true, false] {
            let (status, answer) = unnamed(serde_json::json!({ "segment": token, "offset": 0, "len": 4000 })).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["hash"].as_str(), Some(head.to_hex().as_str()), "{answer}");
            assert_eq!(answer["written"].as_bool(), Some(written), "{answer}");
        }
        assert!(chunk_path(&store, "job", &head).is_file());
        for (body, code) in [
            (serde_json::json!({ "segment": token, "offset": 4990, "len": 100 }), "handoff_refused"),
            (serde_json::json!({ "segment": "f".repeat(32), "offset": 0, "len": 10 }), "handoff_refused"),
            (serde_json::json!({ "segment": token, "offset": 0, "len": 0 }), "bad_request"),
            (serde_json::json!({ "segment": token, "offset": 0 }), "bad_request"),
        ] {
            let (status, answer) = unnamed(body.clone()).await;
            assert_eq!((status, answer["error"]["code"].as_str()), (400, Some(code)), "{body}: {answer}");
        }
        // Closing the connection ends the segment.
        drop(conn);
        assert_eq!(registered_after_a_while(&d).await, 0, "a closed segment is still registered");
        let tail = ckpt_core::ChunkHash::of(&payload[1..]);
        let (status, answer) = adopt(tail, serde_json::json!({ "segment": token, "offset": 1, "len": 4999 })).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("handoff_refused")), "{answer}");
    })
    .await
}
