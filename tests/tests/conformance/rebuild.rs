//! sled deleted or damaged while ckptd is stopped: on start it rebuilds from the store and
//! lists the same checkpoints.

use std::time::Duration;

use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(300;
    index_deleted_while_stopped_is_rebuilt_from_the_store,
    a_damaged_index_is_set_aside_and_rebuilt_with_its_fences,
    damage_met_while_serving_stops_ckptd_and_its_next_start_rebuilds,
    damage_met_in_start_up_stops_it_and_the_next_start_rebuilds
);

async fn index_deleted_while_stopped_is_rebuilt_from_the_store(backend: Backend) {
    let seed = seed(0x5eed_0006);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut d = start_daemon_with(store.daemon_options(dir.path())).await;
    let c = client(&d);
    let mut states = Vec::new();
    for step in [1u64, 2, 3] {
        let s: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 2 << 20)).collect();
        save_step(&c, "alpha", step, &s).await.unwrap();
        states.push(s);
    }
    let beta: Vec<_> = (0..3).map(|r| rank_tensors(seed + 100, r, 3, 1 << 20)).collect();
    save_step(&c, "beta", 50, &beta).await.unwrap();
    c.delete("alpha", 1, false).await.unwrap();

    let jobs = c.jobs().await.unwrap();
    let alpha = c.list("alpha").await.unwrap();
    let beta_list = c.list("beta").await.unwrap();
    assert_eq!(alpha.committed.iter().map(|m| m.step).collect::<Vec<_>>(), vec![2, 3]);

    assert!(d.terminate(Duration::from_secs(20)).await, "ckptd did not stop cleanly on SIGTERM");
    let state_dir = dir.path().join("state");
    std::fs::remove_dir_all(&state_dir).unwrap();
    assert!(!state_dir.exists());
    d.restart().await.unwrap();
    let c = client(&d);
    assert!(daemon_log(&d).contains("rebuilt: true"), "start-up did not report a rebuild");

    assert_eq!(c.jobs().await.unwrap(), jobs);
    assert_eq!(c.list("alpha").await.unwrap(), alpha);
    assert_eq!(c.list("beta").await.unwrap(), beta_list);
    // The chunk index is rebuilt too: nothing of step 3 counts as missing.
    let m = c.manifest("alpha", 3).await.unwrap();
    assert!(c.missing("alpha", m.chunk_set().into_iter().collect()).await.unwrap().is_empty());
    for r in 0..2 {
        assert!(c.load_rank("alpha", 3, r).await.unwrap() == states[2][r as usize]);
    }
    assert!(c.verify("beta", 50, |_| {}).await.unwrap().ok());
}

/// What a power cut on a disk that lies about its flushes can leave of sled's files. sled 0.34
/// refuses the damaged snapshots and config; the zeroed and cut logs it opens, having lost what
/// they held (then the index no longer names its store, and is rebuilt all the same). A zeroed
/// blob (step 1's root is past sled's blob threshold, as a large world's is) that sled's snapshot
/// points at is refused at open and set aside (in this test sled's own open already refuses it,
/// as a run without ckptd's read of the roots and journal showed; where it does not, that read
/// finds it, see `index.rs`); one only the log's tail names, sled drops at open with what
/// follows it in the log.
const DAMAGE: [&str; 5] = [
    "db zero-filled from the start",
    "db cut to 1000 bytes",
    "snapshots zero-filled",
    "conf overwritten",
    "blobs zero-filled",
];

/// Trainer metadata that puts a root past sled's blob threshold (128 KiB with its default
/// segment size), so the index keeps that root in a blob file of its own.
fn large_metadata() -> serde_json::Value {
    serde_json::json!({ "step": 1, "notes": "n".repeat(300_000) })
}

