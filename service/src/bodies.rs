//! Request and response bodies on their way through the API: a digest check of JSON bodies,
//! deadlines (per frame and per body), the byte budget JSON bodies are read into, and answers
//! that keep their transfer slots until they are sent.
//!
//! Design note.
//! * Every bound on a body is enforced as its frames move, by wrapping the body, not by
//!   trusting what the client declared: a declared length only sets a deadline or is checked
//!   against a limit before anything is read.
//! * Errors raised inside a wrapped body reach the handler as the body's read error; `stalled`
//!   turns each back into the API error it stands for (408 for a stall or a missed deadline,
//!   503 for a budget that stayed full).
//! * The JSON budget is taken when a body's first bytes arrive, its whole share at once (the
//!   declared length, else the route's limit), and released when the request is answered: a
//!   body that declares much and sends nothing holds nothing, and a body waits for the budget
//!   once, before it holds any, so bodies holding parts of it never wait on each other. A body
//!   must also keep a pace from its first read on (`body_min_bytes_per_s` after
//!   `body_progress_timeout_ms`), so one that declares much and trickles loses its share within
//!   seconds, not at the deadline its declared length earned.
//! * Requests that change state run to completion when their client goes away
//!   (`run_to_completion`): hyper drops a request's future when its connection closes, which
//!   would stop a delete, a fence raise, an abort or a commit between its steps (the store
//!   changed, the index or the journal not yet). Reads stay tied to their connection. The
//!   detached requests are counted: past `connections_max` of them a request runs attached.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{ApiError, AppState};
use crate::error::ServiceError;

/// The header a client puts the blake3 of a JSON body in (`ckpt_client`'s `send_json`).
const BODY_DIGEST_HEADER: &str = "x-ckpt-body-blake3";

/// Checks a request body against the digest its client sent, when it sent one: metadata
/// (shard indexes, opens) has no content address, and a byte changed on the way must not be
/// committed. The body is read whole, up to its route's limit, and handed on unchanged.
pub(crate) async fn verify_body_digest(
    State((s, limit)): State<(Arc<AppState>, usize)>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(expected) = req.headers().get(BODY_DIGEST_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let err =
                stalled(&e, &s).unwrap_or_else(|| ServiceError::TooLarge(format!("json body over {limit} bytes")));
            return ApiError(err).into_response();
        }
    };
    let check = bytes.clone();
    // Shard indexes reach megabytes: hash them off the runtime.
    let actual = match tokio::task::spawn_blocking(move || blake3::hash(&check).to_hex().to_string()).await {
        Ok(h) => h,
        Err(e) => return ApiError(crate::error::join_error(e)).into_response(),
    };
    if !actual.eq_ignore_ascii_case(&expected) {
        return ApiError(ServiceError::BodyMismatch { expected, actual }).into_response();
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// `BodyStalled` when `e` comes from the body progress timeout (`RequestBodyTimeoutLayer`),
/// `BodyTooSlow` when from the whole body's deadline (`body_deadline`), `Busy` when the JSON
/// budget stayed full (`json_budget`).
pub(crate) fn stalled(e: &(dyn std::error::Error + 'static), s: &AppState) -> Option<ServiceError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<tower_http::timeout::TimeoutError>() {
            let idle_ms = s.coordinator.body_progress_timeout().as_millis() as u64;
            return Some(ServiceError::BodyStalled { idle_ms });
        }
        if let Some(full) = c.downcast_ref::<BudgetFull>() {
            return Some(ServiceError::Busy(full.to_string()));
        }
        if let Some(late) = c.downcast_ref::<BodyPastDeadline>() {
            return Some(ServiceError::BodyTooSlow {
                within_ms: late.0.as_millis() as u64,
                min_bytes_per_s: s.coordinator.body_min_bytes_per_s(),
            });
        }
        cause = c.source();
    }
    None
}

/// Runs a request that changes state (any method but GET and HEAD) as a task of its own, so
/// that it goes on to its end if its connection closes (see the design note); counted by
/// `AppState::detached`, and run in place when that count is full.
pub(crate) async fn run_to_completion(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use tracing::Instrument;
    let reads = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    let Some(permit) = (!reads).then(|| s.detached.clone().try_acquire_owned().ok()).flatten() else {
        return next.run(req).await;
    };
    let task = s.detached_tasks.spawn(
        async move {
            let _counted = permit;
            next.run(req).await
        }
        .instrument(tracing::Span::current()),
    );
    match task.await {
        Ok(answer) => answer,
        Err(e) => ApiError(ServiceError::Internal(format!("the request's task failed: {e}"))).into_response(),
    }
}

