//! The registry crate's integration tests, one binary: each file is a module.
//! Tests that install a tracing dispatch (trace_propagation, secrets_in_telemetry,
//! request_spans) stay binaries of their own: tracing's callsite-interest cache is
//! process-wide.

#[path = "../common/mod.rs"]
mod common;

mod distribution_spec;
mod gc_and_retention;
mod policy_and_auth;
mod slow_clients;
mod storage_limit;
mod tls;
