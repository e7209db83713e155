//! kiln-loadtests: load generators and side-by-side benchmarks, loopback only.
//!
//! Each benchmark binary prints Markdown rows for `BENCHMARKS.md`. Because the machines
//! are shared and noisy, every figure is reported next to a reference measured in the
//! same run (raw hash speed, loopback TCP), and the ratio is what counts.

pub mod bytestream;
pub mod in_process;
pub mod load;
pub mod pre_encoded;
pub mod reference;
pub mod registry_http;
pub mod seed;
pub mod span_export;

/// `message` as a request, with `authorization: Bearer <token>` when a token is given
/// (for a coordinator whose auth is on).
pub fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("tokens are ASCII");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The rounds of a side-by-side benchmark of two servers: ByteStream blobs, then
/// GetActionResult callers, in each round on each server.
#[derive(Clone, Debug, clap::Args)]
pub struct Rounds {
    /// Size of each measured ByteStream blob, in MiB.
    #[arg(long, default_value_t = 64)]
    pub blob_mib: usize,
    /// Measured blobs per round.
    #[arg(long, default_value_t = 4)]
    pub blobs: usize,
    /// Seconds per GetActionResult run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent GetActionResult callers.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Rounds, each measuring both servers.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// The median of a few measurements (rounds of a benchmark).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, elapsed: std::time::Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}
