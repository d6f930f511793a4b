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

use crate::proxy::{Mode, Proxy};
use crate::schedule::{draw, PlannedFault, ScheduleConfig};
use crate::taxonomy::Fault;

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

/// Trainer-side faults: handed to the launcher as `--inject`.
pub fn is_rank_fault(f: Fault) -> bool {
    matches!(
        f,
        Fault::KillRank
            | Fault::KillRankMidSave
            | Fault::PanicRank
            | Fault::NanRank
            | Fault::FlipReplicaBit
            | Fault::HangRank
            | Fault::SlowRank
            | Fault::StopRankMidUpload
    )
}

/// The `--inject` argument for a trainer-side fault.
pub fn inject_arg(f: &PlannedFault) -> Option<String> {
    let (r, s) = (f.rank, f.step);
    Some(match f.fault {
        Fault::KillRank => format!("kill@{r}:{s}"),
        Fault::KillRankMidSave if f.variant % 2 == 0 => format!("kill-save@{r}:{s}"),
        Fault::KillRankMidSave => format!("kill-commit@{r}:{s}"),
        Fault::PanicRank => format!("panic@{r}:{s}"),
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
    pub proxies: BTreeMap<String, crate::proxy::ProxyCounters>,
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

fn rank_pids(run_dir: &Path, world: usize) -> Vec<i32> {
    (0..world)
        .filter_map(|r| std::fs::read_to_string(run_dir.join(format!("rank{r}.pid"))).ok()?.trim().parse().ok())
        .collect()
}

fn signal(pid: i32, sig: i32) -> bool {
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
async fn chunk_hashes(client: &Client, job: &str, step: u64) -> Result<Vec<ckpt_core::ChunkHash>> {
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
    let mut pending: Vec<PlannedFault> = schedule.iter().filter(|f| !is_rank_fault(f.fault)).cloned().collect();
    let mut damaged_chunks: BTreeSet<ckpt_core::ChunkHash> = BTreeSet::new();
    let mut samples = Samples::default();
    let mut restore_mode_at: Option<(Instant, &'static str)> = None;
    let mut sigkill_at: Option<(Instant, Vec<i32>)> = None;
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
        if let Some((at, which)) = restore_mode_at {
            if Instant::now() >= at {
                if which == "hub" {
                    hub_proxy.set(Mode::Pass)
                } else {
                    ckptd_proxy.set(Mode::Pass)
                }
                restore_mode_at = None;
            }
        }
        if let Some((at, pids)) = &sigkill_at {
            if Instant::now() >= *at {
                for &p in pids {
                    signal(p, libc::SIGKILL);
                }
                sigkill_at = None;
            }
        }
        let step = progress.load(Ordering::Relaxed);
        if let Some(i) = pending.iter().position(|f| f.step <= step) {
            // One external fault at a time: a network fault runs its course before the next.
            if restore_mode_at.is_none() && sigkill_at.is_none() {
                let f = pending.remove(i);
                let what = rt.block_on(external(
                    o,
                    &f,
                    &mut daemon,
                    &job,
                    &store_dir,
                    &run_dir,
                    &ckptd_proxy,
                    &hub_proxy,
                    &mut damaged_chunks,
                    &mut restore_mode_at,
                    &mut sigkill_at,
                ));
                let (what, unix_ms) = match what {
                    Ok(w) => (w, Some(now_ms())),
                    Err(e) => (format!("not injected: {e:#}"), None),
                };
                println!("  fault at step {step}: {} {} -> {what}", f.component, f.fault.name());
                fired.push(FiredFault { planned: f, what, unix_ms });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    handles.into_iter().for_each(|h| drop(h.join()));
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
    for f in schedule.iter().filter(|f| is_rank_fault(f.fault)) {
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
    let check = rt.block_on(check_store(&client, &job, &damaged_chunks, &events, &goodput, &fired));
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

#[allow(clippy::too_many_arguments)]
async fn external(
    o: &RunOptions,
    f: &PlannedFault,
    daemon: &mut LocalDaemon,
    job: &str,
    store_dir: &Path,
    run_dir: &Path,
    ckptd_proxy: &Proxy,
    hub_proxy: &Proxy,
    damaged: &mut BTreeSet<ckpt_core::ChunkHash>,
    restore_mode_at: &mut Option<(Instant, &'static str)>,
    sigkill_at: &mut Option<(Instant, Vec<i32>)>,
) -> Result<String> {
    let arm = |fault: serde_json::Value| {
        let url = format!("{}/v1/faults", daemon.url());
        async move {
            let r = reqwest::Client::new().post(url).json(&fault).send().await?;
            if !r.status().is_success() {
                bail!("arming {fault}: {}", r.status());
            }
            Ok::<_, anyhow::Error>(fault.to_string())
        }
    };
    match f.fault {
        Fault::KillCkptd => {
            daemon.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.restart().await?;
            ckptd_proxy.set_upstream(daemon.url().trim_start_matches("http://").to_string());
            Ok(format!("ckptd SIGKILLed and restarted on {}", daemon.url()))
        }
        Fault::StoreFault => match f.variant % 3 {
            0 => arm(serde_json::json!({"kind": "lost_ack", "op": "manifest"})).await,
            1 => arm(serde_json::json!({"kind": "error", "op": "any", "count": 3})).await,
            _ => {
                let opts = daemon.options_mut();
                opts.extra_args.retain(|a| a != "--fault-plan" && !a.to_string_lossy().starts_with('['));
                opts.extra_args.push("--fault-plan".into());
                opts.extra_args.push(r#"[{"kind":"stale_list","op":"list","count":1}]"#.into());
                daemon.restart().await?;
                ckptd_proxy.set_upstream(daemon.url().trim_start_matches("http://").to_string());
                Ok("ckptd restarted with its first listing stale".into())
            }
        },
        Fault::NetworkHub | Fault::NetworkCkptd => {
            let (proxy, which) = if f.fault == Fault::NetworkHub { (hub_proxy, "hub") } else { (ckptd_proxy, "ckptd") };
            let to_hub = which == "hub";
            let mode = match f.variant % 5 {
                0 => Mode::Latency { ms: 30 },
                1 => {
                    proxy.reset();
                    return Ok(format!("{which} link reset"));
                }
                2 => Mode::Blackhole,
                3 => Mode::BandwidthCap { bytes_per_s: 4 << 20 },
                _ => Mode::Corrupt { reads: 2, upstream: true, downstream: to_hub },
            };
            proxy.set(mode);
            *restore_mode_at = Some((Instant::now() + Duration::from_millis(o.network_fault_ms), which));
            Ok(format!("{which} link: {mode:?} for {} ms", o.network_fault_ms))
        }
        Fault::HostMaintenance => {
            let pids = rank_pids(run_dir, o.nproc);
            for &p in &pids {
                signal(p, libc::SIGTERM);
            }
            *sigkill_at = Some((Instant::now() + Duration::from_millis(o.grace_ms), pids.clone()));
            Ok(format!("SIGTERM to ranks {pids:?}, SIGKILL after {} ms", o.grace_ms))
        }
        Fault::FlipStoredBit | Fault::TruncateStoredChunk => {
            let client = Client::new(&daemon.url(), ClientOptions::default())?;
            let list = client.list(job).await?;
            let step = list.committed.last().map(|m| m.step).context("nothing committed yet")?;
            let hashes = chunk_hashes(&client, job, step).await?;
            let h = hashes[f.variant as usize % hashes.len()];
            let path = store_dir.join(ckpt_core::keys::chunk_key(job, &h));
            let mut bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let what = if f.fault == Fault::FlipStoredBit {
                let at = ckpt_core::CHUNK_HEADER_BYTES
                    + (f.variant as usize / 7) % (bytes.len() - ckpt_core::CHUNK_HEADER_BYTES);
                bytes[at] ^= 0x01;
                format!("flipped a bit at byte {at} of chunk {h} of {job}@{step}")
            } else {
                bytes.truncate(bytes.len() / 2);
                format!("truncated chunk {h} of {job}@{step} to {} bytes", bytes.len())
            };
            std::fs::write(&path, &bytes)?;
            damaged.insert(h);
            // A restore must now notice: stop the job so it has to restore.
            let pids = rank_pids(run_dir, o.nproc);
            if let Some(&p) = pids.get(f.rank.min(pids.len().saturating_sub(1))) {
                signal(p, libc::SIGKILL);
            }
            Ok(format!("{what}; rank {} killed to force a restore", f.rank))
        }
        _ => bail!("{:?} is injected inside the ranks", f.fault),
    }
}

/// The store-side checks. Returns (committed steps, steps damaged by the harness, violations).
async fn check_store(
    client: &Client,
    job: &str,
    damaged_chunks: &BTreeSet<ckpt_core::ChunkHash>,
    events: &[serde_json::Value],
    goodput: &serde_json::Value,
    fired: &[FiredFault],
) -> Result<(Vec<u64>, Vec<u64>, Vec<String>)> {
    let mut violations = Vec::new();
    let list = client.list(job).await?;
    let committed: Vec<u64> = list.committed.iter().map(|m| m.step).collect();
    let mut damaged = Vec::new();
    for &step in &committed {
        let report = client.verify(job, step, |_| {}).await?;
        let hashes = chunk_hashes(client, job, step).await?;
        let ours = hashes.iter().any(|h| damaged_chunks.contains(h));
        if ours {
            damaged.push(step);
            if report.ok() {
                violations.push(format!("{job}@{step} holds a chunk this harness damaged, yet it verifies"));
            }
        } else if !report.ok() {
            violations.push(format!(
                "{job}@{step} is committed but fails verification ({} bad chunks)",
                report.corrupt.len()
            ));
        }
    }
    // Every save a rank saw acknowledged as committed is still committed.
    let acked: BTreeSet<u64> =
        events.iter().filter(|e| e["kind"] == "committed").filter_map(|e| e["step"].as_u64()).collect();
    for s in &acked {
        if !committed.contains(s) {
            violations.push(format!("{job}@{s} was acknowledged as committed and is gone"));
        }
    }
    // Each interruption resumed from the newest checkpoint that was good when it was detected.
    let damage_times: Vec<(u64, u64)> = fired
        .iter()
        .filter(|f| matches!(f.planned.fault, Fault::FlipStoredBit | Fault::TruncateStoredChunk))
        .filter_map(|f| {
            Some((f.unix_ms?, f.what.split('@').nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?))
        })
        .collect();
    for i in goodput["interruptions"].as_array().into_iter().flatten() {
        let (Some(at), Some(resumed)) = (i["detected_unix_ms"].as_u64(), i["resumed_from"].as_u64()) else { continue };
        let newest_acked_good = events
            .iter()
            .filter(|e| e["kind"] == "committed" && e["unix_ms"].as_u64().is_some_and(|t| t < at))
            .filter_map(|e| e["step"].as_u64())
            .filter(|s| !damage_times.iter().any(|(t, d)| *t < at && d == s) && !damaged.contains(s))
            .max()
            .unwrap_or(0);
        if resumed < newest_acked_good {
            violations.push(format!(
                "the interruption at {at} ({}) resumed from step {resumed}, older than step {newest_acked_good}, committed and good before it",
                i["cause"]
            ));
        }
        let damaged_then = damage_times.iter().any(|(t, d)| *t < at && *d == resumed);
        if resumed > 0 && (!committed.contains(&resumed) || damaged_then) {
            violations.push(format!("an interruption resumed from step {resumed}, which is not a good commit"));
        }
    }
    Ok((committed, damaged, violations))
}
