//! Object storage benchmark (issue 15), all against one Garage on loopback in one run:
//! - the bucket's own ceiling: 256 MiB written (multipart, as kiln writes) and read
//!   directly with `object_store`;
//! - the same through kiln's ByteStream, cold (the coordinator on the bucket alone);
//! - through kiln with the local tier (writes through, reads from the tier), next to the
//!   coordinator on the filesystem store alone;
//! - a 64 MiB registry push and pull on the bucket, next to the bucket direct;
//! - FindMissingBlobs for 10,000 digests (half present) on the bucket: p50 and p99.
//!
//! The bucket's and kiln's figures are measured twice: with Garage, kiln and the client
//! sharing every core, and with Garage on core 0 and kiln with the client on core 1 (as if
//! Garage had a machine of its own, as it does wherever kiln runs on object storage). On
//! two cores, a read through kiln otherwise takes its extra hop's CPU from Garage.
//!
//! `cargo run --release -p kiln-loadtests --bin object-store-bench` (needs Garage: `cargo
//! install garage --version 2.5.0 --locked`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::TryStreamExt;
use kiln_loadtests::{bytestream, in_process, load, mb_per_s, median, seed};
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

/// The bucket direct: write as kiln does (8 MiB parts, 4 in flight); MB/s.
async fn direct_write(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: &Bytes,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut upload = WriteMultipart::new_with_chunk_size(store.put_multipart(path).await?, 8 << 20);
    for piece in data.chunks(1 << 20) {
        upload.wait_for_capacity(4).await?;
        upload.put(Bytes::copy_from_slice(piece));
    }
    upload.finish().await?;
    Ok(mb_per_s(data.len() as u64, started.elapsed()))
}

/// The bucket direct: a read, compared as it arrives as kiln's reads are; MB/s.
async fn direct_read(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: &Bytes,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut content = kiln_loadtests::SameBytes::new(data);
    let mut body = store.get(path).await?.into_stream();
    while let Some(piece) = body.try_next().await? {
        content.check(&piece)?;
    }
    let read = mb_per_s(data.len() as u64, started.elapsed());
    content.finish()?;
    Ok(read)
}

/// A coordinator on `blobs`, reached with kiln's own client settings (the workers' and
/// `kiln run`'s windows and frame size).
async fn serve_cas(blobs: Arc<dyn BlobStore>) -> anyhow::Result<Channel> {
    let metadata = Arc::new(MemoryMetadataStore::new());
    let addr = in_process::serve_coordinator(Default::default(), blobs, metadata).await?;
    Ok(kiln_client::endpoint(&format!("grpc://{addr}"))?
        .connect()
        .await?)
}

async fn serve_registry(blobs: Arc<dyn BlobStore>) -> anyhow::Result<SocketAddr> {
    let metadata = Arc::new(MemoryMetadataStore::new());
    in_process::serve_registry(Default::default(), blobs, metadata).await
}

/// A monolithic push (POST with the digest) of `data`; MB/s.
async fn registry_push(registry: SocketAddr, data: &Bytes) -> anyhow::Result<f64> {
    let digest = Digest::of_bytes(DigestFunction::Sha256, data);
    let started = Instant::now();
    let pushed = reqwest::Client::new()
        .post(format!(
            "http://{registry}/v2/bench/blobs/uploads/?digest={}",
            digest.oci()
        ))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await?;
    anyhow::ensure!(pushed.status() == 201, "push: {}", pushed.status());
    Ok(mb_per_s(data.len() as u64, started.elapsed()))
}

/// A pull of the blob `data`, compared as it arrives, like the direct read; MB/s.
async fn registry_pull(registry: SocketAddr, data: &Bytes) -> anyhow::Result<f64> {
    let digest = Digest::of_bytes(DigestFunction::Sha256, data);
    let started = Instant::now();
    let mut pulled = reqwest::Client::new()
        .get(format!("http://{registry}/v2/bench/blobs/{}", digest.oci()))
        .send()
        .await?;
    anyhow::ensure!(pulled.status() == 200, "pull: {}", pulled.status());
    let mut content = kiln_loadtests::SameBytes::new(data);
    while let Some(piece) = pulled.chunk().await? {
        content.check(&piece)?;
    }
    let pull = mb_per_s(data.len() as u64, started.elapsed());
    content.finish()?;
    Ok(pull)
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
            garage: load::process_cpu_time_of(garage_pid),
            garage_pid,
        }
    }

    fn stop(&self) -> CpuUse {
        CpuUse {
            wall: self.started.elapsed().as_secs_f64(),
            here: (load::process_cpu_time() - self.here).as_secs_f64(),
            garage: (load::process_cpu_time_of(self.garage_pid) - self.garage).as_secs_f64(),
        }
    }
}

/// Seconds of wall time, and of CPU here and in Garage, of one transfer.
#[derive(Clone, Copy)]
struct CpuUse {
    wall: f64,
    here: f64,
    garage: f64,
}

