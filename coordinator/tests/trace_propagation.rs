//! One action, one trace: a client, the coordinator and a real worker, each with its own
//! tracer provider and `service.name` (as separate processes would have), export their
//! spans over OTLP/gRPC to an in-process receiver. The spans must form one trace with the
//! right parents, and no secret may appear in any of them.

mod common;

use std::time::Duration;

use common::actions::{upload_action, Spec};
use common::{wire, TestServer};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::prost::Message;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse};
use kiln_store::{Digest, DigestFunction};
use kiln_telemetry::receiver::{OtlpReceiver, ReceivedSpan, Retain, TracedRuntime};
use kiln_worker::{BubblewrapMode, WorkerConfig};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::runtime::Runtime;

const JOIN_TOKEN: &str = "join-token-6a1f93c0e2d84b7f";
const BEARER_TOKEN: &str = "bearer-token-f00dfeedc0ffee42";
const F: DigestFunction = DigestFunction::Sha256;

/// `sh -c 'cat in.txt > out.txt'` over an input root holding `in.txt`, which the worker
/// must fetch from the CAS.
async fn upload_traced_action(server: &TestServer) -> Digest {
    let spec = Spec {
        argv: &["sh", "-c", "cat in.txt > out.txt"],
        output_files: &["out.txt"],
        inputs: &[("in.txt", b"traced input\n")],
        ..Spec::default()
    };
    upload_action(server, spec).await.0
}

fn named<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.span.name == name && s.service_name().as_deref() == Some(service))
        .collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found = named(spans, service, name);
    assert_eq!(found.len(), 1, "one {name:?} span from {service}");
    found[0]
}

fn is_parent(parent: &ReceivedSpan, child: &ReceivedSpan) {
    assert_eq!(
        child.span.parent_span_id, parent.span.span_id,
        "{:?} should be the parent of {:?}",
        parent.span.name, child.span.name
    );
}

/// Every string a span carries: name, attributes, events, resource.
fn texts(span: &ReceivedSpan) -> String {
    format!("{:?} {:?}", span.span, span.resource)
}

