//! The `tracing` subscriber: stderr log lines, plus OpenTelemetry export when configured.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing::{Dispatch, Level, Metadata};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use crate::context_events::ContextEvents;
use crate::TelemetryError;

/// The standard variables that turn export on without any kiln setting.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// How long shutting down may wait for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a process reports.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// The `tracing` filter for log lines on stderr (the `log` setting), e.g. `info`;
    /// `off` prints nothing.
    pub log_filter: String,
    /// The OTLP/gRPC collector spans are exported to, e.g. `http://127.0.0.1:4317`. When
    /// unset, the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`/`OTEL_EXPORTER_OTLP_ENDPOINT`
    /// decide; when those are unset too, nothing is exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        TelemetryOptions {
            log_filter: "info".to_string(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryOptions {
    /// The endpoint to export to: `Some(None)` means "as the OTEL_* variables say".
    fn export(&self) -> Option<Option<String>> {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        match self.otlp_endpoint.as_deref() {
            Some(endpoint) if !endpoint.is_empty() => Some(Some(endpoint.to_string())),
            _ => ENDPOINT_VARIABLES
                .iter()
                .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()))
                .then_some(None),
        }
    }
}

/// Flushes and shuts the span exporter down when dropped (a no-op without export).
///
/// Drop it outside async code, or on a multi-threaded runtime that is still running:
/// the last export goes through the runtime's I/O driver.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Sends the spans finished so far to the collector, waiting for the export.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            if let Err(error) = provider.force_flush() {
                tracing::warn!(%error, "flushing spans failed");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                eprintln!("kiln: exporting the last spans failed: {error}");
            }
        }
    }
}

/// Installs the global subscriber for `service_name` (`kiln-coordinator`, `kiln-worker`,
/// `kiln-registry`, `kiln`). With export on, call it inside a Tokio runtime: the exporter's
/// gRPC channel lives there.
pub fn init(
    service_name: &str,
    options: &TelemetryOptions,
) -> Result<TelemetryGuard, TelemetryError> {
    let (dispatch, guard) = build(service_name, options)?;
    tracing::dispatcher::set_global_default(dispatch)?;
    Ok(guard)
}

/// The subscriber [`init`] would install, without installing it: tests and benchmarks
/// run several "processes" in one, each under its own dispatch and tracer provider.
pub fn build(
    service_name: &str,
    options: &TelemetryOptions,
) -> Result<(Dispatch, TelemetryGuard), TelemetryError> {
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    build_logging_to(service_name, options, std::io::stderr, colours)
}

/// [`build`], with the log lines going to `log_writer` rather than stderr: tests read
/// them back.
pub(crate) fn build_logging_to<W>(
    service_name: &str,
    options: &TelemetryOptions,
    log_writer: W,
    colours: bool,
) -> Result<(Dispatch, TelemetryGuard), TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let log_filter =
        EnvFilter::try_new(&options.log_filter).map_err(|source| TelemetryError::LogFilter {
            filter: options.log_filter.clone(),
            source,
        })?;
    let log_lines = tracing_subscriber::fmt::layer()
        .with_writer(log_writer)
        .with_ansi(colours)
        .with_filter(log_filter);
    let provider = match options.export() {
        Some(endpoint) => Some(tracer_provider(service_name, endpoint)?),
        None => None,
    };
    let export = provider.as_ref().map(|provider| {
        let tracer = provider.tracer("kiln");
        let spans = tracing_opentelemetry::layer()
            .with_tracer(tracer.clone())
            // Source locations, thread names and busy/idle timings cost per span and say
            // little that the span names do not. Context activation (making each entered
            // span's OpenTelemetry context current) costs on every poll of an instrumented
            // future, about half the execution path's tracing overhead in one interleaved
            // comparison (docs/bench-log.md), and nothing in kiln reads the current
            // OpenTelemetry context inside a `tracing` span.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(filter_fn(exported));
        let context_events = ContextEvents.with_filter(filter_fn(exported));
        // Sees nothing (its filter refuses every callsite); it only carries the tracer.
        let tracer = ExportTracer(tracer).with_filter(filter_fn(|_| false));
        spans.and_then(context_events).and_then(tracer)
    });
    let subscriber = tracing_subscriber::registry().with(log_lines).with(export);
    Ok((Dispatch::new(subscriber), TelemetryGuard { provider }))
}

/// The exporter's tracer, kept in the dispatch so that code building OpenTelemetry spans
/// directly ([`HttpServerSpan`](crate::http_server::HttpServerSpan)) exports through the
/// same provider as the `tracing` spans of the same "process" (tests run several).
struct ExportTracer(SdkTracer);

impl<S: tracing::Subscriber> Layer<S> for ExportTracer {}

/// Calls `f` with the current dispatch's export tracer; `None` when export is off.
pub(crate) fn with_export_tracer<R>(f: impl FnOnce(&SdkTracer) -> R) -> Option<R> {
    // get_default takes an FnMut, though it calls it once.
    let mut f = Some(f);
    tracing::dispatcher::get_default(|dispatch| {
        let export = dispatch.downcast_ref::<ExportTracer>()?;
        f.take().map(|f| f(&export.0))
    })
}

/// What goes to the collector: kiln's own `tracing` spans down to DEBUG, and its events
/// from INFO up, which become span events. Dependencies' spans stay out. (The per-request
/// and per-stage spans are made on the SDK directly and need no filter.)
fn exported(metadata: &Metadata<'_>) -> bool {
    let most_verbose = if metadata.is_span() {
        Level::DEBUG
    } else {
        Level::INFO
    };
    metadata.target().starts_with("kiln") && *metadata.level() <= most_verbose
}

/// The provider `build` exports through: the OTLP/gRPC exporter, kiln's batching and the
/// service's resource.
pub(crate) fn tracer_provider(
    service_name: &str,
    endpoint: Option<String>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let batches = BatchSpanProcessor::builder(exporter.build()?)
        .with_batch_config(batch_config())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(resource(service_name))
        .build())
}

/// Spans waiting for export, at most; beyond that new ones are dropped.
const MAX_QUEUED_SPANS: usize = 16_384;
/// Spans per export request.
const SPANS_PER_EXPORT: usize = 2_048;

/// The SDK's batching defaults (2,048 queued spans, 512 per export) are too small for a
/// registry ending 50,000 request spans a second: the batch thread waits for each export in
/// turn, and while it waited the queue filled and spans were dropped (up to 8% in
/// `registry-bench --otlp`). The standard OTEL_BSP_* variables still win.
fn batch_config() -> BatchConfig {
    let mut config = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        config = config.with_max_queue_size(MAX_QUEUED_SPANS);
    }
    if std::env::var_os("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").is_none() {
        config = config.with_max_export_batch_size(SPANS_PER_EXPORT);
    }
    config.build()
}

/// service.name, service.version, service.instance.id and host.name, under whatever
/// OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME say (the operator's word wins).
fn resource(service_name: &str) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.name", service_name.to_string()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new(
            "service.instance.id",
            uuid::Uuid::new_v4().hyphenated().to_string(),
        ),
    ];
    if let Some(host) = crate::host_name() {
        attributes.push(KeyValue::new("host.name", host));
    }
    let mut builder = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(attributes)
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME") {
        if !name.is_empty() {
            builder = builder.with_service_name(name);
        }
    }
    builder.build()
}
