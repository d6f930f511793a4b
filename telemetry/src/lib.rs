//! ckpt-telemetry: OpenTelemetry for ckpt's processes (ckptd, the trainer).
//!
//! Design note.
//! * One SDK per process, installed as OpenTelemetry's global providers, so instruments are
//!   created where they are used (`opentelemetry::global::meter`) and cost nothing before
//!   `init` or when nothing reads them.
//! * Metrics always go to a Prometheus registry (ckptd serves it at `/metrics`); with
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` set they are also pushed over OTLP/HTTP (protobuf), and so are
//!   spans: `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry`. The rest
//!   of the standard `OTEL_*` variables (headers, timeouts, `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`) are read by the SDK.
//! * Export runs on the SDK's own threads (batch span processor, periodic metric reader), off
//!   the async runtime; a collector that is down costs dropped telemetry, never a stalled save.
//! * One save is one trace: every request of the save carries a W3C `traceparent` whose trace
//!   id is derived from (job, step) (`ckpt_core::trace`), so the spans of all ranks, on all
//!   ckptd nodes, join one trace without any coordination.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
    #[error("cannot encode metrics: {0}")]
    Encode(String),
}

/// The process's telemetry: keep it alive for the process's life and call `shutdown` at the
/// end to flush what the OTLP exporters hold.
pub struct Telemetry {
    registry: prometheus::Registry,
    meters: SdkMeterProvider,
    tracer: SdkTracerProvider,
    otlp_endpoint: Option<String>,
}

impl Telemetry {
    /// Installs the global meter and tracer providers and the W3C trace-context propagator.
    /// `service` names the process (`OTEL_SERVICE_NAME` wins).
    pub fn init(service: &str) -> Result<Telemetry, TelemetryError> {
        let name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| service.into());
        let resource = Resource::builder().with_service_name(name).build();
        let registry = prometheus::Registry::new();
        let prom = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prom);
        let mut tracer = SdkTracerProvider::builder().with_resource(resource);
        let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|s| !s.is_empty());
        if let Some(endpoint) = &otlp_endpoint {
            let otlp = |reason: String| TelemetryError::Otlp { endpoint: endpoint.clone(), reason };
            let metrics =
                opentelemetry_otlp::MetricExporter::builder().with_http().build().map_err(|e| otlp(e.to_string()))?;
            meters = meters.with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).build());
            let spans =
                opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| otlp(e.to_string()))?;
            tracer = tracer.with_batch_exporter(spans);
        }
        let meters = meters.build();
        let tracer = tracer.build();
        opentelemetry::global::set_meter_provider(meters.clone());
        opentelemetry::global::set_tracer_provider(tracer.clone());
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        Ok(Telemetry { registry, meters, tracer, otlp_endpoint })
    }

    /// A `tracing` layer that turns spans into OpenTelemetry spans of this process's tracer.
    pub fn tracing_layer<S>(&self, scope: &'static str) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.tracer.tracer(scope))
    }

    /// Where OTLP goes, if anywhere.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn prometheus_text(&self) -> Result<String, TelemetryError> {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(|e| TelemetryError::Encode(e.to_string()))
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.tracer.shutdown() {
            tracing::debug!(error = %e, "tracer shutdown");
        }
        if let Err(e) = self.meters.shutdown() {
            tracing::debug!(error = %e, "meter shutdown");
        }
    }
}
