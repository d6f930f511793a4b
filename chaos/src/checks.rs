//! The end-of-run checks of `ckpt-chaos run`: what the store and the rank logs say, not what
//! the harness believes happened.

use std::collections::BTreeSet;

use anyhow::Result;
use ckpt_chaos::taxonomy::Fault;
use ckpt_client::Client;

use crate::run::{chunk_hashes, FiredFault};

/// The store-side checks. Returns (committed steps, steps damaged by the harness, violations).
pub async fn check_store(
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
    // Every fault that must tear the group down did: an interruption was detected after it.
    let detected: Vec<u64> = goodput["interruptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["detected_unix_ms"].as_u64())
        .collect();
    for f in fired.iter().filter(|f| f.planned.fault.interrupts()) {
        let Some(t) = f.unix_ms else { continue };
        if !detected.iter().any(|d| *d >= t.saturating_sub(1_000) && *d <= t + 120_000) {
            violations.push(format!(
                "fault {} at step {} ({}) was not followed by an interruption and a resume",
                f.planned.fault.name(),
                f.planned.step,
                f.what
            ));
        }
    }
    Ok((committed, damaged, violations))
}
