//! ckptd's metrics, through OpenTelemetry's global meter (`ckpt_telemetry` installs the
//! provider: Prometheus text at `/metrics`, OTLP when configured).
//!
//! Design note.
//! * Counts ckptd already keeps (staging and upload counters, `/v1/stats`) are exposed as
//!   observable instruments read at collection time, not counted twice.
//! * Events with a duration are histograms recorded where they happen; the instruments live in
//!   one lazily created set, made on first use (after `ckptd` installed the provider; before
//!   that, or in a library user without one, they are no-ops).

use std::sync::{Arc, LazyLock, Weak};

use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableCounter, ObservableGauge};
use opentelemetry::KeyValue;

use crate::coordinator::Coordinator;

fn meter() -> Meter {
    opentelemetry::global::meter("ckptd")
}

/// Instruments recorded at the events they measure.
pub(crate) struct Metrics {
    /// Bytes of chunks received over HTTP and staged.
    pub staged_bytes: Counter<u64>,
    /// Chunk bytes served to restores over HTTP.
    pub served_bytes: Counter<u64>,
    /// Store calls retried after a transient error, by operation.
    pub store_retries: Counter<u64>,
    /// Saves aborted because another writer committed different bytes for the step.
    pub commit_conflicts: Counter<u64>,
    /// Chunks whose bytes did not match their address, by where (`upload`, `read`).
    pub verification_failures: Counter<u64>,
    pub saves_committed: Counter<u64>,
    /// Receiving, verifying and staging one chunk (the client's wait for its ack).
    pub stage_seconds: Histogram<f64>,
    /// From a chunk staged to it durable in the store.
    pub durable_seconds: Histogram<f64>,
    /// Writing a save's missing index objects and its root.
    pub commit_seconds: Histogram<f64>,
    /// Serving one chunk to a restore (read, decode, verify).
    pub restore_chunk_seconds: Histogram<f64>,
}

pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = meter();
    let seconds = |name: &'static str, what: &'static str| {
        m.f64_histogram(name)
            .with_unit("s")
            .with_description(what)
            .with_boundaries(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ])
            .build()
    };
    Metrics {
        staged_bytes: m.u64_counter("ckpt_staged").with_unit("By").with_description("chunk bytes staged").build(),
        served_bytes: m
            .u64_counter("ckpt_served")
            .with_unit("By")
            .with_description("chunk bytes served to restores")
            .build(),
        store_retries: m.u64_counter("ckpt_store_retries").with_description("store calls retried").build(),
        commit_conflicts: m
            .u64_counter("ckpt_commit_conflicts")
            .with_description("saves aborted: another writer committed different bytes")
            .build(),
        verification_failures: m
            .u64_counter("ckpt_verification_failures")
            .with_description("chunks whose bytes did not match their address")
            .build(),
        saves_committed: m.u64_counter("ckpt_saves_committed").with_description("saves committed").build(),
        stage_seconds: seconds("ckpt_stage_duration", "receive, verify and stage one chunk"),
        durable_seconds: seconds("ckpt_durable_duration", "from a chunk staged to it durable in the store"),
        commit_seconds: seconds("ckpt_commit_duration", "write a save's index objects and root"),
        restore_chunk_seconds: seconds("ckpt_restore_chunk_duration", "serve one chunk to a restore"),
    }
});

/// Observable instruments over the coordinator's own counters. Keep the handles as long as the
/// coordinator serves.
pub(crate) struct Observed {
    _gauges: Vec<ObservableGauge<u64>>,
    _counters: Vec<ObservableCounter<u64>>,
}

type Read = fn(&Coordinator) -> u64;

pub(crate) fn observe(c: &Arc<Coordinator>) -> Observed {
    let m = meter();
    let gauge = |name: &'static str, unit: &'static str, what: &'static str, read: Read| {
        let weak: Weak<Coordinator> = Arc::downgrade(c);
        m.u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(what)
            .with_callback(move |o| {
                if let Some(c) = weak.upgrade() {
                    o.observe(read(&c), &[]);
                }
            })
            .build()
    };
    let counter = |name: &'static str, unit: &'static str, what: &'static str, attrs: Vec<KeyValue>, read: Read| {
        let weak: Weak<Coordinator> = Arc::downgrade(c);
        m.u64_observable_counter(name)
            .with_unit(unit)
            .with_description(what)
            .with_callback(move |o| {
                if let Some(c) = weak.upgrade() {
                    o.observe(read(&c), &attrs);
                }
            })
            .build()
    };
    Observed {
        _gauges: vec![
            gauge("ckpt_staging_memory", "By", "chunk bytes held in staging memory", |c| {
                c.staging().stats().memory_bytes
            }),
            gauge("ckpt_staging_spill", "By", "chunk bytes staged on the spill disk", |c| {
                c.staging().stats().spill_bytes
            }),
            gauge("ckpt_upload_queue_depth", "", "staged chunks waiting for their upload", |c| {
                c.staging().stats().chunks_pending
            }),
            gauge("ckpt_saves_in_flight", "", "saves open", |c| c.saves_in_flight() as u64),
            gauge(
                "ckpt_index_set_aside",
                "",
                "1 when this process's start set a damaged index aside and rebuilt it from the store",
                |c| c.start_report().is_some_and(|r| r.index_set_aside).into(),
            ),
            gauge("ckpt_index_damaged", "", "1 once the index met damage (ckptd is then stopping)", |c| {
                c.index_damage().is_some().into()
            }),
        ],
        _counters: vec![
            counter("ckpt_uploaded", "By", "bytes uploaded to the store, as stored", vec![], |c| {
                c.staging().stats().stored_bytes_uploaded
            }),
            counter("ckpt_uploaded_raw", "By", "chunk bytes uploaded to the store, before encoding", vec![], |c| {
                c.staging().stats().raw_bytes_uploaded
            }),
            counter("ckpt_chunks_uploaded", "", "chunks uploaded to the store", vec![], |c| {
                c.staging().stats().chunks_uploaded
            }),
            counter("ckpt_upload_retries", "", "chunk uploads retried", vec![], |c| c.staging().stats().upload_retries),
            counter("ckpt_busy_rejections", "", "requests answered 503 (staging full)", vec![], |c| {
                c.staging().stats().busy_rejections
            }),
        ],
    }
}
