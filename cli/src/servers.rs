//! Starting kiln's servers and stopping them together.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::KilnConfig;
use crate::storage::Storage;

/// The servers of one process. Each runs until `shutdown` is cancelled or one fails.
pub struct Servers {
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl Servers {
    pub fn new() -> Self {
        Servers {
            tasks: JoinSet::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub async fn start_coordinator(
        &mut self,
        config: &KilnConfig,
        storage: &Storage,
    ) -> anyhow::Result<SocketAddr> {
        let listener = bind(config.grpc_addr, "coordinator").await?;
        let addr = listener.local_addr()?;
        let mut coordinator_config = config.coordinator.clone();
        coordinator_config.join_token = config.join_token.clone();
        if coordinator_config.join_token.is_none() {
            tracing::warn!(
                "no join token is configured (--join-token / KILN_JOIN_TOKEN): no worker can join"
            );
        }
        let coordinator = kiln_coordinator::Coordinator::new(
            coordinator_config,
            storage.blobs.clone(),
            storage.metadata.clone(),
        );
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks.spawn(async move {
            coordinator
                .serve(listener, shutdown)
                .await
                .context("coordinator")
        });
        tracing::info!("coordinator (REAPI over gRPC) listening on grpc://{addr}");
        Ok(addr)
    }

    pub async fn start_registry(
        &mut self,
        config: &KilnConfig,
        storage: &Storage,
    ) -> anyhow::Result<SocketAddr> {
        let listener = bind(config.registry_addr, "registry").await?;
        let addr = listener.local_addr()?;
        let registry = kiln_registry::Registry::open(
            config.registry.clone(),
            storage.blobs.clone(),
            storage.metadata.clone(),
        )
        .context("opening the registry")?;
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks
            .spawn(async move { registry.serve(listener, shutdown).await.context("registry") });
        Ok(addr)
    }

    /// Serves `/metrics`, `/healthz` and `/readyz`.
    pub async fn start_metrics(
        &mut self,
        config: &KilnConfig,
        metrics: PrometheusHandle,
    ) -> anyhow::Result<SocketAddr> {
        let listener = bind(config.metrics_addr, "metrics").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || std::future::ready(metrics.render())),
            )
            // Storage is opened before any server starts, so a serving process is ready.
            .route(
                "/healthz",
                axum::routing::get(|| std::future::ready("ok\n")),
            )
            .route(
                "/readyz",
                axum::routing::get(|| std::future::ready("ready\n")),
            );
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .context("metrics server")
        });
        tracing::info!("metrics and health listening on http://{addr}");
        Ok(addr)
    }

    /// Starts `count` workers in this process, each with its own work directory.
    pub fn start_local_workers(
        &mut self,
        config: &KilnConfig,
        coordinator: SocketAddr,
        join_token: &str,
        count: usize,
    ) {
        for index in 0..count {
            let mut worker = config.worker.clone();
            worker.coordinator = format!("http://{coordinator}");
            worker.join_token = join_token.to_string();
            worker.work_dir = config.data_dir.join("workers").join(index.to_string());
            if worker.slots == 0 {
                worker.slots = 1;
            }
            if worker.worker_id.is_empty() {
                worker.worker_id = format!("local-{index}");
            }
            self.start_worker(worker);
        }
        if count > 0 {
            tracing::info!(count, "local workers started");
        }
    }

    /// Runs a worker until shutdown, when it drains: it takes no new work and finishes
    /// what it holds before the process exits.
    pub fn start_worker(&mut self, worker: kiln_worker::WorkerConfig) {
        let shutdown = self.shutdown.clone().cancelled_owned();
        self.tasks
            .spawn(async move { kiln_worker::run(worker, shutdown).await.context("worker") });
    }

    /// Waits for Ctrl-C or SIGTERM, or for a server to stop on its own, then stops all.
    pub async fn run_until_signalled(mut self) -> anyhow::Result<()> {
        let first = tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                None
            }
            Some(result) = self.tasks.join_next() => Some(result),
        };
        self.shutdown.cancel();
        let mut outcome = match first {
            Some(result) => {
                flatten(result).and_then(|()| anyhow::bail!("a server stopped unexpectedly"))
            }
            None => Ok(()),
        };
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = flatten(result) {
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }
}

fn flatten(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.context("server task panicked")?
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
