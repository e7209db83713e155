//! Admission: `Execute` answers from the action cache when it can; otherwise it checks
//! the action's inputs, persists a new operation (or joins an identical one in flight)
//! and queues it. Also the streams that follow an operation to its end.

use std::time::{Duration, SystemTime};

use futures::Stream;
use kiln_proto::longrunning::Operation;
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    execution_stage, Action, Command, ExecuteRequest, ExecuteResponse, GetActionResultRequest,
    RequestMetadata,
};
use kiln_store::{Digest, WriteBatch};
use tokio::sync::watch;
use tonic::{Request, Status};

use super::action_trace::{self, QueueWait};
use super::operation::{completed_operation, unix_nanos, OperationRecord, OPERATIONS};
use super::{ExecutionEngine, InlineMessages, LiveOperation};
use crate::message_blob::{check_message_size, read_message_blob};
use crate::{reapi_digest, CoordinatorError};

/// The gRPC metadata key REAPI clients put their RequestMetadata under.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";
/// The most bytes of Action plus Command an Assign carries inline.
const INLINE_MESSAGES_LIMIT: u64 = 64 << 10;

pub(crate) type OperationStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// What admission learns from an action's Action (and, when needed, Command) message.
struct ActionToRun {
    action: Action,
    /// The timeout the action asked for, within the server's maximum.
    timeout: Option<Duration>,
    input_root: Digest,
    platform: Vec<(String, String)>,
    /// Action and Command to send along with the Assign, when they are small.
    inline: Option<InlineMessages>,
}

impl ExecutionEngine {
    /// `Execute`: a cached result when there is one, else a new or joined operation.
    pub(super) async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<OperationStream, CoordinatorError> {
        let invocation = request_metadata(&request)
            .map(|m| m.tool_invocation_id)
            .unwrap_or_default();
        let request = request.into_inner();
        let function = reapi_digest::digest_function(request.digest_function)?;
        let action_digest = reapi_digest::parse(function, request.action_digest.as_ref(), || {
            "action_digest".into()
        })?;
        if !request.skip_cache_lookup {
            if let Some(cached) = self.cached_operation(&request, &action_digest).await? {
                return Ok(cached);
            }
        }
        let to_run = self.read_action(&action_digest).await?;
        let priority = request.execution_policy.as_ref().map_or(0, |p| p.priority);
        let record = new_record(
            &request.instance_name,
            action_digest,
            &to_run,
            priority,
            invocation,
        );
        self.admit(record, to_run.inline).await
    }

