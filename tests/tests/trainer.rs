//! The embedded trainer end to end: real rank processes, really killed, stopped and slowed,
//! checkpointing through a real ckptd. The oracle is the blake3 of the final weights: a run
//! that is interrupted and rolled back must end bit-identical to one that is not.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ckpt_client::daemon::LocalDaemon;
use ckpt_tests::{ckpt_train_exe, seed, start_daemon};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Flags shared by the tests: the default model on a smaller batch, so a step is quick.
const QUICK: &[&str] =
    &["--global-batch", "12", "--seq-len", "32", "--warmup", "4", "--anneal", "4", "--log-every", "0"];

/// Runs `ckpt-train launch` against `d` and returns its goodput report. Panics with the
/// launcher's output if it fails or outlives `limit`.
fn launch(d: &LocalDaemon, dir: &Path, job: &str, args: &[&str], limit: Duration) -> Value {
    launch_during(d, dir, job, args, limit, |_| {})
}

/// As `launch`, running `during(run_dir)` while the launcher runs.
fn launch_during(
    d: &LocalDaemon,
    dir: &Path,
    job: &str,
    args: &[&str],
    limit: Duration,
    during: impl FnOnce(&Path),
) -> Value {
    let run_dir = dir.join(format!("run-{job}-{}", std::process::id()));
    let json = run_dir.with_extension("json");
    let mut child = Command::new(ckpt_train_exe())
        .arg("launch")
        .args(if args.contains(&"--server") { vec![] } else { vec!["--server".to_string(), d.url()] })
        .args(["--job", job])
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--json")
        .arg(&json)
        .args(QUICK)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting ckpt-train");
    let deadline = std::time::Instant::now() + limit;
    during(&run_dir);
    loop {
        if child.try_wait().expect("waiting for ckpt-train").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ckpt-train ran past {limit:?}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let logs = || {
        let mut s = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for r in 0..4 {
            if let Ok(l) = std::fs::read_to_string(run_dir.join(format!("rank{r}.log"))) {
                s.push_str(&format!("\n--- rank {r} ---\n{}", &l[l.len().saturating_sub(3000)..]));
            }
        }
        s
    };
    assert!(out.status.success(), "ckpt-train {args:?} failed:\n{}", logs());
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    eprintln!("{job}: {}", String::from_utf8_lossy(&out.stdout));
    report
}

/// Returns once rank `rank` of the run in `run_dir` has logged step `step` (panics, naming
/// `what`, if it has not within two minutes): the moment a test injects a fault from outside.
fn wait_for_step(run_dir: &Path, rank: usize, step: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let events = run_dir.join(format!("events-rank{rank}.jsonl"));
    loop {
        let log = std::fs::read_to_string(&events).unwrap_or_default();
        let reached =
            log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v["step"].as_u64()).max();
        if reached >= Some(step) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: rank {rank} never reached step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sum of every sample of `name` in a Prometheus text file.
fn prom(path: &Path, name: &str) -> f64 {
    ckpt_tests::prometheus_sum(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        name,
    )
}

/// The metrics a clean run leaves in `<run_dir>/metrics/`: each rank's step times (one per
/// step) and checkpoint waits (one per save), and the launcher's goodput, as in its report.
fn assert_trainer_metrics(run_dir: &Path, report: &Value, steps: u64, saves: u64) {
    let m = run_dir.join("metrics");
    for r in 0..2 {
        let f = m.join(format!("rank{r}.prom"));
        assert_eq!(prom(&f, "ckpt_train_step_duration_seconds_count"), steps as f64, "rank {r}");
        assert!(prom(&f, "ckpt_train_step_duration_seconds_sum") > 0.0);
        assert_eq!(prom(&f, "ckpt_train_checkpoint_wait_seconds_count"), saves as f64, "rank {r}");
    }
    let l = m.join("launcher.prom");
    let goodput = report["effective_training_time_pct"].as_f64().unwrap() / 100.0;
    assert!((prom(&l, "ckpt_train_effective_training_time_ratio") - goodput).abs() < 1e-9);
    assert_eq!(prom(&l, "ckpt_train_interruptions"), 0.0);
}

fn hash(r: &Value) -> &str {
    r["final_weights_blake3"].as_str().expect("report has the final hash")
}

fn losses(r: &Value) -> Vec<(u64, f64)> {
    r["losses"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
}

fn causes(r: &Value) -> Vec<String> {
    r["interruptions"].as_array().unwrap().iter().map(|i| i["cause"].as_str().unwrap().to_string()).collect()
}

const MINUTES: Duration = Duration::from_secs(240);

/// The trainer tests take turns: each runs several rank processes on a small machine, and the
/// hang test's timing must not depend on its neighbours' load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_runs_end_bit_identical_to_an_uninterrupted_one() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = seed(20261129);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "16", "--ckpt-every", "4"];
    let a = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean-a", &base, MINUTES));
    assert_trainer_metrics(&dir.path().join(format!("run-clean-a-{}", std::process::id())), &a, 16, 4);
    let b = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean-b", &base, MINUTES));
    assert_eq!(hash(&a), hash(&b), "two fault-free runs with one seed differ");
    assert!(causes(&a).is_empty());

    // SIGKILL at random steps and ranks, during a save (upload in flight) and during a commit
    // (own index in, step not committed).
    let kills = [
        format!("kill@{}:{}", rng.random_range(0..2), rng.random_range(2..=7)),
        format!("kill-save@{}:8", rng.random_range(0..2)),
        format!("kill-commit@{}:12", rng.random_range(0..2)),
        format!("kill@{}:{}", rng.random_range(0..2), rng.random_range(13..=16)),
    ];
    let mut args: Vec<&str> = base.to_vec();
    for k in &kills {
        args.extend(["--inject", k.as_str()]);
    }
    args.extend(["--max-restarts", "6"]);
    let c = tokio::task::block_in_place(|| launch(&d, dir.path(), "killed", &args, MINUTES));
    let got = causes(&c);
    assert_eq!(got.len(), kills.len(), "seed {s}: every kill is an interruption: {got:?}");
    assert!(got.iter().all(|c| c.contains("SIGKILL")), "seed {s}: {got:?}");
    assert_eq!(hash(&c), hash(&a), "seed {s}: killed run {kills:?} ended with different weights");
    assert_eq!(c["final_step"], 16);
    // The kill during the commit landed after the rank's own index was accepted and before the
    // step committed (the other ranks start their saves only once the victim's index is in).
    let landed: Vec<Value> = events(dir.path(), "killed")
        .into_iter()
        .filter(|e| e["kind"] == "inject" && e["injection"].as_str().is_some_and(|k| k.starts_with("kill-commit")))
        .collect();
    assert_eq!(landed.len(), 1, "seed {s}: {landed:?}");
    assert!(
        landed[0]["note"].as_str().is_some_and(|n| n.contains("own index accepted; step open")),
        "seed {s}: {}",
        landed[0]
    );
    assert!(c["steps_executed"].as_u64().unwrap() > 16, "rolled-back steps are executed again");

    // And a SIGKILL from outside, at whatever instruction rank 1 is executing once it has logged
    // a seeded random step: inside a collective, a save's background upload, anywhere.
    let after = rng.random_range(3..=13u64);
    let mut ext: Vec<&str> = base.to_vec();
    ext.extend(["--max-restarts", "2"]);
    let e = tokio::task::block_in_place(|| {
        launch_during(&d, dir.path(), "external", &ext, MINUTES, |run_dir| {
            wait_for_step(run_dir, 1, after, &format!("seed {s}"));
            let pid: i32 = std::fs::read_to_string(run_dir.join("rank1.pid")).unwrap().trim().parse().unwrap();
            // SAFETY: kill(2) has no memory-safety preconditions.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "seed {s}: rank 1 (pid {pid}) is gone");
        })
    });
    let got = causes(&e);
    assert_eq!(got.len(), 1, "seed {s}: killed after step {after}: {got:?}");
    assert!(got[0].contains("rank 1 killed by signal 9"), "seed {s}: {got:?}");
    assert_eq!(hash(&e), hash(&a), "seed {s}: killed from outside after step {after}, ended with different weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_rank_is_caught_by_the_collective_timeout_and_a_slow_one_is_not() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "10", "--ckpt-every", "4"];
    let timeout_ms: u64 = 2_000;
    let t = timeout_ms.to_string();
    let mut hang = base.to_vec();
    // Three steps after the step-4 checkpoint, so its background save has committed by then
    // even on a loaded machine, and the group resumes from it.
    hang.extend(["--collective-timeout-ms", &t, "--inject", "hang@1:8"]);
    let h = tokio::task::block_in_place(|| launch(&d, dir.path(), "hung", &hang, MINUTES));
    let ints = h["interruptions"].as_array().unwrap();
    assert_eq!(ints.len(), 1, "{ints:?}");
    let i = &ints[0];
    let cause = i["cause"].as_str().unwrap();
    assert!(cause.contains("collective timeout") && cause.contains("[1]"), "{cause}");
    // The flight recorder names the rank and the collective it never reached.
    assert!(cause.contains("rank 1 did not arrive at collective #") && cause.contains("rank 0 waits in"), "{cause}");
    let detect = i["detection_ms"].as_u64().unwrap();
    assert!(detect >= timeout_ms && detect < timeout_ms + 1_000, "hang detected after {detect} ms");
    assert_eq!(i["resumed_from"], 4);
    assert_eq!(h["final_step"], 10);

    // A rank slower than usual but within the timeout is waited for, not restarted.
    let mut slow = base.to_vec();
    slow.extend(["--collective-timeout-ms", "5000", "--inject", "slow@1:6:1500"]);
    let s = tokio::task::block_in_place(|| launch(&d, dir.path(), "slow", &slow, MINUTES));
    assert!(causes(&s).is_empty(), "a slow rank caused a restart: {:?}", causes(&s));
    let mut clean = base.to_vec();
    clean.extend(["--collective-timeout-ms", "5000"]);
    let c = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &clean, MINUTES));
    assert_eq!(hash(&s), hash(&c), "a slow step changed the result");
    assert_eq!(hash(&h), hash(&c), "the hung run recovered to different weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_resumes_with_another_world_size_where_it_left_off() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let run = |nproc: &str, until: &str| {
        let args = ["--nproc", nproc, "--steps", "24", "--until-step", until, "--ckpt-every", "4"];
        tokio::task::block_in_place(|| launch(&d, dir.path(), "reshard", &args, MINUTES))
    };
    let four = run("4", "12");
    let two = run("2", "18");
    let three = run("3", "24");
    let (l4, l2, l3) = (losses(&four), losses(&two), losses(&three));
    assert_eq!(l4.first().unwrap().0, 1);
    assert_eq!(l2.first().unwrap().0, 13, "4 → 2 resumed at {:?}", l2.first());
    assert_eq!(l3.first().unwrap().0, 19, "2 → 3 resumed at {:?}", l3.first());
    let initial = l4[0].1;
    // A resumed run starts where the other stopped: much nearer the last loss than the initial one.
    for (before, after, what) in [(&l4, &l2, "4 → 2"), (&l2, &l3, "2 → 3")] {
        let last = before.last().unwrap().1;
        let first = after.first().unwrap().1;
        assert!(last < initial - 1.0, "{what}: loss barely fell before the switch ({initial} → {last})");
        assert!(
            first < last + 0.25 * (initial - last),
            "{what}: loss jumped from {last} to {first} (initial {initial})"
        );
    }
    assert!(l3.last().unwrap().1 < l4.last().unwrap().1, "training went on improving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_recovers_and_its_loss_falls_well_below_the_initial_loss() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("demo.json");
    let out = tokio::task::block_in_place(|| {
        // Half the README's 240 steps: the same kill, hang and averaging (their steps scale with
        // it) in half the time of this suite's longest test, and the loss still falls below 0.4
        // of the first (to about 0.07 of it).
        Command::new(ckpt_train_exe())
            .args(["demo", "--steps", "120"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--json")
            .arg(&json)
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    });
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed:\n{text}");
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let (first, last) = (r["loss_first"].as_f64().unwrap(), r["loss_last"].as_f64().unwrap());
    assert!(last < 0.4 * first, "loss {first} → {last}\n{text}");
    assert_eq!(causes(&r).len(), 2, "{text}");
    let eval = r["eval_loss"].as_f64().unwrap();
    assert!(eval < 0.4 * first, "held-out loss {eval}: {text}");
    let averaged = r["averaged"]["eval_loss"].as_f64().expect("annealing checkpoints averaged");
    assert!(averaged < 0.4 * first, "averaged weights' held-out loss {averaged}: {text}");
    assert!(text.contains("effective training time"), "{text}");
    // Each restart says where it resumed from, as the report records it.
    for i in r["interruptions"].as_array().unwrap() {
        let (generation, from) = (i["generation"].as_u64().unwrap() + 1, i["resumed_from"].as_u64().unwrap());
        let line = format!("restart: generation {generation} resumes from step {from} after");
        assert!(text.contains(&line), "no {line:?} in the demo's output:\n{text}");
    }
    assert!(text.contains("demo: job demo-"), "the demo names its job: {text}");
    // Rank logs: no backtrace, and what a rank logs carries its rank and generation.
    for run in std::fs::read_dir(dir.path().join("ckpt-runs")).unwrap().flatten() {
        for e in std::fs::read_dir(run.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("rank") && name.ends_with(".log")) {
                continue;
            }
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            assert!(!log.contains("stack backtrace"), "{name}: {log}");
        }
    }
}

/// A job relaunched after it finished says so, trains nothing and leaves its report alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_relaunched_says_so_and_keeps_its_report() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let args = ["--nproc", "2", "--steps", "4", "--ckpt-every", "4"];
    tokio::task::block_in_place(|| launch(&d, dir.path(), "done", &args, MINUTES));
    let run_dir = dir.path().join(format!("run-done-{}", std::process::id()));
    let report = std::fs::read(run_dir.join("goodput.json")).unwrap();
    let out = tokio::task::block_in_place(|| {
        Command::new(ckpt_train_exe())
            .args(["launch", "--server", &d.url(), "--job", "done", "--run-dir"])
            .arg(&run_dir)
            .args(QUICK)
            .args(args)
            .output()
            .unwrap()
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("is trained already") && !text.contains("effective training time"), "{text}");
    assert_eq!(std::fs::read(run_dir.join("goodput.json")).unwrap(), report, "the report was rewritten");
}

fn events(run_dir_prefix: &Path, job: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for run in std::fs::read_dir(run_dir_prefix).unwrap().flatten() {
        if !(run.file_name().to_string_lossy().starts_with(&format!("run-{job}-")) && run.path().is_dir()) {
            continue;
        }
        for e in std::fs::read_dir(run.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("events-rank") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
            }
        }
    }
    out
}

/// A flipped bit in one rank's replica (silent data corruption), NaN in a gradient (a memory
/// error) and a panic (a software bug): each is caught before anything of it is used or
/// committed, each costs one rollback, and the run ends bit-identical to a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_poison_and_panics_are_caught_before_commit_and_rolled_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "16", "--ckpt-every", "4", "--collective-timeout-ms", "5000"];
    let clean = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &base, MINUTES));
    let mut args = base.to_vec();
    args.extend(["--inject", "sdc@1:6", "--inject", "nan@0:10", "--inject", "panic@1:13", "--max-restarts", "4"]);
    let r = tokio::task::block_in_place(|| launch(&d, dir.path(), "faulty", &args, MINUTES));
    let got = causes(&r);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got[0].contains("silent data corruption: rank 1's replica of params[") && got[0].contains("owned by rank 0"),
        "{got:?}"
    );
    assert!(got[1].contains("non-finite"), "{got:?}");
    assert!(got[2].contains("injected panic at step 13"), "{got:?}");
    // A rank's failure is in its log with a time, its rank and its generation, in plain text.
    let mut errors = Vec::new();
    for run in std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for e in std::fs::read_dir(run.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("rank") && name.ends_with(".log") {
                let log = std::fs::read_to_string(e.path()).unwrap_or_default();
                assert!(!log.contains('\u{1b}'), "{name}: colour codes in a log file");
                errors.extend(log.lines().filter(|l| l.contains(" ERROR ")).map(String::from));
            }
        }
    }
    assert!(!errors.is_empty(), "the failing ranks logged no ERROR line");
    for line in &errors {
        assert!(line.contains("generation=") && line.contains("rank=") && line.starts_with("20"), "{line}");
    }
    let ev = events(dir.path(), "faulty");
    let sdc: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "sdc_detected").collect();
    assert_eq!(sdc.len(), 2, "both ranks reach the same verdict: {sdc:?}");
    assert!(sdc.iter().all(|e| e["victim"] == 1 && e["owner"] == 0 && e["tensor"] == "params" && e["step"] == 6));
    // No save was even started from the corrupted or poisoned state: generation 0 saw the flip
    // at step 6, generation 1 the NaN at step 10.
    for (generation, from) in [(0, 6), (1, 10)] {
        let saved: Vec<&Value> = ev
            .iter()
            .filter(|e| e["kind"] == "save" && e["generation"] == generation && e["step"].as_u64() >= Some(from))
            .collect();
        assert!(saved.is_empty(), "generation {generation} saved after its fault: {saved:?}");
    }
    let resumed: Vec<u64> =
        r["interruptions"].as_array().unwrap().iter().map(|i| i["resumed_from"].as_u64().unwrap()).collect();
    for (at, fault_step) in resumed.iter().zip([6, 10, 13]) {
        assert!(*at < fault_step && at % 4 == 0, "resumed from {at} after the fault at step {fault_step}");
    }
    assert_eq!(hash(&r), hash(&clean), "the run that caught its faults ended with different weights");
}

