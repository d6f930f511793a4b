//! Tenants: who may call ckptd, which jobs each one sees, and how much of the node each may use.
//!
//! Design note.
//! * Open or closed: with no `[[tenants]]` configured every caller is `Principal::Open` and sees
//!   everything (a single team's node, the embedded default). With tenants, every request but
//!   the probes and the API description must authenticate.
//! * Authentication: a bearer token is hashed with blake3 and the hash compared with every
//!   configured hash of every tenant (`blake3::Hash` compares in constant time, and no loop
//!   exits early), so neither the comparison's time nor the config reveals a token. Under
//!   mutual TLS a verified client certificate's DNS names map to a tenant instead (`tls.rs`
//!   puts them in the request's extensions). A token wins over a certificate; a token naming
//!   no tenant is refused even when the certificate would do, so a mistake is loud. Tokens are
//!   never logged or echoed: errors name what was wrong, not what was sent.
//! * Authorization in one place: a route layer that sees the matched route and its path
//!   parameters. A job outside the caller's prefixes is answered `404 not_found` with a body
//!   that depends on nothing but the name asked for, before any handler, index or store call
//!   runs: another tenant's job and a job that exists nowhere cannot be told apart. Admin routes
//!   (stats, metrics, GC of every job, faults) answer 403 to tenants.
//! * Quotas: a token bucket per tenant for requests, a count of the tenant's saves in flight
//!   (checked under a per-tenant lock at open, so concurrent opens cannot overshoot), stored
//!   bytes (the index's durable chunks of the tenant's jobs, measured at most every
//!   `usage_refresh_s`), and shares of the chunk slots and of the staging budget held as
//!   semaphores of their own, taken before the node-wide ones. Every refusal is 429 with
//!   Retry-After and touches no other tenant's budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, RawPathParams, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{ApiError, AppState};
use crate::config::{ConfigError, TenantConfig, TenantQuota, TlsConfig};
use crate::error::ServiceError;

pub struct Tenant {
    pub name: String,
    hashes: Vec<blake3::Hash>,
    prefixes: Vec<String>,
    pub admin: bool,
    cert_names: Vec<String>,
    pub uid: Option<u32>,
    pub quota: TenantQuota,
    bucket: Mutex<Bucket>,
    /// Held while a save of this tenant is opened, so the in-flight count cannot overshoot.
    pub(crate) open_lock: tokio::sync::Mutex<()>,
    chunk_slots: Option<(Arc<Semaphore>, usize)>,
    index_slots: Option<(Arc<Semaphore>, usize)>,
    staging: Option<(Arc<Semaphore>, u64)>,
    /// GC runs this tenant may have going at once on this node: with other tenants, one fewer
    /// than the node's `gc_runs_max`, so no tenant can hold every run slot.
    gc_slots: (Arc<Semaphore>, usize),
    usage: Mutex<Option<(Instant, u64)>>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant").field("name", &self.name).field("admin", &self.admin).finish_non_exhaustive()
    }
}

impl Tenant {
    pub fn owns(&self, job: &str) -> bool {
        self.prefixes.iter().any(|p| job.starts_with(p.as_str()))
    }

