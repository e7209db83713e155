//! What every kiln process serves on `metrics_addr`: `/metrics` (Prometheus), `/healthz`
//! (the process is alive) and `/readyz` (it is ready to serve; a farm replica also says
//! its role there).

use std::sync::Arc;

use axum::http::StatusCode;
use kiln_coordinator::FarmStanding;
use kiln_registry::ReadinessProbe;
use kiln_store::BlobStore;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

/// Bytes the blob store holds (blobs and kept uploads), set at each scrape.
const STORE_BYTES: &str = "kiln_store_bytes";

/// Installs the process-wide Prometheus recorder, with real histogram buckets for
/// kiln's histograms (the exporter's default would render them as summaries, which
/// cannot be aggregated across processes).
pub(crate) fn install_metrics_recorder() -> anyhow::Result<PrometheusHandle> {
    let histograms = [
        (
            kiln_coordinator::metric_names::ACTION_STAGE_SECONDS,
            kiln_coordinator::STAGE_BUCKETS,
        ),
        (
            kiln_registry::metric_names::REQUEST_SECONDS,
            kiln_registry::REQUEST_BUCKETS,
        ),
    ];
    // Gauges are set again on every tick (or scrape); one that nothing sets for a minute
    // belongs to a label that left its set (a platform no worker offers and nothing
    // queues for) and is dropped, so label sets stay bounded over a long life.
    let mut builder = PrometheusBuilder::new().idle_timeout(
        metrics_util::MetricKindMask::GAUGE,
        Some(std::time::Duration::from_secs(60)),
    );
    for (name, buckets) in histograms {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    kiln_coordinator::describe_metrics();
    kiln_registry::describe_metrics();
    metrics::describe_gauge!(
        STORE_BYTES,
        metrics::Unit::Bytes,
        "Bytes the blob store holds: blobs of the CAS and the registry together, and kept uploads"
    );
    Ok(handle)
}

/// What `/metrics` and `/readyz` report on beyond the recorder.
pub struct MetricsSources {
    /// The blob store whose size `kiln_store_bytes` reports, if this process has one.
    pub blobs: Option<Arc<dyn BlobStore>>,
    /// Whether the process is ready to serve (see [`readiness_probe`]).
    pub ready: ReadinessProbe,
}

impl MetricsSources {
    /// A worker, ready while `registered` says it is.
    pub fn worker(registered: watch::Receiver<bool>) -> Self {
        MetricsSources {
            blobs: None,
            ready: readiness_probe(registered, watch::channel(None).1),
        }
    }
}

/// The process's one readiness, which every `/readyz` answers from: `ready` (servers once
/// every listener is up and until shutdown begins, a worker while it is registered with
/// its coordinator) and, for a farm replica, its standing in the farm.
pub(crate) fn readiness_probe(
    ready: watch::Receiver<bool>,
    farm: watch::Receiver<Option<FarmStanding>>,
) -> ReadinessProbe {
    Arc::new(move || readiness(*ready.borrow(), farm.borrow().as_ref()))
}

/// `/metrics`, `/healthz` and `/readyz`, over the installed recorder `metrics`.
pub(crate) fn routes(metrics: PrometheusHandle, sources: MetricsSources) -> axum::Router {
    let MetricsSources { blobs, ready } = sources;
    let render = move || {
        let blobs = blobs.clone();
        let metrics = metrics.clone();
        async move {
            if let Some(blobs) = &blobs {
                // A store that cannot say leaves the last value, and says why in the log.
                match blobs.stored_bytes().await {
                    Ok(bytes) => metrics::gauge!(STORE_BYTES).set(bytes as f64),
                    Err(e) => tracing::warn!(error = %e, "could not read the store's size"),
                }
            }
            metrics.render()
        }
    };
    let ready = move || {
        let (ready, why) = ready();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        std::future::ready((status, why))
    };
    axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .route(
            "/healthz",
            axum::routing::get(|| std::future::ready("ok\n")),
        )
        .route("/readyz", axum::routing::get(ready))
}

/// What `/readyz` answers. A farm replica is ready once it knows its role (an election
/// round has reached the metadata store), whatever that role is: every replica serves
/// the stores, and a follower forwards what only the leader answers. A later outage of
/// the metadata store keeps it ready and is only reported: every replica shares that
/// store, so failing readiness would take them all out of the balancer together and
/// turn an outage of the metadata into one of the blobs too. The body names the role,
/// for operators and scripts; balancers need only the status.
fn readiness(ready: bool, farm: Option<&FarmStanding>) -> (bool, String) {
    match farm {
        _ if !ready => (
            false,
            "not ready: starting, shutting down, or (a worker) not registered with its coordinator\n"
                .into(),
        ),
        Some(standing) if !standing.joined => (
            false,
            "not ready: this farm replica has not reached the metadata store yet, so it knows neither its role nor the leader\n"
                .into(),
        ),
        Some(standing) if standing.store_unreachable => (
            true,
            format!(
                "ready: {}; the metadata store has not answered for a lease term, so only blobs are served\n",
                standing.role
            ),
        ),
        Some(standing) => (true, format!("ready: {}\n", standing.role)),
        None => (true, "ready\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_coordinator::FarmRole;

    fn replica(role: FarmRole, store_unreachable: bool) -> FarmStanding {
        FarmStanding {
            role,
            joined: true,
            store_unreachable,
        }
    }

    #[test]
    fn a_process_is_ready_only_once_serving() {
        assert!(!readiness(false, None).0);
        assert_eq!(readiness(true, None), (true, "ready\n".into()));
    }

    #[test]
    fn a_farm_replica_is_ready_once_it_knows_its_role_and_says_it() {
        let (ready, body) = readiness(true, Some(&FarmStanding::default()));
        assert!(!ready);
        assert!(
            body.contains("has not reached the metadata store yet"),
            "{body}"
        );

        let leader = replica(FarmRole::Leader { epoch: 7 }, false);
        assert_eq!(
            readiness(true, Some(&leader)),
            (true, "ready: the farm's leader (epoch 7)\n".into())
        );
        let follower = FarmRole::Follower {
            epoch: 7,
            address: "http://10.0.0.7:8980".into(),
        };
        let (ready, body) = readiness(true, Some(&replica(follower.clone(), false)));
        assert!(ready);
        assert!(
            body.contains("follower of the leader at http://10.0.0.7:8980"),
            "{body}"
        );
        // A failover in progress: the stores are still served.
        assert!(readiness(true, Some(&replica(FarmRole::Unknown, false))).0);
        // Shutting down wins over the role.
        assert!(!readiness(false, Some(&leader)).0);
    }

    #[test]
    fn an_outage_of_the_shared_metadata_store_is_reported_but_keeps_the_replica_ready() {
        let follower = FarmRole::Follower {
            epoch: 7,
            address: "http://10.0.0.7:8980".into(),
        };
        let (ready, body) = readiness(true, Some(&replica(follower, true)));
        assert!(ready);
        assert!(body.contains("metadata store has not answered"), "{body}");
    }
}