/// Puts a deadline on the whole request body (`Coordinator::body_deadline`): the progress
/// timeout restarts at every frame, so a body that trickles a byte at a time would otherwise
/// hold its slot and staging space for as long as its client likes.
pub(crate) async fn body_deadline(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if http_body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let within = s.coordinator.body_deadline(declared_length(req.headers()));
    next.run(with_deadline(req, within, &s)).await
}

fn with_deadline(req: axum::extract::Request, within: Duration, s: &AppState) -> axum::extract::Request {
    let (parts, body) = req.into_parts();
    let body = DeadlineBody {
        inner: body,
        late: Box::pin(tokio::time::sleep(within)),
        within,
        rate: s.coordinator.body_min_bytes_per_s().max(1),
        slack: s.coordinator.body_progress_timeout(),
        first: None,
        got: 0,
    };
    axum::extract::Request::from_parts(parts, axum::body::Body::new(body))
}

/// A request's Content-Length, where it sent a valid one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
struct BodyPastDeadline(Duration);

/// A handle on the connection a request came in on, to close it from elsewhere (every request
/// carries one as an extension; `http_serve` watches it).
#[derive(Clone)]
pub(crate) struct ConnectionCut(pub(crate) tokio_util::sync::CancellationToken);

/// A response body that keeps `held` (the request's transfer slots) until it is sent or the
/// connection drops: the slots bound what is in flight, and an answer being written is. It is
/// handed to hyper a frame at a time, since hyper drops a body once it holds its last frame,
/// and queues at most a few hundred KiB of a connection's writes before it asks for more.
///
/// An answer must also be taken in time, as a request body must arrive in time: a reader that
/// takes a little every few seconds never stalls a write, yet would keep its slots for hours.
/// So the connection is closed at `deadline` (the same as a request body of this length gets)
/// if the answer is still being sent; a timer of its own does it, since hyper asks a body for
/// its next frame only when the last one is written.
pub(crate) fn held_until_sent<H: Send + Unpin + 'static>(
    bytes: Bytes,
    held: H,
    deadline: Option<(Duration, ConnectionCut)>,
) -> axum::body::Body {
    let timer = deadline.map(|(within, ConnectionCut(cut))| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep(within).await;
            tracing::debug!(?within, "an answer was not taken by its deadline; closing its connection");
            cut.cancel();
        }))
    });
    axum::body::Body::new(Holding { rest: bytes, _held: held, _timer: timer })
}

