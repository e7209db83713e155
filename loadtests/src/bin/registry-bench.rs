//! Registry benchmark (issue 4): kiln's registry and CNCF distribution 2.8 (Debian's
//! `docker-registry`) side by side in one run on loopback — monolithic push and pull of
//! 64 MiB blobs, manifest GETs per second, and listing a repository with 10,000 tags —
//! next to this machine's raw SHA-256 speed and loopback TCP throughput.
//!
//! `cargo run --release -p kiln-loadtests --bin registry-bench`
//!
//! kiln runs in this process (default `RegistryConfig`, filesystem blobs, sled metadata);
//! distribution runs as a child process with a config written here, killed at the end.
//! Both are driven by the same pooled hyper HTTP/1.1 client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Parser;
use kiln_loadtests::load::{closed_loop, LoadSummary};
use kiln_loadtests::registry_http::{get, http_client, RegistryTarget, OCI_MANIFEST};
use kiln_loadtests::span_export::BenchTracing;
use kiln_loadtests::{in_process, mb_per_s, reference};
use kiln_store::{Digest, DigestFunction};
use rand::RngCore;

#[derive(Parser)]
struct Args {
    /// Size of each pushed and pulled blob, in MiB.
    #[arg(long, default_value_t = 64)]
    blob_mib: usize,
    /// Pushes and pulls per registry; the median is reported, and the best next to it.
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Concurrent manifest GETs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of manifest GETs per registry.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Tags in the listed repository (`v1.0.0` and git-SHA-like ones), all listed in one
    /// page (kiln's default `limits.max_page_size` is 10,000).
    #[arg(long, default_value_t = 10_000)]
    tags: usize,
    /// Sequential tag-list requests per registry.
    #[arg(long, default_value_t = 200)]
    listings: u64,
    /// Seconds of iperf3 for the loopback reference.
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// CNCF distribution's binary (Debian package `docker-registry`).
    #[arg(long, default_value = "docker-registry")]
    distribution: String,
    /// Export every span over OTLP/gRPC to a receiver in this process.
    #[arg(long)]
    otlp: bool,
}

/// What one registry measured.
struct Results {
    push: Throughput,
    pull: Throughput,
    manifest_get: LoadSummary,
    /// The part of `manifest_get.process_cpu` spent by the `--otlp` span receiver, which
    /// stands in for a collector elsewhere.
    manifest_get_receiver_cpu: Duration,
    tag_list: LoadSummary,
    seed_secs: f64,
}

/// MB/s over the repetitions.
struct Throughput {
    median: f64,
    best: f64,
}

