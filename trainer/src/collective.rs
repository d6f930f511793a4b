//! Collectives between rank processes: the `Collective` trait, and a CPU backend whose
//! reductions run in a hub inside the launcher.
//!
//! Design note. Every rank holds one TCP connection to the hub. A collective is a round: each
//! rank sends one frame (op, sequence number, payload); when all `world` frames of the round
//! are in, the hub computes every rank's result and writes it back. Sums are taken in rank
//! order, so a reduction gives the same bits on every run with the same world size.
//!
//! Timeouts are the analogue of the NCCL watchdog. The hub starts a round's clock when the
//! first frame arrives; if the round is not complete within `collective_timeout`, the hub reports
//! which ranks it is waiting for and stops. A longer `idle_timeout` catches the group making no
//! progress at all (no round started), which a per-round clock cannot see. Writes back to
//! a rank have the same timeout, so a rank that stopped reading cannot wedge the hub. Ranks
//! wait longer than the hub (`rank_timeout`), so the launcher, not a rank, decides; the rank
//! timeout only keeps an orphaned rank from waiting forever.
//!
//! Every frame ends with a CRC-32 of its header and payload, checked on arrival at both ends:
//! bytes corrupted between a rank and the hub fail the round (and the generation), so nobody
//! computes on them.
//!
//! A hub serves one generation of the group. It refuses a connection that names another
//! generation, a rank outside the world, or a rank already connected, and frames above
//! `frame_elems_max`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::optim::owned_range;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective i/o failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("collective protocol error: {0}")]
    Protocol(String),
    #[error("the hub reported: {0}")]
    Hub(String),
    /// An NCCL call failed (the `nccl` backend); "collective" in the text is what the launcher
    /// looks for to tell a rank broken under a collective from one that failed by itself.
    #[cfg(feature = "nccl")]
    #[error("collective over NCCL failed: {0}")]
    Nccl(#[from] ckpt_kernels::cuda::CudaError),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// What a data-parallel rank needs from its group. Implementations must reduce in a fixed
/// order so results are reproducible.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over ranks, result on every rank. `tag` and `step` label the round
    /// for the launcher (see `TAG_LOSS`).
    fn all_reduce_sum(&mut self, data: &mut [f32], tag: u8, step: u64) -> Result<()>;
    /// Element-wise sum over ranks of `full`; rank r receives only its `owned_range`.
    fn reduce_scatter_sum(&mut self, full: &[f32], out: &mut [f32]) -> Result<()>;
    /// Concatenates every rank's `owned_range` slice, in rank order, into `full`.
    fn all_gather(&mut self, mine: &[f32], full: &mut [f32]) -> Result<()>;
    /// Copies `root`'s `data` to every rank.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has entered; `tag` and `step` label it as for `all_reduce_sum`.
    fn barrier(&mut self, tag: u8, step: u64) -> Result<()>;
    /// The flight recorder of this rank's rounds, where the backend keeps one.
    fn recorder(&mut self) -> Option<&mut crate::flight::Recorder> {
        None
    }
}

/// An all-reduce tagged `TAG_LOSS` carries each rank's loss for `step`: the launcher records
/// it as the step's completion.
pub const TAG_LOSS: u8 = 1;
/// A barrier tagged `TAG_READY` means the group restored (or initialised) its state at `step`.
pub const TAG_READY: u8 = 2;
/// A barrier tagged `TAG_DONE` ends the generation: the hub stops after answering it, so the
/// ranks' exits that follow are not failures.
pub const TAG_DONE: u8 = 3;

const MAGIC: &[u8; 4] = b"CKCL";
const HEADER_BYTES: usize = 36;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    AllReduce = 2,
    ReduceScatter = 3,
    AllGather = 4,
    Broadcast = 5,
    Barrier = 6,
    Error = 255,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::AllReduce,
            3 => Op::ReduceScatter,
            4 => Op::AllGather,
            5 => Op::Broadcast,
            6 => Op::Barrier,
            255 => Op::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: Op,
    tag: u8,
    rank: u32,
    /// Round number (`Hello`: the world size).
    seq: u64,
    /// Step label (`Hello`: the generation).
    step: u64,
    /// Payload length in f32 elements (`Error`: in bytes).
    len: u64,
}