fn damage(index: &std::path::Path, how: &str) {
    match how {
        "db zero-filled from the start" => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(index.join("db")).unwrap();
            f.write_all(&[0u8; 8192]).unwrap();
        }
        "db cut to 1000 bytes" => {
            std::fs::OpenOptions::new().write(true).open(index.join("db")).unwrap().set_len(1000).unwrap()
        }
        "snapshots zero-filled" => {
            let mut n = 0;
            for e in std::fs::read_dir(index).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("snap.") {
                    let len = e.metadata().unwrap().len();
                    std::fs::write(e.path(), vec![0u8; len as usize]).unwrap();
                    n += 1;
                }
            }
            assert!(n > 0, "sled kept no snapshot to damage");
        }
        "conf overwritten" => std::fs::write(index.join("conf"), [0xa5u8; 62]).unwrap(),
        "blobs zero-filled" => {
            let blobs: Vec<_> = std::fs::read_dir(index.join("blobs")).unwrap().flatten().map(|e| e.path()).collect();
            assert!(!blobs.is_empty(), "sled kept no blob for the large root");
            for b in blobs {
                let len = std::fs::metadata(&b).unwrap().len();
                std::fs::write(&b, vec![0u8; len as usize]).unwrap();
            }
        }
        other => unreachable!("{other}"),
    }
}

