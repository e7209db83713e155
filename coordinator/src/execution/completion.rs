//! How operations end: a worker's result (cached when it succeeded), a cancellation, or
//! giving up. Every end goes through `finish`, which persists the response and tells the
//! operation's watchers.

use std::time::Instant;

use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    execution_stage, ActionResult, ExecuteResponse, UpdateActionResultRequest,
};
use kiln_proto::rpc;
use kiln_proto::worker::v1::{coordinator_message, Cancel, CoordinatorMessage};
use kiln_telemetry::InStage;
use tonic::Code;

use super::action_trace::{self, QueueWait};
use super::operation::{OperationRecord, OPERATIONS};
use super::{ExecutionEngine, State};
use crate::counters::Outcome;
use crate::scheduler::Cancelled;
use crate::CoordinatorError;

impl ExecutionEngine {
    /// Completes an operation: persists its response and tells every watcher.
    pub(super) fn finish(&self, state: &mut State, operation: &str, response: ExecuteResponse) {
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
        state
            .unpersisted
            .put(OPERATIONS, operation.as_bytes(), live.record.encode());
        state.end_in_flight(&key);
        state
            .completion_order
            .push_back((completed, operation.to_string()));
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
    pub(super) async fn publish_result(
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
        let persisted = match self.persist().await {
            Ok(()) => self.inner.metadata.flush().await.map_err(Into::into),
            Err(e) => Err(e),
        };
        if let Err(e) = persisted {
            tracing::error!(operation = %record.name, error = %e, "could not persist a finished operation");
        }
    }

    pub(super) fn cancel(&self, name: &str) -> Result<(), CoordinatorError> {
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
}
