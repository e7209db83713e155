//! Bounded storage under a long mixed load (issue 12): a coordinator and a registry in
//! process on one size-limited store, as `kiln up` runs them, with eviction, registry
//! retention and GC all running, while CAS writers, CAS readers and an image pusher work
//! at twice the store's limit and more. It stops by itself after `--minutes`.
//!
//! It counts what clients saw: RESOURCE_EXHAUSTED / 507 (the documented answer of a full
//! store), reads of evicted blobs (NOT_FOUND, a cache miss), and anything else (an error).
//! Every acknowledged push is pulled back at once, and the tags retention keeps are pulled
//! again at the end: an acknowledged push that cannot be pulled is a lost push.
//!
//! `cargo run --release -p kiln-loadtests --bin soak -- --minutes 10`

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_loadtests::bytestream::write_blob;
use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use kiln_publish::{ManifestReference, PublishError, RegistryClient, OCI_MANIFEST};
use kiln_registry::RegistryConfig;
use kiln_store::{
    BlobStore, BoundedBlobStore, Digest, DigestFunction, EvictionPolicy, FsBlobStore, ResourceName,
    SledMetadataStore,
};
use rand::{Rng, RngCore};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// The store's limit, in MiB.
    #[arg(long, default_value_t = 256)]
    limit_mib: u64,
    /// Blobs used within this many seconds are never evicted.
    #[arg(long, default_value_t = 5)]
    grace_secs: u64,
    /// Where the store lives [default: a temporary directory under $TMPDIR].
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// How often disk use is sampled for the plot.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Disk use at one moment of the run.
struct Sample {
    seconds: u64,
    percent: f64,
    /// CAS writes and pushes refused since the previous sample.
    refused: u64,
}

/// A text plot of disk use over the run, one column a sample, with the refusals of each
/// sample's interval beneath: readable in a terminal and in BENCHMARKS.md alike.
fn plot(samples: &[Sample]) -> String {
    const ROWS: [f64; 8] = [100.0, 95.0, 90.0, 80.0, 60.0, 40.0, 20.0, 0.0];
    let mut out = String::from("disk use, % of the limit (one column per sample)\n");
    for (i, floor) in ROWS.iter().enumerate() {
        let ceiling = if i == 0 { f64::INFINITY } else { ROWS[i - 1] };
        let row: String = samples
            .iter()
            .map(|s| match s.percent {
                p if p >= *floor && p < ceiling => '*',
                p if p >= ceiling => '|',
                _ => ' ',
            })
            .collect();
        out.push_str(&format!("{floor:>5.0}% {row}\n"));
    }
    let refusals: String = samples
        .iter()
        .map(|s| match s.refused {
            0 => '.',
            1..=9 => 'r',
            _ => 'R',
        })
        .collect();
    out.push_str(&format!("refused {refusals}   (. none, r 1-9, R 10+)\n"));
    let end = samples.last().map_or(0, |s| s.seconds);
    out.push_str(&format!(
        "        0 s{:>width$}",
        format!("{end} s"),
        width = samples.len().saturating_sub(3)
    ));
    out
}

/// How many of the newest CAS blobs the reader reads from.
const WORKING_SET: usize = 16;

/// What clients saw.
#[derive(Default)]
struct Tally {
    cas_writes: AtomicU64,
    cas_bytes: AtomicU64,
    cas_refused: AtomicU64,
    reads: AtomicU64,
    reads_evicted: AtomicU64,
    pushes: AtomicU64,
    push_bytes: AtomicU64,
    pushes_refused: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
}

