//! Remote execution: the Execution service clients call, the Workers service workers
//! connect to, and the dispatcher between them.
//!
//! - `Execute` answers from the action cache when it can. Otherwise the action becomes
//!   an operation, persisted in the metadata store before it is queued, so that a
//!   restarted coordinator picks its queue back up; identical actions in flight share
//!   one operation.
//! - The [`Scheduler`] decides placement; the dispatcher sends its assignments down each
//!   worker's stream and requeues the leases of workers that go silent.
//! - A worker's result completes the operation, and a successful one is written to the
//!   action cache (unless the action says `do_not_cache`).
//!
//! All mutable state sits behind one mutex that is never held across an `.await`.

mod action_trace;
mod operation;
mod pool_status;
mod worker_service;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::Stream;
use kiln_proto::longrunning::{
    operations_server::Operations, CancelOperationRequest, DeleteOperationRequest,
    GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    WaitOperationRequest,
};
use kiln_proto::prost::Message;
use kiln_proto::protobuf::Empty;
use kiln_proto::reapi::{
    execution_server::Execution, execution_stage, Action, ActionResult, Command, ExecuteRequest,
    ExecuteResponse, GetActionResultRequest, RequestMetadata, UpdateActionResultRequest,
    WaitExecutionRequest,
};
use kiln_proto::rpc;
use kiln_proto::worker::v1::{coordinator_message, Assign, Cancel, CoordinatorMessage};
use kiln_store::{BlobStore, Digest, MetadataStore};
use tokio::sync::{mpsc, watch, Notify};
use tonic::{Code, Request, Response, Status};

use crate::action_cache::ActionCacheService;
use crate::counters::{names, Counters, Outcome};
use crate::scheduler::{Cancelled, LostLease, Platform, Scheduler, SchedulerConfig};
use crate::{reapi_digest, CoordinatorConfig, CoordinatorError};
use action_trace::QueueWait;
use kiln_telemetry::InStage;
pub(crate) use operation::proto_duration;
use operation::{
    completed_operation, timestamp_from_nanos, unix_nanos, OperationRecord, OPERATIONS,
};
pub(crate) use pool_status::WorkerDetails;
pub(crate) use worker_service::WorkerService;

/// The gRPC metadata key REAPI clients put their RequestMetadata under.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";
/// How often the dispatcher looks for silent workers even when nothing else happens.
const DISPATCH_TICK: Duration = Duration::from_millis(250);
/// The most bytes of Action plus Command an Assign carries inline.
const INLINE_MESSAGES_LIMIT: u64 = 64 << 10;
/// How long a finished operation stays answerable to WaitExecution and GetOperation.
const COMPLETED_RETENTION: Duration = Duration::from_secs(15 * 60);

type OperationStream = std::pin::Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// The state shared by the Execution, Operations and Workers services.
#[derive(Clone)]
pub(crate) struct ExecutionEngine {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    dispatch: Notify,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
    action_cache: Arc<ActionCacheService>,
    counters: Arc<Counters>,
    join_token: Option<String>,
    heartbeat_interval: Duration,
    /// Set once the server is shutting down: worker and operation streams end, so that
    /// graceful shutdown does not wait for clients and workers that never hang up.
    closing: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    scheduler: Scheduler,
    operations: HashMap<String, LiveOperation>,
    /// (instance, function, action hash) → the operation running it.
    in_flight: HashMap<(String, Digest), String>,
    /// Each connected worker's outbound stream.
    workers: HashMap<String, WorkerConnection>,
    next_connection: u64,
    /// Platforms with a published queue-depth gauge, so that an emptied queue reads 0.
    gauged_platforms: std::collections::BTreeSet<String>,
    /// Finished operations, oldest first, so that forgetting them visits only those due.
    completion_order: VecDeque<(Instant, String)>,
}

/// A worker's current stream. A worker that reconnects gets a new one; the old stream's
/// clean-up must then leave the new one alone, hence the id.
struct WorkerConnection {
    id: u64,
    outbound: mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
    details: WorkerDetails,
}

struct LiveOperation {
    record: OperationRecord,
    updates: watch::Sender<Operation>,
    completed: Option<Instant>,
    /// The Action and Command to send along with the Assign, while the operation waits.
    inline: Option<InlineMessages>,
    queue_wait: QueueWait,
}

/// An action's encoded Action and Command messages, as read from the CAS at Execute.
struct InlineMessages {
    action: Bytes,
    command: Bytes,
}

