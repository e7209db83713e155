//! `TraceCollector` as the trace tests use it: a "process" whose spans it waits for, and a
//! wait that fails the test when they never come.
//! A test binary of its own: it sets the `tracing` dispatchers its threads use.
#![cfg(feature = "receiver")]

use std::time::Duration;

use kiln_telemetry::receiver::{named, one, TraceCollector};

/// Exported spans are kiln's (targets `kiln*`).
const TARGET: &str = "kiln_trace_collector_test";

#[test]
fn expect_spans_returns_once_the_spans_arrive() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = collector.process("kiln-test").expect("telemetry starts");
    process.block_on(async {
        tracing::info_span!(target: TARGET, "work", step = 1).in_scope(|| {});
    });
    let spans = collector.expect_spans(&[&process], Duration::from_secs(20), |spans| {
        !named(spans, "kiln-test", "work").is_empty()
    });
    let work = one(&spans, "kiln-test", "work");
    assert_eq!(work.attribute("step").as_deref(), Some("1"));
}

#[test]
#[should_panic(expected = "spans never arrived")]
fn expect_spans_fails_when_they_do_not() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = collector.process("kiln-test").expect("telemetry starts");
    process.block_on(async {
        tracing::info_span!(target: TARGET, "work").in_scope(|| {});
    });
    collector.expect_spans(&[&process], Duration::from_millis(500), |spans| {
        !named(spans, "kiln-test", "never").is_empty()
    });
}
