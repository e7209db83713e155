//! Shared setup for kiln-client's integration tests:
//!
//! - [`TestCoordinator`]: the real coordinator (CAS, ByteStream, ActionCache) on
//!   127.0.0.1:0 over a temp-dir FsBlobStore and SledMetadataStore;
//! - [`FakeExecution`]: a real tonic Execution service on its own 127.0.0.1:0 port that
//!   stands in for the coordinator's scheduler and workers until they exist. It reads
//!   the Action, Command and input tree back from the coordinator's CAS, refuses missing
//!   inputs with FAILED_PRECONDITION/MISSING, "runs" the command with a tiny interpreter
//!   (below), uploads outputs, and caches successful results in the real action cache.
//!
//! The interpreter understands these arguments after `fake`:
//! `echo=TEXT` (a stdout line), `err=TEXT` (a stderr line), `read=PATH` (the input file's
//! content to stdout), `out=PATH:TEXT` (an output file), `exe=PATH:TEXT` (an executable
//! output file), `dir=PATH:TAG` (an output directory with `a.txt`, `sub/b.txt` and a
//! symlink `link -> a.txt`), `link=PATH:TARGET` (an output symlink), `exit=N`,
//! `unrunnable=1` (the operation fails without a result) and `deadline=1` (the result
//! comes back with DEADLINE_EXCEEDED, as a timed-out action's does).
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_client::{from_reapi, request_metadata_of, BlobSet, Invocation, NoProgress, RemoteCas};
use kiln_coordinator::CoordinatorConfig;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::{self, execution_server::Execution, execution_server::ExecutionServer};
use kiln_store::{BlobStore, Digest, DigestFunction};
use kiln_testkit::{ServedCoordinator, Stores};
use prost::Message;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Server};

/// The real coordinator, on memory stores.
pub struct TestCoordinator {
    pub url: String,
    pub blobs: Arc<dyn BlobStore>,
    server: ServedCoordinator,
}

impl TestCoordinator {
    pub async fn start() -> anyhow::Result<Self> {
        let server = ServedCoordinator::start(CoordinatorConfig::default(), Stores::Memory).await?;
        Ok(TestCoordinator {
            url: server.grpc_url(),
            blobs: server.stores.blobs.clone(),
            server,
        })
    }

    pub async fn connect(&self, function: DigestFunction) -> anyhow::Result<RemoteCas> {
        Ok(RemoteCas::connect(&self.url, "", function, Invocation::new()).await?)
    }

    pub async fn has(&self, digest: &Digest) -> anyhow::Result<bool> {
        Ok(self.blobs.has_many(&[*digest]).await?[0])
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await
    }
}

/// What the fake Execution service saw and how it should misbehave.
#[derive(Default)]
pub struct ExecutionLog {
    /// Actions actually run (not served from the cache), by action digest hash.
    pub executions: Mutex<HashMap<String, u32>>,
    pub execute_calls: AtomicU32,
    pub wait_calls: AtomicU32,
    pub metadata: Mutex<Vec<reapi::RequestMetadata>>,
    /// Break the next Execute stream after its first update (a coordinator restart).
    pub break_next_stream: AtomicBool,
    /// Delete this blob from the CAS just before the next Execute validates its inputs.
    pub lose_before_execute: Mutex<Option<Digest>>,
    pub missing_reported: AtomicU32,
}

impl ExecutionLog {
    pub fn execution_counts(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self.executions.lock().unwrap().values().copied().collect();
        counts.sort_unstable();
        counts
    }
}

