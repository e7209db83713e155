//! What the farm mode costs (issue 16), in one run on this machine:
//!
//! - GetActionResult hits on one coordinator with sled metadata, and on one with
//!   PostgreSQL metadata (a throwaway cluster), with and without the action cache's
//!   memory of recent entries (`action_cache_recent_ms`): PostgreSQL's cost per lookup,
//!   and what the memory saves on a hot entry;
//! - the same lookups on one replica of a three-replica farm (PostgreSQL metadata, shared
//!   blobs) called directly, and on the three behind Debian's HAProxy (HTTP/2, round
//!   robin): the balancer's and the farm's cost;
//! - manifest GETs on one registry replica (PostgreSQL metadata, shared blobs) called
//!   directly, and on three behind HAProxy (HTTP/1.1, each request balanced);
//! - no-op actions (`/bin/true`, none cached) through a farm of one replica with two
//!   workers, and through the three-replica farm behind HAProxy with two workers joined
//!   through it: two of every three Execute calls, and the workers' streams that land on
//!   a follower, are forwarded to the leader.
//!
//! Rounds alternate between the servers compared, and the medians are compared.
//! Everything shares this machine's cores, so three replicas cannot be faster than one
//! here: the question is how much the extra hop costs.
//!
//! `cargo run --release -p kiln-loadtests --bin farm-bench` (needs Debian's `postgresql` and
//! `haproxy`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use kiln_coordinator::{CoordinatorConfig, FarmConfig};
use kiln_loadtests::balancer::{Balancer, Protocol};
use kiln_loadtests::in_process::{serve_coordinator, serve_registry};
use kiln_loadtests::load::{self, LoadSummary};
use kiln_loadtests::noop_actions::{action, execute, upload, Workers};
use kiln_loadtests::registry_http::{get, http_client, RegistryTarget, OCI_MANIFEST};
use kiln_loadtests::{median, seed};
use kiln_proto::prost::Message;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::Directory;
use kiln_registry::RegistryConfig;
use kiln_store::{
    BlobStore, Digest, DigestFunction, MemoryBlobStore, MetadataStore, SledMetadataStore,
};
use tonic::transport::{Channel, Endpoint};

/// Workers' join token in this benchmark's farms.
const JOIN_TOKEN: &str = "bench";

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
    /// No-op actions per round and farm.
    #[arg(long, default_value_t = 400)]
    actions: usize,
    /// Slots of each of a farm's two workers.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Executes in flight at once.
    #[arg(long, default_value_t = 64)]
    executes: usize,
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// A server (or balancer) to load, and the balancer's process when it is one.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    balancer: Option<u32>,
}

impl Target {
    fn direct(name: &'static str, addr: SocketAddr) -> Self {
        Target {
            name,
            addr,
            balancer: None,
        }
    }

    fn behind(name: &'static str, balancer: &Balancer) -> Self {
        Target {
            name,
            addr: balancer.addr,
            balancer: Some(balancer.pid),
        }
    }
}

/// One round against one target.
#[derive(Clone, Copy, Default)]
struct Round {
    /// Requests (or actions) a second.
    rate: f64,
    p99_ms: f64,
    /// CPU of this process (client and servers) per request, µs.
    cpu_us: f64,
    /// CPU of HAProxy per request, µs (0 for a target called directly).
    balancer_cpu_us: f64,
}

/// Each target's rounds; the medians are reported.
struct Tally(Vec<Vec<Round>>);

impl Tally {
    fn new(targets: usize) -> Self {
        Tally(vec![Vec::new(); targets])
    }

    fn record(&mut self, target: usize, round: Round) {
        self.0[target].push(round);
    }

    fn medians(self) -> Vec<Round> {
        self.0
            .into_iter()
            .map(|rounds| {
                let of = |field: fn(&Round) -> f64| {
                    median(&mut rounds.iter().map(field).collect::<Vec<_>>())
                };
                Round {
                    rate: of(|r| r.rate),
                    p99_ms: of(|r| r.p99_ms),
                    cpu_us: of(|r| r.cpu_us),
                    balancer_cpu_us: of(|r| r.balancer_cpu_us),
                }
            })
            .collect()
    }
}

