//! Asynchronous save: the trainer's stall is one copy into a reused staging buffer.
//!
//! Design note. `AsyncSaver` owns one buffer of fixed capacity, allocated and touched once so
//! the copy never page-faults. `save` waits for the buffer (only if the previous save still
//! holds it, and reports how long), copies the caller's tensors into it, and returns; hashing,
//! dedup and upload run in a background task over zero-copy slices of the buffer. When that
//! task ends, the buffer is recycled for the next save. Host memory for async saves is
//! therefore bounded by the capacity, not by the number of saves in flight.
//!
//! The background part runs on the saver's own small runtime whose threads are niced
//! (`background_nice`, default 10): hashing, dedup queries and uploads yield the CPU to the
//! trainer, whose next step should not pay for the last checkpoint. Dropping the saver cancels
//! saves still in flight; call `SaveTicket::finish` first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::DType;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::client::{Client, SaveReport, SaveSpec, Wait};
use crate::error::ClientError;
use crate::tensor::Tensor;

/// A tensor borrowed from the trainer for the duration of the copy.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub global_shape: &'a [u64],
    pub offsets: &'a [u64],
    pub data: &'a [u8],
}

impl Tensor {
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            global_shape: &self.global_shape,
            offsets: &self.offsets,
            data: &self.data,
        }
    }
}

pub struct AsyncSaver {
    client: Client,
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Lowers the calling thread's priority. On Linux the nice value is per thread, and threads
/// inherit it from their creator.
fn nice_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread (who = 0) has no memory-safety preconditions.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// A save in progress. The stall is over when you hold one.
pub struct SaveTicket {
    /// Time the caller was blocked copying its tensors.
    pub stall: Duration,
    /// Time spent waiting for the previous save to release the buffer, before the copy.
    pub waited: Duration,
    pub bytes: u64,
    handle: JoinHandle<Result<SaveReport, ClientError>>,
}

impl SaveTicket {
    /// Waits for the background part of the save (as chosen by its `Wait`).
    pub async fn finish(self) -> Result<SaveReport, ClientError> {
        self.handle.await.map_err(|e| ClientError::Internal(format!("save task failed: {e}")))?
    }
}

fn touched(capacity: usize) -> Vec<u8> {
    // Writing every page now moves the page faults out of the trainer's stall.
    vec![1u8; capacity]
}

impl AsyncSaver {
    /// A saver whose background work runs at nice 10.
    pub fn new(client: Client, capacity_bytes: usize) -> AsyncSaver {
        Self::with_background_nice(client, capacity_bytes, 10)
    }

    /// `background_nice` 0 keeps the background work at the caller's priority.
    pub fn with_background_nice(client: Client, capacity_bytes: usize, background_nice: i32) -> AsyncSaver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("ckpt-save")
            .on_thread_start(move || nice_this_thread(background_nice))
            .enable_all()
            .build()
            .ok();
        if runtime.is_none() {
            tracing::warn!("cannot start the background save runtime; saves run on the caller's runtime");
        }
        AsyncSaver { client, buffer: Arc::new(Mutex::new(touched(capacity_bytes))), capacity: capacity_bytes, runtime }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Copies `tensors` into the staging buffer and returns; the save continues in the
    /// background. Fails at once if the tensors do not fit the buffer.
    pub async fn save(
        &self,
        spec: SaveSpec,
        tensors: &[TensorView<'_>],
        wait: Wait,
    ) -> Result<SaveTicket, ClientError> {
        let total: usize = tensors.iter().map(|t| t.data.len()).sum();
        if total > self.capacity {
            return Err(ClientError::InvalidTensor {
                name: tensors.first().map(|t| t.name.to_string()).unwrap_or_default(),
                reason: format!("the state is {total} bytes, the staging buffer holds {}", self.capacity),
            });
        }
        let asked = Instant::now();
        let mut guard = self.buffer.clone().lock_owned().await;
        let waited = asked.elapsed();

        let started = Instant::now();
        let mut buf = std::mem::take(&mut *guard);
        if buf.len() < self.capacity {
            buf = touched(self.capacity);
        }
        let mut ranges = Vec::with_capacity(tensors.len());
        let mut at = 0;
        for t in tensors {
            buf[at..at + t.data.len()].copy_from_slice(t.data);
            ranges.push(at..at + t.data.len());
            at += t.data.len();
        }
        let stall = started.elapsed();

        let frozen = Bytes::from(buf);
        let owned: Vec<Tensor> = tensors
            .iter()
            .zip(ranges)
            .map(|(t, r)| Tensor {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                global_shape: t.global_shape.to_vec(),
                offsets: t.offsets.to_vec(),
                data: frozen.slice(r),
            })
            .collect();
        let client = self.client.clone();
        let capacity = self.capacity;
        let work = async move {
            let result = client.save(&spec, &owned, wait).await;
            drop(owned);
            *guard = match frozen.try_into_mut() {
                Ok(m) => Vec::from(m),
                Err(_) => {
                    tracing::warn!("staging buffer still shared after a save; allocating a fresh one");
                    touched(capacity)
                }
            };
            result
        };
        let handle = match &self.runtime {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        };
        Ok(SaveTicket { stall, waited, bytes: total as u64, handle })
    }
}
