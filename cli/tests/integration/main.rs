//! The kiln binary's integration tests, one binary: each file is a module, and each test
//! drives real `kiln` processes on loopback.

mod farm_probes;
mod object_storage;
mod operator_view;
mod registry_blobs;
mod shutdown;
mod support;
mod tls_metrics;
mod worker_sandbox;