    /// The action cache's answer as an already-completed operation, if it has one.
    async fn cached_operation(
        &self,
        request: &ExecuteRequest,
        action_digest: &Digest,
    ) -> Result<Option<OperationStream>, CoordinatorError> {
        let lookup = GetActionResultRequest {
            instance_name: request.instance_name.clone(),
            action_digest: request.action_digest.clone(),
            digest_function: request.digest_function,
            ..Default::default()
        };
        let found = self.inner.action_cache.get(lookup).await;
        action_trace::record_cache_lookup(found.is_ok());
        match found {
            Ok(result) => {
                let response = ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    ..Default::default()
                };
                let name = format!("operations/cached-{}", uuid::Uuid::new_v4());
                let operation = completed_operation(name, action_digest, &response);
                Ok(Some(Box::pin(futures::stream::iter([Ok(operation)]))))
            }
            Err(CoordinatorError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads and checks the Action: its Command and input root must be in the CAS (else
    /// FAILED_PRECONDITION with the missing digests, so the client uploads and retries).
    async fn read_action(&self, action_digest: &Digest) -> Result<ActionToRun, CoordinatorError> {
        let function = action_digest.function;
        let max_message = self.inner.limits.max_message_bytes;
        let action_bytes = match read_message_blob(
            self.inner.blobs.as_ref(),
            action_digest,
            max_message,
            || "action_digest".into(),
        )
        .await
        {
            Ok(bytes) => bytes,
            Err(CoordinatorError::Store(kiln_store::StoreError::NotFound(_))) => {
                return Err(CoordinatorError::MissingBlobs(vec![*action_digest]))
            }
            Err(e) => return Err(e),
        };
        let action = Action::decode(action_bytes.clone()).map_err(|e| {
            CoordinatorError::bad_request(
                "action_digest",
                format!("the Action does not decode: {e}"),
            )
        })?;
        let timeout = self.action_timeout(&action)?;
        let command_digest = reapi_digest::parse(function, action.command_digest.as_ref(), || {
            "action.command_digest".into()
        })?;
        let input_root = reapi_digest::parse(function, action.input_root_digest.as_ref(), || {
            "action.input_root_digest".into()
        })?;
        check_message_size(&command_digest, max_message, || {
            "action.command_digest".into()
        })?;
        let wanted = [command_digest, input_root];
        let present = kiln_store::confirm_presence(self.inner.blobs.as_ref(), &wanted).await?;
        let missing: Vec<Digest> = wanted
            .into_iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(d, _)| d)
            .collect();
        if !missing.is_empty() {
            return Err(CoordinatorError::MissingBlobs(missing));
        }
        // Small Action and Command messages ride along in the Assign, which saves the
        // worker a CAS round trip per action.
        let command_bytes =
            if action_bytes.len() as u64 + command_digest.size <= INLINE_MESSAGES_LIMIT {
                Some(self.inner.blobs.read_all(&command_digest).await?)
            } else {
                None
            };
        let platform = match &action.platform {
            Some(platform) => platform.clone(),
            // REAPI < 2.2 put the platform on the Command; Bazel 2.1 still does.
            #[allow(deprecated)]
            None => {
                let encoded = match &command_bytes {
                    Some(bytes) => bytes.clone(),
                    None => self.inner.blobs.read_all(&command_digest).await?,
                };
                let command = Command::decode(encoded).map_err(|e| {
                    CoordinatorError::bad_request(
                        "action.command_digest",
                        format!("the Command does not decode: {e}"),
                    )
                })?;
                command.platform.unwrap_or_default()
            }
        };
        Ok(ActionToRun {
            timeout,
            platform: platform
                .properties
                .into_iter()
                .map(|p| (p.name, p.value))
                .collect(),
            input_root,
            inline: command_bytes.map(|command| InlineMessages {
                action: action_bytes,
                command,
            }),
            action,
        })
    }

    /// Persists the operation, then queues it and assigns it if a slot is free, unless an
    /// identical action is already in flight: then the caller follows that one instead.
    async fn admit(
        &self,
        record: OperationRecord,
        inline: Option<InlineMessages>,
    ) -> Result<OperationStream, CoordinatorError> {
        let key = (record.instance_name.clone(), record.action_digest());
        // Persist first, so that an acknowledged operation survives a crash.
        if let Some(existing) = self.subscribe_in_flight(&key) {
            return Ok(existing);
        }
        self.check_in_flight_bounds(&record.instance_name)?;
        let mut batch = WriteBatch::new();
        batch.put(OPERATIONS, record.name.as_bytes(), record.encode());
        self.apply_fenced(batch).await?;
        self.inner.metadata.flush().await?;
        let name = record.name.clone();
        let receiver = {
            let mut state = self.state();
            if let Some(existing) = state
                .in_flight
                .get(&key)
                .and_then(|name| state.operations.get(name))
            {
                // Another identical Execute won the race while we flushed: follow it,
                // and forget the record just written.
                Err(self.follow_joined(existing))
            } else {
                // Queued means in the scheduler's queue: the wait from here on is the
                // scheduler's, not the flush's. (The persisted copy keeps the time the
                // operation was accepted, which is what a restarted coordinator reports.)
                let mut record = record;
                record.queued_at_unix_nanos = unix_nanos(SystemTime::now());
                let (updates, receiver) =
                    watch::channel(record.to_operation(execution_stage::Value::Queued));
                state.scheduler.enqueue(record.queued_action());
                state.start_in_flight(key, record.name.clone());
                let queue_wait = QueueWait::start(&record.trace_context());
                state.operations.insert(
                    record.name.clone(),
                    LiveOperation {
                        record,
                        updates,
                        completed: None,
                        inline,
                        queue_wait,
                    },
                );
                Ok(receiver)
            }
        };
        let receiver = match receiver {
            Ok(receiver) => receiver,
            Err(joined) => {
                let _ = self
                    .inner
                    .metadata
                    .remove(OPERATIONS, name.as_bytes())
                    .await;
                return Ok(joined);
            }
        };
        // Assign it now, on this task: waking the dispatcher would add a task hop to
        // every action's wait.
        self.dispatch_once();
        Ok(follow(receiver, self.closed()))
    }

    /// The action's timeout: none, or a non-negative one within the server's maximum.
    fn action_timeout(&self, action: &Action) -> Result<Option<Duration>, CoordinatorError> {
        let Some(timeout) = &action.timeout else {
            return Ok(None);
        };
        let max = self.inner.limits.max_action_timeout;
        let invalid = |why: String| CoordinatorError::bad_request("action.timeout", why);
        let (Ok(seconds), Ok(nanos)) =
            (u64::try_from(timeout.seconds), u32::try_from(timeout.nanos))
        else {
            return Err(invalid("is negative".into()));
        };
        if nanos >= 1_000_000_000 {
            return Err(invalid("has 10⁹ or more nanoseconds".into()));
        }
        let timeout = Duration::new(seconds, nanos);
        if timeout > max {
            return Err(invalid(format!(
                "asks for {} s; this server allows at most {} s (coordinator.max_action_timeout_secs)",
                timeout.as_secs_f64(),
                max.as_secs()
            )));
        }
        Ok((!timeout.is_zero()).then_some(timeout))
    }

    /// RESOURCE_EXHAUSTED when the instance, or the server, holds as many unfinished
    /// operations as it may. Checked before anything is persisted.
    fn check_in_flight_bounds(&self, instance: &str) -> Result<(), CoordinatorError> {
        let limits = &self.inner.limits;
        let state = self.state();
        let instance_count = state
            .in_flight_per_instance
            .get(instance)
            .copied()
            .unwrap_or(0);
        if instance_count >= limits.max_in_flight_per_instance {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "instance {instance:?} already has {instance_count} unfinished actions, its limit (coordinator.max_in_flight_per_instance); retry later"
            )));
        }
        if state.in_flight.len() >= limits.max_in_flight {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "the server already has {} unfinished actions, its limit (coordinator.max_in_flight); retry later",
                state.in_flight.len()
            )));
        }
        Ok(())
    }

    pub(super) fn subscribe_in_flight(&self, key: &(String, Digest)) -> Option<OperationStream> {
        let state = self.state();
        let name = state.in_flight.get(key)?;
        Some(self.follow_joined(state.operations.get(name)?))
    }

    pub(super) fn subscribe(&self, name: &str) -> Result<OperationStream, CoordinatorError> {
        let state = self.state();
        match state.operations.get(name) {
            Some(live) => Ok(self.follow_joined(live)),
            None => Err(CoordinatorError::NotFound(format!(
                "no operation named {name:?}"
            ))),
        }
    }

    /// Follows an operation that another call started. The current call's span is in a
    /// trace of its own; the link leads from it to the operation's.
    pub(super) fn follow_joined(&self, live: &LiveOperation) -> OperationStream {
        action_trace::link_to_operation(&live.record.trace_context());
        follow(live.updates.subscribe(), self.closed())
    }
}