struct Holding<H> {
    rest: Bytes,
    _held: H,
    /// Stopped when the answer is sent or dropped.
    _timer: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

const HELD_FRAME_BYTES: usize = 256 << 10;

impl<H: Unpin> http_body::Body for Holding<H> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(HELD_FRAME_BYTES);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A request body with a deadline for the whole of it, and a pace it must keep all along:
/// from the handler's first read on, `rate` bytes a second after `slack`. The pace is what
/// stops a body that declares much and trickles from holding what it reserved (its share of
/// the JSON budget, its staging space) until the deadline its length earned.
struct DeadlineBody {
    inner: axum::body::Body,
    late: std::pin::Pin<Box<tokio::time::Sleep>>,
    within: Duration,
    rate: u64,
    slack: Duration,
    first: Option<std::time::Instant>,
    got: u64,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        if std::future::Future::poll(self.late.as_mut(), cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(Box::new(BodyPastDeadline(self.within)))));
        }
        let first = *self.first.get_or_insert_with(std::time::Instant::now);
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            self.got += frame.data_ref().map_or(0, |d| d.len() as u64);
            let owed = (first.elapsed().saturating_sub(self.slack).as_millis() as u64).saturating_mul(self.rate) / 1000;
            if self.got < owed {
                return std::task::Poll::Ready(Some(Err(Box::new(BodyPastDeadline(self.within)))));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// JSON bodies held at once are bounded in bytes (`json_bytes_in_flight_max`, see the design
/// note): when a body's first bytes arrive it takes its whole share of the budget at once (its
/// declared length, else its route's `limit`; never more than the whole budget), and the
/// request gives it back once answered. Parsed, a body takes about as much again; the budget
/// counts what is sent. A body that declares no length also gets its route's deadline (`limit`
/// at `body_min_bytes_per_s`) rather than the largest route's, which `body_deadline` put on
/// before routing.
pub(crate) async fn json_budget(
    State((s, limit)): State<(Arc<AppState>, usize)>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if http_body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let declared = declared_length(req.headers());
    let req = match declared {
        Some(_) => req,
        None => with_deadline(req, s.coordinator.body_deadline(Some(limit as u64)), &s),
    };
    let budget_max = s.coordinator.json_bytes_in_flight_max();
    let share = declared.map_or(limit as u64, |n| n.min(limit as u64));
    let held = Arc::new(Mutex::new(None));
    let (parts, body) = req.into_parts();
    let body = Budgeted {
        inner: body,
        budget: s.coordinator.json_bytes.clone(),
        budget_max,
        share: share.clamp(1, budget_max),
        taken: 0,
        passed: 0,
        wait: s.coordinator.busy_wait(),
        held: held.clone(),
        waiting: None,
    };
    let answer = next.run(axum::extract::Request::from_parts(parts, axum::body::Body::new(body))).await;
    // The handler is done with the body's bytes once it has answered.
    drop(held);
    answer
}

type Acquire = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<OwnedSemaphorePermit, tokio::sync::AcquireError>, tokio::time::error::Elapsed>,
            > + Send,
    >,
>;

/// A request body that lets its first data frame through once its whole share of the JSON
/// budget is taken, into `held`. One wait, before anything is held: bodies that each held part
/// of the budget while waiting for more could wait on each other until all gave up. Bytes past
/// the share (a body longer than it declared) are taken as they come.
struct Budgeted {
    inner: axum::body::Body,
    budget: Arc<Semaphore>,
    budget_max: u64,
    share: u64,
    /// Bytes of the budget taken so far, and bytes of the body let through.
    taken: u64,
    passed: u64,
    wait: Duration,
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// A frame that needs more of the budget than is free, how much, and the wait for it.
    waiting: Option<(http_body::Frame<Bytes>, u64, Acquire)>,
}

#[derive(Debug, thiserror::Error)]
#[error("JSON bodies in flight hold json_bytes_in_flight_max ({0} bytes)")]
struct BudgetFull(u64);

type Frame = std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>>;

impl Budgeted {
    /// Lets `frame` through, its budget taken (`permit`, `n` bytes; none when already covered).
    fn pass(&mut self, frame: http_body::Frame<Bytes>, taken: Option<(OwnedSemaphorePermit, u64)>) -> Frame {
        if let Some((permit, n)) = taken {
            self.taken += n;
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.as_mut() {
                Some(h) => h.merge(permit),
                None => *held = Some(permit),
            }
        }
        self.passed += frame.data_ref().map_or(0, |d| d.len() as u64);
        std::task::Poll::Ready(Some(Ok(frame)))
    }
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        use std::task::Poll;
        if let Some((_, _, acquire)) = self.waiting.as_mut() {
            let got = std::task::ready!(acquire.as_mut().poll(cx));
            let (frame, n, _) = self.waiting.take().expect("a frame waits");
            return match got {
                Ok(Ok(permit)) => self.pass(frame, Some((permit, n))),
                _ => Poll::Ready(Some(Err(Box::new(BudgetFull(self.budget_max))))),
            };
        }
        let frame = match std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other.map(|r| r.map_err(Into::into))),
        };
        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
        // The whole share with the first bytes; past it, what the frame brings beyond it.
        // Never more than the whole budget: a body larger than it (a small budget, a large
        // route limit) goes through alone rather than waiting for room that never comes.
        let n = if len == 0 { 0 } else { self.share.max(self.passed + len).saturating_sub(self.taken) };
        let n = n.min(self.budget_max.saturating_sub(self.taken)).min(u32::MAX as u64);
        if n == 0 {
            return self.pass(frame, None);
        }
        if let Ok(permit) = self.budget.clone().try_acquire_many_owned(n as u32) {
            return self.pass(frame, Some((permit, n)));
        }
        let mut acquire: Acquire =
            Box::pin(tokio::time::timeout(self.wait, self.budget.clone().acquire_many_owned(n as u32)));
        // Registers the waker: the next poll finds the wait under way.
        match acquire.as_mut().poll(cx) {
            Poll::Ready(Ok(Ok(permit))) => self.pass(frame, Some((permit, n))),
            Poll::Ready(_) => Poll::Ready(Some(Err(Box::new(BudgetFull(self.budget_max))))),
            Poll::Pending => {
                self.waiting = Some((frame, n, acquire));
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
