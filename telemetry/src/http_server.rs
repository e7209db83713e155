//! A server span per HTTP request, built directly on the OpenTelemetry SDK tracer of the
//! current dispatch instead of through a `tracing` span.
//!
//! Why not `tracing`: the registry answers tens of thousands of manifest GETs a second, and
//! a `tracing` span carried into OpenTelemetry by `tracing-opentelemetry` (a span slot, a
//! builder, each field through a visitor, the conversion at close) cost about 3 µs per
//! request, where the SDK span costs about 0.7 µs (`BENCHMARKS.md`, issue 6). What the
//! request does below the span still uses `tracing`: the span's context is made current
//! while the handler runs ([`HttpServerSpan::instrument`]), so `tracing` spans opened there
//! become its children, and kiln events logged there outside any `tracing` span become its
//! events (the subscriber's context-events layer).
//!
//! The span follows OpenTelemetry's HTTP server conventions: named `METHOD ROUTE`, kind
//! server, `http.request.method`, `http.route`, `http.response.status_code`, the body
//! sizes, status ERROR for 5xx. It ends when the response body has been sent, not when the
//! handler returns, so a blob download's span covers the download. No header, and so no
//! credential, is recorded.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use http::{header, HeaderMap, Method, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use crate::subscriber::with_export_tracer;

/// The span of one request, from its head to the last byte of its response.
pub struct HttpServerSpan {
    /// The caller's context (if any) with this request's span as the current span.
    context: Context,
}

impl HttpServerSpan {
    /// Starts the span under the current dispatch's exporter, as a child of the caller's
    /// span when the request carries a W3C `traceparent`. `None` when export is off, so
    /// that an untraced server does nothing per request but look.
    ///
    /// `route` is the path template (`/v2/{name}/manifests/{reference}`), never the raw
    /// path: span names must have a bounded number of values.
    pub fn start(method: &Method, route: &'static str, headers: &HeaderMap) -> Option<Self> {
        with_export_tracer(|tracer| {
            let parent = crate::propagation::context_from_headers(headers);
            let mut attributes = Vec::with_capacity(5);
            attributes.push(KeyValue::new("http.request.method", method.to_string()));
            attributes.push(KeyValue::new("http.route", route));
            if let Some(size) = content_length(headers) {
                attributes.push(KeyValue::new("http.request.body.size", size));
            }
            let span = tracer
                .span_builder(format!("{method} {route}"))
                .with_kind(SpanKind::Server)
                .with_attributes(attributes)
                .start_with_context(tracer, &parent);
            HttpServerSpan {
                context: parent.with_span(span),
            }
        })
    }

    /// `handler` with this span current whenever it is polled: `tracing` spans it opens
    /// become children of the request's span.
    pub fn instrument<F: Future>(&self, handler: F) -> impl Future<Output = F::Output> {
        handler.with_context(self.context.clone())
    }

    /// Records the response head and hands the span to the body, which ends it once the
    /// body has been sent or dropped.
    pub fn respond<B>(self, response: Response<B>) -> Response<TracedBody<B>> {
        let span = self.context.span();
        let status = response.status();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            span.set_status(Status::error(status.to_string()));
        }
        response.map(|inner| TracedBody {
            inner,
            span: Some(self),
            sent: 0,
        })
    }

    fn end(self, body_size: u64) {
        let span = self.context.span();
        let body_size = i64::try_from(body_size).unwrap_or(i64::MAX);
        span.set_attribute(KeyValue::new("http.response.body.size", body_size));
        span.end();
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request's span when it has been sent, or dropped (the
    /// client went away, or the response to a HEAD has no body), recording the bytes sent.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        span: Option<HttpServerSpan>,
        sent: u64,
    }

    impl<B> PinnedDrop for TracedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(span) = this.span.take() {
                span.end(*this.sent);
            }
        }
    }
}

impl<B: Body> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.sent += bytes::Buf::remaining(data) as u64;
                }
            }
            Some(Err(_)) => {
                if let Some(span) = this.span.as_ref() {
                    span.context
                        .span()
                        .set_status(Status::error("response body failed"));
                }
            }
            None => {
                if let Some(span) = this.span.take() {
                    span.end(*this.sent);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// OpenTelemetry integers are signed; no real body comes near `i64::MAX`.
fn content_length(headers: &HeaderMap) -> Option<i64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