    /// Takes one request from the tenant's bucket, or says how long until one is there.
    fn admit(&self) -> Result<(), ServiceError> {
        let Some(rate) = self.quota.requests_per_s else { return Ok(()) };
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let rate = rate as f64;
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - b.tokens) / rate).ceil() as u64;
        Err(ServiceError::RateLimited {
            reason: format!("tenant {} is over its rate of {rate} requests per second", self.name),
            retry_after_s: wait.max(1),
        })
    }

    /// A slot of the tenant's share of the chunk transfers, waiting up to `wait`.
    pub(crate) async fn chunk_slot(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, ServiceError> {
        self.share_slot(&self.chunk_slots, wait, "chunk transfers").await
    }

    /// A slot of the tenant's share of the shard-index puts, waiting up to `wait`.
    pub(crate) async fn index_slot(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, ServiceError> {
        self.share_slot(&self.index_slots, wait, "shard-index puts").await
    }

    /// A slot of one of the tenant's shares of a node's request slots (none when its share is
    /// the whole), or 429 once `wait` has passed without one.
    async fn share_slot(
        &self,
        share: &Option<(Arc<Semaphore>, usize)>,
        wait: Duration,
        what: &str,
    ) -> Result<Option<OwnedSemaphorePermit>, ServiceError> {
        let Some((slots, n)) = share else { return Ok(None) };
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(ServiceError::RateLimited {
                reason: format!("tenant {} has all {n} of its {what} in progress", self.name),
                retry_after_s: 1,
            }),
        }
    }

    /// One of the tenant's GC run slots, or a refusal to come back later.
    pub(crate) fn gc_slot(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        let (slots, n) = &self.gc_slots;
        slots.clone().try_acquire_owned().map_err(|_| ServiceError::RateLimited {
            reason: format!("tenant {} has all {n} of its GC runs on this node in progress", self.name),
            retry_after_s: 10,
        })
    }

    /// The tenant's share of the staging budget for a chunk of `len` bytes, waiting up to
    /// `wait`. A chunk larger than the whole share is over `chunk_bytes_max` (validation keeps
    /// shares at least that large), which the upload itself refuses.
    pub(crate) async fn staging_share(
        &self,
        len: u64,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, ServiceError> {
        let Some((sem, bytes)) = &self.staging else { return Ok(None) };
        if len == 0 || len > *bytes {
            return Ok(None);
        }
        match tokio::time::timeout(wait, sem.clone().acquire_many_owned(len as u32)).await {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(ServiceError::RateLimited {
                reason: format!("tenant {}'s share of the staging budget ({bytes} bytes) is full", self.name),
                retry_after_s: 1,
            }),
        }
    }

    /// Refuses new data once the tenant's stored bytes reach its quota.
    pub(crate) async fn check_stored(self: &Arc<Self>, coordinator: &crate::Coordinator) -> Result<(), ServiceError> {
        let Some(max) = self.quota.stored_bytes_max else { return Ok(()) };
        let used = self.stored_bytes(coordinator).await?;
        if used >= max {
            return Err(ServiceError::OverQuota {
                reason: format!(
                    "tenant {} stores {used} bytes, its quota is {max}: delete or collect checkpoints first",
                    self.name
                ),
                retry_after_s: self.quota.usage_refresh_s,
            });
        }
        Ok(())
    }

    /// The stored bytes of the tenant's jobs, from a measurement at most `usage_refresh_s` old.
    pub(crate) async fn stored_bytes(self: &Arc<Self>, coordinator: &crate::Coordinator) -> Result<u64, ServiceError> {
        let fresh = Duration::from_secs(self.quota.usage_refresh_s);
        if let Some((at, bytes)) = *self.usage.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < fresh {
                return Ok(bytes);
            }
        }
        let me = self.clone();
        let bytes = coordinator.blocking(move |i| i.stored_bytes_where(|job| me.owns(job))).await?;
        *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), bytes));
        Ok(bytes)
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A node's request slots and budgets, which tenants' shares are percentages of.
#[derive(Debug, Clone, Copy)]
pub struct NodeSlots {
    pub chunk_requests_max: usize,
    pub index_requests_max: usize,
    pub staging_bytes_max: u64,
    pub gc_runs_max: usize,
}

impl NodeSlots {
    pub fn of(config: &crate::config::Config) -> NodeSlots {
        NodeSlots {
            chunk_requests_max: config.chunk_requests_max,
            index_requests_max: config.index_requests_max,
            staging_bytes_max: config.staging_memory_bytes_max.saturating_add(config.staging_spill_bytes_max),
            gc_runs_max: config.retention.gc_runs_max,
        }
    }
}

/// Every configured tenant.
#[derive(Default)]
pub struct Tenants {
    list: Vec<Arc<Tenant>>,
}

