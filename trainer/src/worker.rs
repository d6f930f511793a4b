//! One rank process.
//!
//! Design note. A rank owns `owned_range(P, rank, world)` of the flat parameter vector and the
//! AdamW moments for it (ZeRO): each step it computes the gradient of its share of the global
//! batch on a full copy of the parameters, reduce-scatters gradients so it receives the sum
//! for its own range, updates that range, and all-gathers the parameters back. Every K steps
//! it hands its owned state (parameters, both moments) to the `AsyncSaver`, which copies it and
//! saves it in the background; the sampler position, step and schedule go in the checkpoint's
//! shared metadata. Restoring reads the owned rows from a committed checkpoint through
//! `load_rows`, whatever world size wrote it, and verifies every chunk.
//!
//! Crash consistency: a rank writes nothing but checkpoints and its event log, so killing it at
//! any point loses at most the steps since the last commit. A non-finite gradient norm stops the
//! rank before the update, so non-finite state is never saved, and the owned state is checked
//! finite again before each save.
//!
//! Silent data corruption: after every all-gather, before the replica is used or a checkpoint
//! taken, `replica::check` compares every rank's copy with the owners' (fingerprints); a
//! mismatch stops every rank, naming the rank and the elements, and the launcher rolls back.
//!
//! Host maintenance: SIGTERM sets a flag that travels with the step's loss all-reduce, so
//! every rank learns of it at the same step; they take an emergency checkpoint there, wait
//! for its commit, and exit (the launcher restarts from it). A SIGKILL before the commit lands
//! leaves the previous checkpoint, as for any crash.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_client::{AsyncSaver, Client, ClientOptions, SaveTicket, TensorView, Wait};
use ckpt_core::DType;
use ckpt_trainer::collective::{Collective, HubClient, TAG_DONE, TAG_LOSS, TAG_READY};
use ckpt_trainer::data::{corpus, Sampler, SamplerState};
use ckpt_trainer::model::{init_params, param_ranges, Llama};
use ckpt_trainer::optim::{clip_factor, owned_range, AdamW};
use ckpt_trainer::replica;
use ckpt_trainer::spec::{CollectiveBackend, InjectKind, Injection, RunSpec};
use serde::{Deserialize, Serialize};

#[cfg(target_endian = "big")]
compile_error!("checkpoints store f32 little-endian; this trainer reinterprets memory in place");

/// The checkpoint's shared metadata: everything besides the owned tensors that a restore needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub sampler: SamplerState,
    pub seed: u64,
    pub param_count: u64,
    pub model: ckpt_trainer::config::ModelConfig,
    pub recipe: ckpt_trainer::config::Recipe,
    /// The learning rate the next step will use (the schedule position, for humans).
    pub next_lr: f32,
}

pub const TENSORS: [&str; 3] = ["params", "adam_m", "adam_v"];

/// Saves whose commit a rank has not waited for yet; one more waits for the oldest.
const SAVES_IN_FLIGHT_MAX: usize = 2;

fn as_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every bit pattern is a valid u8; the length covers exactly
    // the same memory, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// The bytes of `x`, to restore into. The checkpoint stores little-endian f32, which is the
/// memory layout only on little-endian hosts.
fn as_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    const _: () = assert!(cfg!(target_endian = "little"), "restoring in place assumes a little-endian host");
    // SAFETY: as `as_bytes`; additionally every bit pattern is a valid f32, so any bytes
    // written through the view leave valid floats.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Appends one JSON line per event to the rank's log; a line survives the process being killed
/// right after it is written.
struct Events {
    file: File,
    rank: usize,
    generation: u64,
}

impl Events {
    fn emit(&mut self, mut v: serde_json::Value) {
        crate::metrics::record(&v);
        if let Some(o) = v.as_object_mut() {
            o.insert("rank".into(), self.rank.into());
            o.insert("generation".into(), self.generation.into());
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            o.insert("unix_ms".into(), (now.as_millis() as u64).into());
        }
        let mut line = v.to_string();
        line.push('\n');
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot write the event log");
        }
    }
}

struct PendingSave {
    step: u64,
    ticket: SaveTicket,
}

