//! Faults of the object store and of the staging disk, injected for real into a running ckptd:
//! the store is wrapped in `FaultyStore` (`--fault-injection`), faults are armed through
//! `POST /v1/faults` or at start (`--fault-plan`), and each test asserts from ckptd's own count
//! that its fault fired before it asserts that the save survived it.

use std::time::Duration;

use ckpt_client::daemon::DaemonOptions;
use ckpt_tests::*;
use serde_json::json;

const WORLD: u32 = 2;

fn faulty(dir: &std::path::Path, plan: Option<serde_json::Value>) -> DaemonOptions {
    let mut o = DaemonOptions::in_dir(ckptd_exe(), dir);
    o.extra_args.push("--fault-injection".into());
    if let Some(p) = plan {
        o.extra_args.push("--fault-plan".into());
        o.extra_args.push(p.to_string().into());
    }
    o
}

/// Starts a GC of `job` and returns once it is held in its first listing (an injected minute of
/// latency), lock taken; the request is the handle's.
async fn gc_held_in_its_listing(
    d: &ckpt_client::daemon::LocalDaemon,
    job: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let before = fired(d, "latency:list").await;
    arm(d, json!({"kind": "latency", "op": "list", "delay_ms": 60_000})).await;
    let held = tokio::spawn(reqwest::Client::new().post(format!("{}/v1/jobs/{job}/gc", d.url())).send());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fired(d, "latency:list").await <= before {
        assert!(tokio::time::Instant::now() < deadline, "the GC never listed\n{}", daemon_log(d));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_acknowledgement_on_the_manifest_write_commits_exactly_once() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfa_0001);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon_with(faulty(dir.path(), None)).await;
        let c = client(&d);
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 2 << 20)).collect();
        arm(&d, json!({"kind": "lost_ack", "op": "manifest"})).await;
        save_step(&c, "job", 1, &states).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(&d)));
        assert_eq!(fired(&d, "lost_ack:manifest").await, 1, "the manifest write's acknowledgement was lost");
        let roots = stored_manifests(&dir.path().join("store"));
        assert_eq!(roots.iter().filter(|m| m.step == 1).count(), 1);
        assert!(c.verify("job", 1, |_| {}).await.unwrap().ok());
        for r in 0..WORLD {
            assert!(c.load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_timeouts_and_latency_are_retried_and_the_save_commits() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfa_0002);
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon_with(faulty(dir.path(), None)).await;
        let c = client(&d);
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 2 << 20)).collect();
        arm(&d, json!({"kind": "error", "op": "index", "count": 2})).await;
        arm(&d, json!({"kind": "timeout", "op": "manifest", "delay_ms": 300})).await;
        arm(&d, json!({"kind": "latency", "op": "manifest", "delay_ms": 200})).await;
        save_step(&c, "job", 1, &states).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(&d)));
        assert_eq!(fired(&d, "error:index").await, 2);
        assert_eq!(fired(&d, "timeout:manifest").await, 1);
        assert_eq!(fired(&d, "latency:manifest").await, 1);
        assert!(c.verify("job", 1, |_| {}).await.unwrap().ok());
        assert!(daemon_log(&d).contains("transient store error, retrying"), "ckptd says it retried");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fault_requests_are_refused_and_faults_are_off_by_default() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon_with(faulty(dir.path(), None)).await;
        let http = reqwest::Client::new();
        for bad in [
            json!({"kind": "stale_list", "op": "manifest"}),
            json!({"kind": "error", "op": "chunk", "count": 0}),
            json!({"kind": "latency", "op": "any", "delay_ms": 3_600_000}),
            json!({"kind": "melt", "op": "any"}),
        ] {
            let r = http.post(format!("{}/v1/faults", d.url())).json(&bad).send().await.unwrap();
            assert_eq!(r.status(), 400, "{bad}");
        }
        let plain_dir = tempfile::tempdir().unwrap();
        let plain = start_daemon(plain_dir.path()).await;
        let r = http.post(format!("{}/v1/faults", plain.url())).json(&json!({"kind": "error", "op": "any"})).send();
        assert_eq!(r.await.unwrap().status(), 404, "fault injection must be off unless configured");
    })
    .await
}

