//! CAS and action-cache benchmark (issue 2): ByteStream write/read of a large blob with
//! SHA-256 and BLAKE3, FindMissingBlobs of 10,000 digests, and GetActionResult against
//! the empty GetCapabilities RPC, next to this machine's raw hash and loopback TCP speeds.
//!
//! `cargo run --release -p kiln-loadtests --bin cas-bench`

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use kiln_loadtests::{load, reference, seed};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::{
    action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient, GetActionResultRequest,
    GetCapabilitiesRequest,
};
use kiln_store::{Digest, DigestFunction};
use rand::RngCore;
use tonic::transport::Endpoint;

#[derive(Parser)]
struct Args {
    /// Size of the ByteStream blob, in MiB.
    #[arg(long, default_value_t = 256)]
    blob_mib: usize,
    /// ByteStream chunk size, in KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_kib: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent GetActionResult callers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Benchmark a running kiln at this address instead of one started in process.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// Where the in-process server keeps its data (e.g. /dev/shm to take the disk out of
    /// the measurement) [default: a temporary directory under $TMPDIR].
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut data = vec![0u8; args.blob_mib << 20];
    rand::rng().fill_bytes(&mut data);
    let data = bytes::Bytes::from(data);

    println!("## Reference figures (same run)");
    let raw_sha = reference::raw_hash_speed(DigestFunction::Sha256, &data);
    let raw_b3 = reference::raw_hash_speed(DigestFunction::Blake3, &data);
    let tcp = reference::loopback_tcp_iperf3(5)?;
    println!("| raw SHA-256 (sha2, 1 thread) | {raw_sha:.0} MB/s |");
    println!("| raw BLAKE3 (blake3, 1 thread) | {raw_b3:.0} MB/s |");
    println!("| loopback TCP (iperf3, 1 stream) | {tcp:.0} MB/s |");

    let _server_dir = match &args.data_dir {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir()?,
    };
    let addr = match args.addr {
        Some(addr) => addr,
        None => kiln_loadtests::in_process::coordinator(_server_dir.path()).await?,
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect()
        .await?;
    let bytestream = ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 << 20);

    println!(
        "\n## ByteStream, {} MiB blob, {} KiB chunks",
        args.blob_mib, args.chunk_kib
    );
    println!("| function | write MB/s | vs raw hash | vs loopback | read MB/s | vs loopback |");
    println!("|---|---|---|---|---|---|");
    for (function, raw) in [
        (DigestFunction::Sha256, raw_sha),
        (DigestFunction::Blake3, raw_b3),
    ] {
        let digest = Digest::of_bytes(function, &data);
        let (write, read) = kiln_loadtests::bytestream::round_trip(
            &bytestream,
            &data,
            digest,
            args.chunk_kib << 10,
        )
        .await?
        .rates();
        println!(
            "| {function} | {write:.0} | {:.0}% | {:.0}% | {read:.0} | {:.0}% |",
            100.0 * write / raw,
            100.0 * write / tcp,
            100.0 * read / tcp
        );
    }

    let cas = ContentAddressableStorageClient::new(channel.clone());
    let digests = seed::find_missing_digests(&cas).await?;
    let summary = load::find_missing_blobs(&channel, digests, 5_000, args.seconds.max(10)).await;
    println!("\n## FindMissingBlobs, 10,000 digests (half present), sequential");
    println!("| calls | errors | p50 | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {:.2} ms | {:.2} ms |",
        summary.requests,
        summary.errors,
        ms(summary.p50),
        ms(summary.p99)
    );

    let action = seed::action_result(&channel).await?;
    let seconds = Duration::from_secs(args.seconds);
    let ac = ActionCacheClient::new(channel.clone());
    let get = load::closed_loop(args.concurrency, seconds, 10_000_000, move || {
        let mut ac = ac.clone();
        let request = GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        };
        async move { ac.get_action_result(request).await.map(|_| ()) }
    })
    .await;
    let caps = CapabilitiesClient::new(channel.clone());
    let empty = load::closed_loop(args.concurrency, seconds, 10_000_000, move || {
        let mut caps = caps.clone();
        async move {
            caps.get_capabilities(GetCapabilitiesRequest::default())
                .await
                .map(|_| ())
        }
    })
    .await;
    println!(
        "\n## Unary RPCs, {} concurrent callers on one connection, {} s each",
        args.concurrency, args.seconds
    );
    println!("| RPC | req/s | errors | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (name, s) in [
        ("GetActionResult (hit)", &get),
        ("GetCapabilities (empty RPC)", &empty),
    ] {
        println!(
            "| {name} | {:.0} | {} | {:.2} ms | {:.2} ms |",
            s.per_second(),
            s.errors,
            ms(s.p50),
            ms(s.p99)
        );
    }
    println!(
        "\nGetActionResult / empty RPC: {:.0}%",
        100.0 * get.per_second() / empty.per_second()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
