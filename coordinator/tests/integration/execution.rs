//! Remote execution over real sockets: the coordinator's Execution, Operations and
//! Workers services, with real `kiln_worker::run` workers in process, and scripted fake
//! workers speaking `kiln.worker.v1` where a test needs to control what a worker does.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::actions::{shell_action, upload_action, Spec};
use common::{finish, wire, within, TestServer};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::longrunning::{
    operation, operations_client::OperationsClient, CancelOperationRequest, Operation,
};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    self, execution_client::ExecutionClient, Action, ActionResult, Command, ExecuteRequest,
    ExecuteResponse, ExecutionPolicy, WaitExecutionRequest,
};
use kiln_proto::worker::v1::{
    self as proto, coordinator_message::Message as ToWorker, worker_message::Message as FromWorker,
    workers_client::WorkersClient,
};
use kiln_store::{Digest, DigestFunction};
use kiln_worker::{SandboxMode, WorkerConfig, WorkerError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

const TOKEN: &str = "join-secret";
const F: DigestFunction = DigestFunction::Sha256;

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        join_token: Some(TOKEN.into()),
        ..CoordinatorConfig::default()
    }
}

async fn start(dir: &Path, config: CoordinatorConfig) -> TestServer {
    TestServer::start_with(dir, config)
        .await
        .expect("the coordinator starts")
}

// ---------------------------------------------------------------------------------------
// Actions

fn execution(server: &TestServer) -> ExecutionClient<tonic::transport::Channel> {
    ExecutionClient::new(server.channel.clone())
}

fn operations(server: &TestServer) -> OperationsClient<tonic::transport::Channel> {
    OperationsClient::new(server.channel.clone())
}

async fn execute_with(
    server: &TestServer,
    action: &Digest,
    skip_cache_lookup: bool,
    priority: i32,
) -> Result<Streaming<Operation>, tonic::Status> {
    let request = ExecuteRequest {
        instance_name: String::new(),
        skip_cache_lookup,
        action_digest: Some(wire(action)),
        execution_policy: Some(ExecutionPolicy { priority }),
        digest_function: F.reapi_value(),
        ..Default::default()
    };
    Ok(execution(server).execute(request).await?.into_inner())
}

async fn execute(server: &TestServer, action: &Digest) -> Streaming<Operation> {
    execute_with(server, action, false, 0).await.unwrap()
}

/// The first message of a stream (the operation's name and stage).
async fn first(stream: &mut Streaming<Operation>) -> Operation {
    within(10, stream.message())
        .await
        .expect("no stream error")
        .expect("a first message")
}

fn response(operation: &Operation) -> ExecuteResponse {
    match &operation.result {
        Some(operation::Result::Response(any)) => {
            assert!(
                any.type_url.ends_with("ExecuteResponse"),
                "{}",
                any.type_url
            );
            ExecuteResponse::decode(any.value.as_slice()).expect("an ExecuteResponse")
        }
        other => panic!("operation {} has no response: {other:?}", operation.name),
    }
}

fn code(response: &ExecuteResponse) -> Code {
    Code::from_i32(response.status.as_ref().map_or(0, |s| s.code))
}

fn result(response: &ExecuteResponse) -> &ActionResult {
    response.result.as_ref().expect("an ActionResult")
}

async fn run_ok(server: &TestServer, action: &Digest) -> ExecuteResponse {
    let response = response(&finish(execute(server, action).await).await);
    assert_eq!(code(&response), Code::Ok, "{:?}", response.status);
    assert_eq!(result(&response).exit_code, 0, "{response:?}");
    response
}

// ---------------------------------------------------------------------------------------
// Workers

/// A real `kiln_worker::run` in this process.
pub(crate) struct RealWorker {
    task: JoinHandle<Result<(), WorkerError>>,
    shutdown: Option<oneshot::Sender<()>>,
    _work_dir: tempfile::TempDir,
}

impl RealWorker {
    pub(crate) fn start(server: &TestServer, id: &str, slots: usize) -> Self {
        Self::start_with_token(server, id, slots, TOKEN)
    }

