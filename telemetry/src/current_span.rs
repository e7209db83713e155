//! The span the calling code runs in, however it was built: the current `tracing` span
//! when it is exported, otherwise the directly built span of the gRPC call or HTTP request
//! being served (`direct_span`), made current around each poll. Code under an RPC
//! handler need not know which.
//!
//! Every function is a no-op when nothing is exported.

use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context, Key, KeyValue, Value};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::{self, TraceContext};

/// The current span, as an OpenTelemetry context.
pub(crate) fn context() -> Context {
    match exported_tracing_span() {
        Some((_, context)) => context,
        None => Context::current(),
    }
}

/// The current `tracing` span and its context, when it is exported.
fn exported_tracing_span() -> Option<(Span, Context)> {
    let span = Span::current();
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    context
        .span()
        .span_context()
        .is_valid()
        .then_some((span, context))
}

/// The current span's W3C context, to persist or to hand to another process.
pub fn trace_context() -> TraceContext {
    propagation::carrier_of(&context())
}

/// Links the current span to the span `linked` describes: the current span is in a trace
/// of its own but follows that one's work (a call that joins an operation another call
/// started). An empty or malformed `linked` adds no link.
pub fn add_link(linked: &TraceContext) {
    let linked = propagation::remote_span(linked);
    if !linked.is_valid() {
        return;
    }
    match exported_tracing_span() {
        Some((span, _)) => span.add_link(linked),
        None => Context::current().span().add_link(linked, Vec::new()),
    }
}

/// Whether the current span is exported: check it before building a costly attribute.
pub fn is_recording() -> bool {
    context().span().is_recording()
}

/// Sets an attribute of the current span.
pub fn set_attribute(key: impl Into<Key>, value: impl Into<Value>) {
    match exported_tracing_span() {
        Some((span, _)) => span.set_attribute(key, value),
        None => Context::current()
            .span()
            .set_attribute(KeyValue::new(key, value)),
    }
}
