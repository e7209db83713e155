//! What the coordinator has done since it started, counted twice over: as Prometheus
//! metrics for `/metrics` (through the `metrics` facade, so a process without a recorder
//! pays almost nothing) and as plain atomics that the admin API reports to `kiln status`,
//! which cannot read the recorder back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::ExecutedActionMetadata;

/// Every metric the coordinator publishes, named once.
pub mod names {
    /// Action-cache lookups by `result` (`hit` | `miss`), from GetActionResult and from
    /// Execute's own lookup.
    pub const ACTION_CACHE_REQUESTS: &str = "kiln_action_cache_requests_total";
    /// Actions that ran on a worker and finished, by `outcome` (`success`: exit code 0;
    /// `failure`: ran, non-zero exit; `error`: did not run to completion).
    pub const ACTIONS_FINISHED: &str = "kiln_actions_finished_total";
    /// Seconds per action `stage`: `queue` (queued to assigned), `fetch`, `execute`,
    /// `upload` (the worker's input fetch, execution and output upload).
    pub const ACTION_STAGE_SECONDS: &str = "kiln_action_stage_seconds";
    /// Blob bytes the CAS served (ByteStream Read, BatchReadBlobs), uncompressed.
    pub const CAS_BYTES_READ: &str = "kiln_cas_bytes_read_total";
    /// Blob bytes the CAS stored (ByteStream Write, BatchUpdateBlobs), uncompressed.
    pub const CAS_BYTES_WRITTEN: &str = "kiln_cas_bytes_written_total";
    /// Actions waiting for a worker, by required `platform`: the autoscaling signal.
    pub const QUEUE_DEPTH: &str = "kiln_queue_depth";
    /// Actions waiting for a worker, all platforms together.
    pub const ACTIONS_QUEUED: &str = "kiln_actions_queued";
    /// Workers connected to the pool.
    pub const WORKERS_CONNECTED: &str = "kiln_workers_connected";
    /// Worker slots by `state`: `busy` (running an action) or `idle`.
    pub const WORKER_SLOTS: &str = "kiln_worker_slots";
    /// A farm replica: 1 while it leads the farm's scheduling, 0 otherwise.
    pub const FARM_LEADER: &str = "kiln_farm_leader";
    /// A farm replica: the newest leader epoch (fencing token) it has seen.
    pub const FARM_EPOCH: &str = "kiln_farm_epoch";
}

/// Registers help text for every coordinator metric with the installed recorder, so
/// that `/metrics` explains itself. Call once, after installing the recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::ACTION_CACHE_REQUESTS,
        "Action-cache lookups by result (hit or miss), from GetActionResult and Execute"
    );
    describe_counter!(
        names::ACTIONS_FINISHED,
        "Actions that came back from a worker, by outcome (success, failure, error)"
    );
    describe_histogram!(
        names::ACTION_STAGE_SECONDS,
        Unit::Seconds,
        "Time per action stage: queue, fetch, execute, upload"
    );
    describe_counter!(
        names::CAS_BYTES_READ,
        Unit::Bytes,
        "Blob bytes served by the CAS, uncompressed"
    );
    describe_counter!(
        names::CAS_BYTES_WRITTEN,
        Unit::Bytes,
        "Blob bytes stored by the CAS, uncompressed"
    );
    describe_gauge!(
        names::QUEUE_DEPTH,
        "Actions waiting for a worker, per required platform"
    );
    describe_gauge!(names::ACTIONS_QUEUED, "Actions waiting for a worker");
    describe_gauge!(names::WORKERS_CONNECTED, "Workers connected to the pool");
    describe_gauge!(names::WORKER_SLOTS, "Worker slots by state (busy, idle)");
    describe_gauge!(
        names::FARM_LEADER,
        "A farm replica: 1 while it leads the farm's scheduling, 0 otherwise"
    );
    describe_gauge!(
        names::FARM_EPOCH,
        "A farm replica: the newest leader epoch (fencing token) it has seen"
    );
}

/// Buckets for [`names::ACTION_STAGE_SECONDS`]: 1 ms to about 17 minutes.
pub const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    180.0, 600.0, 1000.0,
];

/// How a finished action ended, for [`names::ACTIONS_FINISHED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Error => "error",
        }
    }
}

