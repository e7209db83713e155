//! The worker crate's integration tests, one binary: each file is a module.
//! Tests that install a tracing dispatch (trace_propagation, secrets_in_telemetry,
//! request_spans) stay binaries of their own: tracing's callsite-interest cache is
//! process-wide.

#[path = "../common/mod.rs"]
mod common;

mod action_limits;
mod action_runner;
mod container_image;
mod input_integrity;
mod input_limits;
mod local_cache;
mod sandbox_escape;
mod worker_loop;
