//! A job's GC lock: one run per job at a time across ckptd nodes, held as a lease that fences a
//! run which lost it.
//!
//! Design note.
//! * The lock is a create-only object (`jobs/<job>/gc/lock`) whose body names the node and the
//!   run (a random id: a node restarted, or two runs of one node, are told apart). A run
//!   rewrites it every `stale / 24` (15 minutes for the default six hours); another node takes
//!   it over once it has not been written for `stale`, by the object's store time against that
//!   node's clock.
//! * The lease: the run holds the lock only while its last successful rewrite *began* less
//!   than `stale / 2` ago, by both this process's monotonic clock and its wall clock (a frozen
//!   VM may not advance the first; a stepped clock may move the second). Half the takeover
//!   time leaves room for clock skew between this node, the store and the node taking over,
//!   and for stores whose times count whole seconds.
//! * Fencing: every step of a run that deletes or rewrites GC state asks `ensure` first. A run
//!   whose lease lapsed (its process stopped, its VM frozen, its store writes failing for
//!   hours) stops there with 409 and changes nothing more; a rewrite that finds the lock
//!   naming another run, or gone, stops the run at once, and never writes over that run's
//!   lock. Release deletes the lock only while it names this run. Without conditional deletes
//!   in every store, what is left is one request: a process stopped between `ensure` and the
//!   store acting on the request it then sends.
//! * Two nodes that find one stale lock at the same moment may both take it over (delete, then
//!   create): the second delete removes the first's new lock. So a run that took a lock over
//!   waits (a 24th of the stale time, at most 5 s) and reads it again before it does anything;
//!   a lock that no longer names it is 409. A node that finds, just before its delete, that
//!   half that wait has passed since the store answered its read of the stale lock (it
//!   stalled) gives up with 409 rather than delete what may by now be a settled run's lock; a
//!   retry reads again. What gets past both is, as for every step, requests held in flight:
//!   the read's answer on its way back and the delete on its way to the store (with the
//!   retries of ckptd's helper and of the store's client) taking more than half the settle
//!   time together. The read's own time is not counted, so a slow store does not refuse every
//!   takeover. The run it deleted finds out at its next rewrite and stops; until then both
//!   run: each sweep delete still skips an object written since its list, but the two runs'
//!   sweep records (`gc/swept.json`) can overwrite each other, which weakens the commit-time
//!   check for saves of that window.
//! * A lock released between a failed create and the read that followed is created again,
//!   never deleted. A create whose acknowledgement was lost is told from another node's by the
//!   read after settling; a failed read there lets the run go on (refusing would strand its
//!   lock for the stale time), and its first rewrite reads the lock again.
//! * Clock skew allowed: half the stale time, less the store's time granularity (a second on
//!   S3, whose `Last-Modified` counts whole seconds).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ckpt_core::keys;
use serde::{Deserialize, Serialize};

use crate::coordinator::now_unix_ms;
use crate::error::ServiceError;
use crate::store::{Store, StoreError};

/// The body of a job's GC lock.
#[derive(Serialize, Deserialize)]
struct LockBody {
    node: String,
    started_unix_ms: u64,
    /// Absent in locks written before runs had ids (their node's restart releases them).
    #[serde(default)]
    run: Option<String>,
}

/// 409 for a lock held by another run (on `holder`, last written at `since` ms, when known).
fn held(job: &str, key: &str, holder: Option<String>, since: Option<u64>) -> ServiceError {
    let on = holder.map(|n| format!(" on node {n}")).unwrap_or_default();
    let at = since.map(|t| format!(" (its lock {key} was last written at {t} ms)")).unwrap_or_default();
    ServiceError::Conflict(format!("a GC of job {job} is already running{on}{at}; try later"))
}

/// How long a run that took a stale lock over waits before it reads the lock again: longer
/// than another node that read the stale lock at the same moment takes to delete it and create
/// its own (a few store requests), and short against the takeover time.
fn settle_for(stale: Duration) -> Duration {
    (stale / 24).min(Duration::from_secs(5))
}

/// The node a lock's body names.
fn node_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<LockBody>(bytes).ok().map(|b| b.node)
}

/// The node a lock record names, if there is one.
fn holder(record: Option<(Bytes, u64)>) -> Option<String> {
    record.and_then(|(b, _)| node_of(&b))
}

