//! kiln's servers in the benchmark's own process, on `kiln up`'s defaults: filesystem
//! blobs and sled metadata under one directory, listening on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use kiln_coordinator::CoordinatorConfig;
use kiln_registry::{Registry, RegistryConfig};
use kiln_store::{BlobStore, FsBlobStore, MetadataStore, SledMetadataStore};

/// Where the in-process servers listen.
pub struct Servers {
    /// The coordinator's REAPI (gRPC).
    pub grpc: SocketAddr,
    /// The registry (HTTP).
    pub registry: SocketAddr,
}

/// The coordinator and the registry on one blob store and one metadata store, as
/// `kiln up` runs them.
pub async fn coordinator_and_registry(dir: &Path) -> anyhow::Result<Servers> {
    let (blobs, metadata) = open_stores(dir)?;
    Ok(Servers {
        grpc: serve_coordinator(
            CoordinatorConfig::default(),
            blobs.clone(),
            metadata.clone(),
        )
        .await?,
        registry: serve_registry(RegistryConfig::default(), blobs, metadata).await?,
    })
}

/// The coordinator alone.
pub async fn coordinator(dir: &Path) -> anyhow::Result<SocketAddr> {
    let (blobs, metadata) = open_stores(dir)?;
    serve_coordinator(CoordinatorConfig::default(), blobs, metadata).await
}

/// The registry alone.
pub async fn registry(dir: &Path) -> anyhow::Result<SocketAddr> {
    let (blobs, metadata) = open_stores(dir)?;
    serve_registry(RegistryConfig::default(), blobs, metadata).await
}

type Stores = (Arc<dyn BlobStore>, Arc<dyn MetadataStore>);

fn open_stores(dir: &Path) -> anyhow::Result<Stores> {
    Ok((
        Arc::new(FsBlobStore::open(dir.join("blobs"))?),
        Arc::new(SledMetadataStore::open(dir.join("metadata"))?),
    ))
}

/// A coordinator with `config` on these stores, on a loopback port; a farm replica
/// advertises that port to the others.
pub async fn serve_coordinator(
    mut config: CoordinatorConfig,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    if config.farm.enabled {
        config.farm.advertise_url = format!("http://{addr}");
    }
    let coordinator = kiln_coordinator::Coordinator::new(config, blobs, metadata);
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Ok(addr)
}

/// A registry with `config` on these stores, on a loopback port.
pub async fn serve_registry(
    config: RegistryConfig,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
) -> anyhow::Result<SocketAddr> {
    let registry = Registry::open(config, blobs, metadata)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(registry.serve(listener, futures::future::pending()));
    Ok(addr)
}