fn write_frame(w: &mut impl Write, h: Header, payload: &[f32], scratch: &mut Vec<u8>) -> std::io::Result<()> {
    scratch.clear();
    scratch.extend_from_slice(MAGIC);
    scratch.extend_from_slice(&[h.op as u8, h.tag, 0, 0]);
    scratch.extend_from_slice(&h.rank.to_le_bytes());
    scratch.extend_from_slice(&h.seq.to_le_bytes());
    scratch.extend_from_slice(&h.step.to_le_bytes());
    scratch.extend_from_slice(&h.len.to_le_bytes());
    for x in payload {
        scratch.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc32fast::hash(scratch);
    scratch.extend_from_slice(&crc.to_le_bytes());
    w.write_all(scratch)?;
    w.flush()
}

/// A frame's header, and the checksum of the frame so far (`read_payload` finishes it).
fn read_header(r: &mut impl Read) -> Result<(Header, crc32fast::Hasher)> {
    let mut b = [0u8; HEADER_BYTES];
    r.read_exact(&mut b)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b);
    if &b[..4] != MAGIC {
        return Err(CollectiveError::Protocol("bad frame magic".into()));
    }
    let op = Op::from_u8(b[4]).ok_or_else(|| CollectiveError::Protocol(format!("unknown op {}", b[4])))?;
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let h = Header {
        op,
        tag: b[5],
        rank: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        seq: u64_at(12),
        step: u64_at(20),
        len: u64_at(28),
    };
    Ok((h, crc))
}

/// Reads a frame's payload of `elems` f32 and its checksum trailer; bytes changed in transit
/// fail the frame, so no rank ever computes on them.
fn read_payload(
    r: &mut impl Read,
    elems: usize,
    mut crc: crc32fast::Hasher,
    scratch: &mut Vec<u8>,
) -> Result<Vec<f32>> {
    scratch.resize(elems * 4 + 4, 0);
    r.read_exact(scratch)?;
    let (payload, trailer) = scratch.split_at(elems * 4);
    crc.update(payload);
    let (want, got) = (u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]), crc.finalize());
    if want != got {
        return Err(CollectiveError::Protocol(format!(
            "frame checksum mismatch (crc32 {got:08x}, frame says {want:08x}): bytes corrupted in transit"
        )));
    }
    Ok(crate::f32s_from_le(payload))
}

fn read_error_text(r: &mut impl Read, len: u64) -> Result<String> {
    let mut b = vec![0u8; len.min(4096) as usize];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

// ---- the rank side ---------------------------------------------------------------------------

/// A rank's connection to the hub.
pub struct HubClient {
    stream: TcpStream,
    rank: usize,
    world: usize,
    seq: u64,
    scratch: Vec<u8>,
    recorder: Option<crate::flight::Recorder>,
}

impl HubClient {
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        generation: u64,
        rank_timeout: Duration,
    ) -> Result<HubClient> {
        let deadline = Instant::now() + rank_timeout;
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "hub not reachable yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(rank_timeout))?;
        stream.set_write_timeout(Some(rank_timeout))?;
        let mut c = HubClient { stream, rank, world, seq: 0, scratch: Vec::new(), recorder: None };
        let h = Header { op: Op::Hello, tag: 0, rank: rank as u32, seq: world as u64, step: generation, len: 0 };
        write_frame(&mut c.stream, h, &[], &mut c.scratch)?;
        Ok(c)
    }

    /// Records every round from now on in `r` (the flight recorder).
    pub fn record_to(&mut self, r: crate::flight::Recorder) {
        self.recorder = Some(r);
    }

    /// Stops recording and hands the recorder over (to a backend that records all its calls,
    /// these rounds among them, under one sequence).
    pub fn take_recorder(&mut self) -> Option<crate::flight::Recorder> {
        self.recorder.take()
    }

    fn round(&mut self, op: Op, tag: u8, step: u64, payload: &[f32], expect: usize) -> Result<Vec<f32>> {
        self.seq += 1;
        use crate::flight::Kind;
        let kind = match op {
            Op::AllReduce => Kind::AllReduce,
            Op::ReduceScatter => Kind::ReduceScatter,
            Op::AllGather => Kind::AllGather,
            Op::Broadcast => Kind::Broadcast,
            _ => Kind::Barrier,
        };
        let (seq, bytes) = (self.seq, 4 * payload.len().max(expect) as u64);
        let slot = self.recorder.as_mut().map(|r| r.start(kind, seq, step, bytes));
        let out = self.exchange(op, tag, step, payload, expect);
        if let (Some(r), Some(slot), true) = (self.recorder.as_mut(), slot, out.is_ok()) {
            r.end(slot);
        }
        out
    }

    fn exchange(&mut self, op: Op, tag: u8, step: u64, payload: &[f32], expect: usize) -> Result<Vec<f32>> {
        let h = Header { op, tag, rank: self.rank as u32, seq: self.seq, step, len: payload.len() as u64 };
        write_frame(&mut self.stream, h, payload, &mut self.scratch)?;
        let (reply, crc) = read_header(&mut self.stream)?;
        if reply.op == Op::Error {
            read_payload(&mut self.stream, 0, crc, &mut self.scratch)?;
            return Err(CollectiveError::Hub(read_error_text(&mut self.stream, reply.len)?));
        }
        if reply.op != op || reply.seq != self.seq || reply.len != expect as u64 {
            return Err(CollectiveError::Protocol(format!(
                "expected {op:?} #{} with {expect} elements, got {:?} #{} with {}",
                self.seq, reply.op, reply.seq, reply.len
            )));
        }
        read_payload(&mut self.stream, expect, crc, &mut self.scratch)
    }
}