/// Whether a lock's body names the run `run`.
fn names_run(bytes: &[u8], run: &str) -> bool {
    serde_json::from_slice::<LockBody>(bytes).is_ok_and(|b| b.run.as_deref() == Some(run))
}

/// A moment on both clocks: a frozen VM may not advance the monotonic one, a stepped clock may
/// move the wall one, so what has elapsed since is the longer of the two readings.
#[derive(Clone, Copy)]
struct Stamp {
    mono: Instant,
    wall: SystemTime,
}

impl Stamp {
    fn now() -> Stamp {
        Stamp { mono: Instant::now(), wall: SystemTime::now() }
    }

    fn elapsed(&self) -> Duration {
        self.mono.elapsed().max(self.wall.elapsed().unwrap_or_default())
    }
}

/// When the lease was last renewed: the start of the last successful rewrite.
struct Renewed {
    at: Stamp,
    lost: Option<String>,
}

/// The GC lock of one job, held by this run.
pub(crate) struct GcLock {
    job: String,
    key: String,
    run: String,
    body: Bytes,
    stale: Duration,
    renewed: Mutex<Renewed>,
}

impl GcLock {
    /// A new run of `node` on `job`'s lock, not yet taken; its lease counts from now.
    fn new(job: &str, node: &str, stale: Duration) -> Result<GcLock, ServiceError> {
        let run = format!("{:016x}", rand::random::<u64>());
        let body = LockBody { node: node.to_string(), started_unix_ms: now_unix_ms(), run: Some(run.clone()) };
        let body = Bytes::from(serde_json::to_vec(&body).map_err(|e| ServiceError::Internal(e.to_string()))?);
        Ok(GcLock {
            job: job.to_string(),
            key: keys::gc_lock_key(job),
            run,
            body,
            stale,
            renewed: Mutex::new(Renewed { at: Stamp::now(), lost: None }),
        })
    }