impl Tally {
    fn error(&self, what: &str, error: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("error: {what}: {error}");
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = args.limit_mib << 20;
    let parent = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(parent)?;
    let files = Arc::new(FsBlobStore::open(dir.path().join("cas"))?);
    let policy = EvictionPolicy {
        grace: Duration::from_secs(args.grace_secs),
        interval: Duration::from_secs(1),
        ..EvictionPolicy::with_max_bytes(limit)
    };
    let store = Arc::new(BoundedBlobStore::new(files, policy).await?);
    let metadata = Arc::new(SledMetadataStore::open(dir.path().join("metadata"))?);
    tokio::spawn(store.clone().run_eviction(futures::future::pending()));

    let coordinator =
        kiln_coordinator::Coordinator::new(Default::default(), store.clone(), metadata.clone());
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = grpc.local_addr()?;
    tokio::spawn(coordinator.serve(grpc, futures::future::pending()));

    // Retention keeps the newest 3 branch tags and drops untagged manifests after 10 s;
    // GC then collects what they no longer hold. (With untagged manifests kept, the
    // registry's images fill the store within minutes and the CAS is refused from then
    // on: the registry owns its blobs until its own rules let them go.)
    let mut config = RegistryConfig::default();
    config.retention.keep_branch_tags = Some(3);
    config.retention.untagged_grace_secs = Some(10);
    config.retention.interval_secs = 5;
    config.gc.interval_secs = 5;
    config.gc.grace_secs = 10;
    let registry = kiln_registry::Registry::open(config, store.clone(), metadata)?;
    store.retain(Arc::new(registry.clone()));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let registry_addr = http.local_addr()?;
    tokio::spawn(registry.serve(http, futures::future::pending()));

    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .connect()
        .await?;
    let client = Arc::new(RegistryClient::new(&registry_addr.to_string(), true, None)?);
    let tally = Arc::new(Tally::default());
    let recent: Arc<Mutex<VecDeque<Digest>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(args.minutes * 60);

    let mut load = Vec::new();
    for _ in 0..2 {
        load.push(tokio::spawn(cas_writer(
            channel.clone(),
            tally.clone(),
            recent.clone(),
            deadline,
        )));
    }
    load.push(tokio::spawn(cas_reader(
        channel.clone(),
        tally.clone(),
        recent.clone(),
        deadline,
    )));
    let pusher = tokio::spawn(image_pusher(client.clone(), tally.clone(), deadline));

    // Disk use against the limit, and the refusals since the previous sample.
    let mut samples = Vec::new();
    let mut peak = 0;
    let mut refused_before = 0;
    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let stored = store.stored_bytes().await?;
        peak = peak.max(stored);
        let refused = tally.cas_refused.load(Ordering::Relaxed)
            + tally.pushes_refused.load(Ordering::Relaxed);
        samples.push(Sample {
            seconds: started.elapsed().as_secs(),
            percent: 100.0 * stored as f64 / limit as f64,
            refused: refused - refused_before,
        });
        refused_before = refused;
    }
    for task in load {
        task.await?;
    }
    let kept_tags = pusher.await?;
    // Retention keeps the newest 3; every one of them must still pull whole.
    for tag in kept_tags.iter().rev().take(3) {
        if let Err(e) = pull_image(&client, tag).await {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            eprintln!("lost: {tag}: {e}");
        }
    }

    let t = &tally;
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    println!(
        "\n## Soak: {} minutes, limit {} MiB, peak {} MiB stored",
        args.minutes,
        args.limit_mib,
        peak >> 20
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| CAS writes acknowledged | {} ({} MiB, {:.1}× the limit) |",
        get(&t.cas_writes),
        get(&t.cas_bytes) >> 20,
        get(&t.cas_bytes) as f64 / limit as f64
    );
    println!(
        "| CAS writes refused (RESOURCE_EXHAUSTED) | {} |",
        get(&t.cas_refused)
    );
    println!(
        "| CAS reads | {} ({} of evicted blobs: NOT_FOUND) |",
        get(&t.reads),
        get(&t.reads_evicted)
    );
    println!(
        "| image pushes acknowledged and pulled back | {} ({} MiB) |",
        get(&t.pushes),
        get(&t.push_bytes) >> 20
    );
    println!(
        "| image pushes refused (507) | {} |",
        get(&t.pushes_refused)
    );
    println!("| other errors seen by clients | {} |", get(&t.errors));
    println!("| acknowledged pushes lost | {} |", get(&t.lost));
    println!("\n{}", plot(&samples));
    anyhow::ensure!(get(&t.errors) == 0 && get(&t.lost) == 0, "the soak failed");
    anyhow::ensure!(peak <= limit, "the store passed its limit");
    Ok(())
}

/// Fresh blobs of 256 KiB to 4 MiB, as fast as the store takes them.
async fn cas_writer(
    channel: Channel,
    tally: Arc<Tally>,
    recent: Arc<Mutex<VecDeque<Digest>>>,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        let size = rand::rng().random_range(256 << 10..4 << 20);
        match write_blob(&channel, random(size).into()).await {
            Ok(digest) => {
                tally.cas_writes.fetch_add(1, Ordering::Relaxed);
                tally.cas_bytes.fetch_add(size as u64, Ordering::Relaxed);
                let mut recent = recent.lock().unwrap();
                recent.push_back(digest);
                if recent.len() > 200 {
                    recent.pop_front();
                }
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                tally.cas_refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => tally.error("CAS write", status),
        }
    }
}

