//! ckptd: the ckpt checkpoint service.
//!
//! Ranks hand ckptd their shards over HTTP; ckptd verifies every chunk against its content
//! address, makes it durable in an object store, and commits a step by creating its manifest
//! once every rank's shard index is in. See ARCHITECTURE.md for the data path and invariants.

pub mod adopt;
pub mod api;
pub mod config;
pub mod coordinator;
pub mod durable;
pub mod error;
pub mod index;
pub mod staging;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
pub use coordinator::Coordinator;
pub use error::ServiceError;

/// Opens the store and the index, recovers, serves until SIGTERM or Ctrl-C, and shuts down
/// gracefully: no new connections, in-flight requests get `shutdown_grace_s`, the index is
/// flushed.
pub async fn serve(config: Config) -> Result<(), ServiceError> {
    config.validate().map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    let store = store::Store::open(
        &config.store,
        config.store_attempts_max,
        Duration::from_millis(config.store_retry_base_ms),
    )?;
    durable::ensure_dir(&config.data_dir)?;
    durable::ensure_dir(&config.handoff_dir())?;
    let data_dir = config.data_dir.clone();
    let index = tokio::task::spawn_blocking(move || index::Index::open(&data_dir.join("index")))
        .await
        .map_err(error::join_error)??;
    let coordinator = Coordinator::start(store.clone(), index.clone(), config.clone());
    let report = coordinator.recover().await?;
    tracing::info!(store = store.description(), ?report, "recovered");

    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(api::AppState { coordinator, shutting_down: AtomicBool::new(false) });
    let app = api::router(state.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
    if let Some(path) = &config.addr_file {
        // Written via a rename so a reader never sees a half-written address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(%addr, "ckptd listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown_state = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        shutdown_state.shutting_down.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        tracing::info!("shutdown requested; finishing in-flight requests");
    });
    let grace = Duration::from_secs(config.shutdown_grace_s);
    let mut stop_rx2 = stop_rx.clone();
    tokio::select! {
        r = server => r?,
        _ = async move {
            let _ = stop_rx2.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(grace_s = config.shutdown_grace_s, "grace period over; dropping remaining requests"),
    }
    index.flush().await?;
    tracing::info!("ckptd stopped");
    Ok(())
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
