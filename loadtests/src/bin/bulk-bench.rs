//! The bulk data path (issue 17): ByteStream Write and Read (SHA-256 and BLAKE3, plain
//! and zstd `compressed-blobs`), the registry's monolithic push and its pull, and
//! FindMissingBlobs of 10,000 digests, on one `kiln up`-like process (coordinator and
//! registry on one filesystem store) per data directory, next to the limits measured in
//! the same run: raw hashing, loopback TCP, and a durable write into that directory.
//!
//! Before each measured write, a scratch file twice the blob's size is written into the
//! data directory and deleted (`--cold` skips it). On this machine's VM, memory left free
//! for a few seconds goes back to the host (its balloon's free page reporting), and the
//! guest kernel's first write into such a page costs more than hashing and loopback
//! together: whether a write met such pages decided its speed more than kiln did. The
//! scratch file hands the write pages the host backs, as every page is on a machine of
//! its own; the durable-write limit meets the same pages, since each of its attempts
//! follows the previous one's deletion.
//!
//! `cargo run --release -p kiln-loadtests --bin bulk-bench -- --data-dir /dev/shm --data-dir /var/tmp`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Parser;
use kiln_loadtests::bytestream::Transfer;
use kiln_loadtests::registry_http::{http_client, RegistryTarget};
use kiln_loadtests::{bytestream, in_process, load, median, reference, seed, SameBytes};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_store::{Digest, DigestFunction};
use rand::RngCore;

#[derive(Parser)]
struct Args {
    /// Size of each blob, in MiB.
    #[arg(long, default_value_t = 256)]
    blob_mib: usize,
    /// Fresh blobs per path; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// ByteStream chunk size, in KiB (Bazel sends 16 KiB; kiln's own client 1 MiB).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: usize,
    /// Where the server keeps its data, one measured server per directory
    /// [default: /dev/shm and $TMPDIR].
    #[arg(long)]
    data_dir: Vec<PathBuf>,
    /// Seconds of iperf3 for the loopback reference.
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// The largest HTTP/2 frame the gRPC client accepts, in KiB [default: kiln's client's,
    /// 1024]; 16 is HTTP/2's default, which clients that don't raise it (gRPC-Java's
    /// Netty, so Bazel) get.
    #[arg(long)]
    client_max_frame_kib: Option<u32>,
    /// Seconds of sequential FindMissingBlobs calls.
    #[arg(long, default_value_t = 10)]
    find_missing_seconds: u64,
    /// No scratch file before each write: writes then meet memory the VM's host may have
    /// taken back.
    #[arg(long)]
    cold: bool,
}

/// What this machine does without kiln, in MB/s, measured in this run.
struct Limits {
    sha256: f64,
    blake3: f64,
    loopback: f64,
    /// CPU ms per MB of loopback TCP alone (sender and receiver).
    loopback_cpu: f64,
}

/// Every run of every path; MB/s are of the blob's own bytes, also when compressed.
#[derive(Default)]
struct Paths {
    write: [Vec<Transfer>; 2],
    read: [Vec<Transfer>; 2],
    zstd_write: Vec<f64>,
    zstd_read: Vec<f64>,
    push: Vec<Transfer>,
    pull: Vec<Transfer>,
}

/// The median rate (MB/s) and the median CPU cost (ms per MB) of a path's runs.
fn medians(runs: &[Transfer]) -> (f64, f64) {
    let mut rates: Vec<f64> = runs.iter().map(|t| t.mb_per_s).collect();
    let mut costs: Vec<f64> = runs.iter().map(|t| t.cpu_ms_per_mb).collect();
    (median(&mut rates), median(&mut costs))
}

