//! A fixed set of chunk encoders shared by every path that stores chunks.
//!
//! Design note. Encoding a chunk needs a plane buffer and a zstd context, several megabytes
//! together. Run on whatever blocking thread picks the work up, each of up to
//! `chunk_requests_max` concurrent adopts held its own set, and every blocking thread kept one
//! after it was done: ckptd's peak RSS reached 1.1 GiB on the bench's trained-data save against
//! 300 MiB on incompressible data. Here `encoders_max` workspaces exist, made when first needed
//! and reused; an encode waits for a free one. Waiting is bounded by the encodes ahead of it,
//! which are pure computation on at most `chunk_bytes_max` bytes each. More encoders than cores
//! would only share the same cores.

use std::sync::{Condvar, Mutex};

use ckpt_core::codec::{EncodeOptions, Workspace};
use ckpt_core::Codec;

pub struct Encoders {
    free: Mutex<Vec<Workspace>>,
    ready: Condvar,
}

impl Encoders {
    pub fn new(max: usize) -> Encoders {
        Encoders { free: Mutex::new((0..max.max(1)).map(|_| Workspace::default()).collect()), ready: Condvar::new() }
    }

    /// Encodes `raw` as the core codec decides (`None`: store it raw), with the first free
    /// workspace. Blocking: call it from blocking work.
    pub fn encode(&self, raw: &[u8], opts: &EncodeOptions) -> (Codec, Option<Vec<u8>>) {
        self.with_workspace(|ws| ckpt_core::codec::encode_with(raw, opts, ws))
    }

    /// Runs `f` with the first free workspace, waiting for one.
    fn with_workspace<T>(&self, f: impl FnOnce(&mut Workspace) -> T) -> T {
        let ws = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match free.pop() {
                    Some(ws) => break ws,
                    None => free = self.ready.wait(free).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        // Held by a guard that gives it back on every exit; after a panic a fresh workspace
        // takes its place (the old one may be half-changed), so the set never shrinks and
        // nobody waits for a workspace that is gone.
        struct Back<'a>(&'a Encoders, Option<Workspace>);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                let ws = match self.1.take() {
                    Some(ws) if !std::thread::panicking() => ws,
                    _ => Workspace::default(),
                };
                self.0.free.lock().unwrap_or_else(|e| e.into_inner()).push(ws);
                self.0.ready.notify_one();
            }
        }
        let mut back = Back(self, Some(ws));
        f(back.1.as_mut().expect("the workspace is in the guard until it drops"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_encodes_share_the_set_and_give_every_workspace_back() {
        let encoders = std::sync::Arc::new(Encoders::new(2));
        let raw: Vec<u8> = (0..1u32 << 18).map(|i| (i % 7) as u8).collect();
        let opts = EncodeOptions::default();
        let expected = ckpt_core::codec::encode(&raw, &opts);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (e, raw) = (encoders.clone(), raw.clone());
                std::thread::spawn(move || e.encode(&raw, &opts))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), expected);
        }
        assert_eq!(encoders.free.lock().unwrap().len(), 2, "every workspace came back");
    }

    #[test]
    fn a_panicking_encode_does_not_shrink_the_set() {
        let encoders = std::sync::Arc::new(Encoders::new(1));
        let e = encoders.clone();
        let panicked = std::thread::spawn(move || e.with_workspace(|_| panic!("a codec bug"))).join();
        assert!(panicked.is_err());
        // With the only workspace lost, this would wait forever.
        let (tx, rx) = std::sync::mpsc::channel();
        let e = encoders.clone();
        std::thread::spawn(move || tx.send(e.encode(&[0u8; 1 << 16], &EncodeOptions::default())).unwrap());
        let (codec, _) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("an encode after a panic");
        assert_eq!(codec, Codec::Zstd);
    }
}