/// The group's backend, joined over `hub` (which the NCCL backend keeps for control).
fn collective(hub: HubClient, backend: CollectiveBackend) -> Result<Box<dyn Collective>> {
    match backend {
        CollectiveBackend::Hub => Ok(Box::new(hub)),
        #[cfg(feature = "nccl")]
        CollectiveBackend::Nccl => {
            Ok(Box::new(ckpt_trainer::nccl::NcclCollective::join(hub).context("joining the NCCL communicator")?))
        }
        #[cfg(not(feature = "nccl"))]
        CollectiveBackend::Nccl => bail!("this ckpt-train was built without the `nccl` feature"),
    }
}

pub fn run(spec: &RunSpec, rank: usize) -> Result<()> {
    let started = Instant::now();
    // First thing: host maintenance may come while the rank is still starting up.
    let terminated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, terminated.clone()).context("handling SIGTERM")?;
    let world = spec.world;
    spec.run.recipe.validate(world).map_err(anyhow::Error::msg)?;
    spec.run.model.validate().map_err(anyhow::Error::msg)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(crate::report::events_path(&spec.run.run_dir, rank))
        .context("opening the event log")?;
    let mut events = Events { file, rank, generation: spec.generation };
    // Multi-threaded (one worker): restores run their reads on worker threads, and connections
    // opened here keep being driven while the rank computes.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // The generation is the fencing epoch: once the launcher starts the next generation, this
    // rank's saves are refused even if it never learns that it was replaced.
    let opts = ClientOptions {
        node_local: spec.run.node_local,
        epoch: Some(spec.generation),
        chunk_bytes: spec.run.chunk_bytes,
        ..Default::default()
    };
    let client = Client::new(&spec.run.server, opts)?;

    let p = spec.run.model.param_count() as usize;
    let mine = owned_range(p, rank, world);
    let mut hub =
        HubClient::connect(&spec.hub, rank, world, spec.generation, Duration::from_millis(spec.rank_timeout_ms))
            .context("joining the group")?;
    match ckpt_trainer::flight::Recorder::create(&ckpt_trainer::flight::path(&spec.run.run_dir, rank), spec.generation)
    {
        Ok(r) => hub.record_to(r),
        Err(e) => tracing::warn!(error = %e, "no flight recorder"),
    }
    let mut comm = collective(hub, spec.run.collective)?;
    let comm = comm.as_mut();

    let mut full: Vec<f32>;
    let mut own: Vec<f32>;
    let mut opt = AdamW::new(mine.clone(), &param_ranges(&spec.run.model));
    if spec.run.recipe.freeze_embeddings {
        opt.freeze(&param_ranges(&spec.run.model), |p| p.name == "tok_embeddings");
    }
    let mut sampler;
    let mut step;
    match spec.resume_step {
        None => {
            full = init_params(&spec.run.model, spec.run.seed);
            own = full[mine.clone()].to_vec();
            sampler = Sampler::new(spec.run.seed);
            step = 0;
        }
        Some(s) => {
            let m = rt.block_on(client.checkpoint(&spec.run.job, s))?;
            let state: TrainState = serde_json::from_value(m.metadata().get("trainer").cloned().unwrap_or_default())
                .with_context(|| format!("{}@{s} has no trainer state", spec.run.job))?;
            if state.model != spec.run.model || state.param_count != p as u64 || state.seed != spec.run.seed {
                bail!("{}@{s} was written by a different model or seed; refusing to resume from it", spec.run.job);
            }
            // Straight into the rank's own parameter and optimizer buffers, verified there.
            let load = |name: &str, into: &mut [f32]| -> Result<()> {
                let shape = m.root.tensor(name).map(|t| t.global_shape.clone()).unwrap_or_default();
                if shape != [p as u64] {
                    bail!("{name} in {}@{s} has shape {shape:?}, expected [{p}]", spec.run.job);
                }
                rt.block_on(client.load_rows_into(&m, name, mine.start as u64, as_bytes_mut(into)))?;
                Ok(())
            };
            own = vec![0.0; mine.len()];
            load("params", &mut own)?;
            load("adam_m", &mut opt.m)?;
            load("adam_v", &mut opt.v)?;
            full = vec![0.0; p];
            comm.all_gather(&own, &mut full)?;
            sampler = Sampler::restore(state.sampler);
            step = state.step;
        }
    }
    // The replica every rank starts from is checked like any other before it is used.
    replica::check(comm, &full, &own).map_err(|e| anyhow::anyhow!("{e} before the first step"))?;
    let model = Llama::new(&spec.run.model, &full, &ckpt_trainer::model::device()?)?;
    let restore_ms = started.elapsed().as_millis() as u64;
    comm.barrier(TAG_READY, step)?;
    events.emit(
        serde_json::json!({"kind": "ready", "step": step, "restore_ms": restore_ms, "resumed": spec.resume_step}),
    );

    let tokens = corpus(spec.run.seed, spec.run.corpus_bytes);
    let recipe = &spec.run.recipe;
    let share = recipe.global_batch / world;
    let mut grad_own = vec![0.0f32; mine.len()];
    let saver = AsyncSaver::new(client.clone(), 3 * 4 * mine.len()).with_change_detection(spec.run.change_detection);
    // Saves whose commit is still awaited, oldest first. A save needs only the staging buffer,
    // which the previous one releases once ckptd holds its bytes: the trainer does not wait for
    // a commit unless more than `SAVES_IN_FLIGHT_MAX` are outstanding.
    let mut pending: std::collections::VecDeque<PendingSave> = Default::default();
    let mut floor_buf = vec![1.0f32; 3 * mine.len()];
    let fire = |events: &mut Events, inj: &Injection, note: &str| {
        events.emit(serde_json::json!({"kind": "inject", "injection": inj.key(), "step": inj.step, "note": note}));
    };
    let injections: Vec<&Injection> = spec.injections.iter().filter(|i| i.rank == rank).collect();

    while step < spec.run.until_step {
        step += 1;
        let mut poison = false;
        let mut flip = None;
        for inj in injections.iter().filter(|i| i.step == step) {
            match inj.kind {
                InjectKind::Kill => {
                    fire(&mut events, inj, "");
                    raise(libc::SIGKILL);
                }
                InjectKind::Hang => {
                    fire(&mut events, inj, "");
                    raise(libc::SIGSTOP);
                }
                InjectKind::Slow(ms) => {
                    fire(&mut events, inj, "");
                    std::thread::sleep(Duration::from_millis(ms));
                }
                InjectKind::Panic => {
                    fire(&mut events, inj, "");
                    panic!("injected panic at step {step}");
                }
                InjectKind::Abort(ms) => {
                    fire(&mut events, inj, &format!("abort in {ms} ms"));
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(ms));
                        eprintln!("injected abort, {ms} ms into step {step}");
                        std::process::abort();
                    });
                }
                InjectKind::Nan => {
                    fire(&mut events, inj, "");
                    poison = true;
                }
                InjectKind::Sdc => flip = Some(*inj),
                InjectKind::KillSave | InjectKind::KillCommit | InjectKind::StopSave => {}
            }
        }
        let step_started = Instant::now();
        let offsets = sampler.next_batch(tokens.len(), recipe.global_batch, recipe.seq_len);
        let windows: Vec<Vec<u32>> = offsets[rank * share..(rank + 1) * share]
            .iter()
            .map(|&o| tokens[o..o + recipe.seq_len + 1].to_vec())
            .collect();
        let (loss, mut grad) = model.loss_and_grad(&windows)?;
        if poison {
            grad[0] = f32::NAN;
        }
        comm.reduce_scatter_sum(&grad, &mut grad_own)?;
        opt.mask_frozen(&mut grad_own);
        let scale = 1.0 / world as f32;
        let mut sq = [0.0f32];
        for g in grad_own.iter_mut() {
            *g *= scale;
            sq[0] += *g * *g;
        }
        comm.all_reduce_sum(&mut sq, 0, step)?;
        let norm = sq[0].sqrt();
        if !norm.is_finite() {
            events.emit(serde_json::json!({"kind": "nonfinite", "step": step}));
            bail!("non-finite gradient norm at step {step}; stopping before the update so it is never saved");
        }
        opt.step(&mut own, &grad_own, step, recipe, clip_factor(norm, recipe.grad_clip));
        comm.all_gather(&own, &mut full)?;
        if let Some(inj) = flip {
            // A bit of another rank's slice, in this rank's copy only.
            let other = owned_range(p, (rank + 1) % world, world);
            let at = other.start + (step as usize * 7919) % other.len();
            full[at] = f32::from_bits(full[at].to_bits() ^ (1 << 20));
            fire(&mut events, inj, &format!("flipped bit 20 of params[{at}] in this rank's replica"));
        }
        if let Err(e) = replica::check(comm, &full, &own) {
            if let replica::ReplicaError::Mismatch(m) = &e {
                events.emit(serde_json::json!({
                    "kind": "sdc_detected", "step": step, "victim": m.rank, "owner": m.owner,
                    "tensor": m.tensor, "elements": [m.elements.start, m.elements.end],
                }));
            }
            bail!("{e} at step {step}; stopping before the replica is used or saved");
        }
        model.set_params(&full)?;
        // The loss, and whether this rank was told to stop (SIGTERM): every rank learns of a
        // preemption at the same step.
        let mut l = [loss, if terminated.load(std::sync::atomic::Ordering::Relaxed) { 1.0 } else { 0.0 }];
        comm.all_reduce_sum(&mut l, TAG_LOSS, step)?;
        let preempted = l[1] > 0.0;
        let step_ms = step_started.elapsed().as_secs_f64() * 1e3;

        // Whether background save work ran during this step (its time is compared with steps
        // without, to show what checkpointing costs the steps themselves).
        let in_flight = pending.iter().any(|p| !p.ticket.is_done());
        while pending.front().is_some_and(|p| p.ticket.is_done()) {
            if let Some(done) = pending.pop_front() {
                finish_save(&rt, &mut events, done);
            }
        }
        if step % spec.run.ckpt_every == 0 || step == spec.run.until_step || preempted {
            if [&own, &opt.m, &opt.v].iter().any(|t| t.iter().any(|x| !x.is_finite())) {
                events.emit(serde_json::json!({"kind": "nonfinite", "step": step}));
                bail!("non-finite values in the state of step {step}; it is not saved");
            }
            // A wait the trainer really has when saves pile up: the oldest must commit first.
            let prev_started = Instant::now();
            while pending.len() >= SAVES_IN_FLIGHT_MAX {
                if let Some(oldest) = pending.pop_front() {
                    finish_save(&rt, &mut events, oldest);
                }
            }
            let prev_wait = prev_started.elapsed();
            let state = TrainState {
                step,
                sampler: sampler.state(),
                seed: spec.run.seed,
                param_count: p as u64,
                model: spec.run.model.clone(),
                recipe: recipe.clone(),
                next_lr: recipe.lr(step + 1),
            };
            let save_spec = ckpt_client::SaveSpec {
                job: spec.run.job.clone(),
                step,
                rank: rank as u32,
                world_size: world as u32,
                metadata: serde_json::json!({ "trainer": state }),
                rank_metadata: serde_json::json!({ "owned": [mine.start, mine.end] }),
                created_unix_ms: None,
                node_ranks: None,
            };
            // A kill during the commit must land while the step is uncommitted: the victim's index
            // has to be in and not be the last. So at that step the other ranks start their saves
            // only after the victim's index is accepted (a barrier the victim joins just before it
            // dies); the step then commits, or not, without it.
            let commit_victim = spec.injections.iter().find(|i| i.step == step && i.kind == InjectKind::KillCommit);
            let kill_commit = commit_victim.filter(|i| i.rank == rank);
            if commit_victim.is_some() && kill_commit.is_none() {
                comm.barrier(0, step)?;
            }
            let kill_save = injections.iter().find(|i| i.step == step && i.kind == InjectKind::KillSave);
            let stop_save = injections.iter().find(|i| i.step == step && i.kind == InjectKind::StopSave);
            fn view<'a>(name: &'a str, data: &'a [f32], dims: &'a [[u64; 1]; 3]) -> TensorView<'a> {
                TensorView {
                    name,
                    dtype: DType::F32,
                    shape: &dims[0],
                    global_shape: &dims[1],
                    offsets: &dims[2],
                    data: as_bytes(data),
                }
            }
            let dims = [[mine.len() as u64], [p as u64], [mine.start as u64]];
            let wait = if kill_commit.is_some() { Wait::Staged } else { Wait::Committed };
            let views =
                [view(TENSORS[0], &own, &dims), view(TENSORS[1], &opt.m, &dims), view(TENSORS[2], &opt.v, &dims)];
            if let Some(r) = comm.recorder() {
                r.mark(ckpt_trainer::flight::Kind::SaveStarted, step, 3 * 4 * mine.len() as u64);
            }
            let ticket = rt.block_on(saver.save(save_spec, &views, wait))?;
            if let Some(r) = comm.recorder() {
                r.mark(ckpt_trainer::flight::Kind::SaveHandedOff, step, ticket.bytes);
            }
            // The physical floor of this stall, measured right after it on the same bytes: a plain
            // copy of the three slices into a buffer that is already paged in.
            let floor_ms = memcpy_ms(&[&own, &opt.m, &opt.v], &mut floor_buf);
            let wait = prev_wait + ticket.waited + ticket.stall;
            events.emit(serde_json::json!({
                "kind": "save", "step": step, "stall_ms": ticket.stall.as_secs_f64() * 1e3,
                "waited_ms": ticket.waited.as_secs_f64() * 1e3, "prev_wait_ms": prev_wait.as_secs_f64() * 1e3,
                "wait_ms": wait.as_secs_f64() * 1e3, "bytes": ticket.bytes, "step_ms": step_ms,
                "memcpy_ms": floor_ms, "in_flight": in_flight,
                "chunks_copied": ticket.chunks_copied, "chunks_unchanged": ticket.chunks_unchanged,
                "detect_ms": ticket.detect.as_secs_f64() * 1e3, "change_detection": spec.run.change_detection,
            }));
            if let Some(inj) = kill_save {
                fire(&mut events, inj, "upload in flight");
                raise(libc::SIGKILL);
            }
            if let Some(inj) = stop_save {
                fire(&mut events, inj, "upload in flight");
                raise(libc::SIGSTOP);
            }
            match kill_commit {
                Some(inj) => {
                    let report = rt.block_on(ticket.finish())?;
                    fire(&mut events, inj, &format!("own index accepted; step {}", report.status.phase.name()));
                    comm.barrier(0, step)?;
                    raise(libc::SIGKILL);
                }
                None => pending.push_back(PendingSave { step, ticket }),
            }
            if preempted {
                let mut committed = true;
                while let Some(prev) = pending.pop_front() {
                    committed &= finish_save(&rt, &mut events, prev);
                }
                events.emit(serde_json::json!({"kind": "preempted", "step": step, "committed": committed}));
                bail!(
                    "preempted (SIGTERM): emergency checkpoint at step {step} {}",
                    if committed { "committed" } else { "failed" }
                );
            }
        } else {
            events.emit(serde_json::json!({"kind": "step", "step": step, "step_ms": step_ms, "in_flight": in_flight}));
        }
    }
    while let Some(prev) = pending.pop_front() {
        let (step, last) = (prev.step, pending.is_empty());
        if !finish_save(&rt, &mut events, prev) && last {
            bail!("the final checkpoint (step {step}) did not commit");
        }
    }
    if rank == 0 {
        let hash = blake3::hash(as_bytes(&full));
        let line = serde_json::json!({"step": step, "weights_blake3": hash.to_hex().to_string()});
        std::fs::write(spec.run.run_dir.join("final.json"), line.to_string()).context("writing final.json")?;
    }
    comm.barrier(TAG_DONE, step)?;
    events.emit(serde_json::json!({"kind": "done", "step": step, "peak_rss_bytes": ckpt_client::daemon::peak_rss_bytes(std::process::id())}));
    Ok(())
}