/// The operation an admitted action becomes, in the trace of the current Execute call.
fn new_record(
    instance_name: &str,
    action_digest: Digest,
    to_run: &ActionToRun,
    priority: i32,
    invocation: String,
) -> OperationRecord {
    let execute_context = action_trace::execute_context();
    OperationRecord {
        name: format!("operations/{}", uuid::Uuid::new_v4()),
        instance_name: instance_name.to_string(),
        function: action_digest.function.name().to_string(),
        action_hash: action_digest.hex(),
        action_size: action_digest.size,
        priority,
        invocation,
        platform: to_run.platform.clone(),
        input_root_hash: to_run.input_root.hex(),
        // Within u64 nanoseconds: the timeout is at most the configured maximum.
        timeout_nanos: to_run.timeout.map_or(0, |t| t.as_nanos() as u64),
        do_not_cache: to_run.action.do_not_cache,
        queued_at_unix_nanos: unix_nanos(SystemTime::now()),
        response: None,
        traceparent: execute_context.traceparent,
        tracestate: execute_context.tracestate,
    }
}

/// Streams an operation's state now, then each change, until it is done. When the
/// server shuts down first, the stream ends with UNAVAILABLE, the cue for clients to
/// resume with WaitExecution.
pub(super) fn follow(
    receiver: watch::Receiver<Operation>,
    closed: impl std::future::Future<Output = ()> + Send + 'static,
) -> OperationStream {
    struct Following {
        receiver: watch::Receiver<Operation>,
        first: bool,
        closed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    }
    let following = Following {
        receiver,
        first: true,
        closed: Box::pin(closed),
    };
    Box::pin(futures::stream::unfold(
        Some(following),
        |state| async move {
            let mut following = state?;
            // Intermediate stages may coalesce; clients only need the latest one.
            if !following.first {
                tokio::select! {
                    changed = following.receiver.changed() => changed.ok()?,
                    () = &mut following.closed => {
                        let status = Status::unavailable(
                            "the coordinator is shutting down; resume with WaitExecution",
                        );
                        return Some((Err(status), None));
                    }
                }
            }
            following.first = false;
            let operation = following.receiver.borrow_and_update().clone();
            let next = (!operation.done).then_some(following);
            Some((Ok(operation), next))
        },
    ))
}

pub(super) fn request_metadata<T>(request: &Request<T>) -> Option<RequestMetadata> {
    let value = request.metadata().get_bin(REQUEST_METADATA_HEADER)?;
    RequestMetadata::decode(value.to_bytes().ok()?).ok()
}
