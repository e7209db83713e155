//! One action's trace on the coordinator. The Execute call that starts an operation has
//! its W3C context persisted with the operation record; the queue wait, the worker's spans
//! (through the Assign) and the publication of the result continue that trace, after a
//! restart too. Calls that follow an operation they did not start (an identical Execute
//! joining it, WaitExecution) are in traces of their own, linked to the operation's.

use kiln_telemetry::current_span;
use kiln_telemetry::propagation::{self, TraceContext};
use tracing::Span;

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
pub(crate) fn publish_result_span(execute: &TraceContext) -> Span {
    let span = tracing::debug_span!(
        parent: None,
        "publish_result",
        cached = tracing::field::Empty
    );
    propagation::set_remote_parent(&span, execute);
    span
}

/// From queued to assigned. An action that is requeued, or reloaded after a restart,
/// waits again.
pub(crate) struct QueueWait {
    span: Span,
}

impl QueueWait {
    /// Starts waiting, in the trace of the Execute call described by `execute`.
    pub(crate) fn start(execute: &TraceContext) -> Self {
        let span = tracing::debug_span!(
            parent: None,
            "queue_wait",
            worker = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        propagation::set_remote_parent(&span, execute);
        QueueWait { span }
    }

    /// Not waiting: the operation is finished.
    pub(crate) fn none() -> Self {
        QueueWait { span: Span::none() }
    }

    /// Ends the wait: the action went to `worker`.
    pub(crate) fn end(&mut self, worker: &str, attempt: u32) {
        self.span.record("worker", worker);
        self.span.record("attempt", attempt);
        self.span = Span::none();
    }
}