/// A listing that leaves out committed roots (an eventually consistent store, or one read from
/// a lagging replica) must not make ckptd forget them when it reconciles at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_listing_at_restart_loses_no_committed_checkpoint() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfa_0003);
        let dir = tempfile::tempdir().unwrap();
        let mut d = start_daemon(dir.path()).await;
        let c = client(&d);
        for step in [1, 2] {
            let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed + step, r, WORLD, 1 << 20)).collect();
            save_step(&c, "job", step, &states).await.unwrap();
        }
        // The restarted ckptd's first listing of the job's roots is stale: as of before any commit.
        *d.options_mut() = faulty(dir.path(), Some(json!([{"kind": "stale_list", "op": "list", "count": 1}])));
        d.restart().await.unwrap();
        assert_eq!(fired(&d, "stale_list:list").await, 1, "the stale listing was served at start-up");
        assert!(daemon_log(&d).contains("listing left out a committed root"));
        let c = client(&d);
        let listed: Vec<u64> = c.list("job").await.unwrap().committed.iter().map(|m| m.step).collect();
        assert_eq!(listed, vec![1, 2]);
        assert_eq!(c.latest("job").await.unwrap(), Some(2));
    })
    .await
}

/// The spill disk really fills (a 3 MiB tmpfs): the put fails with a clear error, nothing of
/// the save is acknowledged or committed, no partial spill file is left, and once the disk has
/// room the same save goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_disk_fails_the_save_visibly_and_loses_nothing() {
    bounded(Duration::from_secs(180), async {
        let seed = seed(0xfa_0004);
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("spill");
        std::fs::create_dir_all(&spill).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
            .arg(&spill)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !mounted {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run");
            return;
        }
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _guard = Unmount(spill.clone());
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        // Every chunk (1 MiB) is bigger than the memory budget, so each goes to the spill disk.
        o.extra_args.extend(["--staging-memory-bytes-max".into(), (512u64 << 10).to_string().into()]);
        let toml = dir.path().join("ckptd.toml");
        std::fs::write(&toml, format!("spill_dir = {:?}\n", spill.to_str().unwrap())).unwrap();
        o.extra_args.extend(["--config".into(), toml.into_os_string()]);
        let d = start_daemon_with(o).await;
        let c = impatient_client(&d);
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 8 << 20)).collect();
        let err = save_step(&c, "job", 1, &states).await.expect_err("16 MiB cannot stage on a 3 MiB disk");
        let msg = err.to_string();
        assert!(msg.contains("No space left") || msg.contains("io"), "a clear error: {msg}");
        assert!(stored_manifests(&dir.path().join("store")).is_empty(), "nothing committed");
        assert!(c.list("job").await.unwrap().committed.is_empty());
        wait_uploads_drained(&d).await;
        // Chunks that did stage were uploaded and their spill files removed; the ones that hit
        // the full disk left no partial file. Puts the client abandoned when the first one
        // failed finish in their own tasks (each removes its partial file): give them a moment.
        let settle = std::time::Instant::now() + Duration::from_secs(15);
        let mut leftovers = walk(&spill);
        while !leftovers.is_empty() && std::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(100)).await;
            leftovers = walk(&spill);
        }
        assert!(leftovers.is_empty(), "spill files left behind: {leftovers:?}\n{}", daemon_log(&d));
        // Room again: the same save goes through and reads back whole.
        assert!(std::process::Command::new("mount")
            .args(["-o", "remount,size=64m"])
            .arg(&spill)
            .status()
            .unwrap()
            .success());
        save_step(&client(&d), "job", 1, &states).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(&d)));
        for r in 0..WORLD {
            assert!(client(&d).load_rank("job", 1, r).await.unwrap() == states[r as usize]);
        }
    })
    .await
}

