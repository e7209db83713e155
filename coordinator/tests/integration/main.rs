//! The coordinator crate's integration tests, one binary: each file is a module.
//! Tests that install a tracing dispatch (trace_propagation, secrets_in_telemetry,
//! request_spans) stay binaries of their own: tracing's callsite-interest cache is
//! process-wide.

#[path = "../common/mod.rs"]
mod common;

mod action_cache;
mod admin;
mod auth;
mod bounded_store;
mod byte_stream;
mod cas;
mod execution;
mod farm;
mod request_limits;
mod restart;
mod slow_clients;
mod tls;
