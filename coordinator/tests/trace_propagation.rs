//! One action, one trace: a client, the coordinator and a real worker, each with its own
//! tracer provider and `service.name` (as separate processes would have), export their
//! spans over OTLP/gRPC to an in-process receiver. The spans must form one trace with the
//! right parents, also across a coordinator restart, and a call that joins an operation
//! another call started must be linked to that operation's trace.

mod common;

use common::traces::{
    execute_request, response_of, traced_execute, upload_traced_action, TracedWorker, SPANS_TIMEOUT,
};
use common::{finish, TestServer};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::WaitExecutionRequest;
use kiln_telemetry::receiver::{named, one, ReceivedSpan, TraceCollector};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const JOIN_TOKEN: &str = "join-token-6a1f93c0e2d84b7f";
const EXECUTE_RPC: &str = "build.bazel.remote.execution.v2.Execution/Execute";
const WAIT_EXECUTION_RPC: &str = "build.bazel.remote.execution.v2.Execution/WaitExecution";
/// What the worker does for one action, in order.
const WORKER_STAGES: [&str; 3] = ["input_fetch", "execute", "output_upload"];

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        join_token: Some(JOIN_TOKEN.into()),
        ..CoordinatorConfig::default()
    }
}

#[track_caller]
fn is_parent(parent: &ReceivedSpan, child: &ReceivedSpan) {
    assert_eq!(
        child.span.parent_span_id, parent.span.span_id,
        "{:?} should be the parent of {:?}",
        parent.span.name, child.span.name
    );
    assert_eq!(
        child.span.trace_id, parent.span.trace_id,
        "{:?} should be in the trace of {:?}",
        child.span.name, parent.span.name
    );
}

fn instance_id(span: &ReceivedSpan) -> Option<String> {
    kiln_telemetry::receiver::attribute(&span.resource, "service.instance.id")
}

/// Checks that the worker's `action` span and its stages, and the coordinator's
/// `publish_result` (the action-cache write, with the CAS checks it makes), continue the
/// trace of `execute`; returns the `action` and `publish_result` spans.
fn worker_and_result_spans<'a>(
    spans: &'a [ReceivedSpan],
    execute: &ReceivedSpan,
) -> (&'a ReceivedSpan, &'a ReceivedSpan) {
    let worker_action = one(spans, "kiln-worker", "action");
    is_parent(execute, worker_action);
    for stage in WORKER_STAGES {
        is_parent(worker_action, one(spans, "kiln-worker", stage));
    }
    let publish = one(spans, "kiln-coordinator", "publish_result");
    is_parent(execute, publish);
    assert_eq!(publish.attribute("cached").as_deref(), Some("true"));
    (worker_action, publish)
}

/// The worker has reported the action and the coordinator has published its result.
fn action_finished(spans: &[ReceivedSpan]) -> bool {
    !named(spans, "kiln-worker", "action").is_empty()
        && !named(spans, "kiln-coordinator", "publish_result").is_empty()
}

