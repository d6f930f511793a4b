//! Readiness: whether the store answers, for `/readyz`.
//!
//! Design note.
//! * `/readyz` is public (a kubelet calls it without credentials), and each answer costs a
//!   store call, so anyone who can reach the port could turn a flood of probes into a flood of
//!   store listings. One probe runs at a time; callers that arrive while it runs wait for the
//!   next one and then all take its answer. The store sees at most one probe in flight per
//!   ckptd, however many callers there are.
//! * No answer is reused from before its caller asked: a caller takes an outcome only from a
//!   probe that started after it arrived, so a store that just went down is never reported
//!   ready from a cached success.
//! * A probe and the wait for one are bounded by `ready_probe_timeout_ms`; a store that does
//!   not answer within it is not ready (503 `not_ready`), and the caller is answered in time
//!   for its own probe timeout.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ServiceError;
use crate::store::Store;

pub struct Readiness {
    /// When the last finished probe started, and what it found.
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    timeout: Duration,
}

impl Readiness {
    pub fn new(timeout: Duration) -> Readiness {
        Readiness { last: tokio::sync::Mutex::new(None), timeout }
    }

    /// Ok when a probe started at or after this call found the store answering.
    pub async fn check(&self, store: &Store) -> Result<(), ServiceError> {
        let asked = Instant::now();
        let within = self.timeout;
        let outcome = tokio::time::timeout(within, async {
            let mut last = self.last.lock().await;
            if let Some((started, outcome)) = &*last {
                if *started >= asked {
                    return outcome.clone();
                }
            }
            let started = Instant::now();
            let outcome = store.probe().await.map_err(|e| format!("the store did not answer a probe: {e}"));
            *last = Some((started, outcome.clone()));
            outcome
        })
        .await
        .unwrap_or_else(|_| Err(format!("the store did not answer a probe within {} ms", within.as_millis())));
        outcome.map_err(ServiceError::NotReady)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn callers_take_only_a_probe_started_after_they_asked_and_wait_for_it_no_longer_than_the_timeout() {
        let store = Store::open("memory://", &Default::default(), 1, Duration::from_millis(1)).unwrap();
        let ready = std::sync::Arc::new(Readiness::new(Duration::from_millis(200)));
        ready.check(&store).await.unwrap();
        let first = ready.last.lock().await.as_ref().unwrap().0;
        tokio::time::sleep(Duration::from_millis(5)).await;
        ready.check(&store).await.unwrap();
        let second = ready.last.lock().await.as_ref().unwrap().0;
        assert!(second > first, "a caller took an answer from before it asked");
        // A caller that arrives while a probe is held waits for it, but not past the timeout.
        let held = ready.last.lock().await;
        let waiting = tokio::spawn({
            let (ready, store) = (ready.clone(), store.clone());
            async move { ready.check(&store).await }
        });
        let err = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap_err();
        drop(held);
        assert_eq!(err.code(), "not_ready", "{err}");
        assert!(err.to_string().contains("within 200 ms"), "{err}");
        ready.check(&store).await.unwrap();
    }
}
