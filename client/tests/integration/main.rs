//! The client crate's integration tests, one binary: each file is a module.
//! Tests that install a tracing dispatch (trace_propagation, secrets_in_telemetry,
//! request_spans) stay binaries of their own: tracing's callsite-interest cache is
//! process-wide.

#[path = "../support/mod.rs"]
mod support;

mod cas_round_trip;
mod remote_run;