/// GC runs over different jobs go ahead side by side, up to `gc_runs_max`; one job's run is
/// one at a time; past the limit a run is refused after `busy_wait_ms`, not queued without
/// end. Each run is held in its first listing by an injected delay, so "still running" is
/// the store's doing, not a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_runs_of_different_jobs_do_not_wait_for_each_other_and_are_bounded() {
    bounded(Duration::from_secs(90), async {
        const HOLD_MS: u64 = 8_000;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "busy_wait_ms = 300\n[retention]\ngc_runs_max = 2\n").unwrap();
        let mut o = faulty(dir.path(), None);
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let http = reqwest::Client::new();
        let gc = |job: &str, dry: bool| {
            let req = http.post(format!("{}/v1/jobs/{job}/gc?dry_run={dry}", d.url()));
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            }
        };
        let until_fired = |n: u64, what: &'static str| {
            let d = &d;
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
                while fired(d, "latency:list").await < n {
                    assert!(tokio::time::Instant::now() < deadline, "{what}\n{}", daemon_log(d));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": HOLD_MS})).await;
        let a = tokio::spawn(gc("job-a", false));
        until_fired(1, "job-a's GC never listed").await;
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": HOLD_MS})).await;
        let b = tokio::spawn(gc("job-b", false));
        until_fired(2, "job-b's GC did not start while job-a's ran: one job's GC held another's").await;

        let (status, body) = gc("job-a", false).await;
        assert_eq!(status, 409, "a second run of a job being collected: {body}");
        assert!(body.contains("already running on this node"), "refused by this node's own set: {body}");
        for dry in [false, true] {
            let (status, body) = gc("job-c", dry).await;
            assert_eq!(status, 503, "a third run (dry: {dry}) past gc_runs_max = 2: {body}");
            assert!(body.contains("gc_runs_max"), "{body}");
        }
        assert!(!a.is_finished() && !b.is_finished(), "both held runs were still in their listing");

        for (job, run) in [("job-a", a), ("job-b", b)] {
            let (status, body) = run.await.unwrap();
            assert_eq!(status, 200, "{job}: {body}");
            let report: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(report["job"], job, "{report}");
        }
        // The slots and the job came back: the same runs now go through.
        for job in ["job-c", "job-a"] {
            let (status, body) = gc(job, false).await;
            assert_eq!(status, 200, "{job} after the held runs ended: {body}");
        }

        // A caller that gives up mid-run does not cancel the run half way, which would leave
        // the job's lock in the store for hours: the run goes on, ends, and lets go.
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 2_000})).await;
        let gone = tokio::spawn(gc("job-a", false));
        until_fired(3, "the third held run never listed").await;
        gone.abort();
        let (status, body) = gc("job-a", false).await;
        assert_eq!(status, 409, "the abandoned run is still going: {body}");
        assert!(body.contains("already running on this node"), "{body}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = gc("job-a", false).await;
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job-a could not be collected 15 s after its caller gave up: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let lock = dir.path().join("store").join(ckpt_core::keys::gc_lock_key("job-a"));
        assert!(!lock.exists(), "the finished run left its lock");
    })
    .await
}

