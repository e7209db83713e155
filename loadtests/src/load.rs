//! A closed-loop load generator: N concurrent callers repeat one request for a fixed
//! time, and the latencies go into a histogram.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies in microseconds, from 1 µs to 10 minutes, to 3 significant figures.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct LoadSummary {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// CPU time of this whole process over the run (every thread: the load generator, and
    /// the server when it runs in process). On a shared machine, a sturdier measure of cost
    /// than throughput, which other processes' load moves.
    pub process_cpu: Duration,
}

impl LoadSummary {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Process CPU per request, in microseconds.
    pub fn cpu_micros_per_request(&self) -> f64 {
        self.process_cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

/// CPU time of the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: clock_gettime only writes the struct it is given.
    let time = unsafe {
        let mut time = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time);
        time
    };
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// User plus system CPU time of this process so far, all threads.
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// User plus system CPU time of another process so far (Garage, HAProxy), from /proc.
pub fn process_cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of those, in clock ticks (100 a second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0);
    Duration::from_millis(ticks * 10)
}

/// Runs `call` from `concurrency` tasks for `duration` (and at most `max_requests` in
/// all), after a short warm-up. Every request is bounded by the run's deadline.
pub async fn closed_loop<F, Fut, E>(
    concurrency: usize,
    duration: Duration,
    max_requests: u64,
    call: F,
) -> LoadSummary
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Debug,
{
    // Warm-up: connections, HTTP/2 windows, allocator.
    for _ in 0..concurrency {
        let _ = call().await;
    }
    let start = Instant::now();
    let cpu_at_start = process_cpu_time();
    let deadline = start + duration;
    let per_task = max_requests / concurrency as u64;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut histogram = latency_histogram();
                let mut errors = 0u64;
                for _ in 0..per_task {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let sent = Instant::now();
                    if call().await.is_err() {
                        errors += 1;
                    }
                    histogram.saturating_record(sent.elapsed().as_micros() as u64);
                }
                (histogram, errors)
            })
        })
        .collect();
    let mut histogram = latency_histogram();
    let mut errors = 0;
    for task in tasks {
        let (h, e) = task.await.expect("load task panicked");
        histogram.add(h).expect("histograms of the same precision");
        errors += e;
    }
    LoadSummary {
        requests: histogram.len(),
        errors,
        elapsed: start.elapsed(),
        process_cpu: process_cpu_time().saturating_sub(cpu_at_start),
        p50: Duration::from_micros(histogram.value_at_quantile(0.5)),
        p99: Duration::from_micros(histogram.value_at_quantile(0.99)),
    }
}

/// GetActionResult hits for `action` from `concurrency` callers for `seconds`, each call
/// carrying `token` when one is given.
pub async fn get_action_results(
    channel: &tonic::transport::Channel,
    token: Option<&'static str>,
    action: kiln_proto::reapi::Digest,
    concurrency: usize,
    seconds: u64,
) -> LoadSummary {
    use kiln_proto::reapi::{action_cache_client::ActionCacheClient, GetActionResultRequest};
    let ac = ActionCacheClient::new(channel.clone());
    closed_loop(
        concurrency,
        Duration::from_secs(seconds),
        10_000_000,
        move || {
            let mut ac = ac.clone();
            let message = GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            };
            async move {
                ac.get_action_result(crate::request(message, token))
                    .await
                    .map(|_| ())
            }
        },
    )
    .await
}

/// FindMissingBlobs for `digests` (of which `present` are stored), called in sequence
/// for `seconds` or 500 calls; a call that reports another number missing is an error.
/// The request is encoded once and the response only counted ([`crate::pre_encoded`]),
/// so that the latency is the server's and the transport's.
pub async fn find_missing_blobs(
    channel: &tonic::transport::Channel,
    digests: Vec<kiln_proto::reapi::Digest>,
    present: usize,
    seconds: u64,
) -> LoadSummary {
    use kiln_proto::prost::Message;
    use kiln_proto::reapi::FindMissingBlobsRequest;
    const PATH: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    /// `FindMissingBlobsResponse.missing_blob_digests`.
    const MISSING_FIELD: u32 = 2;
    let wanted = digests.len() - present;
    let request = bytes::Bytes::from(
        FindMissingBlobsRequest {
            blob_digests: digests,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let channel = channel.clone();
    closed_loop(1, Duration::from_secs(seconds), 500, move || {
        let (channel, request) = (channel.clone(), request.clone());
        async move {
            let response = crate::pre_encoded::unary(&channel, PATH, request).await?;
            let missing = crate::pre_encoded::count_field(response, MISSING_FIELD)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            if missing == wanted {
                Ok(())
            } else {
                Err(tonic::Status::internal(format!(
                    "{missing} missing, wanted {wanted}"
                )))
            }
        }
    })
    .await
}
