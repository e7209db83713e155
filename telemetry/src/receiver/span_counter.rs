//! The receiver's server for [`Retain::CountOnly`](super::Retain::CountOnly): the same
//! `TraceService/Export` as the generated server, decoding each request only as far as
//! counting its spans needs.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::SERVICE_NAME;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::codegen::BoxFuture;

use super::Received;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

// Wire-compatible with `ExportTraceServiceRequest` down to its spans. The fields left out
// (each resource, scope and schema URL) prost skips by their length, without reading them.

#[derive(Clone, PartialEq, prost::Message)]
struct SpanCountRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    /// Each span still encoded: a slice of the request's buffer, not a copy. An empty
    /// message type here would cost about five times as much, as prost would still walk
    /// every field of every span to skip it.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    spans: Vec<Bytes>,
}

impl SpanCountRequest {
    fn span_count(&self) -> u64 {
        let spans: usize = self
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        spans as u64
    }
}

/// Serves `TraceService/Export`, adding each request's spans to the count in `received`.
#[derive(Clone)]
pub(super) struct SpanCounter {
    received: Arc<Mutex<Received>>,
}

impl SpanCounter {
    pub(super) fn new(received: Arc<Mutex<Received>>) -> Self {
        SpanCounter { received }
    }
}

impl tonic::server::NamedService for SpanCounter {
    const NAME: &'static str = SERVICE_NAME;
}

impl tower_service::Service<http::Request<tonic::body::Body>> for SpanCounter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != EXPORT_PATH {
            let status = tonic::Status::unimplemented(request.uri().path().to_string());
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let counter = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(counter, request).await)
        })
    }
}

impl tonic::server::UnaryService<SpanCountRequest> for SpanCounter {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<SpanCountRequest>) -> Self::Future {
        let spans = request.get_ref().span_count();
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count += spans;
        std::future::ready(Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        })))
    }
}