/// Shared by every service of one coordinator.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    action_cache_hits: AtomicU64,
    action_cache_misses: AtomicU64,
    actions_succeeded: AtomicU64,
    actions_failed: AtomicU64,
    cas_bytes_read: AtomicU64,
    cas_bytes_written: AtomicU64,
}

/// A reading of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CounterSnapshot {
    pub action_cache_hits: u64,
    pub action_cache_misses: u64,
    pub actions_succeeded: u64,
    pub actions_failed: u64,
    pub cas_bytes_read: u64,
    pub cas_bytes_written: u64,
}

impl Counters {
    pub(crate) fn action_cache_lookup(&self, hit: bool) {
        let (counter, result) = if hit {
            (&self.action_cache_hits, "hit")
        } else {
            (&self.action_cache_misses, "miss")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::ACTION_CACHE_REQUESTS, "result" => result).increment(1);
    }

    pub(crate) fn cas_read(&self, bytes: u64) {
        self.cas_bytes_read.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(names::CAS_BYTES_READ).increment(bytes);
    }

    pub(crate) fn cas_written(&self, bytes: u64) {
        self.cas_bytes_written.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(names::CAS_BYTES_WRITTEN).increment(bytes);
    }

    /// An assignment: the action waited `waited` in the queue.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        record_stage("queue", waited);
    }

    /// A worker's result, with the stage timestamps the worker recorded (on its own
    /// clock: only differences between them are used).
    pub(crate) fn action_finished(
        &self,
        outcome: Outcome,
        metadata: Option<&ExecutedActionMetadata>,
    ) {
        match outcome {
            Outcome::Success => &self.actions_succeeded,
            Outcome::Failure | Outcome::Error => &self.actions_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::ACTIONS_FINISHED, "outcome" => outcome.label()).increment(1);
        let Some(m) = metadata else { return };
        let stages = [
            (
                "fetch",
                &m.input_fetch_start_timestamp,
                &m.input_fetch_completed_timestamp,
            ),
            (
                "execute",
                &m.execution_start_timestamp,
                &m.execution_completed_timestamp,
            ),
            (
                "upload",
                &m.output_upload_start_timestamp,
                &m.output_upload_completed_timestamp,
            ),
        ];
        for (stage, start, end) in stages {
            if let Some(took) = between(start.as_ref(), end.as_ref()) {
                record_stage(stage, took);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            action_cache_hits: read(&self.action_cache_hits),
            action_cache_misses: read(&self.action_cache_misses),
            actions_succeeded: read(&self.actions_succeeded),
            actions_failed: read(&self.actions_failed),
            cas_bytes_read: read(&self.cas_bytes_read),
            cas_bytes_written: read(&self.cas_bytes_written),
        }
    }
}

fn record_stage(stage: &'static str, took: Duration) {
    metrics::histogram!(names::ACTION_STAGE_SECONDS, "stage" => stage).record(took.as_secs_f64());
}

/// `end - start`, when both are set and in order.
fn between(start: Option<&Timestamp>, end: Option<&Timestamp>) -> Option<Duration> {
    let nanos = |t: &Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let diff = nanos(end?) - nanos(start?);
    u64::try_from(diff).ok().map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    #[test]
    fn stage_durations_come_from_timestamp_differences() {
        assert_eq!(
            between(at(10, 900_000_000).as_ref(), at(11, 100_000_000).as_ref()),
            Some(Duration::from_millis(200))
        );
        assert_eq!(between(at(11, 0).as_ref(), at(10, 0).as_ref()), None);
        assert_eq!(between(None, at(10, 0).as_ref()), None);
    }

    #[test]
    fn the_snapshot_reads_what_was_counted() {
        let counters = Counters::default();
        counters.action_cache_lookup(true);
        counters.action_cache_lookup(false);
        counters.action_cache_lookup(false);
        counters.cas_read(10);
        counters.cas_written(7);
        counters.action_finished(Outcome::Success, None);
        counters.action_finished(Outcome::Error, None);
        let snapshot = counters.snapshot();
        assert_eq!(
            snapshot,
            CounterSnapshot {
                action_cache_hits: 1,
                action_cache_misses: 2,
                actions_succeeded: 1,
                actions_failed: 1,
                cas_bytes_read: 10,
                cas_bytes_written: 7,
            }
        );
    }
}
