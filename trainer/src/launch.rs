//! The elastic agent: starts the rank processes, watches them, and restarts the group from the
//! newest committed, verified checkpoint when one fails.
//!
//! Design note. The launcher owns the collective hub (one per generation, on one port) and a
//! child process per rank. A generation fails when a rank exits before the group's final
//! barrier, or when the hub reports a collective timeout (the watchdog) or a protocol error.
//! Then every rank of the generation is SIGKILLed (a stopped process dies too), saves left in
//! flight are aborted (a redone step starts its save afresh, possibly with another world size),
//! the newest committed checkpoint that verifies is chosen, and the next generation starts from
//! it. Up to `max_restarts` times; every interruption is logged with its cause, when it was
//! detected, the steps lost and the time to restart and restore.
//!
//! Injections (`--inject`) are handed to each generation; one that a rank has logged as fired
//! is not handed on, so each fault happens once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_client::{Client, ClientOptions, SavePhase};
use ckpt_trainer::collective::{spawn_hub, HubConfig, HubEvent, RunningHub};
use ckpt_trainer::config::ModelConfig;
use ckpt_trainer::data::heldout_windows;
use ckpt_trainer::model::Llama;
use ckpt_trainer::spec::{Injection, RunConfig, RunSpec};

use crate::report::{is_events_file, read_events, Averaged, Interruption, Report, StepTimes};

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub run: RunConfig,
    pub nproc: usize,
    pub max_restarts: u32,
    pub collective_timeout: Duration,
    pub idle_timeout: Duration,
    pub startup_timeout: Duration,
    pub injections: Vec<Injection>,
    pub threads_per_rank: usize,
    /// Average the committed checkpoints of the annealing phase into `<job>-avg`.
    pub average_anneal: bool,
    pub log_every: u64,
    /// Where the hub listens; default a free loopback port.
    pub hub_listen: Option<String>,
    /// What ranks dial for the hub (a fault proxy in front of it); default where it listens.
    pub hub_advertise: Option<String>,
}

impl LaunchOptions {
    /// Everything that can be refused before any process starts.
    pub fn validate(&self) -> Result<()> {
        self.run.recipe.validate(self.nproc).map_err(anyhow::Error::msg)?;
        self.run.model.validate().map_err(anyhow::Error::msg)?;
        if self.run.until_step == 0 || self.run.until_step > self.run.recipe.steps || self.run.ckpt_every == 0 {
            bail!("--until-step must be within 1..={} and --ckpt-every positive", self.run.recipe.steps);
        }
        if self.collective_timeout.is_zero() || self.idle_timeout.is_zero() || self.startup_timeout.is_zero() {
            bail!("timeouts must be positive");
        }
        if self.threads_per_rank == 0 || self.run.corpus_bytes < (self.run.recipe.seq_len + 2) * 4 {
            bail!("--threads-per-rank must be positive and the corpus several windows long");
        }
        // An injection that can never fire would let a fault test pass without its fault.
        for i in &self.injections {
            if i.rank >= self.nproc || i.step == 0 || i.step > self.run.until_step {
                bail!(
                    "--inject {}: rank {} and step {} must be within ranks 0..{} and steps 1..={}",
                    i.key(),
                    i.rank,
                    i.step,
                    self.nproc,
                    self.run.until_step
                );
            }
        }
        Ok(())
    }
}

struct Generation {
    children: Vec<Child>,
    hub: RunningHub,
    spawned: Instant,
}

/// What a launch did: trained (with its report), or found the job trained already.
pub enum Launched {
    Ran(Box<Report>),
    AlreadyTrained { step: u64 },
}