/// Reads back the newest blobs, checking their bytes; an evicted one is a miss.
async fn cas_reader(
    channel: Channel,
    tally: Arc<Tally>,
    recent: Arc<Mutex<VecDeque<Digest>>>,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        let picked = {
            let recent = recent.lock().unwrap();
            // The working set: the newest few; older blobs go cold and may be evicted.
            let working_set = recent.len().min(WORKING_SET);
            (working_set > 0)
                .then(|| recent[recent.len() - 1 - rand::rng().random_range(0..working_set)])
        };
        let Some(digest) = picked else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tally.reads.fetch_add(1, Ordering::Relaxed);
        match read_blob(&channel, digest).await {
            Ok(data) if Digest::of_bytes(DigestFunction::Sha256, &data) == digest => {}
            Ok(_) => tally.error("CAS read", format!("{digest} read back different bytes")),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tally.reads_evicted.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => tally.error("CAS read", status),
        }
    }
}

async fn read_blob(channel: &Channel, digest: Digest) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = ByteStreamClient::new(channel.clone())
        .read(ReadRequest {
            resource_name: ResourceName::read("", digest).to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

/// Pushes one-layer images (1 MiB layer) under branch tags, pulling each back once
/// acknowledged; returns the acknowledged tags in order.
async fn image_pusher(
    client: Arc<RegistryClient>,
    tally: Arc<Tally>,
    deadline: Instant,
) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let tag = format!(
            "main-{}",
            &Digest::of_bytes(DigestFunction::Sha256, &n.to_le_bytes()).hex()[..12]
        );
        match push_image(&client, &tag).await {
            Ok(bytes) => {
                if let Err(e) = pull_image(&client, &tag).await {
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    eprintln!("lost right after its push: {tag}: {e}");
                }
                tally.pushes.fetch_add(1, Ordering::Relaxed);
                tally.push_bytes.fetch_add(bytes, Ordering::Relaxed);
                acknowledged.push(tag);
            }
            Err(PublishError::Registry { status: 507, .. }) => {
                tally.pushes_refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => tally.error("image push", e),
        }
    }
    acknowledged
}

async fn push_image(client: &RegistryClient, tag: &str) -> Result<u64, PublishError> {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#).into_bytes();
    let layer = random(1 << 20);
    let mut descriptors = Vec::new();
    for (media_type, data) in [
        ("application/vnd.oci.image.config.v1+json", config),
        ("application/vnd.oci.image.layer.v1.tar", layer),
    ] {
        let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
        client
            .upload_bytes("soak/app", &digest.content_hash(), data)
            .await?;
        descriptors.push(serde_json::json!({
            "mediaType": media_type, "digest": digest.oci(), "size": digest.size,
        }));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptors[0], "layers": [descriptors[1]],
    }))
    .expect("a JSON value serialises");
    client
        .put_manifest(
            "soak/app",
            &ManifestReference::Tag(tag.to_string()),
            OCI_MANIFEST,
            &manifest,
        )
        .await?;
    Ok((1 << 20) + manifest.len() as u64)
}

/// Pulls a tag's manifest and every blob it names, checking each blob's digest.
async fn pull_image(client: &RegistryClient, tag: &str) -> anyhow::Result<()> {
    let fetched = client
        .get_manifest("soak/app", &ManifestReference::Tag(tag.to_string()))
        .await?;
    let manifest: serde_json::Value = serde_json::from_slice(&fetched.bytes)?;
    let mut blobs = vec![manifest["config"]["digest"].clone()];
    blobs.extend(
        manifest["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|l| l["digest"].clone()),
    );
    for digest in blobs {
        let digest = digest.as_str().unwrap_or_default();
        let hash = kiln_store::ContentHash::parse_oci(digest)?;
        let data = client.get_blob_bytes("soak/app", &hash).await?;
        anyhow::ensure!(
            Digest::of_bytes(DigestFunction::Sha256, &data).content_hash() == hash,
            "{digest} pulled back different bytes"
        );
    }
    Ok(())
}
