//! [`StageSpan`]: a span for one stage of an action's work (the queue wait, the worker's
//! run and its input fetch, execution and output upload, the result's publication),
//! built on the SDK directly (`direct_span`) because every action has several.

use std::future::Future;

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry::{Context, Key, KeyValue, Value};

use crate::direct_span::{DirectSpan, SpanStart};
use crate::propagation::TraceContext;

/// One stage's span; it ends at [`StageSpan::end`] or, at the latest, when it and every
/// future it instrumented are dropped (early returns included). With export off it is
/// nothing and costs nothing.
pub struct StageSpan {
    span: Option<DirectSpan>,
}

impl StageSpan {
    /// A stage continuing the span `parent` describes: the Execute call's, persisted with
    /// the operation or carried to a worker in its Assign. A root when `parent` is empty.
    pub fn continuing(name: &'static str, parent: &TraceContext) -> Self {
        Self::under(name, || {
            Context::new().with_remote_span_context(crate::propagation::remote_span(parent))
        })
    }

    /// A stage under the current span (`tracing`'s or a directly built one).
    pub fn under_current(name: &'static str) -> Self {
        Self::under(name, crate::current_span::context)
    }

    /// No span: a stage that is not traced.
    pub fn none() -> Self {
        StageSpan { span: None }
    }

    fn under(name: &'static str, parent: impl FnOnce() -> Context) -> Self {
        StageSpan {
            span: DirectSpan::start(|| SpanStart {
                name: name.into(),
                kind: SpanKind::Internal,
                parent: parent(),
                attributes: Vec::new(),
            }),
        }
    }

    /// Whether the stage is traced (export is on): check it before building an attribute.
    pub fn is_traced(&self) -> bool {
        self.span.is_some()
    }

    pub fn set_attribute(&self, key: impl Into<Key>, value: impl Into<Value>) {
        if let Some(span) = &self.span {
            span.span().set_attribute(KeyValue::new(key, value));
        }
    }

    pub fn end(self) {
        if let Some(span) = self.span {
            span.end();
        }
    }
}

/// `work.in_stage(&span)`: `work`, with the stage's span current whenever it is polled, so
/// that the spans it opens (gRPC calls, `tracing` spans without a `tracing` parent, other
/// stages) are its children and its kiln events outside `tracing` spans are the stage's.
pub trait InStage: Future + Sized {
    fn in_stage(self, stage: &StageSpan) -> impl Future<Output = Self::Output> {
        let context = match &stage.span {
            Some(span) => span.context().clone(),
            None => Context::current(),
        };
        self.with_context(context)
    }
}

impl<F: Future> InStage for F {}