/// Waits for a background save and logs how it ended. Returns whether it committed.
fn finish_save(rt: &tokio::runtime::Runtime, events: &mut Events, prev: PendingSave) -> bool {
    match rt.block_on(prev.ticket.finish()) {
        Ok(r) => {
            events.emit(serde_json::json!({
                "kind": "committed", "step": prev.step, "save_ms": r.elapsed_ms,
                "bytes_sent": r.bytes_sent, "bytes_total": r.bytes_total,
                "chunks_total": r.chunks_total, "chunks_reused": r.chunks_reused,
            }));
            true
        }
        Err(e) => {
            // Training goes on: the next checkpoint is another chance, and the launcher only
            // ever restores committed steps.
            tracing::error!(step = prev.step, error = %e, "checkpoint failed");
            events.emit(serde_json::json!({"kind": "save_failed", "step": prev.step, "error": e.to_string()}));
            false
        }
    }
}

/// Milliseconds to copy `parts` into `dst`, which the caller keeps paged in.
fn memcpy_ms(parts: &[&[f32]], dst: &mut [f32]) -> f64 {
    let t = Instant::now();
    let mut at = 0;
    for p in parts {
        dst[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64() * 1e3
}

fn raise(sig: i32) {
    // SAFETY: raise has no memory-safety preconditions.
    unsafe {
        libc::raise(sig);
    }
}

pub fn spec_from_file(path: &std::path::Path) -> Result<RunSpec> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}
