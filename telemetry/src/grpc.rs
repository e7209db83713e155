//! A span for every gRPC call, named `{service}/{method}` with OpenTelemetry's RPC
//! attributes (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`).
//!
//! - Servers: `Server::builder().layer(GrpcServerTraceLayer)`. The span's parent is the
//!   caller's span when the request carries a W3C `traceparent`.
//! - Clients: build generated clients over [`traced`]`(channel)`; the span's context goes
//!   out in the request's metadata.
//!
//! The spans are built on the SDK directly (`direct_span`), only when export is
//! on. While a server span's call is polled its context is current, so the handler's
//! `tracing` spans are its children and its events are the span's. A span ends when the
//! response headers arrive, so for a streamed response it covers the start of the call,
//! not the whole stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tonic::transport::Channel;
use tower_service::Service;

use crate::direct_span::{DirectSpan, SpanStart};
use crate::{current_span, propagation};

/// A client channel whose calls have spans and carry the caller's trace context.
pub type TracedChannel = TracedCalls<Channel>;

/// Wraps a channel for generated clients: `FooClient::new(traced(channel))`.
pub fn traced(channel: Channel) -> TracedChannel {
    TracedCalls {
        inner: channel,
        side: Side::Client,
    }
}

/// The server-side layer; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcServerTraceLayer;

impl<S> tower_layer::Layer<S> for GrpcServerTraceLayer {
    type Service = TracedCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TracedCalls {
            inner,
            side: Side::Server,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// A gRPC service (server side) or channel (client side) with a span per call.
#[derive(Clone, Debug)]
pub struct TracedCalls<S> {
    inner: S,
    side: Side,
}

impl<S, B, R> Service<http::Request<B>> for TracedCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TracedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let span = match self.side {
            Side::Server => DirectSpan::start(|| {
                let parent = propagation::context_from_headers(request.headers());
                call_span(request.uri().path(), SpanKind::Server, parent)
            }),
            Side::Client => {
                let span = DirectSpan::start(|| {
                    call_span(
                        request.uri().path(),
                        SpanKind::Client,
                        current_span::context(),
                    )
                });
                if let Some(span) = &span {
                    propagation::inject_into_headers(span.context(), request.headers_mut());
                }
                span
            }
        };
        let call = {
            let _current = span.as_ref().map(|span| span.context().clone().attach());
            self.inner.call(request)
        };
        TracedCall { call, span }
    }
}

/// `/package.Service/Method` → a span named `package.Service/Method` with the RPC
/// attributes.
fn call_span(path: &str, kind: SpanKind, parent: opentelemetry::Context) -> SpanStart {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    SpanStart {
        name: name.to_string().into(),
        kind,
        parent,
        attributes: vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ],
    }
}

pin_project_lite::pin_project! {
    /// A call's response future, polled with the call's span current.
    pub struct TracedCall<F> {
        #[pin]
        call: F,
        span: Option<DirectSpan>,
    }
}

impl<F, R, E> Future for TracedCall<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = {
            let _current = this
                .span
                .as_ref()
                .map(|span| span.context().clone().attach());
            std::task::ready!(this.call.poll(cx))
        };
        if let Some(span) = this.span.take() {
            // An error's status comes in the headers ("trailers-only"); a success's
            // status comes in the trailers, after the span has ended.
            let status = match &output {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok()),
                Err(_) => Some(tonic::Code::Unavailable as i64),
            };
            if let Some(code) = status {
                span.span()
                    .set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                if code != 0 {
                    span.fail(tonic::Code::from(code as i32).description());
                }
            }
            span.end();
        }
        Poll::Ready(output)
    }
}
