//! `ckpt-chaos run`: a real training job under a seeded fault schedule, and the checks that
//! say whether it survived.
//!
//! Design note. The harness owns ckptd (started with `--fault-injection`), two fault proxies
//! (ranks → ckptd, ranks → collective hub) and the trainer's launcher, a child process. Faults
//! inside a rank (kill, panic, NaN, bit flip, hang, throttle, stop or kill mid-save) go to the
//! launcher as `--inject` flags and fire when the rank reaches their step; every other fault is
//! done from here when the job's progress (the launcher prints every step) reaches its step:
//! SIGKILL and restart of ckptd, proxy modes, armed store faults, SIGTERM then SIGKILL of the
//! ranks, damage to stored chunks. Each fault is recorded with the time it took effect.
//!
//! The checks run after the launcher exits, against the store and the logs, not against what
//! the harness believes happened: every committed checkpoint verifies (or its damage was done
//! by this harness and is detected); every save a rank saw acknowledged is still committed;
//! every interruption resumed from the newest checkpoint that was good at the time; the final
//! weights equal a fault-free run's; ckptd stayed within its memory and file limits.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientOptions};
use serde::{Deserialize, Serialize};

use ckpt_chaos::proxy::{Mode, Proxy, ProxyCounters};
use ckpt_chaos::schedule::{draw, PlannedFault, ScheduleConfig};
use ckpt_chaos::taxonomy::Fault;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub schedule: ScheduleConfig,
    pub nproc: usize,
    pub steps: u64,
    pub out_dir: PathBuf,
    pub collective_timeout_ms: u64,
    /// Host maintenance: how long ranks have between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// How long a network fault lasts.
    pub network_fault_ms: u64,
    pub ckptd_rss_bytes_max: u64,
    pub ckptd_open_files_max: u64,
    /// The fault-free run's final weights, if already known (skips the reference run).
    pub reference_blake3: Option<String>,
    pub global_batch: usize,
    pub seq_len: usize,
}

