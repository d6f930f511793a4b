//! The HTTP API. Handlers parse and validate what arrives, call the coordinator, and map its
//! errors to a status and a JSON body `{"error": {"code": ..., "message": ...}}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ckpt_core::{parse_step, validate_job, ChunkHash, CoreError, ShardIndex};
use futures::StreamExt;
use serde::Deserialize;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::auth::{Principal, Tenants};
use crate::bodies::{
    body_deadline, declared_length, held_until_sent, json_budget, run_to_completion, stalled, verify_body_digest,
    ConnectionCut,
};
use crate::coordinator::{Coordinator, OpenSave};
use crate::error::ServiceError;
use crate::store::StoreError;
use crate::{AdoptSource, SegmentChunk};

pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    pub shutting_down: AtomicBool,
    /// The process's telemetry, whose Prometheus registry `/metrics` serves.
    pub telemetry: Option<Arc<ckpt_telemetry::Telemetry>>,
    /// Who may call, and what each caller sees (`auth.rs`); empty: open.
    pub tenants: Arc<Tenants>,
    /// `/readyz`'s probes, one at a time.
    pub ready: crate::ready::Readiness,
    /// Requests running on after their client left (`bodies::run_to_completion`), at most
    /// `connections_max`; a shutdown waits for them as for connections.
    pub detached: Arc<tokio::sync::Semaphore>,
    pub detached_tasks: tokio_util::task::TaskTracker,
}

pub struct ApiError(pub ServiceError);

impl<E: Into<ServiceError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match &self.0 {
            ServiceError::Core(e) => match e {
                CoreError::Conflict { .. } | CoreError::InvalidTransition { .. } => StatusCode::CONFLICT,
                CoreError::InvalidManifest(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
            ServiceError::BadRequest(_) | ServiceError::UnknownChunks { .. } => StatusCode::BAD_REQUEST,
            ServiceError::Adopt(e) if e.is_refusal() => StatusCode::BAD_REQUEST,
            ServiceError::NotFound(_) | ServiceError::Store(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            ServiceError::Conflict(_) | ServiceError::Fenced { .. } => StatusCode::CONFLICT,
            ServiceError::Busy(_) | ServiceError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::BodyStalled { .. } | ServiceError::BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            ServiceError::BodyMismatch { .. } => StatusCode::BAD_REQUEST,
            ServiceError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServiceError::OverQuota { .. } | ServiceError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServiceError::Store(e) if !e.is_permanent() => StatusCode::SERVICE_UNAVAILABLE,
            // ckptd stops on it and its next start rebuilds the index: a retry gets through.
            ServiceError::Index(e) if e.is_damage() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.0.code();
        let message = self.0.to_string();
        // A body that does not match its hash was damaged on the way (a client hashes what it
        // sends): operators want to see a flaky link.
        if status.is_server_error() || code == "hash_mismatch" || code == "body_mismatch" {
            tracing::warn!(status = status.as_u16(), code, %message, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), code, %message, "request refused");
        }
        let retry_after = match &self.0 {
            ServiceError::OverQuota { retry_after_s, .. } | ServiceError::RateLimited { retry_after_s, .. } => {
                Some(*retry_after_s)
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let body = Json(serde_json::json!({ "error": { "code": code, "message": message } }));
        let mut resp = (status, body).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ckptd\""));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn path<T>(p: Result<Path<T>, PathRejection>) -> ApiResult<T> {
    p.map(|Path(t)| t).map_err(|e| ApiError(ServiceError::BadRequest(format!("bad path: {}", e.body_text()))))
}

fn job_of(job: &str) -> ApiResult<()> {
    validate_job(job).map_err(ApiError::from)
}

/// A JSON body: a stalled one is `BodyStalled` (408), one that cannot be read or parsed is a
/// 4xx with the usual JSON error.
fn json_body<T: serde::de::DeserializeOwned>(s: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    parse_strict(&body_read(s, body)?)
}

/// A large JSON body (a shard index may be tens of MiB) is parsed on a blocking thread: it
/// would hold a runtime worker for as long as that takes.
async fn json_body_off_runtime<T: serde::de::DeserializeOwned + Send + 'static>(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<T> {
    const INLINE_BYTES_MAX: usize = 256 << 10;
    let body = body_read(s, body)?;
    if body.len() <= INLINE_BYTES_MAX {
        return parse_strict(&body);
    }
    tokio::task::spawn_blocking(move || parse_strict(&body)).await.map_err(|e| ApiError(crate::error::join_error(e)))?
}

fn body_read(s: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| match stalled(&e, s) {
        Some(stall) => ApiError(stall),
        None if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError(ServiceError::TooLarge(e.body_text())),
        None => ApiError(ServiceError::BadRequest(format!("cannot read the body: {}", e.body_text()))),
    })
}

/// Parses a request's JSON, refusing any field the request type does not have: a misspelt
/// field (`"meta"` for `"metadata"`, `"epoc"`) would otherwise be dropped without a word and
/// the request carried out without it. Free-form values (metadata) take any keys.
fn parse_strict<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let bad = |why: String| ApiError(ServiceError::BadRequest(format!("bad json body: {why}")));
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_ignored::deserialize(&mut de, |path| {
        if unknown.len() < 8 {
            unknown.push(path.to_string());
        }
    })
    .map_err(|e| bad(e.to_string()))?;
    de.end().map_err(|e| bad(e.to_string()))?;
    if !unknown.is_empty() {
        return Err(bad(format!(
            "unknown field(s) {}: see /openapi.json for what this request takes",
            unknown.join(", ")
        )));
    }
    Ok(parsed)
}

