//! Spans built on the OpenTelemetry SDK tracer directly, for the per-request spans of the
//! servers and clients (HTTP requests, gRPC calls), instead of `tracing` spans.
//!
//! Why: a `tracing` span carried into OpenTelemetry by `tracing-opentelemetry` (a span
//! slot, a builder, each field through a visitor, the conversion at close) cost about 3 µs,
//! an SDK span 0.6–1.0 µs (`docs/bench-log.md`), and these spans are on every
//! manifest GET and every RPC. What runs under one still uses `tracing`: while the span's
//! context is current ([`DirectSpan::context`] attached around each poll), `tracing` spans
//! opened without a `tracing` parent become its children, and kiln events logged outside
//! any `tracing` span become its events (the subscriber's context-events layer).

use std::borrow::Cow;

use opentelemetry::trace::{SpanKind, SpanRef, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use opentelemetry_sdk::trace::SdkTracer;

use crate::subscriber::with_export_tracer;

/// One span, held as the context that has it current (over its parent's context).
pub(crate) struct DirectSpan {
    context: Context,
}

/// What a span starts with.
pub(crate) struct SpanStart {
    pub(crate) name: Cow<'static, str>,
    pub(crate) kind: SpanKind,
    pub(crate) parent: Context,
    pub(crate) attributes: Vec<KeyValue>,
}

impl DirectSpan {
    /// Starts a span under the current dispatch's exporter; `None` when export is off.
    /// `describe` runs only when export is on, so that untraced code does nothing per
    /// request but look: no name, parent or attribute is built for nothing.
    pub(crate) fn start(describe: impl FnOnce() -> SpanStart) -> Option<Self> {
        // `describe` runs outside `with_export_tracer`: inside it the dispatch is marked
        // busy, and `tracing` would not see the current span that a parent may be.
        let tracer = with_export_tracer(SdkTracer::clone)?;
        let start = describe();
        let span = tracer
            .span_builder(start.name)
            .with_kind(start.kind)
            .with_attributes(start.attributes)
            .start_with_context(&tracer, &start.parent);
        Some(DirectSpan {
            context: start.parent.with_span(span),
        })
    }

    /// The context to make current while work under the span runs, or to propagate.
    pub(crate) fn context(&self) -> &Context {
        &self.context
    }

    pub(crate) fn span(&self) -> SpanRef<'_> {
        self.context.span()
    }

    /// Marks the span failed, with `description` as the status message.
    pub(crate) fn fail(&self, description: impl Into<Cow<'static, str>>) {
        self.span().set_status(Status::error(description));
    }

    /// Ends the span now (dropping the last clone of its context would end it too, later).
    pub(crate) fn end(self) {
        self.span().end();
    }
}