/// A node killed mid-GC leaves its job's lock in the store, which would hold off every GC of
/// that job for hours; started again, the node releases the locks that name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_lock_left_by_a_killed_node_is_released_when_it_starts_again() {
    bounded(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut d = start_daemon_with(faulty(dir.path(), None)).await;
        let held = gc_held_in_its_listing(&d, "job-a").await;
        let lock = dir.path().join("store").join(ckpt_core::keys::gc_lock_key("job-a"));
        assert!(lock.exists(), "the run holds the job's lock");
        d.kill();
        held.abort();
        assert!(lock.exists(), "a killed run leaves its lock behind");

        d.restart().await.unwrap();
        assert!(!lock.exists(), "the restarted node kept its dead run's lock\n{}", daemon_log(&d));
        assert!(daemon_log(&d).contains("releasing a GC lock an earlier run of this node left"));
        let r = reqwest::Client::new().post(format!("{}/v1/jobs/job-a/gc", d.url())).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());

        // A lock another node holds is left alone.
        let other = dir.path().join("store").join(ckpt_core::keys::gc_lock_key("job-b"));
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::fs::write(&other, br#"{"node":"another-node","started_unix_ms":1}"#).unwrap();
        d.restart().await.unwrap();
        assert!(other.exists(), "a restart released another node's lock");
        let r = reqwest::Client::new().post(format!("{}/v1/jobs/job-b/gc", d.url())).send().await.unwrap();
        assert_eq!(r.status(), 409, "{}", r.text().await.unwrap_or_default());
    })
    .await
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A GC over every job goes past a job whose run fails (here its lock is held by another
/// node): the other jobs are collected, the failed one is named with its error, in ckptd's
/// `POST /v1/gc` and in `ckpt gc --all`, which exits with that error's status. A store error
/// on one job's objects does the same; a store that stops answering ends the round instead,
/// naming the jobs it did not reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_over_every_job_goes_past_a_job_whose_run_fails() {
    bounded(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "store_attempts_max = 2\n").unwrap();
        let mut o = faulty(dir.path(), None);
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let c = client(&d);
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed(0x6c_a11), r, WORLD, 64 << 10)).collect();
        for job in ["job-a", "job-b", "job-c"] {
            save_step(&c, job, 1, &states).await.unwrap();
        }
        let lock = dir.path().join("store").join(ckpt_core::keys::gc_lock_key("job-b"));
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        std::fs::write(&lock, br#"{"node":"another-node","started_unix_ms":1}"#).unwrap();

        // (A dry run takes no lock; these runs have nothing to delete either way.)
        let r = reqwest::Client::new().post(format!("{}/v1/gc", d.url())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let all: serde_json::Value = r.json().await.unwrap();
        let ran: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(|j| j["job"].as_str().unwrap()).collect();
        assert_eq!(ran, ["job-a", "job-c"], "the jobs after the failed one ran too: {all}");
        let failed = all["failed"].as_array().unwrap();
        assert_eq!(failed.len(), 1, "{all}");
        assert_eq!(failed[0]["job"], "job-b");
        assert_eq!(failed[0]["code"], "conflict");
        assert!(failed[0]["message"].as_str().unwrap().contains("another-node"), "{all}");
        assert_eq!(all["not_run"], json!([]));

        let ckpt = |json: bool| {
            let mut cmd = std::process::Command::new(ckpt_exe());
            cmd.args(["--server", &d.url()]);
            if json {
                cmd.arg("--json");
            }
            cmd.args(["gc", "--all"]).output().unwrap()
        };
        let out = tokio::task::block_in_place(|| ckpt(true));
        assert_eq!(out.status.code(), Some(5), "a refused job's status: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["jobs"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["failed"][0]["job"], "job-b", "{v}");
        assert_eq!(v["failed"][0]["code"], "conflict", "{v}");
        let out = tokio::task::block_in_place(|| ckpt(false));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(5), "{stderr}");
        assert!(stdout.contains("job-a:") && stdout.contains("job-c:") && !stdout.contains("job-b:"), "{stdout}");
        assert!(stderr.contains("job-b: GC failed") && stderr.contains("1 of 3 jobs"), "{stderr}");

        std::fs::remove_file(&lock).unwrap();
        let out = tokio::task::block_in_place(|| ckpt(true));
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["jobs"].as_array().unwrap().len(), 3, "{v}");
        assert_eq!(v["failed"], json!([]), "{v}");

        // Faults are taken in the order they were armed: the round's own listing of the jobs
        // gets the harmless latency, job-a's listing the errors (store_attempts_max = 2).
        // First the store still answers the readiness probe after job-a's failure (one
        // prefix failing): the round goes on. Then it does not: the round stops after job-a.
        for (errors, ran, not_run) in
            [(2, json!(["job-b", "job-c"]), json!([])), (3, json!([]), json!(["job-b", "job-c"]))]
        {
            let before = fired(&d, "error:list").await;
            arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 1})).await;
            arm(&d, json!({"kind": "error", "op": "list", "count": errors})).await;
            let r = reqwest::Client::new().post(format!("{}/v1/gc?dry_run=true", d.url())).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let all: serde_json::Value = r.json().await.unwrap();
            assert_eq!(fired(&d, "error:list").await - before, errors, "{all}");
            let got: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(|j| j["job"].as_str().unwrap()).collect();
            assert_eq!(json!(got), ran, "{errors} errors: {all}");
            assert_eq!(all["failed"][0]["job"], "job-a", "{all}");
            assert_eq!(all["failed"][0]["code"], "store_error", "{all}");
            assert_eq!(all["not_run"], not_run, "{errors} errors: {all}");

            // `ckpt gc --all` the same way (its list of jobs comes from ckptd's index, not a
            // listing; the readiness probe is `/readyz`).
            arm(&d, json!({"kind": "error", "op": "list", "count": errors})).await;
            let out = tokio::task::block_in_place(|| ckpt(true));
            assert_eq!(out.status.code(), Some(6), "a store error's status: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let got: Vec<&str> = v["jobs"].as_array().unwrap().iter().map(|j| j["job"].as_str().unwrap()).collect();
            assert_eq!(json!(got), ran, "ckpt, {errors} errors: {v}");
            assert_eq!(v["failed"][0]["code"], "store_error", "{v}");
            assert_eq!(v["not_run"], not_run, "ckpt, {errors} errors: {v}");
        }
    })
    .await
}

