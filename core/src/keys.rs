//! Where things live in the object store. Every key is built and parsed here, so the layout
//! has one definition.
//!
//! ```text
//! jobs/<job>/chunks/<hh>/<hash>          a chunk, content-addressed, shared by every step and rank of the job
//! jobs/<job>/manifests/<step:020>.json   a committed checkpoint's root (zero-padded so listings sort by step)
//! jobs/<job>/indexes/<hh>/<hash>.json    a rank's shard index, content-addressed, named by the roots
//! jobs/<job>/pins/<step:020>             a pinned checkpoint: retention never deletes it
//! jobs/<job>/fences/<epoch:020>          a generation fence raised (the highest is the job's fence)
//! jobs/<job>/gc/condemned.json           the garbage the last GC mark found, swept by a later run
//! jobs/<job>/gc/swept.json               when a sweep last deleted anything (commits check it)
//! jobs/<job>/gc/leases/<step:020>.<node> a save in flight on a ckptd node (see `gc.rs`)
//! jobs/<job>/gc/lock                     held by the job's GC run
//! jobs/<job>/parts/<step:020>/<epoch:020>/<first:010>-<end:010>.json
//!                                        one node's part of a save split over nodes (`part.rs`)
//! ```

use crate::hash::ChunkHash;
use crate::validate::{parse_step, validate_job};

pub const JOBS_PREFIX: &str = "jobs";

pub fn job_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}")
}

pub fn chunk_key(job: &str, hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("{JOBS_PREFIX}/{job}/chunks/{}/{hex}", &hex[..2])
}

pub fn chunks_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/chunks")
}

pub fn manifest_key(job: &str, step: u64) -> String {
    format!("{JOBS_PREFIX}/{job}/manifests/{step:020}.json")
}

pub fn index_key(job: &str, hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("{JOBS_PREFIX}/{job}/indexes/{}/{hex}.json", &hex[..2])
}

pub fn manifests_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/manifests")
}

pub fn pin_key(job: &str, step: u64) -> String {
    format!("{JOBS_PREFIX}/{job}/pins/{step:020}")
}

pub fn pins_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/pins")
}

/// One raised generation fence, create-only: raises never race into a lower value, the
/// highest key is the fence, and a raise removes the keys below its own.
pub fn fence_key(job: &str, epoch: u64) -> String {
    format!("{JOBS_PREFIX}/{job}/fences/{epoch:020}")
}

pub fn fences_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/fences")
}

/// The epoch a fence key names.
pub fn parse_fence_key(key: &str) -> Option<u64> {
    let mut rev = key.rsplit('/');
    let (epoch, dir) = (rev.next()?, rev.next()?);
    (dir == "fences" && digits(epoch, 20)).then(|| epoch.parse().ok()).flatten()
}

pub fn indexes_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/indexes")
}

pub fn condemned_key(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/gc/condemned.json")
}

pub fn swept_key(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/gc/swept.json")
}

/// Held by the GC run of a job (create-only), one run at a time across nodes.
pub fn gc_lock_key(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/gc/lock")
}

pub fn leases_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/gc/leases")
}

/// A node's lease on one save in flight. `node` is the ckptd node's id (hex).
pub fn lease_key(job: &str, step: u64, node: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/gc/leases/{step:020}.{node}")
}

pub fn parts_prefix(job: &str, step: u64, epoch: u64) -> String {
    format!("{JOBS_PREFIX}/{job}/parts/{step:020}/{epoch:020}")
}

/// Every part of every save of the job (cleaned by GC).
pub fn all_parts_prefix(job: &str) -> String {
    format!("{JOBS_PREFIX}/{job}/parts")
}

/// Created once (create-only) by whichever comes first: the node about to create the root
/// ("commit") or a node aborting its part of the save ("abort"); see `part.rs`.
pub fn part_decision_key(job: &str, step: u64, epoch: u64) -> String {
    format!("{}/decision.json", parts_prefix(job, step, epoch))
}

/// The step a key under `all_parts_prefix` belongs to (a part or a decision).
pub fn parse_parts_step(key: &str) -> Option<u64> {
    parse_parts_entry(key).map(|(step, _, _)| step)
}

/// Fixed-width decimal digits, as the parts layout writes them.
fn digits(s: &str, width: usize) -> bool {
    s.len() == width && s.bytes().all(|b| b.is_ascii_digit())
}

/// `.../parts/<step:020>/<epoch:020>/<file>`: the one parse of the parts layout.
fn parse_parts_entry(key: &str) -> Option<(u64, u64, &str)> {
    let mut rev = key.rsplit('/');
    let (file, epoch, step, parts) = (rev.next()?, rev.next()?, rev.next()?, rev.next()?);
    if parts != "parts" || !digits(step, 20) || !digits(epoch, 20) {
        return None;
    }
    Some((step.parse().ok()?, epoch.parse().ok()?, file))
}