pub fn launch(opts: &LaunchOptions) -> Result<Launched> {
    let started = Instant::now();
    opts.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = Client::new(&opts.run.server, ClientOptions::default())?;
    rt.block_on(client.health()).with_context(|| format!("ckptd at {} is not answering", opts.run.server))?;
    // A finished job relaunched: nothing to train, and the previous run's files stay.
    // Verified once here and used by the first generation (a full verification of the newest
    // checkpoint is not cheap).
    let first_resume = choose_resume(&rt, &client, &opts.run.job)?;
    if let Some(s) = first_resume.filter(|s| *s >= opts.run.until_step) {
        return Ok(Launched::AlreadyTrained { step: s });
    }
    let mut first_resume = Some(first_resume);
    std::fs::create_dir_all(&opts.run.run_dir).with_context(|| format!("creating {}", opts.run.run_dir.display()))?;
    keep_previous_run(&opts.run.run_dir)?;
    let bind = opts.hub_listen.as_deref().unwrap_or("127.0.0.1:0");
    let listener = TcpListener::bind(bind).with_context(|| format!("binding the collective hub on {bind}"))?;
    let hub_addr = opts.hub_advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    let listener = Arc::new(listener);

    let mut fired: BTreeSet<String> = BTreeSet::new();
    let mut times = StepTimes::default();
    let mut interruptions: Vec<Interruption> = Vec::new();
    let mut losses: BTreeMap<u64, f32> = BTreeMap::new();
    let mut generation = 0u64;
    let mut last_detect: Option<(Instant, u64)> = None;
    let final_step;
    loop {
        let resume = match first_resume.take() {
            Some(r) => r,
            None => choose_resume(&rt, &client, &opts.run.job)?,
        };
        if generation == 0 {
            match resume {
                Some(s) => println!("{}: resuming from its checkpoint at step {s}", opts.run.job),
                None => println!("{}: no committed checkpoint; training from step 0", opts.run.job),
            }
        }
        let injections: Vec<Injection> =
            opts.injections.iter().filter(|i| !fired.contains(&i.key())).cloned().collect();
        let spec = RunSpec {
            run: opts.run.clone(),
            world: opts.nproc,
            generation,
            hub: hub_addr.clone(),
            resume_step: resume,
            rank_timeout_ms: (opts.collective_timeout * 3 + opts.idle_timeout + opts.startup_timeout).as_millis()
                as u64,
            injections,
        };
        // Ranks of earlier generations that were cut off rather than killed must not change this
        // one's checkpoints: ckptd refuses their opens and indexes from now on.
        rt.block_on(client.fence(&opts.run.job, generation)).context("fencing the job at this generation")?;
        let g = spawn_generation(opts, &spec, listener.clone())?;
        if let Some((detected, lost_from)) = last_detect.take() {
            if let Some(i) = interruptions.last_mut() {
                i.restart_ms = g.spawned.duration_since(detected).as_millis() as u64;
                i.resumed_from = resume.unwrap_or(0);
                i.steps_lost = lost_from.saturating_sub(resume.unwrap_or(0));
                let from = resume.map_or("the start (no committed checkpoint)".to_string(), |s| format!("step {s}"));
                let lost = if lost_from > i.resumed_from {
                    format!("steps {}..={} lost", i.resumed_from + 1, lost_from)
                } else {
                    "no step lost".to_string()
                };
                println!(
                    "restart: generation {generation} resumes from {from} after {} ({lost}, {} s after detection)",
                    i.cause,
                    i.restart_ms as f64 / 1e3
                );
            }
        }
        let outcome = watch(opts, g, generation, &mut times, &mut losses);
        match outcome {
            Outcome::Done { step } => {
                final_step = step;
                break;
            }
            Outcome::Failed { cause, detected, detection_ms, last_step } => {
                fired.extend(read_fired(&opts.run.run_dir));
                eprintln!("interruption in generation {generation}: {cause} (last step {last_step})");
                interruptions.push(Interruption {
                    generation,
                    cause: cause.clone(),
                    detected_at_s: detected.duration_since(started).as_secs_f64(),
                    detected_unix_ms: (std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        - detected.elapsed())
                    .as_millis() as u64,
                    detection_ms,
                    last_step,
                    resumed_from: 0,
                    steps_lost: 0,
                    restart_ms: 0,
                    restore_ms: None,
                });
                if interruptions.len() as u32 > opts.max_restarts {
                    bail!(
                        "giving up after {} interruptions (--max-restarts {})",
                        interruptions.len(),
                        opts.max_restarts
                    );
                }
                last_detect = Some((detected, last_step));
                generation += 1;
            }
        }
    }
    // An interruption's restore time is known once the generation after it is ready.
    for i in &mut interruptions {
        i.restore_ms = times.ready_ms(i.generation + 1);
    }

    let params = load_params(&rt, &client, &opts.run.job, final_step, &opts.run.model)?;
    let hash = blake3::hash(&params).to_hex().to_string();
    let trained = std::fs::read(opts.run.run_dir.join("final.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["weights_blake3"].as_str().map(String::from));
    if let Some(t) = &trained {
        if *t != hash {
            bail!(
                "the committed checkpoint {}@{final_step} hashes to {hash}, the trained weights to {t}",
                opts.run.job
            );
        }
    }
    let eval_loss = Some(eval_loss(opts, &params)?);
    let averaged = if opts.average_anneal { average(&rt, &client, opts, final_step)? } else { None };
    let wall = started.elapsed();
    let report = Report::build(opts, wall, &times, interruptions, losses, final_step, hash, eval_loss, averaged);
    Ok(Launched::Ran(Box::new(report)))
}

enum Outcome {
    Done { step: u64 },
    Failed { cause: String, detected: Instant, detection_ms: u64, last_step: u64 },
}

fn spawn_generation(opts: &LaunchOptions, spec: &RunSpec, listener: Arc<TcpListener>) -> Result<Generation> {
    let spec_path = opts.run.run_dir.join(format!("generation-{}.json", spec.generation));
    std::fs::write(&spec_path, serde_json::to_vec_pretty(spec)?)?;
    let cfg = HubConfig {
        world: spec.world,
        generation: spec.generation,
        collective_timeout: opts.collective_timeout,
        idle_timeout: opts.idle_timeout,
        startup_timeout: opts.startup_timeout,
        frame_elems_max: opts.run.model.param_count() + 1024,
    };
    let hub = spawn_hub(listener, cfg)?;
    let exe = std::env::current_exe().context("locating ckpt-train")?;
    let mut children = Vec::with_capacity(spec.world);
    for rank in 0..spec.world {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(opts.run.run_dir.join(format!("rank{rank}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--rank")
            .arg(rank.to_string())
            .env("RAYON_NUM_THREADS", opts.threads_per_rank.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child if
        // the launcher dies, so no rank outlives its agent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting rank {rank}"))?;
        // For operators and fault injection from outside: which process is rank r right now.
        std::fs::write(opts.run.run_dir.join(format!("rank{rank}.pid")), child.id().to_string())?;
        children.push(child);
    }
    Ok(Generation { children, hub, spawned: Instant::now() })
}

fn watch(
    opts: &LaunchOptions,
    mut g: Generation,
    generation: u64,
    times: &mut StepTimes,
    losses: &mut BTreeMap<u64, f32>,
) -> Outcome {
    let mut last_step = 0;
    let mut last_progress = g.spawned;
    let mut done_step = None;
    let failure = loop {
        let mut failure = None;
        match g.hub.events.recv_timeout(Duration::from_millis(20)) {
            Ok(HubEvent::Ready { step, at, .. }) => {
                times.ready(generation, step, at, g.spawned);
                if generation > 0 {
                    println!(
                        "generation {generation} ready at step {step}: spawned and restored in {:.1} s",
                        at.saturating_duration_since(g.spawned).as_secs_f64()
                    );
                }
                last_step = step;
                last_progress = at;
            }
            Ok(HubEvent::StepDone { step, loss, at, .. }) => {
                times.step_done(generation, step, at);
                losses.insert(step, loss);
                last_step = step;
                last_progress = at;
                if opts.log_every > 0 && (step % opts.log_every == 0 || step == 1) {
                    println!("step {step:>5}  loss {loss:.4}  lr {:.2e}", opts.run.recipe.lr(step));
                }
            }
            Ok(HubEvent::Done { step, .. }) => done_step = Some(step),
            Ok(HubEvent::Timeout { what, missing, waited, .. }) => {
                // The rings are read while the hung rank still exists (stopped or stuck).
                let rings: Vec<_> = (0..opts.nproc)
                    .map(|r| ckpt_trainer::flight::read(&ckpt_trainer::flight::path(&opts.run.run_dir, r), generation))
                    .collect();
                failure = Some((
                    format!(
                        "collective timeout: {what} waited {} ms for ranks {missing:?}; flight recorder: {}",
                        waited.as_millis(),
                        ckpt_trainer::flight::diagnose(&rings)
                    ),
                    waited.as_millis() as u64,
                ));
            }
            Ok(HubEvent::Failed { rank, reason, .. }) => {
                // A rank that died closes its connection before the launcher sees it exit; give
                // the exit a moment so the interruption is reported by its real cause.
                std::thread::sleep(Duration::from_millis(200));
                let exit = exited(&mut g.children, &opts.run.run_dir);
                let cause = match exit {
                    // The rank only saw its connection drop; the hub knows why (a damaged frame,
                    // a protocol error).
                    Some(e) if e.contains("collective") => format!("{e}; the hub failed rank {rank:?}: {reason}"),
                    Some(e) => e,
                    None => format!("collective failed on rank {rank:?}: {reason}"),
                };
                failure = Some((cause, last_progress.elapsed().as_millis() as u64));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if done_step.is_none() {
                    failure = Some(("the collective hub stopped".into(), 0));
                } else {
                    // The hub is done; only the ranks' exits are left to wait for.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        if failure.is_none() {
            let all_exited = g.children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))));
            if let Some(step) = done_step {
                if all_exited {
                    let bad = exited(&mut g.children, &opts.run.run_dir);
                    match bad {
                        None => {
                            let _ = g.hub.thread.join();
                            return Outcome::Done { step };
                        }
                        Some(cause) => failure = Some((cause, 0)),
                    }
                }
            } else if let Some(cause) = exited(&mut g.children, &opts.run.run_dir) {
                failure = Some((cause, last_progress.elapsed().as_millis() as u64));
            }
        }
        if let Some(f) = failure {
            break f;
        }
    };
    let detected = Instant::now();
    for c in &mut g.children {
        let _ = c.kill();
    }
    for c in &mut g.children {
        let _ = c.wait();
    }
    g.hub.stop.store(true, Ordering::Relaxed);
    let _ = g.hub.thread.join();
    Outcome::Failed { cause: failure.0, detected, detection_ms: failure.1, last_step }
}

/// The most telling failure among the ranks that have exited: a rank killed by a signal or
/// failing by itself outranks one that failed only because a collective broke under it.
fn exited(children: &mut [Child], run_dir: &Path) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let mut found: Vec<(u8, String)> = Vec::new();
    for (rank, c) in children.iter_mut().enumerate() {
        if let Ok(Some(status)) = c.try_wait() {
            if status.success() {
                continue;
            }
            found.push(match status.signal() {
                Some(sig) => (0, format!("rank {rank} killed by signal {sig} ({})", signal_name(sig))),
                None => match last_error(run_dir, rank) {
                    Some(e) if e.contains("collective") => (2, format!("rank {rank} exited with {status}: {e}")),
                    Some(e) => (1, format!("rank {rank} exited with {status}: {e}")),
                    None => (1, format!("rank {rank} exited with {status}")),
                },
            });
        }
    }
    found.into_iter().min_by_key(|f| f.0).map(|f| f.1)
}

/// The error a rank's log ends with, if any (its `Error:` line or its panic message).
fn last_error(run_dir: &Path, rank: usize) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join(format!("rank{rank}.log"))).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(200)..];
    let at = tail.iter().rposition(|l| l.starts_with("Error:") || l.contains("panicked at"))?;
    let line = tail[at];
    Some(if line.starts_with("Error:") {
        // anyhow prints the context first and the cause under "Caused by:".
        let cause = tail[at..].iter().skip_while(|l| !l.starts_with("Caused by:")).nth(1).map(|c| c.trim());
        match cause {
            Some(c) => format!("{} ({})", line.trim_start_matches("Error:").trim(), c.trim_start_matches("0: ")),
            None => line.trim_start_matches("Error:").trim().to_string(),
        }
    } else {
        format!("panic: {}", tail.get(at + 1).map_or("", |l| l.trim()))
    })
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Injections that ranks logged as fired, across every generation so far.
fn read_fired(run_dir: &Path) -> BTreeSet<String> {
    read_events(run_dir)
        .iter()
        .filter(|v| v["kind"] == "inject")
        .filter_map(|v| v["injection"].as_str().map(String::from))
        .collect()
}

