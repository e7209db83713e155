//! kiln-loadtests: load generators and side-by-side benchmarks, loopback only.
//!
//! Each benchmark binary prints Markdown rows for `BENCHMARKS.md`. Because the machines
//! are shared and noisy, every figure is reported next to a reference measured in the
//! same run (raw hash speed, loopback TCP), and the ratio is what counts.

pub mod balancer;
pub mod bytestream;
pub mod in_process;
pub mod load;
pub mod noop_actions;
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

/// Checks a download piece by piece against the bytes that were uploaded, as they arrive:
/// a comparison costs the client far less than keeping (or hashing) hundreds of MiB on
/// the two cores it shares with the server.
pub struct SameBytes<'a> {
    expected: &'a [u8],
    received: usize,
}

impl<'a> SameBytes<'a> {
    pub fn new(expected: &'a [u8]) -> Self {
        SameBytes {
            expected,
            received: 0,
        }
    }

    pub fn check(&mut self, piece: &[u8]) -> anyhow::Result<()> {
        let end = self.received + piece.len();
        anyhow::ensure!(
            self.expected.get(self.received..end) == Some(piece),
            "bytes {}..{end} differ from what was uploaded",
            self.received
        );
        self.received = end;
        Ok(())
    }

    /// Fails unless every byte arrived.
    pub fn finish(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.received == self.expected.len(),
            "{} of {} bytes arrived",
            self.received,
            self.expected.len()
        );
        Ok(())
    }
}
