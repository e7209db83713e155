//! kiln-loadtests: load generators and side-by-side benchmarks, loopback only.
//!
//! Each benchmark binary prints Markdown rows for `BENCHMARKS.md`. Because the machines
//! are shared and noisy, every figure is reported next to a reference measured in the
//! same run (raw hash speed, loopback TCP), and the ratio is what counts.

pub mod bytestream;
pub mod load;
pub mod reference;
pub mod seed;
pub mod span_export;

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, elapsed: std::time::Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}