/// Host maintenance: SIGTERM to every rank. They agree on a step, take an emergency checkpoint
/// there, wait for its commit and exit; the next generation resumes from it, not from the
/// last periodic checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_takes_an_emergency_checkpoint_and_training_resumes_from_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "16", "--ckpt-every", "8"];
    let clean = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &base, MINUTES));
    let r = tokio::task::block_in_place(|| {
        launch_during(&d, dir.path(), "maint", &base, MINUTES, |run_dir| {
            wait_for_step(run_dir, 0, 3, "SIGTERM");
            for r in 0..2 {
                let pid: i32 =
                    std::fs::read_to_string(run_dir.join(format!("rank{r}.pid"))).unwrap().trim().parse().unwrap();
                // SAFETY: kill(2) has no memory-safety preconditions.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
            }
        })
    });
    let ev = events(dir.path(), "maint");
    let pre: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "preempted").collect();
    assert_eq!(pre.len(), 2, "{pre:?}");
    assert!(pre.iter().all(|e| e["committed"] == true && e["step"] == pre[0]["step"]), "{pre:?}");
    let at = pre[0]["step"].as_u64().unwrap();
    assert!(at > 3 && at < 8, "the emergency checkpoint is off the periodic schedule: step {at}");
    let ints = r["interruptions"].as_array().unwrap();
    assert_eq!(ints.len(), 1, "{ints:?}");
    assert!(ints[0]["cause"].as_str().unwrap().contains("preempted (SIGTERM)"), "{ints:?}");
    assert_eq!(ints[0]["resumed_from"].as_u64(), Some(at), "resumed from the emergency checkpoint");
    assert_eq!(hash(&r), hash(&clean));
}