/// Which cores the processes may run on.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Placement {
    /// Garage, kiln and the client on every core.
    Shared,
    /// Garage on core 0; kiln and the client on core 1.
    Apart,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Shared => "cores shared",
            Placement::Apart => "Garage on a core of its own",
        }
    }

    /// Moves every thread of Garage and of this process onto this placement's cores, of
    /// the machine's `cores` (counted before any placement: a process's own count shrinks
    /// with its affinity).
    fn apply(self, garage_pid: u32, cores: usize) -> anyhow::Result<()> {
        let every_core = format!("0-{}", cores - 1);
        let (garage_cores, own_cores) = match self {
            Placement::Shared => (every_core.as_str(), every_core.as_str()),
            Placement::Apart => ("0", "1"),
        };
        for (cores, pid) in [(garage_cores, garage_pid), (own_cores, std::process::id())] {
            let status = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", cores, &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()?;
            anyhow::ensure!(status.success(), "taskset -c {cores} on {pid}: {status}");
        }
        Ok(())
    }
}

/// Every measurement's samples, by placement and name.
#[derive(Default)]
struct Samples {
    rates: BTreeMap<(Placement, String), Vec<f64>>,
    cpu: BTreeMap<(Placement, &'static str), Vec<CpuUse>>,
}

impl Samples {
    fn rate(&mut self, placement: Placement, name: &str, mb_per_s: f64) {
        let samples = self.rates.entry((placement, name.to_string()));
        samples.or_default().push(mb_per_s);
    }

