//! Starting kiln's servers and stopping them together.

use std::net::SocketAddr;

use anyhow::Context;
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
        let coordinator = kiln_coordinator::Coordinator::new(
            config.coordinator.clone(),
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

async fn shutdown_signal() {
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
