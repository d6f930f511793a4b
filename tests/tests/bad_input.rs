//! Bad input gets a clear 4xx JSON error and writes nothing to the store.
//!
//! Requests go over a raw TCP socket so paths reach ckptd exactly as written (an HTTP client
//! library would normalise `..` and percent-encoded dots away before sending).

use std::time::Duration;

use ckpt_core::{ChunkHash, ChunkRef, DType, ShardIndex, TensorEntry};
use ckpt_tests::*;

/// The status and JSON body of a hand-written request (the body must be JSON).
async fn raw(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let r = ckpt_tests::raw_http::raw_request(addr, method, path, None, body).await;
    let value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {} {}", r.status, r.body));
    (r.status, value)
}

fn assert_refused(what: &str, (status, body): (u16, serde_json::Value), code: &str) {
    assert!((400..500).contains(&status), "{what}: status {status}, body {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{what}: empty message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_json_and_writes_nothing() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let d = start_daemon(dir.path()).await;
        let addr = d.url().trim_start_matches("http://").to_string();
        let open = br#"{"world_size": 2}"#;
        assert_eq!(raw(&addr, "PUT", "/v1/jobs/good/saves/1", open).await.0, 200);
        let before = snapshot(&store);

        let long = "x".repeat(129);
        for (job, what) in [
            ("..", "dot-dot"),
            ("a%2Fb", "slash"),
            ("a%00b", "NUL"),
            (long.as_str(), "over-long"),
            ("%2E%2E", "encoded dot-dot"),
            ("a..b", "inner dot-dot"),
        ] {
            let r = raw(&addr, "PUT", &format!("/v1/jobs/{job}/saves/1"), open).await;
            assert_refused(&format!("job name {what}"), r, "invalid_job");
        }
        // An empty job name matches no route.
        let (status, body) = raw(&addr, "PUT", "/v1/jobs//saves/1", open).await;
        assert!((400..500).contains(&status) && body["error"]["code"].is_string(), "empty job: {status} {body}");

        for step in ["-1", "abc", "1.5", "99999999999999999999999", "%2D1"] {
            let r = raw(&addr, "PUT", &format!("/v1/jobs/good/saves/{step}"), open).await;
            assert_refused(&format!("step {step}"), r, "invalid_step");
        }
        assert_refused(
            "world size 0",
            raw(&addr, "PUT", "/v1/jobs/good/saves/2", br#"{"world_size": 0}"#).await,
            "invalid_world_size",
        );
        assert_refused("broken json", raw(&addr, "PUT", "/v1/jobs/good/saves/2", b"{world").await, "bad_request");

        let content = vec![42u8; 1000];
        let wrong = ChunkHash::of(b"something else");
        assert_refused(
            "chunk body not matching its hash",
            raw(&addr, "PUT", &format!("/v1/jobs/good/chunks/{wrong}"), &content).await,
            "hash_mismatch",
        );
        assert_refused("malformed hash", raw(&addr, "PUT", "/v1/jobs/good/chunks/xyz", &content).await, "invalid_hash");
        assert_refused(
            "empty chunk",
            raw(&addr, "PUT", &format!("/v1/jobs/good/chunks/{}", ChunkHash::of(b"")), b"").await,
            "bad_request",
        );

        let unknown = ChunkHash::of(b"never uploaded");
        let index = |rank: u32| ShardIndex {
            rank,
            tensors: vec![TensorEntry {
                name: "w".into(),
                dtype: DType::U8,
                shape: vec![14],
                global_shape: vec![14],
                offsets: vec![0],
                chunks: vec![ChunkRef { hash: unknown, len: 14 }],
            }],
            metadata: serde_json::Value::Null,
        };
        let body = serde_json::to_vec(&index(0)).unwrap();
        assert_refused(
            "index naming unknown chunks",
            raw(&addr, "PUT", "/v1/jobs/good/saves/1/ranks/0", &body).await,
            "unknown_chunks",
        );
        let body = serde_json::to_vec(&index(5)).unwrap();
        assert_refused(
            "rank outside the world size",
            raw(&addr, "PUT", "/v1/jobs/good/saves/1/ranks/5", &body).await,
            "rank_out_of_range",
        );
        assert_refused(
            "rank in path differs from index",
            raw(&addr, "PUT", "/v1/jobs/good/saves/1/ranks/1", &serde_json::to_vec(&index(0)).unwrap()).await,
            "bad_request",
        );
        let mut inconsistent = index(0);
        inconsistent.tensors[0].shape = vec![15];
        assert_refused(
            "index whose chunks do not cover the tensor",
            raw(&addr, "PUT", "/v1/jobs/good/saves/1/ranks/0", &serde_json::to_vec(&inconsistent).unwrap()).await,
            "invalid_shard_index",
        );
        assert_refused(
            "index for a save never opened",
            raw(&addr, "PUT", "/v1/jobs/good/saves/9/ranks/0", &serde_json::to_vec(&index(0)).unwrap()).await,
            "not_found",
        );
        assert_refused("unknown endpoint", raw(&addr, "GET", "/v2/nothing", b"").await, "not_found");

        assert_eq!(snapshot(&store), before, "bad input changed the store");
        let c = client(&d);
        let st = c.save_status("good", 1).await.unwrap();
        assert_eq!(st.ranks_received, 0, "bad indexes were not recorded");
        assert!(c.list("good").await.unwrap().committed.is_empty());
    })
    .await
}