    fn start_with_token(server: &TestServer, id: &str, slots: usize, token: &str) -> Self {
        let work_dir = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            coordinator: format!("grpc://{}", server.addr),
            slots,
            join_token: token.into(),
            work_dir: work_dir.path().to_path_buf(),
            sandbox: SandboxMode::None,
            worker_id: id.into(),
            ..WorkerConfig::default()
        };
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln_worker::run(config, async {
            let _ = signal.await;
        }));
        RealWorker {
            task,
            shutdown: Some(shutdown),
            _work_dir: work_dir,
        }
    }

    pub(crate) async fn stop(mut self) -> Result<(), WorkerError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        within(30, self.task).await.expect("no panic")
    }
}

/// A scripted worker: the test decides what it sends and when.
struct FakeWorker {
    outbound: mpsc::Sender<proto::WorkerMessage>,
    inbound: Streaming<proto::CoordinatorMessage>,
}

impl FakeWorker {
    /// Connects and registers; returns the worker and the coordinator's first answer.
    async fn connect(server: &TestServer, id: &str, slots: u32, token: &str) -> (Self, ToWorker) {
        let (outbound, receiver) = mpsc::channel(16);
        outbound
            .send(proto::WorkerMessage {
                message: Some(FromWorker::Register(proto::Register {
                    worker_id: id.into(),
                    slots,
                    version: "fake".into(),
                    join_token: token.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
        let inbound = WorkersClient::new(server.new_channel().await.unwrap())
            .connect(ReceiverStream::new(receiver))
            .await
            .expect("Connect is accepted")
            .into_inner();
        let mut worker = FakeWorker { outbound, inbound };
        let answer = worker.next().await.expect("an answer to Register");
        (worker, answer)
    }

    async fn join(server: &TestServer, id: &str, slots: u32) -> Self {
        let (worker, answer) = Self::connect(server, id, slots, TOKEN).await;
        assert!(matches!(answer, ToWorker::RegisterAck(_)), "{answer:?}");
        worker
    }

    /// The next message from the coordinator, or None when it ended the stream.
    async fn next(&mut self) -> Option<ToWorker> {
        within(20, self.inbound.message())
            .await
            .ok()
            .flatten()
            .and_then(|m| m.message)
    }

    async fn next_assign(&mut self) -> proto::Assign {
        match self.next().await {
            Some(ToWorker::Assign(assign)) => assign,
            other => panic!("expected an Assign, got {other:?}"),
        }
    }

    async fn send_result(&self, lease_id: &str, result: ActionResult) {
        self.outbound
            .send(proto::WorkerMessage {
                message: Some(FromWorker::Result(proto::LeaseResult {
                    lease_id: lease_id.into(),
                    action_result: Some(result),
                    status: Some(Default::default()),
                    execution_metadata: None,
                })),
            })
            .await
            .unwrap();
    }
}

fn assigned_action(assign: &proto::Assign) -> String {
    assign.action_digest.as_ref().unwrap().hash.clone()
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn execute_runs_remotely_then_hits_the_cache_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let worker = RealWorker::start(&server, "w1", 2);

    let (action, _) = upload_action(
        &server,
        Spec {
            argv: &[
                "sh",
                "-c",
                "cat in.txt > out.txt; echo ran >> out.txt; echo hello",
            ],
            output_files: &["out.txt"],
            inputs: &[("in.txt", b"input\n")],
            ..Spec::default()
        },
    )
    .await;
    let first_run = run_ok(&server, &action).await;
    assert!(!first_run.cached_result);
    let result = result(&first_run);
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    assert_eq!(result.output_files[0].path, "out.txt");
    let digest = result.output_files[0].digest.clone().unwrap();
    let out = server
        .read_blob(format!("blobs/{}/{}", digest.hash, digest.size_bytes))
        .await
        .unwrap();
    assert_eq!(out, b"input\nran\n");
    let stdout = result.stdout_digest.clone().expect("stdout is uploaded");
    let stdout = server
        .read_blob(format!("blobs/{}/{}", stdout.hash, stdout.size_bytes))
        .await
        .unwrap();
    assert_eq!(stdout, b"hello\n");

    // Every ExecutedActionMetadata timestamp is set, and they are in order.
    let meta = result
        .execution_metadata
        .as_ref()
        .expect("ExecutedActionMetadata");
    assert_eq!(meta.worker, "w1");
    let stamps = [
        ("queued", &meta.queued_timestamp),
        ("worker_start", &meta.worker_start_timestamp),
        ("input_fetch_start", &meta.input_fetch_start_timestamp),
        (
            "input_fetch_completed",
            &meta.input_fetch_completed_timestamp,
        ),
        ("execution_start", &meta.execution_start_timestamp),
        ("execution_completed", &meta.execution_completed_timestamp),
        ("output_upload_start", &meta.output_upload_start_timestamp),
        (
            "output_upload_completed",
            &meta.output_upload_completed_timestamp,
        ),
        ("worker_completed", &meta.worker_completed_timestamp),
    ];
    let mut previous = (0i64, 0i32);
    for (name, stamp) in stamps {
        let stamp = stamp
            .as_ref()
            .unwrap_or_else(|| panic!("{name} timestamp missing"));
        assert!(stamp.seconds > 0, "{name} is unset");
        let now = (stamp.seconds, stamp.nanos);
        assert!(now >= previous, "{name} {now:?} precedes {previous:?}");
        previous = now;
    }

    // The second Execute is answered from the action cache.
    let second = response(&finish(execute(&server, &action).await).await);
    assert!(second.cached_result, "{second:?}");
    assert_eq!(
        second.result.as_ref().unwrap().output_files,
        result.output_files
    );

    // skip_cache_lookup runs it again.
    let rerun = response(&finish(execute_with(&server, &action, true, 0).await.unwrap()).await);
    assert!(!rerun.cached_result);
    assert_eq!(code(&rerun), Code::Ok);
    let rerun_meta = rerun.result.unwrap().execution_metadata.unwrap();
    let start = |m: &reapi::ExecutedActionMetadata| {
        let t = m.worker_start_timestamp.unwrap();
        (t.seconds, t.nanos)
    };
    assert!(start(&rerun_meta) > start(meta), "the action ran again");

    // do_not_cache: it runs every time and is never cached.
    let (uncached, _) = upload_action(
        &server,
        Spec {
            argv: &["sh", "-c", "echo once"],
            do_not_cache: true,
            ..Spec::default()
        },
    )
    .await;
    for _ in 0..2 {
        let response = run_ok(&server, &uncached).await;
        assert!(!response.cached_result);
    }
    let lookup = reapi::action_cache_client::ActionCacheClient::new(server.channel.clone())
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(wire(&uncached)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), Code::NotFound);

    worker.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_concurrent_executes_share_one_operation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let action = shell_action(&server, "echo shared > o", &["o"]).await;

    // No worker yet: both stay queued and in flight together.
    let mut a = execute(&server, &action).await;
    let mut b = execute(&server, &action).await;
    let (first_a, first_b) = (first(&mut a).await, first(&mut b).await);
    assert_eq!(first_a.name, first_b.name);
    assert!(!first_a.done);

    let worker = RealWorker::start(&server, "w1", 2);
    let (done_a, done_b) = tokio::join!(finish(a), finish(b));
    assert_eq!(done_a.name, done_b.name);
    assert_eq!(response(&done_a), response(&done_b));
    assert_eq!(code(&response(&done_a)), Code::Ok);
    worker.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_priority_actions_are_assigned_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let low = shell_action(&server, "echo low", &[]).await;
    let high = shell_action(&server, "echo high", &[]).await;
    // Queue the low-priority one first; REAPI: lower values run sooner.
    let mut low_stream = execute_with(&server, &low, false, 10).await.unwrap();
    first(&mut low_stream).await;
    let mut high_stream = execute_with(&server, &high, false, -10).await.unwrap();
    first(&mut high_stream).await;

    let mut worker = FakeWorker::join(&server, "one-slot", 1).await;
    let assign = worker.next_assign().await;
    assert_eq!(
        assigned_action(&assign),
        high.hex(),
        "the high priority action comes first"
    );
    worker
        .send_result(&assign.lease_id, ActionResult::default())
        .await;
    let next = worker.next_assign().await;
    assert_eq!(assigned_action(&next), low.hex());
    worker
        .send_result(&next.lease_id, ActionResult::default())
        .await;
    assert_eq!(code(&response(&finish(high_stream).await)), Code::Ok);
    assert_eq!(code(&response(&finish(low_stream).await)), Code::Ok);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_assign_carries_the_action_and_command_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let action = shell_action(&server, "echo carried", &[]).await;
    let mut stream = execute_with(&server, &action, false, 0).await.unwrap();
    first(&mut stream).await;

    let mut worker = FakeWorker::join(&server, "inline", 1).await;
    let assign = worker.next_assign().await;
    // The worker can run it without asking the CAS for either message.
    assert_eq!(Digest::of_bytes(F, &assign.action), action);
    let carried = Action::decode(assign.action.as_slice()).unwrap();
    let command_digest = carried.command_digest.unwrap();
    assert_eq!(wire(&Digest::of_bytes(F, &assign.command)), command_digest);
    let command = Command::decode(assign.command.as_slice()).unwrap();
    assert_eq!(command.arguments, ["sh", "-c", "echo carried"]);
    worker
        .send_result(&assign.lease_id, ActionResult::default())
        .await;
    assert_eq!(code(&response(&finish(stream).await)), Code::Ok);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_input_root_is_failed_precondition_with_missing_violations() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let (action, root) = upload_action(
        &server,
        Spec {
            inputs: &[("a", b"a")],
            skip_input_root: true,
            ..Spec::default()
        },
    )
    .await;
    let status = execute_with(&server, &action, false, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let failure = status
        .get_details_precondition_failure()
        .expect("a PreconditionFailure detail");
    assert!(
        failure
            .violations
            .iter()
            .any(|v| v.r#type == "MISSING" && v.subject.contains(&root.hex())),
        "{failure:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_and_escaping_outputs_are_errors_in_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let worker = RealWorker::start(&server, "w1", 2);

    let (slow, _) = upload_action(
        &server,
        Spec {
            argv: &["sh", "-c", "echo started; sleep 30"],
            timeout_secs: 1,
            ..Spec::default()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let timed_out = response(&finish(execute(&server, &slow).await).await);
    assert_eq!(code(&timed_out), Code::DeadlineExceeded, "{timed_out:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!timed_out.cached_result);

    let escape = shell_action(&server, "echo x > ../x", &["../x"]).await;
    let escaped = response(&finish(execute(&server, &escape).await).await);
    assert_eq!(code(&escaped), Code::InvalidArgument, "{escaped:?}");
    let message = &escaped.status.as_ref().unwrap().message;
    assert!(message.contains("escapes"), "{message}");

    // Neither failure was cached.
    let again = response(&finish(execute(&server, &escape).await).await);
    assert!(!again.cached_result);
    worker.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_execution_resumes_an_operation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let action = shell_action(&server, "sleep 1; echo resumed > r", &["r"]).await;
    let mut stream = execute(&server, &action).await;
    let name = first(&mut stream).await.name;
    drop(stream);

    let worker = RealWorker::start(&server, "w1", 1);
    let resumed = execution(&server)
        .wait_execution(WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let done = finish(resumed).await;
    assert_eq!(done.name, name);
    assert_eq!(code(&response(&done)), Code::Ok);
    assert_eq!(result(&response(&done)).output_files[0].path, "r");

    let unknown = execution(&server)
        .wait_execution(WaitExecutionRequest {
            name: "operations/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    worker.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_a_wrong_join_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let (_, answer) = FakeWorker::connect(&server, "intruder", 1, "wrong").await;
    match answer {
        ToWorker::Rejected(rejected) => assert!(rejected.reason.contains("join token")),
        other => panic!("expected Rejected, got {other:?}"),
    }
    let real = RealWorker::start_with_token(&server, "intruder", 1, "wrong");
    match within(20, real.task).await.unwrap() {
        Err(WorkerError::Rejected(reason)) => assert!(reason.contains("join token"), "{reason}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_action_whose_worker_disconnects_completes_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let mut doomed = FakeWorker::join(&server, "doomed", 1).await;
    let action = shell_action(&server, "echo survived > s", &["s"]).await;
    let stream = execute(&server, &action).await;
    let assign = doomed.next_assign().await;
    assert_eq!(assigned_action(&assign), action.hex());

    let rescuer = RealWorker::start(&server, "rescuer", 1);
    server
        .status_when(|s| s.workers.iter().any(|w| w.id == "rescuer"))
        .await;
    drop(doomed); // the stream breaks mid-action
    let done = response(&finish(stream).await);
    assert_eq!(code(&done), Code::Ok, "{done:?}");
    assert_eq!(
        result(&done).execution_metadata.as_ref().unwrap().worker,
        "rescuer"
    );
    rescuer.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_misses_heartbeats_loses_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        CoordinatorConfig {
            heartbeat_interval_ms: 200,
            heartbeat_timeout_secs: 2,
            ..config()
        },
    )
    .await;
    let mut silent = FakeWorker::join(&server, "silent", 1).await;
    let action = shell_action(&server, "echo beat > b", &["b"]).await;
    let stream = execute(&server, &action).await;
    let assign = silent.next_assign().await;
    assert_eq!(assigned_action(&assign), action.hex());
    // The silent worker keeps its stream open but never heartbeats.
    let rescuer = RealWorker::start(&server, "rescuer", 1);
    let done = response(&finish(stream).await);
    assert_eq!(code(&done), Code::Ok, "{done:?}");
    assert_eq!(
        result(&done).execution_metadata.as_ref().unwrap().worker,
        "rescuer"
    );
    // The coordinator dropped the silent worker: its stream has ended.
    assert!(
        silent.next().await.is_none(),
        "the silent worker was let go"
    );
    // A late result for the lost lease changes nothing.
    silent
        .send_result(&assign.lease_id, ActionResult::default())
        .await;
    rescuer.stop().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        CoordinatorConfig {
            max_attempts: 2,
            ..config()
        },
    )
    .await;
    let action = shell_action(&server, "echo never", &[]).await;
    let stream = execute(&server, &action).await;
    for attempt in 1..=2 {
        let mut worker = FakeWorker::join(&server, &format!("flaky-{attempt}"), 1).await;
        let assign = worker.next_assign().await;
        assert_eq!(assigned_action(&assign), action.hex());
        drop(worker);
    }
    let done = response(&finish(stream).await);
    assert_eq!(code(&done), Code::Unavailable, "{done:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_operation_cancels_queued_and_running_actions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;

    // Queued: no worker is connected.
    let queued = shell_action(&server, "echo queued", &[]).await;
    let mut stream = execute(&server, &queued).await;
    let name = first(&mut stream).await.name;
    operations(&server)
        .cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let done = response(&finish(stream).await);
    assert_eq!(code(&done), Code::Cancelled);

    // Running: the worker is told to stop the lease.
    let mut worker = FakeWorker::join(&server, "busy", 1).await;
    let running = shell_action(&server, "sleep 30", &[]).await;
    let mut stream = execute(&server, &running).await;
    let name = first(&mut stream).await.name;
    let assign = worker.next_assign().await;
    operations(&server)
        .cancel_operation(CancelOperationRequest { name })
        .await
        .unwrap();
    match worker.next().await {
        Some(ToWorker::Cancel(cancel)) => assert_eq!(cancel.lease_id, assign.lease_id),
        other => panic!("expected a Cancel, got {other:?}"),
    }
    let done = response(&finish(stream).await);
    assert_eq!(code(&done), Code::Cancelled);

    // The slot is free again: the next action is assigned to the same worker.
    let next = shell_action(&server, "echo next", &[]).await;
    let stream = execute(&server, &next).await;
    let assign = worker.next_assign().await;
    assert_eq!(assigned_action(&assign), next.hex());
    worker
        .send_result(&assign.lease_id, ActionResult::default())
        .await;
    assert_eq!(code(&response(&finish(stream).await)), Code::Ok);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_actions_survive_a_coordinator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), config()).await;
    let mut names = Vec::new();
    let mut actions = Vec::new();
    for i in 0..3 {
        let action = shell_action(&server, &format!("echo {i} > out"), &["out"]).await;
        let mut stream = execute(&server, &action).await;
        names.push(first(&mut stream).await.name);
        actions.push(action);
    }
    server.stop().await.unwrap();

    let server = start(dir.path(), config()).await;
    let worker = RealWorker::start(&server, "after-restart", 2);
    for (i, name) in names.iter().enumerate() {
        let stream = execution(&server)
            .wait_execution(WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        let done = finish(stream).await;
        let response = response(&done);
        assert_eq!(code(&response), Code::Ok, "{response:?}");
        let out = &result(&response).output_files[0];
        let digest = out.digest.clone().unwrap();
        let data = server
            .read_blob(format!("blobs/{}/{}", digest.hash, digest.size_bytes))
            .await
            .unwrap();
        assert_eq!(data, format!("{i}\n").as_bytes());
    }
    // And they were cached.
    for action in &actions {
        let cached = response(&finish(execute(&server, action).await).await);
        assert!(cached.cached_result);
    }
    worker.stop().await.unwrap();
    server.stop().await.unwrap();
}
