//! Events logged outside any `tracing` span, while an OpenTelemetry span built directly on
//! the SDK is current (an [`HttpServerSpan`](crate::http_server::HttpServerSpan) under
//! `with_context`), become events of that span. `tracing-opentelemetry` only attaches
//! events to `tracing` spans, so without this a registry request's "basic auth failed" or
//! "request failed" would reach the log but not the trace.

use std::borrow::Cow;
use std::fmt::Debug;

use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::KeyValue;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The layer; filter it as the exported events are filtered.
pub(crate) struct ContextEvents;

impl<S> Layer<S> for ContextEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if ctx.event_span(event).is_some() {
            // Inside a `tracing` span: tracing-opentelemetry records it there.
            return;
        }
        let current = opentelemetry::Context::current();
        let span = current.span();
        if !span.is_recording() {
            return;
        }
        let metadata = event.metadata();
        let mut fields = EventFields {
            message: None,
            attributes: vec![
                KeyValue::new("level", metadata.level().as_str()),
                KeyValue::new("target", metadata.target()),
            ],
        };
        event.record(&mut fields);
        let name = fields
            .message
            .map_or(Cow::Borrowed(metadata.name()), Cow::Owned);
        if *metadata.level() == Level::ERROR {
            span.set_status(Status::error(name.clone()));
        }
        span.add_event(name, fields.attributes);
    }
}

/// An event's message and its other fields as attributes.
struct EventFields {
    message: Option<String>,
    attributes: Vec<KeyValue>,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = Some(value.to_string()),
            name => self.attributes.push(KeyValue::new(name, value.to_string())),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        // OpenTelemetry integers are signed; sizes and counts beyond i64 are not a concern.
        self.attributes.push(KeyValue::new(
            field.name(),
            value.min(i64::MAX as u64) as i64,
        ));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        match field.name() {
            "message" => self.message = Some(format!("{value:?}")),
            name => self
                .attributes
                .push(KeyValue::new(name, format!("{value:?}"))),
        }
    }
}