/// The largest body of a save's open (its world size and metadata): axum's default limit,
/// named so the digest check reads no more.
const OPEN_BODY_BYTES_MAX: usize = 2 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    // Chunk bodies are bounded by their declared length (checked against chunk_bytes_max and
    // reserved from the staging budget before reading); JSON bodies by this limit.
    let json_limit = state.coordinator.json_body_bytes_max() as usize;
    // Every body must make progress: a client that sends headers and then nothing would
    // otherwise hold its chunk slot and staging reservation for as long as it keeps the
    // connection open. The timer runs only while a handler waits for the next frame.
    let body_timeout = RequestBodyTimeoutLayer::new(state.coordinator.body_progress_timeout());
    let deadline = axum::middleware::from_fn_with_state(state.clone(), body_deadline);
    // An existence query's body: its most hashes, each quoted and comma-separated, and room
    // for the rest of the JSON; never more than any JSON body (a query for a shard's chunks is
    // smaller than the shard's index, which names each hash and more).
    let missing_limit =
        state.coordinator.missing_query_hashes_max().saturating_mul(70).saturating_add(4096).min(json_limit);
    // JSON bodies a client sent with a digest are checked before they are parsed, read up to
    // their route's limit (not one limit for all: a fence's body is 4 KiB at most); shard
    // indexes inside the index permit, so the bodies read whole stay bounded.
    let digest = |limit: usize| axum::middleware::from_fn_with_state((state.clone(), limit), verify_body_digest);
    let index_permit = || axum::middleware::from_fn_with_state(state.clone(), index_permit);
    let json_bytes = |limit: usize| axum::middleware::from_fn_with_state((state.clone(), limit), json_budget);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/v1/faults", get(faults_report).post(arm_fault).layer(DefaultBodyLimit::max(4096)))
        .route("/v1/local", get(local_paths))
        .route("/v1/jobs/{job}/checkpoints", get(list_checkpoints))
        .route("/v1/jobs/{job}/checkpoints/{step}", get(get_manifest).delete(delete_checkpoint))
        .route("/v1/jobs/{job}/indexes/{hash}", get(get_index_object))
        .route("/v1/jobs/{job}/checkpoints/{step}/pin", put(pin_checkpoint).delete(unpin_checkpoint))
        .route("/v1/jobs/{job}/gc", post(gc_job))
        .route("/v1/gc", post(gc_all))
        .route(
            "/v1/jobs/{job}/chunks/missing",
            post(missing_chunks)
                .layer(DefaultBodyLimit::max(missing_limit))
                .layer(digest(missing_limit))
                .layer(json_bytes(missing_limit)),
        )
        .route("/v1/jobs/{job}/chunks/{hash}", put(put_chunk).get(get_chunk))
        .route(
            "/v1/jobs/{job}/chunks/{hash}/adopt",
            post(adopt_chunk).layer(DefaultBodyLimit::max(OPEN_BODY_BYTES_MAX)).layer(json_bytes(OPEN_BODY_BYTES_MAX)),
        )
        .route(
            "/v1/jobs/{job}/chunks/adopt",
            post(adopt_segment_chunk)
                .layer(DefaultBodyLimit::max(OPEN_BODY_BYTES_MAX))
                .layer(json_bytes(OPEN_BODY_BYTES_MAX)),
        )
        .route(
            "/v1/jobs/{job}/saves/{step}",
            put(open_save)
                .get(save_status)
                .delete(abort_save)
                .layer(DefaultBodyLimit::max(OPEN_BODY_BYTES_MAX))
                .layer(digest(OPEN_BODY_BYTES_MAX))
                .layer(json_bytes(OPEN_BODY_BYTES_MAX)),
        )
        .route("/v1/jobs/{job}/fence", put(raise_fence).layer(DefaultBodyLimit::max(4096)).layer(digest(4096)))
        .route(
            "/v1/jobs/{job}/saves/{step}/ranks/{rank}",
            put(put_shard_index)
                .layer(DefaultBodyLimit::max(json_limit))
                .layer(digest(json_limit))
                .layer(json_bytes(json_limit))
                .layer(index_permit()),
        )
        // Authorization sees the matched route and its parameters, so it runs inside routing;
        // authentication runs before it, for every path.
        .route_layer(axum::middleware::from_fn(crate::auth::authorize))
        .fallback(|| async { ApiError(ServiceError::NotFound("no such endpoint".into())) })
        .method_not_allowed_fallback(|| async {
            let body = serde_json::json!({ "error": { "code": "method_not_allowed", "message": "this endpoint does not take that method" } });
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(body_timeout)
        .layer(deadline)
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::auth::authenticate))
        .layer(axum::middleware::from_fn_with_state(state.clone(), run_to_completion))
        .with_state(state)
}