pub struct FakeExecution {
    pub addr: SocketAddr,
    pub log: Arc<ExecutionLog>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl FakeExecution {
    pub async fn start(
        coordinator: &TestCoordinator,
        function: DigestFunction,
    ) -> anyhow::Result<Self> {
        let cas = coordinator.connect(function).await?;
        let log = Arc::new(ExecutionLog::default());
        let service = FakeExecutionService {
            cas,
            store: coordinator.blobs.clone(),
            log: log.clone(),
            finished: Arc::new(Mutex::new(HashMap::new())),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            Server::builder()
                .add_service(ExecutionServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Ok(FakeExecution {
            addr,
            log,
            shutdown: Some(shutdown),
        })
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }
}

impl Drop for FakeExecution {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

#[derive(Clone)]
struct FakeExecutionService {
    cas: RemoteCas,
    store: Arc<dyn BlobStore>,
    log: Arc<ExecutionLog>,
    /// Finished operations by name, for WaitExecution.
    finished: Arc<Mutex<HashMap<String, Operation>>>,
}

type OperationStream = BoxStream<'static, Result<Operation, tonic::Status>>;

#[tonic::async_trait]
impl Execution for FakeExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: tonic::Request<reapi::ExecuteRequest>,
    ) -> Result<tonic::Response<OperationStream>, tonic::Status> {
        self.log.execute_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(metadata) = request_metadata_of(&request) {
            self.log.metadata.lock().unwrap().push(metadata);
        }
        let request = request.into_inner();
        let function = self.cas.digest_function();
        let action_digest = from_reapi(function, request.action_digest.as_ref(), "action")
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let response = self
            .respond(&action_digest, request.skip_cache_lookup)
            .await?;
        let running = Operation {
            name: name.clone(),
            metadata: Some(any(
                "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
                &reapi::ExecuteOperationMetadata {
                    stage: reapi::execution_stage::Value::Executing as i32,
                    action_digest: Some(action_digest.to_reapi()),
                    ..Default::default()
                },
            )),
            done: false,
            result: None,
        };
        let done = Operation {
            name: name.clone(),
            metadata: None,
            done: true,
            result: Some(response),
        };
        if self.log.break_next_stream.swap(false, Ordering::SeqCst) {
            self.finished.lock().unwrap().insert(name, done);
            let updates = vec![
                Ok(running),
                Err(tonic::Status::unavailable("coordinator restarting")),
            ];
            return Ok(tonic::Response::new(futures::stream::iter(updates).boxed()));
        }
        Ok(tonic::Response::new(
            futures::stream::iter(vec![Ok(running), Ok(done)]).boxed(),
        ))
    }

    async fn wait_execution(
        &self,
        request: tonic::Request<reapi::WaitExecutionRequest>,
    ) -> Result<tonic::Response<OperationStream>, tonic::Status> {
        self.log.wait_calls.fetch_add(1, Ordering::SeqCst);
        let name = request.into_inner().name;
        let operation = self
            .finished
            .lock()
            .unwrap()
            .get(&name)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found(format!("no operation {name}")))?;
        Ok(tonic::Response::new(
            futures::stream::iter(vec![Ok(operation)]).boxed(),
        ))
    }
}

fn any(type_name: &str, message: &impl Message) -> kiln_proto::protobuf::Any {
    kiln_proto::protobuf::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

fn internal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(e.to_string())
}

impl FakeExecutionService {
    /// The operation's final result: a cached or fresh ExecuteResponse, or an error.
    async fn respond(
        &self,
        action_digest: &Digest,
        skip_cache_lookup: bool,
    ) -> Result<operation::Result, tonic::Status> {
        let execute_response = |response: reapi::ExecuteResponse| {
            operation::Result::Response(any(
                "build.bazel.remote.execution.v2.ExecuteResponse",
                &response,
            ))
        };
        if !skip_cache_lookup {
            if let Some(result) = self
                .cas
                .get_action_result(action_digest)
                .await
                .map_err(internal)?
            {
                return Ok(execute_response(reapi::ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    ..Default::default()
                }));
            }
        }
        let lost = self.log.lose_before_execute.lock().unwrap().take();
        if let Some(lost) = lost {
            self.store
                .delete(&lost.content_hash())
                .await
                .map_err(internal)?;
        }
        let inputs = match self.load_inputs(action_digest).await? {
            Ok(inputs) => inputs,
            Err(missing) => {
                self.log.missing_reported.fetch_add(1, Ordering::SeqCst);
                return Ok(execute_response(reapi::ExecuteResponse {
                    status: Some(missing_status(&missing)),
                    ..Default::default()
                }));
            }
        };
        if inputs.command.arguments.iter().any(|a| a == "unrunnable=1") {
            return Ok(operation::Result::Error(kiln_proto::rpc::Status {
                code: tonic::Code::Internal as i32,
                message: "the worker crashed".into(),
                details: vec![],
            }));
        }
        let result = self.run(&inputs).await?;
        if inputs.command.arguments.iter().any(|a| a == "deadline=1") {
            return Ok(execute_response(reapi::ExecuteResponse {
                result: Some(result),
                status: Some(kiln_proto::rpc::Status {
                    code: tonic::Code::DeadlineExceeded as i32,
                    message: "the action ran past its timeout".into(),
                    details: vec![],
                }),
                ..Default::default()
            }));
        }
        *self
            .log
            .executions
            .lock()
            .unwrap()
            .entry(action_digest.hex())
            .or_default() += 1;
        if result.exit_code == 0 && !inputs.action.do_not_cache {
            self.cas
                .update_action_result(action_digest, result.clone())
                .await
                .map_err(internal)?;
        }
        Ok(execute_response(reapi::ExecuteResponse {
            result: Some(result),
            cached_result: false,
            message: "ran on the fake executor".into(),
            ..Default::default()
        }))
    }

