//! kiln's servers in the benchmark's own process, on `kiln up`'s defaults: filesystem
//! blobs and sled metadata under one directory, listening on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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
        grpc: serve_coordinator(blobs.clone(), metadata.clone()).await?,
        registry: serve_registry(blobs, metadata).await?,
    })
}

/// The coordinator alone.
pub async fn coordinator(dir: &Path) -> anyhow::Result<SocketAddr> {
    let (blobs, metadata) = open_stores(dir)?;
    serve_coordinator(blobs, metadata).await
}

/// The registry alone.
pub async fn registry(dir: &Path) -> anyhow::Result<SocketAddr> {
    let (blobs, metadata) = open_stores(dir)?;
    serve_registry(blobs, metadata).await
}

type Stores = (Arc<dyn BlobStore>, Arc<dyn MetadataStore>);

fn open_stores(dir: &Path) -> anyhow::Result<Stores> {
    Ok((
        Arc::new(FsBlobStore::open(dir.join("blobs"))?),
        Arc::new(SledMetadataStore::open(dir.join("metadata"))?),
    ))
}

async fn serve_coordinator(
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
) -> anyhow::Result<SocketAddr> {
    let coordinator = kiln_coordinator::Coordinator::new(Default::default(), blobs, metadata);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(coordinator.serve(listener, futures::future::pending()));
    Ok(addr)
}

async fn serve_registry(
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
) -> anyhow::Result<SocketAddr> {
    let registry = Registry::open(RegistryConfig::default(), blobs, metadata)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(registry.serve(listener, futures::future::pending()));
    Ok(addr)
}