/// One table: each target's medians, with its ratio.
fn print_table(title: &str, unit: &str, targets: &[Target], medians: &[Round], ratios: &[String]) {
    println!("\n## {title}\n");
    println!("| server | {unit} | p99 ms | CPU here, µs each | HAProxy CPU, µs each | ratio |");
    println!("|---|---|---|---|---|---|");
    for ((target, round), ratio) in targets.iter().zip(medians).zip(ratios) {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {ratio} |",
            target.name, round.rate, round.p99_ms, round.cpu_us, round.balancer_cpu_us
        );
    }
}

/// [`print_table`] for one server against replicas behind a balancer.
fn print_against_one(title: &str, unit: &str, targets: &[Target], medians: &[Round]) {
    let ratios = [
        String::from("reference"),
        format!(
            "{} of one replica",
            percent(medians[1].rate, medians[0].rate)
        ),
    ];
    print_table(title, unit, targets, medians, &ratios);
}

/// HAProxy's CPU over a span, per request.
struct BalancerCpu {
    pid: Option<u32>,
    at_start: Duration,
}

impl BalancerCpu {
    /// `pid`: the balancer in front of the target, if any.
    fn start(pid: Option<u32>) -> Self {
        BalancerCpu {
            pid,
            at_start: pid.map_or(Duration::ZERO, load::process_cpu_time_of),
        }
    }

    fn per_request_us(&self, requests: u64) -> f64 {
        let Some(pid) = self.pid else { return 0.0 };
        let used = load::process_cpu_time_of(pid).saturating_sub(self.at_start);
        used.as_secs_f64() * 1e6 / requests.max(1) as f64
    }
}

fn round_of(summary: &LoadSummary, balancer: &BalancerCpu) -> Round {
    Round {
        rate: summary.per_second(),
        p99_ms: summary.p99.as_secs_f64() * 1e3,
        cpu_us: summary.cpu_micros_per_request(),
        balancer_cpu_us: balancer.per_request_us(summary.requests),
    }
}

fn percent(part: f64, whole: f64) -> String {
    format!("{:.0}%", 100.0 * part / whole)
}