    /// The action, its command and its input files, or the digests that are missing.
    async fn load_inputs(
        &self,
        action_digest: &Digest,
    ) -> Result<Result<Inputs, Vec<Digest>>, tonic::Status> {
        let function = self.cas.digest_function();
        let missing = self
            .cas
            .find_missing([*action_digest])
            .await
            .map_err(internal)?;
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        let action: reapi::Action = self
            .cas
            .read_message(action_digest)
            .await
            .map_err(internal)?;
        let command_digest =
            from_reapi(function, action.command_digest.as_ref(), "command").map_err(internal)?;
        let root_digest = from_reapi(function, action.input_root_digest.as_ref(), "input root")
            .map_err(internal)?;
        let mut missing = self
            .cas
            .find_missing([command_digest, root_digest])
            .await
            .map_err(internal)?;
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        let command: reapi::Command = self
            .cas
            .read_message(&command_digest)
            .await
            .map_err(internal)?;
        let mut files = HashMap::new();
        let mut pending = vec![(String::new(), root_digest)];
        while let Some((prefix, digest)) = pending.pop() {
            let directory: reapi::Directory =
                self.cas.read_message(&digest).await.map_err(internal)?;
            for file in directory.files {
                let digest =
                    from_reapi(function, file.digest.as_ref(), "file").map_err(internal)?;
                files.insert(format!("{prefix}{}", file.name), digest);
            }
            for child in directory.directories {
                let digest =
                    from_reapi(function, child.digest.as_ref(), "dir").map_err(internal)?;
                pending.push((format!("{prefix}{}/", child.name), digest));
            }
        }
        missing = self
            .cas
            .find_missing(files.values().copied())
            .await
            .map_err(internal)?;
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        Ok(Ok(Inputs {
            action,
            command,
            files,
        }))
    }

