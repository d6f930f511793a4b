//! The trace of a save: every request of one save (all ranks, any ckptd node) carries a W3C
//! `traceparent` whose trace id is a pure function of (job, step), so their spans join one
//! trace with no coordination, and a span id per rank. ckptd parents the spans it makes
//! outside any request (the commit) on the same trace.

/// The save's trace id: 16 bytes of blake3 over a domain tag, the job and the step.
pub fn save_trace_id(job: &str, step: u64) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(b"ckpt-save-trace\0");
    h.update(job.as_bytes());
    h.update(b"\0");
    h.update(&step.to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id[0] |= 1; // never the invalid all-zero id
    id
}

/// A parent span id for the requests of `rank` in the save's trace (`u32::MAX`: ckptd's own).
pub fn save_span_id(job: &str, step: u64, rank: u32) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&save_trace_id(job, step));
    h.update(&rank.to_le_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&h.finalize().as_bytes()[..8]);
    id[0] |= 1;
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The W3C `traceparent` header value for `rank`'s requests of the save (sampled).
pub fn save_traceparent(job: &str, step: u64, rank: u32) -> String {
    format!("00-{}-{}-01", hex(&save_trace_id(job, step)), hex(&save_span_id(job, step, rank)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trace_per_save_one_parent_per_rank() {
        let a = save_traceparent("job", 7, 0);
        assert_eq!(a.len(), 55);
        assert!(a.starts_with("00-") && a.ends_with("-01"));
        assert_eq!(a[3..35], save_traceparent("job", 7, 1)[3..35], "ranks share the trace");
        assert_ne!(a[36..52], save_traceparent("job", 7, 1)[36..52], "each rank has its own parent span");
        assert_ne!(a[3..35], save_traceparent("job", 8, 0)[3..35]);
        assert_ne!(a[3..35], save_traceparent("jo", 7, 0)[3..35]);
        assert_eq!(a, save_traceparent("job", 7, 0), "a pure function of the save");
    }
}
