//! Starting kiln's servers and stopping them together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_coordinator::FarmStanding;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{KilnConfig, MetricsRole};
use crate::probes::{install_metrics_recorder, MetricsSources};
use crate::storage::Storage;

/// Open TLS connections per client address on `/metrics`: a scraper and the probes need
/// a handful; the bound keeps handshakes from one address from piling up.
const METRICS_CONNECTIONS_PER_ADDRESS: usize = 32;
/// How long `kiln up`'s local workers may drain on shutdown unless `worker.drain_timeout_secs`
/// says otherwise: nothing else bounds the shutdown of a process started by hand or by CI
/// (a `kiln worker` has its orchestrator's grace period).
const LOCAL_DRAIN_TIMEOUT_SECS: u64 = 30;
/// Past their drain timeout, local workers still report their cancelled actions and wait
/// for the coordinator to close their streams (5 s at most); this covers that, and an
/// action that cancelling cannot stop at once (fetching its inputs, uploading outputs).
const LOCAL_DRAIN_SLACK: Duration = Duration::from_secs(10);

/// The servers of one process. Each runs until `shutdown` is cancelled or one fails.
pub struct Servers {
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    /// `kiln up`'s local workers. They stop first, on `drain`, while the coordinator still
    /// runs to take their results; `shutdown` follows once they have, or after
    /// `local_drain` (their drain timeout and some slack).
    local_workers: JoinSet<anyhow::Result<()>>,
    drain: CancellationToken,
    local_drain: Duration,
    /// Each listener's bound address, by name, for `--ready-file`.
    addresses: std::collections::BTreeMap<&'static str, SocketAddr>,
    /// The process's one readiness, which every `/readyz` answers from: set once every
    /// listener is up (`announce`), cleared when shutdown begins.
    ready: watch::Sender<bool>,
    /// A farm replica's standing, relayed from its coordinator for `/readyz`.
    farm: watch::Sender<Option<FarmStanding>>,
}

impl Servers {
    pub fn new() -> Self {
        Servers {
            tasks: JoinSet::new(),
            shutdown: CancellationToken::new(),
            local_workers: JoinSet::new(),
            drain: CancellationToken::new(),
            local_drain: Duration::ZERO,
            addresses: Default::default(),
            ready: watch::channel(false).0,
            farm: watch::channel(None).0,
        }
    }

    /// The process's one readiness, which every `/readyz` answers from.
    fn readiness(&self) -> kiln_registry::ReadinessProbe {
        crate::probes::readiness_probe(self.ready.subscribe(), self.farm.subscribe())
    }

    /// What a server process's probes report on: its readiness, its blob store's size
    /// and (a farm replica, once its coordinator starts) its standing in the farm.
    pub fn metrics_sources(&self, storage: &Storage) -> MetricsSources {
        MetricsSources {
            blobs: Some(storage.blobs.clone()),
            ready: self.readiness(),
        }
    }

    /// Every listener is up: the process is ready, and their addresses go to the ready
    /// file if one is asked for.
    pub fn announce(&self, ready_file: Option<&std::path::Path>) -> anyhow::Result<()> {
        self.ready.send_replace(true);
        match ready_file {
            Some(path) => crate::ready_file::write(path, &self.addresses),
            None => Ok(()),
        }
    }