/// Aborts saves left in flight, then returns the newest committed step that verifies.
fn choose_resume(rt: &tokio::runtime::Runtime, client: &Client, job: &str) -> Result<Option<u64>> {
    rt.block_on(async {
        let list = client.list(job).await?;
        for s in list.in_flight.iter().filter(|s| !matches!(s.phase, SavePhase::Aborted | SavePhase::Committed)) {
            if let Err(e) = client.abort(job, s.step).await {
                tracing::warn!(step = s.step, error = %e, "could not abort a save left in flight");
            }
        }
        let list = client.list(job).await?;
        for m in list.committed.iter().rev() {
            let report = client.verify(job, m.step, |_| {}).await?;
            if report.ok() {
                return Ok(Some(m.step));
            }
            eprintln!(
                "{job}@{} fails verification ({} bad chunks); trying the one before",
                m.step,
                report.corrupt.len()
            );
        }
        Ok(None)
    })
}

/// The global parameter vector of a committed checkpoint (little-endian f32 bytes), verified.
fn load_params(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    job: &str,
    step: u64,
    model: &ModelConfig,
) -> Result<Vec<u8>> {
    rt.block_on(async {
        let cp = client.checkpoint(job, step).await?;
        let (bytes, _) = client.load_rows(&cp, "params", 0, model.param_count()).await?;
        Ok(bytes)
    })
}

