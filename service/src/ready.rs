//! Readiness: whether the store answers and the state disk takes a durable write, for `/readyz`.
//!
//! Design note.
//! * A probe asks both things a save's ack depends on: the store (a listing) and the state
//!   directory's disk, where the index records every ack (`durable::probe_dir`: a block written
//!   and fsync'd). A disk that fails writes (EIO, full, remounted read-only) is otherwise seen
//!   only by the requests it fails, with a 500 each; not ready takes the node out of a load
//!   balancer's rotation until it takes writes again. Not probed: the spill disk (its root
//!   holds only job directories, which a probe file there would break), and an index that
//!   `<data_dir>/index` links to on another disk (the probe writes into `data_dir` itself).
//! * `/readyz` is public (a kubelet calls it without credentials), and each answer costs a
//!   store call, so anyone who can reach the port could turn a flood of probes into a flood of
//!   store listings. One probe runs at a time, in a task of its own; every caller that arrives
//!   while it runs takes its outcome, and a caller that finds none running starts one. The
//!   store and the disk see at most one probe from `/readyz` in flight, however many callers
//!   there are.
//! * A probe is never abandoned half-way by a caller that went away: its task finishes it (or
//!   its own timeout does) and publishes the outcome, so the callers still waiting share it
//!   and the store is not asked again for each of them.
//! * No outcome is reused from before its caller asked: a caller takes only the outcome of a
//!   probe that finished after it arrived, so a store that just went down is never reported
//!   ready from an old success.
//! * A probe is bounded by `ready_probe_timeout_ms`; a store or disk that does not answer within
//!   it is not ready (503 `not_ready`), and callers hear so within about that time. A disk write
//!   stuck in the kernel cannot be cancelled: its blocking thread finishes it, and no new probe
//!   starts until it has, so a hung disk holds one thread, not one per caller.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::ServiceError;
use crate::store::Store;

pub struct Readiness {
    /// Whether a probe is running; taken with `done`'s send, so a caller that sees "none" has
    /// already missed no outcome it could have waited for.
    running: Arc<Mutex<bool>>,
    /// The outcome of the last finished probe; each finish is a new version.
    done: Arc<watch::Sender<Result<(), String>>>,
    timeout: Duration,
    /// The state directory, whose disk each probe writes to.
    state_dir: PathBuf,
}

/// What a caller waits beyond a probe's own timeout for that probe's outcome to arrive.
const CALLER_GRACE: Duration = Duration::from_millis(250);

impl Readiness {
    pub fn new(timeout: Duration, state_dir: PathBuf) -> Readiness {
        let (done, _) = watch::channel(Err("no probe yet".to_string()));
        Readiness { running: Arc::new(Mutex::new(false)), done: Arc::new(done), timeout, state_dir }
    }

    /// Ok when a probe that finished after this call began found the store answering and the
    /// state disk taking a durable write.
    pub async fn check(&self, store: &Store) -> Result<(), ServiceError> {
        let mut finished = self.done.subscribe();
        self.start_unless_running(store);
        match tokio::time::timeout(self.timeout + CALLER_GRACE, finished.changed()).await {
            Ok(Ok(())) => finished.borrow_and_update().clone().map_err(ServiceError::NotReady),
            Ok(Err(_)) => Err(ServiceError::NotReady("readiness probes stopped".into())),
            Err(_) => Err(ServiceError::NotReady(format!(
                "no readiness probe (the store, then the state disk) finished within {} ms",
                (self.timeout + CALLER_GRACE).as_millis()
            ))),
        }
    }

    fn start_unless_running(&self, store: &Store) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if *running {
            return;
        }
        *running = true;
        let finish = Finish { running: self.running.clone(), done: self.done.clone(), outcome: None };
        let (store, within, dir) = (store.clone(), self.timeout, self.state_dir.clone());
        tokio::spawn(async move {
            // The whole guard moves in (a closure would take only the field it assigns).
            let mut finish = finish;
            let store_answered = match tokio::time::timeout(within, store.probe()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("the store did not answer a probe: {e}")),
                Err(_) => Err(format!("the store did not answer a probe within {} ms", within.as_millis())),
            };
            if store_answered.is_err() {
                finish.outcome = Some(store_answered);
                return;
            }
            // The guard goes with the write and is dropped only once it returns, even after
            // every caller gave up on it: the next probe must not pile a second write onto a
            // hung disk. (If the runtime is shutting down, the dropped closure drops it.)
            drop(tokio::task::spawn_blocking(move || {
                let mut finish = finish;
                finish.outcome = Some(
                    crate::durable::probe_dir(&dir)
                        .map_err(|e| format!("the state disk did not take a durable write: {e}")),
                );
            }));
        });
    }
}

/// Publishes a probe's outcome and lets the next one start, when the probe's task ends however
/// it ends (a panic in the store call, the runtime shutting down): a probe that never reported
/// would leave every later caller waiting out its timeout.
struct Finish {
    running: Arc<Mutex<bool>>,
    done: Arc<watch::Sender<Result<(), String>>>,
    outcome: Option<Result<(), String>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or_else(|| Err("the readiness probe ended without an outcome".into()));
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *running = false;
        let _previous = self.done.send_replace(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{FaultKind, FaultOp, FaultRequest};

    fn latency(delay_ms: u64) -> FaultRequest {
        FaultRequest { kind: FaultKind::Latency, op: FaultOp::List, count: 1, delay_ms }
    }

    fn listed(store: &Store) -> u64 {
        store.faults().unwrap().report().fired.get("latency:list").copied().unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_share_the_probe_under_way_and_none_outlives_the_timeout() {
        let store = Store::open("memory://", &Default::default(), 1, Duration::from_millis(1)).unwrap().with_faults();
        let state = tempfile::tempdir().unwrap();
        let ready = Arc::new(Readiness::new(Duration::from_millis(3000), state.path().into()));
        ready.check(&store).await.unwrap();

        // Twenty callers while one slow probe runs: one probe, and every caller has its answer.
        store.faults().unwrap().arm(latency(1500)).unwrap();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (ready, store) = (ready.clone(), store.clone());
                tokio::spawn(async move { ready.check(&store).await })
            })
            .collect();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(listed(&store), 1, "the callers did not share one probe");

        // A probe past the timeout: not ready, told within about the timeout; the next probe,
        // started afresh, finds the store answering.
        store.faults().unwrap().arm(latency(5_000)).unwrap();
        let t = std::time::Instant::now();
        let err = ready.check(&store).await.unwrap_err();
        assert_eq!(err.code(), "not_ready", "{err}");
        assert!(err.to_string().contains("within 3000 ms"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(6), "told after {:?}", t.elapsed());
        ready.check(&store).await.unwrap();
    }

    /// The state disk is probed each time, after the store: a state directory that takes no
    /// write (here: gone, as an unmounted disk's would be) is not ready, with the store
    /// answering; once it takes writes again it is ready again, and the probe leaves no file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_disk_that_takes_no_write_is_not_ready_until_it_does() {
        let store = Store::open("memory://", &Default::default(), 1, Duration::from_millis(1)).unwrap();
        let top = tempfile::tempdir().unwrap();
        let state = top.path().join("state");
        let ready = Readiness::new(Duration::from_millis(3000), state.clone());
        for _ in 0..2 {
            let err = ready.check(&store).await.unwrap_err();
            assert_eq!(err.code(), "not_ready", "{err}");
            assert!(err.to_string().contains("the state disk did not take a durable write"), "{err}");
        }
        std::fs::create_dir(&state).unwrap();
        ready.check(&store).await.unwrap();
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "the probe left a file");
    }
}
