//! GC at the scale of a 405B job, for `ckpt bench-scale`: a job's dry GC runs measured against
//! their limit, then a real run that condemns and a second that sweeps, each with how much
//! ckptd's memory grew while it ran.
//!
//! The limit is the work no GC run can avoid, done the plainest way on the same files of the
//! local store: every kept root read and parsed, every index object it names read and parsed
//! into the set of referenced chunks (one thread per core), and the job's directory walked with
//! each file's size and modification time (what a listing returns), each chunk and index object
//! looked up in those sets. ckptd's run does the same through `object_store`, plus its lock,
//! lease, pin and leftover checks. The limit's count of unreferenced objects must equal the
//! dry run's condemned count, or the two did different work and the benchmark fails.
//!
//! ckptd is restarted (stopped cleanly) before the runs: one whose heap grew through the save
//! and the read back serves GC from memory it freed, and GC's own would not show in its RSS.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_client::daemon::{peak_rss_bytes, rss_bytes, LocalDaemon};
use ckpt_client::{Client, ClientError, ClientOptions};
use ckpt_core::{keys, ChunkHash, Root, ShardIndex};

use crate::bench::Samples;

/// One real GC run: seconds, the objects it condemned or swept, and ckptd's memory growth.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RealRun {
    pub s: f64,
    pub objects: u64,
    pub rss_growth_mib: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GcRow {
    /// Chunk and index objects in the job's store directory.
    pub objects: u64,
    /// Index objects the kept roots name (each read and parsed by every run).
    pub index_objects_read: u64,
    /// Objects no kept root references (what a run condemns).
    pub unreferenced: u64,
    /// Dry runs and their limit, interleaved: (median, min, max) seconds.
    pub dry_s: (f64, f64, f64),
    pub limit_s: (f64, f64, f64),
    /// The most ckptd's RSS grew during a dry run, MiB.
    pub dry_rss_growth_mib: Option<f64>,
    /// Retention's run (deletes the old root, condemns what only it referenced) and the sweep
    /// a grace period later; absent where the benchmark had nothing to collect.
    pub condemn: Option<RealRun>,
    pub sweep: Option<RealRun>,
}

/// The limit's findings.
struct Plain {
    objects: u64,
    index_objects: u64,
    unreferenced: u64,
}

/// An I/O error of the plainest pass a benchmark (`bench`) measures against.
pub(crate) fn io_err(bench: &str, what: &str, path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Internal(format!("benchmark {bench} limit: {what} {}: {e}", path.display()))
}

/// The plainest listing of a local store's directory, part of the limits of GC and of a
/// rebuild: every file under `dir`, one stat each (the size and time a listing carries),
/// handed to `visit` with the directory it is in. A missing `dir` lists nothing.
pub(crate) fn walk_files(
    bench: &str,
    dir: &Path,
    visit: &mut dyn FnMut(&Path, &std::fs::DirEntry, &std::fs::Metadata) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(bench, "list", &dir, e)),
        };
        for e in rd {
            let e = e.map_err(|e| io_err(bench, "list", &dir, e))?;
            if e.file_type().map_err(|err| io_err(bench, "stat", &e.path(), err))?.is_dir() {
                dirs.push(e.path());
                continue;
            }
            let meta = e.metadata().map_err(|err| io_err(bench, "stat", &e.path(), err))?;
            visit(&dir, &e, &meta)?;
        }
    }
    Ok(())
}