impl Throughput {
    fn of(mut runs: Vec<f64>) -> Self {
        runs.sort_by(f64::total_cmp);
        Throughput {
            median: runs[runs.len() / 2],
            best: runs[runs.len() - 1],
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = BenchTracing::install(args.otlp).await?;
    ensure!(args.repetitions > 0, "--repetitions must be at least 1");
    ensure!(args.tags > 0, "--tags must be at least 1");
    // One distinct blob per repetition, so neither registry can skip work for content it
    // already holds; the digests are computed before any clock starts.
    let blobs: Vec<(Bytes, Digest)> = (0..args.repetitions)
        .map(|_| {
            let mut data = vec![0u8; args.blob_mib << 20];
            rand::rng().fill_bytes(&mut data);
            let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
            (Bytes::from(data), digest)
        })
        .collect();

    let raw_sha = reference::raw_hash_speed(DigestFunction::Sha256, &blobs[0].0);
    let tcp = reference::loopback_tcp_iperf3(args.iperf_seconds)?;

    let kiln_dir = tempfile::tempdir()?;
    let disk = reference::disk_write_fsync_speed(kiln_dir.path(), &blobs[0].0)?;
    let kiln_addr = in_process::registry(kiln_dir.path()).await?;
    let distribution_dir = tempfile::tempdir()?;
    let _distribution = Distribution::start(&args.distribution, distribution_dir.path())?;
    let client = http_client(args.concurrency);
    let targets = [
        RegistryTarget {
            name: "kiln",
            base: format!("http://{kiln_addr}"),
            client: client.clone(),
        },
        RegistryTarget {
            name: "distribution 2.8",
            base: format!("http://{}", _distribution.addr),
            client,
        },
    ];
    for target in &targets {
        target
            .wait_ready()
            .await
            .with_context(|| format!("{} did not come up", target.name))?;
    }

    let mut results = Vec::new();
    for target in &targets {
        eprintln!("benchmarking {}", target.name);
        results.push(
            run(target, &args, &blobs, &tracing)
                .await
                .with_context(|| format!("benchmarking {}", target.name))?,
        );
    }
    let references = References { raw_sha, tcp, disk };
    print_report(&args, &references, &results[0], &results[1]);
    println!("\ntracing: {}", tracing.finish().await?);
    // With export on, every one of these is a span: fewer received means spans dropped.
    println!(
        "kiln requests: at least {} (the manifest GETs and their warm-up)",
        results[0].manifest_get.requests + args.concurrency as u64
    );
    Ok(())
}

async fn run(
    target: &RegistryTarget,
    args: &Args,
    blobs: &[(Bytes, Digest)],
    tracing: &BenchTracing,
) -> anyhow::Result<Results> {
    let repository = "bench/blobs";
    let mut pushes = Vec::new();
    for (data, digest) in blobs {
        let start = Instant::now();
        target.push_blob(repository, data.clone(), digest).await?;
        pushes.push(mb_per_s(data.len() as u64, start.elapsed()));
    }
    let mut pulls = Vec::new();
    for (_, digest) in blobs {
        let start = Instant::now();
        let pieces = target.pull_blob(repository, digest).await?;
        pulls.push(mb_per_s(digest.size, start.elapsed()));
        // Checked after the clock stops: the benchmark measures the server, not our hashing.
        let mut hasher = DigestFunction::Sha256.hasher();
        for piece in &pieces {
            hasher.update(piece);
        }
        ensure!(hasher.finalize() == digest.hash, "pulled different bytes");
    }

    let manifest_repository = "bench/manifests";
    let manifest = target.push_image(manifest_repository, "v1.0.0").await?;
    let uri: hyper::Uri =
        format!("{}/v2/{manifest_repository}/manifests/v1.0.0", target.base).parse()?;
    let receiver_cpu_before = tracing.receiver_cpu().await;
    let manifest_get = closed_loop(
        args.concurrency,
        Duration::from_secs(args.seconds),
        u64::MAX,
        {
            let client = target.client.clone();
            move || {
                let (client, uri, expected) = (client.clone(), uri.clone(), manifest.len());
                async move {
                    let body = get(&client, uri, OCI_MANIFEST).await?;
                    ensure!(body.len() == expected, "manifest of {} bytes", body.len());
                    Ok::<_, anyhow::Error>(())
                }
            }
        },
    )
    .await;
    let manifest_get_receiver_cpu = tracing.receiver_cpu().await - receiver_cpu_before;

    let tags_repository = "bench/tags";
    let seed_start = Instant::now();
    let manifest = target.push_image(tags_repository, "v1.0.0").await?;
    target
        .put_tags(tags_repository, manifest, args.tags - 1, args.concurrency)
        .await?;
    let seed_secs = seed_start.elapsed().as_secs_f64();
    let uri: hyper::Uri = format!(
        "{}/v2/{tags_repository}/tags/list?n={}",
        target.base, args.tags
    )
    .parse()?;
    let listing = get(&target.client, uri.clone(), "application/json").await?;
    let listed: serde_json::Value = serde_json::from_slice(&listing)?;
    let count = listed["tags"].as_array().map_or(0, Vec::len);
    ensure!(
        count == args.tags,
        "{} lists {count} tags, expected {}",
        target.name,
        args.tags
    );
    let tag_list = closed_loop(1, Duration::from_secs(60), args.listings, {
        let client = target.client.clone();
        move || {
            let (client, uri, expected) = (client.clone(), uri.clone(), listing.len());
            async move {
                let body = get(&client, uri, "application/json").await?;
                ensure!(body.len() == expected, "tag list of {} bytes", body.len());
                Ok::<_, anyhow::Error>(())
            }
        }
    })
    .await;

    for summary in [&manifest_get, &tag_list] {
        ensure!(
            summary.errors == 0,
            "{}: {} of {} requests failed",
            target.name,
            summary.errors,
            summary.requests
        );
    }
    Ok(Results {
        push: Throughput::of(pushes),
        pull: Throughput::of(pulls),
        manifest_get,
        manifest_get_receiver_cpu,
        tag_list,
        seed_secs,
    })
}

/// Reference figures from this run, in MB/s.
#[derive(Clone, Copy)]
struct References {
    raw_sha: f64,
    tcp: f64,
    disk: f64,
}

/// CNCF distribution as a child process, killed when dropped.
struct Distribution {
    child: Child,
    addr: SocketAddr,
}

impl Distribution {
    /// Its own config, not Debian's (which listens on all interfaces with auth on): the
    /// filesystem driver under `dir`, deletes on, the in-memory blob-descriptor cache
    /// (distribution's usual production setting), no access log (kiln logs no requests
    /// at its default level either).
    fn start(binary: &str, dir: &Path) -> anyhow::Result<Self> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 cache:\n    blobdescriptor: inmemory\n\
                 http:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("distribution.log"))?;
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| {
                format!(
                    "running {binary} (apt-get install --no-install-recommends docker-registry)"
                )
            })?;
        Ok(Distribution { child, addr })
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

fn print_report(args: &Args, references: &References, kiln: &Results, dist: &Results) {
    let References { raw_sha, tcp, disk } = *references;
    println!("### Reference figures (same run)\n");
    println!("| reference | MB/s |\n|---|---|");
    println!("| raw SHA-256 (sha2 in memory, 1 thread, best of 3) | {raw_sha:.0} |");
    println!(
        "| loopback TCP (iperf3, 1 stream, {} s) | {tcp:.0} |",
        args.iperf_seconds
    );
    println!(
        "| disk: write {} MiB + fsync in the registry's directory, best of 3 | {disk:.0} |",
        args.blob_mib
    );

    println!(
        "\n### Blobs: monolithic push (POST + PUT) and pull of {} MiB, {} distinct blobs each\n",
        args.blob_mib, args.repetitions
    );
    println!("| registry | push median MB/s | push best | pull median MB/s | pull best |");
    println!("|---|---|---|---|---|");
    for (name, r) in [("kiln", kiln), ("distribution 2.8", dist)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.push.median, r.push.best, r.pull.median, r.pull.best
        );
    }