impl Collective for HubClient {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32], tag: u8, step: u64) -> Result<()> {
        let out = self.round(Op::AllReduce, tag, step, data, data.len())?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, full: &[f32], out: &mut [f32]) -> Result<()> {
        let r = self.round(Op::ReduceScatter, 0, 0, full, out.len())?;
        out.copy_from_slice(&r);
        Ok(())
    }

    fn all_gather(&mut self, mine: &[f32], full: &mut [f32]) -> Result<()> {
        let r = self.round(Op::AllGather, 0, 0, mine, full.len())?;
        full.copy_from_slice(&r);
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let payload: &[f32] = if self.rank == root { data } else { &[] };
        let r = self.round(Op::Broadcast, root as u8, 0, payload, data.len())?;
        data.copy_from_slice(&r);
        Ok(())
    }

    fn barrier(&mut self, tag: u8, step: u64) -> Result<()> {
        self.round(Op::Barrier, tag, step, &[], 0).map(|_| ())
    }

    fn recorder(&mut self) -> Option<&mut crate::flight::Recorder> {
        self.recorder.as_mut()
    }
}

// ---- the hub -----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub world: usize,
    pub generation: u64,
    /// How long a round may wait for its last rank once its first rank arrived.
    pub collective_timeout: Duration,
    /// How long the group may go without starting a round (every rank stuck at once, for
    /// example all waiting on storage); longer than a step plus a checkpoint wait.
    pub idle_timeout: Duration,
    /// How long every rank has to connect (they load and restore state first).
    pub startup_timeout: Duration,
    pub frame_elems_max: u64,
}

/// What the hub tells the launcher. Every event names its generation.
#[derive(Debug, Clone)]
pub enum HubEvent {
    Ready {
        generation: u64,
        step: u64,
        at: Instant,
    },
    /// Every rank finished the run at `step`; the hub has stopped.
    Done {
        generation: u64,
        step: u64,
        at: Instant,
    },
    StepDone {
        generation: u64,
        step: u64,
        loss: f32,
        at: Instant,
    },
    /// A round (or the group's start) exceeded its timeout; `missing` are the ranks not heard from.
    Timeout {
        generation: u64,
        what: String,
        missing: Vec<usize>,
        waited: Duration,
    },
    /// A rank's connection failed or broke the protocol.
    Failed {
        generation: u64,
        rank: Option<usize>,
        reason: String,
    },
}

impl HubEvent {
    pub fn generation(&self) -> u64 {
        match self {
            HubEvent::Ready { generation, .. }
            | HubEvent::Done { generation, .. }
            | HubEvent::StepDone { generation, .. }
            | HubEvent::Timeout { generation, .. }
            | HubEvent::Failed { generation, .. } => *generation,
        }
    }
}

