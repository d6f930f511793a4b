//! ckptd: the ckpt checkpoint service.
//!
//! Ranks hand ckptd their shards over HTTP; ckptd verifies every chunk against its content
//! address, makes it durable in an object store, and commits a step by creating its manifest
//! once every rank's shard index is in (a small root naming one index object per rank). See ARCHITECTURE.md for the data path and invariants.

pub mod adopt;
pub mod api;
pub mod auth;
mod bodies;
mod commit;
pub mod config;
pub mod coordinator;
mod crl;
pub mod durable;
pub mod encoders;
pub mod error;
pub mod faults;
pub mod fuzzing;
pub mod gc;
mod gc_lock;
pub mod index;
mod intake;
mod metrics;
pub mod openapi;
mod parts;
mod reads;
pub mod ready;
mod recovery;
pub mod segments;
pub mod staging;
pub mod store;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
pub use coordinator::Coordinator;
pub use error::ServiceError;
pub use intake::{AdoptSource, SegmentChunk};

/// Locks `dir` while the returned lock lives (the coordinator holds it, so as long as any task
/// that may write the index): one ckptd per data directory. sled locks its own files too, but only after reading its config, so a
/// damaged config read while another ckptd runs would look like damage, and two ckptds starting
/// at once on a damaged index could each set the other's new one aside.
fn lock_data_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, ServiceError> {
    let path = dir.join("ckptd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ServiceError::Startup(format!("cannot open {}: {e}", path.display())))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            // The pid recorded there is named only if that process is alive.
            let holder = std::fs::read_to_string(dir.join("ckptd.pid"))
                .ok()
                .map(|p| p.trim().to_string())
                .filter(|p| p.parse::<u32>().is_ok_and(|n| n != std::process::id()))
                .filter(|p| std::path::Path::new("/proc").join(p).exists());
            Err(ServiceError::Startup(format!(
                "another ckptd{} is running on the data directory {} (it holds {})",
                holder.map(|p| format!(", pid {p},")).unwrap_or_default(),
                dir.display(),
                path.display()
            )))
        }
        Err((_, e)) => Err(ServiceError::Startup(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// Makes the node's id outlive its index: `<data_dir>/node_id` holds it (written, durably, from
/// the index's the first time), and the index is given it. Leases and GC locks are named by it,
/// and a node that came back under a new one would leave its own GC locks to lapse (hours)
/// instead of releasing them at start.
async fn keep_node_id(data_dir: &std::path::Path, index: &index::Index) -> Result<(), ServiceError> {
    let (path, index) = (data_dir.join("node_id"), index.clone());
    tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
        let kept = std::fs::read_to_string(&path).ok().map(|s| s.trim().to_string());
        match kept.filter(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
            Some(id) => index.set_node_id(&id)?,
            None => {
                let id = index.node_id()?;
                durable::write_new(&path, |f| std::io::Write::write_all(f, format!("{id}\n").as_bytes()))?;
            }
        }
        Ok(())
    })
    .await
    .map_err(error::join_error)?
}

/// Opens the index in `<data_dir>/index`; true when a damaged one was set aside first (see
/// `Config::on_damaged_index`). The new index describes no store, so recovery rebuilds it.
async fn open_index(config: &Config) -> Result<(index::Index, bool), ServiceError> {
    let dir = config.data_dir.join("index");
    let (cache_bytes, count_stored_bytes) = (config.index_cache_bytes_max, config.counts_stored_bytes());
    let open = |dir: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || index::Index::open(&dir, cache_bytes, count_stored_bytes))
    };
    let damage = match open(dir.clone()).await {
        Ok(Ok(i)) => return Ok((i, false)),
        Ok(Err(e)) if e.is_damage() => e.to_string(),
        // sled panics on some damage rather than returning it.
        Err(join) if join.is_panic() => "sled panicked reading it".to_string(),
        Err(join) => return Err(error::join_error(join)),
        Ok(Err(e)) => {
            return Err(ServiceError::Startup(format!("cannot open the index in {}: {e}", config.data_dir.display())))
        }
    };
    if config.on_damaged_index == config::DamagedIndex::Refuse {
        return Err(ServiceError::Startup(format!(
            "the index in {} is damaged ({damage}) and on_damaged_index is \"refuse\": move it away (or set \
             \"rebuild\") and start again to rebuild it from the store, which holds every committed checkpoint \
             and fence; saves in flight are forgotten and their ranks send them again",
            dir.display()
        )));
    }
    let from = dir.clone();
    let aside = tokio::task::spawn_blocking(move || {
        // Where `index` is a link (the index on a disk of its own), what it names is set aside,
        // beside it under its own name (`<name>.damaged`: the directory it is in may hold other
        // nodes' indexes), and the new index made there, so it stays on that disk.
        let from = match std::fs::symlink_metadata(&from) {
            Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(&from)
                .map_err(|e| format!("cannot resolve the index link {}: {e}", from.display()))?,
            _ => from,
        };
        let name = from.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let to = from.with_file_name(format!("{name}.damaged"));
        // One damaged copy is kept, the newest: a disk that keeps damaging it cannot fill up.
        match std::fs::symlink_metadata(&to) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&to),
            Ok(_) => std::fs::remove_file(&to),
            Err(_) => Ok(()),
        }
        .map_err(|e| format!("cannot remove the older {}: {e}", to.display()))?;
        // A mount point cannot be renamed (EBUSY): the operator moves its contents.
        durable::rename_into_place(&from, &to).map_err(|e| e.to_string())?;
        durable::ensure_dir(&from).map_err(|e| e.to_string())?;
        Ok::<_, String>(to)
    })
    .await
    .map_err(error::join_error)?
    .map_err(|e| ServiceError::Startup(format!("cannot set the damaged index aside: {e}")))?;
    tracing::error!(
        damage,
        set_aside = %aside.display(),
        "the index is damaged; set aside and rebuilt from the store (committed checkpoints and fences are kept, saves in flight are forgotten)"
    );
    match open(dir.clone()).await.map_err(error::join_error)? {
        Ok(i) => Ok((i, true)),
        Err(e) => Err(ServiceError::Startup(format!("cannot open a new index in {}: {e}", config.data_dir.display()))),
    }
}