    fn median(&self, placement: Placement, name: &str) -> f64 {
        median(&mut self.rates[&(placement, name.to_string())].clone())
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

struct Servers {
    raw: Arc<dyn ObjectStore>,
    cold: Channel,
    tiered: Channel,
    files: Channel,
    registry: SocketAddr,
    garage_pid: u32,
}

/// The ByteStream servers a round goes through, by name.
fn byte_stream_paths(servers: &Servers, placement: Placement) -> Vec<(&'static str, &Channel)> {
    let mut paths = vec![("cold", &servers.cold)];
    // The tier and the filesystem store read nothing from Garage.
    if placement == Placement::Shared {
        paths.extend([("tier", &servers.tiered), ("fs", &servers.files)]);
    }
    paths
}

/// One round of every measurement. Every write of the round comes before its reads, and
/// the reads take turns going first: a read just after kiln's write would otherwise meet
/// Garage still busy with it (kiln's copy out of staging, the staging object's deletion),
/// which a direct read just after a direct write never does.
async fn round(
    servers: &Servers,
    args: &Args,
    placement: Placement,
    round: usize,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let raw = servers.raw.as_ref();
    let data = random(args.blob_mib, round);
    let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
    let path = ObjectPath::from(format!("direct/{round}"));
    let clients: Vec<_> = byte_stream_paths(servers, placement)
        .into_iter()
        .map(|(name, channel)| {
            let client = ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 << 20);
            (name, client)
        })
        .collect();
    samples.rate(
        placement,
        "direct write",
        direct_write(raw, &path, &data).await?,
    );
    for (name, client) in &clients {
        let write = bytestream::write_timed(client, &data, digest, 1 << 20).await?;
        samples.rate(placement, &format!("{name} write"), write.mb_per_s);
    }
    for direct in direct_first_on_even(round) {
        let span = CpuSpan::start(servers.garage_pid);
        let (name, read) = if direct {
            ("direct", direct_read(raw, &path, &data).await?)
        } else {
            let read = bytestream::read_checked(&clients[0].1, &data, digest).await?;
            ("cold", read.mb_per_s)
        };
        samples
            .cpu
            .entry((placement, name))
            .or_default()
            .push(span.stop());
        samples.rate(placement, &format!("{name} read"), read);
    }
    for (name, client) in &clients[1..] {
        let read = bytestream::read_checked(client, &data, digest).await?;
        samples.rate(placement, &format!("{name} read"), read.mb_per_s);
    }
    raw.delete(&path).await?;

    let small = random(args.registry_mib, round);
    let path = ObjectPath::from(format!("direct-small/{round}"));
    samples.rate(
        placement,
        "direct small write",
        direct_write(raw, &path, &small).await?,
    );
    samples.rate(
        placement,
        "registry push",
        registry_push(servers.registry, &small).await?,
    );
    for direct in direct_first_on_even(round) {
        let (name, read) = if direct {
            ("direct small read", direct_read(raw, &path, &small).await?)
        } else {
            (
                "registry pull",
                registry_pull(servers.registry, &small).await?,
            )
        };
        samples.rate(placement, name, read);
    }
    raw.delete(&path).await?;
    Ok(())
}

/// Whether each of a round's two reads is the direct one: the direct read goes first in
/// even rounds, kiln's in odd ones.
fn direct_first_on_even(round: usize) -> [bool; 2] {
    let direct_first = round.is_multiple_of(2);
    [direct_first, !direct_first]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let garage = Garage::start()?;
    let tier_dir = tempfile::tempdir()?;
    let tiered = TieredBlobStore::new(
        Arc::new(FsBlobStore::open(tier_dir.path().join("tier"))?),
        Arc::new(bucket_store(&garage, "tiered").await?),
    );
    let servers = Servers {
        raw: connect_s3(&settings(&garage, ""))?,
        cold: serve_cas(Arc::new(bucket_store(&garage, "cold").await?)).await?,
        tiered: serve_cas(Arc::new(tiered)).await?,
        files: serve_cas(Arc::new(FsBlobStore::open(tier_dir.path().join("fs"))?)).await?,
        registry: serve_registry(Arc::new(bucket_store(&garage, "registry").await?)).await?,
        garage_pid: garage.pid(0).expect("garage runs"),
    };

    let mut samples = Samples::default();
    let cores = std::thread::available_parallelism()?.get();
    let placements = if cores >= 2 {
        vec![Placement::Shared, Placement::Apart]
    } else {
        vec![Placement::Shared]
    };
    // Rounds alternate between the placements, so that the machine's swings fall on both.
    for index in 0..args.rounds {
        for &placement in &placements {
            placement.apply(servers.garage_pid, cores)?;
            round(&servers, &args, placement, index, &mut samples).await?;
        }
    }
    Placement::Shared.apply(servers.garage_pid, cores)?;
    print_rates(&args, &placements, &samples);
    print_cpu(&args, &placements, &samples);

    let cas = ContentAddressableStorageClient::new(servers.cold.clone());
    let digests = seed::find_missing_digests(&cas).await?;
    let summary = load::find_missing_blobs(&servers.cold, digests, 5_000, 10).await;
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

fn print_rates(args: &Args, placements: &[Placement], samples: &Samples) {
    println!(
        "## Object storage on Garage 2.5 (1 node, loopback), median of {} rounds\n",
        args.rounds
    );
    println!("| cores | path | write MB/s | read MB/s | write vs direct | read vs direct |");
    println!("|---|---|---|---|---|---|");
    for &placement in placements {
        let m = |name| samples.median(placement, name);
        let cores = placement.name();
        let (direct_w, direct_r) = (m("direct write"), m("direct read"));
        println!(
            "| {cores} | object_store direct, {} MiB | {direct_w:.0} | {direct_r:.0} | 100% | 100% |",
            args.blob_mib
        );
        let (cold_w, cold_r) = (m("cold write"), m("cold read"));
        println!(
            "| {cores} | kiln ByteStream, bucket only (cold) | {cold_w:.0} | {cold_r:.0} | {} | {} |",
            ratio(cold_w, direct_w),
            ratio(cold_r, direct_r)
        );
        if placement == Placement::Shared {
            let (tier_w, tier_r) = (m("tier write"), m("tier read"));
            println!(
                "| {cores} | kiln ByteStream, local tier + bucket | {tier_w:.0} | {tier_r:.0} | {} | {} (tier hit) |",
                ratio(tier_w, direct_w),
                ratio(tier_r, direct_r)
            );
            let (fs_w, fs_r) = (m("fs write"), m("fs read"));
            println!(
                "| {cores} | kiln ByteStream, filesystem only | {fs_w:.0} | {fs_r:.0} | | tier hit / fs: {} |",
                ratio(tier_r, fs_r)
            );
        }
        let (small_w, small_r) = (m("direct small write"), m("direct small read"));
        println!(
            "| {cores} | object_store direct, {} MiB | {small_w:.0} | {small_r:.0} | 100% | 100% |",
            args.registry_mib
        );
        let (push, pull) = (m("registry push"), m("registry pull"));
        println!(
            "| {cores} | kiln registry push / pull, bucket only | {push:.0} | {pull:.0} | {} | {} |",
            ratio(push, small_w),
            ratio(pull, small_r)
        );
    }
}

/// Where the CPU of the 256 MiB reads went: medians over the rounds.
fn print_cpu(args: &Args, placements: &[Placement], samples: &Samples) {
    println!(
        "\n## Where the CPU went: reads of {} MiB, medians of the rounds\n",
        args.blob_mib
    );
    println!("| cores | read | wall s | CPU s, kiln + client | CPU s, Garage | Garage busy (cores) | all busy (cores) |");
    println!("|---|---|---|---|---|---|---|");
    for &placement in placements {
        for (name, label) in [
            ("direct", "object_store direct"),
            ("cold", "kiln ByteStream, cold"),
        ] {
            let spans = &samples.cpu[&(placement, name)];
            let of =
                |part: fn(&CpuUse) -> f64| median(&mut spans.iter().map(part).collect::<Vec<_>>());
            let (wall, here, garage) = (of(|u| u.wall), of(|u| u.here), of(|u| u.garage));
            println!(
                "| {} | {label} | {wall:.2} | {here:.2} | {garage:.2} | {:.2} | {:.2} |",
                placement.name(),
                garage / wall,
                (here + garage) / wall
            );
        }
    }
}
