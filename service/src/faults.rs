//! Fault injection into the object store, for chaos runs and the tests that prove each fault
//! is survived. Off unless the config sets `fault_injection`; then `POST /v1/faults` arms faults
//! and `GET /v1/faults` reports which fired.
//!
//! Design note.
//! * `FaultyStore` wraps the real store and implements the same `ObjectStore` trait, so every
//!   call ckptd makes through `store.rs` can be faulted and nothing else changes. Chunks that a
//!   local-directory store receives by `O_DIRECT` or adoption bypass it (they never were
//!   object-store calls); manifests, index objects, chunk reads and listings go through it.
//! * A fault is armed for the next `count` calls of one kind (manifest, index, chunk, list, any)
//!   and fires once per call: an error the store could return (a 503-like transient error), a
//!   timeout (the call hangs `delay_ms`, then fails), a lost acknowledgement (the write happens,
//!   the caller sees an error), latency (the call is delayed, then made), or a stale listing (the
//!   first listing this process saw for the prefix, or an empty one).
//! * Arming is deterministic: which calls are hit depends only on the order of calls, not on a
//!   random draw, so a test can say which call it faults and assert that it fired.
//! * The armed list is bounded (`ARMED_MAX`) and counts are capped, so a hostile caller of the
//!   endpoint cannot grow ckptd's memory; so are the listings kept for stale answers. With
//!   injection on, listings are collected whole before they are returned (a cost only chaos
//!   runs pay).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ckpt_core::keys;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
use serde::{Deserialize, Serialize};

/// Armed faults kept at once.
pub const ARMED_MAX: usize = 64;
/// Calls one armed fault may hit.
pub const COUNT_MAX: u32 = 10_000;
/// Longest injected delay.
pub const DELAY_MS_MAX: u64 = 60_000;
/// Listings kept for stale answers: prefixes, and entries in one listing.
const FIRST_LISTS_MAX: usize = 64;
const FIRST_LIST_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("count must be within 1..={COUNT_MAX}")]
    Count,
    #[error("delay_ms must be at most {DELAY_MS_MAX}")]
    Delay,
    #[error("stale_list faults listings, and listings take no other kind than errors and delays")]
    NotAListing,
    #[error("{ARMED_MAX} faults are armed already")]
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A transient error, as a 5xx from a real store.
    Error,
    /// The call hangs for `delay_ms`, then fails.
    Timeout,
    /// The write happens, but the caller is told it failed.
    LostAck,
    /// The call is delayed by `delay_ms`, then made.
    Latency,
    /// A listing as of an earlier time.
    StaleList,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultOp {
    /// Puts and gets of roots (the commit point).
    Manifest,
    /// Puts and gets of index objects.
    Index,
    /// Puts and gets of chunks.
    Chunk,
    /// Listings.
    List,
    /// Any call.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub kind: FaultKind,
    pub op: FaultOp,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub delay_ms: u64,
}

fn one() -> u32 {
    1
}

impl FaultRequest {
    pub fn validate(&self) -> std::result::Result<(), FaultError> {
        if self.count == 0 || self.count > COUNT_MAX {
            return Err(FaultError::Count);
        }
        if self.delay_ms > DELAY_MS_MAX {
            return Err(FaultError::Delay);
        }
        let stale = self.kind == FaultKind::StaleList;
        if (stale && !matches!(self.op, FaultOp::List | FaultOp::Any))
            || (self.op == FaultOp::List && matches!(self.kind, FaultKind::LostAck))
        {
            return Err(FaultError::NotAListing);
        }
        Ok(())
    }
}

/// What has fired, for `GET /v1/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultReport {
    pub armed: Vec<FaultRequest>,
    /// `"<kind>:<op>"` → calls hit.
    pub fired: BTreeMap<String, u64>,
}

/// The shared state behind the wrapper and the endpoint.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<FaultRequest>>,
    fired: Mutex<BTreeMap<String, u64>>,
    /// The first listing seen per prefix: what a stale listing returns.
    first_lists: Mutex<HashMap<String, Vec<ObjectMeta>>>,
}

impl Faults {
    pub fn arm(&self, req: FaultRequest) -> std::result::Result<(), FaultError> {
        req.validate()?;
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        if armed.len() >= ARMED_MAX {
            return Err(FaultError::Full);
        }
        armed.push(req);
        Ok(())
    }