    /// Takes the job's lock, or over a lock not written for `stale`. A lock held elsewhere is
    /// 409, naming the node that holds it for the operator who must decide whether it lives.
    pub(crate) async fn acquire(store: &Store, job: &str, node: &str, stale: Duration) -> Result<GcLock, ServiceError> {
        let lock = GcLock::new(job, node, stale)?;
        match store.create_record(&lock.key, lock.body.clone()).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => {
                let found = store.get_record(&lock.key).await?;
                // From the answer, not the request: a slow store is not a stall of this node.
                let read_at = Stamp::now();
                match found {
                    // The create's retry after its acknowledgement was lost: this run's own lock.
                    Some((bytes, _)) if lock.names_this_run(&bytes) => {}
                    found => lock.take_over(store, found, read_at).await?,
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(lock)
    }

    /// The lock exists and is not this run's: `found`, as read at `read_at` (None: released
    /// since the create failed). Takes it over if it is stale, and settles; Err(409) if it is
    /// held, or another node takes it over at the same time.
    async fn take_over(&self, store: &Store, found: Option<(Bytes, u64)>, read_at: Stamp) -> Result<(), ServiceError> {
        let (job, key, settle) = (self.job.as_str(), self.key.as_str(), settle_for(self.stale));
        if let Some((bytes, since)) = found {
            let holder = node_of(&bytes);
            if since.saturating_add(self.stale.as_millis() as u64) > now_unix_ms() {
                return Err(held(job, key, holder, Some(since)));
            }
            // A read answered more than half the settle time ago may be of a lock another
            // node has taken over since, and settled past: deleting now would delete its live
            // lock.
            let waited = read_at.elapsed();
            if waited >= settle / 2 {
                tracing::warn!(job, ?waited, "too long between reading a stale GC lock and taking it over");
                return Err(ServiceError::Conflict(format!(
                    "the GC of job {job} did not start: {:.1} s passed between reading its stale lock {key} and taking it over (this node stalled), so another node may have taken it since; try again",
                    waited.as_secs_f64()
                )));
            }
            tracing::warn!(job, since, holder, "taking over a stale GC lock");
            store.delete_key(key).await?;
        }
        // Taken over, or released between the create and the read: create again, never delete
        // again (the lock may be another node's by now). Exists: another node's, or this one's
        // after a lost acknowledgement; the read below tells.
        match store.create_record(key, self.body.clone()).await {
            Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // Another node that read the stale lock when this one did deletes this run's new lock
        // with it, and creates its own: settle, then look again.
        tokio::time::sleep(settle).await;
        match store.get_record(key).await {
            Ok(Some((bytes, _))) if self.names_this_run(&bytes) => Ok(()),
            Ok(now) => {
                let holder = holder(now);
                tracing::warn!(job, holder, "another node took the stale GC lock over at the same time");
                Err(held(job, key, holder, None))
            }
            // The lock may be this run's: an error here would leave it for the stale time. Go
            // on; the first rewrite reads it again and stops a run it lost.
            Err(e) => {
                tracing::warn!(job, error = %e, "cannot read the GC lock after taking it over; going on");
                Ok(())
            }
        }
    }

    /// How often the run rewrites its lock.
    pub(crate) fn refresh_every(&self) -> Duration {
        (self.stale / 24).max(Duration::from_millis(10))
    }

    fn lease(&self) -> Duration {
        self.stale / 2
    }

    /// Ok while this run still holds the lock; asked before each step that changes GC state.
    pub(crate) fn ensure(&self) -> Result<(), ServiceError> {
        let mut r = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        if r.lost.is_none() {
            let held = r.at.elapsed();
            if held >= self.lease() {
                r.lost = Some(format!(
                    "its lock was last renewed {:.1} s ago, past its lease of {:.1} s (this node stalled, or the store refused the rewrites), so another node may have taken it over",
                    held.as_secs_f64(),
                    self.lease().as_secs_f64()
                ));
            }
        }
        match &r.lost {
            None => Ok(()),
            Some(why) => Err(ServiceError::Conflict(format!(
                "the GC of job {} stopped: {why}; nothing more was deleted",
                self.job
            ))),
        }
    }

    fn lose(&self, why: String) -> ServiceError {
        self.renewed.lock().unwrap_or_else(|e| e.into_inner()).lost.get_or_insert(why);
        self.ensure().expect_err("a lost lock refuses")
    }

    /// Rewrites the lock if it still names this run. Err when the lock is lost (the run must
    /// stop); a store error is only logged, since the lease lapses on its own if they last.
    pub(crate) async fn refresh(&self, store: &Store) -> Result<(), ServiceError> {
        self.ensure()?;
        let started = Stamp::now();
        match store.get_record(&self.key).await {
            Ok(Some((bytes, _))) if self.names_this_run(&bytes) => {}
            Ok(Some((bytes, _))) => {
                let holder = node_of(&bytes).unwrap_or_default();
                return Err(self.lose(format!("its lock was taken over by another run (node {holder:?})")));
            }
            Ok(None) => return Err(self.lose("its lock was deleted by someone else".into())),
            Err(e) => {
                tracing::warn!(job = self.job, error = %e, "cannot read the GC lock to renew it; trying again later");
                return Ok(());
            }
        }
        // Read and checked within the lease: no other node can have taken the lock over since.
        self.ensure()?;
        match store.put_record(&self.key, self.body.clone()).await {
            Ok(()) => {
                self.renewed.lock().unwrap_or_else(|e| e.into_inner()).at = started;
            }
            Err(e) => tracing::warn!(job = self.job, error = %e, "cannot renew the GC lock; trying again later"),
        }
        Ok(())
    }

    /// Deletes the lock if it still names this run.
    pub(crate) async fn release(&self, store: &Store) {
        let result = match store.get_record(&self.key).await {
            Ok(Some((bytes, _))) if self.names_this_run(&bytes) => store.delete_key(&self.key).await,
            Ok(_) => {
                tracing::warn!(job = self.job, "the GC lock is no longer this run's; left in place");
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(job = self.job, error = %e, "cannot release the GC lock; it goes stale after {} s", self.stale.as_secs());
        }
    }

    fn names_this_run(&self, bytes: &[u8]) -> bool {
        names_run(bytes, &self.run)
    }

    #[cfg(test)]
    fn renewed_ago(&self, ago: Duration) {
        self.renewed.lock().unwrap().at = Stamp { mono: Instant::now() - ago, wall: SystemTime::now() - ago };
    }
}

/// Deletes the GC locks of `jobs` that name `node`: held by runs of an earlier life of this
/// process (a crash, a kill), which no one would otherwise take over for the stale time.
/// Called at start-up, before anything is served. Returns how many it deleted.
pub(crate) async fn release_dead(
    store: &Store,
    node: &str,
    jobs: &[String],
    concurrency: usize,
) -> Result<usize, ServiceError> {
    use futures::{StreamExt, TryStreamExt};
    // Owned copies in each future: the start-up future must stay `Send` for any lifetime.
    let node = std::sync::Arc::new(node.to_string());
    let released: Vec<bool> = futures::stream::iter(jobs.iter().map(|job| keys::gc_lock_key(job)).collect::<Vec<_>>())
        .map(|lock| {
            let (store, node) = (store.clone(), node.clone());
            async move {
                let Some((bytes, _)) = store.get_record(&lock).await? else { return Ok(false) };
                match serde_json::from_slice::<LockBody>(&bytes) {
                    Ok(b) if b.node == *node => {
                        tracing::warn!(
                            lock,
                            started_unix_ms = b.started_unix_ms,
                            "releasing a GC lock an earlier run of this node left"
                        );
                        store.delete_key(&lock).await?;
                        Ok(true)
                    }
                    _ => Ok::<bool, ServiceError>(false),
                }
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok(released.into_iter().filter(|r| *r).count())
}

/// Whether the job's lock was written within `stale` (its run lives, or may).
pub(crate) async fn is_held(store: &Store, job: &str, stale: Duration) -> Result<bool, StoreError> {
    let lock = store.modified_ms(&keys::gc_lock_key(job)).await?;
    Ok(lock.is_some_and(|t| t.saturating_add(stale.as_millis() as u64) > now_unix_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn local_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(&dir.path().display().to_string(), &Default::default(), 2, Duration::from_millis(1)).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_run_past_its_lease_is_fenced_and_leaves_a_lock_taken_over_alone() {
        let (_dir, store) = local_store().await;
        let stale = Duration::from_secs(60);
        let a = GcLock::acquire(&store, "job", "node-a", stale).await.unwrap();
        a.ensure().unwrap();
        let busy = GcLock::acquire(&store, "job", "node-b", stale).await.err().unwrap();
        assert!(busy.to_string().contains("on node node-a"), "{busy}");
        // Renewed within its lease, the run goes on; past it, it stops and stays stopped.
        a.renewed_ago(Duration::from_secs(29));
        a.ensure().unwrap();
        a.refresh(&store).await.unwrap();
        a.ensure().unwrap();
        a.renewed_ago(Duration::from_secs(31));
        let e = a.ensure().unwrap_err();
        assert!(e.to_string().contains("past its lease of 30.0 s"), "{e}");
        assert!(a.refresh(&store).await.is_err(), "a lapsed run must not renew");
        // Another node takes the lock over; the fenced run neither renews nor releases it.
        store.delete_key(&keys::gc_lock_key("job")).await.unwrap();
        let b = GcLock::acquire(&store, "job", "node-b", stale).await.unwrap();
        a.release(&store).await;
        b.refresh(&store).await.unwrap();
        b.ensure().unwrap();
        b.release(&store).await;
        assert!(store.get_record(&keys::gc_lock_key("job")).await.unwrap().is_none());
    }

    /// Leaves a lock as a run of `node` that died holding it, last written `ago` ago.
    async fn dead_lock(dir: &std::path::Path, store: &Store, node: &str, ago: Duration) {
        let key = keys::gc_lock_key("job");
        let body = LockBody { node: node.into(), started_unix_ms: 0, run: Some(format!("run-of-{node}")) };
        store.create_record(&key, serde_json::to_vec(&body).unwrap().into()).await.unwrap();
        let file = std::fs::File::options().write(true).open(dir.join(&key)).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[tokio::test]
    async fn of_two_nodes_taking_one_stale_lock_over_at_once_one_runs() {
        let (dir, store) = local_store().await;
        let (stale, key) = (Duration::from_secs(120), keys::gc_lock_key("job"));
        dead_lock(dir.path(), &store, "dead", stale * 2).await;
        let a = tokio::spawn({
            let store = store.clone();
            async move { GcLock::acquire(&store, "job", "node-a", stale).await }
        });
        // Node b read the stale lock when a did: its delete removes a's new lock, and it creates
        // its own, while a settles (5 s for this stale time).
        let began = Instant::now();
        while holder(store.get_record(&key).await.unwrap()).as_deref() != Some("node-a") {
            assert!(!a.is_finished() && began.elapsed() < Duration::from_secs(4), "node a wrote no lock");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        store.delete_key(&key).await.unwrap();
        dead_lock(dir.path(), &store, "node-b", Duration::ZERO).await;
        let e = a.await.unwrap().err().expect("node a must not run beside node b");
        assert!(e.to_string().contains("already running on node node-b"), "{e}");
        assert_eq!(holder(store.get_record(&key).await.unwrap()).as_deref(), Some("node-b"), "b's lock stays");
        // Alone, a takeover settles and runs.
        store.delete_key(&key).await.unwrap();
        let stale = Duration::from_secs(24);
        dead_lock(dir.path(), &store, "node-b", stale * 2).await;
        let c = GcLock::acquire(&store, "job", "node-c", stale).await.unwrap();
        c.ensure().unwrap();
        assert_eq!(holder(store.get_record(&key).await.unwrap()).as_deref(), Some("node-c"));
    }

    #[tokio::test]
    async fn a_node_that_stalled_after_reading_a_stale_lock_leaves_the_lock_taken_since_alone() {
        let (dir, store) = local_store().await;
        let (stale, key) = (Duration::from_secs(120), keys::gc_lock_key("job"));
        dead_lock(dir.path(), &store, "dead", stale * 2).await;
        // Node b read the dead lock, then stalled; node a took the lock over and settled.
        let stale_read = store.get_record(&key).await.unwrap();
        let read_at = Stamp::now();
        let a = GcLock::acquire(&store, "job", "node-a", stale).await.unwrap();
        assert!(read_at.elapsed() >= settle_for(stale), "a settled");
        // b wakes and goes on from its old read: it must not delete a's lock.
        let b = GcLock::new("job", "node-b", stale).unwrap();
        let e = b.take_over(&store, stale_read.clone(), read_at).await.unwrap_err();
        assert!(e.to_string().contains("between reading its stale lock") && e.to_string().contains("try again"), "{e}");
        assert_eq!(holder(store.get_record(&key).await.unwrap()).as_deref(), Some("node-a"), "a's lock was deleted");
        a.refresh(&store).await.unwrap();
        // The same read, taken over at once (the wait is this process's, not the store's).
        a.release(&store).await;
        dead_lock(dir.path(), &store, "dead", stale * 2).await;
        let fresh_read = store.get_record(&key).await.unwrap();
        b.take_over(&store, fresh_read, Stamp::now()).await.unwrap();
        let now = store.get_record(&key).await.unwrap().unwrap().0;
        assert!(b.names_this_run(&now), "b's lock");
    }

    #[tokio::test]
    async fn a_slow_store_does_not_refuse_a_takeover() {
        let (dir, store) = local_store().await;
        let store = store.with_faults();
        // Settles 1 s, so a wait of 0.5 s from the read's answer to the delete is a stall.
        let stale = Duration::from_secs(24);
        dead_lock(dir.path(), &store, "dead", stale * 2).await;
        // The failed create and the read of the stale lock each take 0.7 s to be answered.
        let slow = crate::faults::FaultRequest {
            kind: crate::faults::FaultKind::Latency,
            op: crate::faults::FaultOp::Any,
            count: 2,
            delay_ms: 700,
        };
        store.faults().unwrap().arm(slow).unwrap();
        let a = GcLock::acquire(&store, "job", "node-a", stale).await.unwrap();
        assert_eq!(store.faults().unwrap().report().fired.values().sum::<u64>(), 2);
        a.ensure().unwrap();
        assert_eq!(holder(store.get_record(&keys::gc_lock_key("job")).await.unwrap()).as_deref(), Some("node-a"));
    }

    #[tokio::test]
    async fn a_run_whose_lock_was_taken_over_stops_at_its_next_renewal() {
        let (_dir, store) = local_store().await;
        let stale = Duration::from_secs(60);
        let a = GcLock::acquire(&store, "job", "node-a", stale).await.unwrap();
        // Two takeovers at once: the second deleted the first's new lock.
        store.delete_key(&keys::gc_lock_key("job")).await.unwrap();
        let b = GcLock::acquire(&store, "job", "node-b", stale).await.unwrap();
        let e = a.refresh(&store).await.unwrap_err();
        assert!(e.to_string().contains("taken over by another run (node \"node-b\")"), "{e}");
        assert!(a.ensure().is_err(), "stays stopped");
        a.release(&store).await;
        b.refresh(&store).await.unwrap();
        // Gone under a run: it stops too.
        store.delete_key(&keys::gc_lock_key("job")).await.unwrap();
        assert!(b.refresh(&store).await.unwrap_err().to_string().contains("deleted by someone else"));
    }
}
