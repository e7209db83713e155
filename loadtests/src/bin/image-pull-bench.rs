//! The first action in an image not yet cached (issue 14): the time kiln's worker takes to
//! pull and unpack it, against `skopeo copy` + `umoci unpack` of the same image from the
//! same registry, in one run, rounds alternating; and the time a later action in the same
//! image pays (a cached root by digest: no registry call at all).
//!
//! `cargo run --release -p kiln-loadtests --bin image-pull-bench` (needs skopeo and umoci)
//!
//! The image is one gzip layer of generated files (text-like and random, 1 KiB–256 KiB,
//! like a toolchain's mix of scripts, headers and binaries), published to kiln's registry
//! in this process (memory stores, so the server's disk is out of the comparison) with
//! the client `kiln publish` uses. Both sides unpack to this machine's temp directory.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::ensure;
use clap::Parser;
use kiln_loadtests::median;
use kiln_publish::{publish, PublishRequest};
use kiln_registry::{Registry, RegistryConfig};
use kiln_store::{MemoryBlobStore, MemoryMetadataStore};
use kiln_worker::{ImageSettings, ImageStore};
use rand::{Rng, RngCore, SeedableRng};

#[derive(Parser)]
struct Args {
    /// Files in the image.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Rounds, each pulling with both.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for tool in ["skopeo", "umoci"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is required (apt-get install -y skopeo umoci)"
        );
    }
    let registry = Registry::open(
        RegistryConfig::default(),
        Arc::new(MemoryBlobStore::new()),
        Arc::new(MemoryMetadataStore::new()),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let host = listener.local_addr()?.to_string();
    tokio::spawn(registry.serve(listener, futures::future::pending()));

    let content = tempfile::tempdir()?;
    let bytes = generate_tree(content.path(), args.files)?;
    let published = publish(PublishRequest::directory(
        &host,
        "bench/toolchain",
        content.path(),
        &["v1.0.0"],
    ))
    .await?;
    let reference = format!("{host}/bench/toolchain@{}", published.manifest_digest);
    eprintln!(
        "image: {reference}, {} files, {:.1} MiB unpacked",
        args.files,
        bytes as f64 / (1 << 20) as f64
    );

    let (mut kiln, mut tools, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let (first, again) = kiln_pull(&reference).await?;
        kiln.push(first);
        cached.push(again);
        tools.push(skopeo_umoci_pull(&reference)?);
        eprintln!(
            "round {} of {}: kiln {first:.3} s (cached {again:.6} s), skopeo + umoci {:.3} s",
            round + 1,
            args.rounds,
            tools[round]
        );
    }
    let (kiln, tools, cached) = (median(&mut kiln), median(&mut tools), median(&mut cached));
    println!(
        "\n## First action in an uncached image: pull and unpack, {} files ({:.1} MiB), {} rounds",
        args.files,
        bytes as f64 / (1 << 20) as f64,
        args.rounds
    );
    println!("| measure | kiln worker | skopeo copy + umoci unpack | kiln / tools |");
    println!("|---|---|---|---|");
    println!(
        "| pull + unpack, s (median) | {kiln:.3} | {tools:.3} | {:.0}% of the time |",
        100.0 * kiln / tools
    );
    println!("| a later action in the same image, s (median) | {cached:.6} | — | — |");
    Ok(())
}

/// Files of 1–256 KiB under a few directories, half text-like (compressible, as sources
/// and headers are) and half random (as binaries nearly are); returns their total size.
fn generate_tree(root: &Path, files: usize) -> anyhow::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut total = 0;
    for i in 0..files {
        let dir = root.join(format!("usr/lib/pkg{}", i % 40));
        std::fs::create_dir_all(&dir)?;
        let size = rng.random_range(1024..256 * 1024);
        let mut data = vec![0u8; size];
        if i % 2 == 0 {
            for (n, chunk) in data.chunks_mut(64).enumerate() {
                let line = format!("int kiln_symbol_{i}_{n}(void); /* generated header line */\n");
                let len = chunk.len().min(line.len());
                chunk[..len].copy_from_slice(&line.as_bytes()[..len]);
            }
        } else {
            rng.fill_bytes(&mut data);
        }
        std::fs::write(dir.join(format!("file{i}")), &data)?;
        total += size as u64;
    }
    Ok(total)
}

/// A fresh worker image cache pulling the image by digest (what the first action in it
/// pays), then a second action's lookup of the same root.
async fn kiln_pull(reference: &str) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(
        dir.path().join("images"),
        ImageSettings {
            max_bytes: 8 << 30,
            ..Default::default()
        },
    )?;
    let image = format!("docker://{reference}");
    let start = Instant::now();
    let root = store.root_for(&image).await?;
    let first = start.elapsed().as_secs_f64();
    ensure!(
        root.rootfs.join("usr/lib/pkg0/file0").exists(),
        "kiln's root is incomplete"
    );
    drop(root);
    let start = Instant::now();
    let again = store.root_for(&image).await?;
    let cached = start.elapsed().as_secs_f64();
    drop(again);
    Ok((first, cached))
}

/// `skopeo copy` into an OCI layout, then `umoci unpack` of it into a bundle.
fn skopeo_umoci_pull(reference: &str) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    let start = Instant::now();
    let copy = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:bench", layout.display()))
        .output()?;
    ensure!(
        copy.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let unpack = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:bench", layout.display()))
        .arg(&bundle)
        .output()?;
    ensure!(
        unpack.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(
        bundle.join("rootfs/usr/lib/pkg0/file0").exists(),
        "umoci's root is incomplete"
    );
    Ok(elapsed)
}