/// A coordinator over `index`, recovered: ready to serve.
async fn start_and_recover(
    store: &store::Store,
    index: &index::Index,
    config: &Config,
) -> Result<(Arc<Coordinator>, coordinator::RecoveryReport), ServiceError> {
    keep_node_id(&config.data_dir, index).await?;
    let coordinator = Coordinator::start(store.clone(), index.clone(), config.clone());
    let report = coordinator.recover().await?;
    Ok((coordinator, report))
}

/// Opens the store and the index, recovers, serves until SIGTERM or Ctrl-C, and shuts down
/// gracefully: no new connections, in-flight requests get `shutdown_grace_s`, the index is
/// flushed. `telemetry` (the process's, if it set one up) backs `/metrics`.
pub async fn serve(config: Config, telemetry: Option<Arc<ckpt_telemetry::Telemetry>>) -> Result<(), ServiceError> {
    serve_until(config, telemetry, shutdown_signal()).await
}

/// How long a shutdown waits for stopped GC runs to release their locks (one delete each).
const GC_STOP_WAIT: Duration = Duration::from_secs(10);

/// `serve` until `stop` completes (for embedding ckptd in another process, and tests), or
/// until a request meets damage in the index: then it stops the same way and returns that
/// damage as its error. The index is marked, and the next start of a new process sets it
/// aside: not a second call in this one, where the stopped service may still hold the old
/// index open while its directory is renamed.
pub async fn serve_until(
    config: Config,
    telemetry: Option<Arc<ckpt_telemetry::Telemetry>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ServiceError> {
    config.validate().map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    // The port first: a taken or malformed address is reported before anything touches the
    // disk (the data directory, the index, recovery).
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| ServiceError::Startup(format!("cannot listen on {}: {e}", config.listen)))?;
    // TLS files next, also before the disk: a certificate, key or revocation list that cannot
    // be used stops the start here, never after the address file has announced a ready node.
    // (The revocation lists' floor is only read from the data directory here; it is written
    // once the index is open, which proves this node owns the directory.)
    let (tls, reload) = match &config.tls {
        Some(t) => {
            let (acceptor, guard) = tls::acceptor(t, &config.data_dir.join("crl-floor.json"))?;
            (Some(acceptor), Some(guard))
        }
        None => (None, None),
    };
    let store = store::Store::open(
        &config.store,
        &config.store_options,
        config.store_attempts_max,
        Duration::from_millis(config.store_retry_base_ms),
    )?;
    let store = if config.fault_injection {
        tracing::warn!("fault injection is on: POST /v1/faults can make store calls fail");
        let store = store.with_faults();
        if let Some(f) = store.faults() {
            for req in &config.fault_plan {
                f.arm(req.clone()).map_err(|e| ServiceError::BadRequest(format!("fault_plan: {e}")))?;
            }
        }
        store
    } else {
        store
    };
    if store.local_root().is_none() && config.store != "memory://" {
        store.check_create_only().await?;
    }
    durable::ensure_dir(&config.data_dir)?;
    durable::ensure_dir(&config.handoff_dir())?;
    prepare_tenant_dirs(&config.handoff_dir(), &config.tenants)?;
    if !config.tenants.is_empty() && config.tls.is_none() && !listener.local_addr()?.ip().is_loopback() {
        tracing::warn!("tenants without [tls]: bearer tokens cross the network in clear text");
    }
    let pid_file = config.data_dir.join("ckptd.pid");
    let locking = config.data_dir.clone();
    let data_dir_lock =
        tokio::task::spawn_blocking(move || lock_data_dir(&locking)).await.map_err(error::join_error)??;
    let (index, index_set_aside) = open_index(&config).await?;
    if let Some(r) = &reload {
        r.own_floor().await?;
    }
    if let Err(e) = std::fs::write(&pid_file, format!("{}\n", std::process::id())) {
        tracing::warn!(error = %e, path = %pid_file.display(), "cannot record this process's pid");
    }
    // Damage met past the open (in the chunk records) marked the index; it is not set aside
    // in this process, whose coordinator would still hold the old sled, which finds its files by
    // the path the new index takes. The next start does it.
    let started = start_and_recover(&store, &index, &config).await;
    // Damage may also be met by a task or a fallback that does not fail recovery.
    if let Some(damage) = index.damage_found() {
        let failed = started.err().map(|e| format!("; {e}")).unwrap_or_default();
        return Err(ServiceError::Startup(format!(
            "start-up met a damaged index ({damage}{failed}); it is marked, and the next start deals with it as \
             on_damaged_index says"
        )));
    }
    let (coordinator, mut report) = started?;
    let _ = coordinator.data_dir_lock.set(data_dir_lock);
    report.index_set_aside = index_set_aside;
    tracing::info!(store = store.description(), ?report, "recovered");
    let _ = coordinator.started.set(report);
    // The segment socket does not authenticate: with tenants, the path is off.
    if config.segments_max > 0 && store.local_root().is_some() && config.tenants.is_empty() {
        if let Some(p) = segments::listen(&config.data_dir.join("segments.sock"), coordinator.segments.clone()) {
            let _ = coordinator.segment_socket.set(p);
        }
    }

    let addr = listener.local_addr()?;
    let _observed = metrics::observe(&coordinator);
    let (state, app) = app(coordinator.clone(), &config, telemetry);
    if let Some(path) = &config.addr_file {
        // Written via a rename so a reader never sees a half-written address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(%addr, "ckptd listening");
    if let Some(t) = &config.tls {
        tracing::info!(cert = %t.cert.display(), mutual = t.client_ca.is_some(), crl = t.client_crl.is_some(), "serving TLS only");
    }

    let serving = Serving {
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        write_stall: Duration::from_millis(config.body_progress_timeout_ms),
        max_age: (config.connection_max_age_s > 0).then(|| Duration::from_secs(config.connection_max_age_s)),
        grace: Duration::from_secs(config.shutdown_grace_s),
        connections_max: config.connections_max,
    };
    let gc = coordinator.clone();
    let detached = state.detached_tasks.clone();
    let watched = index.clone();
    let shutdown = async move {
        // Damage a request met stops ckptd as a shutdown would: the index is marked, and the
        // next start (a supervisor's restart) sets it aside and rebuilds it from the store.
        tokio::select! {
            () = stop => tracing::info!("shutdown requested; finishing in-flight requests"),
            damage = watched.damaged() => tracing::error!(
                damage,
                "the index is damaged: ckptd stops, finishing in-flight requests; its next start deals with the \
                 marked index as on_damaged_index says (by default, sets it aside and rebuilds it from the store)"
            ),
        }
        state.shutting_down.store(true, Ordering::Relaxed);
        // GC runs can last hours, longer than any grace: they stop now, while the store is
        // reachable to take their locks back, and their requests are answered.
        gc.stop_gc_runs();
    };
    let grace = serving.grace;
    http_serve(listener, app, tls, serving, shutdown).await;
    // Requests whose clients left run on detached from any connection: they too get the grace
    // period to end before the journal's last flush.
    detached.close();
    if tokio::time::timeout(grace, detached.wait()).await.is_err() {
        tracing::warn!(left = detached.len(), "requests whose clients left did not end within the grace period");
    }
    let left = coordinator.gc_runs_ended(GC_STOP_WAIT).await;
    if !left.is_empty() {
        tracing::warn!(?left, "GC runs did not release their locks in time; the next start of this node will");
    }
    // Pointless once damaged, and sled may be left half-way by what it met: not waited for.
    let flushed = match index.damage_found() {
        None => index.flush().await,
        Some(_) => Ok(()),
    };
    let _ = std::fs::remove_file(&pid_file);
    if let Some(damage) = index.damage_found() {
        tracing::error!("ckptd stopped on a damaged index");
        return Err(index::IndexError::Damaged { at: "met while serving".into(), reason: damage }.into());
    }
    flushed?;
    tracing::info!("ckptd stopped");
    Ok(())
}

/// Makes `<handoff>/tenants` (0711) and each tenant's directory in it (0700, owned by its
/// `uid`), without following links: a link or a file planted at either name stops start-up.
/// Modes and owners are set through the opened directory, never through its name.
fn prepare_tenant_dirs(handoff: &std::path::Path, tenants: &[config::TenantConfig]) -> Result<(), ServiceError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if tenants.is_empty() {
        return Ok(());
    }
    let private = |dir: &std::path::Path, mode: u32, uid: Option<u32>| -> Result<(), ServiceError> {
        let fail = |why: String| ServiceError::Startup(format!("handoff directory {}: {why}", dir.display()));
        match std::fs::symlink_metadata(dir) {
            Ok(m) if !m.file_type().is_dir() => return Err(fail("exists and is not a directory (a link?)".into())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(mode).create(dir).map_err(|e| fail(e.to_string()))?;
            }
            Err(e) => return Err(fail(e.to_string())),
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)
            .map_err(|e| fail(e.to_string()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| fail(e.to_string()))?;
        if let Some(uid) = uid {
            std::os::unix::fs::fchown(&f, Some(uid), None).map_err(|e| {
                fail(format!("cannot give it to uid {uid} ({e}); a tenant's uid needs ckptd to run as root"))
            })?;
        }
        Ok(())
    };
    let root = handoff.join("tenants");
    private(&root, 0o711, None)?;
    for t in tenants {
        private(&root.join(&t.name), 0o700, t.uid)?;
    }
    durable::ensure_dir(&root)?;
    Ok(())
}

/// The API over `coordinator`: its state (tenants from `config`) and its router, traced.
fn app(
    coordinator: Arc<Coordinator>,
    config: &Config,
    telemetry: Option<Arc<ckpt_telemetry::Telemetry>>,
) -> (Arc<api::AppState>, axum::Router) {
    let tenants = Arc::new(auth::Tenants::new(&config.tenants, &auth::NodeSlots::of(config)));
    if !tenants.is_open() {
        tracing::info!(tenants = tenants.all().len(), "tenants configured: requests must authenticate");
    }
    let ready = ready::Readiness::new(Duration::from_millis(config.ready_probe_timeout_ms), config.data_dir.clone());
    let state = Arc::new(api::AppState {
        coordinator,
        shutting_down: AtomicBool::new(false),
        telemetry,
        tenants,
        ready,
        detached: Arc::new(tokio::sync::Semaphore::new(config.connections_max)),
        detached_tasks: tokio_util::task::TaskTracker::new(),
    });
    let router =
        api::router(state.clone()).layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span));
    (state, router)
}