const FUNCTIONS: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let dirs = if args.data_dir.is_empty() {
        vec![PathBuf::from("/dev/shm"), std::env::temp_dir()]
    } else {
        args.data_dir.clone()
    };
    let mut base = vec![0u8; args.blob_mib << 20];
    rand::rng().fill_bytes(&mut base);
    let base = Bytes::from(base);
    let (loopback, loopback_cpu) = reference::loopback_tcp_iperf3_costed(args.iperf_seconds)?;
    let limits = Limits {
        sha256: reference::raw_hash_speed(DigestFunction::Sha256, &base),
        blake3: reference::raw_hash_speed(DigestFunction::Blake3, &base),
        loopback,
        loopback_cpu,
    };
    println!(
        "## Limits (same run)\n\n| limit | MB/s |\n|---|---|\n\
         | raw SHA-256 (sha2, 1 thread, best of 3) | {:.0} |\n\
         | raw BLAKE3 (blake3, 1 thread, best of 3) | {:.0} |\n\
         | loopback TCP (iperf3, 1 stream, {} s) | {:.0} ({:.2} CPU ms per MB, sender and receiver) |",
        limits.sha256, limits.blake3, args.iperf_seconds, limits.loopback, limits.loopback_cpu
    );
    let mut stamp = 0u64;
    for dir in &dirs {
        let disk = reference::disk_write_fsync_speed(dir, &base)
            .with_context(|| format!("writing into {}", dir.display()))?;
        let server_dir = tempfile::tempdir_in(dir)?;
        let servers = in_process::coordinator_and_registry(server_dir.path()).await?;
        // kiln's own client settings (the worker's and `kiln run`'s), frame size aside.
        let mut endpoint = kiln_client::endpoint(&format!("grpc://{}", servers.grpc))?;
        if let Some(kib) = args.client_max_frame_kib {
            endpoint = endpoint.max_frame_size(kib << 10);
        }
        let channel = endpoint.connect().await?;
        let client = ByteStreamClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let registry = RegistryTarget {
            name: "kiln",
            base: format!("http://{}", servers.registry),
            client: http_client(1),
        };
        registry.wait_ready().await?;

        let chunk = args.chunk_kib << 10;
        let mut paths = Paths::default();
        for _ in 0..args.runs {
            for (i, function) in FUNCTIONS.into_iter().enumerate() {
                stamp += 1;
                let blob = fresh(&base, stamp);
                let digest = Digest::of_bytes(function, &blob);
                warm_up(&args, server_dir.path(), blob.len())?;
                let round_trip = bytestream::round_trip(&client, &blob, digest, chunk).await?;
                paths.write[i].push(round_trip.write);
                paths.read[i].push(round_trip.read);
            }
            stamp += 1;
            let blob = compressible(&base, stamp);
            let digest = Digest::of_bytes(DigestFunction::Sha256, &blob);
            let compressed = Bytes::from(zstd::encode_all(&blob[..], 1)?);
            warm_up(&args, server_dir.path(), blob.len())?;
            let (write, read) =
                bytestream::compressed_round_trip(&client, &compressed, digest, chunk).await?;
            paths.zstd_write.push(write);
            paths.zstd_read.push(read);

            stamp += 1;
            let blob = fresh(&base, stamp);
            let digest = Digest::of_bytes(DigestFunction::Sha256, &blob);
            warm_up(&args, server_dir.path(), blob.len())?;
            let (start, cpu) = (Instant::now(), load::process_cpu_time());
            registry
                .push_blob("bench/bulk", blob.clone(), &digest)
                .await?;
            paths.push.push(Transfer::since(start, cpu, digest.size));
            let (start, cpu) = (Instant::now(), load::process_cpu_time());
            let mut content = SameBytes::new(&blob);
            registry
                .pull_blob_with("bench/bulk", &digest, |piece| content.check(&piece))
                .await?;
            paths.pull.push(Transfer::since(start, cpu, digest.size));
            content.finish()?;
        }

        let cas = ContentAddressableStorageClient::new(channel.clone());
        let digests = seed::find_missing_digests(&cas).await?;
        let find_missing =
            load::find_missing_blobs(&channel, digests, 5_000, args.find_missing_seconds).await;
        ensure!(find_missing.errors == 0, "FindMissingBlobs failed");

        report(&args, dir, disk, &limits, paths, &find_missing);
    }
    Ok(())
}

/// A copy of `base` with `stamp` in its first bytes: a blob no store has seen.
fn fresh(base: &Bytes, stamp: u64) -> Bytes {
    let mut blob = base.to_vec();
    blob[..8].copy_from_slice(&stamp.to_le_bytes());
    Bytes::from(blob)
}

