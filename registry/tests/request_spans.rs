//! Registry requests as OpenTelemetry spans, exported to an in-process OTLP receiver.
//! A test binary of its own: it owns the only tracing dispatcher in the process.

mod common;

use common::*;
use hyper::{Method, StatusCode};
use kiln_telemetry::receiver::{recorded_secrets, TraceCollector};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// Each request is a span named by its route template, with the HTTP attributes; a
/// caller's `traceparent` makes it a child; what the request logs becomes its events; and
/// neither passwords nor tokens appear in any span.
#[test]
fn requests_are_spans_and_credentials_stay_out_of_them() {
    const WRONG_PASSWORD: &str = "wrong-password-7f3a91";
    const CALLER_TRACE: &str = "5f0c8e2a9b7d4c3e1a2b3c4d5e6f7a8b";
    const CALLER_SPAN: &str = "1a2b3c4d5e6f7a8b";
    let collector = TraceCollector::start().unwrap();
    let registry = collector.process("kiln-registry").unwrap();
    let ci = basic("ci", "ci-secret");
    let token = registry.block_on(async {
        let (_dir, reg) = TestRegistry::start(auth_config()).await;
        push_image_as(&reg, &ci, "team/app", "v1.0.0").await;
        send_as(
            &reg,
            &basic("ci", WRONG_PASSWORD),
            Method::GET,
            "/v2/",
            empty(),
        )
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let token = issue_token(&reg, &ci, "repository:team/app:pull").await;
        send_as(
            &reg,
            &format!("Bearer {token}"),
            Method::GET,
            "/v2/team/app/manifests/v1.0.0",
            empty(),
        )
        .await
        .expect(StatusCode::OK);
        let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
        let layer = reg
            .send(
                Method::GET,
                &format!("/v2/team/app/blobs/{}", sha256(b"layer")),
                &[("authorization", &ci), ("traceparent", &traceparent)],
                empty(),
            )
            .await
            .expect(StatusCode::OK);
        assert_eq!(&layer.body[..], b"layer");
        reg.stop().await;
        token
    });
    registry.flush();
    let spans = collector.spans();
    let find = |name: &str, status: &str| {
        spans
            .iter()
            .find(|s| {
                s.span.name == name
                    && s.attribute("http.response.status_code").as_deref() == Some(status)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {name:?} span with status {status} among {:?}",
                    spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
                )
            })
    };
    let put = find("PUT /v2/{name}/manifests/{reference}", "201");
    assert_eq!(put.span.kind, SpanKind::Server as i32);
    assert_eq!(put.service_name().as_deref(), Some("kiln-registry"));
    assert_eq!(put.attribute("http.request.method").as_deref(), Some("PUT"));
    assert_eq!(
        put.attribute("http.route").as_deref(),
        Some("/v2/{name}/manifests/{reference}")
    );
    assert!(put.attribute("http.request.body.size").is_some());
    let refused = find("GET /v2/", "401");
    assert!(
        refused
            .span
            .events
            .iter()
            .any(|e| e.name == "basic auth failed"),
        "the refusal logged during the request is an event of its span: {:?}",
        refused.span.events
    );
    find("GET /token", "200");
    let pulled = find("GET /v2/{name}/manifests/{reference}", "200");
    assert!(pulled.attribute("http.response.body.size").is_some());
    let blob = find("GET /v2/{name}/blobs/{digest}", "200");
    assert_eq!(hex(&blob.span.trace_id), CALLER_TRACE, "the caller's trace");
    assert_eq!(
        hex(&blob.span.parent_span_id),
        CALLER_SPAN,
        "the caller's span"
    );
    assert_eq!(
        blob.attribute("http.response.body.size").as_deref(),
        Some("5"),
        "the bytes of the body, counted as they were sent"
    );

    let credentials = [
        "ci-secret",
        WRONG_PASSWORD,
        ci.trim_start_matches("Basic "),
        &token,
    ];
    let leaks = recorded_secrets(&credentials, &spans, &[]);
    assert!(leaks.is_empty(), "credentials leaked: {leaks:#?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
