//! The object store on a real Garage on loopback. `#[ignore]`d in the plain test run
//! (Garage is not part of the Rust toolchain); `.ci/run` installs Garage and runs them.

mod conformance;
mod crash;
mod faults;
mod outage;
mod replicas;
mod support;
