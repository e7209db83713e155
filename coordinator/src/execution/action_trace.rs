//! One action's trace on the coordinator. The Execute call that starts an operation has
//! its W3C context persisted with the operation record; the queue wait, the worker's spans
//! (through the Assign) and the publication of the result continue that trace, after a
//! restart too. Calls that follow an operation they did not start (an identical Execute
//! joining it, WaitExecution) are in traces of their own, linked to the operation's.

use kiln_telemetry::current_span;
use kiln_telemetry::propagation::TraceContext;
use kiln_telemetry::StageSpan;

/// The context of the current span (the Execute call), to persist with the operation.
pub(crate) fn execute_context() -> TraceContext {
    current_span::trace_context()
}

/// Links the current span (a call following an operation) to the operation's Execute.
pub(crate) fn link_to_operation(execute: &TraceContext) {
    current_span::add_link(execute);
}

/// Records on the Execute call's span whether the action cache answered it.
pub(crate) fn record_cache_lookup(hit: bool) {
    current_span::set_attribute("kiln.action_cache.hit", hit);
}

/// The span in which a worker's result is checked against the CAS, written to the
/// action cache and the operation completed: the last of the action's work.
pub(crate) fn publish_result_span(execute: &TraceContext) -> StageSpan {
    StageSpan::continuing("publish_result", execute)
}

/// Records on the current span (`publish_result`) whether the result went into the cache.
pub(crate) fn record_cached(cached: bool) {
    current_span::set_attribute("cached", cached);
}

/// From queued to assigned. An action that is requeued, or reloaded after a restart,
/// waits again.
pub(crate) struct QueueWait {
    span: StageSpan,
}

impl QueueWait {
    /// Starts waiting, in the trace of the Execute call described by `execute`.
    pub(crate) fn start(execute: &TraceContext) -> Self {
        QueueWait {
            span: StageSpan::continuing("queue_wait", execute),
        }
    }

    /// Not waiting: the operation is finished.
    pub(crate) fn none() -> Self {
        QueueWait {
            span: StageSpan::none(),
        }
    }

    /// Ends the wait: the action went to `worker`.
    pub(crate) fn end(&mut self, worker: &str, attempt: u32) {
        let span = std::mem::replace(&mut self.span, StageSpan::none());
        if span.is_traced() {
            span.set_attribute("worker", worker.to_string());
            span.set_attribute("attempt", i64::from(attempt));
        }
        span.end();
    }
}