fn ensure_clean(name: &str, summary: &LoadSummary) -> anyhow::Result<()> {
    anyhow::ensure!(summary.errors == 0, "{name}: {} errors", summary.errors);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let postgres = kiln_testkit::Postgres::start()?;
    let settings = kiln_postgres::PostgresSettings::new(postgres.url());
    let connect = |settings: kiln_postgres::PostgresSettings| async move {
        anyhow::Ok(
            Arc::new(kiln_postgres::PostgresMetadataStore::connect(&settings).await?)
                as Arc<dyn MetadataStore>,
        )
    };
    let dir = tempfile::tempdir()?;

    let alone = CoordinatorConfig::default();
    let sled = serve_coordinator(
        alone.clone(),
        Arc::new(MemoryBlobStore::new()),
        Arc::new(SledMetadataStore::open(dir.path().join("sled"))?),
    )
    .await?;
    let pg = serve_coordinator(
        alone.clone(),
        Arc::new(MemoryBlobStore::new()),
        connect(settings.clone()).await?,
    )
    .await?;
    // Every lookup a PostgreSQL read: what a farm pays for entries it has not read for
    // `action_cache_recent_ms`.
    let uncached = CoordinatorConfig {
        action_cache_recent_ms: 0,
        ..alone
    };
    let pg_uncached = serve_coordinator(
        uncached,
        Arc::new(MemoryBlobStore::new()),
        connect(settings.clone()).await?,
    )
    .await?;
    // The farm: three replicas, one blob store and one database between them (a pool each).
    let farm_config = CoordinatorConfig {
        join_token: Some(JOIN_TOKEN.into()),
        farm: FarmConfig {
            enabled: true,
            ..FarmConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    let shared_blobs: Arc<dyn BlobStore> = Arc::new(MemoryBlobStore::new());
    let mut replicas = Vec::new();
    let mut registries = Vec::new();
    for _ in 0..3 {
        let metadata = connect(settings.clone()).await?;
        replicas.push(
            serve_coordinator(farm_config.clone(), shared_blobs.clone(), metadata.clone()).await?,
        );
        // Shared metadata: a chunked upload may continue on another replica.
        let config = RegistryConfig {
            shared_upload_sessions: true,
            ..RegistryConfig::default()
        };
        registries.push(serve_registry(config, shared_blobs.clone(), metadata).await?);
    }
    let balancer = Balancer::start(&replicas, Protocol::Grpc)?;
    // The balancer's hop alone: one replica behind it.
    let hop = Balancer::start(&replicas[..1], Protocol::Grpc)?;
    let registry_balancer = Balancer::start(&registries, Protocol::Http1)?;
    // A farm of one on a database of its own (a farm is one per database).
    let solo_postgres = kiln_testkit::Postgres::start()?;
    let solo_metadata = connect(kiln_postgres::PostgresSettings::new(solo_postgres.url())).await?;
    let solo =
        serve_coordinator(farm_config, Arc::new(MemoryBlobStore::new()), solo_metadata).await?;
    let workers = |addr, name: &str| Workers {
        coordinator: format!("http://{addr}"),
        count: 2,
        slots: args.slots,
        join_token: JOIN_TOKEN.into(),
        sandbox: kiln_worker::SandboxMode::None,
        dir: dir.path().join(name),
    };
    workers(solo, "solo").start().await?;
    workers(balancer.addr, "farm").start().await?;

    let lookups = [
        Target::direct("one coordinator, sled metadata", sled),
        Target::direct("one coordinator, PostgreSQL metadata", pg),
        Target::direct(
            "the same, without the action cache's memory (`action_cache_recent_ms = 0`)",
            pg_uncached,
        ),
        Target::direct("one farm replica, called directly", replicas[0]),
        Target::behind("the same replica behind HAProxy", &hop),
        Target::behind("three farm replicas behind HAProxy", &balancer),
    ];
    get_action_results(&args, &lookups).await?;
    let manifests = [
        Target::direct("one registry replica, called directly", registries[0]),
        Target::behind("three registry replicas behind HAProxy", &registry_balancer),
    ];
    manifest_gets(&args, &manifests).await?;
    let farms = [
        Target::direct("a farm of one replica, 2 workers", solo),
        Target::behind(
            "three farm replicas behind HAProxy, 2 workers joined through it",
            &balancer,
        ),
    ];
    noop_actions(&args, &farms).await?;
    Ok(())
}

async fn get_action_results(args: &Args, targets: &[Target]) -> anyhow::Result<()> {
    let mut channels = Vec::new();
    let mut actions = Vec::new();
    for target in targets {
        let channel = channel(target.addr).await?;
        actions.push(seed::action_result(&channel).await?);
        channels.push(channel);
    }
    let mut tally = Tally::new(targets.len());
    for _ in 0..args.rounds {
        for (i, channel) in channels.iter().enumerate() {
            let haproxy = BalancerCpu::start(targets[i].balancer);
            let summary = load::get_action_results(
                channel,
                None,
                actions[i].clone(),
                args.concurrency,
                args.seconds,
            )
            .await;
            ensure_clean(targets[i].name, &summary)?;
            tally.record(i, round_of(&summary, &haproxy));
        }
    }
    let medians = tally.medians();
    let of_sled = |i: usize| format!("{} of sled", percent(medians[i].rate, medians[0].rate));
    let of_replica = |i: usize| {
        format!(
            "{} of one replica",
            percent(medians[i].rate, medians[3].rate)
        )
    };
    let ratios = [
        String::from("reference"),
        of_sled(1),
        of_sled(2),
        String::from("reference for the farm"),
        of_replica(4),
        of_replica(5),
    ];
    let title = format!(
        "GetActionResult hits, {} callers, {} rounds of {} s (medians)",
        args.concurrency, args.rounds, args.seconds
    );
    print_table(&title, "req/s", targets, &medians, &ratios);
    Ok(())
}

async fn manifest_gets(args: &Args, targets: &[Target]) -> anyhow::Result<()> {
    let client = http_client(args.concurrency);
    let target = |addr: SocketAddr| RegistryTarget {
        name: "kiln",
        base: format!("http://{addr}"),
        client: client.clone(),
    };
    // Pushed once: every replica reads the same index.
    let manifest = target(targets[0].addr)
        .push_image("bench/manifests", "v1.0.0")
        .await?;
    let mut tally = Tally::new(targets.len());
    for _ in 0..args.rounds {
        for (i, server) in targets.iter().enumerate() {
            let addr = server.addr;
            let uri: hyper::Uri =
                format!("http://{addr}/v2/bench/manifests/manifests/v1.0.0").parse()?;
            let (client, expected) = (client.clone(), manifest.clone());
            let haproxy = BalancerCpu::start(server.balancer);
            let summary = load::closed_loop(
                args.concurrency,
                Duration::from_secs(args.seconds),
                u64::MAX,
                move || {
                    let (client, uri, expected) = (client.clone(), uri.clone(), expected.clone());
                    async move {
                        let body = get(&client, uri, OCI_MANIFEST).await?;
                        anyhow::ensure!(body == expected, "a different manifest came back");
                        Ok::<_, anyhow::Error>(())
                    }
                },
            )
            .await;
            ensure_clean(server.name, &summary)?;
            tally.record(i, round_of(&summary, &haproxy));
        }
    }
    let medians = tally.medians();
    let title = format!(
        "Manifest GETs by tag, {} connections, {} rounds of {} s (medians)",
        args.concurrency, args.rounds, args.seconds
    );
    print_against_one(&title, "req/s", targets, &medians);
    Ok(())
}

async fn noop_actions(args: &Args, targets: &[Target]) -> anyhow::Result<()> {
    let empty_root = Directory::default().encode_to_vec();
    let root = Digest::of_bytes(DigestFunction::Sha256, &empty_root);
    let mut clients = Vec::new();
    for target in targets {
        let channel = channel(target.addr).await?;
        let cas = ContentAddressableStorageClient::new(channel.clone());
        upload(&cas, vec![(root, empty_root.clone())]).await?;
        clients.push((cas, ExecutionClient::new(channel)));
    }
    let mut nonce = 0;
    let mut tally = Tally::new(targets.len());
    for _ in 0..args.rounds {
        for (i, (cas, execution)) in clients.iter().enumerate() {
            let mut blobs = Vec::new();
            let mut actions = Vec::new();
            for _ in 0..args.actions {
                let (digest, its_blobs) = action(&["/bin/true"], nonce, &root);
                nonce += 1;
                actions.push(digest);
                blobs.extend(its_blobs);
            }
            upload(cas, blobs).await?;
            let mut latencies = load::latency_histogram();
            let haproxy = BalancerCpu::start(targets[i].balancer);
            let cpu_at_start = load::process_cpu_time();
            let start = std::time::Instant::now();
            let results: Vec<anyhow::Result<Duration>> =
                futures::stream::iter(actions.iter().map(|digest| async move {
                    let sent = std::time::Instant::now();
                    execute(execution, digest).await?;
                    Ok(sent.elapsed())
                }))
                .buffer_unordered(args.executes)
                .collect()
                .await;
            let elapsed = start.elapsed();
            let cpu = load::process_cpu_time().saturating_sub(cpu_at_start);
            for result in results {
                let latency = result.map_err(|e| anyhow::anyhow!("{}: {e}", targets[i].name))?;
                latencies.saturating_record(latency.as_micros() as u64);
            }
            let count = actions.len() as u64;
            tally.record(
                i,
                Round {
                    rate: count as f64 / elapsed.as_secs_f64(),
                    p99_ms: latencies.value_at_quantile(0.99) as f64 / 1e3,
                    cpu_us: cpu.as_secs_f64() * 1e6 / count as f64,
                    balancer_cpu_us: haproxy.per_request_us(count),
                },
            );
        }
    }
    let medians = tally.medians();
    let title = format!(
        "No-op actions (`/bin/true`, none cached), {} per round, {} in flight, 2 workers × {} slots, {} rounds (medians)",
        args.actions, args.executes, args.slots, args.rounds
    );
    print_against_one(&title, "actions/s", targets, &medians);
    Ok(())
}