/// A rank stopped (SIGSTOP) while its checkpoint is on the wire: every byte goes over HTTP
/// through a bandwidth-capped link (the chaos harness's fault proxy), so the stop lands in the
/// middle of a chunk upload. The collective watchdog catches the hang, the flight recorder
/// names the rank, the half-sent chunk leaves nothing reserved in ckptd, the step is redone,
/// and the run ends bit-identical to a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_stopped_in_the_middle_of_a_chunk_upload_is_caught_and_leaves_nothing_behind() {
    use ckpt_chaos::proxy::{Mode, Proxy};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "12", "--ckpt-every", "4", "--collective-timeout-ms", "3000"];
    let clean = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &base, MINUTES));
    let proxy = Proxy::start(d.url().trim_start_matches("http://").to_string()).await.unwrap();
    proxy.set(Mode::BandwidthCap { bytes_per_s: 8 << 20 });
    let mut args = base.to_vec();
    let url = proxy.url();
    args.extend(["--no-node-local", "--inject", "stop-save@0:8"]);
    // Through the proxy instead of straight to ckptd.
    args.extend(["--server", url.as_str()]);
    let r = tokio::task::block_in_place(|| launch(&d, dir.path(), "stopped", &args, MINUTES));
    let ev = events(dir.path(), "stopped");
    let fired: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "inject").collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["note"], "upload in flight");
    let got = causes(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("collective timeout") && got[0].contains("rank 0 did not arrive"), "{got:?}");
    assert!(proxy.counters().bytes_forwarded > 0);
    let stats: Value = reqwest::get(format!("{}/v1/stats", d.url())).await.unwrap().json().await.unwrap();
    assert_eq!(stats["staging"]["memory_bytes"], 0, "a reservation outlived its upload: {stats}");
    assert_eq!(stats["saves_in_flight"], 0, "{stats}");
    assert_eq!(hash(&r), hash(&clean));
}

