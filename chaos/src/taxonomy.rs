//! The Llama 3 interruption taxonomy as data, and what each row is injected as here.
//!
//! `data/llama3_interruptions.csv` is Table 5 of "The Llama 3 Herd of Models" (Meta, 2024):
//! the root causes of the 419 unexpected interruptions in a 54-day snapshot of the 405B
//! pre-training run. Rows are weighted by their counts (the paper's percentages do not sum to
//! 100). Each row maps to injections this harness performs for real on one machine (see the
//! brief's fault model): the component is what broke, the fault is what happens to our
//! processes, sockets and files.

use serde::{Deserialize, Serialize};

const TABLE: &str = include_str!("../data/llama3_interruptions.csv");

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub category: String,
    pub interruptions: u32,
}

/// Something this harness does to a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL a rank at the start of a step.
    KillRank,
    /// SIGKILL a rank while its checkpoint upload runs.
    KillRankMidSave,
    /// A rank panics (a software bug, or an uncorrectable memory error aborting it).
    PanicRank,
    /// NaN in one rank's gradient (a memory error); the step must not be committed.
    NanRank,
    /// One bit flipped in one rank's replica of another rank's parameters.
    FlipReplicaBit,
    /// One bit flipped in a stored chunk of the newest checkpoint, then a rank killed so the
    /// restore must notice and fall back.
    FlipStoredBit,
    /// A stored chunk of the newest checkpoint truncated (a torn write), then a rank killed.
    TruncateStoredChunk,
    /// SIGSTOP a rank (hang); the collective watchdog must catch it.
    HangRank,
    /// A rank slowed down (thermal throttling); no false alarm.
    SlowRank,
    /// SIGSTOP a rank while its checkpoint upload is in flight.
    StopRankMidUpload,
    /// SIGTERM to every rank, SIGKILL after the grace period (host maintenance).
    HostMaintenance,
    /// Fault proxy between ranks and the collective hub: latency, reset, blackhole, bandwidth
    /// cap or corrupted bytes.
    NetworkHub,
    /// Fault proxy between ranks and ckptd.
    NetworkCkptd,
    /// The object store fails calls: 5xx, timeouts, a lost acknowledgement on the manifest
    /// write, a stale listing at a ckptd restart.
    StoreFault,
    /// SIGKILL ckptd, then restart it.
    KillCkptd,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::KillRank,
        Fault::KillRankMidSave,
        Fault::PanicRank,
        Fault::NanRank,
        Fault::FlipReplicaBit,
        Fault::FlipStoredBit,
        Fault::TruncateStoredChunk,
        Fault::HangRank,
        Fault::SlowRank,
        Fault::StopRankMidUpload,
        Fault::HostMaintenance,
        Fault::NetworkHub,
        Fault::NetworkCkptd,
        Fault::StoreFault,
        Fault::KillCkptd,
    ];

    /// Faults injected inside a rank (handed to the launcher as `--inject`).
    pub fn is_rank_fault(self) -> bool {
        matches!(
            self,
            Fault::KillRank
                | Fault::KillRankMidSave
                | Fault::PanicRank
                | Fault::NanRank
                | Fault::FlipReplicaBit
                | Fault::HangRank
                | Fault::SlowRank
                | Fault::StopRankMidUpload
        )
    }

    /// Faults after which the group must be torn down and resumed from a checkpoint.
    pub fn interrupts(self) -> bool {
        matches!(
            self,
            Fault::KillRank
                | Fault::KillRankMidSave
                | Fault::PanicRank
                | Fault::NanRank
                | Fault::FlipReplicaBit
                | Fault::HangRank
                | Fault::StopRankMidUpload
                | Fault::HostMaintenance
                | Fault::FlipStoredBit
                | Fault::TruncateStoredChunk
        )
    }

    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    }
}

/// The component name the service's own faults are reported under (not a row of the table).
pub const SERVICE: &str = "ckptd (the service itself)";

/// What a row is injected as; the schedule picks one of them.
pub fn faults_for(component: &str) -> &'static [Fault] {
    match component {
        "Faulty GPU" | "GPU System Processor" | "Power Supply" | "Server Chassis" | "CPU" => {
            &[Fault::KillRank, Fault::KillRank, Fault::KillRankMidSave]
        }
        "GPU HBM3 Memory" | "GPU SRAM Memory" | "System Memory" => &[Fault::PanicRank, Fault::NanRank],
        "Silent Data Corruption" => &[Fault::FlipReplicaBit, Fault::FlipStoredBit],
        "NCCL Watchdog Timeouts" => &[Fault::HangRank],
        "GPU Thermal Interface + Sensor" => &[Fault::SlowRank, Fault::HangRank],
        "Network Switch/Cable" | "NIC" => &[Fault::NetworkHub, Fault::NetworkCkptd],
        "Host Maintenance" => &[Fault::HostMaintenance],
        "SSD" | "IO Expansion Board" => &[Fault::TruncateStoredChunk, Fault::StopRankMidUpload],
        "Software Bug" | "Dependency" => &[Fault::PanicRank, Fault::StoreFault],
        SERVICE => &[Fault::KillCkptd],
        _ => &[Fault::KillRank],
    }
}

/// The 18 rows, in the table's order.
pub fn components() -> Vec<Component> {
    TABLE
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(Component { name: f[0].into(), category: f[1].into(), interruptions: f.get(2)?.parse().ok()? })
        })
        .collect()
}

/// Unexpected interruptions in the paper's 54-day snapshot (the sum of the counts).
pub fn total_interruptions() -> u32 {
    components().iter().map(|c| c.interruptions).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_its_18_rows_and_419_interruptions() {
        let c = components();
        assert_eq!(c.len(), 18);
        assert_eq!(total_interruptions(), 419);
        assert_eq!(c[0].name, "Faulty GPU");
        assert_eq!(c[0].interruptions, 148);
        for row in &c {
            assert!(!faults_for(&row.name).is_empty());
            assert_ne!(faults_for(&row.name), faults_for("no such row"), "{} has its own mapping", row.name);
        }
    }
}