/// A node asked to stop (SIGTERM) in the middle of a GC over every job stops the run under
/// way, which releases the job's lock before the node exits, and ends the round: the answer
/// names the stopped job and the one not reached. Neither the job nor this node's next start
/// is left with a lock to clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_mid_gc_releases_the_lock_before_it_exits() {
    bounded(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut d = start_daemon_with(faulty(dir.path(), None)).await;
        let states: Vec<_> = (0..WORLD).map(|r| rank_tensors(seed(0x5709), r, WORLD, 64 << 10)).collect();
        for job in ["job-a", "job-b"] {
            save_step(&client(&d), job, 1, &states).await.unwrap();
        }
        // Taken in the order armed: the round's listing of its jobs, then job-a's first listing.
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 1})).await;
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 60_000})).await;
        let round = tokio::spawn(reqwest::Client::new().post(format!("{}/v1/gc", d.url())).send());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while fired(&d, "latency:list").await < 2 {
            assert!(tokio::time::Instant::now() < deadline, "job-a's GC never listed\n{}", daemon_log(&d));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lock = dir.path().join("store").join(ckpt_core::keys::gc_lock_key("job-a"));
        assert!(lock.exists(), "the run holds the job's lock");

        assert!(d.terminate(Duration::from_secs(30)).await, "ckptd did not exit on SIGTERM\n{}", daemon_log(&d));
        assert!(!lock.exists(), "the stopped run left its lock\n{}", daemon_log(&d));
        let r = round.await.unwrap().unwrap();
        assert_eq!(r.status(), 200, "the round is answered");
        let all: serde_json::Value = r.json().await.unwrap();
        assert_eq!(all["jobs"], json!([]), "{all}");
        assert_eq!(all["failed"][0]["job"], "job-a", "{all}");
        assert_eq!(all["failed"][0]["code"], "busy", "{all}");
        assert!(all["failed"][0]["message"].as_str().unwrap().contains("shutting down"), "{all}");
        assert_eq!(all["not_run"], json!(["job-b"]), "{all}");
        assert!(daemon_log(&d).contains("the GC run stops before it ends"));

        d.restart().await.unwrap();
        assert!(!daemon_log(&d).contains("releasing a GC lock an earlier run of this node left"));
        let r = reqwest::Client::new().post(format!("{}/v1/jobs/job-a/gc", d.url())).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    })
    .await
}

