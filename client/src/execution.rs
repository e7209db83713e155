//! Executing one action: the [`Executor`] trait (REAPI's Execution service, or anything
//! that behaves like it) and [`execute_to_completion`], which follows the operation
//! stream to its end and resumes with `WaitExecution` when the stream breaks.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::{self, execution_client::ExecutionClient};
use prost::Message;
use tonic::transport::Channel;

use crate::request_metadata::{request_with, Credentials};
use crate::retry::is_transient;
use crate::{ClientError, Result};

/// The updates of one operation, ending with the one that has `done` set.
pub type OperationStream = BoxStream<'static, Result<Operation, tonic::Status>>;

/// REAPI's Execution service, as the client needs it.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    async fn execute(
        &self,
        request: reapi::ExecuteRequest,
        metadata: &reapi::RequestMetadata,
    ) -> Result<OperationStream, tonic::Status>;

    async fn wait_execution(
        &self,
        operation_name: String,
        metadata: &reapi::RequestMetadata,
    ) -> Result<OperationStream, tonic::Status>;
}

/// The Execution service of a REAPI server over gRPC.
#[derive(Clone)]
pub struct GrpcExecutor {
    client: ExecutionClient<kiln_telemetry::TracedChannel>,
    credentials: Option<Credentials>,
}

impl GrpcExecutor {
    /// An executor whose calls carry `credentials`, when the server wants a token.
    pub fn new(channel: Channel, credentials: Option<Credentials>) -> Self {
        GrpcExecutor {
            client: ExecutionClient::new(kiln_telemetry::traced(channel))
                .max_decoding_message_size(256 << 20),
            credentials,
        }
    }

    fn request<T>(&self, message: T, metadata: &reapi::RequestMetadata) -> tonic::Request<T> {
        let mut request = request_with(message, metadata);
        if let Some(credentials) = &self.credentials {
            credentials.apply(&mut request);
        }
        request
    }
}

#[async_trait::async_trait]
impl Executor for GrpcExecutor {
    async fn execute(
        &self,
        request: reapi::ExecuteRequest,
        metadata: &reapi::RequestMetadata,
    ) -> Result<OperationStream, tonic::Status> {
        let stream = self
            .client
            .clone()
            .execute(self.request(request, metadata))
            .await?
            .into_inner();
        Ok(stream.boxed())
    }

    async fn wait_execution(
        &self,
        operation_name: String,
        metadata: &reapi::RequestMetadata,
    ) -> Result<OperationStream, tonic::Status> {
        let stream = self
            .client
            .clone()
            .wait_execution(self.request(
                reapi::WaitExecutionRequest {
                    name: operation_name,
                },
                metadata,
            ))
            .await?
            .into_inner();
        Ok(stream.boxed())
    }
}