    /// Starts the coordinator; with `registry`, its admin API lists that registry's
    /// repositories too.
    pub async fn start_coordinator(
        &mut self,
        config: &KilnConfig,
        storage: &Storage,
        registry: Option<kiln_registry::Registry>,
    ) -> anyhow::Result<SocketAddr> {
        // Protected mode: without auth, anyone who reaches the REAPI services can run
        // commands on the workers and read or write every blob.
        refuse_unprotected(
            config,
            config.grpc_addr,
            "the coordinator's gRPC API",
            "run commands on the workers and read or write every blob",
            config.coordinator.auth.enabled || config.tls.client_ca.is_some(),
        )?;
        let tls = config.tls.files()?;
        let listener = bind(config.grpc_addr, "coordinator").await?;
        let addr = listener.local_addr()?;
        let mut coordinator_config = config.coordinator.clone();
        coordinator_config.join_token = config.join_token.clone();
        if coordinator_config.join_token.is_none() {
            tracing::warn!(
                "no join token is configured (--join-token / KILN_JOIN_TOKEN): no worker can join"
            );
        }
        let mut coordinator = kiln_coordinator::Coordinator::new(
            coordinator_config,
            storage.blobs.clone(),
            storage.metadata.clone(),
        );
        if let Some(registry) = registry {
            coordinator = coordinator.with_registry_catalog(Arc::new(RegistryCatalog(registry)));
        }
        if let Some(files) = &tls {
            coordinator = coordinator.with_tls(files)?;
        }
        if config.coordinator.farm.enabled {
            // Relayed until the coordinator is gone; its first round comes at once.
            let (mut standing, farm) = (coordinator.standing(), self.farm.clone());
            tokio::spawn(async move {
                loop {
                    farm.send_replace(Some(standing.borrow_and_update().clone()));
                    if standing.changed().await.is_err() {
                        break;
                    }
                }
            });
        }
        // Eviction never removes what a queued or running action still needs.
        let in_flight = coordinator.in_flight_inputs();
        for store in &storage.bounded {
            store.retain(in_flight.clone());
        }
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks.spawn(async move {
            coordinator
                .serve(listener, shutdown)
                .await
                .context("coordinator")
        });
        self.addresses.insert("grpc", addr);
        let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
        tracing::info!("coordinator (REAPI over gRPC) listening on {scheme}://{addr}");
        Ok(addr)
    }

    /// Keeps the blob store within its limit: eviction passes until shutdown.
    pub fn start_eviction(&mut self, storage: &Storage) {
        for store in &storage.bounded {
            let store = store.clone();
            let shutdown = self.shutdown.clone().cancelled_owned();
            self.tasks.spawn(async move {
                store.run_eviction(shutdown).await;
                Ok(())
            });
        }
    }

    /// Starts the registry; returns a handle on it for the coordinator's admin API.
    pub async fn start_registry(
        &mut self,
        config: &KilnConfig,
        storage: &Storage,
    ) -> anyhow::Result<kiln_registry::Registry> {
        refuse_unprotected(
            config,
            config.registry_addr,
            "the registry",
            "pull, push and delete any image",
            config.registry.auth.enabled || config.tls.client_ca.is_some(),
        )?;
        let listener = bind(config.registry_addr, "registry").await?;
        self.addresses.insert("registry", listener.local_addr()?);
        let mut registry_config = config.registry.clone();
        // With shared metadata, replicas answer for one another's upload sessions.
        registry_config.shared_upload_sessions = matches!(
            config.metadata,
            crate::storage_config::MetadataConfig::Postgres(_)
        );
        let mut registry = kiln_registry::Registry::open(
            registry_config,
            storage.blobs.clone(),
            storage.metadata.clone(),
        )
        .context("opening the registry")?;
        if let Some(files) = config.tls.files()? {
            registry = registry.with_tls(&files)?;
        }
        registry.set_readiness(self.readiness());
        // Eviction never removes a blob the registry answers for from the store that holds
        // the only copy (a local tier in front of a bucket may: the bucket keeps it).
        storage.authoritative.retain(Arc::new(registry.clone()));
        // The registry shares the blob store with the CAS (and a data dir may have served
        // a coordinator before): GC keeps whatever the action cache references.
        registry.set_gc_roots(Arc::new(ActionCacheRoots {
            metadata: storage.metadata.clone(),
            blobs: storage.blobs.clone(),
            max_message_bytes: config.coordinator.max_message_bytes,
        }));
        let serving = registry.clone();
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks
            .spawn(async move { serving.serve(listener, shutdown).await.context("registry") });
        Ok(registry)
    }

    /// Installs the metrics recorder and serves `/metrics`, `/healthz` (the process is
    /// alive) and `/readyz`. Call it before starting the other servers, so that nothing
    /// they record is lost.
    pub async fn start_metrics(
        &mut self,
        config: &KilnConfig,
        role: MetricsRole,
        sources: MetricsSources,
    ) -> anyhow::Result<SocketAddr> {
        let metrics = install_metrics_recorder()?;
        let listener = bind_metrics(config, role).await?;
        let addr = listener.local_addr()?;
        let app = crate::probes::routes(metrics, sources);
        let scheme = match config.tls.metrics_files()? {
            Some(files) => {
                let tls = kiln_tls::server_config(&files, &[b"http/1.1"])?;
                let limit = kiln_tls::ConnectionLimit::new(METRICS_CONNECTIONS_PER_ADDRESS);
                self.spawn_metrics_server(kiln_tls::TlsListener::new(listener, tls, limit)?, app);
                "https"
            }
            None => {
                self.spawn_metrics_server(listener, app);
                "http"
            }
        };
        self.addresses.insert("metrics", addr);
        tracing::info!("metrics and health listening on {scheme}://{addr}");
        Ok(addr)
    }

