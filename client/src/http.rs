//! The HTTP transport: every request to ckptd, with retries, and chunk bytes over HTTP.
//!
//! Design note.
//! * Retries: a request is retried on transient failures (ckptd unreachable, 408, 502/503/504,
//!   which includes ckptd's "busy" answer) with exponential backoff, up to `attempts_max`; a
//!   "busy" answer is waited out for up to `busy_retry_for`, so a burst waits for the store to
//!   drain rather than failing. Every request of the protocol is idempotent (chunk puts are
//!   content-addressed, opens and shard indexes are accepted again when identical), so a retry
//!   after a lost answer is safe.
//! * Chunk reads stream the body straight into the caller's buffer (no per-chunk allocation
//!   here), count it against the expected length and hash it as it arrives; the transport
//!   compares the address.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ckpt_core::{ChunkHash, ChunkHasher};
use serde::{Deserialize, Serialize};

use crate::error::ClientError;
use crate::transport::{verified, Outcome, ReadFailure, Transport};
use futures::future::BoxFuture;

/// The blake3 of a JSON request body, checked by ckptd.
pub const BODY_DIGEST_HEADER: &str = "x-ckpt-body-blake3";

#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    pub attempts_max: u32,
    /// Whether a refused or timed-out connection is retried (a trainer rides out a ckptd
    /// restart; an interactive command says at once that nothing answers).
    pub retry_unreachable: bool,
    pub base: Duration,
    pub max: Duration,
    pub busy_retry_for: Duration,
}

tokio::task_local! {
    /// The W3C trace context of the save this task is running, sent with each of its requests.
    pub(crate) static TRACEPARENT: String;
}

/// Which connection a request goes on.
#[derive(Clone, Copy)]
enum Conn {
    /// A pooled one, kept alive between requests.
    Pooled,
    /// One of its own, with its own time limit in place of `request_timeout` when given.
    Own { timeout: Option<Duration> },
}

pub(crate) enum Body {
    Empty,
    Json(Vec<u8>),
    Bytes(Bytes),
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiErrorInner,
}

#[derive(Deserialize)]
struct ApiErrorInner {
    code: String,
    message: String,
}

/// The credentials every request of a client carries.
pub(crate) struct Security {
    pub token: Option<crate::auth::Token>,
    pub tls: crate::auth::TlsFiles,
}

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    /// The pooled client for requests without a body when an answer timeout is set. reqwest's
    /// read timeout runs from the request's start until the answer's head, so a request that
    /// sends a body (a chunk, an index put that commits) would count its upload against it.
    asking: Option<reqwest::Client>,
    /// For requests sent once (a GC run, a health probe): a connection of their own each. On a
    /// pooled connection, ckptd closing it as the request arrives (it closes idle connections
    /// at `connection_max_age_s`, as any server may at its keep-alive limit) would fail the
    /// request with nothing answered, and nothing would send it again.
    unpooled: reqwest::Client,
    base: String,
    retry: RetryPolicy,
}

