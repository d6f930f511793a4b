//! `ckpt-chaos`: run the embedded trainer and ckptd under the Llama 3 fault taxonomy, or
//! simulate a job at cluster scale.

mod checks;
mod inject;
mod report;
mod run;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ckpt_chaos::schedule::{draw, ScheduleConfig};
use ckpt_chaos::simulate::{self, Scenario};
use ckpt_chaos::taxonomy;
use clap::{Args, Parser, Subcommand};
use run::{run, RunOptions};

#[derive(Parser)]
#[command(
    name = "ckpt-chaos",
    version,
    about = "Fault injection for ckpt: the Llama 3 interruption taxonomy, for real"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train under a seeded fault schedule, check that nothing was lost, write the report.
    Run(RunArgs),
    /// Print the schedule a seed gives, without running anything.
    Schedule(RunArgs),
    /// Simulate a job at cluster scale (the Llama 3 scenario by default).
    Simulate(SimArgs),
    /// The taxonomy: each row of Table 5 and what it is injected as.
    Taxonomy,
    /// Writes `report.html` again from a run's `report.json`.
    Report {
        /// The run's output directory.
        #[arg(long, default_value = "chaos-out")]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Seed of the fault schedule (the whole run is a function of it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rank processes.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Training steps.
    #[arg(long, default_value_t = 120)]
    steps: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 10)]
    ckpt_every: u64,
    /// Mean steps between faults (the Poisson process).
    #[arg(long, default_value_t = 10.0)]
    mean_steps_between: f64,
    /// At most this many faults (0: as many as the process draws).
    #[arg(long, default_value_t = 0)]
    faults_max: usize,
    /// Draw the first N faults from distinct rows of the table (short runs cover more rows).
    #[arg(long, default_value_t = 0)]
    stratify: usize,
    /// Always include a SIGKILL of ckptd and a network fault (the service's own fault classes).
    #[arg(long)]
    require_service_faults: bool,
    /// Directory for the report, logs and stores.
    #[arg(long, default_value = "chaos-out")]
    out: PathBuf,
    /// How long a collective waits for a rank before the group is torn down.
    #[arg(long, default_value_t = 4_000)]
    collective_timeout_ms: u64,
    /// Time a SIGTERMed rank gets before SIGKILL.
    #[arg(long, default_value_t = 8_000)]
    grace_ms: u64,
    /// How long a link fault lasts.
    #[arg(long, default_value_t = 2_000)]
    network_fault_ms: u64,
    /// ckptd's peak RSS allowed by the end checks.
    #[arg(long, default_value_t = 2 << 30)]
    ckptd_rss_bytes_max: u64,
    /// ckptd's open files allowed by the end checks.
    #[arg(long, default_value_t = 1024)]
    ckptd_open_files_max: u64,
    /// The fault-free run's final weights (blake3), to skip the reference run.
    #[arg(long)]
    reference_blake3: Option<String>,
    /// Sequences per step over all ranks.
    #[arg(long, default_value_t = 8)]
    global_batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
}

#[derive(Args, Clone)]
struct SimArgs {
    /// Simulated runs.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Seed of the fault schedule (the whole run is a function of it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `ckpt bench --json` output: the stall and restore this project measured.
    #[arg(long)]
    bench_json: Option<PathBuf>,
    /// Where to write the chart.
    #[arg(long, default_value = "simulation.html")]
    html: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replace the scenario's restart time (an assumption; see the sources) to see what it
    /// weighs.
    #[arg(long)]
    restart_s: Option<f64>,
    /// Replace the scenario's crash-detection time (an assumption).
    #[arg(long)]
    detect_crash_s: Option<f64>,
}

impl RunArgs {
    fn options(&self) -> Result<RunOptions> {
        if !(self.mean_steps_between.is_finite() && self.mean_steps_between >= 1.0) {
            bail!("--mean-steps-between must be a number of steps, at least 1");
        }
        if self.nproc == 0 || self.ckpt_every == 0 || self.steps < 10 {
            bail!("--nproc and --ckpt-every must be positive and --steps at least 10");
        }
        if self.faults_max > 10_000 || self.steps > 1_000_000 {
            bail!("at most 10,000 faults and 1,000,000 steps");
        }
        Ok(RunOptions {
            schedule: ScheduleConfig {
                seed: self.seed,
                last_step: self.steps.saturating_sub(5).max(2),
                mean_steps_between: self.mean_steps_between,
                faults_max: self.faults_max,
                stratify: self.stratify,
                require_ckptd_kill: self.require_service_faults,
                require_network: self.require_service_faults,
                world: self.nproc,
                ckpt_every: self.ckpt_every,
            },
            nproc: self.nproc,
            steps: self.steps,
            out_dir: self.out.clone(),
            collective_timeout_ms: self.collective_timeout_ms,
            grace_ms: self.grace_ms,
            network_fault_ms: self.network_fault_ms,
            ckptd_rss_bytes_max: self.ckptd_rss_bytes_max,
            ckptd_open_files_max: self.ckptd_open_files_max,
            reference_blake3: self.reference_blake3.clone(),
            global_batch: self.global_batch,
            seq_len: self.seq_len,
        })
    }
}

