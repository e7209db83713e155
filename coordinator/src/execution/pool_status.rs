//! The worker pool and the queue as the admin API shows them, and the one change an
//! operator makes to the pool: draining a worker.

use std::time::{Instant, SystemTime};

use kiln_proto::admin::v1::{PlatformQueue, QueueStatus, WorkerStatus};
use kiln_proto::reapi::{platform, Platform as ReapiPlatform};
use kiln_proto::worker::v1::{coordinator_message, CoordinatorMessage, Drain};

use super::operation::{timestamp_from_nanos, unix_nanos};
use super::ExecutionEngine;
use crate::CoordinatorError;

/// What the Workers service learns about a worker beyond what scheduling needs.
#[derive(Clone, Debug)]
pub(crate) struct WorkerDetails {
    pub version: String,
    pub connected_at: SystemTime,
    /// The worker's local blob cache, from Register and then each heartbeat.
    pub cache_bytes: u64,
}

impl ExecutionEngine {
    pub(crate) fn worker_statuses(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let state = self.state();
        state
            .scheduler
            .workers(now)
            .into_iter()
            .map(|worker| {
                let details = state.workers.get(&worker.id).map(|c| &c.details);
                let last_heartbeat = wall_now - worker.since_heartbeat;
                WorkerStatus {
                    platform: Some(ReapiPlatform {
                        properties: worker
                            .platform
                            .pairs()
                            .map(|(name, value)| platform::Property {
                                name: name.to_string(),
                                value: value.to_string(),
                            })
                            .collect(),
                    }),
                    slots: worker.slots as u32,
                    running: worker.running as u32,
                    draining: worker.draining,
                    last_heartbeat: Some(timestamp_from_nanos(unix_nanos(last_heartbeat))),
                    connected_at: details.map(|d| timestamp_from_nanos(unix_nanos(d.connected_at))),
                    version: details.map(|d| d.version.clone()).unwrap_or_default(),
                    cache_bytes: details.map_or(0, |d| d.cache_bytes),
                    id: worker.id,
                }
            })
            .collect()
    }

    pub(crate) fn queue_status(&self) -> QueueStatus {
        let state = self.state();
        QueueStatus {
            queued: state.scheduler.queue_depth() as u64,
            running: state.scheduler.running() as u64,
            platforms: state
                .scheduler
                .queue_depth_by_platform()
                .into_iter()
                .map(|(platform, queued)| PlatformQueue {
                    platform,
                    queued: queued as u64,
                })
                .collect(),
        }
    }

    /// Gives the worker no new work and tells it to drain: it finishes its leases and
    /// disconnects. Returns how many leases it still holds.
    pub(crate) fn drain_worker(&self, worker: &str) -> Result<usize, CoordinatorError> {
        let mut state = self.state();
        let Some(connection) = state.workers.get(worker) else {
            return Err(CoordinatorError::NotFound(format!(
                "no worker {worker:?} is connected"
            )));
        };
        let _ = connection.outbound.send(Ok(CoordinatorMessage {
            message: Some(coordinator_message::Message::Drain(Drain {})),
        }));
        let running = state.scheduler.drain_worker(worker).unwrap_or(0);
        tracing::info!(%worker, running, "draining a worker on request");
        Ok(running)
    }
}
