//! The W3C trace context (`traceparent`, `tracestate`) between processes: in HTTP headers
//! (gRPC metadata included) and as the plain strings the worker protocol's Assign carries.
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

/// The context of `span`, for a child in another process; empty strings when the span is
/// not exported.
pub fn trace_context_of(span: &Span) -> TraceContext {
    let mut carrier = TraceContext::default();
    if !span.is_disabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    }
    carrier
}

/// Makes the remote span described by `context` the parent of `span`. Call it before the
/// span is first entered. Empty or malformed contexts leave `span` a root.
pub fn set_remote_parent(span: &Span, context: &TraceContext) {
    if span.is_disabled() || context.traceparent.is_empty() {
        return;
    }
    adopt(span, TraceContextPropagator::new().extract(context));
}

/// Links `span` to the span described by `context`: the span belongs to a trace of its
/// own but follows that one's work (a call that joins an operation another call started).
/// Empty or malformed contexts add no link.
pub fn add_link(span: &Span, context: &TraceContext) {
    if span.is_disabled() || context.traceparent.is_empty() {
        return;
    }
    let linked = TraceContextPropagator::new().extract(context);
    span.add_link(linked.span().span_context().clone());
}

/// Adds `span`'s context to outgoing request headers.
pub fn inject_into_headers(span: &Span, headers: &mut http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Makes the caller's span, named in incoming request headers, the parent of `span`.
pub fn set_parent_from_headers(span: &Span, headers: &http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    adopt(span, context_from_headers(headers));
}

/// The caller's context named in incoming request headers; an empty context when they name
/// none (or a malformed one).
pub(crate) fn context_from_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT) {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

fn adopt(span: &Span, parent: opentelemetry::Context) {
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not exported, which is fine.
        let _ = span.set_parent(parent);
    }
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