/// The limit (see the module note) over `job` in the local store at `store`, keeping `kept`.
fn plain_pass(store: &Path, job: &str, kept: &[u64]) -> Result<Plain, ClientError> {
    let mut indexes: HashSet<ChunkHash> = HashSet::new();
    for &step in kept {
        let path = store.join(keys::manifest_key(job, step));
        let bytes = std::fs::read(&path).map_err(|e| io_err("GC", "read", &path, e))?;
        let root: Root = serde_json::from_slice(&bytes).map_err(|e| io_err("GC", "parse", &path, e))?;
        indexes.extend(root.ranks.iter().map(|r| r.hash));
    }
    let paths: Vec<PathBuf> = indexes.iter().map(|h| store.join(keys::index_key(job, h))).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let per_thread = paths.len().div_ceil(threads).max(1);
    let chunks: HashSet<ChunkHash> = std::thread::scope(|s| {
        let parts: Vec<_> = paths
            .chunks(per_thread)
            .map(|part| {
                s.spawn(move || {
                    let mut set = HashSet::new();
                    for p in part {
                        let bytes = std::fs::read(p).map_err(|e| io_err("GC", "read", p, e))?;
                        // Checked once against its address, as GC must before trusting it.
                        let name = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json"));
                        if name.and_then(|n| n.parse::<ChunkHash>().ok()) != Some(ChunkHash::of(&bytes)) {
                            return Err(io_err("GC", "check", p, "content does not hash to its name"));
                        }
                        let index: ShardIndex =
                            serde_json::from_slice(&bytes).map_err(|e| io_err("GC", "parse", p, e))?;
                        set.extend(index.chunk_hashes());
                    }
                    Ok::<_, ClientError>(set)
                })
            })
            .collect();
        let mut all = HashSet::new();
        for p in parts {
            all.extend(p.join().map_err(|_| ClientError::Internal("benchmark GC limit: a reader panicked".into()))??);
        }
        Ok::<_, ClientError>(all)
    })?;
    let (mut objects, mut unreferenced) = (0u64, 0u64);
    let job_dir = store.join(keys::job_prefix(job));
    let (chunks_dir, indexes_dir) = (store.join(keys::chunks_prefix(job)), store.join(keys::indexes_prefix(job)));
    walk_files("GC", &job_dir, &mut |dir, e, meta| {
        // What a listing carries; the limit pays for it as GC does.
        std::hint::black_box((meta.len(), meta.modified().ok()));
        let name = e.file_name();
        let name = name.to_string_lossy();
        let (set, hex) = match dir.parent() {
            Some(p) if p == chunks_dir => (&chunks, name.as_ref()),
            Some(p) if p == indexes_dir => (&indexes, name.strip_suffix(".json").unwrap_or(&name)),
            _ => return Ok(()),
        };
        // Other names there (a crash's temporary files) are not objects, as for GC.
        if let Ok(hash) = hex.parse::<ChunkHash>() {
            objects += 1;
            unreferenced += u64::from(!set.contains(&hash));
        }
        Ok(())
    })?;
    Ok(Plain { objects, index_objects: indexes.len() as u64, unreferenced })
}