/// Mean loss of `params` on held-out windows.
fn eval_loss(opts: &LaunchOptions, params: &[u8]) -> Result<f32> {
    let model = Llama::new(&opts.run.model, &ckpt_trainer::f32s_from_le(params), &candle_core::Device::Cpu)?;
    let windows = heldout_windows(opts.run.seed, opts.run.recipe.seq_len, 32);
    Ok(model.loss(&windows)?.to_scalar::<f32>()?)
}

fn average(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    opts: &LaunchOptions,
    final_step: u64,
) -> Result<Option<Averaged>> {
    let from = opts.run.recipe.anneal_start();
    let steps: Vec<u64> = rt
        .block_on(client.list(&opts.run.job))?
        .committed
        .iter()
        .map(|m| m.step)
        .filter(|&s| s >= from && s <= final_step)
        .collect();
    if steps.len() < 2 {
        eprintln!("fewer than two committed checkpoints in the annealing phase; nothing to average");
        return Ok(None);
    }
    let out_job = format!("{}-avg", opts.run.job);
    let step = rt.block_on(client.average_checkpoints(&opts.run.job, &steps, &["params"], &out_job))?;
    let params = load_params(rt, client, &out_job, step, &opts.run.model)?;
    Ok(Some(Averaged {
        job: out_job,
        steps,
        weights_blake3: blake3::hash(&params).to_hex().to_string(),
        eval_loss: eval_loss(opts, &params)?,
    }))
}

