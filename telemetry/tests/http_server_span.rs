//! `HttpServerSpan`, the span of one HTTP request built on the SDK directly: what runs under
//! it nests under it, and it lasts until the response body is sent.
//! A test binary of its own: it sets the `tracing` dispatchers its threads use.
#![cfg(feature = "receiver")]

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use kiln_telemetry::receiver::{named, one, TraceCollector};
use kiln_telemetry::HttpServerSpan;

/// Exported spans and events are kiln's (targets `kiln*`).
const TARGET: &str = "kiln_http_server_span_test";

#[test]
fn work_under_the_request_nests_in_its_span_which_ends_with_the_body() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = collector.process("kiln-test").expect("telemetry starts");
    let sent = process.block_on(async {
        let headers = http::HeaderMap::new();
        let span = HttpServerSpan::start(&http::Method::GET, "/items/{id}", &headers)
            .expect("export is on, so requests are traced");
        let response = span
            .instrument(async {
                tracing::debug_span!(target: TARGET, "lookup").in_scope(|| {});
                tracing::info!(target: TARGET, item = 7, "item found");
                http::Response::new(Full::new(bytes::Bytes::from_static(b"twelve bytes")))
            })
            .await;
        let body = span.respond(response).into_body();
        body.collect().await.expect("the body is sent").to_bytes()
    });
    assert_eq!(&sent[..], b"twelve bytes");

    let spans = collector.expect_spans(&[&process], Duration::from_secs(20), |spans| {
        !named(spans, "kiln-test", "GET /items/{id}").is_empty()
            && !named(spans, "kiln-test", "lookup").is_empty()
    });
    let request = one(&spans, "kiln-test", "GET /items/{id}");
    let lookup = one(&spans, "kiln-test", "lookup");
    assert_eq!(
        request.attribute("http.route").as_deref(),
        Some("/items/{id}")
    );
    assert_eq!(
        request.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        request.attribute("http.response.body.size").as_deref(),
        Some("12"),
        "the bytes the body sent"
    );
    assert_eq!(lookup.span.trace_id, request.span.trace_id);
    assert_eq!(
        lookup.span.parent_span_id, request.span.span_id,
        "a `tracing` span opened while the request is handled is its child"
    );
    let event = request
        .span
        .events
        .iter()
        .find(|e| e.name == "item found")
        .unwrap_or_else(|| panic!("no event on the request span: {:?}", request.span.events));
    assert!(
        format!("{:?}", event.attributes).contains("item"),
        "the event's fields: {:?}",
        event.attributes
    );
}
