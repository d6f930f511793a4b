//! A TCP fault proxy: sits between ranks and ckptd, or ranks and the collective hub, and
//! degrades the link on command.
//!
//! Design note. Every accepted connection gets an upstream connection and one pump per
//! direction. A pump reads up to 16 KiB and, before forwarding it, applies the current mode:
//! latency (every read is handed to the writer through a delay line), a bandwidth cap (one timeline shared by all connections, so
//! the cap holds for the link as a whole), a blackhole (nothing is
//! forwarded until the mode changes: TCP retransmits, so a real blackhole stalls the stream
//! rather than losing bytes), or corruption (one bit flipped in the next `n` reads that lie
//! past the first 64 KiB of their direction, so HTTP heads pass and bodies are hit). A reset
//! closes every open connection with RST. The upstream can be repointed (a restarted ckptd
//! listens on a new port). Counters say what was done, so tests can
//! assert that a fault happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Mode {
    Pass,
    Latency {
        ms: u64,
    },
    BandwidthCap {
        bytes_per_s: u64,
    },
    Blackhole,
    /// Corrupt one bit in each of the next `reads` reads past the first 64 KiB, in the
    /// direction(s) chosen.
    Corrupt {
        reads: u32,
        upstream: bool,
        downstream: bool,
    },
}

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct ProxyCounters {
    pub connections: u64,
    pub bytes_forwarded: u64,
    pub bits_flipped: u64,
    pub resets: u64,
    pub delayed_reads: u64,
    /// Reads a blackhole held back.
    pub held_reads: u64,
    /// Open connections a reset closed.
    pub connections_reset: u64,
}

struct Shared {
    mode: Mutex<Mode>,
    upstream: Mutex<String>,
    /// Bumped by `reset`: connections opened before it close.
    epoch: watch::Sender<u64>,
    connections: AtomicU64,
    bytes: AtomicU64,
    flipped: AtomicU64,
    resets: AtomicU64,
    delayed: AtomicU64,
    held: AtomicU64,
    reset_connections: AtomicU64,
    /// The bandwidth cap's timeline, shared by every connection and direction.
    next_free: Mutex<tokio::time::Instant>,
}

#[derive(Clone)]
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
}

/// Bytes of each direction passed untouched before corruption may start.
const CLEAN_PREFIX_BYTES: u64 = 64 * 1024;

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: String) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (epoch, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            upstream: Mutex::new(upstream),
            epoch,
            connections: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            flipped: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            held: AtomicU64::new(0),
            reset_connections: AtomicU64::new(0),
            next_free: Mutex::new(tokio::time::Instant::now()),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let down = match listener.accept().await {
                    Ok((down, _)) => down,
                    Err(_) => {
                        // Out of descriptors, say: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let s = s.clone();
                let upstream = s.upstream.lock().unwrap_or_else(|p| p.into_inner()).clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(&upstream).await else { return };
                    s.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let epoch = s.epoch.subscribe();
                    let born = *epoch.borrow();
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let a = tokio::spawn(pump(dr, uw, s.clone(), true, (epoch.clone(), born)));
                    let b = tokio::spawn(pump(ur, dw, s.clone(), false, (epoch, born)));
                    if let (Ok(true), _) | (_, Ok(true)) = (a.await, b.await) {
                        s.reset_connections.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(Proxy { addr, shared })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_upstream(&self, upstream: String) {
        *self.shared.upstream.lock().unwrap_or_else(|p| p.into_inner()) = upstream;
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every open connection (its pumps are dropped, and their sockets with them).
    pub fn reset(&self) {
        self.shared.resets.fetch_add(1, Ordering::Relaxed);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    pub fn counters(&self) -> ProxyCounters {
        let s = &self.shared;
        ProxyCounters {
            connections: s.connections.load(Ordering::Relaxed),
            bytes_forwarded: s.bytes.load(Ordering::Relaxed),
            bits_flipped: s.flipped.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
            delayed_reads: s.delayed.load(Ordering::Relaxed),
            held_reads: s.held.load(Ordering::Relaxed),
            connections_reset: s.reset_connections.load(Ordering::Relaxed),
        }
    }
}

/// Forwards one direction until it ends; returns whether a reset ended it. Reads go through a
/// bounded delay line to the writer, so latency delays every byte by the same time without
/// limiting throughput (a long fat pipe, not a slow one).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    s: Arc<Shared>,
    upstream: bool,
    (mut epoch, born): (watch::Receiver<u64>, u64),
) -> bool {
    // At most this many reads (16 KiB each) in flight between reader and writer.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let shared = s.clone();
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
            shared.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut seen = 0u64;
        loop {
            let read = tokio::select! {
                r = from.read(&mut buf) => r,
                _ = epoch.wait_for(|e| *e != born) => {
                    // Closed with RST, as a dropped switch port or a rebooted NIC would: linger
                    // 0 on this socket, and the other pump does the same on its own.
                    let _ = from.as_ref().set_zero_linger();
                    return true;
                }
            };
            let n = match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let mut due = tokio::time::Instant::now();
            let mut held = false;
            loop {
                let mode = *s.mode.lock().unwrap_or_else(|p| p.into_inner());
                match mode {
                    Mode::Blackhole => {
                        if !held {
                            held = true;
                            s.held.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Mode::Latency { ms } => {
                        s.delayed.fetch_add(1, Ordering::Relaxed);
                        due += Duration::from_millis(ms);
                        break;
                    }
                    Mode::BandwidthCap { bytes_per_s } => {
                        s.delayed.fetch_add(1, Ordering::Relaxed);
                        let done = {
                            let mut next = s.next_free.lock().unwrap_or_else(|p| p.into_inner());
                            let start = (*next).max(tokio::time::Instant::now());
                            *next = start + Duration::from_secs_f64(n as f64 / bytes_per_s.max(1) as f64);
                            *next
                        };
                        tokio::time::sleep_until(done).await;
                        break;
                    }
                    Mode::Corrupt { reads, upstream: up, downstream: down } => {
                        if reads > 0 && seen >= CLEAN_PREFIX_BYTES && ((upstream && up) || (!upstream && down)) {
                            let mut m = s.mode.lock().unwrap_or_else(|p| p.into_inner());
                            // Take one read's worth of the budget, if another pump has not.
                            if let Mode::Corrupt { reads: r, .. } = &mut *m {
                                if *r > 0 {
                                    *r -= 1;
                                    buf[n / 2] ^= 0x04;
                                    s.flipped.fetch_add(1, Ordering::Relaxed);
                                }
                                if *r == 0 {
                                    *m = Mode::Pass;
                                }
                            }
                        }
                        break;
                    }
                    Mode::Pass => break,
                }
            }
            seen += n as u64;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return false;
            }
        }
    };
    let (reset, ()) = tokio::join!(reader, writer);
    reset
}
