//! The embedded trainer: a small Llama 3 model trained by data-parallel rank processes with
//! ZeRO-sharded state, checkpointed asynchronously through ckptd, restarted by an elastic
//! agent from the last committed checkpoint when a rank dies or hangs.

pub mod collective;
pub mod config;
pub mod data;
pub mod model;
pub mod optim;
pub mod spec;