impl Http {
    pub fn new(
        base_url: &str,
        timeout: Duration,
        connect_timeout: Duration,
        answer_timeout: Option<Duration>,
        idle_per_host: usize,
        retry: RetryPolicy,
        security: &Security,
    ) -> Result<Http, ClientError> {
        let bad = |why: String| ClientError::InvalidUrl { url: base_url.to_string(), reason: why };
        let parsed = reqwest::Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(bad(format!("scheme {:?} with no host; expected http://HOST:PORT", parsed.scheme())));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &security.token {
            headers.insert(reqwest::header::AUTHORIZATION, t.header()?);
        }
        let build = |idle: usize, answer_timeout: Option<Duration>| {
            let mut builder = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(connect_timeout)
                .pool_max_idle_per_host(idle)
                .default_headers(headers.clone());
            if let Some(t) = answer_timeout {
                // Past the head, reset by every read: an answer that keeps moving is not cut.
                builder = builder.read_timeout(t);
            }
            crate::auth::apply_tls(builder, &security.tls)?
                .build()
                .map_err(|e| ClientError::Internal(format!("building the http client: {e}")))
        };
        Ok(Http {
            client: build(idle_per_host, None)?,
            asking: answer_timeout.map(|t| build(idle_per_host, Some(t))).transpose()?,
            // Long requests (a GC run answers when it is done) and health checks.
            unpooled: build(0, None)?,
            base: base_url.trim_end_matches('/').to_string(),
            retry,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send_once(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Body,
        headers: &[(&str, &str)],
    ) -> Result<reqwest::Response, ClientError> {
        self.send_once_on(method, path, body, headers, Conn::Pooled).await
    }

    /// `send_once` on the connection `conn` says.
    async fn send_once_on(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Body,
        headers: &[(&str, &str)],
        conn: Conn,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = match (conn, &self.asking) {
            (Conn::Pooled, Some(asking)) if matches!(body, Body::Empty) => asking.request(method, &url),
            (Conn::Pooled, _) => self.client.request(method, &url),
            (Conn::Own { timeout }, _) => {
                let req = self.unpooled.request(method, &url);
                match timeout {
                    Some(t) => req.timeout(t),
                    None => req,
                }
            }
        };
        if let Ok(tp) = TRACEPARENT.try_with(|t| t.clone()) {
            req = req.header("traceparent", tp);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req = match body {
            Body::Empty => req,
            Body::Json(b) => req.header("content-type", "application/json").body(b.clone()),
            Body::Bytes(b) => req.header("content-type", "application/octet-stream").body(b.clone()),
        };
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Transport { url, source })?;
        let (code, message) = match serde_json::from_slice::<ApiErrorBody>(&bytes) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => ("http_error".to_string(), String::from_utf8_lossy(&bytes).chars().take(500).collect()),
        };
        Err(ClientError::Api { status: status.as_u16(), code, message })
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, body: Body) -> Result<Bytes, ClientError> {
        self.request_with(method, path, body, &[]).await
    }

    /// One request, retried on transient failures (see the module note), its body read whole.
    pub async fn request_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, ClientError> {
        self.request_within(method, path, body, headers, &self.retry, Conn::Pooled, false).await
    }

    /// A DELETE of something that stays gone once deleted (a checkpoint, a pin), retried like
    /// any request; a retry that finds it gone after an attempt that may have gone through
    /// counts as done: that attempt's answer was lost, not the object.
    pub async fn delete_idempotent(&self, path: &str) -> Result<(), ClientError> {
        let (method, conn) = (reqwest::Method::DELETE, Conn::Pooled);
        self.request_within(method, path, Body::Empty, &[], &self.retry, conn, true).await.map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    async fn request_within(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        headers: &[(&str, &str)],
        retry: &RetryPolicy,
        conn: Conn,
        gone_is_done: bool,
    ) -> Result<Bytes, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut backoff = Backoff::new(retry);
        let mut sent_before = false;
        loop {
            let outcome = match self.send_once_on(method.clone(), path, &body, headers, conn).await {
                Ok(resp) => resp.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source }),
                Err(e) => Err(e),
            };
            match outcome {
                Err(ClientError::Api { status: 404, .. }) if gone_is_done && sent_before => return Ok(Bytes::new()),
                Err(e) => {
                    // Nothing reached ckptd, or it refused for load: nothing was done. Any other
                    // failure may have come after the request was carried out.
                    let maybe_done = !matches!(e.api_code(), Some("busy" | "rate_limited")) && !e.is_unreachable();
                    if !backoff.retry(&e, path).await {
                        return Err(e);
                    }
                    sent_before |= maybe_done;
                }
                ok => return ok,
            }
        }
    }

    /// A request whose answer takes as long as the work behind it (a GC run), waited for up to
    /// `timeout` instead of `request_timeout`. Waits out a busy ckptd, but is not sent again
    /// after a failure in flight: the work goes on in ckptd, and a second request would only
    /// find it running. So it goes on a connection of its own (`unpooled`).
    pub async fn request_long(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        let once = RetryPolicy { attempts_max: 1, ..self.retry.clone() };
        self.request_within(method, path, Body::Empty, &[], &once, Conn::Own { timeout: Some(timeout) }, false).await
    }

    /// A single attempt, for health checks that must answer now, on a connection of its own.
    pub async fn request_once(&self, method: reqwest::Method, path: &str) -> Result<(), ClientError> {
        self.send_once_on(method, path, &Body::Empty, &[], Conn::Own { timeout: None }).await.map(|_| ())
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.request(reqwest::Method::GET, path, Body::Empty).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Internal(e.to_string()))?;
        // Metadata has no content address of its own: its digest travels with it, so a byte
        // changed on the way (a faulty NIC) is refused and sent again, never committed.
        let digest = blake3::hash(&body).to_hex();
        let bytes = self.request_with(method, path, Body::Json(body), &[(BODY_DIGEST_HEADER, digest.as_str())]).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    pub async fn put_chunk(&self, job: &str, hash: ChunkHash, data: Bytes) -> Result<(), ClientError> {
        // Chunk bodies carry their address in the path; ckptd verifies it.
        self.request(reqwest::Method::PUT, &format!("/v1/jobs/{job}/chunks/{hash}"), Body::Bytes(data))
            .await
            .map(|_| ())
    }