/// Bytes corrupted between ranks and the collective hub (a faulty NIC or switch on the
/// training network): the frame checksum fails the round, the group rolls back, and the run
/// ends bit-identical to a clean one. The link is the chaos harness's fault proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_corrupted_between_ranks_and_the_hub_fail_the_round_and_roll_back() {
    use ckpt_chaos::proxy::{Mode, Proxy};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "12", "--ckpt-every", "4", "--collective-timeout-ms", "5000"];
    let clean = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &base, MINUTES));
    let hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let proxy = Proxy::start(hub.clone()).await.unwrap();
    let advertise = proxy.addr.to_string();
    let mut args = base.to_vec();
    args.extend(["--hub-listen", hub.as_str(), "--hub-advertise", advertise.as_str(), "--max-restarts", "4"]);
    let p = proxy.clone();
    let r = tokio::task::block_in_place(|| {
        launch_during(&d, dir.path(), "corrupted", &args, MINUTES, move |run_dir| {
            // Once the group has trained a few steps, damage the next few reads on the link.
            wait_for_step(run_dir, 0, 6, "hub corruption");
            p.set(Mode::Corrupt { reads: 2, upstream: true, downstream: true });
        })
    });
    assert!(proxy.counters().bits_flipped >= 1, "the link was corrupted");
    let got = causes(&r);
    assert!(!got.is_empty() && got.iter().any(|c| c.contains("checksum mismatch")), "{got:?}");
    assert_eq!(hash(&r), hash(&clean), "the group computed on corrupted bytes");
}

