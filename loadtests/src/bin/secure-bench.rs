//! What TLS and token auth cost (issue 13): GetActionResult req/s and ByteStream write and
//! read MB/s against a coordinator serving plaintext without auth, against the same
//! coordinator serving TLS (rustls, ring, ECDSA P-256 from a CA made here) without auth,
//! and serving TLS with every call carrying a token that is looked up in the metadata
//! store. All three run in this process over memory stores, so the disk does not hide
//! what the crypto costs; rounds alternate between them, and the medians are compared.
//!
//! `cargo run --release -p kiln-loadtests --bin secure-bench [-- --split-cores]`
//!
//! With `--split-cores` the servers run in a child process pinned to CPU 0 and the
//! client stays on CPU 1, as if on two one-core machines: each end pays its own half of
//! the cipher, as a server with clients elsewhere does.

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
    /// The servers in a child process pinned to CPU 0 and this client on CPU 1: what a
    /// server serves when its clients are elsewhere (by default both ends share both cores,
    /// so every byte's encryption and decryption compete).
    #[arg(long)]
    split_cores: bool,
    /// Internal (--split-cores): serve the three coordinators with the TLS files in DIR,
    /// print their addresses, and serve until stdin closes.
    #[arg(long, hide = true, value_name = "DIR")]
    serve_only: Option<std::path::PathBuf>,
}

/// The three coordinators: plaintext without auth, TLS, TLS with token auth.
const KINDS: [(&str, bool, Option<&str>); 3] = [
    ("plaintext", false, None),
    ("TLS", true, None),
    ("TLS + token", true, Some(TOKEN)),
];

const TOKEN: &str = "kiln_benchmark0000000000000000000000000000000000000000000000000000000";

/// One coordinator, and how to call it.
struct Server {
    name: &'static str,
    channel: Channel,
    token: Option<&'static str>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.split_cores && args.serve_only.is_none() {
        pin_to_cpu(1)?;
    }
    // Built after pinning, so the runtime's threads are as many as the CPUs left.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.serve_only {
        return serve_only(&server_files(dir)).await;
    }
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("benchmark CA");
    let files = ca
        .issue("localhost", &["localhost", "127.0.0.1"])
        .server_files(dir.path());
    let (addresses, _child) = if args.split_cores {
        let (addresses, child) = spawn_pinned_servers(dir.path())?;
        (addresses, Some(child))
    } else {
        (start_servers(&files).await?, None)
    };
    let mut servers = Vec::new();
    for ((name, tls, token), addr) in KINDS.into_iter().zip(addresses) {
        servers.push(Server::connect(name, addr, tls.then(|| ca.pem()), token).await?);
    }

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
        "\n## TLS, and TLS + token auth, against plaintext without auth, {} rounds; {} × {} MiB ByteStream writes and reads per round, {} GetActionResult callers for {} s; {}",
        args.plan.rounds, args.plan.blobs, args.plan.blob_mib, args.plan.concurrency, args.plan.seconds,
        if args.split_cores { "servers on CPU 0, client on CPU 1" } else { "both ends on both cores" }
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
    /// A channel to the coordinator at `addr`: TLS trusting `ca_pem` when given.
    async fn connect(
        name: &'static str,
        addr: SocketAddr,
        ca_pem: Option<&str>,
        token: Option<&'static str>,
    ) -> anyhow::Result<Self> {
        let endpoint = match ca_pem {
            None => kiln_client::endpoint(&format!("grpc://{addr}"))?,
            Some(pem) => {
                let tls = ClientTls {
                    ca_pem: Some(pem.as_bytes().to_vec()),
                    server_name: Some("localhost".into()),
                    ..Default::default()
                };
                kiln_client::endpoint_with_tls(&format!("grpcs://{addr}"), &tls)?
            }
        };
        let channel = endpoint
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect()
            .await?;
        Ok(Server {
            name,
            channel,
            token,
        })
    }
}

/// The three coordinators of [`KINDS`], each over memory stores, serving in this process.
async fn start_servers(files: &kiln_tls::TlsFiles) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for (_, tls, token) in KINDS {
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
        let mut coordinator = Coordinator::new(
            config,
            Arc::new(MemoryBlobStore::new()),
            Arc::new(MemoryMetadataStore::new()),
        );
        if tls {
            coordinator = coordinator.with_tls(files)?;
        }
        addresses.push(serve(coordinator).await?);
    }
    Ok(addresses)
}

/// The TLS files [`kiln_tls::test_certs::Issued::server_files`] wrote in `dir`.
fn server_files(dir: &std::path::Path) -> kiln_tls::TlsFiles {
    kiln_tls::TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: None,
    }
}

/// `--serve-only`: the servers, their addresses on stdout, until stdin closes.
async fn serve_only(files: &kiln_tls::TlsFiles) -> anyhow::Result<()> {
    let addresses = start_servers(files).await?;
    let line: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    println!("{}", line.join(" "));
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await??;
    Ok(())
}

/// This benchmark again as `--serve-only` on CPU 0; returns the servers' addresses and
/// the child, which ends when its stdin (held by the child handle) closes.
fn spawn_pinned_servers(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<SocketAddr>, std::process::Child)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(std::env::current_exe()?)
        .arg("--serve-only")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addresses = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    anyhow::ensure!(addresses.len() == 3, "the server process printed {line:?}");
    Ok((addresses, child))
}

/// Pins this process (its threads to come) to one CPU.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
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