/// sled's files damaged while ckptd is stopped: by default ckptd renames the index to
/// `index.damaged` and rebuilds from the store; every committed checkpoint restores, the job's
/// fence still refuses the replaced generation (fences are recorded in the store), and a save
/// that was in flight commits when its ranks send it again. With `on_damaged_index = "refuse"`
/// ckptd does not start, says why and what to do, and leaves the index as it was.
async fn a_damaged_index_is_set_aside_and_rebuilt_with_its_fences(backend: Backend) {
    let seed = seed(0x5eed_0007);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut opts = store.daemon_options(dir.path());
    let cfg = dir.path().join("ckptd.toml");
    std::fs::write(&cfg, "").unwrap();
    opts.extra_args = vec!["--config".into(), cfg.clone().into_os_string()];
    let mut d = start_daemon_with(opts).await;
    let generation = |d: &ckpt_client::daemon::LocalDaemon, epoch: u64| {
        let opts = ckpt_client::ClientOptions {
            chunk_bytes: 1 << 20,
            node_local: false,
            epoch: Some(epoch),
            ..Default::default()
        };
        ckpt_client::Client::new(&d.url(), opts).unwrap()
    };
    let c = generation(&d, 1);
    c.fence("alpha", 1).await.unwrap();
    assert_eq!(generation(&d, 2).fence("alpha", 2).await.unwrap(), 2);
    let c = generation(&d, 2);
    let mut states = Vec::new();
    for step in [1u64, 2] {
        let s: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 1 << 20)).collect();
        if step == 1 {
            let saves = (0..2u32).map(|r| {
                let spec = ckpt_client::SaveSpec { metadata: large_metadata(), ..spec("alpha", 1, r, 2) };
                let (c, t) = (&c, &s[r as usize]);
                async move { c.save(&spec, t, ckpt_client::Wait::Committed).await }
            });
            futures::future::try_join_all(saves).await.unwrap();
        } else {
            save_step(&c, "alpha", step, &s).await.unwrap();
        }
        states.push((step, s));
    }
    // The lower fence's record is gone: one per restart of a job would pile up.
    let fences: Vec<_> = store.keys().await.into_iter().filter(|k| k.contains("/fences/")).collect();
    assert_eq!(fences, vec![ckpt_core::keys::fence_key("alpha", 2)]);
    let state = dir.path().join("state");
    let mut refused = Vec::new();
    let node = std::fs::read_to_string(state.join("node_id")).unwrap();

    // A second ckptd on the same data directory, its index's config damaged under the running
    // one, is refused for the lock and sets nothing aside.
    let conf = state.join("index/conf");
    let kept = std::fs::read(&conf).unwrap();
    damage(&state.join("index"), "conf overwritten");
    let mut second = store.daemon_options(dir.path());
    second.log_file = dir.path().join("second.log");
    let started = ckpt_client::daemon::LocalDaemon::start(second).await;
    let said = std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
    assert!(started.is_err() && said.contains("another ckptd"), "a second ckptd on one data directory: {said}");
    assert!(!state.join("index.damaged").exists(), "a second ckptd set the running one's index aside");
    std::fs::write(&conf, kept).unwrap();

    for (i, how) in DAMAGE.into_iter().enumerate() {
        // A save in flight: rank 0's part is in (journalled), rank 1's is not.
        let c = generation(&d, 2);
        let step = 10 + i as u64;
        let pending: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 1 << 20)).collect();
        c.save(&spec("alpha", step, 0, 2), &pending[0], ckpt_client::Wait::Staged).await.unwrap();
        // The node keeps its id through a rebuilt index (its leases and GC locks are named by it).
        let lease = format!("/gc/leases/{step:020}.{}", node.trim());
        assert!(store.keys().await.iter().any(|k| k.ends_with(&lease)), "{how}: no lease {lease}");
        if how == "blobs zero-filled" {
            // Two clean restarts first: sled's snapshot then points at the root's blob, and the
            // damage is sled's to find only when the blob is read.
            for _ in 0..2 {
                assert!(d.terminate(Duration::from_secs(20)).await);
                d.restart().await.unwrap();
            }
        }
        assert!(d.terminate(Duration::from_secs(20)).await, "ckptd did not stop cleanly on SIGTERM");
        damage(&state.join("index"), how);
        let logged = daemon_log(&d).len();
        d.restart().await.unwrap_or_else(|e| panic!("{how}: ckptd did not start: {e}\n{}", daemon_log(&d)));
        let log = daemon_log(&d)[logged..].to_string();
        assert!(log.contains("rebuilt: true"), "{how}: the index was not rebuilt: {log}");
        if log.contains("index_set_aside: true") {
            assert!(state.join("index.damaged").join("conf").exists(), "{how}: the damaged index was not kept");
            refused.push(how);
        }
        let c = generation(&d, 2);
        let listed: Vec<u64> = c.list("alpha").await.unwrap().committed.iter().map(|m| m.step).collect();
        let want: Vec<u64> = states.iter().map(|(s, _)| *s).collect();
        assert_eq!(listed, want, "{how}");
        assert_eq!(c.checkpoint("alpha", 1).await.unwrap().metadata(), &large_metadata(), "{how}");
        for (step, s) in &states {
            for r in 0..2 {
                assert!(c.load_rank("alpha", *step, r).await.unwrap() == s[r as usize], "{how}: {step} rank {r}");
            }
        }
        let err = generation(&d, 1).open_save(&spec("alpha", 100, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("fenced"), "{how}: the fence was lost with the index: {err}");
        save_step(&c, "alpha", step, &pending).await.unwrap_or_else(|e| panic!("{how}: the save sent again: {e}"));
        states.push((step, pending));
    }

    eprintln!("sled refused the index with: {refused:?}");
    assert!(refused.contains(&"blobs zero-filled"), "a damaged blob sled's snapshot points at was not found at open");
    // A damage sled refuses as it opens whatever the index's history (the rebuilt index has
    // no snapshot yet, and its root's blob is in its log's tail, which sled replays).
    let how = &"conf overwritten";
    assert!(refused.contains(how), "sled opened an index whose config was overwritten");

    // Refused: the index stays as the damage left it.
    assert!(d.terminate(Duration::from_secs(20)).await);
    std::fs::write(&cfg, "on_damaged_index = \"refuse\"\n").unwrap();
    damage(&state.join("index"), how);
    let before = std::fs::read(state.join("index/db")).unwrap();
    let logged = daemon_log(&d).len();
    assert!(d.restart().await.is_err(), "ckptd started on a damaged index it was told to refuse");
    let log = daemon_log(&d)[logged..].to_string();
    assert!(log.contains("is damaged") && log.contains("on_damaged_index"), "no reason given: {log}");
    assert!(std::fs::read(state.join("index/db")).unwrap() == before, "the refused index was changed");
    // Told to rebuild, it does.
    std::fs::write(&cfg, "on_damaged_index = \"rebuild\"\n").unwrap();
    d.restart().await.unwrap();
    let listed = client(&d).list("alpha").await.unwrap().committed.len();
    assert_eq!(listed, states.len());

    // The index on a disk of its own, through a link: what the link names is set aside beside
    // it under its own name (that directory may hold other nodes' indexes), and the new index
    // is made there.
    assert!(d.terminate(Duration::from_secs(20)).await);
    let disk = dir.path().join("fast-disk");
    std::fs::create_dir_all(&disk).unwrap();
    std::fs::rename(state.join("index"), disk.join("node-a")).unwrap();
    std::os::unix::fs::symlink(disk.join("node-a"), state.join("index")).unwrap();
    damage(&disk.join("node-a"), how);
    d.restart().await.unwrap();
    assert!(disk.join("node-a.damaged").join("conf").exists(), "the linked index was not set aside beside it");
    assert!(std::fs::symlink_metadata(state.join("index")).unwrap().file_type().is_symlink(), "the link was replaced");
    assert!(disk.join("node-a").join("conf").exists(), "the new index is not on the link's disk");
    assert_eq!(client(&d).list("alpha").await.unwrap().committed.len(), states.len());
}