struct Arrival {
    rank: usize,
    header: Header,
    payload: Vec<f32>,
}

/// A hub serving on a thread of its own.
pub struct RunningHub {
    pub events: mpsc::Receiver<HubEvent>,
    /// Set to make the hub stop.
    pub stop: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<()>,
}

/// `serve_hub` for one generation on a new thread named after it.
pub fn spawn_hub(listener: Arc<TcpListener>, cfg: HubConfig) -> std::io::Result<RunningHub> {
    let (tx, events) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("hub-{}", cfg.generation))
        .spawn(move || serve_hub(&listener, cfg, tx, s))?;
    Ok(RunningHub { events, stop, thread })
}

/// Serves one generation on `listener` until the group fails or `stop` is set; reports to
/// `events`. Runs on the calling thread.
pub fn serve_hub(listener: &TcpListener, cfg: HubConfig, events: mpsc::Sender<HubEvent>, stop: Arc<AtomicBool>) {
    let generation = cfg.generation;
    let failed = |rank, reason: String| HubEvent::Failed { generation, rank, reason };
    let streams = match accept_group(listener, &cfg, &events, &stop) {
        Some(s) => s,
        None => return,
    };
    let (tx, rx) = mpsc::channel::<std::result::Result<Arrival, (usize, String)>>();
    let mut writers = Vec::with_capacity(streams.len());
    for (rank, s) in streams.into_iter().enumerate() {
        let reader = match s.try_clone() {
            Ok(r) => r,
            Err(e) => {
                let _ = events.send(failed(Some(rank), e.to_string()));
                return;
            }
        };
        writers.push(s);
        let tx = tx.clone();
        let max = cfg.frame_elems_max;
        std::thread::spawn(move || read_loop(reader, rank, max, tx));
    }
    drop(tx);
    run_rounds(&cfg, &mut writers, rx, &events, &stop);
    // Closing every connection wakes the readers and tells the ranks the generation is over.
    for w in &writers {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

type Inbox = mpsc::Receiver<std::result::Result<Arrival, (usize, String)>>;

fn run_rounds(
    cfg: &HubConfig,
    writers: &mut [TcpStream],
    rx: Inbox,
    events: &mpsc::Sender<HubEvent>,
    stop: &AtomicBool,
) {
    let generation = cfg.generation;
    let failed = |rank, reason: String| HubEvent::Failed { generation, rank, reason };
    let world = cfg.world;
    let mut pending: Vec<Option<Arrival>> = (0..world).map(|_| None).collect();
    let mut round_started: Option<Instant> = None;
    let mut idle_since = Instant::now();
    let mut scratch = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let (since, limit) = match round_started {
            Some(t) => (t, cfg.collective_timeout),
            None => (idle_since, cfg.idle_timeout),
        };
        let left = limit.saturating_sub(since.elapsed());
        if left.is_zero() {
            let missing: Vec<usize> = (0..world).filter(|&r| pending[r].is_none()).collect();
            let what = match pending.iter().flatten().next() {
                Some(a) => format!("{:?} #{}", a.header.op, a.header.seq),
                None => "the next collective".into(),
            };
            let _ = events.send(HubEvent::Timeout { generation, what, missing, waited: since.elapsed() });
            return;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Ok(a)) => {
                let r = a.rank;
                if pending[r].is_some() {
                    let _ = events.send(failed(Some(r), "sent two frames in one round".into()));
                    return;
                }
                round_started.get_or_insert_with(Instant::now);
                pending[r] = Some(a);
                if pending.iter().all(Option::is_some) {
                    let round: Vec<Arrival> = pending.iter_mut().map(|p| p.take().expect("checked above")).collect();
                    match complete_round(&round, writers, world, &mut scratch, generation) {
                        Ok(Some(ev)) => {
                            let done = matches!(ev, HubEvent::Done { .. });
                            let _ = events.send(ev);
                            if done {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(ev) => {
                            let _ = events.send(ev);
                            return;
                        }
                    }
                    round_started = None;
                    idle_since = Instant::now();
                }
            }
            Ok(Err((rank, reason))) => {
                let _ = events.send(failed(Some(rank), reason));
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn accept_group(
    listener: &TcpListener,
    cfg: &HubConfig,
    events: &mpsc::Sender<HubEvent>,
    stop: &AtomicBool,
) -> Option<Vec<TcpStream>> {
    let generation = cfg.generation;
    let deadline = Instant::now() + cfg.startup_timeout;
    let mut slots: Vec<Option<TcpStream>> = (0..cfg.world).map(|_| None).collect();
    if let Err(e) = listener.set_nonblocking(true) {
        let _ = events.send(HubEvent::Failed { generation, rank: None, reason: e.to_string() });
        return None;
    }
    while slots.iter().any(Option::is_none) {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        if Instant::now() >= deadline {
            let missing = (0..cfg.world).filter(|&r| slots[r].is_none()).collect();
            let _ = events.send(HubEvent::Timeout {
                generation,
                what: "joining the group".into(),
                missing,
                waited: cfg.startup_timeout,
            });
            return None;
        }
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "hub accept failed");
                continue;
            }
        };
        let setup = s
            .set_nonblocking(false)
            .and_then(|_| s.set_nodelay(true))
            .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(5))))
            .and_then(|_| s.set_write_timeout(Some(cfg.collective_timeout)));
        if let Err(e) = setup {
            tracing::warn!(error = %e, "hub could not set up a connection");
            continue;
        }
        let mut hello_scratch = Vec::new();
        let h = match read_header(&mut s)
            .and_then(|(h, crc)| read_payload(&mut s, 0, crc, &mut hello_scratch).map(|_| h))
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "hub dropped a connection without a valid hello");
                continue;
            }
        };
        let rank = h.rank as usize;
        let refuse = if h.op != Op::Hello {
            Some("expected hello".to_string())
        } else if h.step != generation {
            Some(format!("generation {} is over; this is generation {generation}", h.step))
        } else if h.seq != cfg.world as u64 || rank >= cfg.world {
            Some(format!("rank {rank} of {} does not fit a world of {}", h.seq, cfg.world))
        } else if slots[rank].is_some() {
            Some(format!("rank {rank} is already connected"))
        } else {
            None
        };
        match refuse {
            Some(why) => {
                tracing::warn!(rank, reason = %why, "hub refused a connection");
                send_error(&mut s, &why);
            }
            None => {
                // After the hello, reads block for as long as the round timeout allows; the
                // hub's own clock does the judging.
                let _ = s.set_read_timeout(None);
                slots[rank] = Some(s);
            }
        }
    }
    Some(slots.into_iter().flatten().collect())
}

