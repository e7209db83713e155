//! The W3C trace context (`traceparent`, `tracestate`) between processes: in HTTP headers
//! (gRPC metadata included) and as the plain strings the worker protocol's Assign carries.
//! [`crate::current_span`] reads and extends the context of the code that calls it.
//!
//! Every function is a no-op for a span that is disabled or not exported, so callers need
//! not know whether export is on.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A span's W3C trace context, as carried by `kiln.worker.v1.Assign`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = value,
            TRACESTATE => self.tracestate = value,
            _ => {}
        }
    }
}

impl Extractor for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            TRACEPARENT => &self.traceparent,
            TRACESTATE => &self.tracestate,
            _ => return None,
        };
        (!value.is_empty()).then_some(value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// `context`'s span as a W3C carrier; empty strings when it is not exported.
pub(crate) fn carrier_of(context: &opentelemetry::Context) -> TraceContext {
    let mut carrier = TraceContext::default();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier
}

/// Makes the remote span described by `context` the parent of `span`. Call it before the
/// span is first entered. Empty or malformed contexts leave `span` a root.
pub fn set_remote_parent(span: &Span, context: &TraceContext) {
    if span.is_disabled() || context.traceparent.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(context);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not exported, which is fine.
        let _ = span.set_parent(parent);
    }
}

/// The remote span a W3C carrier describes; an invalid span context when the carrier is
/// empty or malformed.
pub(crate) fn remote_span(context: &TraceContext) -> opentelemetry::trace::SpanContext {
    if context.traceparent.is_empty() {
        return opentelemetry::trace::SpanContext::empty_context();
    }
    TraceContextPropagator::new()
        .extract(context)
        .span()
        .span_context()
        .clone()
}

/// Adds `context`'s span to outgoing request headers (nothing when it is not exported).
pub(crate) fn inject_into_headers(context: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
}

/// The caller's context named in incoming request headers; an empty context when they name
/// none (or a malformed one).
pub(crate) fn context_from_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT) {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