/// The failpoint that makes the index method named in its argument meet damage. sled meets
/// real damage (a blob or page a power cut zeroed) only when it reads a page that is not in its
/// cache, which a test cannot time; `index.rs` shows sled's real damage kept and marked.
const DAMAGED: &str = "ckptd::index::damaged";

/// Damage a request meets while ckptd serves: that request is answered 503 `index_damaged`
/// (a retry gets through once ckptd is back), ckptd marks the index, stops as on SIGTERM and
/// exits non-zero, so a supervisor starts it again; that start sets the index aside and
/// rebuilds it, every checkpoint restores, and the save that was in flight commits when its
/// ranks send it again.
async fn damage_met_while_serving_stops_ckptd_and_its_next_start_rebuilds(backend: Backend) {
    let seed = seed(0x5eed_0008);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut d = start_daemon_with(store.daemon_options(dir.path())).await;
    let c = client(&d);
    let s: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
    save_step(&c, "alpha", 1, &s).await.unwrap();
    // A save in flight: rank 0's part is in (journalled), rank 1's is not.
    let pending: Vec<_> = (0..2).map(|r| rank_tensors(seed + 2, r, 2, 1 << 20)).collect();
    c.save(&spec("alpha", 2, 0, 2), &pending[0], ckpt_client::Wait::Staged).await.unwrap();
    // Saves read the index's roots too: the damage is armed only after these.
    assert!(d.terminate(Duration::from_secs(20)).await);
    d.options_mut().envs.push(("FAILPOINTS".into(), format!("{DAMAGED}=return(get_manifest)")));
    d.restart().await.unwrap();
    let state = dir.path().join("state");

    // Operators see a start that set the index aside (`/v1/stats`, `ckpt_index_set_aside`).
    let set_aside = |d: &ckpt_client::daemon::LocalDaemon| {
        let url = format!("{}/metrics", d.url());
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            assert!(text.contains("ckpt_index_set_aside") && text.contains("ckpt_index_damaged"), "{text}");
            (prometheus_sum(&text, "ckpt_index_set_aside"), prometheus_sum(&text, "ckpt_index_damaged"))
        }
    };
    assert_eq!(set_aside(&d).await, (0.0, 0.0));
    let st = stats(&d).await;
    assert_eq!((&st["start"]["index_set_aside"], &st["index_damage"]), (&false.into(), &serde_json::Value::Null));
    let logged = daemon_log(&d).len();
    let addr = d.url().trim_start_matches("http://").to_string();
    let answer = raw_http::raw_request(&addr, "GET", "/v1/jobs/alpha/checkpoints/1", None, b"").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], "index_damaged", "{}", answer.body);
    assert!(answer.headers.contains_key("retry-after"), "{:?}", answer.headers);
    let exit = d.wait_exit(Duration::from_secs(30)).await.expect("ckptd did not stop on a damaged index");
    assert!(!exit.success(), "ckptd stopped on a damaged index with {exit}");
    let log = daemon_log(&d)[logged..].to_string();
    assert!(log.contains("ckptd stopped on a damaged index") && log.contains("get_manifest"), "{log}");
    let c = restarted_on_a_rebuilt_index(&mut d, &state, "get_manifest").await;
    assert_eq!(set_aside(&d).await, (1.0, 0.0));
    assert_eq!(stats(&d).await["start"]["index_set_aside"], true);
    for r in 0..2 {
        assert!(c.load_rank("alpha", 1, r).await.unwrap() == s[r as usize], "rank {r}");
    }
    // Rank 0's part was journalled in the damaged index only: forgotten, and sent again.
    save_step(&c, "alpha", 2, &pending).await.unwrap();
    let listed: Vec<u64> = c.list("alpha").await.unwrap().committed.iter().map(|m| m.step).collect();
    assert_eq!(listed, vec![1, 2]);
    assert!(d.terminate(Duration::from_secs(20)).await, "the rebuilt ckptd did not stop cleanly");
}