    pub fn report(&self) -> FaultReport {
        FaultReport {
            armed: self.armed.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            fired: self.fired.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Takes one call's worth of the first armed fault that matches `op` and that this call
    /// can suffer: a lost acknowledgement needs a write, a stale listing a full listing.
    fn take(&self, op: FaultOp, call: Call) -> Option<FaultRequest> {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        let i = armed.iter().position(|f| {
            let applies = match f.kind {
                FaultKind::StaleList => call == Call::List,
                FaultKind::LostAck => call == Call::Write,
                _ => true,
            };
            applies && (f.op == op || f.op == FaultOp::Any)
        })?;
        let hit = armed[i].clone();
        armed[i].count -= 1;
        if armed[i].count == 0 {
            armed.remove(i);
        }
        drop(armed);
        let key = format!("{}:{}", name(&hit.kind), name(&op));
        *self.fired.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += 1;
        tracing::warn!(kind = ?hit.kind, ?op, "injected store fault");
        Some(hit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Write,
    Read,
    /// A listing that can be served stale (`list`).
    List,
}

fn name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn op_of(location: &Path) -> FaultOp {
    match keys::parse_key(location.as_ref()) {
        Some(keys::ParsedKey::Manifest { .. }) => FaultOp::Manifest,
        Some(keys::ParsedKey::Chunk { .. }) => FaultOp::Chunk,
        Some(keys::ParsedKey::Index { .. }) => FaultOp::Index,
        _ => FaultOp::Any,
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic { store: "faulty", source: format!("injected fault: {what}").into() }
}

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> FaultyStore {
        FaultyStore { inner, faults }
    }

    /// Runs the fault armed for this call, if any, around `call`.
    async fn around<T, F>(&self, op: FaultOp, kind: Call, call: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let Some(f) = self.faults.take(op, kind) else { return call.await };
        let delay = Duration::from_millis(f.delay_ms);
        match f.kind {
            FaultKind::Error => Err(injected("service unavailable (503)")),
            FaultKind::Timeout => {
                tokio::time::sleep(delay).await;
                Err(injected("request timed out"))
            }
            FaultKind::LostAck => {
                call.await?;
                Err(injected("connection reset after the write (acknowledgement lost)"))
            }
            FaultKind::Latency => {
                tokio::time::sleep(delay).await;
                call.await
            }
            FaultKind::StaleList => call.await,
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.around(op_of(location), Call::Write, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.around(op_of(location), Call::Read, self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.around(op_of(location), Call::Read, self.inner.get_ranges(location, ranges)).await
    }

    /// Each delete is a write of its key's kind (a root's delete is a `manifest` call), one at a
    /// time.
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let me = FaultyStore { inner: self.inner.clone(), faults: self.faults.clone() };
        locations
            .then(move |location| {
                let me = FaultyStore { inner: me.inner.clone(), faults: me.faults.clone() };
                async move {
                    let location = location?;
                    let deleted = object_store::ObjectStoreExt::delete(me.inner.as_ref(), &location);
                    me.around(op_of(&location), Call::Write, deleted).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        let inner = self.inner.list(prefix);
        let faults = self.faults.clone();
        futures::stream::once(async move {
            let first = faults.first_lists.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
            if let Some(f) = faults.take(FaultOp::List, Call::List) {
                let delay = Duration::from_millis(f.delay_ms);
                match f.kind {
                    FaultKind::StaleList => return Ok(first.unwrap_or_default()),
                    FaultKind::Error | FaultKind::LostAck => return Err(injected("service unavailable (503)")),
                    FaultKind::Timeout => {
                        tokio::time::sleep(delay).await;
                        return Err(injected("request timed out"));
                    }
                    FaultKind::Latency => tokio::time::sleep(delay).await,
                }
            }
            let now: Vec<ObjectMeta> = inner.try_collect().await?;
            if first.is_none() && now.len() <= FIRST_LIST_ENTRIES_MAX {
                let mut lists = faults.first_lists.lock().unwrap_or_else(|p| p.into_inner());
                if lists.len() < FIRST_LISTS_MAX {
                    lists.insert(key, now.clone());
                }
            }
            Ok(now)
        })
        .map(|r: Result<Vec<ObjectMeta>>| match r {
            Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
            Err(e) => futures::stream::once(async { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.around(FaultOp::List, Call::Read, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.around(op_of(to), Call::Write, self.inner.copy_opts(from, to, options)).await
    }
}
