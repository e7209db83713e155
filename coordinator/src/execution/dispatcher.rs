//! The dispatcher: hands queued actions to free worker slots, requeues the leases of
//! workers that go silent, and keeps the pool's gauges and the finished operations tidy.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_proto::reapi::{execution_stage, ExecuteResponse};
use kiln_proto::rpc;
use kiln_proto::worker::v1::{coordinator_message, Assign, CoordinatorMessage};
use tonic::Code;

use super::action_trace::QueueWait;
use super::operation::{proto_duration, timestamp_from_nanos, OPERATIONS};
use super::{ExecutionEngine, State};
use crate::counters::names;
use crate::scheduler::{queue_depth_labels, LostLease};

/// How often the dispatcher looks for silent workers even when nothing else happens.
const DISPATCH_TICK: Duration = Duration::from_millis(250);
/// Platforms of queued work labelled in `kiln_queue_depth` beyond those workers offer.
const QUEUED_PLATFORM_LABELS: usize = 32;
/// The `kiln_queue_depth` label value of the total across platforms.
const QUEUE_DEPTH_TOTAL: &str = "*";
/// How long a finished operation stays answerable to WaitExecution and GetOperation.
const COMPLETED_RETENTION: Duration = Duration::from_secs(15 * 60);

impl ExecutionEngine {
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
                engine.persist_or_log().await;
                let _ = tokio::time::timeout(DISPATCH_TICK, engine.inner.dispatch.notified()).await;
            }
            // What the last round changed is written before the stores are released.
            engine.persist_or_log().await;
        })
    }

    /// The periodic part of dispatching: expires silent workers, publishes the gauges and
    /// forgets old results. It runs on the tick, not on every wake-up, so that a busy
    /// queue's dispatches stay cheap.
    pub(super) fn housekeeping(&self, now: Instant) {
        let mut state = self.state();
        for (worker, lost) in state.scheduler.expire_silent_workers(now) {
            tracing::warn!(%worker, leases = lost.len(), "worker missed its heartbeats");
            state.workers.remove(&worker);
            self.handle_lost_leases(&mut state, lost);
        }
        self.fail_unmatched(&mut state, now);
        state.publish_gauges();
        // Completions are in time order, so only the expired front is visited.
        while let Some((at, _)) = state.completion_order.front() {
            if now.duration_since(*at) <= COMPLETED_RETENTION {
                break;
            }
            let (_, name) = state.completion_order.pop_front().expect("front exists");
            state.operations.remove(&name);
            state.unpersisted.delete(OPERATIONS, name.as_bytes());
        }
    }

    /// [`persist`](ExecutionEngine::persist) for the background: a failure is logged and
    /// the records stay queued for the next round.
    async fn persist_or_log(&self) {
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "could not persist operation records");
        }
    }

    /// Fails the queued actions whose platform no worker has offered for the configured
    /// wait: FAILED_PRECONDITION naming the platform, instead of waiting forever.
    fn fail_unmatched(&self, state: &mut State, now: Instant) {
        let Some(wait) = self.inner.limits.unmatched_platform_timeout else {
            return;
        };
        for action in state.scheduler.take_unmatched(now, wait) {
            tracing::warn!(operation = %action.operation, platform = %action.platform, "no worker offers the action's platform; failing it");
            let status = rpc::Status {
                code: Code::FailedPrecondition as i32,
                message: format!(
                    "no worker offers the platform this action requires ({}) and none has for {} s (coordinator.unmatched_platform_timeout_secs)",
                    action.platform,
                    wait.as_secs()
                ),
                details: Vec::new(),
            };
            let response = ExecuteResponse {
                status: Some(status),
                ..Default::default()
            };
            self.finish(state, &action.operation, response);
        }
    }

    /// Hands queued actions to free slots. Called by the dispatcher task and directly
    /// wherever an action queues or a slot frees.
    pub(super) fn dispatch_once(&self) {
        if self.is_closing() || !self.may_assign() {
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
                leader_epoch: self.epoch(),
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

    pub(super) fn handle_lost_leases(&self, state: &mut State, lost: Vec<LostLease>) {
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
}

/// The scheduler's gauges for `/metrics`; `kiln_queue_depth` drives worker autoscaling.
impl State {
    pub(super) fn publish_gauges(&mut self) {
        let scheduler = &self.scheduler;
        metrics::gauge!(names::ACTIONS_QUEUED).set(scheduler.queue_depth() as f64);
        // Labels: what workers offer, plus the most-queued platforms of queued work (a
        // client's choice, so capped), plus the total under `*`, which exists from the
        // first tick so that an autoscaler's query of an idle farm is never empty.
        let mut depths = queue_depth_labels(
            scheduler.offered_platforms(),
            scheduler.queue_depth_by_platform(),
            QUEUED_PLATFORM_LABELS,
        );
        depths.insert(QUEUE_DEPTH_TOTAL.to_string(), scheduler.queue_depth());
        // A label that leaves the set reads 0 once; the recorder then drops it as idle.
        for platform in self.gauged_platforms.iter() {
            if !depths.contains_key(platform) {
                metrics::gauge!(names::QUEUE_DEPTH, "platform" => platform.clone()).set(0.0);
            }
        }
        for (platform, depth) in &depths {
            metrics::gauge!(names::QUEUE_DEPTH, "platform" => platform.clone()).set(*depth as f64);
        }
        self.gauged_platforms = depths.into_keys().collect();
        let scheduler = &self.scheduler;
        let (workers, slots) = scheduler.capacity();
        metrics::gauge!(names::WORKERS_CONNECTED).set(workers as f64);
        metrics::gauge!(names::WORKER_SLOTS, "state" => "busy").set(scheduler.running() as f64);
        metrics::gauge!(names::WORKER_SLOTS, "state" => "idle")
            .set(slots.saturating_sub(scheduler.running()) as f64);
    }
}
