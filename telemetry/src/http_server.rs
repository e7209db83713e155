//! A server span per HTTP request, built on the SDK directly (`direct_span`): the
//! registry answers tens of thousands of manifest GETs a second.
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
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

use crate::direct_span::{DirectSpan, SpanStart};

/// The span of one request, from its head to the last byte of its response.
pub struct HttpServerSpan {
    span: DirectSpan,
}

impl HttpServerSpan {
    /// Starts the span under the current dispatch's exporter, as a child of the caller's
    /// span when the request carries a W3C `traceparent`. `None` when export is off, so
    /// that an untraced server does nothing per request but look.
    ///
    /// `route` is the path template (`/v2/{name}/manifests/{reference}`), never the raw
    /// path: span names must have a bounded number of values.
    pub fn start(method: &Method, route: &'static str, headers: &HeaderMap) -> Option<Self> {
        let span = DirectSpan::start(|| {
            let mut attributes = Vec::with_capacity(5);
            attributes.push(KeyValue::new("http.request.method", method.to_string()));
            attributes.push(KeyValue::new("http.route", route));
            if let Some(size) = content_length(headers) {
                attributes.push(KeyValue::new("http.request.body.size", size));
            }
            SpanStart {
                name: format!("{method} {route}").into(),
                kind: SpanKind::Server,
                parent: crate::propagation::context_from_headers(headers),
                attributes,
            }
        })?;
        Some(HttpServerSpan { span })
    }

    /// `handler` with this span current whenever it is polled: `tracing` spans it opens
    /// become children of the request's span.
    pub fn instrument<F: Future>(&self, handler: F) -> impl Future<Output = F::Output> {
        handler.with_context(self.span.context().clone())
    }

    /// Records the response head and hands the span to the body, which ends it once the
    /// body has been sent or dropped.
    pub fn respond<B>(self, response: Response<B>) -> Response<TracedBody<B>> {
        let status = response.status();
        self.span.span().set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            self.span.fail(status.to_string());
        }
        response.map(|inner| TracedBody {
            inner,
            span: Some(self),
            sent: 0,
        })
    }

    fn end(self, body_size: u64) {
        let body_size = i64::try_from(body_size).unwrap_or(i64::MAX);
        self.span
            .span()
            .set_attribute(KeyValue::new("http.response.body.size", body_size));
        self.span.end();
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
                if let Some(request) = this.span.as_ref() {
                    request.span.fail("response body failed");
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
