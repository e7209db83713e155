//! What eviction costs the requests it runs beside (issue 12): ByteStream write throughput
//! and GetActionResult req/s on a coordinator whose blob store sits at its high watermark,
//! with eviction passes removing blobs all the while, against the same coordinator with a
//! limit it never nears. Both servers run in this process, on the same disk, with the same
//! background writer, measured in alternating rounds: the limit is the only difference.
//!
//! `cargo run --release -p kiln-loadtests --bin eviction-bench`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_loadtests::bytestream::write_blob;
use kiln_loadtests::{load, mb_per_s, median, seed, Rounds};
use kiln_store::{BlobStore, BoundedBlobStore, EvictionPolicy, FsBlobStore, SledMetadataStore};
use rand::RngCore;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// The limit of the store that evicts, in MiB.
    #[arg(long, default_value_t = 1024)]
    limit_mib: u64,
    #[command(flatten)]
    plan: Rounds,
    /// Where the servers keep their data [default: a temporary directory under $TMPDIR].
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// One coordinator in process, and its store.
struct Server {
    name: &'static str,
    channel: Channel,
    store: Arc<BoundedBlobStore>,
    _dir: tempfile::TempDir,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = args.limit_mib << 20;
    let evicting = EvictionPolicy {
        grace: Duration::ZERO,
        interval: Duration::from_millis(200),
        ..EvictionPolicy::with_max_bytes(limit)
    };
    let idle = EvictionPolicy {
        max_bytes: 1 << 50,
        ..evicting.clone()
    };
    let parent = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let servers = [
        Server::start("eviction idle", &parent, idle).await?,
        Server::start("eviction active", &parent, evicting).await?,
    ];
    // The evicting store starts just under its high watermark, with cold blobs to evict.
    fill(&servers[1], (limit as f64 * 0.88) as u64).await?;

    // The same pressure on both: a writer of fresh 8 MiB blobs, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let mut pressure = Vec::new();
    let background_bytes: Vec<Arc<AtomicU64>> = servers
        .iter()
        .map(|server| {
            let written = Arc::new(AtomicU64::new(0));
            pressure.push(tokio::spawn(background_writer(
                server.channel.clone(),
                stop.clone(),
                written.clone(),
            )));
            written
        })
        .collect();

    let mut writes = [Vec::new(), Vec::new()];
    let mut hits = [Vec::new(), Vec::new()];
    for round in 0..args.plan.rounds {
        for (i, server) in servers.iter().enumerate() {
            writes[i].push(write_round(server, args.plan.blob_mib << 20, args.plan.blobs).await?);
        }
        for (i, server) in servers.iter().enumerate() {
            let summary =
                get_action_results(server, args.plan.concurrency, args.plan.seconds).await;
            anyhow::ensure!(
                summary.errors == 0,
                "{}: {} errors",
                server.name,
                summary.errors
            );
            hits[i].push(summary.per_second());
        }
        eprintln!("round {} of {} done", round + 1, args.plan.rounds);
    }
    stop.store(true, Ordering::Relaxed);
    for task in pressure {
        task.await??;
    }

    let held = servers[1].store.stored_bytes().await?;
    println!(
        "\n## Eviction active vs idle, {} rounds; limit {} MiB, {} × {} MiB ByteStream writes per round, {} GetActionResult callers for {} s",
        args.plan.rounds, args.limit_mib, args.plan.blobs, args.plan.blob_mib, args.plan.concurrency, args.plan.seconds
    );
    println!("| measure | eviction idle | eviction active | active / idle |");
    println!("|---|---|---|---|");
    let (w_idle, w_active) = (median(&mut writes[0]), median(&mut writes[1]));
    println!(
        "| ByteStream write, MB/s (median) | {w_idle:.0} | {w_active:.0} | {:.0}% |",
        100.0 * w_active / w_idle
    );
    let (h_idle, h_active) = (median(&mut hits[0]), median(&mut hits[1]));
    println!(
        "| GetActionResult, req/s (median) | {h_idle:.0} | {h_active:.0} | {:.0}% |",
        100.0 * h_active / h_idle
    );
    let written = background_bytes[1].load(Ordering::Relaxed)
        + (args.plan.rounds * args.plan.blobs * (args.plan.blob_mib << 20)) as u64;
    println!(
        "\nThe evicting store took {} MiB of writes through its {} MiB limit and held {} MiB at the end.",
        written >> 20,
        args.limit_mib,
        held >> 20
    );
    anyhow::ensure!(held <= limit, "the evicting store is over its limit");
    Ok(())
}

impl Server {
    async fn start(
        name: &'static str,
        parent: &std::path::Path,
        policy: EvictionPolicy,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(parent)?;
        let files = Arc::new(FsBlobStore::open(dir.path().join("cas"))?);
        let store = Arc::new(BoundedBlobStore::new(files, policy).await?);
        tokio::spawn(store.clone().run_eviction(futures::future::pending()));
        let metadata = Arc::new(SledMetadataStore::open(dir.path().join("metadata"))?);
        let coordinator =
            kiln_coordinator::Coordinator::new(Default::default(), store.clone(), metadata);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(coordinator.serve(listener, futures::future::pending()));
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect()
            .await?;
        Ok(Server {
            name,
            channel,
            store,
            _dir: dir,
        })
    }
}

fn random(len: usize) -> bytes::Bytes {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data.into()
}

/// Fills a store with cold blobs up to `bytes`.
async fn fill(server: &Server, bytes: u64) -> anyhow::Result<()> {
    let mut written = 0;
    while written < bytes {
        let data = random(8 << 20);
        written += data.len() as u64;
        write_blob(&server.channel, data).await?;
    }
    Ok(())
}

/// Writes fresh 8 MiB blobs until told to stop. Writes refused for a full store are
/// expected at the watermark (the answer a client would get) and are retried later.
async fn background_writer(
    channel: Channel,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let data = random(8 << 20);
        let len = data.len() as u64;
        match write_blob(&channel, data).await {
            Ok(_) => {
                written.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                let full = e.code() == tonic::Code::ResourceExhausted;
                anyhow::ensure!(full, "background write failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok(())
}

/// MB/s of `count` fresh blobs written one after another.
async fn write_round(server: &Server, size: usize, count: usize) -> anyhow::Result<f64> {
    let blobs: Vec<bytes::Bytes> = (0..count).map(|_| random(size)).collect();
    let start = Instant::now();
    for data in blobs {
        write_blob(&server.channel, data).await?;
    }
    Ok(mb_per_s((size * count) as u64, start.elapsed()))
}

async fn get_action_results(
    server: &Server,
    concurrency: usize,
    seconds: u64,
) -> load::LoadSummary {
    // Stored again first: at the watermark, the write rounds may have evicted the
    // output of a result nobody asked for since.
    let action = seed::action_result(&server.channel)
        .await
        .expect("the result can be stored again");
    load::get_action_results(&server.channel, None, action, concurrency, seconds).await
}
