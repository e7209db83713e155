//! The receiver in count-only mode, which decodes requests only as far as counting their
//! spans needs, counts exactly what the full receiver does: spans exported by the SDK, and
//! spans of several resources and scopes in one request.
//! A test binary of its own: it sets the `tracing` dispatchers its threads use.
#![cfg(feature = "receiver")]

use std::time::{Duration, Instant};

use kiln_telemetry::receiver::{OtlpReceiver, Retain, TracedRuntime};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

/// Exported spans are kiln's (targets `kiln*`).
const TARGET: &str = "kiln_count_only_receiver_test";

#[test]
fn counts_every_span_the_sdk_exports() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let receiver = runtime
        .block_on(OtlpReceiver::start(Retain::CountOnly))
        .expect("the receiver starts");
    // Two processes, so two resources; more spans than one export batch holds (512).
    let spans_per_process = [("kiln-a", 700), ("kiln-b", 300)];
    let processes: Vec<TracedRuntime> = spans_per_process
        .iter()
        .map(|&(service, spans)| {
            let process = TracedRuntime::start(service, &receiver.endpoint(), &runtime)
                .expect("telemetry starts");
            process.block_on(async {
                for step in 0..spans {
                    tracing::info_span!(target: TARGET, "work", step).in_scope(|| {});
                }
            });
            process
        })
        .collect();
    let expected: u64 = spans_per_process.iter().map(|&(_, spans)| spans).sum();

    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.span_count() < expected && Instant::now() < deadline {
        for process in &processes {
            process.flush();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(receiver.span_count(), expected);
    assert!(receiver.spans().is_empty(), "count-only keeps no spans");
}

#[test]
fn counts_spans_of_every_resource_and_scope_like_the_full_receiver() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // Resources with their attributes, scopes and schema URLs: all of it skipped unread.
    let request = ExportTraceServiceRequest {
        resource_spans: vec![
            resource_spans("kiln-a", &[("kiln", 3), ("kiln_other", 2)]),
            resource_spans("kiln-b", &[("kiln", 4)]),
            resource_spans("kiln-c", &[]),
        ],
    };
    for retain in [Retain::Spans, Retain::CountOnly] {
        let count = runtime.block_on(async {
            let receiver = OtlpReceiver::start(retain)
                .await
                .expect("the receiver starts");
            let mut client = TraceServiceClient::connect(receiver.endpoint())
                .await
                .expect("the client connects");
            for _ in 0..2 {
                client
                    .export(request.clone())
                    .await
                    .expect("the export succeeds");
            }
            receiver.span_count()
        });
        assert_eq!(count, 2 * 9, "spans counted with {retain:?}");
    }
}

fn resource_spans(service: &str, scopes: &[(&str, usize)]) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![string_attribute("service.name", service)],
            ..Default::default()
        }),
        scope_spans: scopes
            .iter()
            .map(|&(scope, spans)| ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: scope.to_string(),
                    version: "1.0".to_string(),
                    ..Default::default()
                }),
                spans: (0..spans).map(span).collect(),
                schema_url: "https://opentelemetry.io/schemas/1.0.0".to_string(),
            })
            .collect(),
        schema_url: "https://opentelemetry.io/schemas/1.0.0".to_string(),
    }
}

fn span(index: usize) -> Span {
    Span {
        trace_id: vec![1; 16],
        span_id: (index as u64 + 1).to_be_bytes().to_vec(),
        name: format!("work {index}"),
        kind: 2,
        start_time_unix_nano: 1,
        end_time_unix_nano: 2,
        attributes: vec![string_attribute(
            "http.route",
            "/v2/{name}/manifests/{reference}",
        )],
        ..Default::default()
    }
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}