/// The newest checkpoint fails verification (a flipped bit in one of its stored chunks): the
/// launcher says so and resumes from the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_checkpoint_is_skipped_loudly_for_the_one_before() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let first = ["--nproc", "2", "--steps", "12", "--until-step", "8", "--ckpt-every", "4"];
    tokio::task::block_in_place(|| launch(&d, dir.path(), "skip", &first, MINUTES));
    let c = ckpt_tests::client(&d);
    let m = c.manifest("skip", 8).await.unwrap();
    let h = m.ranks[0].chunk_hashes().next().unwrap();
    let path = ckpt_tests::chunk_path(&dir.path().join("store"), "skip", &h);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let rest = ["--nproc", "2", "--steps", "12", "--ckpt-every", "4"];
    let run_dir = dir.path().join("skip-second");
    let out = Command::new(ckpt_train_exe())
        .arg("launch")
        .args(["--server", &d.url(), "--job", "skip", "--run-dir"])
        .arg(&run_dir)
        .args(QUICK)
        .args(rest)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("skip@8 fails verification (1 bad chunks); trying the one before"), "{text}");
    let report: Value = serde_json::from_slice(&std::fs::read(run_dir.join("goodput.json")).unwrap()).unwrap();
    assert_eq!(losses(&report).first().map(|l| l.0), Some(5), "resumed from step 4");
}

