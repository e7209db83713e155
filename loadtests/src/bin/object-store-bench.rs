//! Object storage benchmark (issue 15), all against one Garage on loopback in one run:
//! - the bucket's own ceiling: 256 MiB written (multipart, as kiln writes) and read
//!   directly with `object_store`;
//! - the same through kiln's ByteStream, cold (the coordinator on the bucket alone);
//! - through kiln with the local tier (writes through, reads from the tier), next to the
//!   coordinator on the filesystem store alone;
//! - a 64 MiB registry push and pull on the bucket, next to the bucket direct;
//! - FindMissingBlobs for 10,000 digests (half present) on the bucket: p50 and p99.
//!
//! `cargo run --release -p kiln-loadtests --bin object-store-bench` (needs Garage: `cargo
//! install garage --version 2.5.0 --locked`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::TryStreamExt;
use kiln_loadtests::{load, mb_per_s, median, seed};
use kiln_object_store::{
    connect_s3, ObjectBlobStore, ObjectStoreOptions, S3Settings, SecretString,
};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_store::{
    BlobStore, Digest, DigestFunction, FsBlobStore, MemoryMetadataStore, TieredBlobStore,
};
use kiln_testkit::{Garage, GARAGE_BUCKET};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use rand::RngCore;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The ByteStream blob, in MiB.
    #[arg(long, default_value_t = 256)]
    blob_mib: usize,
    /// The registry blob, in MiB.
    #[arg(long, default_value_t = 64)]
    registry_mib: usize,
    /// Rounds of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn settings(garage: &Garage, prefix: &str) -> S3Settings {
    let mut settings = S3Settings::new(GARAGE_BUCKET);
    settings.endpoint = Some(garage.endpoint(0));
    settings.region = garage.region().into();
    settings.prefix = prefix.into();
    settings.access_key_id = Some(garage.access_key_id().into());
    settings.secret_access_key = Some(SecretString::new(garage.secret_access_key()));
    settings
}

async fn bucket_store(garage: &Garage, prefix: &str) -> anyhow::Result<ObjectBlobStore> {
    let options = ObjectStoreOptions {
        prefix: prefix.into(),
        ..Default::default()
    };
    Ok(ObjectBlobStore::open(connect_s3(&settings(garage, prefix))?, options).await?)
}

/// The bucket direct: write as kiln does (8 MiB parts, 4 in flight), then read.
async fn direct(store: &dyn ObjectStore, key: &str, data: &Bytes) -> anyhow::Result<(f64, f64)> {
    let path = ObjectPath::from(key);
    let started = Instant::now();
    let mut upload =
        WriteMultipart::new_with_chunk_size(store.put_multipart(&path).await?, 8 << 20);
    for piece in data.chunks(1 << 20) {
        upload.wait_for_capacity(4).await?;
        upload.put(Bytes::copy_from_slice(piece));
    }
    upload.finish().await?;
    let write = mb_per_s(data.len() as u64, started.elapsed());
    let started = Instant::now();
    let read_bytes = store
        .get(&path)
        .await?
        .into_stream()
        .try_fold(0u64, |n, chunk| async move { Ok(n + chunk.len() as u64) })
        .await?;
    let read = mb_per_s(read_bytes, started.elapsed());
    anyhow::ensure!(read_bytes == data.len() as u64);
    store.delete(&path).await?;
    Ok((write, read))
}

