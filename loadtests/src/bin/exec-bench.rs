//! Remote-execution benchmark (issue 3): no-op action throughput end to end with two
//! workers, scheduling overhead (queued → worker start), and 200 small actions through
//! kiln against the same commands run locally one after another.
//!
//! `cargo run --release -p kiln-loadtests --bin exec-bench`
//!
//! Coordinator and workers run in this process over real loopback sockets; actions run
//! as real processes (without bubblewrap, so that what is measured is kiln, not namespace
//! set-up).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kiln_loadtests::noop_actions::{action, execute, upload, Workers};
use kiln_proto::prost::Message;
use kiln_proto::reapi::{
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Directory, ExecuteResponse,
};
use kiln_store::{Digest, DigestFunction, FsBlobStore, SledMetadataStore};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// No-op actions for the throughput run.
    #[arg(long, default_value_t = 2000)]
    actions: usize,
    /// Slots per worker (two workers).
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Executes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Small actions for the kiln-versus-local comparison.
    #[arg(long, default_value_t = 200)]
    small: usize,
    /// Run actions under the bubblewrap sandbox (as `kiln worker` does by default).
    #[arg(long)]
    sandbox: bool,
    /// Export every span over OTLP/gRPC to a receiver in this process.
    #[arg(long)]
    otlp: bool,
}

fn micros_between(
    from: &Option<kiln_proto::protobuf::Timestamp>,
    to: &Option<kiln_proto::protobuf::Timestamp>,
) -> Option<u64> {
    let (from, to) = (from.as_ref()?, to.as_ref()?);
    let nanos =
        |t: &kiln_proto::protobuf::Timestamp| t.seconds as i128 * 1_000_000_000 + t.nanos as i128;
    u64::try_from((nanos(to) - nanos(from)) / 1000).ok()
}

/// What one run measured.
struct RunFigures {
    elapsed: Duration,
    /// This process's CPU time over the run: client, coordinator and workers, not the
    /// actions' own processes.
    process_cpu: Duration,
    /// Queued (in the scheduler's queue) → worker start, µs.
    queued_to_start: Histogram<u64>,
    /// Execute sent by this client → worker start, µs: also counts the RPC, the action
    /// cache lookup and the durable operation record.
    sent_to_start: Histogram<u64>,
    breakdown: String,
}

