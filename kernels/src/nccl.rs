//! NCCL collectives on f32 host slices, for the trainer's `Collective` trait (feature `cuda`).
//!
//! Design note. One [`NcclRank`] is one rank's membership of an NCCL communicator, on one GPU:
//! each call copies the host data in, runs the NCCL operation on the rank's stream, and copies
//! the result out, so the trainer's CPU-side state stays where it is and the CPU hub stays the
//! reference (with one rank, or exact integers in f32, both give the same bits; in general NCCL
//! sums in its own order). A group of several processes shares a [`UniqueId`] made by rank 0
//! and passed to the others by the caller (the trainer broadcasts it through its hub);
//! [`NcclRank::single`] is the group of one. A rank needs a CUDA context on its GPU, not a
//! [`Device`](crate::cuda::Device): NCCL uses none of the compiled kernels, so no NVRTC either.
//!
//! The trainer splits a vector among ranks with `owned_range` (rank r owns one element more
//! than the rest while r < len % world), but NCCL's reduce-scatter and all-gather move equal
//! blocks. So each rank's part travels in a block of `ceil(len / world)` elements, zero-padded,
//! and is cut back to its owned length on arrival.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::cuda::{CudaError, Result};

pub use crate::partition::owned_range;

/// Elements per rank's block in the padded layout.
fn block_len(len: usize, world: usize) -> usize {
    len.div_ceil(world)
}

/// `full` rearranged so that rank r's owned range starts at r * block, zeros between.
fn pad(full: &[f32], world: usize) -> Vec<f32> {
    let block = block_len(full.len(), world);
    let mut padded = vec![0f32; block * world];
    for r in 0..world {
        let owned = owned_range(full.len(), r, world);
        padded[r * block..r * block + owned.len()].copy_from_slice(&full[owned]);
    }
    padded
}

/// The inverse of [`pad`] into `full`.
fn unpad(padded: &[f32], full: &mut [f32], world: usize) {
    let block = block_len(full.len(), world);
    for r in 0..world {
        let owned = owned_range(full.len(), r, world);
        let n = owned.len();
        full[owned].copy_from_slice(&padded[r * block..r * block + n]);
    }
}

/// The token that lets processes find each other's communicator; rank 0 makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

/// Whether NCCL can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> CudaError {
    CudaError::Nccl(format!("{what}: {:?}", e.0))
}

impl UniqueId {
    pub fn new() -> Result<UniqueId> {
        if !nccl_present() {
            return Err(CudaError::NoNccl);
        }
        let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
        Ok(UniqueId(id.internal().map(|c| c as u8)))
    }
}

pub struct NcclRank {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl NcclRank {
    /// A communicator of one rank on `ctx`'s GPU.
    pub fn single(ctx: &Arc<CudaContext>) -> Result<NcclRank> {
        if !nccl_present() {
            return Err(CudaError::NoNccl);
        }
        let stream = ctx.new_stream()?;
        let mut comms = Comm::from_devices(vec![stream.clone()]).map_err(|e| nccl_err("init", e))?;
        let comm = comms.pop().expect("one device, one communicator");
        Ok(NcclRank { comm, stream })
    }

    /// Rank `rank` of a group of `world` processes sharing `id`, on `ctx`'s GPU; returns when
    /// all have joined.
    pub fn join(ctx: &Arc<CudaContext>, rank: usize, world: usize, id: UniqueId) -> Result<NcclRank> {
        if !nccl_present() {
            return Err(CudaError::NoNccl);
        }
        if rank >= world {
            return Err(CudaError::Invalid(format!("rank {rank} of a world of {world}")));
        }
        let stream = ctx.new_stream()?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(id.0.map(|b| b as _)))
            .map_err(|e| nccl_err("init", e))?;
        Ok(NcclRank { comm, stream })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn fetch(&self, dev: &cudarc::driver::CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        self.stream.memcpy_dtoh(dev, out)?;
        Ok(self.stream.synchronize()?)
    }

    /// Element-wise sum over ranks, result on every rank.
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = self.stream.clone_htod(data)?;
        self.comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum).map_err(|e| nccl_err("all-reduce", e))?;
        self.fetch(&buf, data)
    }

    /// The padded block length for a vector of `len` elements, once `part` is checked to be
    /// this rank's owned length of it.
    fn block_for(&self, len: usize, part: usize) -> Result<usize> {
        let (world, rank) = (self.world(), self.rank());
        let owned = owned_range(len, rank, world).len();
        if part != owned {
            return Err(CudaError::Invalid(format!("rank {rank} owns {owned} elements, not {part}")));
        }
        Ok(block_len(len, world))
    }

    /// Element-wise sum over ranks of `full`; `out` receives this rank's `owned_range`.
    pub fn reduce_scatter_sum(&mut self, full: &[f32], out: &mut [f32]) -> Result<()> {
        let world = self.world();
        let block = self.block_for(full.len(), out.len())?;
        if block == 0 {
            return Ok(());
        }
        let send = self.stream.clone_htod(&pad(full, world))?;
        let mut recv = self.stream.alloc_zeros::<f32>(block)?;
        self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map_err(|e| nccl_err("reduce-scatter", e))?;
        let mut mine = vec![0f32; block];
        self.fetch(&recv, &mut mine)?;
        let n = out.len();
        out.copy_from_slice(&mine[..n]);
        Ok(())
    }

    /// Concatenates every rank's `owned_range` part, in rank order, into `full`.
    pub fn all_gather(&mut self, mine: &[f32], full: &mut [f32]) -> Result<()> {
        let world = self.world();
        let block = self.block_for(full.len(), mine.len())?;
        if block == 0 {
            return Ok(());
        }
        let mut padded_mine = vec![0f32; block];
        padded_mine[..mine.len()].copy_from_slice(mine);
        let send = self.stream.clone_htod(&padded_mine)?;
        let mut recv = self.stream.alloc_zeros::<f32>(block * world)?;
        self.comm.all_gather(&send, &mut recv).map_err(|e| nccl_err("all-gather", e))?;
        let mut padded = vec![0f32; block * world];
        self.fetch(&recv, &mut padded)?;
        unpad(&padded, full, world);
        Ok(())
    }

    /// Copies `root`'s `data` to every rank.
    pub fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(CudaError::Invalid(format!("root {root} of a world of {}", self.world())));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = self.stream.clone_htod(data)?;
        self.comm.broadcast_in_place(&mut buf, root as i32).map_err(|e| nccl_err("broadcast", e))?;
        self.fetch(&buf, data)
    }

    /// Returns once every rank has entered (an all-reduce of one element).
    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0f32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trips_and_places_each_rank_at_its_block() {
        for len in [0usize, 1, 7, 100, 1001] {
            for world in 1..6 {
                let full: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
                let padded = pad(&full, world);
                let block = block_len(len, world);
                assert_eq!(padded.len(), block * world);
                for r in 0..world {
                    let owned = owned_range(len, r, world);
                    assert_eq!(&padded[r * block..r * block + owned.len()], &full[owned.clone()]);
                    assert!(padded[r * block + owned.len()..(r + 1) * block].iter().all(|v| *v == 0.0));
                }
                let mut back = vec![0f32; len];
                unpad(&padded, &mut back, world);
                assert_eq!(back, full);
            }
        }
    }
}