fn send_error(s: &mut TcpStream, why: &str) {
    let mut frame = Vec::new();
    let h = Header { op: Op::Error, tag: 0, rank: 0, seq: 0, step: 0, len: why.len() as u64 };
    if write_frame(s, h, &[], &mut frame).is_ok() {
        let _ = s.write_all(why.as_bytes());
    }
}

fn read_loop(
    mut s: TcpStream,
    rank: usize,
    frame_elems_max: u64,
    tx: mpsc::Sender<std::result::Result<Arrival, (usize, String)>>,
) {
    let mut scratch = Vec::new();
    loop {
        let r = read_header(&mut s).and_then(|(h, crc)| {
            if h.rank as usize != rank {
                return Err(CollectiveError::Protocol(format!("frame claims rank {}", h.rank)));
            }
            if h.len > frame_elems_max {
                return Err(CollectiveError::Protocol(format!("frame of {} elements is over the limit", h.len)));
            }
            let payload = read_payload(&mut s, h.len as usize, crc, &mut scratch)?;
            Ok(Arrival { rank, header: h, payload })
        });
        let end = r.is_err();
        let msg = r.map_err(|e| {
            let reason = match e {
                CollectiveError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "connection closed".into(),
                other => other.to_string(),
            };
            (rank, reason)
        });
        if tx.send(msg).is_err() || end {
            return;
        }
    }
}