impl Tenants {
    pub fn new(configs: &[TenantConfig], node: &NodeSlots) -> Tenants {
        let NodeSlots { chunk_requests_max, index_requests_max, staging_bytes_max, gc_runs_max } = *node;
        let gc_runs = if configs.len() > 1 { gc_runs_max.saturating_sub(1).max(1) } else { gc_runs_max.max(1) };
        let list = configs
            .iter()
            .map(|c| {
                let share = |pct: u32, of: u64| (of as u128 * pct as u128).div_ceil(100) as u64;
                // With other tenants, a share is at most one fewer than the node's slots (as
                // with GC runs), however it rounds: no tenant can hold every slot.
                let others = configs.len() > 1;
                let slots = |pct: u32, of: usize| {
                    (pct < 100 || others).then(|| {
                        let mut n = share(pct, of as u64).max(1) as usize;
                        if others {
                            n = n.min(of.saturating_sub(1)).max(1);
                        }
                        (Arc::new(Semaphore::new(n)), n)
                    })
                };
                let chunk_slots = slots(c.quota.chunk_share_pct, chunk_requests_max);
                let index_slots = slots(c.quota.index_share_pct, index_requests_max);
                let staging = (c.quota.staging_share_pct < 100).then(|| {
                    let bytes = share(c.quota.staging_share_pct, staging_bytes_max).min(u32::MAX as u64);
                    (Arc::new(Semaphore::new(bytes as usize)), bytes)
                });
                Arc::new(Tenant {
                    name: c.name.clone(),
                    // Validated at load (`validate_tenants`).
                    hashes: c.token_blake3.iter().filter_map(|h| blake3::Hash::from_hex(h).ok()).collect(),
                    prefixes: c.job_prefixes.clone(),
                    admin: c.admin,
                    cert_names: c.client_cert_names.clone(),
                    uid: c.uid,
                    quota: c.quota.clone(),
                    bucket: Mutex::new(Bucket {
                        tokens: c.quota.requests_per_s.unwrap_or(0) as f64,
                        at: Instant::now(),
                    }),
                    open_lock: tokio::sync::Mutex::new(()),
                    chunk_slots,
                    index_slots,
                    staging,
                    gc_slots: (Arc::new(Semaphore::new(gc_runs)), gc_runs),
                    usage: Mutex::new(None),
                })
            })
            .collect();
        Tenants { list }
    }

    pub fn is_open(&self) -> bool {
        self.list.is_empty()
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.list
    }

    /// The tenant whose token this is. Every hash of every tenant is compared, in constant time.
    fn by_token(&self, token: &str) -> Option<Arc<Tenant>> {
        let presented = blake3::hash(token.as_bytes());
        let mut found = None;
        for t in &self.list {
            for h in &t.hashes {
                if *h == presented {
                    found = Some(t.clone());
                }
            }
        }
        found
    }

    /// The one tenant a certificate's names map to; none when they map to several.
    fn by_cert(&self, names: &PeerCertNames) -> Option<Arc<Tenant>> {
        let mut found = self.list.iter().filter(|t| t.cert_names.iter().any(|n| names.0.contains(n)));
        let first = found.next()?;
        found.next().is_none().then(|| first.clone())
    }
}

/// The DNS names of a verified client certificate, put in each request's extensions by the
/// TLS acceptor.
#[derive(Debug, Clone)]
pub struct PeerCertNames(pub Vec<String>);

/// Who a request is from.
#[derive(Clone, Debug)]
pub enum Principal {
    /// ckptd runs without tenants.
    Open,
    Tenant(Arc<Tenant>),
}

impl Principal {
    pub fn sees(&self, job: &str) -> bool {
        match self {
            Principal::Open => true,
            Principal::Tenant(t) => t.owns(job),
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Principal::Open => true,
            Principal::Tenant(t) => t.admin,
        }
    }

    pub fn tenant(&self) -> Option<&Arc<Tenant>> {
        match self {
            Principal::Open => None,
            Principal::Tenant(t) => Some(t),
        }
    }
}

/// Routes anyone may call: liveness and readiness probes, and the API's description.
const PUBLIC: &[&str] = &["/healthz", "/readyz", "/openapi.json"];