/// The other faults of the training network, on the ranks' links to the hub: latency slows the
/// steps and restarts nothing; a blackhole longer than the watchdog holds the group (or is
/// caught as a hang); a reset
/// drops every rank's connection, and the group restarts. And a rank aborting at a random point
/// of a step (a crash inside whatever it was doing). Every run ends bit-identical to a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_link_latency_blackhole_reset_and_a_random_abort_are_survived() {
    use ckpt_chaos::proxy::{Mode, Proxy};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "12", "--ckpt-every", "4", "--collective-timeout-ms", "2000"];
    let clean = tokio::task::block_in_place(|| launch(&d, dir.path(), "clean", &base, MINUTES));
    for (job, fault) in [("latency", "latency"), ("blackhole", "blackhole"), ("reset", "reset"), ("abort", "abort")] {
        let hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let proxy = Proxy::start(hub.clone()).await.unwrap();
        let advertise = proxy.addr.to_string();
        let mut args = base.to_vec();
        args.extend(["--hub-listen", hub.as_str(), "--hub-advertise", advertise.as_str(), "--max-restarts", "4"]);
        if fault == "abort" {
            args.extend(["--inject", "abort@1:6:60"]);
        }
        let p = proxy.clone();
        let r = tokio::task::block_in_place(|| {
            launch_during(&d, dir.path(), job, &args, MINUTES, move |run_dir| {
                wait_for_step(run_dir, 0, 6, fault);
                match fault {
                    "latency" => p.set(Mode::Latency { ms: 40 }),
                    "blackhole" => {
                        p.set(Mode::Blackhole);
                        std::thread::sleep(Duration::from_millis(3_000));
                        p.set(Mode::Pass);
                    }
                    "reset" => p.reset(),
                    _ => {}
                }
            })
        });
        let c = proxy.counters();
        let got = causes(&r);
        match fault {
            "latency" => {
                assert!(c.delayed_reads > 0, "{c:?}");
                assert!(got.is_empty(), "latency caused a restart: {got:?}");
            }
            "blackhole" => {
                // Every rank's link is held alike: no round gets its first frame, so none is
                // judged; the group goes on when the link comes back (within the idle timeout),
                // or, if one rank's frame got through first, the watchdog restarts it.
                assert!(c.held_reads > 0, "{c:?}");
                assert!(got.iter().all(|c| c.contains("collective timeout")), "{got:?}");
            }
            "reset" => {
                assert!(c.connections_reset > 0, "{c:?}");
                assert_eq!(got.len(), 1, "{got:?}");
            }
            _ => {
                assert_eq!(got.len(), 1, "{got:?}");
                assert!(got[0].contains("rank 1 killed by signal 6"), "{got:?}");
            }
        }
        assert_eq!(hash(&r), hash(&clean), "{fault}: ended with other weights");
    }
}