fn main() -> std::process::ExitCode {
    match main_inner() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main_inner() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Taxonomy => {
            println!("{:<32} {:<22} {:>6}  injected as", "component", "category", "count");
            for c in taxonomy::components() {
                let f: Vec<String> = taxonomy::faults_for(&c.name).iter().map(|f| f.name()).collect();
                println!("{:<32} {:<22} {:>6}  {}", c.name, c.category, c.interruptions, f.join(", "));
            }
            Ok(())
        }
        Cmd::Schedule(a) => {
            let o = a.options()?;
            println!("{}", serde_json::to_string_pretty(&draw(&o.schedule))?);
            Ok(())
        }
        Cmd::Run(a) => {
            let o = a.options()?;
            let result = run(&o)?;
            std::fs::write(o.out_dir.join("report.json"), serde_json::to_vec_pretty(&result)?)?;
            std::fs::write(o.out_dir.join("report.html"), report::html(&result)?)?;
            println!("\nfaults by category:");
            for (c, n) in report::by_category(&result) {
                println!("  {c:<24} {n}");
            }
            println!(
                "effective training time {:.1}%, {} interruptions, final weights {}",
                result.goodput["effective_training_time_pct"].as_f64().unwrap_or(0.0),
                result.goodput["interruptions"].as_array().map(Vec::len).unwrap_or(0),
                result.goodput["final_weights_blake3"].as_str().unwrap_or("-"),
            );
            println!("report: {}", o.out_dir.join("report.html").display());
            if !result.violations.is_empty() {
                for v in &result.violations {
                    eprintln!("VIOLATION: {v}");
                }
                bail!("{} violation(s)", result.violations.len());
            }
            println!("no violations");
            Ok(())
        }
        Cmd::Simulate(a) => simulate_cmd(&a),
        Cmd::Report { out } => {
            let p = out.join("report.json");
            let r: run::RunResult =
                serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
            std::fs::write(out.join("report.html"), report::html(&r)?)?;
            println!("report: {}", out.join("report.html").display());
            Ok(())
        }
    }
}

/// The median of a bench sample: a number, a list of numbers, or an object with a `median`.
fn median(v: &serde_json::Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    if let Some(m) = v.get("median").and_then(|m| m.as_f64()) {
        return Some(m);
    }
    let list = v.as_array().or_else(|| v.get("values").and_then(|x| x.as_array()))?;
    let mut xs: Vec<f64> = list.iter().filter_map(|x| x.as_f64()).collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied()
}

fn simulate_cmd(a: &SimArgs) -> Result<()> {
    let mut base = Scenario::llama3();
    if let Some(r) = a.restart_s {
        base.restart_s = r;
        base.sources.push(("restart (override)".into(), format!("{r} s from --restart-s")));
    }
    if let Some(d) = a.detect_crash_s {
        base.detect_crash_s = d;
        base.sources.push(("crash detection (override)".into(), format!("{d} s from --detect-crash-s")));
    }
    if a.runs == 0 || a.runs > 100_000 || !base.restart_s.is_finite() || base.restart_s < 0.0 {
        bail!("--runs must be within 1..=100000 and --restart-s a non-negative number");
    }
    let summary = simulate::simulate(&base, a.runs, a.seed);
    let mtbf = base.mtbf_s();
    println!("{}: {} GPUs, {} days, MTBF {:.0} s", base.name, base.gpus, base.days, mtbf);
    println!(
        "  Young interval {:.0} s, Daly {:.0} s",
        simulate::young(base.stall_s, mtbf),
        simulate::daly(base.stall_s, mtbf)
    );
    let grid = simulate::grid(20.0, 20_000.0, 31);
    let sweep = simulate::sweep(&base, &grid, a.runs.min(40), a.seed);
    let measured = match &a.bench_json {
        None => None,
        Some(p) => {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)?;
            let s = &v["samples"];
            let mib_per_rank = v["bench"]["mib_per_rank"].as_f64().context("bench json: bench.mib_per_rank")?;
            let stall_s = median(&s["stall_s"]).context("bench json: samples.stall_s")?;
            // A restarted rank reads from the store, not from its page cache: the cold figure.
            let restore = median(&s["cold_mibps"]).context("bench json: samples.cold_mibps")?;
            let ranks = v["bench"]["ranks"].as_f64().unwrap_or(1.0).max(1.0);
            // Every rank stalls at once for its own state, so a rank's rate is its own bytes over
            // the stall; the restore figure is every rank's reads together, shared among them.
            let stall_rate = mib_per_rank * 1048576.0 / stall_s.max(1e-9);
            let restore_rate = restore * 1048576.0 / ranks;
            Some(simulate::with_measured(&base, stall_rate, restore_rate, &p.display().to_string()))
        }
    };
    let m_summary = measured.as_ref().map(|m| simulate::simulate(m, a.runs, a.seed));
    let m_sweep = measured.as_ref().map(|m| simulate::sweep(m, &grid, a.runs.min(40), a.seed)).unwrap_or_default();
    println!(
        "{:<55} {:>9} {:>10} {:>11} {:>22}",
        "scenario", "stall s", "restore s", "interval s", "effective % (min-max)"
    );
    for s in std::iter::once(&summary).chain(m_summary.as_ref()) {
        println!(
            "{:<55} {:>9.2} {:>10.2} {:>11.0} {:>9.2} ({:.2}-{:.2})",
            s.scenario.name,
            s.scenario.stall_s,
            s.scenario.restore_s,
            s.scenario.interval_s,
            s.effective_pct_mean,
            s.effective_pct_min,
            s.effective_pct_max
        );
    }
    println!("sources:");
    for (k, v) in &base.sources {
        println!("  {k}: {v}");
    }
    std::fs::write(&a.html, report::simulation_html(&summary, m_summary.as_ref(), &sweep, &m_sweep)?)?;
    if let Some(j) = &a.json {
        let out =
            serde_json::json!({"llama3": summary, "measured": m_summary, "sweep": sweep, "sweep_measured": m_sweep});
        std::fs::write(j, serde_json::to_vec_pretty(&out)?)?;
    }
    println!("chart: {}", a.html.display());
    Ok(())
}