/// A blob that zstd halves, as build outputs often are: each 4 KiB random, then zeros.
fn compressible(base: &Bytes, stamp: u64) -> Bytes {
    let mut blob = fresh(base, stamp).to_vec();
    for block in blob.chunks_mut(8 << 10) {
        let half = block.len() / 2;
        block[half..].fill(0);
    }
    Bytes::from(blob)
}

/// Unless `--cold`: pages the host backs, for a write of `bytes` into `dir` (module doc).
fn warm_up(args: &Args, dir: &std::path::Path, bytes: usize) -> anyhow::Result<()> {
    if args.cold {
        return Ok(());
    }
    reference::write_and_delete_scratch(dir, 2 * bytes)
}

fn report(
    args: &Args,
    dir: &std::path::Path,
    disk: f64,
    limits: &Limits,
    mut paths: Paths,
    find_missing: &load::LoadSummary,
) {
    let (pull, pull_cpu) = medians(&paths.pull);
    let (push, push_cpu) = medians(&paths.push);
    println!(
        "\n## {} (durable write + fsync of {} MiB: {disk:.0} MB/s), medians of {}\n",
        dir.display(),
        args.blob_mib,
        args.runs
    );
    println!(
        "| path | MB/s | CPU ms per MB (client and server) | limit | of the limit | goal |\n\
         |---|---|---|---|---|---|"
    );
    let write_limit = |raw: f64, hash: &str| {
        let (limit, name) = [
            (raw, hash),
            (limits.loopback, "loopback"),
            (disk, "durable write"),
        ]
        .into_iter()
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("three limits");
        (limit, format!("{limit:.0} ({name})"))
    };
    let verdict = |ratio: f64, goal: f64| {
        let met = if ratio >= goal { "met" } else { "**missed**" };
        format!("≥ {:.0}% ({met})", goal * 100.0)
    };
    for (i, (function, raw)) in FUNCTIONS
        .into_iter()
        .zip([limits.sha256, limits.blake3])
        .enumerate()
    {
        let (write, cpu) = medians(&paths.write[i]);
        let (limit, named) = write_limit(raw, &format!("raw {function}"));
        println!(
            "| ByteStream Write, {function} | {write:.0} | {cpu:.2} | {named} | {:.0}% | {} |",
            100.0 * write / limit,
            verdict(write / limit, 0.7)
        );
    }
    let (limit, named) = write_limit(limits.sha256, "raw sha256");
    println!(
        "| registry push, monolithic, sha256 | {push:.0} | {push_cpu:.2} | {named} | {:.0}% | {} |",
        100.0 * push / limit,
        verdict(push / limit, 0.7)
    );
    for (i, function) in FUNCTIONS.into_iter().enumerate() {
        let (read, cpu) = medians(&paths.read[i]);
        println!(
            "| ByteStream Read, {function} | {read:.0} | {cpu:.2} | registry pull {pull:.0} / loopback {:.0} | {:.0}% / {:.0}% | {} / {} |",
            limits.loopback,
            100.0 * read / pull,
            100.0 * read / limits.loopback,
            verdict(read / pull, 0.8),
            verdict(read / limits.loopback, 0.7)
        );
    }
    println!(
        "| registry pull | {pull:.0} | {pull_cpu:.2} | loopback {:.0} | {:.0}% | — |",
        limits.loopback,
        100.0 * pull / limits.loopback
    );
    let zstd_write = median(&mut paths.zstd_write);
    let zstd_read = median(&mut paths.zstd_read);
    println!(
        "| ByteStream Write, zstd compressed-blobs (2:1 data) | {zstd_write:.0} | — | — | — | kept working |\n\
         | ByteStream Read, zstd compressed-blobs (2:1 data) | {zstd_read:.0} | — | — | — | kept working |"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\nFindMissingBlobs, 10,000 digests (5,000 present), sequential, {} calls: \
         p50 {:.2} ms, p99 {:.2} ms (goal p99 < 5 ms: {}); CPU per call (client and \
         server) {:.2} ms",
        find_missing.requests,
        ms(find_missing.p50),
        ms(find_missing.p99),
        if ms(find_missing.p99) < 5.0 {
            "met"
        } else {
            "**missed**"
        },
        find_missing.cpu_micros_per_request() / 1e3
    );
}
