//! One action's trace on the coordinator: the queue wait, and the context the worker's
//! spans continue, so that the client's Execute, the wait and the worker's stages form
//! one trace.

use kiln_telemetry::propagation::{self, TraceContext};
use tracing::Span;

pub(crate) struct ActionTrace {
    /// The Execute call's context, captured at enqueue: the Execute span itself ends
    /// when the call returns, long before a worker picks the action up.
    execute: TraceContext,
    /// From queued to assigned; a requeued action waits again.
    queue_wait: Span,
}

impl ActionTrace {
    /// Starts the queue wait; call it inside the Execute span.
    pub(crate) fn queued() -> Self {
        let execute = Span::current();
        ActionTrace {
            execute: propagation::trace_context_of(&execute),
            queue_wait: queue_wait_span(Some(&execute)),
        }
    }

    /// An operation reloaded after a restart has no caller to continue.
    pub(crate) fn reloaded() -> Self {
        ActionTrace {
            execute: TraceContext::default(),
            queue_wait: Span::none(),
        }
    }

    /// Ends the queue wait and returns the context for the Assign.
    pub(crate) fn assigned(&mut self, worker: &str, attempt: u32) -> TraceContext {
        self.queue_wait.record("worker", worker);
        self.queue_wait.record("attempt", attempt);
        self.queue_wait = Span::none();
        self.execute.clone()
    }

    /// The action is back in the queue (its worker was lost or full).
    pub(crate) fn requeued(&mut self) {
        let span = queue_wait_span(None);
        propagation::set_remote_parent(&span, &self.execute);
        self.queue_wait = span;
    }
}

fn queue_wait_span(parent: Option<&Span>) -> Span {
    let parent = parent.and_then(Span::id);
    tracing::debug_span!(
        parent: parent,
        "queue_wait",
        worker = tracing::field::Empty,
        attempt = tracing::field::Empty,
    )
}