#[test]
fn one_action_is_one_trace_across_client_coordinator_and_worker() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = |service| collector.process(service).expect("telemetry starts");
    let coordinator = process("kiln-coordinator");
    let worker = process("kiln-worker");
    let client = process("kiln-run");

    let dir = tempfile::tempdir().unwrap();
    let server = coordinator
        .block_on(TestServer::start_with(
            &dir.path().join("coordinator"),
            config(),
        ))
        .expect("the coordinator starts");
    let running = TracedWorker::start(
        &worker,
        server.addr,
        "traced-worker",
        JOIN_TOKEN,
        dir.path().join("worker"),
    );

    let action = coordinator.block_on(upload_traced_action(&server));
    let channel = server.channel.clone();
    let done = client.block_on(async move {
        finish(traced_execute(channel, execute_request(&action)).await).await
    });
    assert_eq!(response_of(&done).result.expect("a result").exit_code, 0);

    let spans = collector.expect_spans(
        &[&client, &coordinator, &worker],
        SPANS_TIMEOUT,
        action_finished,
    );
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
    let execute = server_call;
    assert_eq!(
        execute.attribute("kiln.action_cache.hit").as_deref(),
        Some("false"),
        "the Execute call records its action-cache lookup"
    );
    let queue_wait = one(&spans, "kiln-coordinator", "queue_wait");
    is_parent(execute, queue_wait);
    assert_eq!(
        queue_wait.attribute("worker").as_deref(),
        Some("traced-worker")
    );
    let (worker_action, publish) = worker_and_result_spans(&spans, execute);
    assert!(
        publish.span.start_time_unix_nano >= worker_action.span.start_time_unix_nano,
        "the result is published after the worker started"
    );

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
    let mut counted_calls = 0;
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
        assert_eq!(served.span.trace_id, client_call.span.trace_id);
        // The handler records what it was asked on the call's span, not in a span of its own.
        let counted = match served.span.name.rsplit('/').next() {
            Some("FindMissingBlobs") => Some("kiln.digests"),
            Some("BatchReadBlobs" | "BatchUpdateBlobs") => Some("kiln.blobs"),
            _ => None,
        };
        if let Some(key) = counted {
            counted_calls += 1;
            assert!(
                served.attribute(key).is_some_and(|n| n != "0"),
                "{key} missing from {:?}",
                served.span.name
            );
        }
        assert!(
            spans
                .iter()
                .all(|s| s.span.parent_span_id != served.span.span_id),
            "{:?} has a child span",
            served.span.name
        );
    }
    assert!(counted_calls > 0, "the input fetch reads or checks blobs");

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

    running.stop(&worker).expect("the worker drains cleanly");
    coordinator
        .block_on(server.stop())
        .expect("the coordinator stops");
}

/// A second Execute of an action already in flight shares its operation; its own span is
/// in the second client's trace, with a link to the trace doing the work.
#[test]
fn an_execute_joining_an_operation_in_flight_links_to_its_trace() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = |service| collector.process(service).expect("telemetry starts");
    let coordinator = process("kiln-coordinator");
    let client = process("kiln-run");
    let dir = tempfile::tempdir().unwrap();
    let server = coordinator
        .block_on(TestServer::start_with(dir.path(), config()))
        .expect("the coordinator starts");
    let action = coordinator.block_on(upload_traced_action(&server));

    // No worker: the first operation stays in flight while the second Execute arrives.
    let channel = server.channel.clone();
    let (first, second) = client.block_on(async move {
        let mut first = traced_execute(channel.clone(), execute_request(&action)).await;
        let first_name = first.message().await.unwrap().expect("a first stage").name;
        let mut second = traced_execute(channel, execute_request(&action)).await;
        let second_name = second.message().await.unwrap().expect("a first stage").name;
        (first_name, second_name)
    });
    assert_eq!(
        first, second,
        "the second Execute joins the first's operation"
    );
    coordinator
        .block_on(server.stop())
        .expect("the coordinator stops");

    let spans = collector.expect_spans(&[&client, &coordinator], SPANS_TIMEOUT, |spans| {
        named(spans, "kiln-coordinator", EXECUTE_RPC).len() == 2
            && named(spans, "kiln-run", EXECUTE_RPC).len() == 2
            && !named(spans, "kiln-coordinator", "queue_wait").is_empty()
    });
    let executes = named(&spans, "kiln-coordinator", EXECUTE_RPC);
    let (started, joined): (Vec<&ReceivedSpan>, Vec<&ReceivedSpan>) =
        executes.iter().partition(|s| s.span.links.is_empty());
    let ([started], [joined]) = (started.as_slice(), joined.as_slice()) else {
        panic!("one Execute with a link and one without: {executes:#?}");
    };
    assert_ne!(
        started.span.trace_id, joined.span.trace_id,
        "each Execute is in its own client's trace"
    );
    let client_traces: Vec<&Vec<u8>> = named(&spans, "kiln-run", EXECUTE_RPC)
        .iter()
        .map(|s| &s.span.trace_id)
        .collect();
    assert!(client_traces.contains(&&started.span.trace_id));
    assert!(client_traces.contains(&&joined.span.trace_id));
    let [link] = joined.span.links.as_slice() else {
        panic!("one link: {:?}", joined.span.links);
    };
    assert_eq!(link.trace_id, started.span.trace_id);
    assert_eq!(link.span_id, started.span.span_id);
    // The work waits in the first call's trace only.
    let queue_wait = one(&spans, "kiln-coordinator", "queue_wait");
    is_parent(started, queue_wait);
}