/// Routes only an admin may call.
const ADMIN: &[&str] = &["/v1/stats", "/metrics", "/v1/gc", "/v1/faults"];

/// Names the caller (`Principal` in the request's extensions) or answers 401; then charges
/// the tenant's request rate.
pub async fn authenticate(
    State(s): State<Arc<AppState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let principal = if s.tenants.is_open() {
        Principal::Open
    } else if PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    } else {
        match identify(&s.tenants, &req) {
            Ok(t) => {
                if let Err(e) = t.admit() {
                    return ApiError(e).into_response();
                }
                Principal::Tenant(t)
            }
            Err(e) => return ApiError(e).into_response(),
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

fn identify(tenants: &Tenants, req: &axum::extract::Request) -> Result<Arc<Tenant>, ServiceError> {
    let refused = || ServiceError::Unauthorized("the bearer token is not valid for this ckptd".into());
    match req.headers().get(header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().map_err(|_| refused())?;
            // The scheme is case-insensitive (RFC 7235).
            let token = v
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t)
                .ok_or_else(|| {
                ServiceError::Unauthorized("the Authorization header is not a bearer token".into())
            })?;
            tenants.by_token(token.trim()).ok_or_else(refused)
        }
        None => match req.extensions().get::<PeerCertNames>().filter(|n| !n.0.is_empty()) {
            Some(names) => tenants
                .by_cert(names)
                .ok_or_else(|| ServiceError::Unauthorized("the client certificate is not mapped to a tenant".into())),
            None => Err(ServiceError::Unauthorized(
                "this ckptd needs a bearer token (CKPT_TOKEN or CKPT_TOKEN_FILE for the client)".into(),
            )),
        },
    }
}

/// Admin routes answer 403 to tenants; a job outside the caller's prefixes answers exactly as
/// a job that does not exist anywhere (see the design note).
pub async fn authorize(
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        // Public routes carry no principal and take no job.
        return next.run(req).await;
    };
    if let Some(m) = &matched {
        if ADMIN.contains(&m.as_str()) && !principal.is_admin() {
            return ApiError(ServiceError::Forbidden(format!("{} is for admins only", m.as_str()))).into_response();
        }
    }
    match params {
        Ok(params) => {
            if let Some((_, job)) = params.iter().find(|(k, _)| *k == "job") {
                if !principal.sees(job) {
                    return ApiError(not_found_job(job)).into_response();
                }
            }
        }
        // Parameters that do not decode (invalid UTF-8): refused here rather than trusted to
        // every handler to refuse them too.
        Err(e) if matched.is_some() => {
            return ApiError(ServiceError::BadRequest(format!("bad path: {}", e.body_text()))).into_response()
        }
        Err(_) => {}
    }
    next.run(req).await
}

/// The answer for a job the caller may not see: the same for one that exists and one that
/// does not.
pub fn not_found_job(job: &str) -> ServiceError {
    let shown: String = job.chars().take(128).collect();
    ServiceError::NotFound(format!("no job {shown:?}"))
}