/// The span of one HTTP request, a child of the caller's W3C trace context when it sends one
/// (a save's requests carry the save's trace, `ckpt_core::trace`).
fn request_span<B>(req: &hyper::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path());
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
    let _ = span.set_parent(parent);
    span
}

struct HeaderExtractor<'a>(&'a hyper::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Whether the test-only failpoint `name` is armed (`FAILPOINTS=name=return`): the switches
/// the power-loss audit and the GC lock tests throw (skip an fsync, skip a lock rewrite).
/// Always false in a build without the `failpoints` feature, where the macro is empty.
pub(crate) fn switch_armed(name: &str) -> bool {
    let _ = name;
    fail::fail_point!(name, |_| true);
    false
}

/// The save's trace as a parent context, for spans ckptd makes outside any request of it
/// (a commit that runs when the last upload lands).
pub(crate) fn save_context(job: &str, step: u64) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    let sc = SpanContext::new(
        TraceId::from_bytes(ckpt_core::trace::save_trace_id(job, step)),
        SpanId::from_bytes(ckpt_core::trace::save_span_id(job, step, u32::MAX)),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// Serves HTTP/1 on `listener` until `shutdown` completes, then stops accepting and gives the
/// open connections `grace` to finish their requests. axum::serve cannot set a header read
/// timeout, so connections are served with hyper's own builder: a client that opens
/// connections and sends half a request head would otherwise hold a connection and a task
/// each, forever. Nor can a client that stops reading its answers: a write that makes no
/// progress for `write_stall` closes the connection (hyper has no write timeout). A connection
/// older than `max_age` is closed after its request in flight, so the client connects again
/// and shows its certificate again. At most `connections_max` are served at once; the rest
/// wait in the listen backlog.
async fn http_serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    serving: Serving,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let Serving { header_read_timeout, write_stall, max_age, grace, connections_max } = serving;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout);
    let (stop, connections) = (tokio_util::sync::CancellationToken::new(), tokio_util::task::TaskTracker::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(connections_max));
    let mut warned: Option<std::time::Instant> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        connections_max,
                        "serving connections_max connections; new ones wait in the backlog"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the connection slots are never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(write_stall));
                    Box::pin(stream)
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (stop, http, tls) = (stop.clone(), http.clone(), tls.clone());
        // Its requests can close it (an answer not taken by its deadline, `bodies.rs`).
        let cut = tokio_util::sync::CancellationToken::new();
        let app = tower_http::add_extension::AddExtension::new(app.clone(), bodies::ConnectionCut(cut.clone()));
        connections.spawn(async move {
            let _slot = slot;
            let ended = match tls {
                None => {
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    serve_connection(conn, &stop, &cut, max_age).await
                }
                Some(acceptor) => {
                    // The handshake is bounded like a request head: a client that connects and
                    // stalls holds only this task, and not for long.
                    let stream = match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tls::log_handshake_failure(&e);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("tls handshake timed out");
                            return;
                        }
                    };
                    let names = tls::peer_names(stream.get_ref().1).unwrap_or(auth::PeerCertNames(Vec::new()));
                    let app = tower_http::add_extension::AddExtension::new(app, names);
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    serve_connection(conn, &stop, &cut, max_age).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!(grace_s = grace.as_secs(), "grace period over; dropping remaining requests");
    }
}

/// How connections are served (from the config; see `http_serve`).
struct Serving {
    header_read_timeout: Duration,
    write_stall: Duration,
    max_age: Option<Duration>,
    grace: Duration,
    connections_max: usize,
}

/// Drives one connection until it ends, or until ckptd stops or the connection reaches
/// `max_age`: then it is closed once the request in flight (if any) is answered. One of its
/// requests cutting it closes it at once, its answer cut short.
async fn serve_connection<I, S, B>(
    conn: hyper::server::conn::http1::Connection<I, S>,
    stop: &tokio_util::sync::CancellationToken,
    cut: &tokio_util::sync::CancellationToken,
    max_age: Option<Duration>,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let aged = async {
        match max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = cut.cancelled() => return Ok(()),
        _ = stop.cancelled() => {}
        _ = aged => tracing::debug!("connection reached connection_max_age_s; closing it after its request"),
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        ended = conn.as_mut() => ended,
        _ = cut.cancelled() => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
