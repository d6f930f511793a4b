//! What the launcher tells each rank process: one JSON file per generation.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, Recipe};

/// What every generation of a run shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub job: String,
    pub server: String,
    pub seed: u64,
    pub model: ModelConfig,
    pub recipe: Recipe,
    pub ckpt_every: u64,
    /// The run stops (with a checkpoint) after this step; at most `recipe.steps`.
    pub until_step: u64,
    /// Rank logs, event logs, generation specs and the goodput report.
    pub run_dir: PathBuf,
    pub corpus_bytes: usize,
    /// Whether ranks may use the node-local path to ckptd (off: every byte goes over HTTP, as
    /// to a remote ckptd; chaos runs put a fault proxy there).
    #[serde(default = "yes")]
    pub node_local: bool,
    /// Size of the chunks checkpoints are cut into (the unit of change detection and dedup).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u64,
    /// How a save finds the chunks that did not change since the last one.
    #[serde(default = "fingerprints")]
    pub change_detection: ckpt_client::ChangeDetection,
    /// Which backend carries the ranks' collectives.
    #[serde(default)]
    pub collective: CollectiveBackend,
}

/// The CPU hub is the default and the reference; NCCL (feature `nccl`) moves the data between
/// GPUs and keeps the hub for control (`ckpt_trainer::nccl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CollectiveBackend {
    #[default]
    Hub,
    Nccl,
}

fn default_chunk_bytes() -> u64 {
    4 << 20
}

fn fingerprints() -> ckpt_client::ChangeDetection {
    ckpt_client::ChangeDetection::Fingerprint
}

fn yes() -> bool {
    true
}

/// One generation's instructions to its ranks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub run: RunConfig,
    pub world: usize,
    pub generation: u64,
    pub hub: String,
    /// The committed checkpoint to restore, or None to start from the seed.
    pub resume_step: Option<u64>,
    /// How long a rank waits on the hub before giving up (longer than the hub's own timeouts).
    pub rank_timeout_ms: u64,
    pub injections: Vec<Injection>,
}

/// A fault a rank injects into itself, for tests and the demo. Each fires once per run: the
/// launcher drops it from later generations once the rank has logged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injection {
    pub kind: InjectKind,
    pub rank: usize,
    pub step: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InjectKind {
    /// SIGKILL at the start of the step (a failed GPU or host).
    Kill,
    /// SIGKILL just after the checkpoint of this step was copied, while its upload runs.
    KillSave,
    /// SIGKILL once this rank's part of the checkpoint is accepted, before the step commits (the
    /// other ranks start their saves only after the victim's index is in).
    KillCommit,
    /// SIGSTOP at the start of the step (a hung rank; the collective timeout must catch it).
    Hang,
    /// Sleep this many milliseconds at the start of the step (a slow rank; no restart).
    Slow(u64),
    /// Panic at the start of the step (a software bug).
    Panic,
    /// Abort the process this many milliseconds into the step, wherever it is then (inside a
    /// collective, the compute, a save): a crash at a random point.
    Abort(u64),
    /// Poison this rank's gradient with NaN (a memory error); the step must not be committed.
    Nan,
    /// Flip one bit of this rank's replica of another rank's parameters right after the
    /// all-gather (silent data corruption); the replica check must catch it before any use.
    Sdc,
    /// SIGSTOP while this step's checkpoint upload is in flight (a rank hung mid-upload).
    StopSave,
}

impl Injection {
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, arg) = match self.kind {
            InjectKind::Kill => ("kill", None),
            InjectKind::KillSave => ("kill-save", None),
            InjectKind::KillCommit => ("kill-commit", None),
            InjectKind::Hang => ("hang", None),
            InjectKind::Slow(ms) => ("slow", Some(ms)),
            InjectKind::Panic => ("panic", None),
            InjectKind::Abort(ms) => ("abort", Some(ms)),
            InjectKind::Nan => ("nan", None),
            InjectKind::Sdc => ("sdc", None),
            InjectKind::StopSave => ("stop-save", None),
        };
        write!(f, "{name}@{}:{}", self.rank, self.step)?;
        if let Some(a) = arg {
            write!(f, ":{a}")?;
        }
        Ok(())
    }
}

impl FromStr for Injection {
    type Err = String;

    /// `KIND@RANK:STEP`, or `slow@RANK:STEP:MILLIS`.
    fn from_str(s: &str) -> Result<Injection, String> {
        let usage = || {
            format!(
                "{s:?}: expected KIND@RANK:STEP (kill, kill-save, kill-commit, stop-save, hang, panic, nan, sdc) or slow@RANK:STEP:MS, abort@RANK:STEP:MS"
            )
        };
        let (name, rest) = s.split_once('@').ok_or_else(usage)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<u64>().ok()).ok_or_else(usage);
        let kind = match (name, parts.len()) {
            ("kill", 2) => InjectKind::Kill,
            ("kill-save", 2) => InjectKind::KillSave,
            ("kill-commit", 2) => InjectKind::KillCommit,
            ("hang", 2) => InjectKind::Hang,
            ("panic", 2) => InjectKind::Panic,
            ("nan", 2) => InjectKind::Nan,
            ("sdc", 2) => InjectKind::Sdc,
            ("stop-save", 2) => InjectKind::StopSave,
            ("slow", 3) => InjectKind::Slow(num(2)?),
            ("abort", 3) => InjectKind::Abort(num(2)?),
            _ => return Err(usage()),
        };
        let step = num(1)?;
        if step == 0 {
            return Err(format!("{s:?}: steps start at 1"));
        }
        Ok(Injection { kind, rank: num(0)? as usize, step })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_parse_and_print() {
        for s in [
            "kill@1:7",
            "kill-save@0:8",
            "kill-commit@3:12",
            "hang@1:5",
            "slow@0:4:900",
            "panic@2:3",
            "nan@0:9",
            "sdc@1:6",
            "stop-save@0:20",
            "abort@1:9:120",
        ] {
            assert_eq!(s.parse::<Injection>().unwrap().to_string(), s);
        }
        for bad in ["kill", "kill@x:1", "slow@1:2", "boom@1:2", "kill@1:0", "kill@1:2:3"] {
            assert!(bad.parse::<Injection>().is_err(), "{bad}");
        }
    }
}
