//! Goodput: what the run cost and what it kept, printed as a table and written as JSON.
//!
//! Productive time is the time spent on steps that the final weights descend from: for every
//! step, the duration of its last execution (from the previous step's completion, or from the
//! group being ready, in the same generation). Steps executed and then rolled back, restarts,
//! restores, start-up and the final commit are all unproductive. Effective training time is
//! productive time over wall time, as in the Llama 3 paper.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::launch::LaunchOptions;

#[derive(Debug, Default)]
pub struct StepTimes {
    /// generation → (step restored at, when ready, when spawned)
    ready: BTreeMap<u64, (u64, Instant, Instant)>,
    /// (generation, step, when the step's loss all-reduce completed), in arrival order
    done: Vec<(u64, u64, Instant)>,
}

impl StepTimes {
    pub fn ready(&mut self, generation: u64, step: u64, at: Instant, spawned: Instant) {
        self.ready.insert(generation, (step, at, spawned));
    }

    pub fn step_done(&mut self, generation: u64, step: u64, at: Instant) {
        self.done.push((generation, step, at));
    }

    /// Time from spawning generation `g` to its ranks being ready (restore included).
    pub fn ready_ms(&self, g: u64) -> Option<u64> {
        self.ready.get(&g).map(|(_, at, spawned)| at.duration_since(*spawned).as_millis() as u64)
    }

    /// The duration of the last execution of every step.
    pub fn kept(&self) -> BTreeMap<u64, Duration> {
        let mut kept = BTreeMap::new();
        let mut prev: Option<(u64, Instant)> = None;
        for &(g, step, at) in &self.done {
            let from = match prev {
                Some((pg, t)) if pg == g => t,
                _ => self.ready.get(&g).map_or(at, |r| r.1),
            };
            kept.insert(step, at.duration_since(from));
            prev = Some((g, at));
        }
        kept
    }