/// Frozen embeddings: from the second checkpoint on, the chunks holding them (the parameters
/// and both AdamW moments) are found unchanged by their fingerprints and are neither copied into
/// the staging buffer nor hashed again. The fingerprints decide exactly as a byte compare does on
/// every save of every rank, frozen or not, and the checkpoints and final weights are the same
/// either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_embeddings_are_neither_copied_nor_hashed_again() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let base = ["--nproc", "2", "--steps", "8", "--ckpt-every", "2", "--chunk-kib", "64"];
    let mut reports = std::collections::BTreeMap::new();
    for (job, freeze, detect) in [
        ("frozen-fp", true, "fingerprint"),
        ("frozen-cmp", true, "compare"),
        ("trained-fp", false, "fingerprint"),
        ("trained-cmp", false, "compare"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--change-detection", detect]);
        if freeze {
            args.push("--freeze-embeddings");
        }
        reports.insert(job, tokio::task::block_in_place(|| launch(&d, dir.path(), job, &args, MINUTES)));
    }
    let of = |job: &str, kind: &str, rank: u64| -> Vec<Value> {
        let mut v: Vec<Value> =
            events(dir.path(), job).into_iter().filter(|e| e["kind"] == kind && e["rank"] == rank).collect();
        v.sort_by_key(|e| e["step"].as_u64());
        v
    };
    // Rank 0 owns the start of the flat parameter vector, where the embeddings are: 256 x 192
    // floats, 192 KiB, three whole 64 KiB chunks in each of its three tensors.
    let saves = of("frozen-fp", "save", 0);
    assert_eq!(saves.len(), 4, "{saves:?}");
    assert_eq!(saves[0]["chunks_unchanged"], 0, "the first save copies everything: {}", saves[0]);
    for s in &saves[1..] {
        assert_eq!(s["change_detection"], "fingerprint");
        assert_eq!(s["chunks_unchanged"], 9, "the embeddings' chunks, unchanged: {s}");
    }
    for (fp, cmp) in [("frozen-fp", "frozen-cmp"), ("trained-fp", "trained-cmp")] {
        for rank in 0..2 {
            let (a, b) = (of(fp, "save", rank), of(cmp, "save", rank));
            assert_eq!(a.len(), 4, "{fp} rank {rank}");
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x["step"], y["step"]);
                assert_eq!(y["change_detection"], "compare");
                // The byte compare is the ground truth of what did not change.
                assert_eq!(x["chunks_unchanged"], y["chunks_unchanged"], "{fp} vs {cmp}, rank {rank}: {x} {y}");
            }
            // What a save found unchanged is what it did not hash again.
            for (s, c) in a.iter().zip(&of(fp, "committed", rank)) {
                assert_eq!(c["chunks_reused"], s["chunks_unchanged"], "{fp} rank {rank}: {s} {c}");
            }
            // The checkpoints hold the same bytes whichever way the chunks were found.
            let c = ckpt_tests::client(&d);
            for step in [2, 8] {
                let x = c.load_rank(fp, step, rank as u32).await.unwrap();
                let y = c.load_rank(cmp, step, rank as u32).await.unwrap();
                assert!(x == y, "{fp} and {cmp} differ at step {step}, rank {rank}");
            }
        }
        assert_eq!(hash(&reports[fp]), hash(&reports[cmp]), "{fp} and {cmp} ended with different weights");
    }
    // Training the embeddings changes them: less stays unchanged than when they are frozen.
    for s in &of("trained-fp", "save", 0)[1..] {
        assert!(s["chunks_unchanged"].as_u64().unwrap() < 9, "{s}");
    }
}

