//! Test fixtures shared by the crates' integration tests: a coordinator or a registry
//! served in process on `127.0.0.1:0`, over memory stores unless a test needs its data on
//! disk (durability, restarts, files to corrupt).
//!
//! A dev-dependency only, of integration tests only: a crate's own unit tests cannot use
//! it without compiling that crate twice.

mod garage;
mod postgres;
pub mod resident;

pub use garage::{garage_binary, Garage, GARAGE_BUCKET};
pub use postgres::Postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_registry::{Registry, RegistryConfig};
use kiln_store::{
    BlobStore, BoundedBlobStore, EvictionPolicy, FsBlobStore, MemoryBlobStore, MemoryMetadataStore,
    MetadataStore, SledMetadataStore,
};
use kiln_tls::TlsFiles;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where a served component keeps its data.
pub enum Stores {
    /// In memory: the default, for everything but durability.
    Memory,
    /// A filesystem blob store and sled under this directory (reopened by a restart).
    OnDisk(PathBuf),
    /// In memory, with the blob store behind this size limit and eviction policy.
    Bounded(EvictionPolicy),
    /// Stores already open, shared with other servers: a farm's replicas.
    Shared(OpenStores),
}

/// The stores a server runs on, and the blob store's concrete type where a test needs
/// to reach its files.
#[derive(Clone)]
pub struct OpenStores {
    pub blobs: Arc<dyn BlobStore>,
    pub metadata: Arc<dyn MetadataStore>,
    /// Set for [`Stores::OnDisk`].
    pub fs_blobs: Option<FsBlobStore>,
    /// Set for [`Stores::Bounded`]: the same store as `blobs`, for its eviction passes.
    pub bounded: Option<Arc<BoundedBlobStore>>,
}

impl Stores {
    pub async fn open(&self) -> anyhow::Result<OpenStores> {
        Ok(match self {
            Stores::Memory => OpenStores {
                blobs: Arc::new(MemoryBlobStore::new()),
                metadata: Arc::new(MemoryMetadataStore::new()),
                fs_blobs: None,
                bounded: None,
            },
            Stores::OnDisk(dir) => on_disk(dir)?,
            Stores::Shared(stores) => stores.clone(),
            Stores::Bounded(policy) => {
                let bounded = Arc::new(
                    BoundedBlobStore::new(Arc::new(MemoryBlobStore::new()), policy.clone()).await?,
                );
                OpenStores {
                    blobs: bounded.clone(),
                    metadata: Arc::new(MemoryMetadataStore::new()),
                    fs_blobs: None,
                    bounded: Some(bounded),
                }
            }
        })
    }
}

fn on_disk(dir: &Path) -> anyhow::Result<OpenStores> {
    let fs_blobs = FsBlobStore::open(dir.join("blobs"))?;
    let metadata = SledMetadataStore::open(dir.join("metadata"))?;
    Ok(OpenStores {
        blobs: Arc::new(fs_blobs.clone()),
        metadata: Arc::new(metadata),
        fs_blobs: Some(fs_blobs),
        bounded: None,
    })
}

/// A server task and the signal that stops it.
struct Serving<E> {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E: std::error::Error + Send + Sync + 'static> Serving<E> {
    fn spawn<F>(serve: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Serving {
            stop: Some(stop),
            task: Some(tokio::spawn(serve(stopped))),
        }
    }

    /// Stops the server and waits until it has released its stores.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .context("the server did not stop within 10 s")???;
        }
        Ok(())
    }
}

impl<E> Drop for Serving<E> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A coordinator serving every REAPI service (and the worker protocol).
pub struct ServedCoordinator {
    pub addr: SocketAddr,
    pub stores: OpenStores,
    serving: Serving<kiln_coordinator::CoordinatorError>,
}

impl ServedCoordinator {
    pub async fn start(config: CoordinatorConfig, stores: Stores) -> anyhow::Result<Self> {
        Self::start_with_tls(config, stores, None).await
    }

    /// [`Self::start`], serving `grpcs` with `tls` when it is given.
    pub async fn start_with_tls(
        config: CoordinatorConfig,
        stores: Stores,
        tls: Option<&TlsFiles>,
    ) -> anyhow::Result<Self> {
        let stores = stores.open().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut config = config;
        if config.farm.enabled && config.farm.advertise_url.is_empty() {
            // Over TLS by the name test certificates carry.
            config.farm.advertise_url = match tls {
                Some(_) => format!("https://localhost:{}", addr.port()),
                None => format!("http://{addr}"),
            };
        }
        let mut coordinator =
            Coordinator::new(config, stores.blobs.clone(), stores.metadata.clone());
        if let Some(files) = tls {
            coordinator = coordinator.with_tls(files)?;
        }
        if let Some(bounded) = &stores.bounded {
            // As `kiln` wires it: eviction keeps what unfinished operations need.
            bounded.retain(coordinator.in_flight_inputs());
        }
        let serving = Serving::spawn(|stopped| {
            coordinator.serve(listener, async {
                let _ = stopped.await;
            })
        });
        Ok(ServedCoordinator {
            addr,
            stores,
            serving,
        })
    }

    /// `http://127.0.0.1:PORT`, for tonic channels.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC channel to the server, connected.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Channel::from_shared(self.http_url())?
            .connect()
            .await?)
    }

    /// `grpc://127.0.0.1:PORT`, as kiln's own clients take it.
    pub fn grpc_url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.serving.stop().await
    }
}

/// The OCI registry.
pub struct ServedRegistry {
    pub addr: SocketAddr,
    pub registry: Registry,
    pub stores: OpenStores,
    serving: Serving<kiln_registry::RegistryError>,
}

impl ServedRegistry {
    pub async fn start(config: RegistryConfig, stores: Stores) -> anyhow::Result<Self> {
        Self::start_with_tls(config, stores, None).await
    }

    /// [`Self::start`], serving `https` with `tls` when it is given.
    pub async fn start_with_tls(
        config: RegistryConfig,
        stores: Stores,
        tls: Option<&TlsFiles>,
    ) -> anyhow::Result<Self> {
        let stores = stores.open().await?;
        let mut registry = Registry::open(config, stores.blobs.clone(), stores.metadata.clone())?;
        if let Some(files) = tls {
            registry = registry.with_tls(files)?;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serving_registry = registry.clone();
        let serving = Serving::spawn(|stopped| {
            serving_registry.serve(listener, async {
                let _ = stopped.await;
            })
        });
        Ok(ServedRegistry {
            addr,
            registry,
            stores,
            serving,
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.serving.stop().await
    }
}