    async fn run(&self, inputs: &Inputs) -> Result<reapi::ActionResult, tonic::Status> {
        let function = self.cas.digest_function();
        let mut blobs = BlobSet::new();
        let mut result = reapi::ActionResult::default();
        let mut stdout = String::new();
        let mut stderr = String::new();
        for env in &inputs.command.environment_variables {
            if env.name.starts_with("TEST_") {
                stdout.push_str(&format!("{}={}\n", env.name, env.value));
            }
        }
        for argument in inputs.command.arguments.iter().skip(1) {
            let (verb, rest) = argument.split_once('=').unwrap_or((argument, ""));
            let (path, text) = rest.split_once(':').unwrap_or((rest, ""));
            match verb {
                "echo" => stdout.push_str(&format!("{rest}\n")),
                "err" => stderr.push_str(&format!("{rest}\n")),
                "read" => {
                    let digest = inputs.files.get(rest).ok_or_else(|| {
                        tonic::Status::failed_precondition(format!("no input {rest}"))
                    })?;
                    let data = self.cas.read_blob(digest).await.map_err(internal)?;
                    stdout.push_str(&String::from_utf8_lossy(&data));
                }
                "out" | "exe" => {
                    let digest = blobs.add_bytes(function, Bytes::from(text.to_string()));
                    result.output_files.push(reapi::OutputFile {
                        path: path.to_string(),
                        digest: Some(digest.to_reapi()),
                        is_executable: verb == "exe",
                        ..Default::default()
                    });
                }
                "dir" => {
                    let tree = sample_tree(function, text, &mut blobs);
                    let tree_digest = blobs.add_bytes(function, Bytes::from(tree.encode_to_vec()));
                    result.output_directories.push(reapi::OutputDirectory {
                        path: path.to_string(),
                        tree_digest: Some(tree_digest.to_reapi()),
                        ..Default::default()
                    });
                }
                "link" => result.output_symlinks.push(reapi::OutputSymlink {
                    path: path.to_string(),
                    target: text.to_string(),
                    node_properties: None,
                }),
                "exit" => result.exit_code = rest.parse().map_err(internal)?,
                _ => {}
            }
        }
        // stdout through the CAS (so the client must fetch it), stderr inlined.
        let stdout_digest = blobs.add_bytes(function, Bytes::from(stdout));
        result.stdout_digest = Some(stdout_digest.to_reapi());
        result.stderr_raw = stderr.into_bytes();
        self.cas
            .upload_missing(&blobs, &NoProgress)
            .await
            .map_err(internal)?;
        Ok(result)
    }
}

struct Inputs {
    action: reapi::Action,
    command: reapi::Command,
    files: HashMap<String, Digest>,
}

/// `a.txt` = "A{tag}", `sub/b.txt` = "B{tag}" (executable), `link -> a.txt`.
fn sample_tree(function: DigestFunction, tag: &str, blobs: &mut BlobSet) -> reapi::Tree {
    let a = blobs.add_bytes(function, Bytes::from(format!("A{tag}")));
    let b = blobs.add_bytes(function, Bytes::from(format!("B{tag}")));
    let sub = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "b.txt".into(),
            digest: Some(b.to_reapi()),
            is_executable: true,
            node_properties: None,
        }],
        ..Default::default()
    };
    let sub_digest = Digest::of_bytes(function, &sub.encode_to_vec());
    let root = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "a.txt".into(),
            digest: Some(a.to_reapi()),
            is_executable: false,
            node_properties: None,
        }],
        directories: vec![reapi::DirectoryNode {
            name: "sub".into(),
            digest: Some(sub_digest.to_reapi()),
        }],
        symlinks: vec![reapi::SymlinkNode {
            name: "link".into(),
            target: "a.txt".into(),
            node_properties: None,
        }],
        node_properties: None,
    };
    reapi::Tree {
        root: Some(root),
        children: vec![sub],
    }
}

fn missing_status(missing: &[Digest]) -> kiln_proto::rpc::Status {
    let failure = tonic_types::pb::PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| tonic_types::pb::precondition_failure::Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}", d.reapi()),
                description: String::new(),
            })
            .collect(),
    };
    kiln_proto::rpc::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: "inputs are missing".into(),
        details: vec![any("google.rpc.PreconditionFailure", &failure)],
    }
}

/// Writes `content` at `root/relative` with an mtime an hour ago, so the digest cache
/// trusts it (files modified within the last seconds are never cached).
pub fn write_old(root: &Path, relative: &str, content: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    set_old_mtime(&path);
}

pub fn set_old_mtime(path: &Path) {
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(an_hour_ago).unwrap();
}
