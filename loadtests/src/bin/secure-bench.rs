//! What TLS and token auth cost (issue 13): GetActionResult req/s and ByteStream write and
//! read MB/s against a coordinator serving plaintext without auth, against the same
//! coordinator serving TLS (rustls, ring, ECDSA P-256 from a CA made here) without auth,
//! and serving TLS with every call carrying a token that is looked up in the metadata
//! store. All three run in this process over memory stores, so the disk does not hide
//! what the crypto costs; rounds alternate between them, and the medians are compared.
//!
//! `cargo run --release -p kiln-loadtests --bin secure-bench`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kiln_client::ClientTls;
use kiln_coordinator::auth::{hash_token, ConfiguredToken};
use kiln_coordinator::{AuthConfig, Coordinator, CoordinatorConfig};
use kiln_loadtests::bytestream::{read_blob_as, write_blob_as};
use kiln_loadtests::{load, mb_per_s, median, seed, Rounds};
use kiln_store::{MemoryBlobStore, MemoryMetadataStore};
use kiln_tls::test_certs::TestCa;
use rand::RngCore;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    plan: Rounds,
}

const TOKEN: &str = "kiln_benchmark0000000000000000000000000000000000000000000000000000000";

/// One coordinator, and how to call it.
struct Server {
    name: &'static str,
    channel: Channel,
    token: Option<&'static str>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("benchmark CA");
    let files = ca
        .issue("localhost", &["localhost", "127.0.0.1"])
        .server_files(dir.path());
    let servers = [
        Server::plain().await?,
        Server::secure(&files, ca.pem(), None).await?,
        Server::secure(&files, ca.pem(), Some(TOKEN)).await?,
    ];

    let mut writes: [Vec<f64>; 3] = Default::default();
    let mut reads: [Vec<f64>; 3] = Default::default();
    let mut hits: [Vec<f64>; 3] = Default::default();
    let mut p99: [Vec<f64>; 3] = Default::default();
    for round in 0..args.plan.rounds {
        for (i, server) in servers.iter().enumerate() {
            let (write, read) =
                transfer_round(server, args.plan.blob_mib << 20, args.plan.blobs).await?;
            writes[i].push(write);
            reads[i].push(read);
        }
        for (i, server) in servers.iter().enumerate() {
            let summary =
                get_action_results(server, args.plan.concurrency, args.plan.seconds).await?;
            anyhow::ensure!(
                summary.errors == 0,
                "{}: {} errors",
                server.name,
                summary.errors
            );
            hits[i].push(summary.per_second());
            p99[i].push(summary.p99.as_secs_f64() * 1000.0);
        }
        eprintln!("round {} of {} done", round + 1, args.plan.rounds);
    }

    println!(
        "\n## TLS, and TLS + token auth, against plaintext without auth, {} rounds; {} × {} MiB ByteStream writes and reads per round, {} GetActionResult callers for {} s",
        args.plan.rounds, args.plan.blobs, args.plan.blob_mib, args.plan.concurrency, args.plan.seconds
    );
    println!("| measure | plaintext, no auth | TLS | TLS + token | TLS / plaintext | TLS+token / plaintext |");
    println!("|---|---|---|---|---|---|");
    for (label, figures) in [
        ("ByteStream write, MB/s (median)", &mut writes),
        ("ByteStream read, MB/s (median)", &mut reads),
        ("GetActionResult, req/s (median)", &mut hits),
    ] {
        let [plain, tls, secure] = figures.each_mut().map(|f| median(f));
        println!(
            "| {label} | {plain:.0} | {tls:.0} | {secure:.0} | {:.0}% | {:.0}% |",
            100.0 * tls / plain,
            100.0 * secure / plain
        );
    }
    let [plain, tls, secure] = p99.each_mut().map(|f| median(f));
    println!("| GetActionResult p99, ms (median) | {plain:.2} | {tls:.2} | {secure:.2} | — | — |");
    Ok(())
}

impl Server {
    async fn plain() -> anyhow::Result<Self> {
        let addr = serve(Coordinator::new(
            CoordinatorConfig::default(),
            Arc::new(MemoryBlobStore::new()),
            Arc::new(MemoryMetadataStore::new()),
        ))
        .await?;
        let channel = kiln_client::endpoint(&format!("grpc://{addr}"))?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect()
            .await?;
        Ok(Server {
            name: "plaintext",
            channel,
            token: None,
        })
    }

    /// TLS, with token auth on when a token is given.
    async fn secure(
        files: &kiln_tls::TlsFiles,
        ca_pem: &str,
        token: Option<&'static str>,
    ) -> anyhow::Result<Self> {
        let config = CoordinatorConfig {
            auth: AuthConfig {
                enabled: token.is_some(),
                tokens: vec![ConfiguredToken {
                    name: "benchmark".into(),
                    hash: hex::encode(hash_token(TOKEN)),
                    scopes: ["cas:read", "cas:write", "ac:read", "ac:write"]
                        .map(String::from)
                        .to_vec(),
                    instance: None,
                    expires_unix: None,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let coordinator = Coordinator::new(
            config,
            Arc::new(MemoryBlobStore::new()),
            Arc::new(MemoryMetadataStore::new()),
        )
        .with_tls(files)?;
        let addr = serve(coordinator).await?;
        let tls = ClientTls {
            ca_pem: Some(ca_pem.as_bytes().to_vec()),
            server_name: Some("localhost".into()),
            ..Default::default()
        };
        let channel = kiln_client::endpoint_with_tls(&format!("grpcs://{addr}"), &tls)?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect()
            .await?;
        Ok(Server {
            name: if token.is_some() {
                "TLS + token"
            } else {
                "TLS"
            },
            channel,
            token,
        })
    }
}

async fn serve(coordinator: Coordinator) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Ok(addr)
}

/// MB/s of `count` fresh blobs written one after another, then of reading them back.
async fn transfer_round(server: &Server, size: usize, count: usize) -> anyhow::Result<(f64, f64)> {
    let blobs: Vec<bytes::Bytes> = (0..count)
        .map(|_| {
            let mut data = vec![0u8; size];
            rand::rng().fill_bytes(&mut data);
            data.into()
        })
        .collect();
    let start = Instant::now();
    let mut digests = Vec::new();
    for data in blobs {
        digests.push(write_blob_as(&server.channel, server.token, data).await?);
    }
    let write = mb_per_s((size * count) as u64, start.elapsed());
    let start = Instant::now();
    for digest in digests {
        let read = read_blob_as(&server.channel, server.token, digest).await?;
        anyhow::ensure!(
            read == size as u64,
            "{}: read {read} of {size} bytes",
            server.name
        );
    }
    Ok((write, mb_per_s((size * count) as u64, start.elapsed())))
}

async fn get_action_results(
    server: &Server,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<load::LoadSummary> {
    let action = seed::action_result_as(&server.channel, server.token).await?;
    Ok(load::get_action_results(&server.channel, server.token, action, concurrency, seconds).await)
}
