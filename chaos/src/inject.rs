//! The faults `ckpt-chaos run` does from outside the ranks: SIGKILL and restart of ckptd, armed
//! store faults, link faults in the proxies, host maintenance, damaged stored chunks. A fault
//! counts as injected only once it has acted on something (a fired store fault, a delayed or
//! corrupted read, a reset connection, a rank that reacted to SIGTERM).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_chaos::proxy::{Mode, Proxy, ProxyCounters};
use ckpt_chaos::schedule::PlannedFault;
use ckpt_chaos::taxonomy::Fault;
use ckpt_client::daemon::LocalDaemon;
use ckpt_client::{Client, ClientOptions};

use crate::run::{chunk_hashes, rank_pids, signal, RunOptions};

/// An external fault in progress: it counts only once it has acted on something.
pub(crate) struct Active {
    pub index: usize,
    pub kind: ActiveKind,
    /// When it has run its course (a link fault's duration, a grace period).
    pub until: Instant,
    pub give_up: Instant,
    pub started_unix_ms: u64,
}

pub(crate) enum ActiveKind {
    /// A proxy mode: it must have delayed, held, corrupted or reset something.
    Link { hub: bool, before: ProxyCounters },
    /// An armed store fault: ckptd must count it as fired.
    Store { key: String, before: u64 },
    /// Host maintenance: SIGKILL whatever is left when the grace period ends.
    Grace { pids: Vec<i32> },
}

/// How often ckptd says the store fault `key` fired.
pub(crate) async fn fired_count(url: &str, key: &str) -> Result<u64> {
    let v: serde_json::Value = reqwest::get(format!("{url}/v1/faults")).await?.json().await?;
    Ok(v["fired"][key].as_u64().unwrap_or(0))
}

