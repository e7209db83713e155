//! A span for every gRPC call, named `{service}/{method}` with OpenTelemetry's RPC
//! attributes (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`).
//!
//! - Servers: `Server::builder().layer(GrpcServerTraceLayer)`. The span's parent is the
//!   caller's span when the request carries a W3C `traceparent`.
//! - Clients: build generated clients over [`traced`]`(channel)`; the span's context goes
//!   out in the request's metadata.
//!
//! The spans are at DEBUG level: with export off and the default `info` log filter they
//! are never created. A span ends when the response headers arrive, so for a streamed
//! response it covers the start of the call, not the whole stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::transport::Channel;
use tower_service::Service;
use tracing::Span;

use crate::propagation;

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
        let span = call_span(request.uri().path(), self.side);
        match self.side {
            Side::Server => propagation::set_parent_from_headers(&span, request.headers()),
            Side::Client => propagation::inject_into_headers(&span, request.headers_mut()),
        }
        let call = span.in_scope(|| self.inner.call(request));
        TracedCall { call, span }
    }
}

/// `/package.Service/Method` → a span with the RPC attributes.
fn call_span(path: &str, side: Side) -> Span {
    let kind = match side {
        Side::Server => "server",
        Side::Client => "client",
    };
    let span = tracing::debug_span!(
        target: "kiln_telemetry::grpc",
        "grpc",
        otel.name = tracing::field::Empty,
        otel.kind = kind,
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = tracing::field::Empty,
        rpc.method = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        span.record("otel.name", name);
        span.record("rpc.service", service);
        span.record("rpc.method", method);
    }
    span
}

pin_project_lite::pin_project! {
    /// A call's response future, polled inside the call's span.
    pub struct TracedCall<F> {
        #[pin]
        call: F,
        span: Span,
    }
}

impl<F, R, E> Future for TracedCall<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let output = std::task::ready!(this.call.poll(cx));
        if !this.span.is_disabled() {
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
                this.span.record("rpc.grpc.status_code", code);
                if code != 0 {
                    this.span.record("otel.status_code", "ERROR");
                }
            }
        }
        Poll::Ready(output)
    }
}
