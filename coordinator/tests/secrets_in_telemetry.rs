//! Secrets never reach spans or logs. A coordinator with a join token and token auth on, a
//! worker holding the join token (which it also presents on its CAS calls), a worker
//! holding a wrong one, a client sending a valid bearer token and then a wrong one, and an
//! operator draining a worker run in one test, each as its own traced "process" that exports every
//! span to an in-process OTLP receiver and keeps its log lines at `trace` in memory. No
//! token may appear in any span or any log line.
//!
//! A test binary of its own, since it sets the `tracing` dispatchers its threads use.

mod common;

use common::traces::{
    execute_request, response_of, traced_execute, upload_traced_action, TracedWorker, SPANS_TIMEOUT,
};
use common::{finish, TestServer};
use kiln_coordinator::auth::{hash_token, ConfiguredToken};
use kiln_coordinator::{AuthConfig, CoordinatorConfig};
use kiln_proto::admin::v1::admin_client::AdminClient;
use kiln_proto::admin::v1::DrainWorkerRequest;
use kiln_telemetry::receiver::{named, recorded_secrets, CapturedLogs, TraceCollector};
use kiln_worker::WorkerError;
use tonic::Code;

const JOIN_TOKEN: &str = "join-token-6a1f93c0e2d84b7f";
/// A worker's guess at the join token: as secret as the real one (it may be a typo of it).
const WRONG_TOKEN: &str = "wrong-token-0b5e7d9c1a3f2468";
/// A credential a client sends in its calls' metadata.
const BEARER_TOKEN: &str = "bearer-token-f00dfeedc0ffee42";
const SECRETS: [&str; 3] = [JOIN_TOKEN, WRONG_TOKEN, BEARER_TOKEN];
/// Everything, dependencies included, at their most verbose.
const LOG_FILTER: &str = "trace";

/// `request` with `authorization: Bearer {token}` in its metadata.
fn with_bearer<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a valid header"),
    );
    request
}

#[test]
fn tokens_stay_out_of_spans_and_logs() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = |service| {
        collector
            .process_capturing_logs(service, LOG_FILTER)
            .expect("telemetry starts")
    };
    let (coordinator, coordinator_logs) = process("kiln-coordinator");
    let (worker, worker_logs) = process("kiln-worker");
    let (intruder, intruder_logs) = process("kiln-worker");
    let (client, client_logs) = process("kiln-run");
    let (admin, admin_logs) = process("kiln-admin");

    let dir = tempfile::tempdir().unwrap();
    // Auth on: the client's bearer token is looked up, a wrong one refused, and the
    // worker reaches the CAS with the join token as its bearer token.
    let config = CoordinatorConfig {
        join_token: Some(JOIN_TOKEN.into()),
        auth: AuthConfig {
            enabled: true,
            tokens: vec![ConfiguredToken {
                name: "client".into(),
                hash: hex::encode(hash_token(BEARER_TOKEN)),
                scopes: vec!["execute".into(), "ac:read".into()],
                instance: None,
                expires_unix: None,
            }],
            // The test's own uploads carry no token.
            anonymous_scopes: vec!["cas:read".into(), "cas:write".into()],
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    let server = coordinator
        .block_on(TestServer::start_with(
            &dir.path().join("coordinator"),
            config,
        ))
        .expect("the coordinator starts");

    // A worker with the wrong token is refused, and stops.
    let refused = TracedWorker::start(
        &intruder,
        server.addr,
        "intruder",
        WRONG_TOKEN,
        dir.path().join("intruder"),
    )
    .ended(&intruder);
    assert!(
        matches!(refused, Err(WorkerError::Rejected(_))),
        "{refused:?}"
    );

    let running = TracedWorker::start(
        &worker,
        server.addr,
        "honest-worker",
        JOIN_TOKEN,
        dir.path().join("worker"),
    );
    let action = coordinator.block_on(upload_traced_action(&server));
    let channel = server.channel.clone();
    let (ran, cached, refused) = client.block_on(async move {
        let execute = || with_bearer(execute_request(&action), BEARER_TOKEN);
        let ran = finish(traced_execute(channel.clone(), execute()).await).await;
        let cached = finish(traced_execute(channel.clone(), execute()).await).await;
        let wrong = with_bearer(execute_request(&action), WRONG_TOKEN);
        let refused = kiln_proto::reapi::execution_client::ExecutionClient::new(
            kiln_telemetry::traced(channel),
        )
        .execute(wrong)
        .await
        .map(drop);
        (response_of(&ran), response_of(&cached), refused)
    });
    assert_eq!(
        refused.expect_err("a wrong token executes nothing").code(),
        Code::Unauthenticated
    );
    assert_eq!(ran.result.expect("a result").exit_code, 0);
    assert!(cached.cached_result, "the second Execute hits the cache");

    // The operator drains the worker: refused with a wrong token, done with the right one.
    let channel = server.channel.clone();
    let wrong_drain = admin.block_on(async {
        let mut admin = AdminClient::new(kiln_telemetry::traced(channel));
        let drain = |token| {
            let request = DrainWorkerRequest {
                worker_id: "honest-worker".into(),
            };
            with_bearer(tonic::Request::new(request), token)
        };
        let wrong = admin.drain_worker(drain(WRONG_TOKEN)).await;
        admin
            .drain_worker(drain(JOIN_TOKEN))
            .await
            .expect("the join token drains a worker");
        wrong
    });
    assert_eq!(
        wrong_drain
            .expect_err("a wrong token drains nothing")
            .code(),
        Code::Unauthenticated
    );
    running.ended(&worker).expect("the drained worker stops");
    coordinator
        .block_on(server.stop())
        .expect("the coordinator stops");

    let processes = [&coordinator, &worker, &intruder, &client, &admin];
    let spans = collector.expect_spans(&processes, SPANS_TIMEOUT, |spans| {
        !named(spans, "kiln-worker", "action").is_empty()
            && !named(spans, "kiln-coordinator", "publish_result").is_empty()
            && named(spans, "kiln-coordinator", "kiln.admin.v1.Admin/DrainWorker").len() == 2
    });
    let logs: [(&str, &CapturedLogs); 5] = [
        ("coordinator", &coordinator_logs),
        ("worker", &worker_logs),
        ("intruder", &intruder_logs),
        ("client", &client_logs),
        ("admin", &admin_logs),
    ];

    // The test saw real work, so that it cannot pass by capturing nothing.
    for service in ["kiln-coordinator", "kiln-worker", "kiln-run", "kiln-admin"] {
        assert!(
            spans
                .iter()
                .any(|s| s.service_name().as_deref() == Some(service)),
            "no span from {service}"
        );
    }
    assert!(
        !named(&spans, "kiln-coordinator", "Workers/Connect").is_empty(),
        "the registrations have spans"
    );
    for (process, captured) in &logs {
        assert!(!captured.lines().is_empty(), "the {process} logged nothing");
    }
    let coordinator_lines = coordinator_logs.lines();
    assert!(
        coordinator_lines
            .iter()
            .any(|l| l.contains("refused a worker") && l.contains("wrong join token")),
        "the refusal is logged"
    );
    assert!(
        coordinator_lines
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("assigned")),
        "the coordinator logs at debug level"
    );

    let log_lines: Vec<String> = logs
        .iter()
        .flat_map(|(process, captured)| {
            captured
                .lines()
                .into_iter()
                .map(move |line| format!("{process}: {line}"))
        })
        .collect();
    let leaks = recorded_secrets(&SECRETS, &spans, &log_lines);
    assert!(leaks.is_empty(), "secrets were recorded: {leaks:#?}");
}
