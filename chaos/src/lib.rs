//! ckpt-chaos: the Llama 3 interruption taxonomy injected into real runs of the embedded
//! trainer and ckptd, the checks that say whether they survived, a report, and a goodput
//! simulator for cluster scale.

pub mod proxy;
pub mod schedule;
pub mod simulate;
pub mod taxonomy;
