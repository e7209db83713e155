//! What the coordinator's trace tests run in their traced "processes" (from
//! `kiln_telemetry::receiver::TraceCollector`, each with its own tracer provider and
//! `service.name`): a real worker and a traced client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::prost::Message;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse};
use kiln_store::{Digest, DigestFunction};
use kiln_telemetry::receiver::TracedRuntime;
use kiln_worker::{SandboxMode, WorkerConfig, WorkerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Streaming;

use super::actions::{upload_action, Spec};
use super::{wire, TestServer};

/// How long a test waits for the spans it asserts on: those that close after a client
/// has its answer (a worker's `action`) arrive a little later.
pub const SPANS_TIMEOUT: Duration = Duration::from_secs(20);

/// A real `kiln_worker::run`, spawned on a traced process.
pub struct TracedWorker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl TracedWorker {
    pub fn start(
        process: &TracedRuntime,
        coordinator: SocketAddr,
        worker_id: &str,
        join_token: &str,
        work_dir: PathBuf,
    ) -> Self {
        let config = WorkerConfig {
            coordinator: format!("grpc://{coordinator}"),
            slots: 1,
            join_token: join_token.into(),
            work_dir,
            sandbox: SandboxMode::None,
            worker_id: worker_id.into(),
            ..WorkerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = process.runtime.spawn(kiln_worker::run(config, async {
            let _ = stopped.await;
        }));
        TracedWorker { stop, task }
    }

    /// Waits for the worker to end on its own (refused, or drained by the coordinator).
    pub fn ended(self, process: &TracedRuntime) -> Result<(), WorkerError> {
        // Dropping the sender would ask the worker to stop.
        let TracedWorker {
            stop: _not_yet,
            task,
        } = self;
        wait_for(process, task)
    }

    /// Asks the worker to drain and waits for it to stop.
    pub fn stop(self, process: &TracedRuntime) -> Result<(), WorkerError> {
        let _ = self.stop.send(());
        wait_for(process, self.task)
    }
}

fn wait_for(
    process: &TracedRuntime,
    task: JoinHandle<Result<(), WorkerError>>,
) -> Result<(), WorkerError> {
    process
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .expect("the worker ends")
        .expect("the worker task does not panic")
}

/// `sh -c 'cat in.txt > out.txt'` over an input root holding `in.txt`: each of the
/// worker's stages has work to do (fetch the input, run, upload the output).
pub async fn upload_traced_action(server: &TestServer) -> Digest {
    let spec = Spec {
        argv: &["sh", "-c", "cat in.txt > out.txt"],
        output_files: &["out.txt"],
        inputs: &[("in.txt", b"traced input\n")],
        ..Spec::default()
    };
    upload_action(server, spec).await.0
}

/// An Execute of `action` (SHA-256), for callers that add metadata.
pub fn execute_request(action: &Digest) -> tonic::Request<ExecuteRequest> {
    tonic::Request::new(ExecuteRequest {
        action_digest: Some(wire(action)),
        digest_function: DigestFunction::Sha256.reapi_value(),
        ..Default::default()
    })
}

/// Calls Execute as `kiln run` does: through a traced channel, which opens the client
/// span and sends its context.
pub async fn traced_execute(
    channel: Channel,
    request: tonic::Request<ExecuteRequest>,
) -> Streaming<Operation> {
    ExecutionClient::new(kiln_telemetry::traced(channel))
        .execute(request)
        .await
        .expect("Execute is accepted")
        .into_inner()
}

/// The ExecuteResponse of a finished operation.
pub fn response_of(operation: &Operation) -> ExecuteResponse {
    let Some(operation::Result::Response(any)) = &operation.result else {
        panic!("no ExecuteResponse in {operation:?}");
    };
    ExecuteResponse::decode(any.value.as_slice()).expect("an ExecuteResponse")
}
