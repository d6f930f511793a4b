//! Silent-data-corruption check: every rank's replica of the parameters against the owners'.
//!
//! After the all-gather every rank holds a full copy of the parameters, of which it owns one
//! slice (ZeRO). A corrupted replica (a flipped bit in HBM or SRAM, a bad ALU) would go into the
//! next forward pass on that rank alone and silently bend the whole run. So before the copy is
//! used or any checkpoint is taken, each rank fingerprints every piece of the vector (128 bits,
//! `ckpt_kernels::fingerprint`, over the raw bits; a piece is at most `PIECE_ELEMS` elements of
//! one owner's slice): its own slice from the state it owns, the others from its replica. The
//! fingerprints are all-gathered, and every rank compares each piece with its owner's. Every
//! rank reaches the same verdict from the same gathered bytes, so all stop together, naming the
//! rank and the elements that differ.

use std::ops::Range;

use ckpt_kernels::{fingerprint_f32, Fingerprint};

use crate::collective::{Collective, CollectiveError};
use crate::optim::owned_range;

/// Elements per fingerprinted piece (256 KiB of f32).
pub const PIECE_ELEMS: usize = 64 * 1024;

/// A replica that differs from its owner's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("silent data corruption: rank {rank}'s replica of params[{}..{}] (owned by rank {owner}) differs from the owner's (fingerprint {found}, owner {expected})", elements.start, elements.end)]
pub struct Mismatch {
    pub rank: usize,
    pub owner: usize,
    pub tensor: &'static str,
    pub elements: Range<usize>,
    pub found: Fingerprint,
    pub expected: Fingerprint,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// The pieces, in order: (owner, global element range).
pub fn pieces(p: usize, world: usize) -> Vec<(usize, Range<usize>)> {
    let mut out = Vec::new();
    for owner in 0..world {
        let r = owned_range(p, owner, world);
        let mut at = r.start;
        while at < r.end {
            let end = (at + PIECE_ELEMS).min(r.end);
            out.push((owner, at..end));
            at = end;
        }
    }
    out
}

/// This rank's fingerprints, 8 floats per piece (16-bit parts, exact in f32).
pub fn local_fingerprints(full: &[f32], own: &[f32], rank: usize, world: usize) -> Vec<f32> {
    let mine = owned_range(full.len(), rank, world);
    let mut out = Vec::new();
    for (owner, r) in pieces(full.len(), world) {
        let fp = if owner == rank {
            fingerprint_f32(&own[r.start - mine.start..r.end - mine.start], r.start as u64)
        } else {
            fingerprint_f32(&full[r.clone()], r.start as u64)
        };
        out.extend(fp.to_u16s().iter().map(|&v| v as f32));
    }
    out
}

fn decode(v: &[f32]) -> Fingerprint {
    let mut p = [0u16; 8];
    for (o, x) in p.iter_mut().zip(v) {
        *o = *x as u16;
    }
    Fingerprint::from_u16s(p)
}

/// The first piece, in rank order, where some rank's fingerprint differs from the owner's.
pub fn compare(gathered: &[f32], p: usize, world: usize) -> Option<Mismatch> {
    let pieces = pieces(p, world);
    let n = pieces.len() * 8;
    for rank in 0..world {
        for (e, (owner, r)) in pieces.iter().enumerate() {
            let at = |who: usize| &gathered[who * n + e * 8..who * n + e * 8 + 8];
            if rank != *owner && at(rank) != at(*owner) {
                return Some(Mismatch {
                    rank,
                    owner: *owner,
                    tensor: "params",
                    elements: r.clone(),
                    found: decode(at(rank)),
                    expected: decode(at(*owner)),
                });
            }
        }
    }
    None
}

/// Fingerprints, all-gathers and compares; every rank gets the same answer.
pub fn check(comm: &mut dyn Collective, full: &[f32], own: &[f32]) -> Result<(), ReplicaError> {
    let (rank, world) = (comm.rank(), comm.world());
    let mine = local_fingerprints(full, own, rank, world);
    let mut gathered = vec![0.0f32; mine.len() * world];
    comm.all_gather(&mine, &mut gathered)?;
    match compare(&gathered, full.len(), world) {
        Some(m) => Err(m.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(fulls: &[Vec<f32>], world: usize) -> Vec<f32> {
        let p = fulls[0].len();
        (0..world)
            .flat_map(|r| {
                let own = fulls[r][owned_range(p, r, world)].to_vec();
                local_fingerprints(&fulls[r], &own, r, world)
            })
            .collect()
    }

    #[test]
    fn agreeing_replicas_pass_and_one_flipped_bit_is_named() {
        let world = 3;
        let p = 2 * PIECE_ELEMS + 1234;
        let base: Vec<f32> = (0..p).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut fulls = vec![base.clone(); world];
        assert_eq!(compare(&gathered(&fulls, world), p, world), None);
        // Rank 2 holds a bad copy of an element that rank 0 owns.
        let victim = 70_000;
        fulls[2][victim] = f32::from_bits(fulls[2][victim].to_bits() ^ (1 << 13));
        let m = compare(&gathered(&fulls, world), p, world).expect("the flip is caught");
        assert_eq!((m.rank, m.owner, m.tensor), (2, 0, "params"));
        assert!(m.elements.contains(&victim), "{m}");
    }
}