    /// Streams chunk `hash`'s raw bytes into `out` (exactly its length) and returns the address
    /// of what arrived, hashed frame by frame. ckptd does not hash it again: the caller compares.
    /// A body of another length is a protocol error.
    pub async fn read_chunk_into(&self, job: &str, hash: ChunkHash, out: &mut [u8]) -> Result<ChunkHash, ClientError> {
        let path = format!("/v1/jobs/{job}/chunks/{hash}");
        let url = format!("{}{}", self.base, path);
        let headers = [("x-ckpt-client-verifies", "true")];
        let mut backoff = Backoff::new(&self.retry);
        loop {
            let outcome = match self.send_once(reqwest::Method::GET, &path, &Body::Empty, &headers).await {
                Ok(resp) => stream_into(resp, &url, hash, out).await,
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if backoff.retry(&e, &path).await => {}
                other => return other,
            }
        }
    }
}

/// HTTP carries every chunk: it is the last transport and never declines.
impl Transport for Http {
    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn put<'a>(
        &'a self,
        job: &'a str,
        hash: ChunkHash,
        data: &'a Bytes,
        _width: Option<u8>,
    ) -> BoxFuture<'a, Result<Outcome, ClientError>> {
        Box::pin(async move { self.put_chunk(job, hash, data.clone()).await.map(|()| Outcome::Carried) })
    }

    fn read_into(
        &self,
        job: &str,
        hash: ChunkHash,
        out: &mut [u8],
        _scratch: &mut Vec<u8>,
    ) -> Result<Outcome, ReadFailure> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| {
            ReadFailure::Failed(ClientError::Internal(format!("an HTTP read outside the runtime: {e}")))
        })?;
        match handle.block_on(self.read_chunk_into(job, hash, out)) {
            Ok(actual) => verified(hash, actual, "bytes received"),
            Err(ClientError::Api { code, message, .. }) if code == "chunk_corrupt" => {
                let detail = message.split_once("corrupt in the store: ").map_or(message.as_str(), |(_, d)| d);
                Err(ReadFailure::Corrupt(format!("ckptd found it corrupt in the store ({detail})")))
            }
            Err(ClientError::Api { code, .. }) if code == "not_found" => {
                Err(ReadFailure::Corrupt("missing from the store".into()))
            }
            Err(e) => Err(ReadFailure::Failed(e)),
        }
    }
}

/// Copies a response body into `out` frame by frame, hashing each frame while it is in the
/// cache, and refuses a body of another length. Returns the address of what arrived.
async fn stream_into(
    mut resp: reqwest::Response,
    url: &str,
    hash: ChunkHash,
    out: &mut [u8],
) -> Result<ChunkHash, ClientError> {
    let mut hasher = ChunkHasher::default();
    let mut at = 0usize;
    while let Some(frame) =
        resp.chunk().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?
    {
        let end = at + frame.len();
        if end > out.len() {
            return Err(ClientError::Protocol(format!(
                "chunk {hash} is longer than the {} bytes the index says",
                out.len()
            )));
        }
        out[at..end].copy_from_slice(&frame);
        hasher.update(&out[at..end]);
        at = end;
    }
    if at != out.len() {
        return Err(ClientError::Protocol(format!("chunk {hash} is {at} bytes, the index says {}", out.len())));
    }
    Ok(hasher.finish())
}

/// The one retry policy of the client: exponential backoff on transient failures up to
/// `attempts_max`, and "busy" answers waited out for up to `busy_retry_for`.
struct Backoff<'a> {
    policy: &'a RetryPolicy,
    delay: Duration,
    attempt: u32,
    busy_deadline: Instant,
}

impl<'a> Backoff<'a> {
    fn new(policy: &'a RetryPolicy) -> Backoff<'a> {
        Backoff { policy, delay: policy.base, attempt: 1, busy_deadline: Instant::now() + policy.busy_retry_for }
    }

    /// Whether to try again after `e`; sleeps first when so.
    async fn retry(&mut self, e: &ClientError, path: &str) -> bool {
        // ckptd busy (503), or this tenant at its rate or its share of ckptd (429
        // `rate_limited`): backpressure, waited out like a full staging tier.
        if matches!(e.api_code(), Some("busy" | "rate_limited")) && Instant::now() < self.busy_deadline {
            tracing::debug!(path, "ckptd busy, backing off");
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(Duration::from_secs(1));
            return true;
        }
        if !self.policy.retry_unreachable && (e.is_unreachable() || e.is_timeout()) {
            return false;
        }
        if e.is_transient() && self.attempt < self.policy.attempts_max {
            tracing::debug!(path, attempt = self.attempt, error = %e, "transient failure, retrying");
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(self.policy.max);
            self.attempt += 1;
            return true;
        }
        false
    }
}
