//! Retention and garbage collection, on every backend: a keep-last policy with a pinned step,
//! a save in flight during GC, a GC racing a `missing` query (seeded interleavings), and the
//! commit-time backstop when a node dies with a save in flight and its lease lapses.

use std::collections::BTreeSet;
use std::time::Duration;

use ckpt_client::{Client, Wait};
use ckpt_core::keys::{parse_key, ParsedKey};
use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;
use rand::{Rng, SeedableRng};

ckpt_tests::conformance!(300;
    keep_last_two_and_a_pin_then_only_unshared_garbage_goes,
    a_save_in_flight_during_gc_commits_and_verifies,
    gc_racing_a_missing_query_never_deletes_what_the_save_relies_on,
    a_sweep_after_a_node_died_mid_save_is_caught_at_commit,
    a_gc_run_stalled_past_its_lock_is_fenced_when_it_wakes,
    a_gc_run_past_its_lease_stops_before_its_next_delete,
    gc_stops_at_a_damaged_index_object_and_deletes_nothing,
);

/// A second and a bit: the shortest grace period ckptd takes is one second.
const PAST_GRACE: Duration = Duration::from_millis(1_100);

/// ckptd options for `store` with `[retention]` set to `retention` (a config file in `dir`).
fn with_retention(store: &TestStore, dir: &std::path::Path, retention: &str) -> ckpt_client::daemon::DaemonOptions {
    let mut o = store.daemon_options(dir);
    let cfg = dir.join("ckptd.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&cfg, format!("[retention]\n{retention}\n")).unwrap();
    o.extra_args = vec!["--config".into(), cfg.into_os_string()];
    o
}

async fn start(store: &TestStore, dir: &std::path::Path, retention: &str) -> ckpt_client::daemon::LocalDaemon {
    start_daemon_with(with_retention(store, dir, &format!("gc_grace_s = 1\nlease_s = 3\n{retention}"))).await
}

/// As `start`, with store faults armable (`--fault-injection`) and `failpoints` (the
/// FAILPOINTS variable) set.
async fn start_faulty(
    store: &TestStore,
    dir: &std::path::Path,
    retention: &str,
    failpoints: &str,
) -> ckpt_client::daemon::LocalDaemon {
    let mut o = with_retention(store, dir, &format!("gc_grace_s = 1\nlease_s = 3\n{retention}"));
    if !failpoints.is_empty() {
        o.envs.push(("FAILPOINTS".into(), failpoints.into()));
    }
    o.extra_args.push("--fault-injection".into());
    start_daemon_with(o).await
}

async fn gc(c: &Client, job: &str, dry_run: bool) -> serde_json::Value {
    let r = c.gc(Some(job), dry_run).await.unwrap();
    r["jobs"][0].clone()
}

fn steps(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect()
}

/// Chunk hashes stored for `job`.
async fn stored_chunks(store: &TestStore, job: &str) -> BTreeSet<ckpt_core::ChunkHash> {
    store
        .keys()
        .await
        .iter()
        .filter_map(|k| match parse_key(k) {
            Some(ParsedKey::Chunk { job: j, hash }) if j == job => Some(hash),
            _ => None,
        })
        .collect()
}

async fn keep_last_two_and_a_pin_then_only_unshared_garbage_goes(backend: Backend) {
    let seed = seed(0x5eed_0c20);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start(&store, dir.path(), "keep_last = 2").await;
    let c = client(&d);
    // Rank 1's state never changes (its chunks are shared by every step); rank 0's does.
    let shared = rank_tensors(seed, 1, 2, 2 << 20);
    let mut states = Vec::new();
    for step in 1..=6u64 {
        let s = vec![rank_tensors(seed + step, 0, 2, 2 << 20), shared.clone()];
        save_step(&c, "job", step, &s).await.unwrap();
        states.push(s);
    }
    c.pin("job", 2, true).await.unwrap();
    // A pinned checkpoint is deleted only when forced, as the newest is.
    let refused = c.delete("job", 2, false).await.unwrap_err();
    assert_eq!(refused.api_code(), Some("conflict"), "{refused}");
    let before: Vec<_> = store.manifests().await;
    assert!(before.iter().any(|m| m.step == 2), "a refused delete removed the pinned checkpoint");
    let chunks_of = |step: u64| before.iter().find(|m| m.step == step).unwrap().chunk_set();
    tokio::time::sleep(PAST_GRACE).await;

    // A dry run reports and changes nothing, from the CLI too.
    let keys = store.keys().await;
    let out = tokio::process::Command::new(ckpt_exe())
        .args(["--server", &d.url(), "gc", "job", "--dry-run"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("checkpoints would delete: 1, 3, 4") && text.contains("pinned: 2"), "{text}");
    assert!(text.contains("would condemn (deleted by the next run") && text.contains(" MiB"), "{text}");
    let dry = gc(&c, "job", true).await;
    assert_eq!(steps(&dry["checkpoints_deleted"]), vec![1, 3, 4], "{dry}");
    assert!(dry["condemned_objects"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(store.keys().await, keys, "a dry run changed the store");

    // One GC per job at a time, across nodes: a held lock refuses another run.
    store.put(&ckpt_core::keys::gc_lock_key("job"), bytes::Bytes::from_static(b"{}")).await;
    let busy = c.gc(Some("job"), false).await.unwrap_err();
    assert_eq!(busy.api_code(), Some("conflict"), "{busy}");
    store.delete(&ckpt_core::keys::gc_lock_key("job")).await;
    let first = gc(&c, "job", false).await;
    assert_eq!(steps(&first["checkpoints_deleted"]), vec![1, 3, 4], "{first}");
    assert_eq!(steps(&first["checkpoints_kept"]), vec![2, 5, 6]);
    assert_eq!(first["condemned_objects"], dry["condemned_objects"], "the dry run and the run disagree");
    assert_eq!(first["swept_objects"], 0, "nothing is deleted before the grace period has passed again");
    assert_eq!(store.manifests().await.iter().map(|m| m.step).collect::<Vec<_>>(), vec![2, 5, 6]);
    tokio::time::sleep(PAST_GRACE).await;
    let second = gc(&c, "job", false).await;
    assert!(second["sweep_deferred"].is_null(), "{second}");
    assert_eq!(second["swept_objects"], first["condemned_objects"], "{second}");
    assert_eq!(second["condemned_objects"], 0, "{second}");

    // What only deleted checkpoints used is gone; what kept ones use (shared or not) stays.
    let kept: BTreeSet<_> = [2u64, 5, 6].iter().flat_map(|&s| chunks_of(s)).collect();
    let only_deleted: BTreeSet<_> =
        [1u64, 3, 4].iter().flat_map(|&s| chunks_of(s)).filter(|h| !kept.contains(h)).collect();
    assert!(!only_deleted.is_empty());
    let now = stored_chunks(&store, "job").await;
    assert_eq!(now, kept, "the store holds exactly the kept checkpoints' chunks");
    let shared_hashes: BTreeSet<_> = chunks_of(1).intersection(&chunks_of(6)).copied().collect();
    assert!(!shared_hashes.is_empty() && shared_hashes.is_subset(&now), "shared chunks must stay");
    store.assert_complete().await;
    for (step, s) in [(2u64, &states[1]), (5, &states[4]), (6, &states[5])] {
        assert!(c.verify("job", step, |_| {}).await.unwrap().ok(), "step {step}");
        for r in 0..2u32 {
            assert!(c.load_rank("job", step, r).await.unwrap() == s[r as usize], "step {step} rank {r}");
        }
    }
    // `ckpt gc --all` goes job by job; a dry run after the sweep has nothing left to take.
    let out = tokio::process::Command::new(ckpt_exe())
        .args(["--server", &d.url(), "--json", "gc", "--all", "--dry-run"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = all["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{all}");
    assert_eq!(steps(&jobs[0]["checkpoints_kept"]), vec![2, 5, 6]);
    assert_eq!(jobs[0]["swept_objects"], 0);
    assert_eq!(jobs[0]["condemned_objects"], 0);
    // Index objects of deleted checkpoints went too: every one left is named by a kept root.
    let index_objects =
        store.keys().await.iter().filter(|k| matches!(parse_key(k), Some(ParsedKey::Index { .. }))).count();
    assert_eq!(index_objects, 3 + 1, "rank 0's index of each kept step, and rank 1's, the same in all three");
}

/// GC reads every index object a kept root names, whole: one cut short, one with bytes
/// appended, one with a byte flipped and one missing each stop the run with the step and the
/// object named, before anything is deleted; put back whole, the same run goes ahead.
async fn gc_stops_at_a_damaged_index_object_and_deletes_nothing(backend: Backend) {
    let seed = seed(0x5eed_0c26);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start(&store, dir.path(), "keep_last = 1").await;
    let c = client(&d);
    for step in 1..=2u64 {
        let s: Vec<_> = (0..2).map(|r| rank_tensors(seed + step * 2 + r as u64, r, 2, 1 << 20)).collect();
        save_step(&c, "job", step, &s).await.unwrap();
    }
    tokio::time::sleep(PAST_GRACE).await;
    let r = c.checkpoint("job", 2).await.unwrap().root.ranks[1];
    let key = ckpt_core::keys::index_key("job", &r.hash);
    let whole = store.get(&key).await.expect("rank 1's index object of step 2");
    assert_eq!(whole.len() as u64, r.bytes);
    let mut flipped = whole.to_vec();
    flipped[whole.len() / 2] ^= 0x20;
    let mut longer = whole.to_vec();
    longer.extend_from_slice(b"{}");
    let damage: [(&str, Option<bytes::Bytes>, &str); 4] = [
        ("cut short", Some(whole.slice(..whole.len() / 2)), "the root says"),
        // What the root names, whole, then more: not the object the root sealed either.
        ("bytes appended", Some(longer.into()), "the root says"),
        ("a byte flipped", Some(flipped.into()), "content hashes to"),
        ("missing", None, "is missing"),
    ];
    for (what, bytes, says) in damage {
        match bytes {
            Some(b) => store.put(&key, b).await,
            None => store.delete(&key).await,
        }
        let keys = store.keys().await;
        for dry_run in [true, false] {
            let e = c.gc(Some("job"), dry_run).await.unwrap_err();
            let text = e.to_string();
            assert_eq!(e.api_code(), Some("manifest_corrupt"), "{what}, dry run {dry_run}: {text}");
            assert!(
                text.contains("job@2") && text.contains(&r.hash.to_string()) && text.contains(says),
                "{what}, dry run {dry_run}: {text}"
            );
            assert_eq!(store.keys().await, keys, "{what}, dry run {dry_run}: GC changed the store");
        }
    }
    store.put(&key, whole).await;
    let run = gc(&c, "job", false).await;
    assert_eq!(steps(&run["checkpoints_deleted"]), vec![1], "{run}");
    assert!(c.verify("job", 2, |_| {}).await.unwrap().ok());
}

async fn a_save_in_flight_during_gc_commits_and_verifies(backend: Backend) {
    let seed = seed(0x5eed_0c21);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start(&store, dir.path(), "keep_last = 1").await;
    let c = client(&d);
    let old: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 2 << 20)).collect();
    save_step(&c, "job", 1, &old).await.unwrap();
    let old_chunks = store.manifests().await[0].chunk_set();
    save_step(&c, "job", 2, &(0..2).map(|r| rank_tensors(seed + 2, r, 2, 2 << 20)).collect::<Vec<_>>()).await.unwrap();
    tokio::time::sleep(PAST_GRACE).await;
    let first = gc(&c, "job", false).await;
    assert_eq!(steps(&first["checkpoints_deleted"]), vec![1]);
    assert!(first["condemned_objects"].as_u64().unwrap() >= old_chunks.len() as u64, "{first}");

    // Step 3 brings step 1's state back: its chunks are condemned, so rank 0 is told they are
    // missing and sends them again. (Its lease must carry a later store time than the list:
    // S3's Last-Modified has one-second resolution, and equal times count as "before".)
    tokio::time::sleep(PAST_GRACE).await;
    let r0 = c.save(&spec("job", 3, 0, 2), &old[0], Wait::Staged).await.unwrap();
    assert!(r0.chunks_sent > 0, "condemned chunks must be sent again, not trusted");
    tokio::time::sleep(PAST_GRACE).await;
    // The sweep runs with the save in flight.
    let second = gc(&c, "job", false).await;
    assert!(second["sweep_deferred"].is_null(), "{second}");
    save_step(&c, "job", 3, &old).await.unwrap();
    assert!(c.verify("job", 3, |_| {}).await.unwrap().ok());
    for r in 0..2u32 {
        assert!(c.load_rank("job", 3, r).await.unwrap() == old[r as usize]);
    }
    store.assert_complete().await;
}

async fn gc_racing_a_missing_query_never_deletes_what_the_save_relies_on(backend: Backend) {
    let base = seed(0x5eed_0c22);
    for round in 0..3u64 {
        let seed = base + round;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new(backend, dir.path()).await;
        let d = start(&store, dir.path(), "keep_last = 1").await;
        let c = client(&d);
        let old: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
        save_step(&c, "job", 1, &old).await.unwrap();
        save_step(&c, "job", 2, &(0..2).map(|r| rank_tensors(seed + 9, r, 2, 1 << 20)).collect::<Vec<_>>())
            .await
            .unwrap();
        tokio::time::sleep(PAST_GRACE).await;
        // Retention deletes step 1 now or later; its chunks are unreferenced from then on.
        let retention_first = rng.random_bool(0.5);
        if retention_first {
            gc(&c, "job", false).await;
        }
        // Rank 0 of step 3 reuses step 1's state: its missing query finds the old chunks
        // present (not condemned yet when retention has not run, condemned otherwise).
        let first_rank = rng.random_range(0..2usize);
        c.save(&spec("job", 3, first_rank as u32, 2), &old[first_rank], Wait::Staged).await.unwrap();
        // Then GC runs (mark, grace, sweep attempts) a seeded number of times before the other
        // rank arrives and the step commits.
        for _ in 0..rng.random_range(1..=3) {
            tokio::time::sleep(PAST_GRACE).await;
            gc(&c, "job", false).await;
        }
        let other = 1 - first_rank;
        c.save(&spec("job", 3, other as u32, 2), &old[other], Wait::Committed)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: step 3 failed: {e}"));
        tokio::time::sleep(PAST_GRACE).await;
        gc(&c, "job", false).await;
        tokio::time::sleep(PAST_GRACE).await;
        gc(&c, "job", false).await;
        assert!(c.verify("job", 3, |_| {}).await.unwrap().ok(), "seed {seed} (retention first: {retention_first})");
        for r in 0..2u32 {
            assert!(c.load_rank("job", 3, r).await.unwrap() == old[r as usize], "seed {seed} rank {r}");
        }
        store.assert_complete().await;
    }
}

async fn a_sweep_after_a_node_died_mid_save_is_caught_at_commit(backend: Backend) {
    let seed = seed(0x5eed_0c23);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut a = start(&store, &dir.path().join("a"), "keep_last = 1").await;
    let b = start(&store, &dir.path().join("b"), "keep_last = 1").await;
    let (ca, cb) = (client(&a), client(&b));
    let old: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 1 << 20)).collect();
    save_step(&ca, "job", 1, &old).await.unwrap();
    save_step(&ca, "job", 2, &(0..2).map(|r| rank_tensors(seed + 2, r, 2, 1 << 20)).collect::<Vec<_>>()).await.unwrap();
    tokio::time::sleep(PAST_GRACE).await;
    // Node A takes rank 0 of step 3, which reuses step 1's chunks (present: not condemned
    // yet), then dies; its lease stays in the store and lapses.
    ca.save(&spec("job", 3, 0, 2), &old[0], Wait::Staged).await.unwrap();
    a.kill();
    let first = gc(&cb, "job", false).await;
    assert_eq!(steps(&first["checkpoints_deleted"]), vec![1]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let deferred = gc(&cb, "job", false).await;
    assert!(
        deferred["sweep_deferred"].as_str().is_some_and(|w| w.contains("[3]")),
        "A's lease must hold the sweep: {deferred}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let swept = gc(&cb, "job", false).await;
    assert!(swept["swept_objects"].as_u64().unwrap() > 0, "the lapsed lease no longer holds the sweep: {swept}");
    // A comes back and rank 1 completes the save: the root would name deleted chunks, so the
    // save is aborted, visibly, and no root for step 3 appears.
    a.restart().await.unwrap();
    let ca = client(&a);
    // Let A's lease task write the restored save's lease before rank 1 arrives: the commit must
    // not take the restored save for one that opened after the sweep.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let r = ca.save(&spec("job", 3, 1, 2), &old[1], Wait::Committed).await;
    assert!(r.is_err(), "a commit over deleted chunks must fail");
    let st = ca.save_status("job", 3).await.unwrap();
    assert_eq!(st.phase, ckpt_client::SavePhase::Aborted, "{st:?}");
    assert!(st.error.unwrap_or_default().contains("garbage-collected"));
    assert!(store.manifests().await.iter().all(|m| m.step != 3), "a root over a hole was written");
    store.assert_complete().await;
    // Saved again from scratch, it commits.
    save_step(&ca, "job", 4, &old).await.unwrap();
    assert!(ca.verify("job", 4, |_| {}).await.unwrap().ok());
}

/// The GC lock tests' retention: the newest step kept, locks stale after 3 s.
const SHORT_LOCK: &str = "keep_last = 1\ngc_lock_stale_s = 3";

/// Saves steps 1 to 3 of "job" (two ranks) and waits past the grace period.
async fn three_steps_past_grace(c: &Client, seed: u64) {
    for step in 1..=3u64 {
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 64 << 10)).collect();
        save_step(c, "job", step, &states).await.unwrap();
    }
    tokio::time::sleep(PAST_GRACE).await;
}

/// Sends SIGCONT to a stopped process when dropped, so a failing test leaves nothing stopped.
struct Stopped(libc::pid_t);

impl Stopped {
    fn stop(d: &ckpt_client::daemon::LocalDaemon) -> Stopped {
        let pid = d.pid().expect("ckptd runs") as libc::pid_t;
        // SAFETY: kill(2) on a pid this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "cannot stop ckptd");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A GC run renews its lock past the takeover time, so another node is refused. When its
/// process stops for longer (SIGSTOP: a frozen VM, a swap storm), another node takes the lock
/// over and the checkpoint it would delete is pinned meanwhile. Woken, the stalled run deletes
/// nothing more and leaves the new run's lock alone; the new run keeps the pin.
async fn a_gc_run_stalled_past_its_lock_is_fenced_when_it_wakes(backend: Backend) {
    let seed = seed(0x5eed_0c24);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let a = start_faulty(&store, &dir.path().join("a"), SHORT_LOCK, "").await;
    let b = start_faulty(&store, &dir.path().join("b"), SHORT_LOCK, "").await;
    let (ca, cb) = (client(&a), client(&b));
    three_steps_past_grace(&ca, seed).await;
    // A's first listing of the pins (none), which the stale answer below replays.
    gc(&ca, "job", true).await;
    // A's run is held 7 s before its listing of roots; then its listing of pins is answered
    // as it was before, as for a run that read the pins just before its process stopped.
    arm(&a, serde_json::json!({"kind": "latency", "op": "list", "delay_ms": 7_000})).await;
    arm(&a, serde_json::json!({"kind": "stale_list", "op": "list"})).await;
    let post_gc = |d: &ckpt_client::daemon::LocalDaemon| {
        tokio::spawn(reqwest::Client::new().post(format!("{}/v1/jobs/job/gc", d.url())).send())
    };
    let a_run = post_gc(&a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fired(&a, "latency:list").await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "A's GC never listed\n{}", daemon_log(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lock_key = ckpt_core::keys::gc_lock_key("job");
    let holder = |body: Option<bytes::Bytes>| {
        let body = body.expect("the job's GC lock is in the store");
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["node"].as_str().unwrap().to_string()
    };
    let node_a = holder(store.get(&lock_key).await);

    // Renewed every 24th of its stale time, the lock outlives it: B is refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = post_gc(&b).await.unwrap().unwrap();
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("already running") && text.contains(&node_a), "B must be refused: {text}");

    // A stops; once its lock is past its stale time, B's run takes it over (held 4 s in its
    // listing), and step 2, which A's run would delete, is pinned.
    let stopped = Stopped::stop(&a);
    tokio::time::sleep(Duration::from_secs(4)).await;
    arm(&b, serde_json::json!({"kind": "latency", "op": "list", "delay_ms": 4_000})).await;
    let b_run = post_gc(&b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let node_b = loop {
        let now = holder(store.get(&lock_key).await);
        if now != node_a {
            break now;
        }
        assert!(!b_run.is_finished(), "B's run ended without taking the lock over\n{}", daemon_log(&b));
        assert!(tokio::time::Instant::now() < deadline, "B never took the stale lock over\n{}", daemon_log(&b));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cb.pin("job", 2, true).await.unwrap();

    // A wakes: its run stops, refused, deleting nothing and leaving B's lock.
    drop(stopped);
    let r = a_run.await.unwrap().unwrap();
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 409, "the stalled run must stop: {text}\n{}", daemon_log(&a));
    assert!(text.contains("nothing more was deleted"), "{text}");
    let steps_now: BTreeSet<u64> = store.manifests().await.iter().map(|m| m.step).collect();
    assert!(steps_now.contains(&2), "the stalled run deleted the checkpoint pinned while it slept\n{}", daemon_log(&a));
    assert_eq!(holder(store.get(&lock_key).await), node_b, "the stalled run wrote over B's lock");
    assert!(daemon_log(&a).contains("the GC run lost its lock"), "{}", daemon_log(&a));

    // B's run ends as if A never woke: step 1 deleted, the pin kept, the lock released.
    let r = b_run.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = r.json().await.unwrap();
    assert_eq!(steps(&report["checkpoints_deleted"]), vec![1], "{report}");
    assert_eq!(steps(&report["pinned"]), vec![2], "{report}");
    assert!(store.get(&lock_key).await.is_none(), "B released its lock");
    let steps_now: BTreeSet<u64> = store.manifests().await.iter().map(|m| m.step).collect();
    assert_eq!(steps_now, BTreeSet::from([2, 3]));
    store.assert_complete().await;
    assert_eq!(gc(&ca, "job", false).await["checkpoints_kept"], serde_json::json!([2, 3]));
}

/// A run whose lock rewrites do not happen (a failpoint skips them) outlives its lease in a
/// slow listing: its own check before the first delete stops it, with nothing deleted and its
/// lock released. (In the stalled-process test above the rewrite, due first, sees the loss.)
async fn a_gc_run_past_its_lease_stops_before_its_next_delete(backend: Backend) {
    let seed = seed(0x5eed_0c25);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let d = start_faulty(&store, &dir.path().join("a"), SHORT_LOCK, "gc::skip_lock_refresh=return").await;
    let c = client(&d);
    three_steps_past_grace(&c, seed).await;
    // Held 2.5 s before its listing of roots: past its lease (1.5 s), within the stale time.
    arm(&d, serde_json::json!({"kind": "latency", "op": "list", "delay_ms": 2_500})).await;
    let r = reqwest::Client::new().post(format!("{}/v1/jobs/job/gc", d.url())).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 409, "the run past its lease must stop: {text}\n{}", daemon_log(&d));
    assert!(text.contains("past its lease of 1.5 s") && text.contains("nothing more was deleted"), "{text}");
    assert_eq!(fired(&d, "latency:list").await, 1);
    let steps_now: BTreeSet<u64> = store.manifests().await.iter().map(|m| m.step).collect();
    assert_eq!(steps_now, BTreeSet::from([1, 2, 3]), "the run deleted roots after its lease lapsed");
    assert!(store.get(&ckpt_core::keys::condemned_key("job")).await.is_none(), "it wrote a condemned list");
    assert!(store.get(&ckpt_core::keys::gc_lock_key("job")).await.is_none(), "it left its lock");
}

/// Temporary files a crash left next to their keys in a local store (a write killed between its
/// temporary file and its rename: ckptd's own beside chunks, object_store's staged puts beside
/// index objects and roots) are removed by GC once older than the grace period; a fresh one may
/// be a write in progress and stays, and so does every object. So are old handoff files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_temporary_files_a_crash_left_in_a_local_store() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0x5eed_0c21);
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new(Backend::Local, dir.path()).await;
        let d = start_daemon_with(with_retention(&store, dir.path(), "gc_grace_s = 600\nlease_s = 3")).await;
        let c = client(&d);
        let state = vec![rank_tensors(seed, 0, 1, 1 << 20)];
        save_step(&c, "job", 1, &state).await.unwrap();
        let root = store.local.clone().unwrap();
        let objects = || async { store.keys().await.into_iter().filter(|k| !k.ends_with(".tmp")).collect::<Vec<_>>() };
        let keys_before = objects().await;
        let at = |rel: &str| root.join(rel);
        let old = [
            at("jobs/job/chunks/ab/.abcd.77-1.tmp"),
            at("jobs/job/indexes/cd/cdef.json#2"),
            at("jobs/job/manifests/00000000000000000002.json#7"),
            // And on this node: a handoff file a client that died left behind.
            dir.path().join("state/handoff/abandoned.1.2"),
        ];
        let fresh = at("jobs/job/chunks/ab/.abce.77-3.tmp");
        let hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        for p in old.iter().chain([&fresh]) {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"half a chunk").unwrap();
        }
        for p in &old {
            std::fs::File::options().write(true).open(p).unwrap().set_modified(hours_ago).unwrap();
        }
        let dry = gc(&c, "job", true).await;
        assert_eq!(dry["stale_local_files"], 4, "{dry}");
        assert!(old.iter().all(|p| p.exists()), "a dry run removed a file");
        let run = gc(&c, "job", false).await;
        assert_eq!(run["stale_local_files"], 4, "{run}");
        assert!(old.iter().all(|p| !p.exists()), "the old temporary files are still there");
        assert!(fresh.exists(), "a temporary file younger than the grace period was removed");
        assert_eq!(objects().await, keys_before, "an object was removed");
        let back = c.load_rank("job", 1, 0).await.unwrap();
        assert!(back.iter().zip(&state[0]).all(|(a, b)| a.data == b.data), "the checkpoint changed");
    })
    .await
}
