//! How a flat vector is split over ranks (ZeRO ownership): one definition for the trainer's
//! optimizer and the NCCL collectives, which must agree element for element.

/// The contiguous range of a flat vector of `len` elements that `rank` owns out of `world`.
/// Ranges differ in size by at most one element and tile the vector in rank order.
pub fn owned_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_ranges_tile_the_vector() {
        for len in [0usize, 1, 7, 100, 1001] {
            for world in 1..6 {
                let mut next = 0;
                for r in 0..world {
                    let g = owned_range(len, r, world);
                    assert_eq!(g.start, next);
                    assert!(g.len() >= len / world && g.len() <= len / world + 1);
                    next = g.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
