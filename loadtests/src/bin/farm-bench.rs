//! What the farm mode costs a cache lookup (issue 16), in one run on this machine:
//!
//! - GetActionResult hits on one coordinator with sled metadata, and on one with
//!   PostgreSQL metadata (a throwaway cluster): PostgreSQL's cost per lookup;
//! - the same lookups on one replica of a three-replica farm (PostgreSQL metadata, shared
//!   blobs) called directly, and on the three behind Debian's HAProxy (HTTP/2, round
//!   robin): the balancer's and the farm's cost.
//!
//! Rounds alternate between the four, and the medians are compared. Everything shares
//! this machine's cores, so three replicas cannot be faster than one here: the question is
//! how much the extra hop costs.
//!
//! `cargo run --release -p kiln-loadtests --bin farm-bench` (needs Debian's `postgresql` and
//! `haproxy`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiln_coordinator::{Coordinator, CoordinatorConfig, FarmConfig};
use kiln_loadtests::{load, median, seed};
use kiln_store::{BlobStore, MemoryBlobStore, MetadataStore, SledMetadataStore};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// Rounds per server; the medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of load per round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

async fn serve(
    config: CoordinatorConfig,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = config;
    if config.farm.enabled {
        config.farm.advertise_url = format!("http://{addr}");
    }
    let coordinator = Coordinator::new(config, blobs, metadata);
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Ok(addr)
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// HAProxy in front of `servers` over HTTP/2, round robin per call; ended on drop.
struct Balancer {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Balancer {
    fn start(servers: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut config = format!(
            "global\n    maxconn 4000\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\nfrontend farm\n    bind 127.0.0.1:{port} proto h2\n    default_backend farm\nbackend farm\n    balance roundrobin\n"
        );
        for (i, server) in servers.iter().enumerate() {
            config.push_str(&format!("    server replica{i} {server} proto h2\n"));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting haproxy (Debian's haproxy package): {e}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Balancer {
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let postgres = kiln_testkit::Postgres::start()?;
    let settings = kiln_postgres::PostgresSettings::new(postgres.url());
    let connect = || async {
        anyhow::Ok(
            Arc::new(kiln_postgres::PostgresMetadataStore::connect(&settings).await?)
                as Arc<dyn MetadataStore>,
        )
    };
    let sled_dir = tempfile::tempdir()?;

    let alone = CoordinatorConfig::default();
    let sled = serve(
        alone.clone(),
        Arc::new(MemoryBlobStore::new()),
        Arc::new(SledMetadataStore::open(sled_dir.path())?),
    )
    .await?;
    let pg = serve(alone, Arc::new(MemoryBlobStore::new()), connect().await?).await?;
    // The farm: three replicas, one blob store and one database between them (a pool each).
    let farm_config = CoordinatorConfig {
        farm: FarmConfig {
            enabled: true,
            ..FarmConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    let shared_blobs: Arc<dyn BlobStore> = Arc::new(MemoryBlobStore::new());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(serve(farm_config.clone(), shared_blobs.clone(), connect().await?).await?);
    }
    let balancer = Balancer::start(&replicas)?;

    let targets = [
        ("one coordinator, sled metadata", sled),
        ("one coordinator, PostgreSQL metadata", pg),
        ("one farm replica, called directly", replicas[0]),
        ("three farm replicas behind HAProxy", balancer.addr),
    ];
    let mut channels = Vec::new();
    let mut actions = Vec::new();
    for (_, addr) in &targets {
        let channel = channel(*addr).await?;
        actions.push(seed::action_result(&channel).await?);
        channels.push(channel);
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for _ in 0..args.rounds {
        for (i, channel) in channels.iter().enumerate() {
            let summary = load::get_action_results(
                channel,
                None,
                actions[i].clone(),
                args.concurrency,
                args.seconds,
            )
            .await;
            anyhow::ensure!(
                summary.errors == 0,
                "{}: {} errors",
                targets[i].0,
                summary.errors
            );
            rates[i].push(summary.per_second());
            p99s[i].push(summary.p99.as_secs_f64() * 1e3);
        }
    }
    let medians: Vec<(f64, f64)> = rates
        .iter_mut()
        .zip(p99s.iter_mut())
        .map(|(r, p)| (median(r), median(p)))
        .collect();
    println!(
        "## GetActionResult hits, {} callers, {} rounds of {} s (medians)\n",
        args.concurrency, args.rounds, args.seconds
    );
    println!("| server | req/s | p99 ms | ratio |");
    println!("|---|---|---|---|");
    let ratios = [
        String::from("reference"),
        format!("{:.0}% of sled", 100.0 * medians[1].0 / medians[0].0),
        String::from("reference for the farm"),
        format!("{:.0}% of one replica", 100.0 * medians[3].0 / medians[2].0),
    ];
    for (((name, _), (rate, p99)), ratio) in targets.iter().zip(&medians).zip(&ratios) {
        println!("| {name} | {rate:.0} | {p99:.2} | {ratio} |");
    }
    Ok(())
}
