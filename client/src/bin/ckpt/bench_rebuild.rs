//! A job's index rebuilt from the store at the scale of a 405B job, for `ckpt bench-scale`: what
//! a damaged index (set aside at start-up, `on_damaged_index = "rebuild"`) or a lost state disk
//! adds to ckptd's start. ckptd is stopped cleanly, its index removed, and started again; the
//! time runs from the start of the process to its listening, recovery included. A plain
//! restart (index kept) is timed in the same rounds, so the difference is the rebuild's.
//!
//! The limit is what no rebuild can avoid, done the plainest way on the same files: the job's
//! chunk and root directories walked with each file's size (one thread), and each root read.
//! sled's writes of the records are not in it. Its count of chunks must equal the chunks the
//! rebuild reports indexing, or the two did different work and the benchmark fails.

use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_client::daemon::LocalDaemon;
use ckpt_client::ClientError;
use ckpt_core::keys;

use crate::bench::Samples;
use crate::bench_gc::{io_err, walk_files};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildRow {
    /// Chunks the rebuild put back into the index (every job in the store).
    pub chunks: u64,
    /// (median, min, max) seconds of `runs` interleaved rounds each.
    pub rebuild_s: (f64, f64, f64),
    pub restart_s: (f64, f64, f64),
    pub limit_s: (f64, f64, f64),
}

/// The limit (see the module note) over every job in the local store at `store`: chunks found.
fn plain_listing(store: &Path) -> Result<u64, ClientError> {
    let jobs_dir = store.join(keys::JOBS_PREFIX);
    let mut chunks = 0;
    for job in std::fs::read_dir(&jobs_dir).map_err(|e| io_err("rebuild", "list", &jobs_dir, e))? {
        let job = job.map_err(|e| io_err("rebuild", "list", &jobs_dir, e))?.file_name().to_string_lossy().into_owned();
        walk_files("rebuild", &store.join(keys::manifests_prefix(&job)), &mut |_, e, _| {
            let p = e.path();
            std::hint::black_box(std::fs::read(&p).map_err(|e| io_err("rebuild", "read", &p, e))?);
            Ok(())
        })?;
        walk_files("rebuild", &store.join(keys::chunks_prefix(&job)), &mut |_, _, meta| {
            std::hint::black_box(meta.len());
            chunks += 1;
            Ok(())
        })?;
    }
    Ok(chunks)
}

/// Seconds for one start of `daemon` (stopped cleanly first), with its index removed when
/// `rebuild`; and the start's log.
async fn timed_start(daemon: &mut LocalDaemon, rebuild: bool) -> Result<(f64, String), ClientError> {
    if !daemon.terminate(Duration::from_secs(60)).await {
        // Killed instead: the start would recover from a crash.
        return Err(ClientError::Daemon("ckptd did not stop within 60 s of SIGTERM".into()));
    }
    let index = daemon.options().data_dir.join("index");
    if rebuild {
        std::fs::remove_dir_all(&index).map_err(|e| io_err("rebuild", "remove", &index, e))?;
    }
    let log = daemon.options().log_file.clone();
    let logged = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
    let started = Instant::now();
    daemon.restart().await?;
    let s = started.elapsed().as_secs_f64();
    let text = std::fs::read(&log).map_err(|e| io_err("rebuild", "read", &log, e))?;
    Ok((s, String::from_utf8_lossy(text.get(logged..).unwrap_or_default()).into_owned()))
}

/// `chunks_indexed: N` of the start-up report in `log`.
fn chunks_indexed(log: &str) -> Option<u64> {
    let at = log.rfind("chunks_indexed: ")? + "chunks_indexed: ".len();
    log[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

pub async fn measure(daemon: &mut LocalDaemon, store: &Path, runs: usize) -> Result<RebuildRow, ClientError> {
    // A rebuild of millions of chunk records takes longer than an ordinary start.
    daemon.options_mut().start_timeout = Duration::from_secs(1800);
    let (mut rebuilds, mut restarts, mut limits, mut chunks) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for run in 0..runs {
        // The listing runs before the two starts in odd rounds and after them in even ones, so it
        // does not always follow the same one.
        let limit = || {
            let store = store.to_path_buf();
            async move {
                let started = Instant::now();
                let n = tokio::task::spawn_blocking(move || plain_listing(&store))
                    .await
                    .map_err(|e| ClientError::Internal(format!("benchmark rebuild limit: {e}")))??;
                Ok::<_, ClientError>((started.elapsed().as_secs_f64(), n))
            }
        };
        if run % 2 == 1 {
            let (s, n) = limit().await?;
            limits.push(s);
            chunks = n;
        }
        let (s, log) = timed_start(daemon, true).await?;
        let indexed = chunks_indexed(&log).filter(|_| log.contains("rebuilt: true"));
        rebuilds.push(s);
        restarts.push(timed_start(daemon, false).await?.0);
        if run % 2 == 0 {
            let (s, n) = limit().await?;
            limits.push(s);
            chunks = n;
        }
        if indexed != Some(chunks) {
            return Err(ClientError::Protocol(format!(
                "ckptd's start indexed {indexed:?} chunks from the store, the plain listing found {chunks}: \
                 they did not do the same work"
            )));
        }
    }
    Ok(RebuildRow {
        chunks,
        rebuild_s: Samples(rebuilds).median_min_max(),
        restart_s: Samples(restarts).median_min_max(),
        limit_s: Samples(limits).median_min_max(),
    })
}