/// An operation a restarted coordinator reloads continues the client's trace: the new
/// process's queue wait, the worker's spans and the result's publication all join it,
/// and the client's WaitExecution is linked to it.
#[test]
fn an_operation_reloaded_after_a_restart_continues_its_trace() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = |service| collector.process(service).expect("telemetry starts");
    let client = process("kiln-run");
    let before = process("kiln-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("coordinator");

    let server = before
        .block_on(TestServer::start_with(&data_dir, config()))
        .expect("the coordinator starts");
    let action = before.block_on(upload_traced_action(&server));
    let channel = server.channel.clone();
    let name = client.block_on(async move {
        let mut stream = traced_execute(channel, execute_request(&action)).await;
        stream.message().await.unwrap().expect("a first stage").name
    });
    before
        .block_on(server.stop())
        .expect("the coordinator stops");

    // A new process over the same data, and a worker for it.
    let after = process("kiln-coordinator");
    let server = after
        .block_on(TestServer::start_with(&data_dir, config()))
        .expect("the coordinator restarts");
    let worker = process("kiln-worker");
    let running = TracedWorker::start(
        &worker,
        server.addr,
        "after-restart",
        JOIN_TOKEN,
        dir.path().join("worker"),
    );
    let channel = server.channel.clone();
    let done = client.block_on(async move {
        let stream = ExecutionClient::new(kiln_telemetry::traced(channel))
            .wait_execution(WaitExecutionRequest { name })
            .await
            .expect("WaitExecution is accepted")
            .into_inner();
        finish(stream).await
    });
    assert_eq!(response_of(&done).result.expect("a result").exit_code, 0);

    let spans = collector.expect_spans(
        &[&client, &before, &after, &worker],
        SPANS_TIMEOUT,
        |spans| action_finished(spans) && named(spans, "kiln-coordinator", "queue_wait").len() == 2,
    );
    let client_call = one(&spans, "kiln-run", EXECUTE_RPC);
    let execute = one(&spans, "kiln-coordinator", EXECUTE_RPC);
    is_parent(client_call, execute);
    // One wait before the restart, cut short, and one after it that ended at assignment.
    let waits = named(&spans, "kiln-coordinator", "queue_wait");
    for wait in &waits {
        is_parent(execute, wait);
    }
    let reloaded = waits
        .iter()
        .find(|w| w.attribute("worker").as_deref() == Some("after-restart"))
        .expect("the reloaded operation's wait ends at its assignment");
    assert_ne!(
        instance_id(reloaded),
        instance_id(execute),
        "the wait after the restart is reported by the new process"
    );
    let (_, publish) = worker_and_result_spans(&spans, execute);
    assert_eq!(instance_id(publish), instance_id(reloaded));

    // The client's WaitExecution is a trace of its own, linked to the operation's.
    let wait_call = one(&spans, "kiln-run", WAIT_EXECUTION_RPC);
    let wait_execution = one(&spans, "kiln-coordinator", WAIT_EXECUTION_RPC);
    assert_eq!(wait_execution.span.trace_id, wait_call.span.trace_id);
    assert_ne!(wait_execution.span.trace_id, execute.span.trace_id);
    let [link] = wait_execution.span.links.as_slice() else {
        panic!("one link: {:?}", wait_execution.span.links);
    };
    assert_eq!(
        (&link.trace_id, &link.span_id),
        (&execute.span.trace_id, &execute.span.span_id)
    );

    running.stop(&worker).expect("the worker drains cleanly");
    after
        .block_on(server.stop())
        .expect("the coordinator stops");
}
