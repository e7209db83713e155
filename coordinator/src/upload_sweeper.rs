//! Sweeps abandoned ByteStream uploads: a client that goes away mid-upload (Ctrl-C during
//! a Bazel build) leaves its bytes kept for a resume that may never come. Once at start-up
//! and then periodically, uploads idle past `coordinator.upload_ttl_secs` go.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kiln_store::BlobStore;

/// The longest wait between two sweeps, whatever the TTL.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// Sweeps now, then every `min(ttl / 4, an hour)` until `stop` resolves.
pub(crate) fn spawn(
    blobs: Arc<dyn BlobStore>,
    ttl: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let interval = (ttl / 4).clamp(Duration::from_millis(100), MAX_SWEEP_INTERVAL);
    tokio::spawn(async move {
        let sweeping = async {
            loop {
                match blobs.sweep_uploads(ttl).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "swept abandoned uploads"),
                    Err(e) => tracing::warn!(error = %e, "could not sweep abandoned uploads"),
                }
                tokio::time::sleep(interval).await;
            }
        };
        tokio::select! {
            () = sweeping => {}
            () = stop => {}
        }
    })
}