/// Damage start-up meets past the open (here in recovery's read of the journal): ckptd marks
/// the index and does not serve from it, says why and exits non-zero; the next start sets the
/// index aside and rebuilds it, and serves every checkpoint. (Not in the same process: the
/// coordinator that met it would keep the old sled, which finds its files by the path the new
/// index takes.)
async fn damage_met_in_start_up_stops_it_and_the_next_start_rebuilds(backend: Backend) {
    let seed = seed(0x5eed_0009);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut d = start_daemon_with(store.daemon_options(dir.path())).await;
    let s: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
    save_step(&client(&d), "alpha", 1, &s).await.unwrap();
    let state = dir.path().join("state");

    assert!(d.terminate(Duration::from_secs(20)).await);
    d.options_mut().envs.push(("FAILPOINTS".into(), format!("{DAMAGED}=return(all_saves)")));
    let logged = daemon_log(&d).len();
    assert!(d.restart().await.is_err(), "ckptd served from an index start-up found damaged");
    let log = daemon_log(&d)[logged..].to_string();
    assert!(log.contains("start-up met a damaged index") && log.contains("all_saves"), "{log}");
    let c = restarted_on_a_rebuilt_index(&mut d, &state, "all_saves").await;
    for r in 0..2 {
        assert!(c.load_rank("alpha", 1, r).await.unwrap() == s[r as usize], "rank {r}");
    }
}

/// `d`, stopped on damage its index met in `op`, checked marked, started again without the
/// failpoint: the marked index is set aside with its mark, and a new one rebuilt.
async fn restarted_on_a_rebuilt_index(
    d: &mut ckpt_client::daemon::LocalDaemon,
    state: &std::path::Path,
    op: &str,
) -> ckpt_client::Client {
    let marked = std::fs::read_to_string(state.join("index/damage-found")).expect("the index was not marked");
    assert!(marked.starts_with(&format!("{op}: ")), "{marked}");
    d.options_mut().envs.retain(|(k, _)| k != "FAILPOINTS");
    let logged = daemon_log(d).len();
    d.restart().await.unwrap_or_else(|e| panic!("ckptd did not start again: {e}\n{}", daemon_log(d)));
    let log = daemon_log(d)[logged..].to_string();
    assert!(log.contains("index_set_aside: true") && log.contains("rebuilt: true"), "{log}");
    assert!(state.join("index.damaged/damage-found").exists(), "the marked index was not set aside with its mark");
    assert!(!state.join("index/damage-found").exists(), "the new index is marked");
    client(d)
}