/// A misspelt field or query parameter is refused, never dropped: `?dryrun=true` would
/// otherwise run a real GC, `"epoc"` open an unfenced save, `"meta"` commit an index without
/// its metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_query_parameters_are_refused_and_change_nothing() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "[retention]\nkeep_last = 1\n").unwrap();
        let mut o = ckpt_client::daemon::DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let addr = d.url().trim_start_matches("http://").to_string();
        let c = client(&d);
        let seed = seed(0xbad_0f1e);
        for step in [1, 2] {
            save_step(&c, "job", step, &[rank_tensors(seed + step, 0, 1, 1 << 16)]).await.unwrap();
        }
        let store = dir.path().join("store");
        let before = snapshot(&store);
        let committed = |c: ckpt_client::Client| async move {
            c.list("job").await.unwrap().committed.iter().map(|m| m.step).collect::<Vec<_>>()
        };

        assert_refused("gc with ?dryrun", raw(&addr, "POST", "/v1/jobs/job/gc?dryrun=true", b"").await, "bad_request");
        assert_refused(
            "delete with ?forse",
            raw(&addr, "DELETE", "/v1/jobs/job/checkpoints/1?forse=true", b"").await,
            "bad_request",
        );
        assert_eq!(committed(c.clone()).await, vec![1, 2], "a refused request deleted a checkpoint");

        let (status, body) = raw(&addr, "PUT", "/v1/jobs/job/saves/3", br#"{"world_size": 1, "epoc": 5}"#).await;
        assert_refused("open with \"epoc\"", (status, body.clone()), "bad_request");
        assert!(body["error"]["message"].as_str().unwrap().contains("epoc"), "the message names the field: {body}");
        assert!(c.save_status("job", 3).await.is_err(), "a refused open opened the save");

        assert_eq!(raw(&addr, "PUT", "/v1/jobs/job/saves/3", br#"{"world_size": 1}"#).await.0, 200);
        let t = &rank_tensors(seed + 3, 0, 1, 1 << 16)[0];
        let index = ShardIndex {
            rank: 0,
            tensors: vec![TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                global_shape: t.global_shape.clone(),
                offsets: t.offsets.clone(),
                chunks: vec![],
            }],
            metadata: serde_json::Value::Null,
        };
        let mut v = serde_json::to_value(&index).unwrap();
        v["meta"] = serde_json::json!({"cursor": 7});
        let r = raw(&addr, "PUT", "/v1/jobs/job/saves/3/ranks/0", &serde_json::to_vec(&v).unwrap()).await;
        assert_refused("index with \"meta\"", r, "bad_request");
        let mut v = serde_json::to_value(&index).unwrap();
        v["tensors"][0]["strides"] = serde_json::json!([1]);
        let (status, body) = raw(&addr, "PUT", "/v1/jobs/job/saves/3/ranks/0", &serde_json::to_vec(&v).unwrap()).await;
        assert_refused("tensor with \"strides\"", (status, body.clone()), "bad_request");
        assert!(body["error"]["message"].as_str().unwrap().contains("tensors.0.strides"), "{body}");
        // Free-form metadata still takes any keys.
        let mut v = serde_json::to_value(&index).unwrap();
        v["metadata"] = serde_json::json!({"anything": {"at": "all"}});
        v["tensors"] = serde_json::json!([]);
        assert_eq!(raw(&addr, "PUT", "/v1/jobs/job/saves/3/ranks/0", &serde_json::to_vec(&v).unwrap()).await.0, 200);

        let after = snapshot(&store);
        assert!(before.iter().all(|(k, v)| after.get(k) == Some(v)), "a refused request changed a stored object");
        // The gc that was asked for by its right name still works.
        assert_eq!(raw(&addr, "POST", "/v1/jobs/job/gc?dry_run=true", b"").await.0, 200);
    })
    .await
}
