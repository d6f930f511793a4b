//! Readiness: whether the store answers, for `/readyz`.
//!
//! Design note.
//! * `/readyz` is public (a kubelet calls it without credentials), and each answer costs a
//!   store call, so anyone who can reach the port could turn a flood of probes into a flood of
//!   store listings. One probe runs at a time, in a task of its own; every caller that arrives
//!   while it runs takes its outcome, and a caller that finds none running starts one. The
//!   store sees at most one probe from `/readyz` in flight, however many callers there are.
//! * A probe is never abandoned half-way by a caller that went away: its task finishes it (or
//!   its own timeout does) and publishes the outcome, so the callers still waiting share it
//!   and the store is not asked again for each of them.
//! * No outcome is reused from before its caller asked: a caller takes only the outcome of a
//!   probe that finished after it arrived, so a store that just went down is never reported
//!   ready from an old success.
//! * A probe is bounded by `ready_probe_timeout_ms`; a store that does not answer within it is
//!   not ready (503 `not_ready`), and callers hear so within about that time.

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
}

/// What a caller waits beyond a probe's own timeout for that probe's outcome to arrive.
const CALLER_GRACE: Duration = Duration::from_millis(250);

impl Readiness {
    pub fn new(timeout: Duration) -> Readiness {
        let (done, _) = watch::channel(Err("no probe yet".to_string()));
        Readiness { running: Arc::new(Mutex::new(false)), done: Arc::new(done), timeout }
    }

    /// Ok when a probe that finished after this call began found the store answering.
    pub async fn check(&self, store: &Store) -> Result<(), ServiceError> {
        let mut finished = self.done.subscribe();
        self.start_unless_running(store);
        match tokio::time::timeout(self.timeout + CALLER_GRACE, finished.changed()).await {
            Ok(Ok(())) => finished.borrow_and_update().clone().map_err(ServiceError::NotReady),
            Ok(Err(_)) => Err(ServiceError::NotReady("readiness probes stopped".into())),
            Err(_) => Err(ServiceError::NotReady(format!(
                "no store probe finished within {} ms",
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
        let (store, within) = (store.clone(), self.timeout);
        tokio::spawn(async move {
            // The whole guard moves in (a closure would take only the field it assigns).
            let mut finish = finish;
            finish.outcome = Some(match tokio::time::timeout(within, store.probe()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("the store did not answer a probe: {e}")),
                Err(_) => Err(format!("the store did not answer a probe within {} ms", within.as_millis())),
            });
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
        let outcome = self.outcome.take().unwrap_or_else(|| Err("the store probe ended without an outcome".into()));
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
        let ready = Arc::new(Readiness::new(Duration::from_millis(3000)));
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
}