    pub fn executed(&self) -> usize {
        self.done.len()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Interruption {
    pub generation: u64,
    pub cause: String,
    /// Seconds since launch when the launcher detected it.
    pub detected_at_s: f64,
    /// The same instant as a Unix time in milliseconds (to line up with other logs).
    #[serde(default)]
    pub detected_unix_ms: u64,
    /// For a hang, how long the collective waited; otherwise the time since the group's last
    /// progress.
    pub detection_ms: u64,
    /// The last step the group completed before the failure.
    pub last_step: u64,
    pub resumed_from: u64,
    pub steps_lost: u64,
    /// Detection to the next generation's processes starting (teardown, aborts, verification).
    pub restart_ms: u64,
    /// Next generation's start to all its ranks having restored their state.
    pub restore_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stalls {
    pub checkpoints: usize,
    pub stall_ms_mean: f64,
    pub stall_ms_max: f64,
    /// Time a save waited for the previous one to release the staging buffer.
    pub waited_ms_max: f64,
    /// Every wait a rank had for a checkpoint: the previous save's commit, the staging buffer,
    /// and the copy; mean and max over rank saves.
    pub wait_ms_mean: f64,
    pub wait_ms_max: f64,
    /// Mean total wait over the copy floor.
    pub wait_over_memcpy: f64,
    /// Mean step time with background save work in flight, and without.
    pub step_ms_in_flight: Option<f64>,
    pub step_ms_idle: Option<f64>,
    /// The largest peak RSS of a rank process (from the ranks that finished).
    pub rank_peak_rss_bytes: Option<u64>,
    pub step_ms_mean: f64,
    /// Mean stall as a share of a mean training step.
    pub stall_pct_of_step: f64,
    /// A plain copy of the same bytes (the physical floor), best of three, mean over ranks.
    pub memcpy_ms: f64,
    /// Mean stall over that floor.
    pub stall_over_memcpy: f64,
    pub state_bytes_per_rank: u64,
    /// (step, longest stall over the ranks in ms) for every checkpoint taken, in step order; a
    /// step saved again after a rollback shows its last save.
    pub per_checkpoint: Vec<(u64, f64)>,
}

/// The annealing phase's checkpoints averaged into one (the Llama 3 recipe).
#[derive(Debug, Clone, Serialize)]
pub struct Averaged {
    pub job: String,
    pub steps: Vec<u64>,
    pub weights_blake3: String,
    pub eval_loss: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub job: String,
    pub model: String,
    pub params: u64,
    pub world: usize,
    pub final_step: u64,
    pub steps_executed: usize,
    pub wall_s: f64,
    pub productive_s: f64,
    pub effective_training_time_pct: f64,
    pub interruptions: Vec<Interruption>,
    pub stalls: Stalls,
    pub loss_first: Option<f32>,
    pub loss_last: Option<f32>,
    /// (step, mean loss over ranks) of every step the final weights descend from.
    pub losses: Vec<(u64, f32)>,
    pub final_weights_blake3: String,
    /// Loss of the final weights on held-out windows.
    pub eval_loss: Option<f32>,
    pub averaged: Option<Averaged>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        opts: &LaunchOptions,
        wall: Duration,
        times: &StepTimes,
        interruptions: Vec<Interruption>,
        losses: BTreeMap<u64, f32>,
        final_step: u64,
        final_weights_blake3: String,
        eval_loss: Option<f32>,
        averaged: Option<Averaged>,
    ) -> Report {
        let kept = times.kept();
        let productive: Duration = kept.values().sum();
        let wall_s = wall.as_secs_f64();
        let stalls = read_stalls(&opts.run.run_dir, opts.run.model.param_count(), opts.nproc);
        let losses: Vec<(u64, f32)> = losses.into_iter().collect();
        Report {
            job: opts.run.job.clone(),
            model: opts.run.model.name.clone(),
            params: opts.run.model.param_count(),
            world: opts.nproc,
            final_step,
            steps_executed: times.executed(),
            wall_s,
            productive_s: productive.as_secs_f64(),
            effective_training_time_pct: 100.0 * productive.as_secs_f64() / wall_s.max(1e-9),
            interruptions,
            stalls,
            loss_first: losses.first().map(|l| l.1),
            loss_last: losses.last().map(|l| l.1),
            losses,
            final_weights_blake3,
            eval_loss,
            averaged,
        }
    }

    pub fn print(&self) {
        println!();
        println!("goodput — {} ({} model, {} parameters, {} ranks)", self.job, self.model, self.params, self.world);
        println!("  steps                      {} kept, {} executed", self.final_step, self.steps_executed);
        println!("  wall time                  {:.1} s", self.wall_s);
        println!("  productive time            {:.1} s", self.productive_s);
        println!("  effective training time    {:.1} %", self.effective_training_time_pct);
        if let (Some(a), Some(b)) = (self.loss_first, self.loss_last) {
            println!("  loss                       {a:.3} → {b:.3}");
        }
        let s = &self.stalls;
        println!(
            "  checkpoints                {} rank saves of {} KiB; stall mean {:.2} ms, max {:.2} ms",
            s.checkpoints,
            s.state_bytes_per_rank / 1024,
            s.stall_ms_mean,
            s.stall_ms_max,
        );
        println!(
            "  stall vs memcpy, vs a step {:.2}× a {:.2} ms copy of the same bytes; {:.2} % of a {:.0} ms step",
            s.stall_over_memcpy, s.memcpy_ms, s.stall_pct_of_step, s.step_ms_mean
        );
        println!(
            "  trainer wait per checkpoint mean {:.2} ms, max {:.2} ms ({:.2}× the copy): previous save, buffer and copy",
            s.wait_ms_mean, s.wait_ms_max, s.wait_over_memcpy
        );
        if let (Some(b), Some(i)) = (s.step_ms_in_flight, s.step_ms_idle) {
            println!(
                "  step time                  {b:.1} ms with a save in flight, {i:.1} ms without ({:+.1} %)",
                100.0 * (b / i - 1.0)
            );
        }
        if let Some(r) = s.rank_peak_rss_bytes {
            println!("  rank peak RSS              {} MiB (largest rank process)", r >> 20);
        }
        println!("  interruptions              {}", self.interruptions.len());
        for i in &self.interruptions {
            println!(
                "    gen {}: {}; detected after {} ms; lost {} steps ({} → {}); restart {} ms, restore {}",
                i.generation,
                i.cause,
                i.detection_ms,
                i.steps_lost,
                i.last_step,
                i.resumed_from,
                i.restart_ms,
                i.restore_ms.map_or("-".into(), |m| format!("{m} ms"))
            );
        }
        println!("  final weights blake3       {}", self.final_weights_blake3);
        if let Some(l) = self.eval_loss {
            println!("  held-out loss, final       {l:.3}");
        }
        if let Some(a) = &self.averaged {
            println!("  held-out loss, averaged    {:.3} (steps {:?} averaged into {})", a.eval_loss, a.steps, a.job);
        }
    }
}

const EVENTS_PREFIX: &str = "events-rank";

/// Where rank `rank` logs its events.
pub fn events_path(run_dir: &Path, rank: usize) -> std::path::PathBuf {
    run_dir.join(format!("{EVENTS_PREFIX}{rank}.jsonl"))
}

pub fn is_events_file(name: &str) -> bool {
    name.starts_with(EVENTS_PREFIX)
}

/// Every event every rank logged in `run_dir`, across generations; unreadable lines are skipped.
pub fn read_events(run_dir: &Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(run_dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        if !is_events_file(&e.file_name().to_string_lossy()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        out.extend(text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()));
    }
    out
}

fn read_stalls(run_dir: &Path, params: u64, world: usize) -> Stalls {
    let mut stalls = Vec::new();
    let mut waited: f64 = 0.0;
    let mut floors = Vec::new();
    let mut per_save: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    let mut steps = Vec::new();
    let (mut busy, mut idle, mut waits) = (Vec::new(), Vec::new(), Vec::new());
    let mut rss: Option<u64> = None;
    for v in read_events(run_dir) {
        if let Some(ms) = v["step_ms"].as_f64() {
            steps.push(ms);
            match v["in_flight"].as_bool() {
                Some(true) => busy.push(ms),
                Some(false) => idle.push(ms),
                None => {}
            }
        }
        if let Some(b) = v["peak_rss_bytes"].as_u64() {
            rss = Some(rss.unwrap_or(0).max(b));
        }
        if let Some(ms) = v["wait_ms"].as_f64() {
            waits.push(ms);
        }
        if v["kind"] == "save" {
            let ms = v["stall_ms"].as_f64().unwrap_or(0.0);
            let key = (v["step"].as_u64().unwrap_or(0), v["generation"].as_u64().unwrap_or(0));
            let e = per_save.entry(key).or_insert(0.0f64);
            *e = e.max(ms);
            stalls.push(ms);
            floors.extend(v["memcpy_ms"].as_f64());
            waited = waited.max(v["waited_ms"].as_f64().unwrap_or(0.0));
        }
    }
    let mean = |xs: &[f64]| if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 };
    let step_ms_mean = mean(&steps);
    let stall_ms_mean = mean(&stalls);
    let memcpy_ms = mean(&floors);
    let wait_ms_mean = mean(&waits);
    Stalls {
        wait_ms_mean,
        wait_ms_max: waits.iter().copied().fold(0.0, f64::max),
        wait_over_memcpy: if memcpy_ms > 0.0 { wait_ms_mean / memcpy_ms } else { 0.0 },
        step_ms_in_flight: (!busy.is_empty()).then(|| mean(&busy)),
        step_ms_idle: (!idle.is_empty()).then(|| mean(&idle)),
        rank_peak_rss_bytes: rss,
        checkpoints: stalls.len(),
        stall_ms_mean,
        stall_ms_max: stalls.iter().copied().fold(0.0, f64::max),
        waited_ms_max: waited,
        step_ms_mean,
        stall_pct_of_step: if step_ms_mean > 0.0 { 100.0 * stall_ms_mean / step_ms_mean } else { 0.0 },
        memcpy_ms,
        stall_over_memcpy: if memcpy_ms > 0.0 { stall_ms_mean / memcpy_ms } else { 0.0 },
        state_bytes_per_rank: ckpt_trainer::config::state_bytes_per_rank(params, world as u64),
        // Keyed by (step, generation), so the last generation's save of a step wins.
        per_checkpoint: per_save
            .into_iter()
            .map(|((step, _), ms)| (step, ms))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    }
}
