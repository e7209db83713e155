//! The registry's Prometheus metrics, through the `metrics` facade: requests by endpoint
//! and status, bytes served, and GC and retention runs. Served on `/metrics` by the
//! binary, which installs the recorder.

use std::time::Duration;

use axum::http::{header, Method, Response};

use crate::gc::GcReport;
use crate::retention::RetentionReport;

/// Every metric the registry publishes, named once.
pub mod names {
    /// Requests by `endpoint` (base, catalog, token, manifest, blob, upload_start,
    /// upload, tags, referrers, unknown), `method` and `status` code.
    pub const REQUESTS: &str = "kiln_registry_requests_total";
    /// Seconds to the response head, by `endpoint`.
    pub const REQUEST_SECONDS: &str = "kiln_registry_request_seconds";
    /// Response body bytes of successful GETs (blobs and manifests), by `endpoint`, as
    /// their Content-Length declares.
    pub const BYTES_SERVED: &str = "kiln_registry_bytes_served_total";
    /// Garbage-collection runs, by `dry_run`.
    pub const GC_RUNS: &str = "kiln_registry_gc_runs_total";
    /// Blobs GC deleted, and the bytes freed (not counting dry runs).
    pub const GC_DELETED_BLOBS: &str = "kiln_registry_gc_deleted_blobs_total";
    pub const GC_FREED_BYTES: &str = "kiln_registry_gc_freed_bytes_total";
    /// Retention runs, by `dry_run`.
    pub const RETENTION_RUNS: &str = "kiln_registry_retention_runs_total";
    /// Tags and manifests retention deleted (not counting dry runs).
    pub const RETENTION_DELETED_TAGS: &str = "kiln_registry_retention_deleted_tags_total";
    pub const RETENTION_DELETED_MANIFESTS: &str = "kiln_registry_retention_deleted_manifests_total";
}

/// Registers help text for every registry metric with the installed recorder. Call
/// once, after installing the recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        names::REQUESTS,
        "Registry requests by endpoint, method and status"
    );
    describe_histogram!(
        names::REQUEST_SECONDS,
        Unit::Seconds,
        "Time to the response head, by endpoint"
    );
    describe_counter!(
        names::BYTES_SERVED,
        Unit::Bytes,
        "Body bytes of successful GETs, by endpoint"
    );
    describe_counter!(names::GC_RUNS, "Garbage-collection runs, by dry_run");
    describe_counter!(
        names::GC_DELETED_BLOBS,
        "Blobs deleted by garbage collection"
    );
    describe_counter!(
        names::GC_FREED_BYTES,
        Unit::Bytes,
        "Bytes freed by garbage collection"
    );
    describe_counter!(names::RETENTION_RUNS, "Retention runs, by dry_run");
    describe_counter!(names::RETENTION_DELETED_TAGS, "Tags deleted by retention");
    describe_counter!(
        names::RETENTION_DELETED_MANIFESTS,
        "Manifests deleted by retention"
    );
}

/// Buckets for [`names::REQUEST_SECONDS`]: 100 µs to 60 s.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

pub(crate) fn record_request<B>(
    endpoint: &'static str,
    method: &Method,
    response: &Response<B>,
    took: Duration,
) {
    let status = response.status();
    // Methods outside the API's set are folded, so a client cannot mint new series.
    let method = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    metrics::counter!(
        names::REQUESTS,
        "endpoint" => endpoint,
        "method" => method,
        "status" => status.as_str().to_owned()
    )
    .increment(1);
    metrics::histogram!(names::REQUEST_SECONDS, "endpoint" => endpoint).record(took.as_secs_f64());
    if method == "GET" && status.is_success() {
        let length = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(bytes) = length {
            metrics::counter!(names::BYTES_SERVED, "endpoint" => endpoint).increment(bytes);
        }
    }
}

pub(crate) fn record_gc(report: &GcReport) {
    metrics::counter!(names::GC_RUNS, "dry_run" => dry_run_label(report.dry_run)).increment(1);
    if !report.dry_run {
        metrics::counter!(names::GC_DELETED_BLOBS).increment(report.deleted_blobs.len() as u64);
        metrics::counter!(names::GC_FREED_BYTES).increment(report.freed_bytes);
    }
}

pub(crate) fn record_retention(report: &RetentionReport) {
    metrics::counter!(names::RETENTION_RUNS, "dry_run" => dry_run_label(report.dry_run))
        .increment(1);
    if !report.dry_run {
        metrics::counter!(names::RETENTION_DELETED_TAGS)
            .increment(report.deleted_tags.len() as u64);
        metrics::counter!(names::RETENTION_DELETED_MANIFESTS)
            .increment(report.deleted_manifests.len() as u64);
    }
}

fn dry_run_label(dry_run: bool) -> &'static str {
    if dry_run {
        "true"
    } else {
        "false"
    }
}
