//! The publish crate's integration tests, one binary: each file is a module.
//! Tests that install a tracing dispatch (trace_propagation, secrets_in_telemetry,
//! request_spans) stay binaries of their own: tracing's callsite-interest cache is
//! process-wide.

#[path = "../support/mod.rs"]
mod support;

mod from_action;
mod git_tags;
mod layer_determinism;
mod push_distribution;
mod push_kiln_registry;
