//! A follower's side of the calls only the leader can answer: each is sent on to the
//! leader as it came (its metadata, so its credentials, included) and the leader's answer,
//! stream or error, comes back unchanged.

use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_proto::admin::v1::admin_client::AdminClient;
use kiln_proto::admin::v1::{
    DrainWorkerRequest, DrainWorkerResponse, FarmStatus, GetStatusRequest,
};
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, ListOperationsResponse,
    Operation,
};
use kiln_proto::protobuf::Empty;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{ExecuteRequest, WaitExecutionRequest};
use kiln_proto::worker::v1::workers_client::WorkersClient;
use kiln_proto::worker::v1::{CoordinatorMessage, WorkerMessage};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;

use crate::auth::{Caller, CERTIFICATE_ID_PREFIX, FORWARDED_CERTIFICATE_HEADER};
use tonic::transport::Channel;
use tonic::{Extensions, Request, Response, Status, Streaming};

/// Marks a call a follower sent on. A replica that is not the leader (any more) answers
/// such a call UNAVAILABLE instead of sending it on again, so calls never go round.
pub(crate) const FORWARDED_HEADER: &str = "x-kiln-forwarded";

/// The way to the farm's leader from this replica.
#[derive(Clone)]
pub(crate) struct Leader {
    pub(crate) channel: Channel,
    /// The most a forwarded message may be, either way: the same as the server's own.
    pub(crate) message_limit: usize,
    /// Set when this replica shuts down: its forwarded streams end then (UNAVAILABLE), so
    /// that its graceful shutdown does not wait for workers and clients to hang up.
    pub(crate) closing: watch::Receiver<bool>,
}

fn onward<T, U>(request: Request<T>, message: impl FnOnce(T) -> U) -> Request<U> {
    let (mut metadata, extensions, inner) = request.into_parts();
    metadata.insert(FORWARDED_HEADER, MetadataValue::from_static("1"));
    // The leader sees this replica's certificate, not the caller's: name the caller's,
    // when that is how it was known here. Never what a client sent under that name.
    metadata.remove(FORWARDED_CERTIFICATE_HEADER);
    if let Some(Caller::Token(record)) = extensions.get::<Caller>() {
        let name = record.id.strip_prefix(CERTIFICATE_ID_PREFIX);
        if let Some(value) = name.and_then(|n| MetadataValue::try_from(n).ok()) {
            metadata.insert(FORWARDED_CERTIFICATE_HEADER, value);
        }
    }
    Request::from_parts(metadata, Extensions::default(), message(inner))
}

pub(crate) fn was_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

type OperationStream = BoxStream<'static, Result<Operation, Status>>;

/// The leader's answer stream, ended with UNAVAILABLE if this replica starts shutting down
/// first: workers then reconnect, and clients resume with WaitExecution, through another
/// replica.
fn streamed<T: Send + 'static>(
    response: Response<Streaming<T>>,
    mut closing: watch::Receiver<bool>,
) -> Response<BoxStream<'static, Result<T, Status>>> {
    let (metadata, stream, extensions) = response.into_parts();
    let closed = Box::pin(async move {
        let _ = closing.wait_for(|closing| *closing).await;
    });
    let relayed = futures::stream::unfold(
        (stream, closed, false),
        |(mut stream, mut closed, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                item = stream.next() => item.map(|item| (item, (stream, closed, false))),
                () = &mut closed => Some((
                    Err(Status::unavailable("this replica is shutting down; call another")),
                    (stream, closed, true),
                )),
            }
        },
    );
    Response::from_parts(metadata, relayed.boxed(), extensions)
}

impl Leader {
    fn execution(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit)
    }

    fn operations(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit)
    }

    pub(crate) async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let response = self.execution().execute(onward(request, |m| m)).await?;
        Ok(streamed(response, self.closing.clone()))
    }

    pub(crate) async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let response = self
            .execution()
            .wait_execution(onward(request, |m| m))
            .await?;
        Ok(streamed(response, self.closing.clone()))
    }

    pub(crate) async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        self.operations()
            .list_operations(onward(request, |m| m))
            .await
    }

    pub(crate) async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.operations()
            .get_operation(onward(request, |m| m))
            .await
    }

    pub(crate) async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.operations()
            .cancel_operation(onward(request, |m| m))
            .await
    }

    /// A worker's stream, joined to one of its own to the leader. An error on the
    /// worker's side ends the stream to the leader, which then treats the worker as gone,
    /// as it would had the worker connected directly.
    pub(crate) async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<BoxStream<'static, Result<CoordinatorMessage, Status>>>, Status> {
        let request = onward(request, |inbound| {
            inbound
                .take_while(|message| std::future::ready(message.is_ok()))
                .filter_map(|message| std::future::ready(message.ok()))
        });
        let response = WorkersClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit)
            .connect(request)
            .await?;
        Ok(streamed(response, self.closing.clone()))
    }

    pub(crate) async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<FarmStatus>, Status> {
        self.admin().get_status(onward(request, |m| m)).await
    }

    pub(crate) async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        self.admin().drain_worker(onward(request, |m| m)).await
    }

    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit)
    }
}
