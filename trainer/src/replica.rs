//! Silent-data-corruption check: every rank's replica of the parameters against the owners'.
//!
//! After the all-gather every rank holds a full copy of the parameters, of which it owns one
//! slice (ZeRO). A corrupted replica (a flipped bit in HBM or SRAM, a bad ALU) would go into the
//! next forward pass on that rank alone and silently bend the whole run. So before the copy is
//! used or any checkpoint is taken, each rank fingerprints every piece of its replica (128 bits,
//! `ckpt_kernels::fingerprint`, over the raw bits; a piece is at most `PIECE_ELEMS` elements of
//! one owner's slice), and, for the pieces it owns, the state it owns as well. The fingerprints
//! are all-gathered, and every rank compares every replica's piece, the owner's own replica
//! included, with the owner's state. Every rank reaches the same verdict from the same gathered
//! bytes, so all stop together, naming the rank and the elements that differ.

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

/// This rank's fingerprints, 8 floats per piece (16-bit parts, exact in f32): every piece of
/// its replica, then every piece of the state it owns (zeros for pieces it does not own).
pub fn local_fingerprints(full: &[f32], own: &[f32], rank: usize, world: usize) -> Vec<f32> {
    let mine = owned_range(full.len(), rank, world);
    let pieces = pieces(full.len(), world);
    let mut out = Vec::with_capacity(pieces.len() * 16);
    for (_, r) in &pieces {
        out.extend(fingerprint_f32(&full[r.clone()], r.start as u64).to_u16s().iter().map(|&v| v as f32));
    }
    for (owner, r) in &pieces {
        let fp = if *owner == rank {
            fingerprint_f32(&own[r.start - mine.start..r.end - mine.start], r.start as u64)
        } else {
            Fingerprint::default()
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

/// The first piece, in rank order, where some rank's replica differs from the owner's state.
pub fn compare(gathered: &[f32], p: usize, world: usize) -> Option<Mismatch> {
    let pieces = pieces(p, world);
    let half = pieces.len() * 8;
    let n = 2 * half;
    for rank in 0..world {
        for (e, (owner, r)) in pieces.iter().enumerate() {
            let replica = &gathered[rank * n + e * 8..rank * n + e * 8 + 8];
            let state = &gathered[owner * n + half + e * 8..owner * n + half + e * 8 + 8];
            if replica != state {
                return Some(Mismatch {
                    rank,
                    owner: *owner,
                    tensor: "params",
                    elements: r.clone(),
                    found: decode(replica),
                    expected: decode(state),
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
        let victim = 20_000;
        fulls[2][victim] = f32::from_bits(fulls[2][victim].to_bits() ^ (1 << 13));
        let m = compare(&gathered(&fulls, world), p, world).expect("the flip is caught");
        assert_eq!((m.rank, m.owner, m.tensor), (2, 0, "params"));
        assert!(m.elements.contains(&victim), "{m}");
        // A flip in a rank's copy of its own slice is caught too (its state is the reference).
        let mut fulls = vec![base.clone(); world];
        let own1: Vec<f32> = base[owned_range(p, 1, world)].to_vec();
        let at = owned_range(p, 1, world).start + 5;
        fulls[1][at] = -fulls[1][at];
        let g: Vec<f32> = (0..world)
            .flat_map(|r| {
                let own = if r == 1 { own1.clone() } else { base[owned_range(p, r, world)].to_vec() };
                local_fingerprints(&fulls[r], &own, r, world)
            })
            .collect();
        let m = compare(&g, p, world).expect("a flip in the owner's own copy is caught");
        assert_eq!((m.rank, m.owner), (1, 1));
    }
}
