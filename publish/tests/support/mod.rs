//! Servers the integration tests publish to and fetch from, and what they hold.
#![allow(dead_code)]

pub mod distribution;
pub mod fake_action;
pub mod kiln_servers;
