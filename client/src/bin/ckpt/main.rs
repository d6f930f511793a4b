//! The `ckpt` command line: inspect, verify, restore and delete checkpoints, and run the demo.

mod bench;
mod bench_gc;
mod bench_rebuild;
mod bench_scale;
mod bench_split;
mod output;
mod restore_cmd;

/// Counts heap allocations of this process, so `ckpt bench` can report allocations per chunk on
/// the client's side of a save and a restore (one relaxed counter; the CLI allocates little).
struct CountingAlloc;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocations so far (see `CountingAlloc`).
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use ckpt_client::daemon::{find_ckptd, DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientOptions, DType, SaveSpec, Tensor, VerifyReport, Wait};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngCore, SeedableRng};

#[derive(Parser)]
#[command(version, about = "ckpt — inspect, verify, restore and delete checkpoints held by ckptd")]
struct Cli {
    /// ckptd's base URL.
    #[arg(long, env = "CKPT_SERVER", default_value = "http://127.0.0.1:7070", global = true)]
    server: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds ckptd may take to answer a query, a delete or a pin, or stay silent while its
    /// answer is read, before the command gives up (exit 4, `no_answer`): a stopped or wedged
    /// ckptd still accepts connections. Not for `gc`, which answers when its run is done, nor
    /// for requests that send data (`average`).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, global = true)]
    answer_timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List jobs, or the checkpoints of a job (committed and in flight).
    Ls {
        /// The job whose checkpoints to list; all jobs when left out.
        job: Option<String>,
    },
    /// Show a checkpoint: its root and every rank's index (ranks, tensors, sizes).
    Show {
        /// The job.
        job: String,
        /// A step number or "latest".
        #[arg(default_value = "latest")]
        step: String,
    },
    /// Re-read and re-hash every chunk of a checkpoint (or of all of them). Exits 1 on corruption.
    Verify {
        /// Job to verify; with --all and no job, every job.
        job: Option<String>,
        /// A step number or "latest".
        step: Option<String>,
        /// Every committed checkpoint (of the job, or of every job).
        #[arg(long)]
        all: bool,
    },
    /// Write a checkpoint's tensors, verified, to a directory: one rank's (--rank), every
    /// rank's (--all, one rank-NNNNN directory each), or resharded to another world size
    /// (--all --world-size N). Layout: one little-endian, row-major tNNNNN.bin per tensor and
    /// a tensors.json naming job, step, root hash, rank, and each tensor's shape and place.
    Restore {
        /// The job.
        job: String,
        /// A step number or "latest".
        step: String,
        /// The rank to restore.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        rank: Option<u32>,
        /// Every rank, each into OUT/rank-NNNNN.
        #[arg(long)]
        all: bool,
        /// With --all: cut row-split tensors evenly over this many ranks instead of the saved ones.
        #[arg(long, requires = "all")]
        world_size: Option<u32>,
        /// Directory to write; refused when not empty unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Write into a non-empty --out (files of the same name are replaced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        select: Streamed,
    },
    /// Export a checkpoint as one safetensors file: every tensor whole (assembled from the
    /// ranks that saved it), or one rank's slices with --rank.
    Export {
        /// The job.
        job: String,
        /// A step number or "latest".
        #[arg(default_value = "latest")]
        step: String,
        /// The output format.
        #[arg(long, default_value = "safetensors", value_parser = ["safetensors"])]
        format: String,
        /// Only this rank's tensors, as it saved them.
        #[arg(long)]
        rank: Option<u32>,
        /// The file to write; refused when it exists unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        select: Streamed,
    },
    /// Delete a committed checkpoint (the newest one, or a pinned one, only with --force).
    Rm {
        /// The job.
        job: String,
        /// A step number or "latest".
        step: String,
        /// Also delete the newest committed checkpoint (what a restart would resume from), or a
        /// pinned one.
        #[arg(long)]
        force: bool,
    },
    /// Apply the retention policy and collect garbage: delete the checkpoints the policy does
    /// not keep (never a pinned one or the newest), delete what the previous run condemned, and
    /// condemn what no checkpoint references now (deleted by the next run, after the grace
    /// period).
    Gc {
        /// The job; every job with --all.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        job: Option<String>,
        /// Every job, one after another; a job whose GC fails is reported and the others still
        /// run (the exit status is the first failure's).
        #[arg(long)]
        all: bool,
        /// Show what would go, and how many bytes, without deleting anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pin a committed checkpoint: retention never deletes it.
    Pin {
        /// The job.
        job: String,
        /// The step to pin.
        step: u64,
    },
    /// Remove a pin.
    Unpin {
        /// The job.
        job: String,
        /// The step to unpin.
        step: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output: `ckpt man | man -l -`.
    Man,
    /// Average f32 tensors over several committed checkpoints of a job (same layout) into a new
    /// checkpoint, as the Llama 3 recipe averages its annealing phase.
    Average {
        /// The job whose checkpoints to average.
        job: String,
        /// The steps to average, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<u64>,
        /// Tensors to average (others are not written), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "params")]
        tensors: Vec<String>,
        /// Job to write the average to, at the last step averaged; default `<job>-avg`.
        #[arg(long)]
        out: Option<String>,
    },
    /// Benchmark saves and restores through a private ckptd against this machine's limits for
    /// the same bytes (memcpy, sequential fsync'd write, read + blake3 warm and with direct
    /// I/O), interleaved and repeated; prints one table of medians with their spread.
    Bench(bench::BenchOptions),
    /// Benchmark the commit path at a 405B job's rank and chunk counts with tiny real chunks:
    /// index-put latency with every rank's put in flight at once, time from the last index to
    /// the commit, ckptd's peak RSS, root bytes, metadata a rank reads to restore, reading back,
    /// GC, and a start with the index rebuilt from the store; one private ckptd per world size,
    /// fsync'd local store. Prints its tables.
    BenchScale(bench_scale::ScaleOptions),
    /// Benchmark the commit of a save split over ckptd nodes at a cluster's node count: a real
    /// leader ckptd, the other nodes' parts written into its local store over a spread of
    /// time; prints the time from the last part to the commit and the leader's LIST calls.
    BenchSplit(bench_split::SplitOptions),
    /// Start a private ckptd, save a multi-rank checkpoint, crash ckptd mid-save, restart it,
    /// finish the save, restore and verify, and show a corrupted chunk being caught.
    Demo {
        /// Ranks saving at once.
        #[arg(long, default_value_t = 4)]
        ranks: u32,
        /// MiB of tensor data per rank.
        #[arg(long, default_value_t = 16)]
        mib: u64,
        /// Keep the store and logs in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seed of the generated data.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

/// What `restore` and `export` write, and in what blocks.
#[derive(clap::Args)]
struct Streamed {
    /// Size of the blocks tensors are streamed in, in MiB (at least one row, or one chunk of a
    /// rank's slice; twice that is held for a tensor cut along columns).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    buffer_mib: u64,
    /// Only tensors whose names match this glob (`*`, `?`, `[...]`), e.g. 'model.*' to leave
    /// the optimizer state out; repeatable. Each must match some tensor.
    #[arg(long = "tensor", value_name = "GLOB")]
    tensors: Vec<String>,
    /// Index objects kept after they are read, in MiB of their size on the wire. A tensor cut
    /// over many ranks is read through every one of their indexes; while all the indexes fit,
    /// each is fetched once for the whole command instead of once per tensor (a 405B
    /// checkpoint of 16,384 ranks has about 135 MiB of them).
    #[arg(long, default_value_t = 1024)]
    index_cache_mib: u64,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let wants_json = std::env::args().any(|a| a == "--json");
            if wants_json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let first = e.to_string().lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
                let f = output::Failure { code: "usage", exit: output::exit::USAGE, message: first };
                std::process::exit(output::report(&f, true));
            }
            e.exit()
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let (json, server) = (cli.json, cli.server.clone());
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => std::process::exit(output::report(&output::classify(&e, &server), json)),
    }
}

/// The CLI's client: interactive, so a ckptd that does not answer is reported at once, and
/// one that takes a request and sends nothing within `answer_timeout` is reported then.
fn cli_client(
    server: &str,
    request_timeout: Duration,
    answer_timeout: Option<Duration>,
    index_cache_bytes: u64,
) -> anyhow::Result<Client> {
    let opts = ClientOptions {
        index_cache_bytes,
        retry_unreachable: false,
        connect_timeout: Duration::from_secs(3),
        request_timeout,
        answer_timeout,
        ..ClientOptions::default()
    };
    Ok(Client::new(server, opts)?)
}

/// Fails with "not found" unless ckptd knows `job` (a listing of an unknown job is empty, not
/// an error, for trainers that list before their first checkpoint).
async fn ensure_job(client: &Client, job: &str) -> anyhow::Result<()> {
    ckpt_core::validate_job(job).map_err(|e| output::CliError::Usage(e.to_string()))?;
    let jobs = client.jobs().await?;
    if !jobs.iter().any(|j| j == job) {
        let known = match jobs.len() {
            0 => "it has no jobs".to_string(),
            n if n <= 5 => format!("its jobs: {}", jobs.join(", ")),
            n => format!("{n} jobs, among them {}", jobs[..5].join(", ")),
        };
        return Err(
            output::CliError::NotFound(format!("no job {job:?} on ckptd at {} ({known})", client.base_url())).into()
        );
    }
    Ok(())
}

async fn resolve_step(client: &Client, job: &str, step: &str) -> anyhow::Result<u64> {
    if step == "latest" {
        ensure_job(client, job).await?;
        return match client.latest(job).await? {
            Some(s) => Ok(s),
            None => Err(output::CliError::NotFound(format!("job {job} has no committed checkpoint")).into()),
        };
    }
    ckpt_core::parse_step(step)
        .map_err(|e| output::CliError::Usage(format!("{e}: give a step number or \"latest\"")).into())
}

fn progress(total: u64, json: bool, what: &str) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    // Commands that start their own ckptd, or need none, do not depend on --server.
    let local = matches!(
        cli.cmd,
        Cmd::Completions { .. } | Cmd::Man | Cmd::Demo { .. } | Cmd::Bench(_) | Cmd::BenchSplit(_) | Cmd::BenchScale(_)
    );
    let answer_timeout = Some(Duration::from_secs(cli.answer_timeout.max(1)));
    let server = if local { "http://127.0.0.1:7070" } else { &cli.server };
    let index_cache = match &cli.cmd {
        Cmd::Restore { select, .. } | Cmd::Export { select, .. } => select.index_cache_mib.saturating_mul(1 << 20),
        _ => ClientOptions::default().index_cache_bytes,
    };
    let client = cli_client(server, Duration::from_secs(120), answer_timeout, index_cache)?;
    match cli.cmd {
        Cmd::Ls { job: None } => {
            let jobs = client.jobs().await?;
            if cli.json {
                print_json(&serde_json::json!({ "jobs": jobs }))?;
            } else if jobs.is_empty() {
                eprintln!("no jobs on ckptd at {} yet", client.base_url());
            } else {
                jobs.iter().for_each(|j| println!("{j}"));
            }
        }
        Cmd::Ls { job: Some(job) } => {
            ensure_job(&client, &job).await?;
            let list = client.list(&job).await?;
            if cli.json {
                print_json(&list)?;
            } else {
                print_list(&list);
            }
        }
        Cmd::Show { job, step } => {
            let step = resolve_step(&client, &job, &step).await?;
            let m = client.manifest(&job, step).await?;
            if cli.json {
                print_json(&m)?;
            } else {
                print_manifest(&m);
            }
        }
        Cmd::Verify { job, step, all } => {
            let mut targets = Vec::new();
            match (job, step, all) {
                (Some(job), Some(step), false) => {
                    targets.push((job.clone(), resolve_step(&client, &job, &step).await?))
                }
                (Some(job), None, false) => targets.push((job.clone(), resolve_step(&client, &job, "latest").await?)),
                (Some(job), None, true) => {
                    ensure_job(&client, &job).await?;
                    targets.extend(client.list(&job).await?.committed.into_iter().map(|m| (job.clone(), m.step)))
                }
                (None, None, true) => {
                    for job in client.jobs().await? {
                        targets.extend(client.list(&job).await?.committed.into_iter().map(|m| (job.clone(), m.step)));
                    }
                }
                _ => return Err(output::CliError::Usage("give JOB [STEP], JOB --all, or --all".into()).into()),
            }
            if targets.is_empty() {
                return Err(output::CliError::NotFound(format!(
                    "nothing to verify: no committed checkpoint on ckptd at {}",
                    client.base_url()
                ))
                .into());
            }
            let mut reports = Vec::new();
            for (job, step) in targets {
                let m = client.manifest(&job, step).await?;
                let total: u64 =
                    m.ranks.iter().flat_map(|r| r.tensors.iter()).flat_map(|t| t.chunks.iter()).map(|c| c.len).sum();
                let pb = progress(total, cli.json, &format!("verify {job}@{step}"));
                let report = client.verify(&job, step, |n| pb.inc(n)).await?;
                pb.finish_and_clear();
                if !cli.json {
                    print_verify(&report);
                }
                reports.push(report);
            }
            let ok = reports.iter().all(VerifyReport::ok);
            if cli.json {
                print_json(&reports)?;
            }
            return Ok(if ok { 0 } else { output::exit::CORRUPT });
        }
        Cmd::Restore {
            job,
            step,
            rank,
            all: _,
            world_size,
            out,
            force,
            select: Streamed { buffer_mib, tensors: only, index_cache_mib },
        } => {
            let step = resolve_step(&client, &job, &step).await?;
            let only = restore_cmd::Only::parse(&only)?;
            restore_cmd::check_out(&out, force)?;
            let cp = client.checkpoint(&job, step).await?;
            only.check(&cp)?;
            restore_cmd::unlabel(&out)?;
            let buffer = buffer_mib << 20;
            let mut written = Vec::new();
            match (rank, world_size) {
                (Some(rank), _) => {
                    // Over an earlier `--all`: its rank directories are not this restore's.
                    restore_cmd::remove_extra_ranks(&out, 0)?;
                    // The root and this rank's index object; nothing of the other ranks is read.
                    let shard = client.shard_index(&cp, rank).await?;
                    let tensors = only.keep_some(restore_cmd::as_saved(&shard), rank)?;
                    let total = tensors.iter().map(restore_cmd::Planned::bytes).sum::<anyhow::Result<u64>>()?;
                    let pb = progress(total, cli.json, &format!("restore {job}@{step} rank {rank}"));
                    let id = (rank, cp.world_size());
                    written.push(
                        restore_cmd::write_rank(&client, &cp, id, &tensors, &out, buffer, &mut |n| pb.inc(n)).await?,
                    );
                    pb.finish_and_clear();
                }
                (None, None) => {
                    restore_cmd::remove_extra_ranks(&out, cp.world_size())?;
                    restore_cmd::remove_stale_files(&out, 0)?;
                    for r in 0..cp.world_size() {
                        let shard = client.shard_index(&cp, r).await?;
                        let tensors = only.keep(restore_cmd::as_saved(&shard));
                        let dir = out.join(format!("rank-{r:05}"));
                        let id = (r, cp.world_size());
                        written.push(
                            restore_cmd::write_rank(&client, &cp, id, &tensors, &dir, buffer, &mut |_| {}).await?,
                        );
                    }
                }
                (None, Some(world)) => {
                    if world == 0 {
                        return Err(output::CliError::Usage("--world-size must be positive".into()).into());
                    }
                    restore_cmd::remove_extra_ranks(&out, world)?;
                    restore_cmd::remove_stale_files(&out, 0)?;
                    restore_cmd::warn_if_indexes_overflow(&cp, index_cache_mib);
                    for r in 0..world {
                        let tensors = only.keep(restore_cmd::resharded(&cp, r, world));
                        let dir = out.join(format!("rank-{r:05}"));
                        written.push(
                            restore_cmd::write_rank(&client, &cp, (r, world), &tensors, &dir, buffer, &mut |_| {})
                                .await?,
                        );
                    }
                }
            }
            if cli.json {
                print_json(&serde_json::json!({
                    "job": job, "step": step, "dir": out, "ranks": written,
                    "index_objects_fetched": client.index_objects_fetched(),
                }))?;
            } else {
                let tensors: usize = written.iter().map(|w| w["tensors"].as_array().map_or(0, Vec::len)).sum();
                println!(
                    "restored {job}@{step}: {}, {}, every chunk verified, into {}",
                    output::count(written.len() as u64, "rank", "ranks"),
                    output::count(tensors as u64, "tensor", "tensors"),
                    out.display()
                );
            }
        }
        Cmd::Export {
            job,
            step,
            format: _,
            rank,
            out,
            force,
            select: Streamed { buffer_mib, tensors: only, index_cache_mib },
        } => {
            let step = resolve_step(&client, &job, &step).await?;
            let only = restore_cmd::Only::parse(&only)?;
            if out.exists() && !force {
                return Err(
                    output::CliError::Refused(format!("{} exists; pass --force to replace it", out.display())).into()
                );
            }
            let cp = client.checkpoint(&job, step).await?;
            only.check(&cp)?;
            let shard = match rank {
                Some(r) => Some(client.shard_index(&cp, r).await?),
                None => None,
            };
            let tensors = match &shard {
                Some(shard) => only.keep_some(restore_cmd::as_saved(shard), shard.rank)?,
                None => only.keep(restore_cmd::resharded(&cp, 0, 1)),
            };
            let total = tensors.iter().map(restore_cmd::Planned::bytes).sum::<anyhow::Result<u64>>()?;
            if rank.is_none() {
                restore_cmd::warn_if_indexes_overflow(&cp, index_cache_mib);
            }
            let pb = progress(total, cli.json, &format!("export {job}@{step}"));
            restore_cmd::write_safetensors(&client, &cp, &tensors, &out, buffer_mib << 20, &mut |n| pb.inc(n)).await?;
            let bytes = total;
            pb.finish_and_clear();
            if cli.json {
                print_json(&serde_json::json!({
                    "job": job, "step": step, "file": out, "tensors": tensors.len(), "bytes": bytes,
                    "index_objects_fetched": client.index_objects_fetched(),
                }))?;
            } else {
                println!(
                    "exported {job}@{step}: {}, {}, verified, into {} (safetensors)",
                    output::count(tensors.len() as u64, "tensor", "tensors"),
                    output::size(bytes),
                    out.display()
                );
            }
        }
        Cmd::Rm { job, step, force } => {
            let step = resolve_step(&client, &job, &step).await?;
            match client.delete(&job, step, force).await {
                Err(ckpt_client::ClientError::Api { status: 409, message, .. }) => {
                    return Err(output::CliError::Refused(format!("{message} (ckpt rm --force)")).into())
                }
                other => other?,
            }
            if cli.json {
                print_json(&serde_json::json!({ "deleted": { "job": job, "step": step } }))?;
            } else {
                println!("deleted {job}@{step} (its chunks stay until garbage collection)");
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "ckpt",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
        }
        Cmd::Gc { job, all: _, dry_run } => {
            // A run over a large job lists and reads every object of it: one job per request,
            // each waited for as long as a run may hold its job's lock (`Client::gc`); a run
            // whose request fails in flight goes on in ckptd, so it is not sent again.
            let gc_client = cli_client(&cli.server, Duration::from_secs(3600), None, 0)?;
            let report = match job {
                Some(j) => {
                    ensure_job(&client, &j).await?;
                    gc_client.gc(Some(&j), dry_run).await?
                }
                None => {
                    let (report, exit) =
                        gc_every_job(&gc_client, &cli.server, answer_timeout, dry_run, cli.json).await?;
                    if cli.json {
                        print_json(&report)?;
                    } else {
                        print_gc(&report, dry_run);
                        let count = |k: &str| report[k].as_array().map_or(0, Vec::len);
                        if count("failed") > 0 {
                            let total = count("jobs") + count("failed") + count("not_run");
                            eprintln!(
                                "GC failed for {} of {total} jobs (above); {} not reached",
                                count("failed"),
                                count("not_run")
                            );
                        }
                    }
                    return Ok(exit);
                }
            };
            if cli.json {
                print_json(&report)?;
            } else {
                print_gc(&report, dry_run);
            }
        }
        Cmd::Pin { job, step } => pin(&client, cli.json, &job, step, true).await?,
        Cmd::Unpin { job, step } => pin(&client, cli.json, &job, step, false).await?,
        Cmd::Average { job, steps, tensors, out } => {
            let out = out.unwrap_or_else(|| format!("{job}-avg"));
            let names: Vec<&str> = tensors.iter().map(String::as_str).collect();
            let step = client.average_checkpoints(&job, &steps, &names, &out).await?;
            if cli.json {
                print_json(
                    &serde_json::json!({ "averaged": { "job": job, "steps": steps, "out": out, "step": step } }),
                )?;
            } else {
                println!("averaged {job}@{steps:?} ({}) into {out}@{step}", tensors.join(", "));
            }
        }
        Cmd::Demo { ranks, mib: size, dir, seed } => return demo(ranks, size, dir, seed).await,
        Cmd::Bench(opts) => {
            if opts.ranks == 0 || opts.mib_per_rank == 0 || opts.chunk_mib == 0 || opts.repeat == 0 {
                return Err(output::CliError::Usage(
                    "--ranks, --mib, --chunk-mib and --repeat must be positive".into(),
                )
                .into());
            }
            bench::run(bench::BenchOptions { json: cli.json, ..opts }).await?;
        }
        Cmd::BenchSplit(opts) => {
            if opts.nodes.is_empty()
                || opts.nodes.contains(&0)
                || opts.ranks_per_node == 0
                || !(0.0..=3600.0).contains(&opts.spread_s)
            {
                return Err(output::CliError::Usage(
                    "--nodes and --ranks-per-node must be positive, --spread-s within 0..=3600".into(),
                )
                .into());
            }
            let rows = bench_split::run(opts).await?;
            if cli.json {
                print_json(&rows)?;
            } else {
                bench_split::print(&rows);
            }
        }
        Cmd::BenchScale(opts) => {
            if opts.worlds.is_empty() || opts.worlds.contains(&0) || opts.tensors == 0 || opts.chunks_per_tensor == 0 {
                return Err(output::CliError::Usage(
                    "--worlds, --tensors and --chunks-per-tensor must be positive".into(),
                )
                .into());
            }
            let report = bench_scale::run(opts).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                bench_scale::print(&report);
            }
        }
    }
    Ok(0)
}

fn print_list(list: &ckpt_core::save::CheckpointList) {
    if list.committed.is_empty() && list.in_flight.is_empty() {
        println!("job {} has no checkpoints", list.job);
        return;
    }
    println!("{:>12}  {:<40}  {:>6}  {:>11}  {:>8}  state", "step", "created", "ranks", "size", "chunks");
    for m in &list.committed {
        println!(
            "{:>12}  {:<40}  {:>6}  {:>11}  {:>8}  committed",
            m.step,
            output::when(m.created_unix_ms),
            m.world_size,
            output::size(m.bytes),
            m.chunks
        );
    }
    for s in &list.in_flight {
        println!(
            "{:>12}  {:<40}  {:>6}  {:>11}  {:>8}  {} ({} of {} in){}",
            s.step,
            "-",
            s.world_size,
            "-",
            "-",
            if s.committing { "committing" } else { s.phase.name() },
            s.ranks_received,
            output::count(s.world_size as u64, "rank", "ranks"),
            s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
}

fn print_manifest(m: &ckpt_core::Manifest) {
    let s = m.summary();
    println!("checkpoint {}@{}", m.job, m.step);
    println!("  created          {}", output::when(m.created_unix_ms));
    println!("  world size       {}", m.world_size);
    println!(
        "  previous commit  {}",
        m.previous_committed_step.map(|p| format!("step {p}")).unwrap_or_else(|| "none".into())
    );
    println!(
        "  data             {} in {}",
        output::size(s.bytes),
        output::count(s.chunks, "distinct chunk", "distinct chunks")
    );
    println!("  root hash        {} (format {})", m.hash, m.version);
    println!("  metadata         {}", output::metadata(&m.metadata));
    for r in &m.ranks {
        println!(
            "  rank {}: {}, {}",
            r.rank,
            output::count(r.tensors.len() as u64, "tensor", "tensors"),
            output::size(r.byte_len())
        );
        for t in &r.tensors {
            println!(
                "    {:<40} {:?} {:?} of {:?} at {:?} ({})",
                t.name,
                t.dtype,
                t.shape,
                t.global_shape,
                t.offsets,
                output::count(t.chunks.len() as u64, "chunk", "chunks")
            );
        }
    }
}

fn print_verify(r: &VerifyReport) {
    if r.ok() {
        println!("{}@{}: ok, {} chunks, {:.1} MiB verified", r.job, r.step, r.chunks_checked, mib(r.bytes_checked));
    } else {
        println!("{}@{}: CORRUPT, {} of {} chunks bad", r.job, r.step, r.corrupt.len(), r.chunks_checked);
        for c in &r.corrupt {
            let users: Vec<String> = c.used_by.iter().map(|(rank, t)| format!("rank {rank} tensor {t}")).collect();
            println!("  chunk {} ({}): {}", c.hash, users.join(", "), c.reason);
        }
    }
}

/// One rank's demo state: a slice of a weight matrix sharded by rows plus its optimizer moment.
fn demo_tensors(rank: u32, ranks: u32, bytes: u64, rng: &mut rand::rngs::StdRng) -> Vec<Tensor> {
    let cols: u64 = 1024;
    let rows = (bytes / 2 / 4 / cols).max(1);
    let mut out = Vec::new();
    for name in ["model.layers.0.mlp.weight", "optim.exp_avg.layers.0.mlp.weight"] {
        let mut data = vec![0u8; (rows * cols * 4) as usize];
        rng.fill_bytes(&mut data);
        out.push(Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![rows, cols],
            global_shape: vec![rows * ranks as u64, cols],
            offsets: vec![rows * rank as u64, 0],
            data: Bytes::from(data),
        });
    }
    out
}

async fn save_all(
    client: &Client,
    job: &str,
    step: u64,
    states: &[Vec<Tensor>],
    ranks: std::ops::Range<u32>,
    world: u32,
) -> anyhow::Result<(u64, u64)> {
    let futs = ranks.map(|r| {
        let spec = SaveSpec {
            job: job.into(),
            step,
            rank: r,
            world_size: world,
            metadata: serde_json::json!({ "demo": true, "step": step }),
            rank_metadata: serde_json::json!({ "data_cursor": step * 1000 + r as u64 }),
            created_unix_ms: None,
            node_ranks: None,
        };
        let tensors = states[r as usize].clone();
        async move { client.save(&spec, &tensors, Wait::Staged).await }
    });
    let reports = futures::future::try_join_all(futs).await?;
    Ok((reports.iter().map(|r| r.bytes_sent).sum(), reports.iter().map(|r| r.bytes_total).sum()))
}

async fn demo(ranks: u32, size_mib: u64, dir: Option<PathBuf>, seed: u64) -> anyhow::Result<i32> {
    if ranks == 0 || size_mib == 0 {
        return Err(output::CliError::Usage("--ranks and --mib must be positive".into()).into());
    }
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let job = "demo";
    let bytes = size_mib << 20;
    println!("ckpt demo: {ranks} ranks x {size_mib} MiB, seed {seed}, working in {}", dir.display());
    let exe = find_ckptd()?;
    let mut daemon = LocalDaemon::start(DaemonOptions::in_dir(exe, &dir)).await?;
    let client = Client::new(&daemon.url(), ClientOptions::default())?;
    println!("1. started ckptd at {} (store: {}/store, fsync on)", daemon.url(), dir.display());

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut states: Vec<Vec<Tensor>> = (0..ranks).map(|r| demo_tensors(r, ranks, bytes, &mut rng)).collect();
    let t = Instant::now();
    let (sent, total) = save_all(&client, job, 100, &states, 0..ranks, ranks).await?;
    client.wait_committed(job, 100).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "2. saved step 100 from {ranks} ranks at once: {:.0} MiB sent in {secs:.2}s ({:.0} MiB/s), committed",
        mib(sent),
        mib(total) / secs
    );

    // Step 200: the optimizer moments changed, the weights did not (as for a frozen layer).
    for state in states.iter_mut() {
        let mut data = vec![0u8; state[1].data.len()];
        rng.fill_bytes(&mut data);
        state[1].data = Bytes::from(data);
    }
    let (sent, total) = save_all(&client, job, 200, &states, 0..ranks - 1, ranks).await?;
    println!(
        "3. step 200: ranks 0..{} sent their shards ({:.0} of {:.0} MiB; unchanged chunks deduplicated); rank {} has not yet",
        ranks - 1,
        mib(sent),
        mib(total),
        ranks - 1
    );
    daemon.kill();
    println!("4. ckptd killed with SIGKILL in the middle of step 200");
    daemon.restart().await?;
    let client = Client::new(&daemon.url(), ClientOptions::default())?;
    let list = client.list(job).await?;
    let latest = list.committed.last().map(|m| m.step);
    println!(
        "5. ckptd restarted at {}: latest committed step {}; in flight: {}",
        daemon.url(),
        latest.map_or("none".to_string(), |s| s.to_string()),
        list.in_flight
            .iter()
            .map(|s| format!("{}@{} ({} of {} ranks)", job, s.step, s.ranks_received, s.world_size))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if latest != Some(100) {
        bail!("expected step 100 to be the latest committed checkpoint after the crash, found {latest:?}");
    }
    let report = client.verify(job, 100, |_| {}).await?;
    print!("   ");
    print_verify(&report);
    if !report.ok() {
        bail!("step 100 failed verification after the crash");
    }

    // Every rank retries its part, as a trainer does after a service restart: chunks ckptd had
    // made durable are not sent again; chunks it had only staged in memory are.
    let (resent, total) = save_all(&client, job, 200, &states, 0..ranks, ranks).await?;
    let status = client.wait_committed(job, 200).await?;
    println!(
        "6. all ranks retried step 200 ({:.0} of {:.0} MiB re-sent, the rest was durable); step 200 {} (root {})",
        mib(resent),
        mib(total),
        status.phase.name(),
        status.manifest_hash.unwrap_or_default()
    );

    let t = Instant::now();
    let mut restored_bytes = 0;
    for r in 0..ranks {
        let back = client.load_rank(job, 200, r).await?;
        if back != states[r as usize] {
            bail!("rank {r} restored different bytes");
        }
        restored_bytes += back.iter().map(|t| t.data.len() as u64).sum::<u64>();
    }
    println!(
        "7. restored every rank of step 200: {:.0} MiB, byte-identical, every chunk verified, in {:.2}s",
        mib(restored_bytes),
        t.elapsed().as_secs_f64()
    );

    // Silent data corruption on the storage side: flip one bit in one stored chunk.
    let m = client.manifest(job, 200).await?;
    let victim = m.ranks[0].tensors[1].chunks[0].hash;
    let path = dir.join("store").join(ckpt_core::keys::chunk_key(job, &victim));
    let mut stored = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let at = stored.len() / 2;
    stored[at] ^= 0x10;
    std::fs::write(&path, &stored)?;
    let report = client.verify(job, 200, |_| {}).await?;
    println!("8. flipped one bit in stored chunk {victim}; ckpt verify says:");
    print!("   ");
    print_verify(&report);
    match client.load_rank(job, 200, 0).await {
        Err(e) => println!("   restore of rank 0 refused: {e}"),
        Ok(_) => bail!("restore returned data from a corrupted chunk"),
    }
    if report.ok() {
        bail!("verification missed the flipped bit");
    }
    let clean = daemon.terminate(Duration::from_secs(10)).await;
    println!("9. ckptd stopped with SIGTERM ({})", if clean { "clean shutdown" } else { "had to be killed" });
    println!("demo finished: crash mid-save lost nothing committed, the interrupted step completed on retry, corruption was caught");
    Ok(0)
}

/// `ckpt gc --all`: each job in turn, as `POST /v1/gc` does it in ckptd. A job whose run fails
/// (its lock held by another node, a store error on its objects, its connection reset) is
/// reported and the next one runs; ckptd unreachable or not ckptd, the token refused, or
/// ckptd's store not answering (its readiness probe fails) ends the round, and the jobs not
/// reached are named. Returns the report, shaped as `POST /v1/gc`'s, and the exit status: the
/// first failure's, or 0.
async fn gc_every_job(
    client: &Client,
    server: &str,
    answer_timeout: Option<Duration>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<(serde_json::Value, i32)> {
    // The probe answers at once or not at all (the listing too); the GC client waits an hour
    // for a request.
    let probe = cli_client(server, Duration::from_secs(30), answer_timeout, 0)?;
    let jobs = probe.jobs().await?;
    let (mut reports, mut failed, mut not_run, mut exit) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (i, j) in jobs.iter().enumerate() {
        let e = match client.gc(Some(j), dry_run).await {
            Ok(r) => {
                reports.extend(r["jobs"].as_array().cloned().unwrap_or_default());
                continue;
            }
            Err(e) => e,
        };
        // ckptd's own code where it answered (`conflict`, `store_error`), as its round reports it.
        let served = match &e {
            ckpt_client::ClientError::Api { code, .. } => Some(code.clone()),
            _ => None,
        };
        let e = anyhow::Error::from(e);
        let f = output::classify(&e, server);
        if !json {
            eprintln!("{j}: GC failed: {}", f.message);
        }
        exit = if exit == 0 { f.exit } else { exit };
        let store_down = served.as_deref() == Some("store_error") && probe.health().await.is_err();
        let ends = ["unreachable", "not_ckptd", "invalid_url", "unauthorized"].contains(&f.code) || store_down;
        let code = served.unwrap_or_else(|| f.code.to_string());
        failed.push(serde_json::json!({ "job": j, "code": code, "message": f.message }));
        if ends {
            not_run = jobs[i + 1..].to_vec();
            break;
        }
    }
    Ok((serde_json::json!({ "jobs": reports, "failed": failed, "not_run": not_run }), exit))
}

/// One paragraph per job of a GC report.
fn print_gc(report: &serde_json::Value, dry_run: bool) {
    let (deleted, swept, condemned, removed) = if dry_run {
        ("would delete", "would sweep", "would condemn", "would remove")
    } else {
        ("deleted", "swept", "condemned", "removed")
    };
    let steps = |v: &serde_json::Value| {
        let s: Vec<String> = v.as_array().map(|a| a.iter().map(|x| x.to_string()).collect()).unwrap_or_default();
        if s.is_empty() {
            "none".to_string()
        } else {
            s.join(", ")
        }
    };
    let size = |v: &serde_json::Value| mib(v.as_u64().unwrap_or(0));
    for j in report["jobs"].as_array().into_iter().flatten() {
        println!("{}:", j["job"].as_str().unwrap_or("?"));
        println!("  checkpoints kept: {}", steps(&j["checkpoints_kept"]));
        println!("  checkpoints {deleted}: {}", steps(&j["checkpoints_deleted"]));
        if j["pinned"].as_array().is_some_and(|a| !a.is_empty()) {
            println!("  pinned: {}", steps(&j["pinned"]));
        }
        match j["sweep_deferred"].as_str() {
            Some(why) => println!("  sweep deferred: {why}"),
            None => println!("  {swept}: {} objects, {:.1} MiB", j["swept_objects"], size(&j["swept_bytes"])),
        }
        println!(
            "  {condemned} (deleted by the next run, after the grace period): {} objects, {:.1} MiB",
            j["condemned_objects"],
            size(&j["condemned_bytes"])
        );
        if j["stale_local_files"].as_u64().unwrap_or(0) > 0 {
            println!("  stale handoff and spill files {removed}: {}", j["stale_local_files"]);
        }
    }
}

async fn pin(client: &ckpt_client::Client, json: bool, job: &str, step: u64, pinned: bool) -> anyhow::Result<()> {
    client.pin(job, step, pinned).await?;
    if json {
        print_json(&serde_json::json!({ "job": job, "step": step, "pinned": pinned }))?;
    } else {
        println!("{job}@{step} {}", if pinned { "pinned" } else { "unpinned" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every option and argument of every command says what it is for (`--help`, the man page).
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
        walk(&<super::Cli as clap::CommandFactory>::command(), "ckpt", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    /// The benchmarks' options parse straight into the structs their runs take.
    #[test]
    fn bench_options_parse_into_their_runs_options() {
        use clap::Parser;
        let parse = |args: &[&str]| super::Cli::try_parse_from(args).unwrap().cmd;
        let super::Cmd::Bench(b) = parse(&["ckpt", "bench", "--mib", "8", "--transport", "http"]) else { panic!() };
        assert_eq!((b.mib_per_rank, b.ranks, b.transport), (8, 4, crate::bench::Transport::Http));
        assert!(!b.json, "--json is the global flag's, set when the run starts");
        let super::Cmd::BenchScale(s) = parse(&["ckpt", "bench-scale", "--worlds", "2,3", "--index-cache-mib", "0"])
        else {
            panic!()
        };
        assert_eq!((s.worlds, s.index_cache_mib, s.tensors), (vec![2, 3], 0, 3));
        let super::Cmd::BenchSplit(p) = parse(&["ckpt", "bench-split", "--nodes", "4", "--spread-s", "0.5"]) else {
            panic!()
        };
        assert_eq!((p.nodes, p.spread_s, p.ranks_per_node), (vec![4], 0.5, 8));
        assert!(super::Cli::try_parse_from(["ckpt", "bench", "--transport", "carrier-pigeon"]).is_err());
    }
}
