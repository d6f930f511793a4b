//! The fault schedule: a Poisson process over training steps, components drawn by the table's
//! weights, everything from one seed.
//!
//! Faults are placed on steps, not wall-clock times, so the same seed gives the same schedule
//! on any machine: gaps between faults are exponential with mean `mean_steps_between`. A
//! stratified schedule (CI) takes its first faults from distinct components, cycling through
//! them in an order drawn from the seed, so a short run covers many rows; the rest are drawn
//! by weight. The service's own faults (a ckptd SIGKILL, a network fault) can be required.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::taxonomy::{components, faults_for, Fault, SERVICE};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleConfig {
    pub seed: u64,
    /// Faults land in 2..=last_step.
    pub last_step: u64,
    pub mean_steps_between: f64,
    /// At most this many faults (0: no cap).
    pub faults_max: usize,
    /// Draw the first faults from this many distinct components.
    pub stratify: usize,
    pub require_ckptd_kill: bool,
    pub require_network: bool,
    pub world: usize,
    pub ckpt_every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedFault {
    pub step: u64,
    pub component: String,
    pub category: String,
    pub fault: Fault,
    pub rank: usize,
    /// A variant drawn for faults that have several (which network fault, which store fault).
    pub variant: u32,
}

pub fn draw(cfg: &ScheduleConfig) -> Vec<PlannedFault> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let rows = components();
    let total: u32 = rows.iter().map(|c| c.interruptions).sum();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    // Fisher-Yates with the run's generator, so stratification is seeded too.
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut out = Vec::new();
    let mut at = 1.0f64;
    loop {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        at += -u.ln() * cfg.mean_steps_between;
        let step = at.ceil() as u64;
        if step > cfg.last_step || (cfg.faults_max > 0 && out.len() >= cfg.faults_max) {
            break;
        }
        let row = if out.len() < cfg.stratify {
            &rows[order[out.len() % order.len()]]
        } else {
            let mut pick = rng.random_range(0..total);
            let mut chosen = &rows[0];
            for r in &rows {
                if pick < r.interruptions {
                    chosen = r;
                    break;
                }
                pick -= r.interruptions;
            }
            chosen
        };
        let options = faults_for(&row.name);
        let fault = options[rng.random_range(0..options.len())];
        out.push(PlannedFault {
            step: step.max(2),
            component: row.name.clone(),
            category: row.category.clone(),
            fault,
            rank: rng.random_range(0..cfg.world),
            variant: rng.random_range(0..u32::MAX),
        });
    }
    let extra = |fault: Fault, component: &str, category: &str, rng: &mut ChaCha8Rng| PlannedFault {
        step: rng.random_range(2..=cfg.last_step.max(2)),
        component: component.into(),
        category: category.into(),
        fault,
        rank: rng.random_range(0..cfg.world),
        variant: rng.random_range(0..u32::MAX),
    };
    if cfg.require_ckptd_kill && !out.iter().any(|f| f.fault == Fault::KillCkptd) {
        let f = extra(Fault::KillCkptd, SERVICE, "Service", &mut rng);
        out.push(f);
    }
    if cfg.require_network && !out.iter().any(|f| matches!(f.fault, Fault::NetworkHub | Fault::NetworkCkptd)) {
        let f = extra(Fault::NetworkHub, "Network Switch/Cable", "Network", &mut rng);
        out.push(f);
    }
    for f in &mut out {
        // Faults tied to a checkpoint land on a checkpoint step.
        if matches!(f.fault, Fault::KillRankMidSave | Fault::StopRankMidUpload) {
            f.step = f.step.div_ceil(cfg.ckpt_every).max(1) * cfg.ckpt_every;
            f.step = f.step.min(cfg.last_step / cfg.ckpt_every * cfg.ckpt_every).max(cfg.ckpt_every);
        }
    }
    out.sort_by_key(|f| f.step);
    // One rank-internal fault per (rank, step): the trainer fires each injection once.
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|f| !f.fault.is_rank_fault() || seen.insert((f.rank, f.step)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> ScheduleConfig {
        ScheduleConfig {
            seed,
            last_step: 400,
            mean_steps_between: 12.0,
            faults_max: 0,
            stratify: 0,
            require_ckptd_kill: false,
            require_network: false,
            world: 2,
            ckpt_every: 10,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        assert_eq!(draw(&cfg(7)), draw(&cfg(7)));
        assert_ne!(draw(&cfg(7)), draw(&cfg(8)));
    }

    #[test]
    fn gaps_are_poisson_and_components_follow_the_weights() {
        let mut c = cfg(11);
        c.last_step = 2_000_000;
        let s = draw(&c);
        let mean_gap = c.last_step as f64 / s.len() as f64;
        assert!((mean_gap - 12.0).abs() < 0.5, "mean gap {mean_gap}");
        let gpu = s.iter().filter(|f| f.component == "Faulty GPU").count() as f64 / s.len() as f64;
        assert!((gpu - 148.0 / 419.0).abs() < 0.01, "faulty GPU share {gpu}");
    }

    #[test]
    fn a_stratified_schedule_covers_distinct_rows_and_the_required_service_faults() {
        let mut c = cfg(3);
        c.last_step = 160;
        c.stratify = 12;
        c.faults_max = 12;
        c.require_ckptd_kill = true;
        c.require_network = true;
        let s = draw(&c);
        let rows: std::collections::BTreeSet<&str> = s.iter().map(|f| f.component.as_str()).collect();
        assert!(rows.len() >= 6, "{rows:?}");
        assert!(s.iter().any(|f| f.fault == Fault::KillCkptd));
        assert!(s.iter().any(|f| matches!(f.fault, Fault::NetworkHub | Fault::NetworkCkptd)));
        assert!(s.windows(2).all(|w| w[0].step <= w[1].step));
    }
}
