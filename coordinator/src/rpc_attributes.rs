//! What a REAPI handler records on its call's span (the gRPC server span kiln-telemetry's
//! layer opens): the instance, the resource, how many digests or blobs. Attributes rather
//! than a span of the handler's own, which would repeat the call's span.

use kiln_telemetry::current_span;

pub(crate) fn instance(name: &str) {
    if !name.is_empty() && current_span::is_recording() {
        current_span::set_attribute("kiln.instance_name", name.to_string());
    }
}

pub(crate) fn resource(name: &str) {
    if current_span::is_recording() {
        current_span::set_attribute("kiln.resource_name", name.to_string());
    }
}

pub(crate) fn count(key: &'static str, count: usize) {
    current_span::set_attribute(key, i64::try_from(count).unwrap_or(i64::MAX));
}
