//! Servers the integration tests publish to and fetch from.
#![allow(dead_code)]

pub mod distribution;
pub mod kiln_servers;