/// Runs `f` and returns how much `pid`'s resident memory grew at its peak meanwhile, in MiB
/// (the kernel's high-water mark is reset first; None where that is not allowed).
async fn with_rss_growth<T>(
    pid: Option<u32>,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<(T, Option<f64>), ClientError> {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (proc(5)).
    let before = pid.filter(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok()).and_then(|p| {
        let rss = rss_bytes(p)?;
        Some((p, rss))
    });
    let out = f.await?;
    let growth = before.and_then(|(p, rss)| Some(crate::mib(peak_rss_bytes(p)?.saturating_sub(rss))));
    Ok((out, growth))
}

fn count(report: &serde_json::Value, field: &str) -> Result<u64, ClientError> {
    report["jobs"][0][field]
        .as_u64()
        .ok_or_else(|| ClientError::Protocol(format!("the GC report has no {field}: {report}")))
}

/// `runs` dry GC runs of `job` interleaved with the limit (alternating which goes first),
/// then, with `collect`, a real run that must delete root `collect.0` and condemn
/// `collect.1` objects, and a sweep of them once the grace period `grace` has passed.
pub async fn measure(
    daemon: &mut LocalDaemon,
    store: &Path,
    job: &str,
    kept: &[u64],
    runs: usize,
    collect: Option<(u64, u64, Duration)>,
) -> Result<GcRow, ClientError> {
    let limit = || {
        let (store, job, kept) = (store.to_path_buf(), job.to_string(), kept.to_vec());
        async move {
            let started = Instant::now();
            let plain = tokio::task::spawn_blocking(move || plain_pass(&store, &job, &kept))
                .await
                .map_err(|e| ClientError::Internal(format!("benchmark GC limit: {e}")))??;
            Ok::<_, ClientError>((started.elapsed().as_secs_f64(), plain))
        }
    };
    if !daemon.terminate(Duration::from_secs(60)).await {
        // Killed instead: what follows would measure a recovery from a crash.
        return Err(ClientError::Daemon("ckptd did not stop within 60 s of SIGTERM".into()));
    }
    daemon.restart().await?;
    let pid = daemon.pid();
    // It listens on another port now.
    let client = &Client::new(&daemon.url(), ClientOptions { node_local: false, ..ClientOptions::default() })?;
    // A first dry run, not timed: its memory is what GC takes on a fresh heap (the timed runs
    // after it reuse what it freed), and it warms the caches the runs before the restart had.
    let (_, mut growth) = with_rss_growth(pid, client.gc(Some(job), true)).await?;
    let (mut dry, mut limits, mut plain) = (Vec::new(), Vec::new(), None);
    for run in 0..runs {
        if run % 2 == 1 {
            let (s, p) = limit().await?;
            limits.push(s);
            plain = Some(p);
        }
        let started = Instant::now();
        let (report, g) = with_rss_growth(pid, client.gc(Some(job), true)).await?;
        dry.push(started.elapsed().as_secs_f64());
        growth = match (growth, g) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if run % 2 == 0 {
            let (s, p) = limit().await?;
            limits.push(s);
            plain = Some(p);
        }
        let p = plain.as_ref().expect("the limit ran in this round");
        if count(&report, "condemned_objects")? != p.unreferenced {
            return Err(ClientError::Protocol(format!(
                "GC's dry run would condemn {} objects of {job}, the plain pass found {} unreferenced: \
                 they did not do the same work",
                count(&report, "condemned_objects")?,
                p.unreferenced
            )));
        }
    }
    let plain = plain.unwrap_or(Plain { objects: 0, index_objects: 0, unreferenced: 0 });
    let mut row = GcRow {
        objects: plain.objects,
        index_objects_read: plain.index_objects,
        unreferenced: plain.unreferenced,
        dry_s: Samples(dry).median_min_max(),
        limit_s: Samples(limits).median_min_max(),
        dry_rss_growth_mib: growth,
        condemn: None,
        sweep: None,
    };
    if let Some((old_step, expect, grace)) = collect {
        let started = Instant::now();
        let (report, g) = with_rss_growth(pid, client.gc(Some(job), false)).await?;
        let condemned = count(&report, "condemned_objects")?;
        let deleted = report["jobs"][0]["checkpoints_deleted"].as_array().cloned().unwrap_or_default();
        if condemned != expect || deleted != [serde_json::json!(old_step)] {
            return Err(ClientError::Protocol(format!(
                "GC should have deleted step {old_step} and condemned {expect} objects of {job}: {report}"
            )));
        }
        row.condemn = Some(RealRun { s: started.elapsed().as_secs_f64(), objects: condemned, rss_growth_mib: g });
        tokio::time::sleep(grace).await;
        let started = Instant::now();
        let (report, g) = with_rss_growth(pid, client.gc(Some(job), false)).await?;
        let swept = count(&report, "swept_objects")?;
        if swept != expect {
            return Err(ClientError::Protocol(format!("GC should have swept {expect} objects of {job}: {report}")));
        }
        row.sweep = Some(RealRun { s: started.elapsed().as_secs_f64(), objects: swept, rss_growth_mib: g });
    }
    Ok(row)
}

/// The GC table's rows, one per world size (and the distinct-chunk save's, if any).
pub fn print(rows: &[(String, &GcRow)]) {
    println!("GC of the job: dry runs against their limit (median [min-max]), then retention's run and the sweep:");
    println!(
        "{:>15} {:>9} {:>9} {:>9} {:>22} {:>22} {:>6} {:>9} | {:>20} | {:>20}",
        "save",
        "objects",
        "idx read",
        "unref",
        "dry run",
        "limit: plain pass",
        "ratio",
        "dry +MiB",
        "condemn s, +MiB",
        "sweep s, +MiB"
    );
    let span = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} s [{lo:.2}-{hi:.2}]");
    let mib = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.0}"));
    let real = |r: &Option<RealRun>| match r {
        Some(r) => format!("{:.2} s, {} ({})", r.s, mib(r.rss_growth_mib), r.objects),
        None => "-".to_string(),
    };
    for (name, g) in rows {
        println!(
            "{:>15} {:>9} {:>9} {:>9} {:>22} {:>22} {:>6.2} {:>9} | {:>20} | {:>20}",
            name,
            g.objects,
            g.index_objects_read,
            g.unreferenced,
            span(g.dry_s),
            span(g.limit_s),
            g.dry_s.0 / g.limit_s.0.max(1e-9),
            mib(g.dry_rss_growth_mib),
            real(&g.condemn),
            real(&g.sweep)
        );
    }
    println!("(+MiB: how much ckptd's resident memory grew at the run's peak; in brackets after it, the objects condemned or swept)");
}