#[test]
fn one_action_is_one_trace_across_client_coordinator_and_worker() {
    let exporter_runtime = Runtime::new().expect("a runtime");
    let receiver = exporter_runtime
        .block_on(OtlpReceiver::start(Retain::Spans))
        .expect("the receiver starts");
    let process = |service| {
        TracedRuntime::start(service, &receiver.endpoint(), &exporter_runtime)
            .expect("telemetry starts")
    };
    let coordinator = process("kiln-coordinator");
    let worker = process("kiln-worker");
    let client = process("kiln-run");

    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        join_token: Some(JOIN_TOKEN.into()),
        ..CoordinatorConfig::default()
    };
    let server = coordinator
        .block_on(TestServer::start_with(
            &dir.path().join("coordinator"),
            config,
        ))
        .expect("the coordinator starts");
    let worker_config = WorkerConfig {
        coordinator: format!("grpc://{}", server.addr),
        slots: 1,
        join_token: JOIN_TOKEN.into(),
        work_dir: dir.path().join("worker"),
        use_bubblewrap: BubblewrapMode::Never,
        worker_id: "traced-worker".into(),
        ..WorkerConfig::default()
    };
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_task = worker.runtime.spawn(kiln_worker::run(worker_config, async {
        let _ = stopped.await;
    }));

    let action = coordinator.block_on(upload_traced_action(&server));
    let channel = server.channel.clone();
    let response = client.block_on(async move {
        let mut request = tonic::Request::new(ExecuteRequest {
            action_digest: Some(wire(&action)),
            digest_function: F.reapi_value(),
            ..Default::default()
        });
        // A credential a careless span would record with the request's metadata.
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {BEARER_TOKEN}").parse().unwrap(),
        );
        let mut stream = ExecutionClient::new(kiln_telemetry::traced(channel))
            .execute(request)
            .await
            .expect("Execute is accepted")
            .into_inner();
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let operation = stream.message().await.unwrap().expect("not done yet");
                if operation.done {
                    return operation;
                }
            }
        })
        .await
        .expect("the action finishes")
    });
    let Some(kiln_proto::longrunning::operation::Result::Response(any)) = response.result else {
        panic!("no ExecuteResponse in {response:?}");
    };
    let result = ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(result.result.expect("a result").exit_code, 0);

    // The worker's action span closes just after its result is sent: flush until it is in.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        for process in [&client, &coordinator, &worker] {
            process.flush();
        }
        let spans = receiver.spans();
        if !named(&spans, "kiln-worker", "action").is_empty()
            && !named(&spans, "kiln-coordinator", "queue_wait").is_empty()
        {
            break spans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans never arrived: {:#?}",
            spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    const EXECUTE_RPC: &str = "build.bazel.remote.execution.v2.Execution/Execute";
    let client_call = one(&spans, "kiln-run", EXECUTE_RPC);
    assert_eq!(client_call.span.kind, SpanKind::Client as i32);
    assert!(
        client_call.span.parent_span_id.is_empty(),
        "the client's call is the root"
    );
    let server_call = one(&spans, "kiln-coordinator", EXECUTE_RPC);
    assert_eq!(server_call.span.kind, SpanKind::Server as i32);
    assert_eq!(server_call.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        server_call.attribute("rpc.service").as_deref(),
        Some("build.bazel.remote.execution.v2.Execution")
    );
    assert_eq!(
        server_call.attribute("rpc.method").as_deref(),
        Some("Execute")
    );
    is_parent(client_call, server_call);
    let execute = one(&spans, "kiln-coordinator", "Execute");
    is_parent(server_call, execute);
    let cache_lookup = one(&spans, "kiln-coordinator", "cache_lookup");
    is_parent(execute, cache_lookup);
    assert_eq!(cache_lookup.attribute("hit").as_deref(), Some("false"));
    let queue_wait = one(&spans, "kiln-coordinator", "queue_wait");
    is_parent(execute, queue_wait);
    assert_eq!(
        queue_wait.attribute("worker").as_deref(),
        Some("traced-worker")
    );
    let worker_action = one(&spans, "kiln-worker", "action");
    is_parent(execute, worker_action);
    for stage in ["input_fetch", "execute", "output_upload"] {
        is_parent(worker_action, one(&spans, "kiln-worker", stage));
    }

    // The worker's CAS calls have spans on both sides, joined by the metadata.
    let input_fetch = one(&spans, "kiln-worker", "input_fetch");
    let worker_calls: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.service_name().as_deref() == Some("kiln-worker")
                && s.span.kind == SpanKind::Client as i32
                && s.span.parent_span_id == input_fetch.span.span_id
        })
        .collect();
    assert!(!worker_calls.is_empty(), "the input fetch calls the CAS");
    for call in &worker_calls {
        let served = spans
            .iter()
            .find(|s| {
                s.span.parent_span_id == call.span.span_id
                    && s.service_name().as_deref() == Some("kiln-coordinator")
            })
            .unwrap_or_else(|| panic!("no server span for {:?}", call.span.name));
        assert_eq!(served.span.name, call.span.name);
        assert_eq!(served.span.kind, SpanKind::Server as i32);
    }

    // One trace.
    let trace_id = &client_call.span.trace_id;
    for span in [
        server_call,
        execute,
        cache_lookup,
        queue_wait,
        worker_action,
        input_fetch,
    ] {
        assert_eq!(&span.span.trace_id, trace_id, "{:?}", span.span.name);
    }
    assert_ne!(
        worker_action.service_name(),
        execute.service_name(),
        "coordinator and worker report as different services"
    );
    for span in [execute, worker_action] {
        for key in ["service.version", "service.instance.id"] {
            assert!(
                kiln_telemetry::receiver::attribute(&span.resource, key).is_some(),
                "{key} is missing from {:?}",
                span.resource
            );
        }
    }

    // No secret in any span: not the join token (worker Register), not the bearer token.
    for span in &spans {
        let text = texts(span);
        assert!(!text.contains(JOIN_TOKEN), "the join token leaked: {text}");
        assert!(
            !text.contains(BEARER_TOKEN),
            "a bearer token leaked: {text}"
        );
    }

    let _ = stop_worker.send(());
    worker
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), worker_task).await })
        .expect("the worker stops")
        .expect("the worker task does not panic")
        .expect("the worker drains cleanly");
    coordinator
        .block_on(server.stop())
        .expect("the coordinator stops");
}
