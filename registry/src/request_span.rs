//! A span per registry request, with OpenTelemetry's HTTP server attributes: method,
//! route template, status and body sizes. The span is named `METHOD ROUTE` (never the raw
//! path, which carries names and digests); no header, and so no credential, is recorded.
//! A W3C `traceparent` header on the request makes the caller's span the parent.

use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use tracing::field::Empty;
use tracing::Instrument;

use crate::endpoint::Endpoint;

pub(crate) async fn trace_request(request: Request, next: Next) -> Response {
    let span = tracing::debug_span!(
        "http_request",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %request.method(),
        http.route = Empty,
        http.request.body.size = Empty,
        http.response.status_code = Empty,
        http.response.body.size = Empty,
    );
    if span.is_disabled() {
        return next.run(request).await;
    }
    let path = request.uri().path();
    let route = match Endpoint::parse(path) {
        Ok(endpoint) => endpoint.route(),
        Err(_) if path == "/healthz" => "/healthz",
        Err(_) if path == "/readyz" => "/readyz",
        Err(_) => "unmatched",
    };
    span.record("otel.name", format!("{} {route}", request.method()));
    span.record("http.route", route);
    if let Some(size) = content_length(request.headers()) {
        span.record("http.request.body.size", size);
    }
    kiln_telemetry::propagation::set_parent_from_headers(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if let Some(size) = content_length(response.headers()) {
        span.record("http.response.body.size", size);
    }
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