/// The API's description, generated from these handlers (`openapi.rs`).
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "this document", body = Object, content_type = "application/json"), crate::openapi::Refusals),
    security(())
)]
pub(crate) async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::document()).into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    responses((status = 200, description = "alive", body = String, content_type = "text/plain"), crate::openapi::Refusals),
    security(())
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses((status = 200, description = "ready to serve", body = String, content_type = "text/plain"), crate::openapi::Refusals),
    security(())
)]
pub(crate) async fn readyz(State(s): State<Arc<AppState>>) -> ApiResult<&'static str> {
    if s.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError(ServiceError::Busy("shutting down".into())));
    }
    // Damage stops ckptd within its grace; until then it takes no new work.
    if let Some(damage) = s.coordinator.index_damage() {
        return Err(ApiError(ServiceError::NotReady(format!("the index is damaged: {damage}"))));
    }
    s.ready.check(s.coordinator.store()).await?;
    Ok("ready")
}

/// 404 unless ckptd runs with `fault_injection`.
fn faults_of(s: &AppState) -> Result<&Arc<crate::faults::Faults>, ApiError> {
    s.coordinator.store().faults().ok_or_else(|| ApiError(ServiceError::NotFound("fault injection is off".into())))
}

#[utoipa::path(
    get,
    path = "/v1/faults",
    responses((status = 200, description = "armed faults and what fired (admin; needs fault_injection)", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn faults_report(
    State(s): State<Arc<AppState>>,
) -> Result<Json<crate::faults::FaultReport>, ApiError> {
    Ok(Json(faults_of(&s)?.report()))
}

#[utoipa::path(
    post,
    path = "/v1/faults",
    request_body(content = Object, content_type = "application/json"),
    responses((status = 204, description = "armed"), crate::openapi::Refusals)
)]
pub(crate) async fn arm_fault(State(s): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let faults = faults_of(&s)?;
    let req: crate::faults::FaultRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid fault request: {e}"))))?;
    faults.arm(req).map_err(|e| ApiError(ServiceError::BadRequest(e.to_string())))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/stats",
    responses((status = 200, description = "staging, segments and save counters (admin)", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn stats(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let staging = s.coordinator.staging();
    Json(serde_json::json!({
        "staging": staging.stats(),
        "segments": s.coordinator.segments.stats(),
        "memory_overhead_bytes": staging.memory_overhead_bytes(),
        "saves_in_flight": s.coordinator.saves_in_flight(),
        "chunk_refs_in_flight": s.coordinator.chunk_refs_in_flight(),
        "index_bytes_in_flight": s.coordinator.index_bytes_in_flight(),
        "json_bytes_in_flight": s.coordinator.json_bytes_in_flight(),
        "journal_flushes": s.coordinator.journal_flushes(),
        "store_syncs": s.coordinator.store_syncs(),
        "gc_views_cached": s.coordinator.gc_views_cached(),
        "last_commit_after_last_index_us": s.coordinator.last_commit_after_last_index_us(),
        "start": s.coordinator.start_report(),
        "index_damage": s.coordinator.index_damage(),
    }))
}

/// Prometheus text exposition of every metric (see `metrics.rs`).
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus text exposition (admin)", body = String, content_type = "text/plain"), crate::openapi::Refusals)
)]
pub(crate) async fn metrics(State(s): State<Arc<AppState>>) -> ApiResult<Response> {
    let Some(t) = &s.telemetry else {
        return Err(ApiError(ServiceError::NotFound("metrics are not enabled in this process".into())));
    };
    let text = t.prometheus_text().map_err(|e| ApiError(ServiceError::Internal(e.to_string())))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/local",
    responses((status = 200, description = "node-local paths for the caller", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn local_paths(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<serde_json::Value>> {
    let (handoff, store_root) = s.coordinator.local_paths(who.tenant().map(|t| t.as_ref()))?;
    // Shared-memory segments are registered over a socket that does not authenticate: with
    // tenants, the path is off.
    let segment_socket = if s.tenants.is_open() { s.coordinator.segment_socket() } else { None };
    Ok(Json(serde_json::json!({ "handoff_dir": handoff, "store_root": store_root, "segment_socket": segment_socket })))
}

/// A chunk slot: the tenant's share first (429 when it is used up), then the node's (503).
async fn chunk_permits(
    s: &AppState,
    who: &Principal,
) -> ApiResult<(Option<tokio::sync::OwnedSemaphorePermit>, tokio::sync::OwnedSemaphorePermit)> {
    let wait = s.coordinator.busy_wait();
    let share = match who.tenant() {
        Some(t) => t.chunk_slot(wait).await?,
        None => None,
    };
    Ok((share, s.coordinator.chunk_permit().await?))
}

/// A handoff file by name, or raw bytes in a registered shared-memory segment.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdoptRequest {
    file: Option<String>,
    segment: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    len: u64,
    width: Option<u8>,
    #[serde(default)]
    level: i32,
}

/// `POST /v1/jobs/{job}/chunks/adopt`: bytes of a registered segment that ckptd names (the
/// client skips hashing them); answers the chunk's address.
#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/chunks/adopt",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'")),
    request_body(content = SegmentChunk, content_type = "application/json"),
    responses((status = 200, description = "the chunk is durable; its address", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn adopt_segment_chunk(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let job = path(p)?;
    job_of(&job)?;
    let req: SegmentChunk = json_body(&s, body)?;
    if !s.tenants.is_open() {
        return Err(ServiceError::Conflict("shared-memory segments are off on a ckptd with tenants".into()).into());
    }
    let (_share, permit) = chunk_permits(&s, &who).await?;
    let (hash, outcome) = s.coordinator.adopt_segment(&job, None, req, permit).await?;
    Ok(Json(serde_json::json!({ "hash": hash, "state": outcome.state, "written": outcome.written })).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/chunks/{hash}/adopt",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Chunk or index object address: 64 lowercase hex digits of blake3")),
    request_body(content = AdoptRequest, content_type = "application/json"),
    responses((status = 200, description = "the chunk is durable", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn adopt_chunk(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (job, hash) = path(p)?;
    job_of(&job)?;
    let hash: ChunkHash = hash.parse()?;
    let req: AdoptRequest = json_body(&s, body)?;
    if let Some(t) = who.tenant() {
        t.check_stored(&s.coordinator).await?;
    }
    let (_share, permit) = chunk_permits(&s, &who).await?;
    let source = match (req.file, req.segment) {
        (Some(name), None) => AdoptSource::File(name),
        (None, Some(_)) if !s.tenants.is_open() => {
            return Err(ServiceError::Conflict("shared-memory segments are off on a ckptd with tenants".into()).into())
        }
        (None, Some(token)) => AdoptSource::Segment(SegmentChunk {
            token,
            offset: req.offset,
            len: req.len,
            width: req.width,
            level: req.level,
        }),
        _ => return Err(ServiceError::BadRequest("an adopt names either a file or a segment".into()).into()),
    };
    let outcome = s.coordinator.adopt_chunk(&job, hash, source, permit, who.tenant().map(|t| t.as_ref())).await?;
    Ok(Json(serde_json::json!({ "hash": hash, "state": outcome.state, "written": outcome.written })).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    responses((status = 200, description = "the caller's jobs", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn list_jobs(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut jobs = s.coordinator.jobs().await?;
    jobs.retain(|j| who.sees(j));
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/checkpoints",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'")),
    responses((status = 200, description = "committed checkpoints and saves in flight", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn list_checkpoints(
    State(s): State<Arc<AppState>>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let job = path(p)?;
    job_of(&job)?;
    Ok(Json(s.coordinator.list(&job).await?).into_response())
}

async fn resolve_step(s: &AppState, job: &str, step: &str) -> ApiResult<u64> {
    if step == "latest" {
        return Ok(s.coordinator.latest_step(job).await?);
    }
    Ok(parse_step(step)?)
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/checkpoints/{step}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = String, Path, pattern = "^([0-9]{1,19}|latest)$", description = "A step number, or `latest`")),
    responses((status = 200, description = "the checkpoint's root", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn get_manifest(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    cut: Option<Extension<ConnectionCut>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = resolve_step(&s, &job, &step).await?;
    // A root is read whole (about 90 bytes a rank): it takes a transfer slot as a chunk does.
    let permits = chunk_permits(&s, &who).await?;
    let bytes = s.coordinator.manifest_bytes(&job, step).await?;
    Ok(json_held(&s, bytes, permits, cut))
}

/// A JSON object read whole from the store, answered holding the transfer slots it was read
/// under until it is sent (see `held_until_sent`).
fn json_held<H: Send + Unpin + 'static>(
    s: &AppState,
    bytes: Bytes,
    held: H,
    cut: Option<Extension<ConnectionCut>>,
) -> Response {
    let deadline = cut.map(|Extension(c)| (s.coordinator.body_deadline(Some(bytes.len() as u64)), c));
    ([(header::CONTENT_TYPE, "application/json")], held_until_sent(bytes, held, deadline)).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/indexes/{hash}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Chunk or index object address: 64 lowercase hex digits of blake3")),
    responses((status = 200, description = "a shard index object", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn get_index_object(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    cut: Option<Extension<ConnectionCut>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let (job, hash) = path(p)?;
    job_of(&job)?;
    let hash: ChunkHash = hash.parse()?;
    // Up to `shard_index_bytes_max`, read whole: under a transfer slot, as a chunk is.
    let permits = chunk_permits(&s, &who).await?;
    let bytes = s.coordinator.index_object_bytes(&job, hash).await?;
    Ok(json_held(&s, bytes, permits, cut))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(
    delete,
    path = "/v1/jobs/{job}/checkpoints/{step}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number"), ("force" = Option<bool>, Query, description = "also the newest or a pinned checkpoint")),
    responses((status = 200, description = "deleted", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn delete_checkpoint(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    let Query(q) = q.map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
    s.coordinator.delete_checkpoint(&job, step, q.force).await?;
    Ok(Json(serde_json::json!({ "deleted": { "job": job, "step": step } })).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{job}/checkpoints/{step}/pin",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number")),
    responses((status = 200, description = "pinned", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn pin_checkpoint(
    s: State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    pin_or_unpin(s, p, true).await
}

#[utoipa::path(
    delete,
    path = "/v1/jobs/{job}/checkpoints/{step}/pin",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number")),
    responses((status = 200, description = "unpinned", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn unpin_checkpoint(
    s: State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    pin_or_unpin(s, p, false).await
}

async fn pin_or_unpin(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
    pinned: bool,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    s.coordinator.pin(&job, step, pinned).await?;
    Ok(Json(serde_json::json!({ "job": job, "step": step, "pinned": pinned })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GcQuery {
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/gc",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("dry_run" = Option<bool>, Query)),
    responses((status = 200, description = "what GC condemned or removed", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn gc_job(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<GcQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let job = path(p)?;
    job_of(&job)?;
    let Query(q) = q.map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
    // Held for the run (this request runs to its end, `run_to_completion`).
    let _tenants_slot = who.tenant().map(|t| t.gc_slot()).transpose()?;
    Ok(Json(s.coordinator.gc(&job, q.dry_run).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/gc",
    params(("dry_run" = Option<bool>, Query)),
    responses((status = 200, description = "GC of every job (admin): `jobs` holds the reports of the runs that finished, `failed` the jobs whose run failed (`job`, `code`, `message`; the others still ran), `not_run` the jobs not reached because the store stopped answering", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn gc_all(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<GcQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
    let _tenants_slot = who.tenant().map(|t| t.gc_slot()).transpose()?;
    Ok(Json(s.coordinator.gc_all(q.dry_run).await?).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct MissingQuery {
    hashes: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/chunks/missing",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'")),
    request_body(content = MissingQuery, content_type = "application/json"),
    responses((status = 200, description = "the hashes this job lacks", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn missing_chunks(
    State(s): State<Arc<AppState>>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let job = path(p)?;
    job_of(&job)?;
    let q: MissingQuery = json_body(&s, body)?;
    let hashes = q.hashes.iter().map(|h| h.parse::<ChunkHash>()).collect::<Result<Vec<_>, _>>()?;
    let missing = s.coordinator.missing_chunks(&job, hashes).await?;
    Ok(Json(serde_json::json!({ "missing": missing })).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{job}/chunks/{hash}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Chunk or index object address: 64 lowercase hex digits of blake3")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the chunk's bytes; their blake3 must be the hash"),
    responses((status = 201, description = "staged or stored", body = Object, content_type = "application/json"), (status = 200, description = "already held", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn put_chunk(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let (job, hash) = path(p)?;
    job_of(&job)?;
    let hash: ChunkHash = hash.parse()?;
    // The length is needed up front to reserve staging space before any byte is read.
    let len: u64 = declared_length(&headers)
        .ok_or_else(|| ServiceError::BadRequest("chunk uploads need a Content-Length".into()))?;
    // The tenant's quota and shares first (429; no node-wide slot is held while waiting for
    // them), then the node's slot (503).
    let share = match who.tenant() {
        Some(t) => {
            t.check_stored(&s.coordinator).await?;
            t.staging_share(len, s.coordinator.busy_wait()).await?
        }
        None => None,
    };
    let _permits = chunk_permits(&s, &who).await?;
    let state = s.clone();
    let stream = body
        .into_data_stream()
        .map(move |r| r.map_err(|e| stalled(&e, &state).unwrap_or_else(|| ServiceError::Io(std::io::Error::other(e)))));
    let outcome = s.coordinator.put_chunk(&job, hash, len, stream, share).await?;
    let status = if outcome.written { StatusCode::CREATED } else { StatusCode::OK };
    // `state` says what the ack promises: "staged" (in ckptd's staging tier, uploaded later)
    // or "durable" (already in the store).
    let answer = serde_json::json!({ "hash": hash, "state": outcome.state, "written": outcome.written });
    Ok((status, Json(answer)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/chunks/{hash}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("hash" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Chunk or index object address: 64 lowercase hex digits of blake3"), ("Range" = Option<String>, Header, description = "one byte range")),
    responses((status = 200, description = "the chunk's bytes, verified", body = Vec<u8>, content_type = "application/octet-stream"), (status = 206, description = "the requested range", body = Vec<u8>, content_type = "application/octet-stream"), (status = 416, description = "unsatisfiable range"), crate::openapi::Refusals)
)]
pub(crate) async fn get_chunk(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    cut: Option<Extension<ConnectionCut>>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (job, hash) = path(p)?;
    job_of(&job)?;
    let hash: ChunkHash = hash.parse()?;
    // A client that verifies every byte itself says so; ckptd then skips its own hash pass.
    let verify = headers.get("x-ckpt-client-verifies").is_none_or(|v| v.as_bytes() != b"true");
    let permits = chunk_permits(&s, &who).await?;
    let raw = s.coordinator.get_chunk(&job, hash, verify).await?;
    let len = raw.len() as u64;
    let taken_by = |n: u64| cut.clone().map(|Extension(c)| (s.coordinator.body_deadline(Some(n)), c));
    let Some(range) = headers.get(header::RANGE) else {
        let body = held_until_sent(raw, permits, taken_by(len));
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response());
    };
    let unsatisfiable = || {
        let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        r
    };
    let ranges = range
        .to_str()
        .ok()
        .and_then(|r| http_range_header::parse_range_header(r).ok())
        .and_then(|parsed| parsed.validate(len).ok());
    let Some(ranges) = ranges else { return Ok(unsatisfiable()) };
    // One range per request: that is what chunk readers need, and it keeps responses simple.
    let [range] = ranges.as_slice() else { return Ok(unsatisfiable()) };
    let (start, end) = (*range.start(), *range.end());
    // A slice keeps the whole decoded chunk while the range is sent, as a whole answer would;
    // the permits it holds bound both alike.
    let part = held_until_sent(raw.slice(start as usize..=end as usize), permits, taken_by(end - start + 1));
    let content_range = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    Ok((
        StatusCode::PARTIAL_CONTENT,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_RANGE, content_range),
        ],
        part,
    )
        .into_response())
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{job}/saves/{step}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number")),
    request_body(content = OpenSave, content_type = "application/json"),
    responses((status = 200, description = "the save's status", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn open_save(
    State(s): State<Arc<AppState>>,
    Extension(who): Extension<Principal>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    let req: OpenSave = json_body(&s, body)?;
    let Some(tenant) = who.tenant() else {
        return Ok(Json(s.coordinator.open_save(&job, step, req).await?).into_response());
    };
    // Every rank opens the save: only the first open of a (job, step) is a new save. The count
    // and the open of a new one happen under the tenant's lock, so that concurrent opens cannot
    // both take the last place; re-opens of a save in flight skip it.
    if s.coordinator.save_slot(&job, step).is_some() {
        return Ok(Json(s.coordinator.open_save(&job, step, req).await?).into_response());
    }
    let _one_at_a_time = tenant.open_lock.lock().await;
    if s.coordinator.save_slot(&job, step).is_none() {
        if let Some(max) = tenant.quota.saves_in_flight_max {
            let open = s.coordinator.saves_in_flight_where(|j| tenant.owns(j));
            if open >= max {
                return Err(ServiceError::OverQuota {
                    reason: format!("tenant {} has {open} saves in flight, its quota is {max}", tenant.name),
                    retry_after_s: 5,
                }
                .into());
            }
        }
        tenant.check_stored(&s.coordinator).await?;
    }
    Ok(Json(s.coordinator.open_save(&job, step, req).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusQuery {
    /// Hold the answer until the save ends, for up to this long (capped by `status_wait_ms_max`).
    #[serde(default)]
    wait_ms: u64,
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/saves/{step}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number"), ("wait_ms" = Option<u64>, Query, description = "hold the answer until the save ends, up to this long")),
    responses((status = 200, description = "the save's status", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn save_status(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    let Query(q) = q.map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
    let status = s.coordinator.save_status_wait(&job, step, Duration::from_millis(q.wait_ms)).await?;
    Ok(Json(status).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FenceRequest {
    epoch: u64,
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{job}/fence",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'")),
    request_body(content = FenceRequest, content_type = "application/json"),
    responses((status = 200, description = "the job's fence", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn raise_fence(
    State(s): State<Arc<AppState>>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let job = path(p)?;
    job_of(&job)?;
    let req: FenceRequest = json_body(&s, body)?;
    let epoch = s.coordinator.raise_fence(&job, req.epoch).await?;
    Ok(Json(serde_json::json!({ "job": job, "epoch": epoch })).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/jobs/{job}/saves/{step}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number")),
    responses((status = 200, description = "the save's status", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn abort_save(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let (job, step) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    Ok(Json(s.coordinator.abort_save(&job, step, "aborted by a client").await?).into_response())
}

/// Index puts in flight are bounded (`index_requests_max`): the permit is taken before the body
/// is read, so thousands of ranks sending at once hold at most that many bodies in memory. A
/// tenant's share (`index_share_pct`) is taken first (429 when it is used up), so one tenant's
/// slow or stuck puts cannot hold every slot.
async fn index_permit(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let share = match req.extensions().get::<Principal>().and_then(Principal::tenant) {
        Some(t) => t.index_slot(s.coordinator.busy_wait()).await,
        None => Ok(None),
    };
    let permits = match share {
        Ok(share) => s.coordinator.index_permit().await.map(|node| (share, node)),
        Err(e) => Err(e),
    };
    match permits {
        Ok(_held) => next.run(req).await,
        Err(e) => ApiError(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EpochQuery {
    epoch: Option<u64>,
}

#[utoipa::path(
    put,
    path = "/v1/jobs/{job}/saves/{step}/ranks/{rank}",
    params(("job" = String, Path, pattern = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$", max_length = 128, description = "Job name: starts with a letter or digit; letters, digits, '.', '-', '_'; no '..'"), ("step" = u64, Path, description = "Step number"), ("rank" = u32, Path), ("epoch" = Option<u64>, Query, description = "the writer's generation")),
    request_body(content = Object, content_type = "application/json", description = "the rank's shard index"),
    responses((status = 200, description = "the save's status", body = Object, content_type = "application/json"), crate::openapi::Refusals)
)]
pub(crate) async fn put_shard_index(
    State(s): State<Arc<AppState>>,
    p: Result<Path<(String, String, String)>, PathRejection>,
    q: Result<Query<EpochQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (job, step, rank) = path(p)?;
    job_of(&job)?;
    let step = parse_step(&step)?;
    let Query(q) = q.map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
    s.coordinator.check_fence(&job, q.epoch).await?;
    let rank: u32 =
        rank.parse().map_err(|_| ServiceError::BadRequest(format!("rank {rank:?} is not a non-negative integer")))?;
    let index: ShardIndex = json_body_off_runtime(&s, body).await?;
    if index.rank != rank {
        return Err(ApiError(ServiceError::BadRequest(format!(
            "path names rank {rank} but the index is rank {}",
            index.rank
        ))));
    }
    Ok(Json(s.coordinator.put_shard_index(&job, step, index, q.epoch).await?).into_response())
}
