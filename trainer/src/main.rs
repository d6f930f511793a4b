//! `ckpt-train`: the embedded trainer's launcher (elastic agent), its rank processes, and the
//! demo.

mod launch;
mod metrics;
mod report;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_trainer::config::{state_bytes_per_rank, ModelConfig, Recipe};
use ckpt_trainer::spec::{Injection, RunConfig};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ckpt-train",
    version,
    about = "Train a small Llama 3 model on several ranks, checkpointing through ckptd"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start N rank processes and keep them training through failures.
    Launch(Box<LaunchArgs>),
    /// ckptd on a local directory, a two-rank run that loses a rank and a hang, and its goodput.
    Demo {
        /// Where the demo's ckptd keeps its store.
        #[arg(long, default_value = "ckpt-data")]
        data_dir: PathBuf,
        /// Training steps.
        #[arg(long, default_value_t = 240)]
        steps: u64,
        /// Rank processes (the world size).
        #[arg(long, default_value_t = 2)]
        nproc: usize,
        /// Also write the goodput report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Bytes of checkpoint state per rank for the named model shapes.
    Sizes {
        /// The world size to size for.
        #[arg(long, default_value_t = 16_384)]
        world: u64,
    },
    /// One rank (started by `launch`).
    #[command(hide = true)]
    Worker {
        /// The run specification the launcher wrote (JSON).
        #[arg(long)]
        spec: PathBuf,
        /// This process's rank.
        #[arg(long)]
        rank: usize,
    },
}

#[derive(Args, Clone)]
struct LaunchArgs {
    /// Rank processes (the world size).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// The job name checkpoints are saved under.
    #[arg(long, default_value = "llama-tiny")]
    job: String,
    /// ckptd's URL; without it a ckptd is started on `--data-dir`.
    #[arg(long)]
    server: Option<String>,
    /// Where a ckptd started here keeps its store and state (without --server).
    #[arg(long, default_value = "ckpt-data")]
    data_dir: PathBuf,
    /// Seed of the model's initialisation and of the data sampler.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// tiny (trained here); 8b, 70b, 405b describe sizes only.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Length of the schedule.
    #[arg(long, default_value_t = 240)]
    steps: u64,
    /// Stop after this step (with a checkpoint), as if preempted; default: the whole schedule.
    #[arg(long)]
    until_step: Option<u64>,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 20)]
    ckpt_every: u64,
    /// Interruptions survived before the launcher gives up.
    #[arg(long, default_value_t = 5)]
    max_restarts: u32,
    /// The watchdog: a collective waiting longer than this for a rank fails the group.
    #[arg(long, default_value_t = 10_000)]
    collective_timeout_ms: u64,
    /// How long the whole group may go without starting a collective (every rank stuck).
    #[arg(long, default_value_t = 120_000)]
    idle_timeout_ms: u64,
    /// How long ranks have to join the group (start-up and restore included).
    #[arg(long, default_value_t = 120_000)]
    startup_timeout_ms: u64,
    /// Where rank logs, events and the goodput report go; default `ckpt-runs/<job>`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Bytes of generated training text.
    #[arg(long, default_value_t = 2_000_000)]
    corpus_bytes: usize,
    /// Fault to inject, once: KIND@RANK:STEP with KIND kill, kill-save, kill-commit, stop-save,
    /// hang, panic, nan or sdc; or slow@RANK:STEP:MS, abort@RANK:STEP:MS. Repeatable.
    #[arg(long = "inject")]
    injections: Vec<Injection>,
    /// Compute threads per rank; default: the machine's cores shared among the ranks.
    #[arg(long)]
    threads_per_rank: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Steps at the end over which the learning rate falls linearly to zero.
    #[arg(long, default_value_t = 40)]
    anneal: u64,
    /// Sequences per step over all ranks.
    #[arg(long, default_value_t = 12)]
    global_batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Average the annealing phase's checkpoints into `<job>-avg`.
    #[arg(long)]
    average: bool,
    /// Print the loss every this many steps (0: never).
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Also write the goodput report here (it is always written to the run directory).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Send every checkpoint byte over HTTP, as to a remote ckptd (no node-local path).
    #[arg(long)]
    no_node_local: bool,
    /// Freeze the token embeddings (never updated): their chunks stay unchanged between
    /// checkpoints and are neither copied nor hashed again.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Checkpoint chunk size in KiB (the unit of change detection and dedup).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(4..=65536))]
    chunk_kib: u64,
    /// How a save finds unchanged chunks: per-chunk fingerprints of the state (what a GPU
    /// trainer computes on device), or a byte compare with the staging buffer.
    #[arg(long, default_value = "fingerprint", value_parser = ["fingerprint", "compare"])]
    change_detection: String,
    /// Which backend carries the collectives: the CPU hub (the reference), or NCCL on one GPU per
    /// rank (built with `--features nccl`; the hub still carries control and step records).
    #[arg(long, default_value = "hub", value_parser = ["hub", "nccl"])]
    collective: String,
    /// Where the collective hub listens (default: a free loopback port).
    #[arg(long)]
    hub_listen: Option<String>,
    /// The address ranks dial for the hub, when it differs from where it listens (a proxy).
    #[arg(long)]
    hub_advertise: Option<String>,
}