/// `/readyz` is public, so a flood of probes must not become a flood of store calls: callers
/// that arrive while a probe runs take its outcome. A store slower than
/// `ready_probe_timeout_ms` is not ready, and the caller hears so within about that time. (An
/// idle ckptd lists nothing of its own, so every listing counted here is a probe.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readiness_probes_costs_the_store_one_probe_at_a_time() {
    bounded(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "ready_probe_timeout_ms = 10000\n").unwrap();
        let mut o = faulty(dir.path(), None);
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let http = reqwest::Client::new();
        let ready = || http.get(format!("{}/readyz", d.url())).send();

        let before = fired(&d, "latency:list").await;
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 20_000})).await;
        let t = std::time::Instant::now();
        let r = ready().await.unwrap();
        let took = t.elapsed();
        assert_eq!(fired(&d, "latency:list").await - before, 1);
        assert_eq!(r.status(), 503);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_ready", "{body}");
        assert!(took < Duration::from_secs(13), "answered after {took:?}");

        // One caller starts a slow probe; forty more arrive while it runs (six seconds: time
        // enough on a loaded machine) and share it.
        const CALLERS: usize = 40;
        let before = fired(&d, "latency:list").await;
        arm(&d, json!({"kind": "latency", "op": "list", "delay_ms": 6_000, "count": CALLERS + 1})).await;
        let first = tokio::spawn(http.get(format!("{}/readyz", d.url())).send());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fired(&d, "latency:list").await == before {
            assert!(std::time::Instant::now() < deadline, "the first caller's probe never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answers = futures::future::join_all((0..CALLERS).map(|_| ready())).await;
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        for a in answers {
            assert_eq!(a.unwrap().status(), 200);
        }
        let probes = fired(&d, "latency:list").await - before;
        assert_eq!(probes, 1, "{} callers made {probes} store probes", CALLERS + 1);
    })
    .await
}

/// A commit held by a slow store holds up no other save, nor a status query. Step 1 of job `a`
/// waits in its root's put (an injected quarter minute) with its save locked; step 2 of `a`
/// uploads meanwhile, so its chunks' outcomes concern the held save too; then a save of job `b`
/// must commit while `a`@1 is still held, and a status query about `a`@1 must answer. Uploads are paced so that each save's last index arrives before its
/// chunks are durable: its commit comes from the upload outcomes, not from the index put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_by_the_store_holds_up_no_other_save() {
    bounded(Duration::from_secs(120), async {
        const HOLD_MS: u64 = 15_000;
        let seed = seed(0xfa_0010);
        let dir = tempfile::tempdir().unwrap();
        let mut o = faulty(dir.path(), None);
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(&cfg, "upload_bytes_per_s = 4194304\n").unwrap();
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let c = client(&d);
        let states = |s: u64| (0..WORLD).map(|r| rank_tensors(s, r, WORLD, 2 << 20)).collect::<Vec<_>>();
        let save = |job: &'static str, step: u64, s: Vec<Vec<ckpt_client::Tensor>>| {
            let c = c.clone();
            tokio::spawn(async move { save_step(&c, job, step, &s).await })
        };
        // a@1's ranks are in (its chunks still uploading): the next manifest call is its root's.
        let a1 = states(seed);
        for (r, t) in a1.iter().enumerate() {
            c.save(&spec("a", 1, r as u32, WORLD), t, ckpt_client::Wait::Staged).await.unwrap();
        }
        arm(&d, json!({"kind": "latency", "op": "manifest", "delay_ms": HOLD_MS})).await;
        let held = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_committed("a", 1).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while fired(&d, "latency:manifest").await == 0 {
            assert!(tokio::time::Instant::now() < deadline, "a@1 never reached its root's put\n{}", daemon_log(&d));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let next = save("a", 2, states(seed + 1));
        let started = tokio::time::Instant::now();
        save_step(&c, "b", 1, &states(seed + 2)).await.unwrap_or_else(|e| panic!("{e}\n{}", daemon_log(&d)));
        let took = started.elapsed();
        // A status query about the held save answers at once, from the state its commit began
        // with, rather than wait for the save's lock.
        let asked = tokio::time::Instant::now();
        let a1 = tokio::time::timeout(Duration::from_millis(HOLD_MS / 3), c.save_status("a", 1))
            .await
            .expect("a status query about a@1 waited for its held commit")
            .unwrap();
        assert_ne!(a1.phase, ckpt_client::SavePhase::Committed, "a@1 is still held");
        assert!(a1.committing, "a@1's status does not say its commit is under way: {a1:?}");
        eprintln!("a@1's status ({:?}) answered in {:?} while its commit was held", a1.phase, asked.elapsed());
        // So does a listing of the job (`ckpt ls`), which once waited for every save's lock.
        let asked = tokio::time::Instant::now();
        let listed = tokio::time::timeout(Duration::from_millis(HOLD_MS / 3), c.list("a"))
            .await
            .expect("a listing of job a waited for a@1's held commit")
            .unwrap();
        let shown =
            listed.in_flight.iter().find(|s| s.step == 1).unwrap_or_else(|| panic!("a@1 not listed: {listed:?}"));
        assert!(shown.committing, "the listing does not say a@1 is committing: {shown:?}");
        eprintln!("job a listed in {:?} while a@1's commit was held", asked.elapsed());
        held.await.unwrap().unwrap_or_else(|e| panic!("a@1: {e}\n{}", daemon_log(&d)));
        next.await.unwrap().unwrap_or_else(|e| panic!("a@2: {e}\n{}", daemon_log(&d)));
        for (job, step) in [("a", 1), ("a", 2), ("b", 1)] {
            assert!(c.verify(job, step, |_| {}).await.unwrap().ok(), "{job}@{step}");
        }
        // The order of the commits, from ckptd's log.
        let log = daemon_log(&d);
        let at = |job: &str| {
            log.find(&format!("committed job=\"{job}\" step=1"))
                .unwrap_or_else(|| panic!("{job}@1 not committed\n{log}"))
        };
        assert!(
            at("b") < at("a"),
            "b@1 committed after a@1's held commit (its save took {took:?}): one save's commit held up another's\n{log}"
        );
        eprintln!("b@1 committed in {took:?} while a@1's commit was held");
    })
    .await
}