/// Checks `[[tenants]]` at load: names, hashes, prefixes, quotas, and certificate names only
/// where mutual TLS can present them.
pub fn validate_tenants(tenants: &[TenantConfig], tls: Option<&TlsConfig>) -> Result<(), ConfigError> {
    let bad = |t: &TenantConfig, why: String| ConfigError::Invalid(format!("tenant {:?}: {why}", t.name));
    let mut seen_names = HashMap::new();
    let mut seen_hashes = HashMap::new();
    for t in tenants {
        if t.name.is_empty()
            || t.name.len() > 64
            || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(t, "a name is 1 to 64 letters, digits, '-' or '_'".into()));
        }
        if seen_names.insert(t.name.clone(), ()).is_some() {
            return Err(bad(t, "named twice".into()));
        }
        if t.token_blake3.is_empty() && t.client_cert_names.is_empty() {
            return Err(bad(t, "needs token_blake3 or client_cert_names to authenticate".into()));
        }
        for h in &t.token_blake3 {
            let hash = blake3::Hash::from_hex(h)
                .map_err(|_| bad(t, "token_blake3 entries are 64 hex digits (ckptd --hash-token)".into()))?;
            if let Some(other) = seen_hashes.insert(*hash.as_bytes(), t.name.clone()) {
                return Err(bad(t, format!("shares a token with tenant {other:?}")));
            }
        }
        if t.job_prefixes.is_empty() {
            return Err(bad(t, "needs job_prefixes (\"\" for every job)".into()));
        }
        if !t.client_cert_names.is_empty() && tls.is_none_or(|c| c.client_ca.is_none()) {
            return Err(bad(t, "client_cert_names need tls.client_ca (mutual TLS)".into()));
        }
        let q = &t.quota;
        if ![q.staging_share_pct, q.chunk_share_pct, q.index_share_pct].iter().all(|p| (1..=100).contains(p)) {
            return Err(bad(t, "quota shares are percentages from 1 to 100".into()));
        }
        if q.saves_in_flight_max == Some(0) || q.requests_per_s == Some(0) || q.usage_refresh_s == 0 {
            return Err(bad(t, "quota limits must be positive".into()));
        }
    }
    // A name is one tenant's: overlapping prefixes would give one tenant another's jobs (admins,
    // who may see every job, excepted), and a certificate name must map to one tenant.
    for a in tenants.iter().filter(|t| !t.admin) {
        for b in tenants.iter().filter(|b| !b.admin && b.name != a.name) {
            for pa in &a.job_prefixes {
                if let Some(pb) = b.job_prefixes.iter().find(|pb| pb.starts_with(pa.as_str())) {
                    return Err(bad(a, format!("prefix {pa:?} covers tenant {:?}'s prefix {pb:?}", b.name)));
                }
            }
            if let Some(n) = a.client_cert_names.iter().find(|n| b.client_cert_names.contains(n)) {
                return Err(bad(a, format!("shares client certificate name {n:?} with tenant {:?}", b.name)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: NodeSlots =
        NodeSlots { chunk_requests_max: 8, index_requests_max: 8, staging_bytes_max: 1 << 20, gc_runs_max: 2 };

    #[tokio::test]
    async fn a_tenants_index_share_is_its_percentage_of_the_nodes_slots() {
        let mut c = tenant("a", "t", "a-");
        c.quota.index_share_pct = 25;
        let t = Tenants::new(&[c, tenant("b", "u", "b-")], &SLOTS);
        let (a, b) = (t.by_token("t").unwrap(), t.by_token("u").unwrap());
        let wait = Duration::from_millis(20);
        let held = [a.index_slot(wait).await.unwrap(), a.index_slot(wait).await.unwrap()];
        assert!(held.iter().all(Option::is_some), "25% of 8 is 2 slots");
        match a.index_slot(wait).await.unwrap_err() {
            ServiceError::RateLimited { reason, .. } => {
                assert!(reason.contains("2 of its shard-index puts"), "{reason}")
            }
            e => panic!("{e}"),
        }
        // b asked for the whole, but with another tenant it gets one fewer than the node's 8.
        let b_held: Vec<_> = futures::future::join_all((0..7).map(|_| b.index_slot(wait))).await;
        assert!(b_held.iter().all(|s| matches!(s, Ok(Some(_)))), "7 of 8 slots are b's to take");
        assert!(b.index_slot(wait).await.is_err(), "the 8th is not b's");
        drop(held);
        assert!(a.index_slot(wait).await.unwrap().is_some());
        // One tenant alone may take every slot, as a node without tenants may.
        let alone = Tenants::new(&[tenant("c", "v", "c-")], &SLOTS);
        assert!(alone.by_token("v").unwrap().index_slot(wait).await.unwrap().is_none());
    }

    fn tenant(name: &str, token: &str, prefix: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            token_blake3: vec![blake3::hash(token.as_bytes()).to_hex().to_string()],
            job_prefixes: vec![prefix.into()],
            admin: false,
            client_cert_names: vec![],
            uid: None,
            quota: TenantQuota::default(),
        }
    }

    #[test]
    fn a_token_names_its_tenant_and_nothing_else() {
        let cfg = [tenant("a", "token-a", "a-"), tenant("b", "token-b", "b-")];
        validate_tenants(&cfg, None).unwrap();
        let t = Tenants::new(&cfg, &SLOTS);
        assert_eq!(t.by_token("token-a").unwrap().name, "a");
        assert_eq!(t.by_token("token-b").unwrap().name, "b");
        assert!(t.by_token("token-c").is_none());
        assert!(t.by_token("").is_none());
        assert!(t.by_token(&blake3::hash(b"token-a").to_hex()).is_none(), "the hash is not a token");
        let a = t.by_token("token-a").unwrap();
        assert!(a.owns("a-job") && !a.owns("b-job") && !a.owns("a"));
    }

    #[test]
    fn bad_tenant_configs_are_refused() {
        let ok = tenant("a", "t", "a-");
        let cases: Vec<(TenantConfig, &str)> = vec![
            (TenantConfig { name: "a/b".into(), ..ok.clone() }, "name"),
            (TenantConfig { token_blake3: vec!["zz".into()], ..ok.clone() }, "64 hex"),
            (TenantConfig { job_prefixes: vec![], ..ok.clone() }, "job_prefixes"),
            (TenantConfig { client_cert_names: vec!["x".into()], ..ok.clone() }, "client_ca"),
            (
                TenantConfig { quota: TenantQuota { staging_share_pct: 0, ..Default::default() }, ..ok.clone() },
                "percentages",
            ),
            (
                TenantConfig { quota: TenantQuota { index_share_pct: 101, ..Default::default() }, ..ok.clone() },
                "percentages",
            ),
        ];
        for (c, why) in cases {
            let e = validate_tenants(&[c], None).unwrap_err().to_string();
            assert!(e.contains(why), "{e} should mention {why}");
        }
        let e = validate_tenants(&[ok.clone(), TenantConfig { name: "b".into(), ..ok.clone() }], None).unwrap_err();
        assert!(e.to_string().contains("shares a token"), "{e}");
        // One tenant's prefix may not cover another's; an admin's may.
        let wide = TenantConfig { job_prefixes: vec!["a".into()], ..tenant("b", "t2", "") };
        let e = validate_tenants(&[ok.clone(), wide.clone()], None).unwrap_err();
        assert!(e.to_string().contains("covers"), "{e}");
        validate_tenants(&[ok.clone(), TenantConfig { admin: true, ..wide }], None).unwrap();
    }

    #[test]
    fn a_certificate_naming_two_tenants_names_none() {
        let with = |name: &str, token: &str, prefix: &str, certs: &[&str]| TenantConfig {
            client_cert_names: certs.iter().map(|c| c.to_string()).collect(),
            ..tenant(name, token, prefix)
        };
        let t = Tenants::new(&[with("a", "ta", "a-", &["a.test"]), with("b", "tb", "b-", &["b.test"])], &SLOTS);
        let names = |n: &[&str]| PeerCertNames(n.iter().map(|s| s.to_string()).collect());
        assert_eq!(t.by_cert(&names(&["a.test"])).unwrap().name, "a");
        assert!(t.by_cert(&names(&["a.test", "b.test"])).is_none());
        assert!(t.by_cert(&names(&["c.test"])).is_none());
    }

    #[test]
    fn the_bucket_refuses_past_the_rate_and_says_when_to_retry() {
        let mut c = tenant("a", "t", "a-");
        c.quota.requests_per_s = Some(3);
        let t = Tenants::new(&[c], &SLOTS);
        let a = t.by_token("t").unwrap();
        for _ in 0..3 {
            a.admit().unwrap();
        }
        match a.admit().unwrap_err() {
            ServiceError::RateLimited { retry_after_s, .. } => assert_eq!(retry_after_s, 1),
            e => panic!("{e}"),
        }
    }
}