/// The backend `name` names, refused here, before any rank starts, when this build or this
/// machine cannot give it to `ranks` ranks.
fn collective_backend(name: &str, ranks: usize) -> Result<ckpt_trainer::spec::CollectiveBackend> {
    use ckpt_trainer::spec::CollectiveBackend;
    if name != "nccl" {
        return Ok(CollectiveBackend::Hub);
    }
    #[cfg(feature = "nccl")]
    {
        ckpt_trainer::nccl::check(ranks).map_err(|e| anyhow::anyhow!("--collective nccl: {e}"))?;
        Ok(CollectiveBackend::Nccl)
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = ranks;
        bail!("--collective nccl: this ckpt-train was built without the `nccl` feature (cargo build --features nccl)")
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace (RUST_BACKTRACE is for bugs, not for a user's mistake).
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Metrics like ckptd's (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; Prometheus text in
    // the run directory at exit); spans over OTLP too.
    let telemetry = ckpt_telemetry::Telemetry::init("ckpt-train")?;
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
        // Rank logs are files: no colour codes in them.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none());
        let otel = telemetry.otlp_endpoint().is_some().then(|| telemetry.tracing_layer("ckpt-train"));
        tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    }
    let result = match Cli::parse().cmd {
        Cmd::Worker { spec, rank } => {
            let spec = worker::spec_from_file(&spec)?;
            // Every line of the rank's log carries its rank and generation (and a timestamp).
            let span = tracing::warn_span!("rank", rank, generation = spec.generation).entered();
            let ran = worker::run(&spec, rank);
            metrics::write_prom(&telemetry, &spec.run.run_dir, &format!("rank{rank}"));
            match ran {
                Err(e) => {
                    // Timestamped, with the rank and generation (the span); then the form the
                    // launcher reads for the interruption's cause, without a backtrace.
                    tracing::error!("{e:#}");
                    drop(span);
                    eprintln!("Error: rank {rank}");
                    eprintln!("\nCaused by:");
                    for (i, c) in e.chain().enumerate() {
                        eprintln!("    {i}: {c}");
                    }
                    std::process::exit(1);
                }
                ok => ok,
            }
        }
        Cmd::Launch(args) => run_launch(&args).map(|ran| {
            if let Some((report, run_dir)) = ran {
                metrics::record_report(&report);
                metrics::write_prom(&telemetry, &run_dir, "launcher");
                report.print();
            }
        }),
        Cmd::Demo { data_dir, steps, nproc, json } => {
            let job = format!(
                "demo-{}",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            );
            let job_shown = job.clone();
            let inject = vec![
                format!("kill@{}:{}", nproc - 1, steps * 2 / 5 + 3).parse().map_err(anyhow::Error::msg)?,
                format!("hang@0:{}", steps * 7 / 10 + 3).parse().map_err(anyhow::Error::msg)?,
            ];
            let args = LaunchArgs {
                nproc,
                job,
                server: None,
                data_dir,
                seed: 1,
                model: "tiny".into(),
                steps,
                until_step: None,
                ckpt_every: 20,
                max_restarts: 3,
                collective_timeout_ms: 3_000,
                idle_timeout_ms: 120_000,
                startup_timeout_ms: 120_000,
                run_dir: None,
                corpus_bytes: 2_000_000,
                injections: inject,
                threads_per_rank: None,
                lr: 3e-3,
                warmup: 20,
                anneal: 40,
                global_batch: 12,
                seq_len: 64,
                average: true,
                log_every: 20,
                json,
                no_node_local: false,
                freeze_embeddings: false,
                chunk_kib: 4096,
                change_detection: "fingerprint".into(),
                collective: "hub".into(),
                hub_listen: None,
                hub_advertise: None,
            };
            println!(
                "demo: job {job_shown}: {} ranks train a {}-parameter Llama for {steps} steps, checkpointing every 20 through ckptd;",
                nproc,
                ModelConfig::tiny().param_count()
            );
            println!(
                "      rank {} is SIGKILLed and later rank 0 hangs (SIGSTOP); the launcher rolls back each time.",
                nproc - 1
            );
            if let Some((report, run_dir)) = run_launch(&args)? {
                metrics::record_report(&report);
                metrics::write_prom(&telemetry, &run_dir, "launcher");
                report.print();
            }
            Ok(())
        }
        Cmd::Sizes { world } => {
            println!("{:<6} {:>16} {:>8} {:>22} {:>12}", "model", "parameters", "ranks", "checkpoint bytes/rank", "");
            for m in ["tiny", "8b", "70b", "405b"] {
                let c = ModelConfig::named(m).context("unknown model")?;
                let p = c.param_count();
                let b = state_bytes_per_rank(p, world);
                let human = format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
                println!("{:<6} {:>16} {:>8} {:>22} {:>12}", m, p, world, b, human);
            }
            println!(
                "(a rank's share of what a checkpoint holds under ZeRO: fp32 parameters and both AdamW \
                 moments, 12 bytes a parameter, split over the ranks; activations and gradients are not saved)"
            );
            Ok(())
        }
    };
    telemetry.shutdown();
    result
}

/// Runs the launcher; returns the report and the run directory, or None when the job was
/// trained already (said on stdout; nothing is written).
fn run_launch(args: &LaunchArgs) -> Result<Option<(report::Report, PathBuf)>> {
    let model = ModelConfig::named(&args.model).with_context(|| format!("unknown model {:?}", args.model))?;
    if model.name != "tiny" {
        bail!("the {} shape is for sizing (`ckpt-train sizes`); only tiny trains here", model.name);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let recipe = Recipe {
        steps: args.steps,
        lr_peak: args.lr,
        lr_min: args.lr / 10.0,
        warmup_steps: args.warmup.min(args.steps),
        anneal_steps: args.anneal.min(args.steps),
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
        global_batch: args.global_batch,
        seq_len: args.seq_len,
        freeze_embeddings: args.freeze_embeddings,
    };
    let run_dir = args.run_dir.clone().unwrap_or_else(|| PathBuf::from("ckpt-runs").join(&args.job));
    let mut opts = launch::LaunchOptions {
        run: RunConfig {
            job: args.job.clone(),
            server: args.server.clone().unwrap_or_default(),
            seed: args.seed,
            model,
            recipe,
            ckpt_every: args.ckpt_every,
            until_step: args.until_step.unwrap_or(args.steps),
            run_dir: run_dir.clone(),
            corpus_bytes: args.corpus_bytes,
            node_local: !args.no_node_local,
            chunk_bytes: args.chunk_kib << 10,
            change_detection: if args.change_detection == "compare" {
                ckpt_client::ChangeDetection::Compare
            } else {
                ckpt_client::ChangeDetection::Fingerprint
            },
            collective: collective_backend(&args.collective, args.nproc)?,
        },
        nproc: args.nproc,
        max_restarts: args.max_restarts,
        collective_timeout: Duration::from_millis(args.collective_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        startup_timeout: Duration::from_millis(args.startup_timeout_ms),
        injections: args.injections.clone(),
        threads_per_rank: args.threads_per_rank.unwrap_or((cores / args.nproc.max(1)).max(1)),
        average_anneal: args.average,
        hub_listen: args.hub_listen.clone(),
        hub_advertise: args.hub_advertise.clone(),
        log_every: args.log_every,
    };
    ckpt_core::validate_job(&opts.run.job)?;
    opts.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut daemon = None;
    if args.server.is_none() {
        let mut d = DaemonOptions::in_dir(find_ckptd()?, &args.data_dir);
        // The service yields the CPU to the ranks: checkpoint work must not slow training.
        d.nice = ckpt_client::async_save::BACKGROUND_NICE;
        d.keep_address = true;
        let d = rt.block_on(LocalDaemon::start(d))?;
        opts.run.server = d.url();
        println!("ckptd on {}, store in {}", opts.run.server, args.data_dir.join("store").display());
        let d = Arc::new(tokio::sync::Mutex::new(d));
        let stop = Arc::new(AtomicBool::new(false));
        daemon = Some((rt.spawn(supervise(d.clone(), stop.clone())), d, stop));
    }
    let report = launch::launch(&opts);
    if let Some((supervisor, d, stop)) = daemon {
        stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            // Not aborted: one stopped mid-start would leave a ckptd nobody holds.
            let _ = supervisor.await;
            d.lock().await.terminate(Duration::from_secs(10)).await
        });
    }
    let report = match report? {
        launch::Launched::Ran(r) => *r,
        launch::Launched::AlreadyTrained { step } => {
            let report = run_dir.join("goodput.json");
            let kept = if report.is_file() {
                format!(" (the previous run's report stays in {})", report.display())
            } else {
                String::new()
            };
            println!(
                "{} is trained already: its checkpoint at step {step} reaches --until-step; nothing to do{kept}",
                args.job
            );
            return Ok(None);
        }
    };
    let json = serde_json::to_vec_pretty(&report)?;
    std::fs::write(run_dir.join("goodput.json"), &json)?;
    if let Some(p) = &args.json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Some((report, run_dir)))
}

