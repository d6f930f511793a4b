//! The flight recorder: each rank's recent collectives and checkpoint phases, in a bounded ring
//! that the launcher can read even when the rank is hung.
//!
//! Design note. The ring lives in a file mapped shared into the rank (`flight-rank<r>.bin` in
//! the run directory), so its contents are in the page cache the moment they are written: a
//! rank stopped by SIGSTOP, stuck in a syscall or killed still shows what it last did, and the
//! launcher reads it with a plain file read, without the rank's help. The file has a fixed size
//! (`SLOTS` records of `SLOT_BYTES`), so it cannot grow. A record is written before the header's
//! count moves past it; a reader that races a writer may see one torn record, which only makes
//! the newest entry less precise. Times are Unix microseconds; an end of 0 means "not finished".

use std::path::{Path, PathBuf};

use serde::Serialize;

pub const SLOTS: usize = 256;
const SLOT_BYTES: usize = 48;
/// Magic, record count, generation.
const HEADER_BYTES: usize = 24;
const MAGIC: &[u8; 8] = b"CKFLIGHT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
    SaveStarted,
    SaveHandedOff,
    Unknown,
}

impl Kind {
    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Kind {
        use Kind::*;
        [AllReduce, ReduceScatter, AllGather, Broadcast, Barrier, SaveStarted, SaveHandedOff]
            .get(c as usize)
            .copied()
            .unwrap_or(Unknown)
    }