    /// Serves the metrics `app` on `listener`, plain or TLS, until shutdown.
    fn spawn_metrics_server<L>(&mut self, listener: L, app: axum::Router)
    where
        L: axum::serve::Listener,
        L::Addr: std::fmt::Debug,
    {
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .context("metrics server")
        });
    }

    /// Starts `count` workers in this process, each with its own work directory, joining
    /// with the configuration's join token. On shutdown they drain within
    /// `worker.drain_timeout_secs` (30 s unless set) before the coordinator stops.
    pub fn start_local_workers(
        &mut self,
        config: &KilnConfig,
        coordinator: SocketAddr,
        count: usize,
    ) {
        for index in 0..count {
            let mut worker = config.worker.clone();
            worker.coordinator = format!("http://{coordinator}");
            if let Some(tls) = &config.tls.cert {
                // Over TLS too: trust the server's own certificate unless told otherwise
                // (a self-signed one is its own CA), and expect it to name localhost
                // unless told another name, since the workers dial 127.0.0.1.
                worker.coordinator = format!("https://{coordinator}");
                worker.ca_cert.get_or_insert_with(|| tls.clone());
                worker.server_name.get_or_insert_with(|| "localhost".into());
            }
            worker.join_token = config.join_token.clone().unwrap_or_default();
            worker.work_dir = config.data_dir.join("workers").join(index.to_string());
            if worker.slots == 0 {
                worker.slots = 1;
            }
            if worker.worker_id.is_empty() {
                worker.worker_id = format!("local-{index}");
            }
            let timeout = *worker
                .drain_timeout_secs
                .get_or_insert(LOCAL_DRAIN_TIMEOUT_SECS);
            self.local_drain = Duration::from_secs(timeout) + LOCAL_DRAIN_SLACK;
            let drain = self.drain.clone();
            self.local_workers.spawn(async move {
                kiln_worker::run(worker, drain.clone().cancelled_owned())
                    .await
                    .context("local worker")?;
                // Drained on request: the farm goes on without it.
                drain.cancelled().await;
                Ok(())
            });
        }
        if count > 0 {
            tracing::info!(count, "local workers started");
        }
    }

    /// Runs the process's one worker until shutdown, when it drains: it takes no new
    /// work and finishes what it holds before the process exits. A worker the
    /// coordinator drains ends the process too, cleanly. `registered` follows its
    /// registration.
    pub fn start_worker(
        &mut self,
        worker: kiln_worker::WorkerConfig,
        registered: watch::Sender<bool>,
    ) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            kiln_worker::run_reporting(worker, shutdown.clone().cancelled_owned(), registered)
                .await
                .context("worker")?;
            shutdown.cancel();
            Ok(())
        });
    }

    /// Waits for Ctrl-C or SIGTERM, or for a server to stop on its own, then stops all:
    /// local workers first (within their drain timeout), then the servers.
    pub async fn run_until_signalled(mut self) -> anyhow::Result<()> {
        let first = tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                None
            }
            Some(result) = self.tasks.join_next() => Some(result),
            // A local worker ends early only when it fails.
            Some(result) = self.local_workers.join_next() => Some(result),
        };
        // Not ready from here on: load balancers stop sending work while streams end.
        self.ready.send_replace(false);
        // A task that finished its work on purpose (a drained worker) cancelled first.
        let stopped_on_purpose = self.shutdown.is_cancelled();
        // Local workers take no new work and finish what runs while the coordinator can
        // still take the results. One that is still at it past the bound loses its
        // coordinator below, and then ends at once, cancelling what it runs.
        self.drain.cancel();
        let mut drained = Ok(());
        if !self.local_workers.is_empty() {
            let workers = join_all(&mut self.local_workers, &mut drained);
            if tokio::time::timeout(self.local_drain, workers)
                .await
                .is_err()
            {
                tracing::warn!(bound = ?self.local_drain, "local workers still draining: stopping the coordinator under them");
            }
        }
        self.shutdown.cancel();
        let mut outcome = match first {
            Some(result) => flatten(result).and_then(|()| {
                if stopped_on_purpose {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("a server stopped unexpectedly"))
                }
            }),
            None => Ok(()),
        };
        outcome = outcome.and(drained);
        join_all(&mut self.tasks, &mut outcome).await;
        join_all(&mut self.local_workers, &mut outcome).await;
        outcome
    }
}