/// How hard to try when the operation stream breaks (a coordinator restart, say).
#[derive(Clone, Copy, Debug)]
pub struct ResumePolicy {
    /// Reconnection attempts for one action before giving up.
    pub max_attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ResumePolicy {
    fn default() -> Self {
        ResumePolicy {
            max_attempts: 10,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// How long to wait for the server to end an operation stream after its final update.
const STREAM_END_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Executes `request` and waits for its final `ExecuteResponse`.
///
/// If the stream breaks or ends before the operation is done, the operation is resumed
/// with `WaitExecution`; if the server no longer knows it (NOT_FOUND, e.g. after a
/// restart that lost it), the action is submitted again. Either way the retries follow
/// `policy`. A FAILED_PRECONDITION from the Execute call is returned as is, for the
/// caller to upload missing inputs.
#[tracing::instrument(level = "debug", name = "remote_action", skip_all)]
pub async fn execute_to_completion(
    executor: &dyn Executor,
    request: &reapi::ExecuteRequest,
    metadata: &reapi::RequestMetadata,
    policy: ResumePolicy,
) -> Result<reapi::ExecuteResponse> {
    let mut attempts = 0;
    let mut backoff = policy.first_backoff;
    let mut operation_name: Option<String> = None;
    loop {
        let opened = match &operation_name {
            Some(name) => match executor.wait_execution(name.clone(), metadata).await {
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::info!(operation = %name, "operation unknown to the server; submitting again");
                    operation_name = None;
                    executor.execute(request.clone(), metadata).await
                }
                other => other,
            },
            None => executor.execute(request.clone(), metadata).await,
        };
        let broken = match opened {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Some(Ok(operation)) => {
                        if !operation.name.is_empty() {
                            operation_name = Some(operation.name.clone());
                        }
                        if operation.done {
                            // Read the stream to its end: dropping it early makes HTTP/2
                            // reset it, and servers close a connection after enough
                            // resets (h2 allows 1,024), which a large sharded run hits.
                            // Bounded, for servers that keep a finished stream open.
                            let rest = async { while stream.next().await.is_some() {} };
                            let _ = tokio::time::timeout(STREAM_END_GRACE, rest).await;
                            return finished_operation(operation);
                        }
                    }
                    Some(Err(status)) if is_transient(&status) => break status,
                    Some(Err(status)) => return Err(execute_error(status)),
                    None => {
                        break tonic::Status::unavailable(
                            "the operation stream ended before the action finished",
                        )
                    }
                }
            },
            Err(status) if is_transient(&status) => status,
            Err(status) => return Err(execute_error(status)),
        };
        attempts += 1;
        if attempts > policy.max_attempts {
            return Err(ClientError::rpc("Execute", broken));
        }
        tracing::warn!(status = %broken.message(), attempt = attempts, "execution stream broke; resuming");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

fn execute_error(status: tonic::Status) -> ClientError {
    if status.code() == tonic::Code::Unimplemented {
        return ClientError::Unsupported(format!(
            "remote execution (the Execution service answered UNIMPLEMENTED: {})",
            status.message()
        ));
    }
    ClientError::rpc("Execute", status)
}

fn finished_operation(operation: Operation) -> Result<reapi::ExecuteResponse> {
    match operation.result {
        Some(operation::Result::Response(any)) => {
            if !any
                .type_url
                .ends_with("build.bazel.remote.execution.v2.ExecuteResponse")
            {
                return Err(ClientError::InvalidResponse(format!(
                    "operation {} finished with a {} instead of an ExecuteResponse",
                    operation.name, any.type_url
                )));
            }
            reapi::ExecuteResponse::decode(any.value.as_slice()).map_err(|e| {
                ClientError::InvalidResponse(format!("undecodable ExecuteResponse: {e}"))
            })
        }
        Some(operation::Result::Error(status)) => {
            Err(ClientError::rpc("Execute", rpc_status_to_tonic(&status)))
        }
        None => Err(ClientError::InvalidResponse(format!(
            "operation {} is done but has neither a response nor an error",
            operation.name
        ))),
    }
}

/// Converts a `google.rpc.Status` (as carried in operations and ExecuteResponses) to a
/// tonic status, keeping its details.
pub fn rpc_status_to_tonic(status: &kiln_proto::rpc::Status) -> tonic::Status {
    tonic::Status::with_details(
        tonic::Code::from(status.code),
        status.message.clone(),
        bytes::Bytes::from(status.encode_to_vec()),
    )
}

/// The blobs a FAILED_PRECONDITION status names as MISSING (`blobs/{hash}/{size}`), or
/// `None` if the status is something else.
pub fn missing_blobs(
    status: &tonic::Status,
    function: kiln_store::DigestFunction,
) -> Option<Vec<kiln_store::Digest>> {
    use tonic_types::StatusExt;
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let failure = status.get_details_precondition_failure()?;
    let missing: Vec<_> = failure
        .violations
        .iter()
        .filter(|v| v.r#type == kiln_store::MISSING_VIOLATION)
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(
        missing
            .iter()
            .filter_map(|v| kiln_store::parse_missing_blob_subject(function, &v.subject))
            .collect(),
    )
}