async fn serve_cas(blobs: Arc<dyn BlobStore>) -> anyhow::Result<Channel> {
    let coordinator = kiln_coordinator::Coordinator::new(
        Default::default(),
        blobs,
        Arc::new(MemoryMetadataStore::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    // kiln's own client settings: the workers' and `kiln run`'s windows and frame size.
    Ok(kiln_client::endpoint(&format!("grpc://{addr}"))?
        .connect()
        .await?)
}

async fn serve_registry(blobs: Arc<dyn BlobStore>) -> anyhow::Result<SocketAddr> {
    let registry = kiln_registry::Registry::open(
        Default::default(),
        blobs,
        Arc::new(MemoryMetadataStore::new()),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { registry.serve(listener, futures::future::pending()).await });
    Ok(addr)
}

/// A monolithic push (POST with the digest) and a pull of `data`; (push, pull) MB/s.
async fn registry_round_trip(registry: SocketAddr, data: &Bytes) -> anyhow::Result<(f64, f64)> {
    let http = reqwest::Client::new();
    let digest = Digest::of_bytes(DigestFunction::Sha256, data);
    let started = Instant::now();
    let pushed = http
        .post(format!(
            "http://{registry}/v2/bench/blobs/uploads/?digest={}",
            digest.oci()
        ))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await?;
    anyhow::ensure!(pushed.status() == 201, "push: {}", pushed.status());
    let push = mb_per_s(data.len() as u64, started.elapsed());
    let started = Instant::now();
    let mut pulled = http
        .get(format!("http://{registry}/v2/bench/blobs/{}", digest.oci()))
        .send()
        .await?;
    anyhow::ensure!(pulled.status() == 200, "pull: {}", pulled.status());
    // Compared as it arrives, like the direct read, which keeps nothing either.
    let mut content = kiln_loadtests::SameBytes::new(data);
    while let Some(piece) = pulled.chunk().await? {
        content.check(&piece)?;
    }
    let pull = mb_per_s(data.len() as u64, started.elapsed());
    content.finish()?;
    Ok((push, pull))
}

/// CPU used by this process (kiln in process, and the client) and by Garage over a span.
struct CpuSpan {
    started: Instant,
    here: Duration,
    garage: Duration,
    garage_pid: u32,
}

impl CpuSpan {
    fn start(garage_pid: u32) -> Self {
        CpuSpan {
            started: Instant::now(),
            here: load::process_cpu_time(),
            garage: kiln_loadtests::load::process_cpu_time_of(garage_pid),
            garage_pid,
        }
    }

    /// (wall, CPU here, CPU in Garage), in seconds.
    fn stop(&self) -> (f64, f64, f64) {
        (
            self.started.elapsed().as_secs_f64(),
            (load::process_cpu_time() - self.here).as_secs_f64(),
            (kiln_loadtests::load::process_cpu_time_of(self.garage_pid) - self.garage)
                .as_secs_f64(),
        )
    }
}

fn random(mib: usize, round: usize) -> Bytes {
    let mut data = vec![0u8; mib << 20];
    rand::rng().fill_bytes(&mut data);
    data[0] = round as u8;
    data.into()
}

fn ratio(kiln: f64, reference: f64) -> String {
    format!("{:.0}%", 100.0 * kiln / reference)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let garage = Garage::start()?;
    let raw = connect_s3(&settings(&garage, ""))?;
    let cold = serve_cas(Arc::new(bucket_store(&garage, "cold").await?)).await?;
    let tier_dir = tempfile::tempdir()?;
    let tiered = TieredBlobStore::new(
        Arc::new(FsBlobStore::open(tier_dir.path().join("tier"))?),
        Arc::new(bucket_store(&garage, "tiered").await?),
    );
    let tiered = serve_cas(Arc::new(tiered)).await?;
    let files = serve_cas(Arc::new(FsBlobStore::open(tier_dir.path().join("fs"))?)).await?;
    let registry = serve_registry(Arc::new(bucket_store(&garage, "registry").await?)).await?;

    let mut figures: [Vec<f64>; 12] = Default::default();
    let garage_pid = garage.pid(0).expect("garage runs");
    // (wall, CPU here, CPU in Garage) of each round's direct and cold round trips.
    let mut cpu: [Vec<(f64, f64, f64)>; 2] = Default::default();
    for round in 0..args.rounds {
        let data = random(args.blob_mib, round);
        let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
        let span = CpuSpan::start(garage_pid);
        let (w, r) = direct(raw.as_ref(), &format!("direct/{round}"), &data).await?;
        cpu[0].push(span.stop());
        figures[0].push(w);
        figures[1].push(r);
        for (index, channel) in [&cold, &tiered, &files].into_iter().enumerate() {
            let client = ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 << 20);
            let span = CpuSpan::start(garage_pid);
            let (w, r) = kiln_loadtests::bytestream::round_trip(&client, &data, digest, 1 << 20)
                .await?
                .rates();
            if index == 0 {
                cpu[1].push(span.stop());
            }
            figures[2 + 2 * index].push(w);
            figures[3 + 2 * index].push(r);
        }
        let small = random(args.registry_mib, round);
        let (w, r) = direct(raw.as_ref(), &format!("direct-small/{round}"), &small).await?;
        figures[8].push(w);
        figures[9].push(r);
        let (w, r) = registry_round_trip(registry, &small).await?;
        figures[10].push(w);
        figures[11].push(r);
    }
    let [direct_w, direct_r, cold_w, cold_r, tier_w, tier_r, fs_w, fs_r, small_w, small_r, reg_w, reg_r] =
        figures.map(|mut values| median(&mut values));

    println!(
        "## Object storage on Garage 2.5 (1 node, loopback), median of {} rounds\n",
        args.rounds
    );
    println!("| path | write MB/s | read MB/s | write vs direct | read vs direct |");
    println!("|---|---|---|---|---|");
    println!(
        "| object_store direct, {} MiB | {direct_w:.0} | {direct_r:.0} | 100% | 100% |",
        args.blob_mib
    );
    println!(
        "| kiln ByteStream, bucket only (cold) | {cold_w:.0} | {cold_r:.0} | {} | {} |",
        ratio(cold_w, direct_w),
        ratio(cold_r, direct_r)
    );
    println!(
        "| kiln ByteStream, local tier + bucket | {tier_w:.0} | {tier_r:.0} | {} | {} (tier hit) |",
        ratio(tier_w, direct_w),
        ratio(tier_r, direct_r)
    );
    println!(
        "| kiln ByteStream, filesystem only | {fs_w:.0} | {fs_r:.0} | | tier hit / fs: {} |",
        ratio(tier_r, fs_r)
    );
    println!(
        "| object_store direct, {} MiB | {small_w:.0} | {small_r:.0} | 100% | 100% |",
        args.registry_mib
    );
    println!(
        "| kiln registry push / pull, bucket only | {reg_w:.0} | {reg_r:.0} | {} | {} |",
        ratio(reg_w, small_w),
        ratio(reg_r, small_r)
    );

    println!(
        "\n## Where the CPU went: one write and one read of {} MiB, each round\n",
        args.blob_mib
    );
    println!("| path | wall s | CPU s, kiln + client | CPU s, Garage | cores busy (of 2) | CPU s per GB moved |");
    println!("|---|---|---|---|---|---|");
    let moved_gb = 2.0 * (args.blob_mib << 20) as f64 / 1e9;
    for (name, spans) in [
        ("object_store direct", &cpu[0]),
        ("kiln ByteStream, bucket only", &cpu[1]),
    ] {
        for (wall, here, garage_cpu) in spans {
            println!(
                "| {name} | {wall:.2} | {here:.2} | {garage_cpu:.2} | {:.2} | {:.2} |",
                (here + garage_cpu) / wall,
                (here + garage_cpu) / moved_gb
            );
        }
    }

    let cas = ContentAddressableStorageClient::new(cold.clone());
    let digests = seed::find_missing_digests(&cas).await?;
    let summary = load::find_missing_blobs(&cold, digests, 5_000, 10).await;
    println!("\n## FindMissingBlobs on the bucket, 10,000 digests (half present), sequential\n");
    println!("| calls | errors | p50 | p99 | goal p99 < 10 ms |");
    println!("|---|---|---|---|---|");
    let p99 = summary.p99.as_secs_f64() * 1000.0;
    println!(
        "| {} | {} | {:.2} ms | {p99:.2} ms | {} |",
        summary.requests,
        summary.errors,
        summary.p50.as_secs_f64() * 1000.0,
        if p99 < 10.0 { "met" } else { "missed" }
    );
    Ok(())
}
