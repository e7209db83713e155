//! Keeps the action cache within `coordinator.max_action_cache_entries`: at start-up,
//! before serving, and then every minute, the least recently used entries beyond it go
//! (down to 90 % of it, so that a busy cache is not trimmed on every pass). 0 leaves the
//! cache unbounded.

use std::future::Future;
use std::time::Duration;

use kiln_store::ActionCache;

/// Time between two passes.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// One pass; failures are logged, and the next pass tries again.
pub(crate) async fn trim_once(results: &ActionCache, max_entries: u64) {
    if max_entries == 0 {
        return;
    }
    let keep = max_entries - max_entries / 10;
    match results.trim(max_entries, keep).await {
        Ok(report) if report.removed > 0 => {
            metrics::counter!("kiln_action_cache_evicted_total").increment(report.removed);
            tracing::info!(?report, "trimmed the action cache");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not trim the action cache"),
    }
}

/// A pass every minute until `stop` resolves.
pub(crate) fn spawn(
    results: ActionCache,
    max_entries: u64,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let trimming = async {
            loop {
                tokio::time::sleep(TRIM_INTERVAL).await;
                trim_once(&results, max_entries).await;
            }
        };
        tokio::select! {
            () = trimming => {}
            () = stop => {}
        }
    })
}
