//! The trainer's metrics, through OpenTelemetry like ckptd's: pushed over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and written at exit as Prometheus text to
//! `<run_dir>/metrics/<who>.prom` (for node_exporter's textfile collector; a rank that is
//! killed writes nothing, its OTLP pushes are what survive).
//!
//! Ranks record step times and checkpoint waits from their event log (one place: every
//! event a rank writes passes `record`); the launcher records the run's goodput.

use std::path::Path;
use std::sync::LazyLock;

use opentelemetry::metrics::{Gauge, Histogram};
use opentelemetry::KeyValue;

struct Instruments {
    step_seconds: Histogram<f64>,
    checkpoint_wait_seconds: Histogram<f64>,
    checkpoint_stall_seconds: Histogram<f64>,
    effective_training_time: Gauge<f64>,
    steps: Gauge<u64>,
    interruptions: Gauge<u64>,
}

static METRICS: LazyLock<Instruments> = LazyLock::new(|| {
    let m = opentelemetry::global::meter("ckpt-train");
    let seconds = |name: &'static str, what: &'static str| {
        m.f64_histogram(name)
            .with_unit("s")
            .with_description(what)
            .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            .build()
    };
    Instruments {
        step_seconds: seconds("ckpt_train_step_duration", "one training step on one rank"),
        checkpoint_wait_seconds: seconds(
            "ckpt_train_checkpoint_wait",
            "what one checkpoint cost the rank's step: waiting for the previous save, the buffer, the copy",
        ),
        checkpoint_stall_seconds: seconds("ckpt_train_checkpoint_stall", "the copy into the staging buffer"),
        effective_training_time: m
            .f64_gauge("ckpt_train_effective_training_time")
            .with_unit("1")
            .with_description("productive step time over wall time (goodput), 0 to 1")
            .build(),
        steps: m.u64_gauge("ckpt_train_steps").with_description("steps kept and executed").build(),
        interruptions: m.u64_gauge("ckpt_train_interruptions").with_description("interruptions of the run").build(),
    }
});

/// Records what a rank's event says (steps and saves; other kinds carry no metric).
pub fn record(event: &serde_json::Value) {
    let ms = |k: &str| event[k].as_f64().map(|v| v / 1e3);
    match event["kind"].as_str() {
        Some("step") => {
            if let Some(s) = ms("step_ms") {
                let in_flight = if event["in_flight"].as_bool().unwrap_or(false) { "yes" } else { "no" };
                METRICS.step_seconds.record(s, &[KeyValue::new("save_in_flight", in_flight)]);
            }
        }
        Some("save") => {
            // A step that took a checkpoint logs its time here, not in a "step" event.
            if let Some(s) = ms("step_ms") {
                METRICS.step_seconds.record(s, &[KeyValue::new("save_in_flight", "checkpoint")]);
            }
            if let Some(s) = ms("wait_ms") {
                METRICS.checkpoint_wait_seconds.record(s, &[]);
            }
            if let Some(s) = ms("stall_ms") {
                METRICS.checkpoint_stall_seconds.record(s, &[]);
            }
        }
        _ => {}
    }
}

/// Records the run's goodput (the launcher, once the run ended).
pub fn record_report(r: &crate::report::Report) {
    let job = KeyValue::new("job", r.job.clone());
    METRICS.effective_training_time.record(r.effective_training_time_pct / 100.0, std::slice::from_ref(&job));
    METRICS.steps.record(r.final_step, &[job.clone(), KeyValue::new("steps", "kept")]);
    METRICS.steps.record(r.steps_executed as u64, &[job.clone(), KeyValue::new("steps", "executed")]);
    METRICS.interruptions.record(r.interruptions.len() as u64, &[job]);
}

/// Writes the process's metrics as Prometheus text to `<run_dir>/metrics/<who>.prom`
/// (through a temporary name, so a collector never reads half a file).
pub fn write_prom(t: &ckpt_telemetry::Telemetry, run_dir: &Path, who: &str) {
    let dir = run_dir.join("metrics");
    let result = t.prometheus_text().map_err(|e| e.to_string()).and_then(|text| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".{who}.prom.tmp"));
        std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dir.join(format!("{who}.prom"))).map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot write the metrics file");
    }
}
