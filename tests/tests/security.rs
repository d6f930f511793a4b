//! Tenants against a real ckptd: every route with missing, forged and other tenants' tokens,
//! traversal through every path parameter, cross-tenant adopts, oversized bodies, quotas, and
//! tokens kept out of the log. Requests go over a raw socket so paths and headers reach ckptd
//! exactly as written.

use std::time::Duration;

use ckpt_client::{Client, ClientOptions, Token};
use ckpt_core::ChunkHash;
use ckpt_tests::raw_http::raw_request as raw;
use ckpt_tests::*;
use tokio::io::AsyncWriteExt;

const TOKEN_A: &str = "tok-a-5f1c9e0b7d2a4e6f8a1b3c5d7e9f0a2b";
const TOKEN_B: &str = "tok-b-0e2d4c6b8a9f1e3d5c7b9a0f2e4d6c8b";
const TOKEN_SLOW: &str = "tok-slow-a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6";
const TOKEN_C: &str = "tok-c-77e1d2c3b4a5968778695a4b3c2d1e0f";
const TOKEN_ADMIN: &str = "tok-admin-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";

fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Tenant a owns `a-*`; b owns `b-*` and may have one save in flight; slow owns `slow-*` and
/// may make 5 requests a second; c may store 1000 bytes, hold 7% (1.12 MiB) of the 16 MiB
/// staging budget and 10% (one) of the 8 shard-index slots; admin sees every job.
fn config() -> String {
    format!(
        r#"
shard_index_bytes_max = 65536
index_requests_max = 8
chunk_bytes_max = 1048576
staging_memory_bytes_max = 8388608
staging_spill_bytes_max = 8388608

[[tenants]]
name = "a"
token_blake3 = ["{}"]
job_prefixes = ["a-"]

[[tenants]]
name = "b"
token_blake3 = ["{}"]
job_prefixes = ["b-"]
quota = {{ saves_in_flight_max = 1 }}

[[tenants]]
name = "slow"
token_blake3 = ["{}"]
job_prefixes = ["slow-"]
quota = {{ requests_per_s = 5 }}

[[tenants]]
name = "c"
token_blake3 = ["{}"]
job_prefixes = ["c-"]
quota = {{ stored_bytes_max = 1000, usage_refresh_s = 1, staging_share_pct = 7, index_share_pct = 10 }}

[[tenants]]
name = "admin"
token_blake3 = ["{}"]
job_prefixes = [""]
admin = true
"#,
        hash(TOKEN_A),
        hash(TOKEN_B),
        hash(TOKEN_SLOW),
        hash(TOKEN_C),
        hash(TOKEN_ADMIN)
    )
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn tenant_client(d: &ckpt_client::daemon::LocalDaemon, token: &str) -> Client {
    let opts = ClientOptions {
        chunk_bytes: 64 << 10,
        node_local: false,
        token: Some(Token::new(token)),
        attempts_max: 2,
        busy_retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    Client::new(&d.url(), opts).unwrap()
}

/// Every route of `api.rs`, with a method and a body that would succeed for the owner.
fn endpoints(job: &str, hash: &ChunkHash) -> Vec<(&'static str, String, Vec<u8>)> {
    let index = br#"{"rank":0,"tensors":[],"metadata":null}"#.to_vec();
    vec![
        ("GET", format!("/v1/jobs/{job}/checkpoints"), vec![]),
        ("GET", format!("/v1/jobs/{job}/checkpoints/1"), vec![]),
        ("GET", format!("/v1/jobs/{job}/checkpoints/latest"), vec![]),
        ("DELETE", format!("/v1/jobs/{job}/checkpoints/1?force=true"), vec![]),
        ("GET", format!("/v1/jobs/{job}/indexes/{hash}"), vec![]),
        ("PUT", format!("/v1/jobs/{job}/checkpoints/1/pin"), vec![]),
        ("DELETE", format!("/v1/jobs/{job}/checkpoints/1/pin"), vec![]),
        ("POST", format!("/v1/jobs/{job}/gc"), vec![]),
        ("POST", format!("/v1/jobs/{job}/chunks/missing"), format!(r#"{{"hashes":["{hash}"]}}"#).into_bytes()),
        ("PUT", format!("/v1/jobs/{job}/chunks/{}", ChunkHash::of(b"new bytes")), b"new bytes".to_vec()),
        ("GET", format!("/v1/jobs/{job}/chunks/{hash}"), vec![]),
        ("POST", format!("/v1/jobs/{job}/chunks/{hash}/adopt"), br#"{"file":"x"}"#.to_vec()),
        ("POST", format!("/v1/jobs/{job}/chunks/adopt"), br#"{"segment":"x","offset":0,"len":1}"#.to_vec()),
        ("PUT", format!("/v1/jobs/{job}/saves/7"), br#"{"world_size":1}"#.to_vec()),
        ("GET", format!("/v1/jobs/{job}/saves/1"), vec![]),
        ("DELETE", format!("/v1/jobs/{job}/saves/1"), vec![]),
        ("PUT", format!("/v1/jobs/{job}/fence"), br#"{"epoch":5}"#.to_vec()),
        ("PUT", format!("/v1/jobs/{job}/saves/1/ranks/0"), index),
    ]
}

/// The routes without a job: who may call them.
const GLOBAL: &[(&str, &str, bool)] = &[
    ("GET", "/v1/jobs", false),
    ("GET", "/v1/local", false),
    ("GET", "/v1/stats", true),
    ("GET", "/metrics", true),
    ("POST", "/v1/gc?dry_run=true", true),
    ("GET", "/v1/faults", true),
];

/// The test covers every route the router has: a new route must be added here.
#[test]
fn every_route_is_in_the_matrix() {
    let api = include_str!("../../service/src/api.rs");
    let routes: Vec<&str> = api.split(".route(\"").skip(1).filter_map(|r| r.split('"').next()).collect();
    assert!(routes.len() > 10, "cannot read the routes of api.rs");
    let covered: Vec<String> = endpoints("{job}", &ChunkHash::of(b""))
        .into_iter()
        .map(|(_, p, _)| p)
        .chain(GLOBAL.iter().map(|(_, p, _)| p.to_string()))
        .collect();
    for r in routes {
        if ["/healthz", "/readyz", "/openapi.json"].contains(&r) {
            continue;
        }
        let pattern: Vec<&str> = r.split('/').collect();
        let hit = covered.iter().any(|c| {
            let c: Vec<&str> = c.split('?').next().unwrap().split('/').collect();
            c.len() == pattern.len() && c.iter().zip(&pattern).all(|(a, b)| a == b || b.starts_with('{'))
        });
        assert!(hit, "route {r} is not in the security matrix");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_jobs_and_the_store_stays_unchanged() {
    bounded(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, config()).unwrap();
        let mut opts = ckpt_client::daemon::DaemonOptions::in_dir(ckptd_exe(), dir.path());
        opts.extra_args = vec!["--config".into(), cfg.clone().into()];
        opts.envs = vec![("CKPTD_LOG".into(), "debug".into())];
        let d = start_daemon_with(opts).await;
        let addr = d.url().trim_start_matches("http://").to_string();
        let store = dir.path().join("store");

        // Each tenant commits a checkpoint of its own.
        let seed = seed(13);
        let state = vec![rank_tensors(seed, 0, 1, 256 << 10)];
        save_step(&tenant_client(&d, TOKEN_A), "a-job", 1, &state).await.unwrap();
        save_step(&tenant_client(&d, TOKEN_B), "b-job", 1, &state).await.unwrap();
        wait_uploads_drained_as(&addr).await;
        let manifest = raw(&addr, "GET", "/v1/jobs/a-job/checkpoints/1", Some(&bearer(TOKEN_A)), b"").await;
        assert_eq!(manifest.status, 200, "{}", manifest.body);
        let a_chunk = first_chunk(&store, "a-job");
        let before = snapshot(&store);

        // Missing, forged and malformed credentials: 401 on every route, with a challenge.
        let no_creds: [Option<String>; 4] =
            [None, Some(bearer("forged-token")), Some(format!("Basic {TOKEN_A}")), Some(bearer(&hash(TOKEN_A)))];
        for (method, path, body) in endpoints("a-job", &a_chunk) {
            for auth in &no_creds {
                let r = raw(&addr, method, &path, auth.as_deref(), &body).await;
                assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.body);
                assert_eq!(r.json()["error"]["code"], "unauthorized", "{method} {path}");
                assert!(r.headers.get("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{method} {path}");
            }
        }
        for (method, path, _) in GLOBAL {
            let r = raw(&addr, method, path, None, b"").await;
            assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        }
        // An unknown path answers 401 too: the API's shape is not shown to strangers.
        assert_eq!(raw(&addr, "GET", "/v2/whatever", None, b"").await.status, 401);
        // Probes stay open.
        assert_eq!(raw(&addr, "GET", "/healthz", None, b"").await.status, 200);

        // Tenant b asking for a's existing job and for a job that exists nowhere gets the same
        // answer, byte for byte once the name is taken out, on every route.
        for ((method, path, body), (_, missing_path, missing_body)) in
            endpoints("a-job", &a_chunk).into_iter().zip(endpoints("a-none", &a_chunk))
        {
            let existing = raw(&addr, method, &path, Some(&bearer(TOKEN_B)), &body).await;
            let missing = raw(&addr, method, &missing_path, Some(&bearer(TOKEN_B)), &missing_body).await;
            assert_eq!(existing.status, 404, "{method} {path}: {}", existing.body);
            assert_eq!(existing.json()["error"]["code"], "not_found");
            assert_eq!(existing.status, missing.status, "{method} {path}");
            assert_eq!(
                existing.body.replace("a-job", "NAME"),
                missing.body.replace("a-none", "NAME"),
                "{method} {path}"
            );
            assert_eq!(
                existing.headers.get("content-length").map(|_| existing.body.len() - "a-job".len()),
                missing.headers.get("content-length").map(|_| missing.body.len() - "a-none".len()),
                "{method} {path}: body lengths differ beyond the name"
            );
        }
        // A foreign name spelled with percent-escapes is the same name.
        for spelled in ["a%2Djob", "%61-job", "%61%2d%6a%6f%62"] {
            let r = raw(&addr, "GET", &format!("/v1/jobs/{spelled}/checkpoints"), Some(&bearer(TOKEN_B)), b"").await;
            assert_eq!(r.status, 404, "{spelled}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "not_found", "{spelled}");
        }
        let r = raw(&addr, "GET", "/v1/jobs/a-job%FF/checkpoints", Some(&bearer(TOKEN_A)), b"").await;
        assert_eq!(r.status, 400, "a name that is not UTF-8: {}", r.body);
        // Admin routes are refused to tenants.
        for (method, path, admin_only) in GLOBAL {
            let r = raw(&addr, method, path, Some(&bearer(TOKEN_A)), b"").await;
            let want = if *admin_only { 403 } else { 200 };
            assert_eq!(r.status, want, "{method} {path} as tenant a: {}", r.body);
        }
        assert_eq!(snapshot(&store), before, "refused requests changed the store");

        // Listings show only the caller's jobs; the admin sees all.
        let jobs = |t: &str| {
            let addr = addr.clone();
            let t = t.to_string();
            async move { raw(&addr, "GET", "/v1/jobs", Some(&bearer(&t)), b"").await.json()["jobs"].clone() }
        };
        assert_eq!(jobs(TOKEN_A).await, serde_json::json!(["a-job"]));
        assert_eq!(jobs(TOKEN_B).await, serde_json::json!(["b-job"]));
        assert_eq!(jobs(TOKEN_ADMIN).await, serde_json::json!(["a-job", "b-job"]));
        let stats = raw(&addr, "GET", "/v1/stats", Some(&bearer(TOKEN_ADMIN)), b"").await;
        assert_eq!(stats.status, 200);
        // The owner still reads its checkpoint back, every byte verified.
        let back = tenant_client(&d, TOKEN_A).load_rank("a-job", 1, 0).await.unwrap();
        assert_eq!(back.len(), state[0].len());
        // and b cannot, through the client either.
        let e = tenant_client(&d, TOKEN_B).load_rank("a-job", 1, 0).await.unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");

        traversal_is_refused(&addr, &store, &a_chunk).await;
        cross_tenant_adopt_is_refused(&addr).await;
        oversized_bodies_are_refused(&addr, &store).await;
        quotas_hold_one_tenant_and_not_the_others(&d, &addr, &state).await;

        cli_takes_the_token_from_the_environment(&d, dir.path());

        let log = daemon_log(&d);
        assert!(log.contains("DEBUG"), "the log was not at debug level; the token check means nothing");
        for t in [TOKEN_A, TOKEN_B, TOKEN_SLOW, TOKEN_ADMIN, "forged-token"] {
            assert!(!log.contains(t), "a token appears in ckptd's log");
        }
    })
    .await
}

fn first_chunk(store: &std::path::Path, job: &str) -> ChunkHash {
    let prefix = format!("jobs/{job}/chunks/");
    snapshot(store)
        .keys()
        .find_map(|k| k.strip_prefix(&prefix)?.rsplit('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no chunk of {job} in {}", store.display()))
}

/// `wait_uploads_drained` for a ckptd whose stats are for admins.
async fn wait_uploads_drained_as(addr: &str) {
    for _ in 0..600 {
        let s = raw(addr, "GET", "/v1/stats", Some(&bearer(TOKEN_ADMIN)), b"").await.json();
        if s["staging"]["chunks_pending"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("uploads did not drain");
}

/// Traversal attempts through every path parameter: each is a 4xx JSON error, none reaches
/// the store or the disk.
async fn traversal_is_refused(addr: &str, store: &std::path::Path, chunk: &ChunkHash) {
    let before = snapshot(store);
    let long = "a-".to_string() + &"x".repeat(300);
    let evil = [
        "..",
        "%2e%2e",
        "%2E%2E%2F%2E%2E",
        "a-%2F..%2Fb-job",
        "a-..%2F..%2Fetc",
        "a-%5C..%5Cb-job",
        "a-\\..\\b-job",
        "a-x%00y",
        "%2Fetc%2Fpasswd",
        "%2F",
        long.as_str(),
    ];
    for e in evil {
        let paths = [
            ("GET", format!("/v1/jobs/{e}/checkpoints")),
            ("PUT", format!("/v1/jobs/{e}/saves/1")),
            ("GET", format!("/v1/jobs/a-job/checkpoints/{e}")),
            ("GET", format!("/v1/jobs/a-job/indexes/{e}")),
            ("GET", format!("/v1/jobs/a-job/chunks/{e}")),
            ("PUT", format!("/v1/jobs/a-job/chunks/{e}")),
            ("PUT", format!("/v1/jobs/a-job/saves/{e}/ranks/0")),
            ("PUT", format!("/v1/jobs/a-job/saves/1/ranks/{e}")),
            ("DELETE", format!("/v1/jobs/a-job/checkpoints/{e}/pin")),
            ("POST", format!("/v1/jobs/a-job/chunks/{e}/adopt")),
        ];
        for (method, path) in paths {
            let body: &[u8] = if method == "GET" { b"" } else { br#"{"world_size":1}"# };
            let r = raw(addr, method, &path, Some(&bearer(TOKEN_A)), body).await;
            assert!((400..500).contains(&r.status), "{method} {path}: {} {}", r.status, r.body);
            assert!(r.json()["error"]["code"].is_string(), "{method} {path}: not a JSON error: {}", r.body);
        }
    }
    // A handoff name that leaves the tenant's directory is refused before any file is touched.
    for name in ["../b/x", "..", "/etc/passwd", "a\\..\\b", "x\u{0}y", ".hidden"] {
        let body = serde_json::to_vec(&serde_json::json!({ "file": name })).unwrap();
        let r = raw(addr, "POST", &format!("/v1/jobs/a-job/chunks/{chunk}/adopt"), Some(&bearer(TOKEN_A)), &body).await;
        assert!((400..500).contains(&r.status), "adopt of {name:?}: {} {}", r.status, r.body);
    }
    assert_eq!(snapshot(store), before, "a traversal attempt changed the store");
}

/// Each tenant has its own handoff directory (mode 0700), and no name reaches another's.
async fn cross_tenant_adopt_is_refused(addr: &str) {
    use std::os::unix::fs::PermissionsExt;
    let local = |t: &'static str| async move { raw(addr, "GET", "/v1/local", Some(&bearer(t)), b"").await.json() };
    let (la, lb) = (local(TOKEN_A).await, local(TOKEN_B).await);
    let (da, db) = (la["handoff_dir"].as_str().unwrap().to_string(), lb["handoff_dir"].as_str().unwrap().to_string());
    assert_ne!(da, db, "tenants share a handoff directory");
    assert!(la["store_root"].is_null() && la["segment_socket"].is_null(), "a tenant is shown the shared store: {la}");
    for d in [&da, &db] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d} has mode {mode:o}");
    }
    // A valid stored chunk file that tenant a handed over...
    let payload = b"tenant a's secret weights".to_vec();
    let h = ChunkHash::of(&payload);
    let header = ckpt_core::ChunkHeader { codec: ckpt_core::Codec::None, raw_len: payload.len() as u64, hash: h };
    let mut file = header.encode().to_vec();
    file.extend_from_slice(&payload);
    let a_file = std::path::Path::new(&da).join("chunk-1");
    std::fs::write(&a_file, &file).unwrap();
    // ...cannot be adopted by b, under its plain name or by a path to it.
    let rel = format!("../a/{}", "chunk-1");
    for name in ["chunk-1", rel.as_str(), a_file.to_str().unwrap()] {
        let body = serde_json::to_vec(&serde_json::json!({ "file": name })).unwrap();
        let r = raw(addr, "POST", &format!("/v1/jobs/b-job/chunks/{h}/adopt"), Some(&bearer(TOKEN_B)), &body).await;
        assert!((400..500).contains(&r.status), "b adopting {name:?}: {} {}", r.status, r.body);
    }
    assert!(a_file.exists(), "b's attempts moved a's handoff file");
    // b's missing-query for that chunk in its own job still says missing: nothing leaked across.
    let q = serde_json::to_vec(&serde_json::json!({ "hashes": [h.to_string()] })).unwrap();
    let r = raw(addr, "POST", "/v1/jobs/b-job/chunks/missing", Some(&bearer(TOKEN_B)), &q).await;
    assert_eq!(r.json()["missing"], serde_json::json!([h.to_string()]), "{}", r.body);
}

async fn oversized_bodies_are_refused(addr: &str, store: &std::path::Path) {
    let before = snapshot(store);
    // shard_index_bytes_max is 64 KiB in this config.
    let big = serde_json::to_vec(&serde_json::json!({ "hashes": vec!["0".repeat(64); 2000] })).unwrap();
    assert!(big.len() > 65536);
    let r = raw(addr, "POST", "/v1/jobs/a-job/chunks/missing", Some(&bearer(TOKEN_A)), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let r = raw(addr, "PUT", "/v1/jobs/a-job/saves/1/ranks/0", Some(&bearer(TOKEN_A)), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    // chunk_bytes_max is 1 MiB: a chunk over it is refused before it is read.
    let chunk = vec![7u8; (1 << 20) + 1];
    let r =
        raw(addr, "PUT", &format!("/v1/jobs/a-job/chunks/{}", ChunkHash::of(&chunk)), Some(&bearer(TOKEN_A)), &chunk)
            .await;
    assert!((400..500).contains(&r.status), "{} {}", r.status, r.body);
    assert_eq!(snapshot(store), before, "an oversized body changed the store");
}

/// b may have one save in flight: its second is 429 with Retry-After while a commits; slow
/// may make 5 requests a second and is told when to come back, while a is not slowed.
async fn quotas_hold_one_tenant_and_not_the_others(
    d: &ckpt_client::daemon::LocalDaemon,
    addr: &str,
    state: &[Vec<ckpt_client::Tensor>],
) {
    let open = br#"{"world_size":2}"#;
    let b = |p: &str| format!("/v1/jobs/{p}");
    assert_eq!(raw(addr, "PUT", &b("b-job/saves/2"), Some(&bearer(TOKEN_B)), open).await.status, 200);
    // Another rank opening the same save is not a new save.
    assert_eq!(raw(addr, "PUT", &b("b-job/saves/2"), Some(&bearer(TOKEN_B)), open).await.status, 200);
    let r = raw(addr, "PUT", &b("b-other/saves/1"), Some(&bearer(TOKEN_B)), open).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "over_quota");
    assert!(r.headers.get("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    // Tenant a's saves still commit.
    save_step(&tenant_client(d, TOKEN_A), "a-job", 2, state).await.unwrap();
    // Once b's save ends, b may open another.
    assert_eq!(raw(addr, "DELETE", &b("b-job/saves/2"), Some(&bearer(TOKEN_B)), b"").await.status, 200);
    assert_eq!(raw(addr, "PUT", &b("b-other/saves/1"), Some(&bearer(TOKEN_B)), open).await.status, 200);

    // 20 requests at once against a bucket of 5 (5 a second): most are refused, each with
    // Retry-After, while a's requests, made at the same time, all pass.
    let (slow_auth, a_auth) = (bearer(TOKEN_SLOW), bearer(TOKEN_A));
    let slow = (0..20).map(|_| raw(addr, "GET", "/v1/jobs", Some(&slow_auth), b""));
    let fast = (0..20).map(|_| raw(addr, "GET", "/v1/jobs", Some(&a_auth), b""));
    let (slow, fast) = futures::future::join(futures::future::join_all(slow), futures::future::join_all(fast)).await;
    let mut limited = 0;
    for r in &slow {
        if r.status == 429 {
            limited += 1;
            assert_eq!(r.json()["error"]["code"], "rate_limited");
            assert!(r.headers.contains_key("retry-after"), "429 without Retry-After");
        } else {
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    assert!(fast.iter().all(|r| r.status == 200), "a was slowed by slow's bucket");
    assert!(limited >= 10, "20 requests at once against a rate of 5/s: only {limited} were refused");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(raw(addr, "GET", "/v1/jobs", Some(&bearer(TOKEN_SLOW)), b"").await.status, 200);

    // c's share of staging is 1.12 MiB. An upload of 1 MiB that stalls half-way holds 1 MiB of
    // it; c's next 512 KiB chunk then waits for its share and is refused (429 rate_limited),
    // while the same chunk from a is staged at once.
    let held: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8).collect();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /v1/jobs/c-job/chunks/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN_C}\r\nContent-Length: {}\r\n\r\n",
        ckpt_core::ChunkHash::of(&held),
        held.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&held[..held.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chunk: Vec<u8> = (0..512 << 10).map(|i| (i % 251) as u8).collect();
    let h = ckpt_core::ChunkHash::of(&chunk);
    let r = raw(addr, "PUT", &format!("/v1/jobs/c-job/chunks/{h}"), Some(&bearer(TOKEN_C)), &chunk).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limited", "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("staging"), "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    let r = raw(addr, "PUT", &format!("/v1/jobs/a-big/chunks/{h}"), Some(&bearer(TOKEN_A)), &chunk).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Once the stalled upload is gone, c's share is free again.
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = raw(addr, "PUT", &format!("/v1/jobs/c-job/chunks/{h}"), Some(&bearer(TOKEN_C)), &chunk).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // c's share of the shard-index slots is one. An index put whose body stalls holds it: c's
    // next put is refused (429 rate_limited), while a's put, made at the same time, is not held
    // (the node has 7 more slots).
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let index = br#"{"rank":0,"tensors":[],"metadata":null}"#;
    let head = format!(
        "PUT /v1/jobs/c-job/saves/9/ranks/0 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN_C}\r\nContent-Length: {}\r\n\r\n",
        index.len()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&index[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = raw(addr, "PUT", "/v1/jobs/c-job/saves/9/ranks/1", Some(&bearer(TOKEN_C)), index).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limited", "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("shard-index"), "{}", r.body);
    let r = raw(addr, "PUT", "/v1/jobs/a-job/saves/9/ranks/0", Some(&bearer(TOKEN_A)), index).await;
    assert!(![429, 503].contains(&r.status), "a's index put was held by c's: {} {}", r.status, r.body);
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = raw(addr, "PUT", "/v1/jobs/c-job/saves/9/ranks/1", Some(&bearer(TOKEN_C)), index).await;
    assert!(![429, 503].contains(&r.status), "c's share was not freed: {} {}", r.status, r.body);
    // c may store 1000 bytes: its first save (4 KiB that do not compress) commits, the next one
    // is refused at open.
    let noise: Vec<u8> = (0u64..4096).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8).collect();
    let small =
        vec![vec![ckpt_client::Tensor::whole("w", ckpt_client::DType::U8, vec![4096], bytes::Bytes::from(noise))]];
    save_step(&tenant_client(d, TOKEN_C), "c-job", 1, &small).await.unwrap();
    wait_uploads_drained_as(addr).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = raw(addr, "PUT", "/v1/jobs/c-job/saves/2", Some(&bearer(TOKEN_C)), br#"{"world_size":1}"#).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("quota is 1000"), "{}", r.body);
    // and a is not affected.
    save_step(&tenant_client(d, TOKEN_A), "a-job", 3, state).await.unwrap();
}

/// `ckpt` reads the token from CKPT_TOKEN or CKPT_TOKEN_FILE; without one it says what to set.
fn cli_takes_the_token_from_the_environment(d: &ckpt_client::daemon::LocalDaemon, dir: &std::path::Path) {
    let ckpt = |envs: &[(&str, String)]| {
        let mut c = std::process::Command::new(ckpt_exe());
        c.args(["--server", &d.url(), "--json", "ls"]).env_remove("CKPT_TOKEN").env_remove("CKPT_TOKEN_FILE");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().expect("running ckpt");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = ckpt(&[]);
    assert_eq!(code, Some(5), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized", "{out}");
    assert!(v["error"]["message"].as_str().unwrap().contains("CKPT_TOKEN"), "{out}");
    let (code, out) = ckpt(&[("CKPT_TOKEN", TOKEN_A.to_string())]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("a-job") && !out.contains("b-job"), "{out}");
    let file = dir.join("token-b");
    std::fs::write(&file, format!("{TOKEN_B}\n")).unwrap();
    let (code, out) = ckpt(&[("CKPT_TOKEN_FILE", file.display().to_string())]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("b-job") && !out.contains("a-job"), "{out}");
    let (code, out) = ckpt(&[("CKPT_TOKEN_FILE", dir.join("no-such-file").display().to_string())]);
    assert_eq!(code, Some(2), "a missing token file is a usage error: {out}");
}