pub fn part_key(job: &str, step: u64, part: &crate::part::PartOf) -> String {
    format!("{}/{:010}-{:010}.json", parts_prefix(job, step, part.epoch), part.first, part.end)
}

/// What a part key names: (step, epoch, first, end).
pub fn parse_part_key(key: &str) -> Option<(u64, u64, u32, u32)> {
    let (step, epoch, file) = parse_parts_entry(key)?;
    let (first, end) = file.strip_suffix(".json")?.split_once('-')?;
    if !(digits(first, 10) && digits(end, 10)) {
        return None;
    }
    Some((step, epoch, first.parse().ok()?, end.parse().ok()?))
}

/// The step a pin key names.
pub fn parse_pin_key(key: &str) -> Option<u64> {
    let digits = key.rsplit('/').next()?;
    (digits.len() == 20).then(|| parse_step(digits).ok()).flatten()
}

/// What a key in the store is, when it is one of ours. Anything else (an upload's temporary
/// file, a foreign object) is `None` and ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedKey {
    Chunk { job: String, hash: ChunkHash },
    Manifest { job: String, step: u64 },
    Index { job: String, hash: ChunkHash },
}

pub fn parse_key(key: &str) -> Option<ParsedKey> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        [JOBS_PREFIX, job, "chunks", hh, hex] => {
            validate_job(job).ok()?;
            let hash: ChunkHash = hex.parse().ok()?;
            (hex.get(..2) == Some(*hh)).then(|| ParsedKey::Chunk { job: job.to_string(), hash })
        }
        [JOBS_PREFIX, job, "indexes", hh, file] => {
            validate_job(job).ok()?;
            let hex = file.strip_suffix(".json")?;
            let hash: ChunkHash = hex.parse().ok()?;
            (hex.get(..2) == Some(*hh)).then(|| ParsedKey::Index { job: job.to_string(), hash })
        }
        [JOBS_PREFIX, job, "manifests", file] => {
            validate_job(job).ok()?;
            let digits = file.strip_suffix(".json")?;
            if digits.len() != 20 {
                return None;
            }
            let step = parse_step(digits).ok()?;
            Some(ParsedKey::Manifest { job: job.to_string(), step })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let h = ChunkHash::of(b"x");
        assert_eq!(parse_key(&chunk_key("j", &h)), Some(ParsedKey::Chunk { job: "j".into(), hash: h }));
        assert_eq!(parse_key(&manifest_key("j", 42)), Some(ParsedKey::Manifest { job: "j".into(), step: 42 }));
        assert_eq!(manifest_key("j", 42), "jobs/j/manifests/00000000000000000042.json");
        assert_eq!(parse_key(&index_key("j", &h)), Some(ParsedKey::Index { job: "j".into(), hash: h }));
        assert_eq!(manifest_key("j", u64::MAX).len(), manifest_key("j", 0).len());
        assert_eq!(parse_pin_key(&pin_key("j", 7)), Some(7));
        assert_eq!(parse_fence_key(&fence_key("j", 7)), Some(7));
        assert_eq!(parse_fence_key(&fence_key("j", u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_fence_key("jobs/j/fences/99999999999999999999"), None, "beyond u64");
        assert_eq!(parse_fence_key("jobs/j/pins/00000000000000000007"), None);
        assert_eq!(parse_fence_key("jobs/j/fences/7"), None);
        let part = crate::part::PartOf { first: 16, end: 24, epoch: 3 };
        let k = part_key("j", 7, &part);
        assert!(k.starts_with(&parts_prefix("j", 7, 3)) && k.starts_with(&all_parts_prefix("j")));
        assert_eq!(parse_part_key(&k), Some((7, 3, 16, 24)));
        assert_eq!(parse_parts_step(&k), Some(7));
        assert_eq!(parse_parts_step(&part_decision_key("j", 7, 3)), Some(7));
        assert_eq!(parse_part_key(&part_decision_key("j", 7, 3)), None);
        assert_eq!(parse_part_key("jobs/j/parts/x/y/0000000016-0000000024.json"), None);
        // Pins, leases and GC records are not checkpoint objects: listings of those ignore them.
        for k in [pin_key("j", 7), lease_key("j", 7, "ab"), condemned_key("j"), swept_key("j"), k] {
            assert_eq!(parse_key(&k), None, "{k}");
        }
    }

    #[test]
    fn foreign_keys_are_ignored() {
        let h = ChunkHash::of(b"x").to_hex();
        for k in [
            format!("jobs/j/chunks/zz/{h}"),
            format!("jobs/j/chunks/{}/{h}#1", &h[..2]),
            "jobs/j/manifests/42.json".to_string(),
            format!("jobs/j/indexes/{}/{h}", &h[..2]),
            format!("jobs/j/indexes/zz/{h}.json"),
            "jobs/j/manifests/00000000000000000042.json#3".to_string(),
            "jobs/../manifests/00000000000000000042.json".to_string(),
            "other/thing".to_string(),
        ] {
            assert_eq!(parse_key(&k), None, "{k}");
        }
    }
}
