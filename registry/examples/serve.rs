//! Serves the registry alone, for interop scripts and trying it out before `kiln registry`:
//!
//! ```text
//! cargo run --release -p kiln-registry --example serve -- \
//!     --registry-addr 127.0.0.1:5000 --data-dir /tmp/registry [--config registry.toml]
//! ```
//!
//! The config file is the registry table alone (`RegistryConfig`). Prints
//! `listening on http://ADDR` once bound; stops on Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use kiln_registry::{Registry, RegistryConfig};
use kiln_store::{FsBlobStore, SledMetadataStore};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().collect();
    let addr = flag(&args, "--registry-addr").unwrap_or_else(|| "127.0.0.1:5000".into());
    let data_dir =
        std::path::PathBuf::from(flag(&args, "--data-dir").context("--data-dir DIR is required")?);
    let config: RegistryConfig = match flag(&args, "--config") {
        Some(path) => toml::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("reading {path}"))?,
        None => RegistryConfig::default(),
    };
    let blobs = Arc::new(FsBlobStore::open(data_dir.join("blobs"))?);
    let metadata = Arc::new(SledMetadataStore::open(data_dir.join("metadata"))?);
    let registry = Registry::open(config, blobs, metadata)?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    registry
        .serve(listener, async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