/// Starts the launcher's own ckptd again whenever it exits by itself (a crash; damage met in
/// its index, which its next start cures), on the same address, as the deploy files'
/// supervisors do: the ranks keep their URL, and their saves and restores go on. Gives up
/// after `FAILED_STARTS_MAX` failed starts in a row. Returns once `stop` is set.
async fn supervise(daemon: Arc<tokio::sync::Mutex<LocalDaemon>>, stop: Arc<AtomicBool>) {
    const EVERY: Duration = Duration::from_millis(200);
    const FAILED_STARTS_MAX: u32 = 5;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(EVERY).await;
        let mut d = daemon.lock().await;
        let Some(status) = d.exited() else { continue };
        println!("ckptd exited by itself ({status}; its log: {}); starting it again", d.options().log_file.display());
        let mut failed = 0;
        loop {
            match d.restart().await {
                Ok(()) => {
                    println!("ckptd started again on {}", d.url());
                    break;
                }
                Err(e) if failed + 1 < FAILED_STARTS_MAX && !stop.load(Ordering::Relaxed) => {
                    failed += 1;
                    println!("ckptd did not start again ({e}); trying again");
                    tokio::time::sleep(EVERY * 5 * failed).await;
                }
                Err(e) => {
                    println!("ckptd did not start again ({e}); giving up: saves fail from here on");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every option and argument of every command says what it is for.
    #[test]
    fn every_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<super::Cli as clap::CommandFactory>::command(), "ckpt-train", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }
}