    println!(
        "\n### Manifest GET by tag: {} concurrent requests on pooled HTTP/1.1 connections, {} s\n",
        args.concurrency, args.seconds
    );
    println!(
        "| registry | req/s | p50 | p99 | this process's CPU per request | of which the span receiver |\n|---|---|---|---|---|---|"
    );
    for (name, r, whose) in [
        ("kiln", kiln, "server and load generator"),
        ("distribution 2.8", dist, "load generator only"),
    ] {
        let s = &r.manifest_get;
        let receiver = r.manifest_get_receiver_cpu.as_secs_f64() * 1e6 / s.requests.max(1) as f64;
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:.1} µs ({whose}) | {receiver:.1} µs |",
            s.per_second(),
            ms(s.p50),
            ms(s.p99),
            s.cpu_micros_per_request(),
        );
    }

    println!(
        "\n### Tag listing: `GET /v2/<name>/tags/list?n={}` of {} tags, {} sequential requests\n",
        args.tags, args.tags, args.listings
    );
    println!("| registry | p50 | p99 | seeding the tags |\n|---|---|---|---|");
    for (name, r) in [("kiln", kiln), ("distribution 2.8", dist)] {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.1} s |",
            ms(r.tag_list.p50),
            ms(r.tag_list.p99),
            r.seed_secs
        );
    }

    let push_vs_dist = kiln.push.median / dist.push.median;
    let push_vs_sha = kiln.push.median / raw_sha;
    let pull_vs_tcp = kiln.pull.median / tcp;
    let get_vs_dist = kiln.manifest_get.per_second() / dist.manifest_get.per_second();
    let listing = ms(kiln.tag_list.p50);
    println!("\n### Goals (kiln's medians)\n");
    println!("| measure | goal | kiln | ratio | verdict |\n|---|---|---|---|---|");
    println!(
        "| push | ≥ 2× distribution | {:.0} MB/s vs {:.0} | {push_vs_dist:.2}× | {} |",
        kiln.push.median,
        dist.push.median,
        verdict(push_vs_dist >= 2.0)
    );
    println!(
        "| push | ≥ 70% of raw SHA-256 | {:.0} MB/s vs {raw_sha:.0} | {:.0}% | {} |",
        kiln.push.median,
        100.0 * push_vs_sha,
        verdict(push_vs_sha >= 0.7)
    );
    println!(
        "| push | (context) disk write + fsync | {:.0} MB/s vs {disk:.0} | {:.0}% | — |",
        kiln.push.median,
        100.0 * kiln.push.median / disk
    );
    println!(
        "| pull | ≥ 80% of loopback TCP | {:.0} MB/s vs {tcp:.0} | {:.0}% (distribution: {:.0}%) | {} |",
        kiln.pull.median,
        100.0 * pull_vs_tcp,
        100.0 * dist.pull.median / tcp,
        verdict(pull_vs_tcp >= 0.8)
    );
    println!(
        "| manifest GET | ≥ 5× distribution | {:.0} req/s vs {:.0} | {get_vs_dist:.2}× | {} |",
        kiln.manifest_get.per_second(),
        dist.manifest_get.per_second(),
        verdict(get_vs_dist >= 5.0)
    );
    println!(
        "| 10k-tag listing | < 10 ms (p50) | {listing:.2} ms (p99 {:.2} ms; distribution p50 {:.2} ms) | {:.2}× distribution's time | {} |",
        ms(kiln.tag_list.p99),
        ms(dist.tag_list.p50),
        listing / ms(dist.tag_list.p50),
        verdict(listing < 10.0)
    );
}