/// Computes and sends every rank's result. Returns the event the round stands for, if any.
fn complete_round(
    round: &[Arrival],
    writers: &mut [TcpStream],
    world: usize,
    scratch: &mut Vec<u8>,
    generation: u64,
) -> std::result::Result<Option<HubEvent>, HubEvent> {
    let first = round[0].header;
    let protocol = |rank: usize, reason: String| HubEvent::Failed { generation, rank: Some(rank), reason };
    for a in round {
        let h = a.header;
        if h.op != first.op || h.seq != first.seq || h.tag != first.tag {
            return Err(protocol(
                a.rank,
                format!("rank {} is in {:?} #{}, rank 0 in {:?} #{}", a.rank, h.op, h.seq, first.op, first.seq),
            ));
        }
    }
    let lens: Vec<usize> = round.iter().map(|a| a.payload.len()).collect();
    let same_len = |what: &str| {
        if lens.iter().all(|&l| l == lens[0]) {
            Ok(())
        } else {
            Err(protocol(0, format!("{what} with payloads of different lengths {lens:?}")))
        }
    };
    let sum = || {
        let mut acc = round[0].payload.clone();
        for a in &round[1..] {
            for (x, y) in acc.iter_mut().zip(&a.payload) {
                *x += *y;
            }
        }
        acc
    };
    let replies: Vec<Vec<f32>> = match first.op {
        Op::AllReduce => {
            same_len("all-reduce")?;
            let s = sum();
            vec![s; world]
        }
        Op::ReduceScatter => {
            same_len("reduce-scatter")?;
            let s = sum();
            (0..world).map(|r| s[owned_range(s.len(), r, world)].to_vec()).collect()
        }
        Op::AllGather => {
            let full: Vec<f32> = round.iter().flat_map(|a| a.payload.iter().copied()).collect();
            let total = full.len();
            if (0..world).any(|r| owned_range(total, r, world).len() != lens[r]) {
                return Err(protocol(0, format!("all-gather slices {lens:?} do not tile the vector")));
            }
            vec![full; world]
        }
        Op::Broadcast => {
            let root = first.tag as usize;
            if root >= world {
                return Err(protocol(0, format!("broadcast from rank {root} outside the world")));
            }
            vec![round[root].payload.clone(); world]
        }
        Op::Barrier => vec![Vec::new(); world],
        Op::Hello | Op::Error => return Err(protocol(0, format!("{:?} inside a round", first.op))),
    };
    for (rank, (w, payload)) in writers.iter_mut().zip(&replies).enumerate() {
        let h = Header { rank: rank as u32, len: payload.len() as u64, ..first };
        if let Err(e) = write_frame(w, h, payload, scratch) {
            return Err(if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                HubEvent::Timeout {
                    generation,
                    what: format!("writing {:?} #{} back", first.op, first.seq),
                    missing: vec![rank],
                    waited: Duration::ZERO,
                }
            } else {
                HubEvent::Failed { generation, rank: Some(rank), reason: e.to_string() }
            });
        }
    }
    let at = Instant::now();
    Ok(match (first.op, first.tag) {
        (Op::AllReduce, TAG_LOSS) => {
            let loss = replies[0].first().copied().unwrap_or(f32::NAN) / world as f32;
            Some(HubEvent::StepDone { generation, step: first.step, loss, at })
        }
        (Op::Barrier, TAG_READY) => Some(HubEvent::Ready { generation, step: first.step, at }),
        (Op::Barrier, TAG_DONE) => Some(HubEvent::Done { generation, step: first.step, at }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(world: usize, timeout_ms: u64) -> (String, mpsc::Receiver<HubEvent>, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = HubConfig {
            world,
            generation: 7,
            collective_timeout: Duration::from_millis(timeout_ms),
            idle_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(10),
            frame_elems_max: 1 << 20,
        };
        let hub = spawn_hub(Arc::new(listener), cfg).unwrap();
        (addr, hub.events, hub.stop)
    }

    #[test]
    fn collectives_reduce_in_rank_order_and_tile() {
        let world = 3;
        let (addr, rx, stop) = hub(world, 5_000);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = HubClient::connect(&addr, rank, world, 7, Duration::from_secs(10)).unwrap();
                    let mut v = vec![rank as f32 + 1.0; 5];
                    c.all_reduce_sum(&mut v, TAG_LOSS, 42).unwrap();
                    assert_eq!(v, vec![6.0; 5]);
                    let full: Vec<f32> = (0..10).map(|i| (i * (rank + 1)) as f32).collect();
                    let mine = owned_range(10, rank, world);
                    let mut out = vec![0.0; mine.len()];
                    c.reduce_scatter_sum(&full, &mut out).unwrap();
                    let want: Vec<f32> = mine.clone().map(|i| (i * 6) as f32).collect();
                    assert_eq!(out, want);
                    let mut gathered = vec![0.0; 10];
                    c.all_gather(&want, &mut gathered).unwrap();
                    assert_eq!(gathered, (0..10).map(|i| (i * 6) as f32).collect::<Vec<_>>());
                    let mut b = vec![rank as f32; 3];
                    c.broadcast(&mut b, 2).unwrap();
                    assert_eq!(b, vec![2.0; 3]);
                    c.barrier(TAG_READY, 9).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            HubEvent::StepDone { step, loss, .. } => assert_eq!((step, loss), (42, 2.0)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), HubEvent::Ready { step: 9, .. }));
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_silent_rank_is_reported_within_the_timeout() {
        let (addr, rx, _stop) = hub(2, 300);
        let a = addr.clone();
        let talker = std::thread::spawn(move || {
            let mut c = HubClient::connect(&a, 0, 2, 7, Duration::from_secs(5)).unwrap();
            let mut v = vec![1.0];
            c.all_reduce_sum(&mut v, 0, 1)
        });
        let _silent = HubClient::connect(&addr, 1, 2, 7, Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            HubEvent::Timeout { missing, .. } => assert_eq!(missing, vec![1]),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        drop(_silent);
        // The talker's connection is dropped with the hub; its read fails rather than hangs.
        assert!(talker.join().unwrap().is_err());
    }

    /// A byte flipped between a rank and the hub (a faulty NIC or switch) fails the round: the
    /// hub reports the rank, and nobody receives a result computed from the bad bytes.
    #[test]
    fn a_frame_corrupted_in_transit_fails_the_round() {
        let (addr, rx, stop) = hub(2, 5_000);
        let a = addr.clone();
        let honest = std::thread::spawn(move || {
            let mut c = HubClient::connect(&a, 0, 2, 7, Duration::from_secs(5)).unwrap();
            let mut v = vec![1.0; 4];
            c.all_reduce_sum(&mut v, 0, 1)
        });
        let mut raw = TcpStream::connect(&addr).unwrap();
        let mut scratch = Vec::new();
        let hello = Header { op: Op::Hello, tag: 0, rank: 1, seq: 2, step: 7, len: 0 };
        write_frame(&mut raw, hello, &[], &mut scratch).unwrap();
        let h = Header { op: Op::AllReduce, tag: 0, rank: 1, seq: 1, step: 1, len: 4 };
        let mut frame = Vec::new();
        write_frame(&mut frame, h, &[2.0; 4], &mut scratch).unwrap();
        frame[HEADER_BYTES + 5] ^= 0x10;
        raw.write_all(&frame).unwrap();
        match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            HubEvent::Failed { rank, reason, .. } => {
                assert_eq!(rank, Some(1));
                assert!(reason.contains("checksum mismatch"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Relaxed);
        drop(raw);
        assert!(honest.join().unwrap().is_err(), "the honest rank gets no result from a corrupted round");
    }

    #[test]
    fn stale_generations_and_duplicate_ranks_are_refused() {
        let (addr, _rx, stop) = hub(2, 5_000);
        let mut stale = HubClient::connect(&addr, 0, 2, 6, Duration::from_secs(5)).unwrap();
        let err = stale.barrier(0, 0).unwrap_err();
        assert!(err.to_string().contains("generation 6 is over"), "{err}");
        let _first = HubClient::connect(&addr, 1, 2, 7, Duration::from_secs(5)).unwrap();
        let mut dup = HubClient::connect(&addr, 1, 2, 7, Duration::from_secs(5)).unwrap();
        let err = dup.barrier(0, 0).unwrap_err();
        assert!(err.to_string().contains("already connected"), "{err}");
        stop.store(true, Ordering::Relaxed);
    }
}