/// The launcher's own ckptd (no `--server`) is supervised as the deploy files' supervisors do:
/// SIGKILLed mid-run, it is started again on the same address, the ranks' next saves commit
/// through it, and a rank killed after that restores from one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launchers_own_ckptd_is_started_again_when_it_dies() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join(format!("run-supervised-{}", std::process::id()));
    let (data, json) = (dir.path().join("data"), dir.path().join("supervised.json"));
    let mut child = Command::new(ckpt_train_exe())
        .args(["launch", "--job", "supervised", "--nproc", "2", "--steps", "20", "--ckpt-every", "4"])
        .args(["--inject", "kill@1:19"])
        .args(QUICK)
        .arg("--data-dir")
        .arg(&data)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--json")
        .arg(&json)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting ckpt-train");
    let pid_file = data.join("state/ckptd.pid");
    let killed_at = tokio::task::block_in_place(|| {
        wait_for_step(&run_dir, 0, 5, "before ckptd is killed");
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // SAFETY: kill(2) on the ckptd the launcher started (its pid from ckptd's own file).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "ckptd {pid} was not running");
        pid
    });
    let out = tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + MINUTES;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    });
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the run failed:\n{text}");
    assert!(text.contains("ckptd exited by itself") && text.contains("ckptd started again on"), "{text}");
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["final_step"], 20, "{text}");
    // Saves from step 8 on were taken after ckptd died (at step 5 or later): only the new
    // ckptd can have committed them, and the killed rank's restore comes from one.
    let committed = events(dir.path(), "supervised")
        .iter()
        .filter(|e| e["kind"] == "committed")
        .filter_map(|e| e["step"].as_u64())
        .max();
    assert!(committed >= Some(8), "no save committed after ckptd {killed_at} died ({committed:?}):\n{text}");
    let resumed: Vec<u64> =
        r["interruptions"].as_array().unwrap().iter().filter_map(|i| i["resumed_from"].as_u64()).collect();
    assert!(resumed.len() == 1 && resumed[0] >= 8, "resumed from {resumed:?}:\n{text}");
}