/// The `--inject` argument for a trainer-side fault.
pub fn inject_arg(f: &PlannedFault) -> Option<String> {
    let (r, s) = (f.rank, f.step);
    Some(match f.fault {
        Fault::KillRank => format!("kill@{r}:{s}"),
        Fault::KillRankMidSave if f.variant % 2 == 0 => format!("kill-save@{r}:{s}"),
        Fault::KillRankMidSave => format!("kill-commit@{r}:{s}"),
        Fault::PanicRank if f.variant % 2 == 0 => format!("panic@{r}:{s}"),
        // A crash at a random point of the step: inside a collective, the compute or a save.
        Fault::PanicRank => format!("abort@{r}:{s}:{}", f.variant % 250),
        Fault::NanRank => format!("nan@{r}:{s}"),
        Fault::FlipReplicaBit => format!("sdc@{r}:{s}"),
        Fault::HangRank => format!("hang@{r}:{s}"),
        Fault::SlowRank => format!("slow@{r}:{s}:{}", 300 + f.variant % 700),
        Fault::StopRankMidUpload => format!("stop-save@{r}:{s}"),
        _ => return None,
    })
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FiredFault {
    pub planned: PlannedFault,
    pub what: String,
    /// When it took effect (Unix ms); None if it never did.
    pub unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    pub ckptd_rss_bytes_max: u64,
    pub ckptd_open_files_max: u64,
    pub rank_rss_bytes_max: u64,
    pub store_bytes: u64,
    pub state_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub options: RunOptions,
    pub schedule: Vec<PlannedFault>,
    pub faults: Vec<FiredFault>,
    pub goodput: serde_json::Value,
    pub reference_blake3: String,
    pub committed_steps: Vec<u64>,
    /// Steps whose checkpoint this harness damaged (and which must fail verification).
    pub damaged_steps: Vec<u64>,
    pub detections: Vec<serde_json::Value>,
    pub samples: Samples,
    pub violations: Vec<String>,
    pub started_unix_ms: u64,
    pub wall_s: f64,
    pub proxies: BTreeMap<String, ProxyCounters>,
    /// When rank 0 saw each of its saves committed (Unix ms).
    pub commits_unix_ms: Vec<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn sibling(name: &str) -> Result<PathBuf> {
    let ckptd = find_ckptd()?;
    let p = ckptd.with_file_name(name);
    if !p.is_file() {
        bail!("no {name} next to {} (build the workspace first)", ckptd.display());
    }
    Ok(p)
}

struct Launch {
    job: String,
    server: String,
    injections: Vec<String>,
    hub: Option<(String, String)>,
    run_dir: PathBuf,
    data_dir: PathBuf,
}

fn launcher(o: &RunOptions, l: &Launch) -> Result<std::process::Child> {
    let mut cmd = Command::new(sibling("ckpt-train")?);
    cmd.arg("launch")
        .args(["--nproc", &o.nproc.to_string(), "--job", &l.job, "--server", &l.server])
        .args(["--seed", &o.schedule.seed.to_string(), "--steps", &o.steps.to_string()])
        .args(["--ckpt-every", &o.schedule.ckpt_every.to_string(), "--max-restarts", "100000"])
        .args(["--collective-timeout-ms", &o.collective_timeout_ms.to_string()])
        .args(["--startup-timeout-ms", "60000", "--idle-timeout-ms", "60000", "--log-every", "1"])
        .args(["--global-batch", &o.global_batch.to_string(), "--seq-len", &o.seq_len.to_string()])
        .args(["--warmup", "5", "--anneal", "10"])
        .arg("--run-dir")
        .arg(&l.run_dir)
        .arg("--data-dir")
        .arg(&l.data_dir)
        .arg("--no-node-local");
    if let Some((listen, advertise)) = &l.hub {
        cmd.args(["--hub-listen", listen, "--hub-advertise", advertise]);
    }
    for i in &l.injections {
        cmd.args(["--inject", i]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().context("starting ckpt-train launch")
}

/// Reads the launcher's output: progress (the highest step reported) and a copy to a log.
fn follow(
    child: &mut std::process::Child,
    log: &Path,
    progress: Arc<AtomicU64>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    let out = child.stdout.take().context("launcher stdout")?;
    let err = child.stderr.take().context("launcher stderr")?;
    let file = Arc::new(std::sync::Mutex::new(std::fs::File::create(log)?));
    for (stream, is_out) in [(Box::new(out) as Box<dyn std::io::Read + Send>, true), (Box::new(err), false)] {
        let (file, progress) = (file.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if is_out {
                    if let Some(step) = line.strip_prefix("step ").and_then(|r| r.split_whitespace().next()) {
                        if let Ok(s) = step.parse::<u64>() {
                            progress.fetch_max(s, Ordering::Relaxed);
                        }
                    }
                }
                use std::io::Write;
                let _ = writeln!(file.lock().unwrap_or_else(|p| p.into_inner()), "{line}");
            }
        }));
    }
    Ok(handles)
}

fn free_port() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

pub(crate) fn rank_pids(run_dir: &Path, world: usize) -> Vec<i32> {
    (0..world)
        .filter_map(|r| std::fs::read_to_string(run_dir.join(format!("rank{r}.pid"))).ok()?.trim().parse().ok())
        .collect()
}

pub(crate) fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The chunk files of a committed checkpoint, read from its root and index objects.
pub(crate) async fn chunk_hashes(client: &Client, job: &str, step: u64) -> Result<Vec<ckpt_core::ChunkHash>> {
    let m = client.manifest(job, step).await?;
    let mut out: Vec<_> = m.ranks.iter().flat_map(|r| r.chunk_hashes()).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

pub fn run(o: &RunOptions) -> Result<RunResult> {
    let started = Instant::now();
    let started_unix_ms = now_ms();
    std::fs::create_dir_all(&o.out_dir)?;
    let schedule = draw(&o.schedule);
    println!("seed {} (pass --seed {} to replay this schedule)", o.schedule.seed, o.schedule.seed);
    for f in &schedule {
        println!("  step {:>4}  {:<28} {:<22} rank {}", f.step, f.component, f.fault.name(), f.rank);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let data = o.out_dir.join("ckptd");
    let _ = std::fs::remove_dir_all(&data);
    let mut dopts = DaemonOptions::in_dir(find_ckptd()?, &data);
    dopts.extra_args.push("--fault-injection".into());
    let mut daemon = rt.block_on(LocalDaemon::start(dopts))?;
    let store_dir = data.join("store");

    let reference_blake3 = match &o.reference_blake3 {
        Some(h) => h.clone(),
        None => {
            println!("reference run (no faults) ...");
            let l = Launch {
                job: "chaos-reference".into(),
                server: daemon.url(),
                injections: vec![],
                hub: None,
                run_dir: o.out_dir.join("reference"),
                data_dir: data.clone(),
            };
            let mut child = launcher(o, &l)?;
            let handles = follow(&mut child, &o.out_dir.join("reference.log"), Arc::new(AtomicU64::new(0)))?;
            let status = child.wait()?;
            handles.into_iter().for_each(|h| drop(h.join()));
            if !status.success() {
                bail!(
                    "the fault-free reference run failed ({status}); see {}",
                    o.out_dir.join("reference.log").display()
                );
            }
            read_json(&l.run_dir.join("goodput.json"))?["final_weights_blake3"]
                .as_str()
                .context("reference goodput has no final weights")?
                .to_string()
        }
    };

    let ckptd_proxy = rt.block_on(Proxy::start(daemon.url().trim_start_matches("http://").to_string()))?;
    let hub_port = free_port()?;
    let hub_proxy = rt.block_on(Proxy::start(hub_port.clone()))?;
    let run_dir = o.out_dir.join("run");
    let job = "chaos".to_string();
    let injections: Vec<String> = schedule.iter().filter_map(inject_arg).collect();
    let l = Launch {
        job: job.clone(),
        server: ckptd_proxy.url(),
        injections,
        hub: Some((hub_port, hub_proxy.addr.to_string())),
        run_dir: run_dir.clone(),
        data_dir: data.clone(),
    };
    println!("chaos run: {} faults over {} steps, {} ranks ...", schedule.len(), o.steps, o.nproc);
    let progress = Arc::new(AtomicU64::new(0));
    let mut child = launcher(o, &l)?;
    let handles = follow(&mut child, &o.out_dir.join("launcher.log"), progress.clone())?;

    let mut fired: Vec<FiredFault> = Vec::new();
    let mut pending: Vec<PlannedFault> = schedule.iter().filter(|f| !f.fault.is_rank_fault()).cloned().collect();
    let mut damaged_chunks: BTreeSet<ckpt_core::ChunkHash> = BTreeSet::new();
    let mut samples = Samples::default();
    let mut active: Option<crate::inject::Active> = None;
    let mut last_poll = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(pid) = daemon.pid() {
            samples.ckptd_rss_bytes_max = samples.ckptd_rss_bytes_max.max(rss_bytes(pid));
            samples.ckptd_open_files_max = samples.ckptd_open_files_max.max(open_files(pid));
        }
        for pid in rank_pids(&run_dir, o.nproc) {
            samples.rank_rss_bytes_max = samples.rank_rss_bytes_max.max(rss_bytes(pid as u32));
        }
        if let Some(a) = &active {
            // A fault in progress ends when it has shown its effect (and run its course), or
            // gives up and says it had none.
            let now = Instant::now();
            let outcome = match &a.kind {
                crate::inject::ActiveKind::Link { hub, before } => {
                    let proxy = if *hub { &hub_proxy } else { &ckptd_proxy };
                    let c = proxy.counters();
                    let hit = c.delayed_reads > before.delayed_reads
                        || c.held_reads > before.held_reads
                        || c.bits_flipped > before.bits_flipped
                        || c.connections_reset > before.connections_reset;
                    if (hit && now >= a.until) || now >= a.give_up {
                        proxy.set(Mode::Pass);
                        Some(hit)
                    } else {
                        None
                    }
                }
                crate::inject::ActiveKind::Store { key, before } => {
                    if now.duration_since(last_poll) < Duration::from_millis(250) && now < a.give_up {
                        None
                    } else {
                        last_poll = now;
                        let n = rt.block_on(crate::inject::fired_count(&daemon.url(), key)).unwrap_or(0);
                        if n > *before {
                            Some(true)
                        } else if now >= a.give_up {
                            Some(false)
                        } else {
                            None
                        }
                    }
                }
                crate::inject::ActiveKind::Grace { pids } => {
                    if pids.iter().all(|&p| !signal(p, 0)) {
                        // Every rank reacted (emergency checkpoint and exit) within the grace.
                        Some(true)
                    } else if now >= a.until {
                        for &p in pids {
                            signal(p, libc::SIGKILL);
                        }
                        Some(true)
                    } else {
                        None
                    }
                }
            };
            if let Some(hit) = outcome {
                let f = &mut fired[a.index];
                if hit {
                    f.unix_ms = Some(a.started_unix_ms);
                } else {
                    f.what.push_str(" (no effect: nothing it could act on happened in time)");
                }
                active = None;
            }
        }
        let step = progress.load(Ordering::Relaxed);
        if let Some(i) = pending.iter().position(|f| f.step <= step) {
            // One external fault at a time: each runs its course before the next.
            if active.is_none() {
                let f = pending.remove(i);
                let started_unix_ms = now_ms();
                let done = rt.block_on(crate::inject::external(
                    o,
                    &f,
                    &mut daemon,
                    &job,
                    &store_dir,
                    &run_dir,
                    &ckptd_proxy,
                    &hub_proxy,
                    &mut damaged_chunks,
                ));
                let (what, unix_ms, kind) = match done {
                    Ok((w, None)) => (w, Some(started_unix_ms), None),
                    Ok((w, Some(kind))) => (w, None, Some(kind)),
                    Err(e) => (format!("not injected: {e:#}"), None, None),
                };
                println!("  fault at step {step}: {} {} -> {what}", f.component, f.fault.name());
                if let Some((kind, lasts)) = kind {
                    let until = Instant::now() + lasts;
                    let give_up = until + Duration::from_secs(30);
                    active = Some(crate::inject::Active { index: fired.len(), kind, until, give_up, started_unix_ms });
                }
                fired.push(FiredFault { planned: f, what, unix_ms });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    handles.into_iter().for_each(|h| drop(h.join()));
    if let Some(a) = active {
        match a.kind {
            crate::inject::ActiveKind::Grace { pids } if pids.iter().all(|&p| !signal(p, 0)) => {
                fired[a.index].unix_ms = Some(a.started_unix_ms)
            }
            _ => fired[a.index].what.push_str(" (the run ended before it took effect)"),
        }
    }
    hub_proxy.set(Mode::Pass);
    ckptd_proxy.set(Mode::Pass);
    samples.store_bytes = dir_bytes(&store_dir);
    samples.state_bytes = dir_bytes(&data.join("state"));

    let mut violations = Vec::new();
    if !exit.success() {
        violations.push(format!("the launcher failed ({exit}); see {}", o.out_dir.join("launcher.log").display()));
    }
    for f in &pending {
        fired.push(FiredFault { planned: f.clone(), what: "never reached: the run ended first".into(), unix_ms: None });
    }
    let events = read_events(&run_dir);
    // Trainer-side faults: the rank logs say when each fired.
    for f in schedule.iter().filter(|f| f.fault.is_rank_fault()) {
        let key = inject_arg(f).unwrap_or_default();
        let at = events.iter().find(|e| e["kind"] == "inject" && e["injection"] == key.as_str());
        fired.push(FiredFault {
            planned: f.clone(),
            what: format!(
                "--inject {key}{}",
                at.and_then(|e| e["note"].as_str()).map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            unix_ms: at.and_then(|e| e["unix_ms"].as_u64()),
        });
    }
    fired.sort_by_key(|f| (f.planned.step, f.unix_ms));
    for f in &fired {
        if f.unix_ms.is_none() {
            violations.push(format!(
                "fault {} at step {} never took effect: {}",
                f.planned.fault.name(),
                f.planned.step,
                f.what
            ));
        }
    }

    let goodput = read_json(&run_dir.join("goodput.json")).unwrap_or(serde_json::Value::Null);
    let client = Client::new(&daemon.url(), ClientOptions::default())?;
    let check = rt.block_on(crate::checks::check_store(&client, &job, &damaged_chunks, &events, &goodput, &fired));
    let (committed_steps, damaged_steps) = match check {
        Ok((c, d, v)) => {
            violations.extend(v);
            (c, d)
        }
        Err(e) => {
            violations.push(format!("could not check the store: {e:#}"));
            (vec![], vec![])
        }
    };
    match goodput["final_weights_blake3"].as_str() {
        Some(h) if h == reference_blake3 => {}
        Some(h) => violations.push(format!("final weights {h} differ from the fault-free run's {reference_blake3}")),
        None => violations.push("the run wrote no final weights".into()),
    }
    if samples.ckptd_rss_bytes_max > o.ckptd_rss_bytes_max {
        violations
            .push(format!("ckptd RSS reached {} bytes (limit {})", samples.ckptd_rss_bytes_max, o.ckptd_rss_bytes_max));
    }
    if samples.ckptd_open_files_max > o.ckptd_open_files_max {
        violations
            .push(format!("ckptd held {} open files (limit {})", samples.ckptd_open_files_max, o.ckptd_open_files_max));
    }
    let detections: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| matches!(e["kind"].as_str(), Some("sdc_detected" | "nonfinite" | "preempted" | "save_failed")))
        .cloned()
        .collect();
    let commits_unix_ms = events
        .iter()
        .filter(|e| e["kind"] == "committed" && e["rank"] == 0)
        .filter_map(|e| e["unix_ms"].as_u64())
        .collect();
    rt.block_on(daemon.terminate(Duration::from_secs(10)));
    let proxies =
        BTreeMap::from([("ckptd".to_string(), ckptd_proxy.counters()), ("hub".to_string(), hub_proxy.counters())]);
    Ok(RunResult {
        options: o.clone(),
        schedule,
        faults: fired,
        goodput,
        reference_blake3,
        committed_steps,
        damaged_steps,
        detections,
        samples,
        violations,
        started_unix_ms,
        wall_s: started.elapsed().as_secs_f64(),
        proxies,
        commits_unix_ms,
    })
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_slice(&b)?)
}

/// Every event line of every rank log in the run directory, in time order.
pub fn read_events(run_dir: &Path) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("events-rank") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
            }
        }
    }
    out.sort_by_key(|e| e["unix_ms"].as_u64().unwrap_or(0));
    out
}
