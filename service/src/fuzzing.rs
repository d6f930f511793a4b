//! The HTTP handlers in process, for the fuzz target `fuzz/fuzz_targets/http.rs` and its
//! proptest twin (`service/tests/http_fuzz.rs`): one ckptd (memory store, tenants on) on its
//! own runtime, and one property for any request: ckptd answers it without panicking, with no
//! 5xx but a 503 (busy, documented with Retry-After), and a 4xx comes with the JSON error body;
//! without a valid token nothing but the public routes answers other than 401; the tenant's
//! token never succeeds on an admin route or on a job outside its prefix `t`.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use tower::ServiceExt;

use crate::config::{TenantConfig, TenantQuota};
use crate::{Config, Coordinator};

/// The tenant token requests may carry (`auth` 1), and the admin's (`auth` 2).
pub const TENANT_TOKEN: &str = "fuzz-tenant-token";
pub const ADMIN_TOKEN: &str = "fuzz-admin-token";

pub struct Harness {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _coordinator: Arc<Coordinator>,
}

impl Harness {
    /// A ckptd whose state lives under `dir`, with small limits so large inputs meet them.
    pub fn new(dir: &Path) -> Harness {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        let tenant = |name: &str, token: &str, prefix: &str, admin: bool| TenantConfig {
            name: name.into(),
            token_blake3: vec![blake3::hash(token.as_bytes()).to_hex().to_string()],
            job_prefixes: vec![prefix.into()],
            admin,
            client_cert_names: vec![],
            uid: None,
            quota: TenantQuota { requests_per_s: Some(1_000_000), ..TenantQuota::default() },
        };
        let config = Config {
            store: "memory://".into(),
            data_dir: dir.to_path_buf(),
            chunk_bytes_max: 1 << 16,
            shard_index_bytes_max: 1 << 16,
            staging_memory_bytes_max: 1 << 20,
            staging_spill_bytes_max: 1 << 20,
            busy_wait_ms: 50,
            status_wait_ms_max: 10,
            segments_max: 0,
            tenants: vec![tenant("t", TENANT_TOKEN, "t", false), tenant("admin", ADMIN_TOKEN, "", true)],
            ..Config::default()
        };
        config.validate().expect("the harness's config is valid");
        let (router, coordinator) = runtime.block_on(async {
            let store = crate::store::Store::open(&config.store, &config.store_options, 2, Default::default())
                .expect("a memory store");
            crate::durable::ensure_dir(&config.data_dir).expect("the data dir");
            crate::durable::ensure_dir(&config.handoff_dir()).expect("the handoff dir");
            crate::prepare_tenant_dirs(&config.handoff_dir(), &config.tenants).expect("the tenants' handoff dirs");
            let index =
                crate::index::Index::open(&config.data_dir.join("index"), 16 << 20, config.counts_stored_bytes())
                    .expect("the index");
            let coordinator = Coordinator::start(store, index, config.clone());
            coordinator.recover().await.expect("recovery of an empty store");
            let (_, router) = crate::app(coordinator.clone(), &config, None);
            (router, coordinator)
        });
        Harness { runtime, router, _coordinator: coordinator }
    }

    /// One raw fuzz input as a request, laid out `[method][auth][target length][target][body]`;
    /// inputs that cannot be a request target are skipped.
    pub fn check_bytes(&self, data: &[u8]) {
        let [method, auth, len, rest @ ..] = data else { return };
        let len = (*len as usize).min(rest.len());
        let (target, body) = rest.split_at(len);
        let Ok(target) = std::str::from_utf8(target) else { return };
        if target.starts_with('/') {
            self.check(*method, target, *auth, body);
        }
    }

    /// Sends one request and checks the property; returns the status.
    pub fn check(&self, method: u8, path: &str, auth: u8, body: &[u8]) -> u16 {
        let method = ["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"][method as usize % 6];
        let Ok(uri) = path.parse::<axum::http::Uri>() else { return 0 };
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        match auth % 4 {
            1 => req = req.header("authorization", format!("Bearer {TENANT_TOKEN}")),
            2 => req = req.header("authorization", format!("Bearer {ADMIN_TOKEN}")),
            3 => req = req.header("authorization", "Bearer forged"),
            _ => {}
        }
        if !body.is_empty() {
            req = req.header("content-length", body.len());
        }
        let req = req.body(Body::from(body.to_vec())).expect("a request");
        let router = self.router.clone();
        let (status, body) = self.runtime.block_on(async move {
            let resp = tokio::time::timeout(std::time::Duration::from_secs(10), router.oneshot(req))
                .await
                .expect("ckptd answered within 10 s")
                .expect("the router is infallible");
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap_or_default();
            (status, body)
        });
        assert!(status < 500 || status == 503, "{method} {path} answered {status}: {}", String::from_utf8_lossy(&body));
        let bare = path.split('?').next().unwrap_or("");
        let public = ["/healthz", "/readyz", "/openapi.json"].contains(&bare);
        if auth % 4 == 0 || auth % 4 == 3 {
            assert!(public || status == 401, "{method} {path} without a valid token answered {status}");
        }
        if auth % 4 == 1 && (200..300).contains(&status) {
            let admin = ["/v1/stats", "/metrics", "/v1/gc", "/v1/faults"].contains(&bare);
            assert!(!admin, "{method} {path}: the tenant's token passed an admin route");
            let segments: Vec<&str> = bare.split('/').collect();
            if let ["", "v1", "jobs", job, _, ..] = segments.as_slice() {
                let job = percent_decode(job);
                assert!(job.starts_with('t'), "{method} {path}: the tenant reached job {job:?}");
            }
        }
        if (400..500).contains(&status) && method != "HEAD" {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("{method} {path} {status}: not JSON ({e}): {:?}", String::from_utf8_lossy(&body))
            });
            assert!(v["error"]["code"].is_string(), "{method} {path} {status}: {v}");
        }
        status
    }
}

/// `%XX` escapes decoded (bytes that are not UTF-8 replaced), as the router decodes a segment.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
