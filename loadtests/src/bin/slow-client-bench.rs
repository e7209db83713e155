//! Normal clients' latency while hostile ones try to tie the servers up (issue 13): p99 of
//! GetActionResult on the coordinator and of `GET /v2/` on the registry, first alone,
//! then while attackers hold slowloris HTTP connections (headers a line at a time),
//! ByteStream uploads that send nothing, worker streams that never register, and TCP
//! connections that never speak. The servers run in this process with their default
//! limits; every attacker is bounded in count and stops with the run.
//!
//! `cargo run --release -p kiln-loadtests --bin slow-client-bench`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_loadtests::{load, seed};
use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, WriteRequest};
use kiln_proto::worker::v1::{workers_client::WorkersClient, WorkerMessage};
use kiln_store::{MemoryBlobStore, MemoryMetadataStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent normal callers on each server.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Attackers of each kind.
    #[arg(long, default_value_t = 64)]
    attackers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let blobs = Arc::new(MemoryBlobStore::new());
    let metadata = Arc::new(MemoryMetadataStore::new());
    let config = CoordinatorConfig {
        join_token: Some("bench".into()),
        ..Default::default()
    };
    let grpc = serve_coordinator(Coordinator::new(config, blobs.clone(), metadata.clone())).await?;
    let registry = kiln_registry::Registry::open(Default::default(), blobs, metadata)?;
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = http_listener.local_addr()?;
    tokio::spawn(registry.serve(http_listener, futures::future::pending()));
    let channel = Endpoint::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let action = seed::action_result(&channel).await?;

    let calm = measure(&channel, &action, http, &args).await?;
    let stop = CancellationToken::new();
    let attack = Attack::start(grpc, http, args.attackers, stop.clone()).await;
    let attacked = measure(&channel, &action, http, &args).await?;
    stop.cancel();
    let held = attack.finish().await;

    println!(
        "\n## Normal clients with and without {} attackers of each kind, {} callers each, {} s per measurement",
        args.attackers, args.concurrency, args.seconds
    );
    println!("| measure | calm | under attack |");
    println!("|---|---|---|");
    for (label, calm, attacked) in [
        ("GetActionResult p50, ms", calm.0.p50, attacked.0.p50),
        ("GetActionResult p99, ms", calm.0.p99, attacked.0.p99),
        ("registry GET /v2/ p50, ms", calm.1.p50, attacked.1.p50),
        ("registry GET /v2/ p99, ms", calm.1.p99, attacked.1.p99),
    ] {
        println!("| {label} | {:.2} | {:.2} |", ms(calm), ms(attacked));
    }
    println!(
        "| GetActionResult, req/s | {:.0} | {:.0} |",
        calm.0.per_second(),
        attacked.0.per_second()
    );
    println!(
        "\n| attacker (of {}) | cut off by the servers within the {} s attack |",
        args.attackers,
        args.seconds + 1
    );
    println!("|---|---|");
    for (kind, cut) in held {
        println!("| {kind} | {cut} |");
    }
    anyhow::ensure!(
        calm.0.errors + attacked.0.errors == 0,
        "GetActionResult errors"
    );
    anyhow::ensure!(calm.1.errors + attacked.1.errors == 0, "registry errors");
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn serve_coordinator(coordinator: Coordinator) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Ok(addr)
}

/// GetActionResult and registry `GET /v2/` loads, one after the other.
async fn measure(
    channel: &Channel,
    action: &kiln_proto::reapi::Digest,
    registry: SocketAddr,
    args: &Args,
) -> anyhow::Result<(load::LoadSummary, load::LoadSummary)> {
    let grpc = load::get_action_results(
        channel,
        None,
        action.clone(),
        args.concurrency,
        args.seconds,
    )
    .await;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = format!("http://{registry}/v2/").parse()?;
    let http = load::closed_loop(
        args.concurrency,
        Duration::from_secs(args.seconds),
        10_000_000,
        move || {
            let (client, uri) = (client.clone(), uri.clone());
            async move {
                let response = client.get(uri).await.map_err(|e| e.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(response.status().to_string())
                }
            }
        },
    )
    .await;
    Ok((grpc, http))
}

/// The attackers, each a task that stops when told (or when the server cuts it off),
/// by kind.
struct Attack {
    tasks: Vec<(&'static str, tokio::task::JoinHandle<bool>)>,
}

impl Attack {
    async fn start(
        grpc: SocketAddr,
        http: SocketAddr,
        each: usize,
        stop: CancellationToken,
    ) -> Self {
        let mut tasks = Vec::new();
        for _ in 0..each {
            tasks.push((
                "slowloris HTTP headers (registry)",
                tokio::spawn(slowloris(http, stop.clone())),
            ));
            tasks.push((
                "ByteStream Write sending nothing",
                tokio::spawn(silent_upload(grpc, stop.clone())),
            ));
            tasks.push((
                "worker stream without Register",
                tokio::spawn(unregistered_worker(grpc, stop.clone())),
            ));
            tasks.push((
                "TCP connection saying nothing (coordinator)",
                tokio::spawn(mute_connection(grpc, stop.clone())),
            ));
        }
        // Let them settle in before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Attack { tasks }
    }

    /// How many attackers of each kind the servers cut off before the run ended.
    async fn finish(self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut cut = std::collections::BTreeMap::new();
        for (kind, task) in self.tasks {
            *cut.entry(kind).or_insert(0) += usize::from(task.await.unwrap_or(false));
        }
        cut
    }
}

/// Sends request headers a line every 2 s, forever; true if the server closed it.
async fn slowloris(http: SocketAddr, stop: CancellationToken) -> bool {
    let Ok(mut stream) = TcpStream::connect(http).await else {
        return true;
    };
    if stream.write_all(b"GET /v2/ HTTP/1.1\r\n").await.is_err() {
        return true;
    }
    for i in 0.. {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if stream
            .write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            return true;
        }
    }
    false
}

/// Opens a ByteStream Write and sends nothing; true if the server ended it.
async fn silent_upload(grpc: SocketAddr, stop: CancellationToken) -> bool {
    let Ok(channel) = Endpoint::from_shared(format!("http://{grpc}")).map(|e| e.connect_lazy())
    else {
        return true;
    };
    let (_sender, nothing) = tokio::sync::mpsc::channel::<WriteRequest>(1);
    let mut client = ByteStreamClient::new(channel);
    tokio::select! {
        () = stop.cancelled() => false,
        result = client.write(ReceiverStream::new(nothing)) => result.is_err(),
    }
}

/// Connects as a worker and never registers; true if the server ended it.
async fn unregistered_worker(grpc: SocketAddr, stop: CancellationToken) -> bool {
    let Ok(channel) = Endpoint::from_shared(format!("http://{grpc}")).map(|e| e.connect_lazy())
    else {
        return true;
    };
    let (_sender, nothing) = tokio::sync::mpsc::channel::<WorkerMessage>(1);
    let mut client = WorkersClient::new(channel);
    tokio::select! {
        () = stop.cancelled() => false,
        result = client.connect(ReceiverStream::new(nothing)) => result.is_err(),
    }
}

/// Opens a TCP connection and says nothing at all; true if the server closed it.
async fn mute_connection(grpc: SocketAddr, stop: CancellationToken) -> bool {
    let Ok(mut stream) = TcpStream::connect(grpc).await else {
        return true;
    };
    let mut buffer = [0u8; 64];
    tokio::select! {
        () = stop.cancelled() => false,
        _ = stream.read(&mut buffer) => true,
    }
}
