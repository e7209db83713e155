//! kiln-telemetry: the one place in kiln that knows OpenTelemetry.
//!
//! - [`init`] installs the process's `tracing` subscriber: log lines on stderr filtered by
//!   the `log` setting and, when an OTLP endpoint is configured (the `[telemetry]` table,
//!   or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`/`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//!   span export over OTLP/gRPC. Without an endpoint there is no exporter and no
//!   OpenTelemetry layer at all: the per-request and per-stage spans are not made, and
//!   kiln's DEBUG `tracing` spans stay on `tracing`'s disabled-callsite fast path at the
//!   default `info`.
//! - [`propagation`]: the W3C trace context to and from HTTP headers (gRPC metadata is
//!   HTTP/2 headers) and the `traceparent`/`tracestate` strings of the worker protocol.
//! - [`current_span`]: the span the calling code runs in, whether a `tracing` span or an
//!   RPC's span: its context to persist or send, links, attributes.
//! - [`grpc`]: a span for every gRPC call, on servers ([`GrpcServerTraceLayer`], which
//!   also adopts the caller's context) and on clients ([`TracedChannel`], which sends it).
//! - [`http_server`]: [`HttpServerSpan`], the registry's span per HTTP request;
//!   [`http_client`]: [`HttpClientSpan`], `kiln publish`'s span per request it sends.
//! - [`StageSpan`]: the span of one stage of an action's work (queue wait, the worker's
//!   run and stages, the result's publication).
//! - Those per-request and per-stage spans are built on the SDK directly (`direct_span`):
//!   their hot paths cannot afford `tracing` spans. Rarer work uses `tracing` spans.
//! - `receiver` (feature `receiver`): an in-process OTLP trace receiver for tests and
//!   benchmarks, and runtimes that stand in for processes reporting to it (their log
//!   lines optionally kept in memory).

mod context_events;
pub mod current_span;
mod direct_span;
pub mod grpc;
pub mod http_client;
pub mod http_server;
pub mod propagation;
#[cfg(feature = "receiver")]
pub mod receiver;
mod stage_span;
mod subscriber;

pub use grpc::{traced, GrpcServerTraceLayer, TracedChannel};
pub use http_client::HttpClientSpan;
pub use http_server::HttpServerSpan;
pub use stage_span::{InStage, StageSpan};
pub use subscriber::{build, init, TelemetryGuard, TelemetryOptions};

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {source}")]
    LogFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot set up the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[from] tracing::dispatcher::SetGlobalDefaultError),
}

/// This machine's host name, as the kernel reports it; `None` when it cannot be read.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}