/// Waits for every task of `tasks`, adding their failures to `outcome`.
async fn join_all(tasks: &mut JoinSet<anyhow::Result<()>>, outcome: &mut anyhow::Result<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = flatten(result) {
            if outcome.is_ok() {
                *outcome = Err(e);
            }
        }
    }
}

fn flatten(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.context("server task panicked")?
}

/// The metrics listener. A port the operator chose is theirs: failing to bind it is an
/// error. The role's default port is only a convention, and a second `kiln worker` on one
/// host finds it taken: that worker still serves, on a free port it logs.
async fn bind_metrics(config: &KilnConfig, role: MetricsRole) -> anyhow::Result<TcpListener> {
    let addr = config.metrics_addr_for(role);
    if config.metrics_addr.is_some() {
        return bind(addr, "metrics").await;
    }
    match TcpListener::bind(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = bind(SocketAddr::new(addr.ip(), 0), "metrics").await?;
            tracing::warn!(
                "the default metrics port {} is taken (another kiln on this host?); serving metrics on {} instead (set --metrics-addr to choose)",
                addr.port(),
                listener.local_addr()?.port()
            );
            Ok(listener)
        }
        bound => bound.with_context(|| format!("metrics: cannot listen on {addr}")),
    }
}

/// Protected mode: an API without authentication binds only loopback unless the operator
/// said otherwise (`--allow-unauthenticated`). `/metrics` and the probes are exempt: they
/// reveal no data and must be reachable by the cluster.
fn refuse_unprotected(
    config: &KilnConfig,
    addr: SocketAddr,
    what: &str,
    anyone_could: &str,
    authenticated: bool,
) -> anyhow::Result<()> {
    if authenticated || addr.ip().is_loopback() {
        return Ok(());
    }
    if config.allow_unauthenticated {
        tracing::warn!(%addr, "serving {what} without authentication off loopback, as --allow-unauthenticated says");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {what} on {addr}: that is not a loopback address, and without \
         authentication anyone who reaches it could {anyone_could}. Bind 127.0.0.1, or pass \
         --allow-unauthenticated (KILN_ALLOW_UNAUTHENTICATED=true) to accept that on a \
         network you trust."
    )
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The registry as the coordinator's admin API sees it.
struct RegistryCatalog(kiln_registry::Registry);

#[tonic::async_trait]
impl kiln_coordinator::RegistryCatalog for RegistryCatalog {
    async fn repositories(
        &self,
        limit: usize,
    ) -> Result<(Vec<kiln_coordinator::RepositorySummary>, bool), String> {
        let (stats, more) = self
            .0
            .repository_stats(limit)
            .await
            .map_err(|e| e.to_string())?;
        let summaries = stats
            .into_iter()
            .map(|r| kiln_coordinator::RepositorySummary {
                name: r.name,
                tags: r.tags,
                manifests: r.manifests,
            })
            .collect();
        Ok((summaries, more))
    }

    async fn owns_blob(&self, hash: &kiln_store::ContentHash) -> Result<bool, String> {
        self.0.owns_blob(hash).await.map_err(|e| e.to_string())
    }
}

/// The registry GC's roots in a process whose store the CAS shares: every blob an
/// action-cache entry references, read from the same metadata store.
struct ActionCacheRoots {
    metadata: Arc<dyn kiln_store::MetadataStore>,
    blobs: Arc<dyn kiln_store::BlobStore>,
    max_message_bytes: u64,
}

#[tonic::async_trait]
impl kiln_registry::GcRoots for ActionCacheRoots {
    async fn referenced(
        &self,
    ) -> Result<std::collections::HashSet<kiln_store::ContentHash>, String> {
        kiln_coordinator::action_cache_references(
            self.metadata.clone(),
            self.blobs.clone(),
            self.max_message_bytes,
        )
        .await
        .map_err(|e| e.to_string())
    }
}