/// Removes what an earlier launch left in the run directory, so its events are not counted.
/// Moves the previous launch's files (event logs, rank logs, report) into
/// `previous/<its report's time>/`, so each launch's report describes that launch alone and
/// none is overwritten.
fn keep_previous_run(dir: &Path) -> Result<()> {
    let ours = |name: &str| {
        is_events_file(name)
            || name.starts_with("generation-")
            || name == "final.json"
            || name == "goodput.json"
            || (name.starts_with("rank") && name.ends_with(".log"))
            || name.starts_with("flight-")
    };
    let files: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| ours(&e.file_name().to_string_lossy()) && e.path().is_file())
        .collect();
    if files.is_empty() {
        return Ok(());
    }
    let stamp = std::fs::metadata(dir.join("goodput.json"))
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now())
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // A second launch within the same second gets its own folder.
    let keep = (0..)
        .map(|n| dir.join("previous").join(if n == 0 { stamp.to_string() } else { format!("{stamp}-{n}") }))
        .find(|p| !p.exists())
        .unwrap_or_else(|| dir.join("previous").join(stamp.to_string()));
    std::fs::create_dir_all(&keep).with_context(|| format!("creating {}", keep.display()))?;
    for e in files {
        std::fs::rename(e.path(), keep.join(e.file_name()))
            .with_context(|| format!("moving {} into {}", e.path().display(), keep.display()))?;
    }
    Ok(())
}
