//! The worker loop: join the coordinator over `kiln.worker.v1.Workers/Connect`, run what
//! it assigns, report results and heartbeats, reconnect when it goes away, and drain on
//! shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::reapi;
use kiln_proto::worker::v1 as proto;
use kiln_proto::worker::v1::coordinator_message::Message as Inbound;
use kiln_proto::worker::v1::worker_message::Message as Outbound;
use kiln_proto::worker::v1::workers_client::WorkersClient;
use kiln_telemetry::{InStage, StageSpan};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::action_runner::ActionRunner;
use crate::cas_connection::CasConnection;
use crate::command_runner::{ProcessRunner, ResourceLimits, SandboxSettings};
use crate::container_image::{ImageSettings, ImageStore, CONTAINER_IMAGE_PROPERTY};
use crate::lease_messages::{action_request, lease_result, refusal};
use crate::local_cache::LocalCache;
use crate::{WorkerConfig, WorkerError};

/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a drained worker waits for the coordinator to close the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Register may wait for its answer: behind a load balancer, a coordinator that
/// is paused still has its connections accepted, and would hold the worker forever.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// With heartbeat acknowledgements on, a stream silent for this many heartbeat intervals
/// is taken for dead.
const SILENT_INTERVALS: u32 = 3;

/// Runs a worker until `shutdown` resolves (then drains: no new work, running actions
/// finish and report, within `drain_timeout_secs` if set) or the coordinator sends Drain.
/// Told to shut down while the coordinator is unreachable, it cancels what runs and ends.
/// Returns an error only for faults reconnecting cannot fix: bad configuration, or the
/// coordinator refusing the worker.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    run_reporting(config, shutdown, tokio::sync::watch::channel(false).0).await
}