async fn saves_in_flight(url: &str) -> Result<u64> {
    let v: serde_json::Value = reqwest::get(format!("{url}/v1/stats")).await?.json().await?;
    Ok(v["saves_in_flight"].as_u64().unwrap_or(0))
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn external(
    o: &RunOptions,
    f: &PlannedFault,
    daemon: &mut LocalDaemon,
    job: &str,
    store_dir: &Path,
    run_dir: &Path,
    ckptd_proxy: &Proxy,
    hub_proxy: &Proxy,
    damaged: &mut BTreeSet<ckpt_core::ChunkHash>,
) -> Result<(String, Option<(ActiveKind, Duration)>)> {
    let url = daemon.url();
    let arm = |fault: serde_json::Value, key: &'static str| {
        let url = url.clone();
        async move {
            let before = fired_count(&url, key).await?;
            let r = reqwest::Client::new().post(format!("{url}/v1/faults")).json(&fault).send().await?;
            if !r.status().is_success() {
                bail!("arming {fault}: {}", r.status());
            }
            let kind = ActiveKind::Store { key: key.to_string(), before };
            Ok::<_, anyhow::Error>((format!("armed {fault}"), Some((kind, Duration::ZERO))))
        }
    };
    match f.fault {
        Fault::KillCkptd => {
            // Mid-save: wait (a while) for a save in flight, so the kill interrupts one.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut mid_save = false;
            while Instant::now() < deadline {
                if saves_in_flight(&daemon.url()).await.unwrap_or(0) > 0 {
                    mid_save = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            daemon.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.restart().await?;
            ckptd_proxy.set_upstream(daemon.url().trim_start_matches("http://").to_string());
            let when = if mid_save { "with a save in flight" } else { "between saves (none started in 20 s)" };
            Ok((format!("ckptd SIGKILLed {when} and restarted on {}", daemon.url()), None))
        }
        Fault::StoreFault => match f.variant % 3 {
            0 => arm(serde_json::json!({"kind": "lost_ack", "op": "manifest"}), "lost_ack:manifest").await,
            1 => arm(serde_json::json!({"kind": "error", "op": "index", "count": 3}), "error:index").await,
            _ => {
                let opts = daemon.options_mut();
                opts.extra_args.retain(|a| a != "--fault-plan" && !a.to_string_lossy().starts_with('['));
                opts.extra_args.push("--fault-plan".into());
                opts.extra_args.push(r#"[{"kind":"stale_list","op":"list","count":1}]"#.into());
                daemon.restart().await?;
                // Only this start: later restarts list the store as it is.
                daemon
                    .options_mut()
                    .extra_args
                    .retain(|a| a != "--fault-plan" && !a.to_string_lossy().starts_with('['));
                ckptd_proxy.set_upstream(daemon.url().trim_start_matches("http://").to_string());
                let kind = ActiveKind::Store { key: "stale_list:list".into(), before: 0 };
                Ok(("ckptd restarted with its first listing stale".into(), Some((kind, Duration::ZERO))))
            }
        },
        Fault::NetworkHub | Fault::NetworkCkptd => {
            let (proxy, which) = if f.fault == Fault::NetworkHub { (hub_proxy, "hub") } else { (ckptd_proxy, "ckptd") };
            let to_hub = which == "hub";
            let before = proxy.counters();
            let kind = ActiveKind::Link { hub: to_hub, before };
            let mode = match f.variant % 5 {
                0 => Mode::Latency { ms: 30 },
                1 => {
                    proxy.reset();
                    return Ok((format!("{which} link reset"), Some((kind, Duration::ZERO))));
                }
                2 => Mode::Blackhole,
                3 => Mode::BandwidthCap { bytes_per_s: 4 << 20 },
                _ => Mode::Corrupt { reads: 2, upstream: true, downstream: to_hub },
            };
            proxy.set(mode);
            let lasts = Duration::from_millis(o.network_fault_ms);
            Ok((format!("{which} link: {mode:?} for {} ms", o.network_fault_ms), Some((kind, lasts))))
        }
        Fault::HostMaintenance => {
            // Another fault at the same step may have just ended the generation (the launcher
            // SIGKILLs every rank); maintenance then lands on the next one once it runs.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let pids = loop {
                let pids: Vec<i32> = rank_pids(run_dir, o.nproc)
                    .into_iter()
                    .filter(|&p| running(p) && signal(p, libc::SIGTERM))
                    .collect();
                if !pids.is_empty() {
                    break pids;
                }
                if std::time::Instant::now() >= deadline {
                    bail!("no live rank to send SIGTERM to within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let grace = Duration::from_millis(o.grace_ms);
            let what = format!("SIGTERM to ranks {pids:?}, SIGKILL after {} ms", o.grace_ms);
            Ok((what, Some((ActiveKind::Grace { pids }, grace))))
        }
        Fault::FlipStoredBit | Fault::TruncateStoredChunk => {
            let client = Client::new(&daemon.url(), ClientOptions::default())?;
            let list = client.list(job).await?;
            let step = list.committed.last().map(|m| m.step).context("nothing committed yet")?;
            let hashes = chunk_hashes(&client, job, step).await?;
            let h = *hashes.get(f.variant as usize % hashes.len().max(1)).context("the checkpoint has no chunks")?;
            let path = store_dir.join(ckpt_core::keys::chunk_key(job, &h));
            let mut bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let payload = bytes.len().checked_sub(ckpt_core::CHUNK_HEADER_BYTES).filter(|&n| n > 0);
            let payload = payload.with_context(|| format!("chunk {h} has no payload left to damage"))?;
            let what = if f.fault == Fault::FlipStoredBit {
                let at = ckpt_core::CHUNK_HEADER_BYTES + (f.variant as usize / 7) % payload;
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
            let victim = pids.get(f.rank.min(pids.len().saturating_sub(1)));
            if !victim.is_some_and(|&p| signal(p, libc::SIGKILL)) {
                bail!("{what}, but no live rank to kill");
            }
            Ok((format!("{what}; rank {} killed to force a restore", f.rank), None))
        }
        _ => bail!("{:?} is injected inside the ranks", f.fault),
    }
}

/// Whether `pid` is a process that can still act on a signal: alive and not a zombie waiting
/// to be reaped (a signal to a zombie "succeeds" and does nothing).
fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}
