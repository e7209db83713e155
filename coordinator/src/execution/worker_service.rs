//! `kiln.worker.v1.Workers/Connect`: one bidirectional stream per worker.
//!
//! The first message must be a Register carrying the join token; anything else, or a
//! wrong token, is answered with Rejected and the stream ends. While the stream lives,
//! heartbeats keep the worker's leases and results complete them. When the worker's side
//! ends, the coordinator ends its side too and requeues whatever the worker held.

use futures::stream::BoxStream;
use futures::StreamExt;
use kiln_proto::worker::v1::{
    coordinator_message, worker_message, workers_server::Workers, CoordinatorMessage, HeartbeatAck,
    Register, RegisterAck, Rejected, WorkerMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use std::time::Instant;

use super::{proto_duration, ExecutionEngine, WorkerConnection, WorkerDetails};
use super::{Executor, Route};
use crate::client_stream::next_within;
use crate::scheduler::Platform;
use crate::secret::same_secret;

pub(crate) struct WorkerService {
    executor: Executor,
}

impl WorkerService {
    pub(crate) fn new(executor: Executor) -> Self {
        WorkerService { executor }
    }
}

type CoordinatorStream = BoxStream<'static, Result<CoordinatorMessage, Status>>;

fn message(message: coordinator_message::Message) -> Result<CoordinatorMessage, Status> {
    Ok(CoordinatorMessage {
        message: Some(message),
    })
}

#[tonic::async_trait]
impl Workers for WorkerService {
    type ConnectStream = CoordinatorStream;

    #[tracing::instrument(skip_all, name = "Workers/Connect")]
    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.connect(request).await,
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let replied = |rx| Ok(Response::new(UnboundedReceiverStream::new(rx).boxed()));
        let first = next_within(
            &mut inbound,
            engine.inner.register_timeout,
            "Workers/Connect (waiting for Register)",
        )
        .await?;
        let register = match first {
            Some(WorkerMessage {
                message: Some(worker_message::Message::Register(register)),
            }) => register,
            _ => {
                let _ = tx.send(message(coordinator_message::Message::Rejected(Rejected {
                    reason: "the first message on a worker stream must be Register".into(),
                })));
                return replied(rx);
            }
        };
        if let Some(reason) = refusal(&engine, &register) {
            tracing::warn!(worker = %register.worker_id, %reason, "refused a worker");
            let _ = tx.send(message(coordinator_message::Message::Rejected(Rejected {
                reason,
            })));
            return replied(rx);
        }

        let worker = register.worker_id.clone();
        let platform = Platform::new(register.platform.iter().flat_map(|p| {
            p.properties
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
        }));
        let interval = engine.inner.heartbeat_interval;
        let _ = tx.send(message(coordinator_message::Message::RegisterAck(
            RegisterAck {
                heartbeat_interval: Some(proto_duration(interval)),
                acks_heartbeats: true,
            },
        )));
        tracing::info!(%worker, %platform, slots = register.slots, version = %register.version, "worker joined");
        let details = WorkerDetails {
            version: register.version.clone(),
            connected_at: std::time::SystemTime::now(),
            cache_bytes: register.cache.as_ref().map_or(0, |c| c.bytes),
        };
        // Weak: the engine's sender is what keeps the stream open, and a worker it drops
        // (silent for too long) must see its stream end, not go on being acknowledged.
        let acks = tx.downgrade();
        let connection =
            engine.connect_worker(&worker, platform, register.slots as usize, tx, details);

        let closed = engine.closed();
        tokio::spawn(async move {
            let mut closed = std::pin::pin!(closed);
            loop {
                let incoming = tokio::select! {
                    incoming = inbound.next() => incoming,
                    // Shutting down: let go of the stream without counting lost leases.
                    () = &mut closed => return,
                };
                let Some(Ok(incoming)) = incoming else { break };
                match incoming.message {
                    Some(worker_message::Message::Heartbeat(beat)) => {
                        engine.heartbeat(&worker, beat.draining, beat.cache.map(|c| c.bytes));
                        if let Some(acks) = acks.upgrade() {
                            let _ = acks.send(message(coordinator_message::Message::HeartbeatAck(
                                HeartbeatAck {},
                            )));
                        }
                    }
                    Some(worker_message::Message::Result(result)) => {
                        engine.heartbeat(&worker, false, None);
                        engine.complete_lease(
                            &worker,
                            &result.lease_id,
                            result.action_result,
                            result.status,
                        );
                    }
                    Some(worker_message::Message::Register(_)) | None => {}
                }
            }
            tracing::info!(%worker, "worker left");
            engine.disconnect_worker(&worker, connection);
        });
        replied(rx)
    }
}

fn refusal(engine: &ExecutionEngine, register: &Register) -> Option<String> {
    if register.worker_id.is_empty() {
        return Some("worker_id is empty".into());
    }
    if register.slots == 0 {
        return Some("slots must be at least 1".into());
    }
    match engine.join_token() {
        Some(expected) if !same_secret(expected, &register.join_token) => {
            Some("wrong join token".into())
        }
        None => Some("this coordinator accepts no workers (no join token is configured)".into()),
        _ => None,
    }
}

/// The pool's side of the engine: workers joining, leaving and reporting in.
impl ExecutionEngine {
    /// Adds a worker and its stream; returns the connection id its clean-up must name.
    pub(super) fn connect_worker(
        &self,
        worker: &str,
        platform: Platform,
        slots: usize,
        outbound: mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
        details: WorkerDetails,
    ) -> u64 {
        let mut state = self.state();
        state.next_connection += 1;
        let id = state.next_connection;
        let lost = state
            .scheduler
            .add_worker(worker.to_string(), platform, slots, Instant::now());
        state.workers.insert(
            worker.to_string(),
            WorkerConnection {
                id,
                outbound,
                details,
            },
        );
        self.handle_lost_leases(&mut state, lost);
        // Pool membership shows on /metrics at once; the rest waits for the tick.
        state.publish_gauges();
        id
    }

    /// Removes a worker whose stream `connection` ended, unless it has reconnected since.
    pub(super) fn disconnect_worker(&self, worker: &str, connection: u64) {
        let mut state = self.state();
        if state.workers.get(worker).map(|c| c.id) != Some(connection) {
            return;
        }
        // Dropping the sender ends our side of the stream.
        state.workers.remove(worker);
        let lost = state.scheduler.remove_worker(worker);
        self.handle_lost_leases(&mut state, lost);
        state.publish_gauges();
    }

    /// `cache_bytes` is the worker's local cache size when the message reported it.
    pub(super) fn heartbeat(&self, worker: &str, draining: bool, cache_bytes: Option<u64>) {
        let mut state = self.state();
        state.scheduler.heartbeat(worker, Instant::now());
        if let (Some(bytes), Some(connection)) = (cache_bytes, state.workers.get_mut(worker)) {
            connection.details.cache_bytes = bytes;
        }
        if draining {
            // Stop offering it work now rather than have it refuse each Assign.
            state.scheduler.drain_worker(worker);
        }
    }
}