/// A request that changes state runs to its end though its client gave up (hyper drops a
/// request's handler when its connection closes): a delete held by the store is carried out
/// after its client timed out. A client that retries such a delete and finds the checkpoint
/// gone counts the delete as done, not as "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_whose_client_gave_up_is_carried_out_and_a_retry_counts_it_done() {
    bounded(Duration::from_secs(120), async {
        let seed = seed(0xfa_0011);
        let dir = tempfile::tempdir().unwrap();
        let mut d = start_daemon_with(faulty(dir.path(), None)).await;
        let url = d.url();
        let c = client(&d);
        let states = |s: u64| (0..WORLD).map(|r| rank_tensors(s, r, WORLD, 1 << 16)).collect::<Vec<_>>();
        for step in 1..=3 {
            save_step(&c, "job", step, &states(seed + step)).await.unwrap();
        }
        let root = |step: u64| dir.path().join("store").join(ckpt_core::keys::manifest_key("job", step));
        let listed = |c: ckpt_client::Client, step: u64| async move {
            c.list("job").await.unwrap().committed.iter().any(|m| m.step == step)
        };
        let impatient = |timeout_ms: u64, attempts_max: u32, retry_base_ms: u64| {
            let opts = ckpt_client::ClientOptions {
                request_timeout: Duration::from_millis(timeout_ms),
                attempts_max,
                retry_base: Duration::from_millis(retry_base_ms),
                node_local: false,
                ..ckpt_client::ClientOptions::default()
            };
            ckpt_client::Client::new(&url, opts).unwrap()
        };

        // Held by the store past the client's patience, sent once: carried out all the same.
        arm(&d, json!({"kind": "latency", "op": "manifest", "delay_ms": 1500, "count": 1})).await;
        let e = impatient(300, 1, 50).delete("job", 1, false).await.unwrap_err();
        assert!(e.is_timeout(), "the delete should have timed out on the client: {e}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while root(1).exists() || listed(c.clone(), 1).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the delete whose client gave up was never carried out (root there: {})\n{}",
                root(1).exists(),
                daemon_log(&d)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Held again, retried after the first attempt went through: the retry finds it gone.
        arm(&d, json!({"kind": "latency", "op": "manifest", "delay_ms": 1000, "count": 1})).await;
        impatient(300, 3, 1800)
            .delete("job", 2, false)
            .await
            .unwrap_or_else(|e| panic!("a retried delete that found its checkpoint gone failed: {e}"));
        assert!(!root(2).exists() && !listed(c.clone(), 2).await, "step 2 is still there");
        // A delete of what never was is still "not found".
        let e = c.delete("job", 99, false).await.unwrap_err();
        assert_eq!(e.api_code(), Some("not_found"), "{e}");
        assert!(listed(c.clone(), 3).await && c.verify("job", 3, |_| {}).await.unwrap().ok());

        // A shutdown right after the client left waits for the request as for a connection.
        save_step(&c, "job", 4, &states(seed + 4)).await.unwrap();
        arm(&d, json!({"kind": "latency", "op": "manifest", "delay_ms": 1500, "count": 1})).await;
        impatient(300, 1, 50).delete("job", 3, false).await.unwrap_err();
        assert!(d.terminate(Duration::from_secs(20)).await, "ckptd did not stop by itself");
        assert!(!root(3).exists(), "ckptd stopped with the delete its client had left half done");
        d.restart().await.unwrap();
        assert!(!listed(client(&d), 3).await, "step 3 came back after the restart");
    })
    .await
}

