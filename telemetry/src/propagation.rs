//! The W3C trace context (`traceparent`, `tracestate`) between processes: in HTTP headers
//! (gRPC metadata included), and as the plain strings ([`TraceContext`]) that the worker
//! protocol's Assign and the persisted operation record carry. Other crates get and use a
//! `TraceContext` through [`crate::current_span`] and [`crate::StageSpan`].

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;

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