    pub fn is_collective(self) -> bool {
        (self as u8) < Kind::SaveStarted as u8
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub seq: u64,
    pub kind: Kind,
    pub step: u64,
    pub bytes: u64,
    pub start_us: u64,
    pub end_us: u64,
}

pub fn path(run_dir: &Path, rank: usize) -> PathBuf {
    run_dir.join(format!("flight-rank{rank}.bin"))
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub struct Recorder {
    map: memmap2::MmapMut,
    count: u64,
}

impl Recorder {
    /// A new ring for `generation` (the file of an earlier generation is replaced).
    pub fn create(path: &Path, generation: u64) -> std::io::Result<Recorder> {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        f.set_len((HEADER_BYTES + SLOTS * SLOT_BYTES) as u64)?;
        // SAFETY: the file is this rank's own (created and truncated just now); other processes
        // only read it, and every byte pattern is a valid u8.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f)? };
        map[..8].copy_from_slice(MAGIC);
        map[16..24].copy_from_slice(&generation.to_le_bytes());
        Ok(Recorder { map, count: 0 })
    }

    /// Records the start of something; returns its slot for `end`.
    pub fn start(&mut self, kind: Kind, seq: u64, step: u64, bytes: u64) -> usize {
        let slot = (self.count % SLOTS as u64) as usize;
        let at = HEADER_BYTES + slot * SLOT_BYTES;
        let rec = &mut self.map[at..at + SLOT_BYTES];
        rec[..8].copy_from_slice(&seq.to_le_bytes());
        rec[8] = kind.code();
        rec[16..24].copy_from_slice(&step.to_le_bytes());
        rec[24..32].copy_from_slice(&bytes.to_le_bytes());
        rec[32..40].copy_from_slice(&now_us().to_le_bytes());
        rec[40..48].copy_from_slice(&0u64.to_le_bytes());
        self.count += 1;
        self.map[8..16].copy_from_slice(&self.count.to_le_bytes());
        slot
    }

    pub fn end(&mut self, slot: usize) {
        let at = HEADER_BYTES + slot * SLOT_BYTES + 40;
        self.map[at..at + 8].copy_from_slice(&now_us().to_le_bytes());
    }

    /// A point event (start and end at once).
    pub fn mark(&mut self, kind: Kind, step: u64, bytes: u64) {
        let slot = self.start(kind, 0, step, bytes);
        self.end(slot);
    }
}

/// A rank's ring for `generation`, oldest first; empty if the file is missing, not a flight
/// recorder, or left by another generation (a rank that hung before it made its own).
pub fn read(path: &Path, generation: u64) -> Vec<Record> {
    let Ok(b) = std::fs::read(path) else { return Vec::new() };
    if b.len() != HEADER_BYTES + SLOTS * SLOT_BYTES || &b[..8] != MAGIC {
        return Vec::new();
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    if u64_at(16) != generation {
        return Vec::new();
    }
    let count = u64_at(8);
    let first = count.saturating_sub(SLOTS as u64);
    (first..count)
        .map(|n| {
            let at = HEADER_BYTES + (n % SLOTS as u64) as usize * SLOT_BYTES;
            Record {
                seq: u64_at(at),
                kind: Kind::from_code(b[at + 8]),
                step: u64_at(at + 16),
                bytes: u64_at(at + 24),
                start_us: u64_at(at + 32),
                end_us: u64_at(at + 40),
            }
        })
        .collect()
}

/// What the rings say about a hang: for each rank, its last collective, and which rank(s) never
/// reached the round the others are in.
pub fn diagnose(rings: &[Vec<Record>]) -> String {
    let last: Vec<Option<&Record>> = rings.iter().map(|r| r.iter().rev().find(|x| x.kind.is_collective())).collect();
    let front = last.iter().flatten().map(|r| r.seq).max().unwrap_or(0);
    let mut parts = Vec::new();
    for (rank, l) in last.iter().enumerate() {
        // A rank that stopped inside a checkpoint says so: its last phase is newer than its
        // last collective.
        let save = rings[rank].iter().rev().find(|x| !x.kind.is_collective());
        if let (Some(s), Some(c)) = (save, l) {
            if s.start_us >= c.start_us {
                parts.push(format!("rank {rank} was last in {:?} of step {} ({} bytes)", s.kind, s.step, s.bytes));
            }
        }
        match l {
            None => parts.push(format!("rank {rank}: no collective recorded")),
            Some(r) if r.seq < front => parts.push(format!(
                "rank {rank} did not arrive at collective #{front}; its last was {:?} #{} (step {}){}",
                r.kind,
                r.seq,
                r.step,
                if r.end_us == 0 { ", unfinished" } else { ", finished" }
            )),
            Some(r) => {
                parts.push(format!("rank {rank} waits in {:?} #{} (step {}, {} bytes)", r.kind, r.seq, r.step, r.bytes))
            }
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_records_and_names_the_rank_that_did_not_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Recorder::create(&path(dir.path(), 0), 3).unwrap();
        let mut b = Recorder::create(&path(dir.path(), 1), 3).unwrap();
        for seq in 1..=300u64 {
            let s = a.start(Kind::AllReduce, seq, seq / 3, 8);
            a.end(s);
            if seq < 300 {
                let s = b.start(Kind::AllReduce, seq, seq / 3, 8);
                b.end(s);
            }
        }
        a.start(Kind::ReduceScatter, 301, 100, 4096);
        b.mark(Kind::SaveHandedOff, 99, 1 << 20);
        assert!(read(&path(dir.path(), 0), 2).is_empty(), "another generation's ring is not read");
        let rings: Vec<Vec<Record>> = (0..2).map(|r| read(&path(dir.path(), r), 3)).collect();
        assert_eq!(rings[0].len(), SLOTS);
        assert_eq!(rings[0].last().unwrap().seq, 301);
        assert_eq!(rings[0].last().unwrap().end_us, 0);
        assert_eq!(rings[0].first().unwrap().seq, 301 - SLOTS as u64 + 1);
        let d = diagnose(&rings);
        assert!(d.contains("rank 0 waits in ReduceScatter #301"), "{d}");
        assert!(d.contains("rank 1 did not arrive at collective #301; its last was AllReduce #299"), "{d}");
        assert!(d.contains("rank 1 was last in SaveHandedOff of step 99"), "{d}");
    }
}