/// With several tenants, none can hold every GC run slot of a node: tenant a's second run
/// while its first is held is refused (429), and tenant b's run goes ahead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_hold_every_gc_slot() {
    bounded(Duration::from_secs(90), async {
        const HOLD_MS: u64 = 8_000;
        let hash = |t: &str| blake3::hash(t.as_bytes()).to_hex().to_string();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ckptd.toml");
        std::fs::write(
            &cfg,
            format!(
                "busy_wait_ms = 300\n[retention]\ngc_runs_max = 2\n\n[[tenants]]\nname = \"a\"\n\
                 token_blake3 = [\"{}\"]\njob_prefixes = [\"a-\"]\n\n[[tenants]]\nname = \"b\"\n\
                 token_blake3 = [\"{}\"]\njob_prefixes = [\"b-\"]\n\n[[tenants]]\nname = \"ops\"\n\
                 token_blake3 = [\"{}\"]\njob_prefixes = [\"\"]\nadmin = true\n",
                hash("token-a"),
                hash("token-b"),
                hash("token-ops")
            ),
        )
        .unwrap();
        let mut o = faulty(dir.path(), None);
        o.extra_args.extend(["--config".into(), cfg.into_os_string()]);
        let d = start_daemon_with(o).await;
        let http = reqwest::Client::new();
        let gc = |token: &str, job: &str| {
            let req = http
                .post(format!("{}/v1/jobs/{job}/gc?dry_run=true", d.url()))
                .header("authorization", format!("Bearer {token}"));
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            }
        };
        // Faults are armed and read by the operator (an admin tenant).
        let r = http
            .post(format!("{}/v1/faults", d.url()))
            .header("authorization", "Bearer token-ops")
            .json(&json!({"kind": "latency", "op": "list", "delay_ms": HOLD_MS, "count": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{}", r.text().await.unwrap_or_default());
        let fired = |d: &ckpt_client::daemon::LocalDaemon, key: &'static str| {
            let req = http.get(format!("{}/v1/faults", d.url())).header("authorization", "Bearer token-ops");
            async move {
                let v: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
                v["fired"][key].as_u64().unwrap_or(0)
            }
        };
        let held = tokio::spawn(gc("token-a", "a-one"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while fired(&d, "latency:list").await < 1 {
            assert!(tokio::time::Instant::now() < deadline, "a's GC never listed\n{}", daemon_log(&d));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = gc("token-a", "a-two").await;
        assert_eq!(status, 429, "a second run of tenant a's while its first is held: {body}");
        assert!(body.contains("GC runs"), "{body}");
        // Tenant b's run takes the slot a could not, and is held in its listing in turn.
        let b = tokio::spawn(gc("token-b", "b-one"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while fired(&d, "latency:list").await < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "b's GC did not start while a's was held\n{}",
                daemon_log(&d)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (who, run) in [("a", held), ("b", b)] {
            let (status, body) = run.await.unwrap();
            assert_eq!(status, 200, "tenant {who}: {body}");
        }
        // a's slot came back with its run's end.
        let (status, body) = gc("token-a", "a-two").await;
        assert_eq!(status, 200, "{body}");
    })
    .await
}