/// [`run`], telling `registered` whether the worker is registered with the coordinator
/// right now: its `/readyz` answers from it.
pub async fn run_reporting(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
    registered: tokio::sync::watch::Sender<bool>,
) -> Result<(), WorkerError> {
    let mut worker = Worker::new(&config)?;
    tracing::info!(
        worker_id = %worker.worker_id,
        slots = worker.slots,
        bubblewrap = worker.sandboxed,
        sandbox = worker.sandbox,
        coordinator = %config.coordinator,
        "worker starting"
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = MIN_BACKOFF;
    loop {
        let session = worker.session(&mut shutdown, &registered).await;
        registered.send_replace(false);
        match session {
            Ok(()) => return Ok(()),
            Err(error @ (WorkerError::Rejected(_) | WorkerError::Config(_))) => return Err(error),
            Err(error) if worker.shutdown_seen => {
                worker.abandon(&error);
                return Ok(());
            }
            Err(error) => {
                if worker.registered_once {
                    backoff = MIN_BACKOFF;
                    worker.registered_once = false;
                }
                tracing::warn!(%error, retry_in = ?backoff, "lost the coordinator");
                if worker.wait_to_reconnect(backoff, &mut shutdown).await {
                    worker.abandon(&error);
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

struct Worker {
    worker_id: String,
    slots: usize,
    sandboxed: bool,
    /// How actions are confined, for the log.
    sandbox: &'static str,
    join_token: String,
    platform: reapi::Platform,
    heartbeat_interval: Duration,
    channel: Channel,
    runner: Arc<ActionRunner>,
    /// Leases in progress, by lease id.
    running: HashMap<String, CancellationToken>,
    /// Results of finished leases; they outlive a broken stream and go out on the next.
    results_tx: mpsc::UnboundedSender<proto::LeaseResult>,
    results_rx: mpsc::UnboundedReceiver<proto::LeaseResult>,
    draining: bool,
    shutdown_seen: bool,
    /// How long a drain on shutdown may last, and when the current one must end: past it,
    /// running actions are cancelled, so that their results still reach the coordinator.
    drain_timeout: Option<Duration>,
    drain_deadline: Option<tokio::time::Instant>,
    /// Set on each successful Register, so a worker that was connected retries quickly.
    registered_once: bool,
    /// The highest leader epoch an Assign has carried: in a farm, an Assign from a lower
    /// one comes from a deposed leader and is refused (the fencing token's check).
    leader_epoch: u64,
}

impl Worker {
    fn new(config: &WorkerConfig) -> Result<Self, WorkerError> {
        let worker_id = if config.worker_id.is_empty() {
            default_worker_id()
        } else {
            config.worker_id.clone()
        };
        let tls = config.client_tls()?;
        let endpoint = |url: String| {
            kiln_client::endpoint_with_tls(&url, &tls)
                .map(|e| e.connect_lazy())
                .map_err(|e| WorkerError::Config(format!("coordinator URL {url:?}: {e}")))
        };
        let channel = endpoint(config.coordinator_url())?;
        let cas_channel = match config.cas_url() {
            Some(url) => endpoint(url)?,
            None => channel.clone(),
        };
        // Resolved once: the sandbox and the action processes run in other directories,
        // so a relative work dir would name nothing there.
        let work_dir = std::path::absolute(&config.work_dir)
            .map_err(WorkerError::io("resolving the work directory"))?;
        let cache = LocalCache::open(work_dir.join("cache"), config.cache_bytes)?;
        let limits = ResourceLimits {
            open_files: config.max_open_files,
            memory_bytes: (config.max_memory_bytes > 0).then_some(config.max_memory_bytes),
            file_bytes: (config.max_file_bytes > 0).then_some(config.max_file_bytes),
            cpu_secs: (config.max_cpu_secs > 0).then_some(config.max_cpu_secs),
            processes: (config.max_processes > 0).then_some(config.max_processes),
            log_bytes: config.max_log_bytes,
        };
        let process_runner = ProcessRunner::new(
            limits,
            &SandboxSettings {
                mode: config.sandbox,
                uid_base: config.sandbox_uid_base,
            },
        )?;
        let sandboxed = process_runner.uses_bubblewrap();
        let sandbox = process_runner.sandbox_description();
        let mut runner = ActionRunner::new(
            CasConnection::new(cas_channel, &config.join_token),
            Arc::new(cache),
            Arc::new(process_runner),
            work_dir.join("actions"),
            worker_id.clone(),
            config.default_timeout(),
        )?;
        // Images need the sandbox: it is what puts their root in place of the host's.
        if sandboxed {
            let images = ImageStore::open(
                work_dir.join("images"),
                ImageSettings {
                    max_bytes: config.image_cache_bytes,
                    pull_timeout: Duration::from_secs(config.image_pull_timeout_secs),
                    auth_file: config.registry_auth_file.clone(),
                    tls: registry_tls(&tls),
                },
            )?;
            runner = runner.with_images(images);
        }
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        Ok(Worker {
            worker_id,
            slots: config.effective_slots(),
            sandboxed,
            sandbox,
            join_token: config.join_token.clone(),
            platform: reapi::Platform {
                properties: offered_platform(&config.platform, sandboxed)
                    .map(|(name, value)| reapi::platform::Property {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            },
            heartbeat_interval: config.heartbeat_interval(),
            channel,
            runner: Arc::new(runner),
            running: HashMap::new(),
            results_tx,
            results_rx,
            draining: false,
            shutdown_seen: false,
            drain_timeout: config.drain_timeout(),
            drain_deadline: None,
            registered_once: false,
            leader_epoch: 0,
        })
    }

    fn done(&self) -> bool {
        self.draining && self.running.is_empty() && self.results_rx.is_empty()
    }

    fn cache_summary(&self) -> proto::LocalCacheSummary {
        let summary = self.runner.cache().summary();
        proto::LocalCacheSummary {
            bytes: summary.bytes,
            blobs: summary.blobs,
            capacity_bytes: summary.capacity_bytes,
        }
    }

    fn heartbeat(&self) -> Outbound {
        Outbound::Heartbeat(proto::Heartbeat {
            running_lease_ids: self.running.keys().cloned().collect(),
            free_slots: if self.draining {
                0
            } else {
                self.slots.saturating_sub(self.running.len()) as u32
            },
            draining: self.draining,
            cache: Some(self.cache_summary()),
        })
    }

    fn start_draining(&mut self) {
        if !self.draining {
            tracing::info!(running = self.running.len(), "draining");
            self.draining = true;
        }
    }

    fn start_shutdown(&mut self) {
        self.shutdown_seen = true;
        self.drain_deadline = self
            .drain_timeout
            .map(|timeout| tokio::time::Instant::now() + timeout);
        self.start_draining();
    }

    /// Ends the worker without its coordinator: what still runs is cancelled, and the
    /// results nobody can receive are dropped (the coordinator requeues the leases of a
    /// worker that does not come back).
    fn abandon(&mut self, error: &WorkerError) {
        let leases: Vec<&String> = self.running.keys().collect();
        if leases.is_empty() {
            tracing::info!(%error, "shutting down without the coordinator");
        } else {
            tracing::warn!(%error, ?leases, "shutting down without the coordinator: abandoning these leases");
        }
        self.cancel_running();
    }

    fn cancel_running(&self) {
        for token in self.running.values() {
            token.cancel();
        }
    }

    /// One stream's life. `Ok` means the worker drained and is done.
    async fn session<S: Future<Output = ()>>(
        &mut self,
        shutdown: &mut Pin<&mut S>,
        registered: &tokio::sync::watch::Sender<bool>,
    ) -> Result<(), WorkerError> {
        let (outbox, receiver) = mpsc::channel::<proto::WorkerMessage>(64);
        let send = |message: Outbound| send_on(&outbox, message);
        send(Outbound::Register(proto::Register {
            worker_id: self.worker_id.clone(),
            platform: Some(self.platform.clone()),
            slots: self.slots as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            join_token: self.join_token.clone(),
            cache: Some(self.cache_summary()),
            running_lease_ids: self.running.keys().cloned().collect(),
        }))
        .await?;
        let register = async {
            let mut inbound = WorkersClient::new(self.channel.clone())
                .connect(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await?
                .into_inner();
            let first = inbound.message().await?;
            Ok::<_, tonic::Status>((inbound, first))
        };
        let (mut inbound, first) = tokio::time::timeout(REGISTER_TIMEOUT, register)
            .await
            .map_err(|_| {
                WorkerError::Protocol(format!(
                    "the coordinator did not answer Register within {REGISTER_TIMEOUT:?}"
                ))
            })?
            .map_err(WorkerError::rpc("Workers.Connect"))?;

        let mut heartbeat_interval = self.heartbeat_interval;
        let acks_heartbeats;
        match first {
            Some(proto::CoordinatorMessage {
                message: Some(Inbound::RegisterAck(ack)),
            }) => {
                acks_heartbeats = ack.acks_heartbeats;
                if let Some(interval) = ack.heartbeat_interval.and_then(|d| {
                    (d.seconds >= 0 && d.nanos >= 0)
                        .then(|| Duration::new(d.seconds as u64, d.nanos as u32))
                }) {
                    heartbeat_interval = interval.max(Duration::from_millis(10));
                }
            }
            Some(proto::CoordinatorMessage {
                message: Some(Inbound::Rejected(rejected)),
            }) => return Err(WorkerError::Rejected(rejected.reason)),
            other => {
                return Err(WorkerError::Protocol(format!(
                    "expected RegisterAck or Rejected, got {other:?}"
                )))
            }
        }
        self.registered_once = true;
        registered.send_replace(true);
        tracing::info!(worker_id = %self.worker_id, "registered with the coordinator");

        let mut heartbeats = tokio::time::interval(heartbeat_interval);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit = heartbeat_interval * SILENT_INTERVALS;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            if self.done() {
                send(self.heartbeat()).await?;
                // Closing our side and waiting for the coordinator to close its side makes
                // sure the last results were read; dropping the call would reset the stream.
                drop(outbox);
                let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                });
                if closed.await.is_err() {
                    tracing::warn!("the coordinator did not close the stream after the drain");
                }
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.as_mut(), if !self.shutdown_seen => {
                    self.start_shutdown();
                    send(self.heartbeat()).await?;
                }
                () = sleep_until(self.drain_deadline) => {
                    // Cancelled actions report at once, so the drain ends while the
                    // coordinator is still there to hear it.
                    tracing::warn!(running = self.running.len(), "the drain timeout passed: cancelling the actions still running");
                    self.drain_deadline = None;
                    self.cancel_running();
                }
                () = tokio::time::sleep_until(last_heard + silence_limit), if acks_heartbeats => {
                    return Err(WorkerError::Protocol(format!(
                        "nothing from the coordinator for {silence_limit:?}; reconnecting"
                    )));
                }
                message = inbound.message() => {
                    let message = message
                        .map_err(WorkerError::rpc("Workers.Connect"))?
                        .ok_or_else(|| WorkerError::Protocol("the coordinator ended the stream".into()))?;
                    last_heard = tokio::time::Instant::now();
                    match message.message {
                        Some(Inbound::Assign(assign)) => {
                            if let Some(refusal) = self.assign(assign) {
                                send(Outbound::Result(refusal)).await?;
                            }
                        }
                        Some(Inbound::Cancel(cancel)) => {
                            if let Some(token) = self.running.get(&cancel.lease_id) {
                                tracing::info!(lease_id = %cancel.lease_id, "cancelling");
                                token.cancel();
                            }
                        }
                        Some(Inbound::Drain(_)) => {
                            self.start_draining();
                            send(self.heartbeat()).await?;
                        }
                        Some(Inbound::HeartbeatAck(_)) => {}
                        Some(Inbound::RegisterAck(_) | Inbound::Rejected(_)) | None => {
                            tracing::warn!("ignoring an unexpected message from the coordinator");
                        }
                    }
                }
                Some(result) = self.results_rx.recv() => {
                    self.running.remove(&result.lease_id);
                    send(Outbound::Result(result)).await?;
                }
                _ = heartbeats.tick() => {
                    send(self.heartbeat()).await?;
                }
            }
        }
    }

    /// Starts an assigned action, or returns the result refusing it.
    fn assign(&mut self, assign: proto::Assign) -> Option<proto::LeaseResult> {
        let lease_id = assign.lease_id.clone();
        if self.running.contains_key(&lease_id) {
            tracing::warn!(%lease_id, "ignoring a repeated Assign");
            return None;
        }
        if assign.leader_epoch < self.leader_epoch {
            tracing::warn!(%lease_id, epoch = assign.leader_epoch, newest = self.leader_epoch, "refusing an Assign from a deposed leader");
            return Some(refusal(
                lease_id,
                WorkerError::StaleLeader {
                    epoch: assign.leader_epoch,
                    newest: self.leader_epoch,
                },
            ));
        }
        self.leader_epoch = assign.leader_epoch;
        if self.draining || self.running.len() >= self.slots {
            return Some(refusal(lease_id, WorkerError::NoFreeSlot));
        }
        let request = match action_request(&assign) {
            Ok(request) => request,
            Err(error) => return Some(refusal(lease_id, error)),
        };
        let cancel = CancellationToken::new();
        self.running.insert(lease_id.clone(), cancel.clone());
        let runner = self.runner.clone();
        let results = self.results_tx.clone();
        // The coordinator's Execute span is the parent: one action, one trace.
        let span = StageSpan::continuing(
            "action",
            &kiln_telemetry::propagation::TraceContext {
                traceparent: assign.traceparent,
                tracestate: assign.tracestate,
            },
        );
        if span.is_traced() {
            span.set_attribute("lease_id", lease_id.clone());
            span.set_attribute("action", request.action_digest.to_string());
        }
        tokio::spawn(async move {
            let outcome = async {
                let outcome = runner.run(&request, &cancel).await;
                if let Some(error) = &outcome.error {
                    let action = request.action_digest;
                    tracing::info!(%lease_id, %action, %error, "action did not complete");
                }
                outcome
            }
            .in_stage(&span)
            .await;
            span.end();
            // The receiver lives as long as the worker; nothing to do if it is gone.
            let _ = results.send(lease_result(lease_id, outcome));
        });
        None
    }

    /// Waits out a reconnect backoff. Returns true when shutdown arrives meanwhile: the
    /// worker then stops rather than reconnect, since the coordinator may never come back
    /// (`kiln up` stops its own) and finished leases leave `running` only once a stream
    /// takes their results, so waiting for it to empty could last forever.
    async fn wait_to_reconnect<S: Future<Output = ()>>(
        &mut self,
        backoff: Duration,
        shutdown: &mut Pin<&mut S>,
    ) -> bool {
        tokio::select! {
            () = tokio::time::sleep(backoff) => false,
            () = shutdown.as_mut() => {
                self.start_shutdown();
                true
            }
        }
    }
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn send_on(
    outbox: &mpsc::Sender<proto::WorkerMessage>,
    message: Outbound,
) -> Result<(), WorkerError> {
    outbox
        .send(proto::WorkerMessage {
            message: Some(message),
        })
        .await
        .map_err(|_| WorkerError::Protocol("the stream to the coordinator closed".into()))
}

/// `<hostname>-<8 hex digits>`: readable in status pages, unique across restarts.
fn default_worker_id() -> String {
    let host = kiln_telemetry::host_name().unwrap_or_else(|| "worker".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// The properties the worker offers: the configured ones, `network=on` (every worker
/// can give an action the network; the sandbox withholds it unless asked), and, when
/// sandboxed, `container-image=*` (any image).
fn offered_platform(
    configured: &[(String, String)],
    sandboxed: bool,
) -> impl Iterator<Item = (&str, &str)> {
    let unless_configured = |(name, value): (&'static str, &'static str)| {
        (!configured.iter().any(|(n, _)| n == name)).then_some((name, value))
    };
    let network = unless_configured(crate::action_platform::NETWORK_PROPERTY);
    let images = sandboxed
        .then(|| unless_configured((CONTAINER_IMAGE_PROPERTY, "*")))
        .flatten();
    configured
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .chain(network)
        .chain(images)
}

/// Registries serving images over HTTPS are trusted as the coordinator is: the worker's CA
/// (the system roots without one), and its client certificate for mutual TLS.
fn registry_tls(coordinator: &kiln_client::ClientTls) -> kiln_publish::RegistryTls {
    kiln_publish::RegistryTls {
        force_https: false,
        client: kiln_client::ClientTls {
            server_name: None,
            ..coordinator.clone()
        },
    }
}