impl ExecutionEngine {
    /// Opens the engine and reloads the operations a previous run left unfinished.
    pub(crate) fn open(
        config: &CoordinatorConfig,
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
        action_cache: Arc<ActionCacheService>,
        counters: Arc<Counters>,
    ) -> Result<Self, CoordinatorError> {
        let scheduler = Scheduler::new(SchedulerConfig {
            max_attempts: config.max_attempts,
            heartbeat_timeout: Duration::from_secs(config.heartbeat_timeout_secs),
            ..Default::default()
        });
        let engine = ExecutionEngine {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    scheduler,
                    ..Default::default()
                }),
                dispatch: Notify::new(),
                blobs,
                metadata,
                action_cache,
                counters,
                join_token: config.join_token.clone(),
                heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
                closing: watch::channel(false).0,
            }),
        };
        engine.reload()?;
        Ok(engine)
    }

    /// The pool's join token: workers present it to join, operators to drain one.
    pub(crate) fn join_token(&self) -> Option<&str> {
        self.inner.join_token.as_deref()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reload(&self) -> Result<(), CoordinatorError> {
        let mut after: Option<Vec<u8>> = None;
        let mut requeued = 0;
        loop {
            let page = self
                .inner
                .metadata
                .scan(OPERATIONS, b"", after.as_deref(), 1000)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut state = self.state();
            for (_, value) in page {
                let Some(record) = OperationRecord::decode(&value) else {
                    continue;
                };
                let (stage, queue_wait) = if record.response.is_some() {
                    (execution_stage::Value::Completed, QueueWait::none())
                } else {
                    // Whatever ran before the restart runs again: actions are hermetic,
                    // and the lost worker streams cannot deliver their results anymore.
                    state.scheduler.enqueue(record.queued_action());
                    state.in_flight.insert(
                        (record.instance_name.clone(), record.action_digest()),
                        record.name.clone(),
                    );
                    requeued += 1;
                    // The wait, and the worker's spans after it, continue the client's trace.
                    let queue_wait = QueueWait::start(&record.trace_context());
                    (execution_stage::Value::Queued, queue_wait)
                };
                let (updates, _) = watch::channel(record.to_operation(stage));
                let completed = record.response.is_some().then(Instant::now);
                if let Some(at) = completed {
                    state.completion_order.push_back((at, record.name.clone()));
                }
                state.operations.insert(
                    record.name.clone(),
                    LiveOperation {
                        record,
                        updates,
                        completed,
                        // Workers fetch these from the CAS after a restart.
                        inline: None,
                        queue_wait,
                    },
                );
            }
        }
        if requeued > 0 {
            tracing::info!(requeued, "reloaded unfinished operations");
        }
        Ok(())
    }

    /// Runs the dispatcher until the engine closes or every service has dropped it.
    /// The server awaits the handle, so that the stores are released when it returns.
    pub(crate) fn spawn_dispatcher(&self) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut last_housekeeping: Option<Instant> = None;
            while Arc::strong_count(&engine.inner) > 1 && !engine.is_closing() {
                let now = Instant::now();
                if last_housekeeping.is_none_or(|at| now.duration_since(at) >= DISPATCH_TICK) {
                    engine.housekeeping(now);
                    last_housekeeping = Some(now);
                }
                engine.dispatch_once();
                let _ = tokio::time::timeout(DISPATCH_TICK, engine.inner.dispatch.notified()).await;
            }
        })
    }

    /// Starts shutting down: ends every worker stream and every Execute/WaitExecution
    /// stream (clients resume with WaitExecution after a restart), and stops dispatching.
    /// Leases are not counted as lost: the persisted operations run again after restart.
    pub(crate) fn close(&self) {
        self.inner.closing.send_replace(true);
        self.state().workers.clear();
        self.wake_dispatcher();
    }

    fn is_closing(&self) -> bool {
        *self.inner.closing.borrow()
    }

    /// Resolves once [`close`](Self::close) has been called.
    pub(crate) fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.inner.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }

    fn wake_dispatcher(&self) {
        self.inner.dispatch.notify_one();
    }

    /// The periodic part of dispatching: expires silent workers, publishes the gauges and
    /// forgets old results. It runs on the tick, not on every wake-up, so that a busy
    /// queue's dispatches stay cheap.
    fn housekeeping(&self, now: Instant) {
        let mut state = self.state();
        for (worker, lost) in state.scheduler.expire_silent_workers(now) {
            tracing::warn!(%worker, leases = lost.len(), "worker missed its heartbeats");
            state.workers.remove(&worker);
            self.handle_lost_leases(&mut state, lost);
        }
        publish_gauges(&mut state);
        // Completions are in time order, so only the expired front is visited.
        while let Some((at, _)) = state.completion_order.front() {
            if now.duration_since(*at) <= COMPLETED_RETENTION {
                break;
            }
            let (_, name) = state.completion_order.pop_front().expect("front exists");
            state.operations.remove(&name);
            let _ = self.inner.metadata.remove(OPERATIONS, name.as_bytes());
        }
    }

    /// Hands queued actions to free slots. Called by the dispatcher task and directly
    /// wherever an action queues or a slot frees.
    fn dispatch_once(&self) {
        if self.is_closing() {
            return;
        }
        let mut state = self.state();
        for assignment in state.scheduler.schedule() {
            let Some(live) = state.operations.get_mut(&assignment.operation) else {
                continue;
            };
            live.queue_wait.end(&assignment.worker, assignment.attempt);
            let record = &live.record;
            let queued_at =
                std::time::UNIX_EPOCH + Duration::from_nanos(record.queued_at_unix_nanos);
            self.inner.counters.queue_wait(
                SystemTime::now()
                    .duration_since(queued_at)
                    .unwrap_or_default(),
            );
            let action_digest = record.action_digest();
            let assign = Assign {
                lease_id: assignment.lease.clone(),
                instance_name: record.instance_name.clone(),
                action_digest: Some(action_digest.to_reapi()),
                digest_function: action_digest.function.reapi_value(),
                timeout: record.timeout().map(proto_duration),
                traceparent: record.traceparent.clone(),
                tracestate: record.tracestate.clone(),
                queued_timestamp: Some(timestamp_from_nanos(record.queued_at_unix_nanos)),
                action: live
                    .inline
                    .as_ref()
                    .map_or_else(Vec::new, |m| m.action.to_vec()),
                command: live
                    .inline
                    .as_ref()
                    .map_or_else(Vec::new, |m| m.command.to_vec()),
            };
            let _ = live
                .updates
                .send_replace(record.to_operation(execution_stage::Value::Executing));
            tracing::debug!(operation = %assignment.operation, worker = %assignment.worker, attempt = assignment.attempt, "assigned");
            let message = CoordinatorMessage {
                message: Some(coordinator_message::Message::Assign(assign)),
            };
            let delivered = state
                .workers
                .get(&assignment.worker)
                .is_some_and(|c| c.outbound.send(Ok(message)).is_ok());
            if !delivered {
                let lost = state.scheduler.remove_worker(&assignment.worker);
                state.workers.remove(&assignment.worker);
                self.handle_lost_leases(&mut state, lost);
            }
        }
    }

    fn handle_lost_leases(&self, state: &mut State, lost: Vec<LostLease>) {
        for lease in lost {
            match lease {
                LostLease::Requeued {
                    operation,
                    attempts,
                } => {
                    tracing::info!(%operation, attempts, "requeued after losing its worker");
                    if let Some(live) = state.operations.get_mut(&operation) {
                        live.queue_wait = QueueWait::start(&live.record.trace_context());
                        let _ = live
                            .updates
                            .send_replace(live.record.to_operation(execution_stage::Value::Queued));
                    }
                }
                LostLease::GaveUp {
                    operation,
                    attempts,
                } => {
                    let status = rpc::Status {
                        code: Code::Unavailable as i32,
                        message: format!("the action lost its worker {attempts} times; giving up"),
                        details: Vec::new(),
                    };
                    self.finish(
                        state,
                        &operation,
                        ExecuteResponse {
                            status: Some(status),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        self.wake_dispatcher();
    }

    /// Completes an operation: persists its response and tells every watcher.
    fn finish(&self, state: &mut State, operation: &str, response: ExecuteResponse) {
        let Some(live) = state.operations.get_mut(operation) else {
            return;
        };
        if live.completed.is_some() {
            return;
        }
        let completed = Instant::now();
        live.record.response = Some(response.encode_to_vec());
        live.completed = Some(completed);
        live.inline = None;
        let _ = live
            .updates
            .send_replace(live.record.to_operation(execution_stage::Value::Completed));
        let key = (
            live.record.instance_name.clone(),
            live.record.action_digest(),
        );
        if let Err(e) =
            self.inner
                .metadata
                .insert(OPERATIONS, operation.as_bytes(), &live.record.encode())
        {
            tracing::error!(%operation, error = %e, "could not persist a finished operation");
        }
        state.in_flight.remove(&key);
        state
            .completion_order
            .push_back((completed, operation.to_string()));
    }

    async fn execute(
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
                    let operation = completed_operation(name, &action_digest, &response);
                    return Ok(Box::pin(futures::stream::iter([Ok(operation)])));
                }
                Err(CoordinatorError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }

        let action_bytes = match self.inner.blobs.read_all(&action_digest).await {
            Ok(bytes) => bytes,
            Err(kiln_store::StoreError::NotFound(_)) => {
                return Err(CoordinatorError::MissingBlobs(vec![action_digest]))
            }
            Err(e) => return Err(e.into()),
        };
        let action = Action::decode(action_bytes.clone()).map_err(|e| {
            CoordinatorError::bad_request(
                "action_digest",
                format!("the Action does not decode: {e}"),
            )
        })?;
        let command_digest = reapi_digest::parse(function, action.command_digest.as_ref(), || {
            "action.command_digest".into()
        })?;
        let input_root = reapi_digest::parse(function, action.input_root_digest.as_ref(), || {
            "action.input_root_digest".into()
        })?;
        let wanted = [command_digest, input_root];
        let present = self.inner.blobs.has_many(&wanted).await?;
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
        let inline = command_bytes.map(|command| InlineMessages {
            action: action_bytes,
            command,
        });

        let priority = request.execution_policy.as_ref().map_or(0, |p| p.priority);
        let key = (request.instance_name.clone(), action_digest);
        let execute_context = action_trace::execute_context();
        let record = OperationRecord {
            name: format!("operations/{}", uuid::Uuid::new_v4()),
            instance_name: request.instance_name.clone(),
            function: function.name().to_string(),
            action_hash: action_digest.hex(),
            action_size: action_digest.size,
            priority,
            invocation,
            platform: platform
                .properties
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect(),
            input_root_hash: input_root.hex(),
            timeout_nanos: action.timeout.as_ref().map_or(0, |t| {
                t.seconds.max(0) as u64 * 1_000_000_000 + t.nanos.max(0) as u64
            }),
            do_not_cache: action.do_not_cache,
            queued_at_unix_nanos: unix_nanos(SystemTime::now()),
            response: None,
            traceparent: execute_context.traceparent,
            tracestate: execute_context.tracestate,
        };

        // Persist first, so that an acknowledged operation survives a crash.
        if let Some(existing) = self.subscribe_in_flight(&key) {
            return Ok(existing);
        }
        self.inner
            .metadata
            .insert(OPERATIONS, record.name.as_bytes(), &record.encode())?;
        self.inner.metadata.flush().await?;
        let receiver = {
            let mut state = self.state();
            if let Some(existing) = state
                .in_flight
                .get(&key)
                .and_then(|name| state.operations.get(name))
            {
                // Another identical Execute won the race while we flushed.
                let stream = self.follow_joined(existing);
                drop(state);
                let _ = self
                    .inner
                    .metadata
                    .remove(OPERATIONS, record.name.as_bytes());
                return Ok(stream);
            }
            // Queued means in the scheduler's queue: the wait from here on is the
            // scheduler's, not the flush's. (The persisted copy keeps the time the
            // operation was accepted, which is what a restarted coordinator reports.)
            let mut record = record;
            record.queued_at_unix_nanos = unix_nanos(SystemTime::now());
            let (updates, receiver) =
                watch::channel(record.to_operation(execution_stage::Value::Queued));
            state.scheduler.enqueue(record.queued_action());
            state.in_flight.insert(key, record.name.clone());
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
            receiver
        };
        // Assign it now, on this task: waking the dispatcher would add a task hop to
        // every action's wait.
        self.dispatch_once();
        Ok(follow(receiver, self.closed()))
    }

    fn subscribe_in_flight(&self, key: &(String, Digest)) -> Option<OperationStream> {
        let state = self.state();
        let name = state.in_flight.get(key)?;
        Some(self.follow_joined(state.operations.get(name)?))
    }

    fn subscribe(&self, name: &str) -> Result<OperationStream, CoordinatorError> {
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
    fn follow_joined(&self, live: &LiveOperation) -> OperationStream {
        action_trace::link_to_operation(&live.record.trace_context());
        follow(live.updates.subscribe(), self.closed())
    }

    /// A worker's result for one of its leases. The worker's slot is free at once (and
    /// the dispatcher told); caching and publishing the result happen in a task of their
    /// own, so that one result's action-cache flush never holds up the worker's next.
    pub(crate) fn complete_lease(
        &self,
        worker: &str,
        lease: &str,
        result: Option<ActionResult>,
        status: Option<rpc::Status>,
    ) {
        let status = status.unwrap_or_default();
        let record = {
            let mut state = self.state();
            let Some(action) = state.scheduler.complete(lease, worker) else {
                tracing::debug!(%worker, %lease, "result for a lease that is no longer current");
                return;
            };
            if status.code == Code::ResourceExhausted as i32 {
                // The worker had no room after all: back in line, without counting a try.
                let mut action = action;
                action.attempts = action.attempts.saturating_sub(1);
                if let Some(live) = state.operations.get_mut(&action.operation) {
                    live.queue_wait = QueueWait::start(&live.record.trace_context());
                }
                state.scheduler.enqueue(action);
                drop(state);
                self.wake_dispatcher();
                return;
            }
            let Some(live) = state.operations.get(&action.operation) else {
                return;
            };
            live.record.clone()
        };
        // The freed slot takes the next queued action at once.
        self.dispatch_once();
        let engine = self.clone();
        let span = action_trace::publish_result_span(&record.trace_context());
        tokio::spawn(async move {
            engine
                .publish_result(record, result, status)
                .in_stage(&span)
                .await;
            span.end();
        });
    }

    /// Caches a successful result (flushed before anyone sees it), then completes the
    /// operation for its watchers.
    async fn publish_result(
        &self,
        record: OperationRecord,
        result: Option<ActionResult>,
        status: rpc::Status,
    ) {
        let mut response = ExecuteResponse {
            result,
            status: Some(status.clone()),
            ..Default::default()
        };
        let ran = status.code == Code::Ok as i32 && response.result.is_some();
        let succeeded = ran && response.result.as_ref().is_some_and(|r| r.exit_code == 0);
        self.inner.counters.action_finished(
            match (ran, succeeded) {
                (_, true) => Outcome::Success,
                (true, false) => Outcome::Failure,
                (false, _) => Outcome::Error,
            },
            response
                .result
                .as_ref()
                .and_then(|r| r.execution_metadata.as_ref()),
        );
        let mut cached = false;
        if succeeded && !record.do_not_cache {
            let action_digest = record.action_digest();
            let update = UpdateActionResultRequest {
                instance_name: record.instance_name.clone(),
                action_digest: Some(action_digest.to_reapi()),
                action_result: response.result.clone(),
                digest_function: action_digest.function.reapi_value(),
                ..Default::default()
            };
            match self.inner.action_cache.update(update).await {
                Ok(_) => cached = true,
                Err(e) => {
                    // The client still gets its result; only the cache entry is missing.
                    tracing::warn!(operation = %record.name, error = %e, "could not cache a result");
                    response.message = format!("the result was not cached: {e}");
                }
            }
        }
        action_trace::record_cached(cached);
        {
            let mut state = self.state();
            self.finish(&mut state, &record.name, response);
        }
        // The finished record joins the next group flush; the client already has its answer.
        let _ = self.inner.metadata.flush().await;
    }

    fn cancel(&self, name: &str) -> Result<(), CoordinatorError> {
        let mut state = self.state();
        if !state.operations.contains_key(name) {
            return Err(CoordinatorError::NotFound(format!(
                "no operation named {name:?}"
            )));
        }
        match state.scheduler.cancel(name) {
            Cancelled::Running { worker, lease } => {
                let message = CoordinatorMessage {
                    message: Some(coordinator_message::Message::Cancel(Cancel {
                        lease_id: lease,
                    })),
                };
                if let Some(connection) = state.workers.get(&worker) {
                    let _ = connection.outbound.send(Ok(message));
                }
            }
            Cancelled::Queued => {}
            Cancelled::NotFound => return Ok(()), // already finished
        }
        let status = rpc::Status {
            code: Code::Cancelled as i32,
            message: "cancelled by request".into(),
            details: Vec::new(),
        };
        self.finish(
            &mut state,
            name,
            ExecuteResponse {
                status: Some(status),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Adds a worker and its stream; returns the connection id its clean-up must name.
    fn connect_worker(
        &self,
        worker: &str,
        platform: Platform,
        slots: usize,
        outbound: mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
        details: WorkerDetails,
    ) -> u64 {
        let mut state = self.state();
        state.next_connection += 1;
        let id = state.next_connection;
        let lost = state
            .scheduler
            .add_worker(worker.to_string(), platform, slots, Instant::now());
        state.workers.insert(
            worker.to_string(),
            WorkerConnection {
                id,
                outbound,
                details,
            },
        );
        self.handle_lost_leases(&mut state, lost);
        // Pool membership shows on /metrics at once; the rest waits for the tick.
        publish_gauges(&mut state);
        id
    }

    /// Removes a worker whose stream `connection` ended, unless it has reconnected since.
    fn disconnect_worker(&self, worker: &str, connection: u64) {
        let mut state = self.state();
        if state.workers.get(worker).map(|c| c.id) != Some(connection) {
            return;
        }
        // Dropping the sender ends our side of the stream.
        state.workers.remove(worker);
        let lost = state.scheduler.remove_worker(worker);
        self.handle_lost_leases(&mut state, lost);
        publish_gauges(&mut state);
    }

    /// `cache_bytes` is the worker's local cache size when the message reported it.
    fn heartbeat(&self, worker: &str, draining: bool, cache_bytes: Option<u64>) {
        let mut state = self.state();
        state.scheduler.heartbeat(worker, Instant::now());
        if let (Some(bytes), Some(connection)) = (cache_bytes, state.workers.get_mut(worker)) {
            connection.details.cache_bytes = bytes;
        }
        if draining {
            // Stop offering it work now rather than have it refuse each Assign.
            state.scheduler.drain_worker(worker);
        }
    }
}

/// The scheduler's gauges for `/metrics`; `kiln_queue_depth` drives worker autoscaling.
fn publish_gauges(state: &mut State) {
    let scheduler = &state.scheduler;
    metrics::gauge!(names::ACTIONS_QUEUED).set(scheduler.queue_depth() as f64);
    let depths = scheduler.queue_depth_by_platform();
    for platform in state
        .gauged_platforms
        .iter()
        .filter(|p| !depths.contains_key(*p))
    {
        metrics::gauge!(names::QUEUE_DEPTH, "platform" => platform.clone()).set(0.0);
    }
    for (platform, depth) in &depths {
        metrics::gauge!(names::QUEUE_DEPTH, "platform" => platform.clone()).set(*depth as f64);
    }
    state.gauged_platforms.extend(depths.into_keys());
    let (workers, slots) = scheduler.capacity();
    metrics::gauge!(names::WORKERS_CONNECTED).set(workers as f64);
    metrics::gauge!(names::WORKER_SLOTS, "state" => "busy").set(scheduler.running() as f64);
    metrics::gauge!(names::WORKER_SLOTS, "state" => "idle")
        .set(slots.saturating_sub(scheduler.running()) as f64);
}

/// Streams an operation's state now, then each change, until it is done. When the
/// server shuts down first, the stream ends with UNAVAILABLE, the cue for clients to
/// resume with WaitExecution.
fn follow(
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

fn request_metadata<T>(request: &Request<T>) -> Option<RequestMetadata> {
    let value = request.metadata().get_bin(REQUEST_METADATA_HEADER)?;
    RequestMetadata::decode(value.to_bytes().ok()?).ok()
}

/// The REAPI Execution service.
pub(crate) struct ExecutionService {
    engine: ExecutionEngine,
}

impl ExecutionService {
    pub(crate) fn new(engine: ExecutionEngine) -> Self {
        ExecutionService { engine }
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        Ok(Response::new(self.engine.execute(request).await?))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        Ok(Response::new(
            self.engine.subscribe(&request.into_inner().name)?,
        ))
    }
}

/// `google.longrunning.Operations`: look-up and cancellation of execution operations.
pub(crate) struct OperationsService {
    engine: ExecutionEngine,
}

impl OperationsService {
    pub(crate) fn new(engine: ExecutionEngine) -> Self {
        OperationsService { engine }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let state = self.engine.state();
        let mut operations: Vec<Operation> = state
            .operations
            .values()
            .map(|live| live.updates.borrow().clone())
            .collect();
        operations.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListOperationsResponse {
            operations,
            ..Default::default()
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.into_inner().name;
        let state = self.engine.state();
        match state.operations.get(&name) {
            Some(live) => Ok(Response::new(live.updates.borrow().clone())),
            None => Err(CoordinatorError::NotFound(format!("no operation named {name:?}")).into()),
        }
    }

    async fn delete_operation(
        &self,
        _: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(CoordinatorError::Unimplemented(
            "DeleteOperation (finished operations expire on their own)",
        )
        .into())
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.engine.cancel(&request.into_inner().name)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        _: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(CoordinatorError::Unimplemented("WaitOperation (use WaitExecution)").into())
    }
}