/// Runs `actions` with at most `concurrency` in flight.
async fn run_all(
    client: &ExecutionClient<Channel>,
    actions: &[Digest],
    concurrency: usize,
) -> anyhow::Result<RunFigures> {
    let start = Instant::now();
    let cpu_at_start = kiln_loadtests::load::process_cpu_time();
    let responses: Vec<anyhow::Result<(ExecuteResponse, SystemTime)>> =
        futures::stream::iter(actions.iter().map(|a| execute(client, a)))
            .buffer_unordered(concurrency)
            .collect()
            .await;
    let elapsed = start.elapsed();
    let process_cpu = kiln_loadtests::load::process_cpu_time().saturating_sub(cpu_at_start);
    let mut overhead = kiln_loadtests::load::latency_histogram();
    let mut sent_to_start = kiln_loadtests::load::latency_histogram();
    let mut stages = [0u64; 4];
    let mut counted = 0u64;
    for response in responses {
        let (response, sent) = response?;
        let m = response
            .result
            .as_ref()
            .and_then(|r| r.execution_metadata.clone())
            .unwrap_or_default();
        if let Some(us) = micros_between(&m.queued_timestamp, &m.worker_start_timestamp) {
            overhead.saturating_record(us.max(1));
        }
        let since_epoch = sent.duration_since(SystemTime::UNIX_EPOCH)?;
        let sent = Some(kiln_proto::protobuf::Timestamp {
            seconds: since_epoch.as_secs() as i64,
            nanos: since_epoch.subsec_nanos() as i32,
        });
        if let Some(us) = micros_between(&sent, &m.worker_start_timestamp) {
            sent_to_start.saturating_record(us.max(1));
        }
        let spans = [
            micros_between(
                &m.worker_start_timestamp,
                &m.input_fetch_completed_timestamp,
            ),
            micros_between(
                &m.execution_start_timestamp,
                &m.execution_completed_timestamp,
            ),
            micros_between(
                &m.output_upload_start_timestamp,
                &m.output_upload_completed_timestamp,
            ),
            micros_between(&m.worker_start_timestamp, &m.worker_completed_timestamp),
        ];
        if let [Some(a), Some(b), Some(c), Some(d)] = spans {
            for (total, us) in stages.iter_mut().zip([a, b, c, d]) {
                *total += us;
            }
            counted += 1;
        }
    }
    let mean = |i: usize| stages[i] as f64 / counted.max(1) as f64 / 1e3;
    let breakdown = format!(
        "worker stages, mean per action: input fetch {:.2} ms, execution {:.2} ms, output upload {:.2} ms, start to finish {:.2} ms",
        mean(0),
        mean(1),
        mean(2),
        mean(3)
    );
    Ok(RunFigures {
        elapsed,
        process_cpu,
        queued_to_start: overhead,
        sent_to_start,
        breakdown,
    })
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = kiln_loadtests::span_export::BenchTracing::install(args.otlp).await?;
    let dir = tempfile::tempdir()?;
    let blobs = Arc::new(FsBlobStore::open(dir.path().join("cas"))?);
    let metadata = Arc::new(SledMetadataStore::open(dir.path().join("metadata"))?);
    let config = kiln_coordinator::CoordinatorConfig {
        join_token: Some("bench".into()),
        ..Default::default()
    };
    let coordinator = kiln_coordinator::Coordinator::new(config, blobs, metadata);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Workers {
        coordinator: format!("http://{addr}"),
        count: 2,
        slots: args.slots,
        join_token: "bench".into(),
        sandbox: if args.sandbox {
            kiln_worker::SandboxMode::Bubblewrap
        } else {
            kiln_worker::SandboxMode::None
        },
        dir: dir.path().to_path_buf(),
    }
    .start()
    .await?;
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let cas = ContentAddressableStorageClient::new(channel.clone());
    let execution = ExecutionClient::new(channel);

    let empty_root = Directory::default().encode_to_vec();
    let root = Digest::of_bytes(DigestFunction::Sha256, &empty_root);
    let mut all_blobs = vec![(root, empty_root)];
    let mut noop = Vec::new();
    for i in 0..args.actions {
        let (digest, blobs) = action(&["/bin/true"], i, &root);
        noop.push(digest);
        all_blobs.extend(blobs);
    }
    let small_script = "printf 'item %s\\n' \"$KILN_BENCH_NONCE\" | sha256sum";
    let mut small = Vec::new();
    for i in 0..args.small {
        let (digest, blobs) = action(&["/bin/sh", "-c", small_script], 1_000_000 + i, &root);
        small.push(digest);
        all_blobs.extend(blobs);
    }
    upload(&cas, all_blobs).await?;

    // Warm-up: connections, worker caches, the blocking pool.
    let (digest, blobs) = action(&["/bin/true"], usize::MAX, &root);
    upload(&cas, blobs).await?;
    execute(&execution, &digest).await?;

    let receiver_at_start = tracing.receiver_cpu().await;
    let noop_run = run_all(&execution, &noop, args.concurrency).await?;
    // The receiver stands in for a collector on another machine: its CPU is not kiln's.
    let kiln_cpu = noop_run
        .process_cpu
        .saturating_sub(tracing.receiver_cpu().await - receiver_at_start);
    let elapsed = noop_run.elapsed;
    println!(
        "## No-op actions, 2 workers x {} slots, {} in flight",
        args.slots, args.concurrency
    );
    println!(
        "| actions | seconds | actions/s | queued→worker start p50 | p99 | Execute sent→worker start p50 | p99 | kiln CPU per action (without the span receiver) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.2} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} µs |",
        noop.len(),
        elapsed.as_secs_f64(),
        noop.len() as f64 / elapsed.as_secs_f64(),
        ms(&noop_run.queued_to_start, 0.5),
        ms(&noop_run.queued_to_start, 0.99),
        ms(&noop_run.sent_to_start, 0.5),
        ms(&noop_run.sent_to_start, 0.99),
        kiln_cpu.as_secs_f64() * 1e6 / noop.len() as f64,
    );
    println!("\n{}", noop_run.breakdown);

    let local_start = Instant::now();
    for i in 0..args.small {
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", small_script])
            .env("KILN_BENCH_NONCE", (1_000_000 + i).to_string())
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success());
    }
    let local = local_start.elapsed();
    let remote = run_all(&execution, &small, args.concurrency).await?.elapsed;
    let cached = run_all(&execution, &small, args.concurrency).await?.elapsed;
    println!(
        "\n## {} small actions (`sh -c '… | sha256sum'`)",
        args.small
    );
    println!("| run | seconds | speed-up over local |");
    println!("|---|---|---|");
    println!(
        "| local, in sequence | {:.2} | 1.00x |",
        local.as_secs_f64()
    );
    println!(
        "| kiln, 2 workers | {:.2} | {:.2}x |",
        remote.as_secs_f64(),
        local.as_secs_f64() / remote.as_secs_f64()
    );
    println!(
        "| kiln, all cache hits | {:.2} | {:.2}x |",
        cached.as_secs_f64(),
        local.as_secs_f64() / cached.as_secs_f64()
    );
    println!("\ntracing: {}", tracing.finish().await?);
    Ok(())
}
