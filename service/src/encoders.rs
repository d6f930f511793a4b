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
        let mut ws = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match free.pop() {
                    Some(ws) => break ws,
                    None => free = self.ready.wait(free).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        // Given back even if the codec panics, so a panic cannot shrink the set for good.
        struct Back<'a>(&'a Encoders, Option<Workspace>);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                if let Some(ws) = self.1.take() {
                    self.0.free.lock().unwrap_or_else(|e| e.into_inner()).push(ws);
                    self.0.ready.notify_one();
                }
            }
        }
        let mut back = Back(self, None);
        let out = ckpt_core::codec::encode_with(raw, opts, &mut ws);
        back.1 = Some(ws);
        out
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
}
