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
mod admission;
mod completion;
mod dispatcher;
mod input_retention;
mod operation;
mod pool_status;
mod routing;
mod services;
mod worker_service;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::execution_stage;
use kiln_proto::worker::v1::CoordinatorMessage;
use kiln_store::{BlobStore, Digest, MetadataStore, WriteBatch};
use tokio::sync::{mpsc, watch, Notify};
use tonic::Status;

use crate::action_cache::ActionCacheService;
use crate::counters::Counters;
use crate::farm::{Tenure, EPOCH_KEY, FARM};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::{CoordinatorConfig, CoordinatorError};
use action_trace::QueueWait;
pub use input_retention::InFlightInputs;
pub(crate) use operation::proto_duration;
use operation::{OperationRecord, OPERATIONS};
pub(crate) use pool_status::WorkerDetails;
pub(crate) use routing::{Executor, Member, Route};
pub(crate) use services::{ExecutionService, OperationsService};
pub(crate) use worker_service::WorkerService;

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
    /// How long a new worker stream may go without its Register.
    register_timeout: Duration,
    limits: AdmissionLimits,
    /// Set once the server is shutting down: worker and operation streams end, so that
    /// graceful shutdown does not wait for clients and workers that never hang up.
    closing: watch::Sender<bool>,
    /// In a farm, the leader's lease: nothing is assigned once it lapses, and operation
    /// records are written only while the farm's epoch is still this one.
    tenure: Option<Arc<Tenure>>,
}

/// What one client may make the engine hold (see [`CoordinatorConfig`]).
struct AdmissionLimits {
    max_message_bytes: u64,
    max_action_timeout: Duration,
    max_in_flight_per_instance: usize,
    max_in_flight: usize,
    /// None: wait for a matching worker forever.
    unmatched_platform_timeout: Option<Duration>,
}

#[derive(Default)]
struct State {
    scheduler: Scheduler,
    operations: HashMap<String, LiveOperation>,
    /// (instance, function, action hash) → the operation running it. Changed only
    /// through `start_in_flight` and `end_in_flight`, which keep the count below.
    in_flight: HashMap<(String, Digest), String>,
    /// Unfinished operations per instance name, for its bound.
    in_flight_per_instance: HashMap<String, usize>,
    /// Each connected worker's outbound stream.
    workers: HashMap<String, WorkerConnection>,
    next_connection: u64,
    /// The queue-depth gauge's labels at the last publication, so that one leaving the
    /// set reads 0 before the recorder drops it.
    gauged_platforms: std::collections::BTreeSet<String>,
    /// Operation records changed under the lock, where nothing may await; whoever holds
    /// the engine next in async code writes them (`persist`).
    unpersisted: WriteBatch,
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
    pub(crate) async fn open(
        config: &CoordinatorConfig,
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
        action_cache: Arc<ActionCacheService>,
        counters: Arc<Counters>,
        tenure: Option<Arc<Tenure>>,
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
                register_timeout: Duration::from_secs(config.register_timeout_secs.max(1)),
                limits: AdmissionLimits {
                    max_message_bytes: config.max_message_bytes,
                    max_action_timeout: Duration::from_secs(config.max_action_timeout_secs),
                    max_in_flight_per_instance: config.max_in_flight_per_instance,
                    max_in_flight: config.max_in_flight,
                    unmatched_platform_timeout: (config.unmatched_platform_timeout_secs > 0)
                        .then(|| Duration::from_secs(config.unmatched_platform_timeout_secs)),
                },
                closing: watch::channel(false).0,
                tenure,
            }),
        };
        engine.reload().await?;
        // The gauges exist from start-up, not from the first worker or action.
        engine.state().publish_gauges();
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

    async fn reload(&self) -> Result<(), CoordinatorError> {
        let mut after: Option<Vec<u8>> = None;
        let mut requeued = 0;
        loop {
            let page = self
                .inner
                .metadata
                .scan(OPERATIONS, b"", after.as_deref(), kiln_store::MAX_SCAN_PAGE)
                .await?;
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
                    state.start_in_flight(
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

    /// Writes the operation records changed under the lock since the last call.
    pub(crate) async fn persist(&self) -> Result<(), CoordinatorError> {
        let batch = std::mem::take(&mut self.state().unpersisted);
        if !batch.is_empty() {
            self.apply_fenced(batch).await?;
        }
        Ok(())
    }

    /// Applies `batch`, in a farm only while the farm's epoch is still this leader's. A
    /// leader that finds it changed has been deposed: it closes its engine (its streams
    /// end, and clients and workers reconnect to the new leader) and writes nothing.
    async fn apply_fenced(&self, mut batch: WriteBatch) -> Result<(), CoordinatorError> {
        if let Some(tenure) = &self.inner.tenure {
            batch.expect(FARM, EPOCH_KEY, Some(tenure.epoch_bytes()));
        }
        match self.inner.metadata.apply(batch).await {
            Err(kiln_store::MetadataError::Conflict { .. }) if self.inner.tenure.is_some() => {
                tracing::warn!("the farm has a newer leader; this engine stops");
                self.close();
                Err(CoordinatorError::Unavailable(
                    "this replica is no longer the farm's leader; try again".into(),
                ))
            }
            result => result.map_err(Into::into),
        }
    }

    /// Whether this engine may hand out work now: always outside a farm; in one, while
    /// the leader's lease holds.
    fn may_assign(&self) -> bool {
        self.inner
            .tenure
            .as_ref()
            .is_none_or(|tenure| tenure.holds(Instant::now()))
    }

    /// The epoch Assigns carry (0 outside a farm).
    fn epoch(&self) -> u64 {
        self.inner.tenure.as_ref().map_or(0, |tenure| tenure.epoch)
    }

    fn wake_dispatcher(&self) {
        self.inner.dispatch.notify_one();
    }
}

impl State {
    fn start_in_flight(&mut self, key: (String, Digest), operation: String) {
        *self
            .in_flight_per_instance
            .entry(key.0.clone())
            .or_default() += 1;
        self.in_flight.insert(key, operation);
    }

    fn end_in_flight(&mut self, key: &(String, Digest)) {
        if self.in_flight.remove(key).is_none() {
            return;
        }
        if let Some(count) = self.in_flight_per_instance.get_mut(&key.0) {
            *count -= 1;
            if *count == 0 {
                self.in_flight_per_instance.remove(&key.0);
            }
        }
    }
}
