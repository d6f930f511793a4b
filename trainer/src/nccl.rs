//! The NCCL backend of `Collective` (feature `nccl`): the data moves through NCCL on the rank's
//! GPU, the control through the launcher's hub.
//!
//! Design note. The hub is more than a reducer: it is how the launcher sees the group. Step
//! completions (the `TAG_LOSS` all-reduce), the ready and done barriers and the watchdog's
//! clocks all come from frames the hub receives. So this backend keeps its `HubClient` and
//! sends every tagged call and every barrier there; what goes to NCCL is the bulk traffic
//! (reduce-scatter of gradients, all-gather of parameters, broadcasts and untagged all-reduces).
//! That is the shape of a real job: a small store for rendezvous and control beside NCCL for the
//! tensors.
//!
//! Rendezvous. Rank 0 makes NCCL's unique id and the hub broadcasts it (128 bytes, each one an
//! exact f32), then every rank joins the communicator on GPU `rank % gpus`, through a bare CUDA
//! context (NCCL needs none of the kernels, so no NVRTC). A group cannot put two ranks on one
//! GPU (NCCL refuses it), so a world larger than the GPU count is refused before NCCL is asked.
//! A rank that fails before the broadcast drops its hub connection; the hub fails the round
//! and the other ranks' joins end with that error, so nobody waits in NCCL's init.
//!
//! Watchdog. An NCCL call has no timeout of its own, and while the ranks wait inside one no hub
//! round starts, so the per-round clock does not run: a hang is caught by the hub's idle clock
//! (`idle_timeout`, longer), after which the launcher kills the generation's processes, NCCL
//! calls and all; the next generation makes a new communicator. A rank orphaned inside an NCCL
//! call is likewise ended by the launcher, not by `rank_timeout`. To keep the diagnosis, the
//! flight recorder moves from the hub to this backend, which records every call, NCCL's and the
//! hub's, under one sequence number: the rank that never arrived is still named.
//!
//! Reproducibility. With one rank every operation is a copy, so results equal the CPU hub's bit
//! for bit. With several, NCCL sums in its own order (ring or tree), so a run is reproducible on
//! the same hardware and world size but not equal in the last bit to a hub run; the hub stays
//! the reference.

use ckpt_kernels::cuda::CudaError;
use ckpt_kernels::nccl::{nccl_present, NcclRank, UniqueId};

use crate::collective::{Collective, CollectiveError, HubClient, Result};
use crate::flight::{Kind, Recorder};

/// Why a rank could not join the NCCL communicator.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("sharing NCCL's unique id through the hub: {0}")]
    Hub(#[from] CollectiveError),
}

/// How many GPUs this process can see (0 without a driver).
pub fn gpu_count() -> usize {
    ckpt_kernels::cuda::device_count().unwrap_or(0)
}

/// Whether `ranks` ranks can run on NCCL here (a GPU each, and the library); the GPU count.
pub fn check(ranks: usize) -> std::result::Result<usize, CudaError> {
    let gpus = gpu_count();
    if gpus == 0 {
        return Err(CudaError::NoDevice);
    }
    if ranks > gpus {
        return Err(CudaError::Invalid(format!(
            "the NCCL backend puts one rank on each GPU: {ranks} ranks, {gpus} GPUs here"
        )));
    }
    if !nccl_present() {
        return Err(CudaError::NoNccl);
    }
    Ok(gpus)
}

pub struct NcclCollective {
    hub: HubClient,
    nccl: NcclRank,
    recorder: Option<Recorder>,
    /// Calls made, hub and NCCL alike: the sequence number of the flight recorder.
    calls: u64,
}

impl NcclCollective {
    /// Joins the group's NCCL communicator through `hub`, which every rank of the world must
    /// have connected. The checks that can fail on one rank fail on all (they depend only on
    /// the machine), before anything is exchanged.
    pub fn join(mut hub: HubClient) -> std::result::Result<NcclCollective, JoinError> {
        let (rank, world) = (hub.rank(), hub.world());
        let gpus = check(world)?;
        let ctx = ckpt_kernels::cuda::context(rank % gpus)?;
        let mut id = [0f32; 128];
        if rank == 0 {
            for (v, b) in id.iter_mut().zip(UniqueId::new()?.0) {
                *v = b as f32;
            }
        }
        hub.broadcast(&mut id, 0)?;
        let mut bytes = [0u8; 128];
        for (b, v) in bytes.iter_mut().zip(id) {
            *b = v as u8;
        }
        let nccl = NcclRank::join(&ctx, rank, world, UniqueId(bytes))?;
        let recorder = hub.take_recorder();
        Ok(NcclCollective { hub, nccl, recorder, calls: 0 })
    }

    fn begin(&mut self, kind: Kind, step: u64, elems: usize) -> Option<usize> {
        self.calls += 1;
        let (seq, bytes) = (self.calls, 4 * elems as u64);
        self.recorder.as_mut().map(|r| r.start(kind, seq, step, bytes))
    }

    fn finish<T>(&mut self, slot: Option<usize>, out: Result<T>) -> Result<T> {
        if let (Some(r), Some(slot), true) = (self.recorder.as_mut(), slot, out.is_ok()) {
            r.end(slot);
        }
        out
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.hub.rank()
    }

    fn world(&self) -> usize {
        self.hub.world()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32], tag: u8, step: u64) -> Result<()> {
        let slot = self.begin(Kind::AllReduce, step, data.len());
        let out = if tag != 0 {
            self.hub.all_reduce_sum(data, tag, step)
        } else {
            self.nccl.all_reduce_sum(data).map_err(CollectiveError::from)
        };
        self.finish(slot, out)
    }

    fn reduce_scatter_sum(&mut self, full: &[f32], out: &mut [f32]) -> Result<()> {
        let slot = self.begin(Kind::ReduceScatter, 0, full.len());
        let r = self.nccl.reduce_scatter_sum(full, out).map_err(CollectiveError::from);
        self.finish(slot, r)
    }

    fn all_gather(&mut self, mine: &[f32], full: &mut [f32]) -> Result<()> {
        let slot = self.begin(Kind::AllGather, 0, full.len());
        let r = self.nccl.all_gather(mine, full).map_err(CollectiveError::from);
        self.finish(slot, r)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let slot = self.begin(Kind::Broadcast, 0, data.len());
        let r = self.nccl.broadcast(data, root).map_err(CollectiveError::from);
        self.finish(slot, r)
    }

    fn barrier(&mut self, tag: u8, step: u64) -> Result<()> {
        let slot = self.begin(Kind::Barrier, step, 0);
        let r = self.hub.barrier(tag, step);
        self.finish(slot, r)
    }

    fn recorder(&mut self) -> Option<&mut Recorder> {
        self.recorder.as_mut()
    }
}
