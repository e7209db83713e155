//! The coordinator's gRPC server: every service on one port.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::admin::v1::admin_server::AdminServer;
use kiln_proto::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::{
    action_cache_server::ActionCacheServer, capabilities_server::CapabilitiesServer,
    content_addressable_storage_server::ContentAddressableStorageServer,
    execution_server::ExecutionServer,
};
use kiln_proto::worker::v1::workers_server::WorkersServer;
use kiln_store::{BlobStore, MetadataStore};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::action_cache::ActionCacheService;
use crate::admin::{AdminService, RegistryCatalog};
use crate::auth::{Authenticator, RegistryBlobGuard, TokenStore};
use crate::byte_stream::ByteStreamService;
use crate::capabilities::CapabilitiesService;
use crate::cas::CasService;
use crate::config::{ACTION_CACHE_RECENT_BYTES, CONNECTION_WINDOW, STREAM_WINDOW};
use crate::counters::Counters;
use crate::execution::{
    ExecutionEngine, ExecutionService, InFlightInputs, OperationsService, WorkerService,
};
use crate::execution::{Executor, Member};
use crate::farm::{Election, LeaderLink, LinkTls, Standing as FarmStanding};
use crate::{CoordinatorConfig, CoordinatorError};

/// The services grpc.health.v1 reports on by name (besides the overall "").
const SERVICE_NAMES: &[&str] = &[
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Execution",
    "google.bytestream.ByteStream",
    "google.longrunning.Operations",
    "kiln.worker.v1.Workers",
    "kiln.admin.v1.Admin",
];

/// Larger HTTP/2 frames mean fewer frame headers and wake-ups per megabyte received.
const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Room in a gRPC message beyond the blobs it carries (digests, statuses, framing).
const MESSAGE_HEADROOM: usize = 4 << 20;
/// The smallest message limit, whatever the batch limit: FindMissingBlobs requests for
/// tens of thousands of digests are larger than a small batch.
const MIN_MESSAGE_LIMIT: usize = 16 << 20;

/// The coordinator: every REAPI service, the worker protocol, the admin API and gRPC
/// health, over one blob store and one metadata store.
pub struct Coordinator {
    config: Arc<CoordinatorConfig>,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
    registry: Option<Arc<dyn RegistryCatalog>>,
    in_flight_inputs: Arc<InFlightInputs>,
    /// Set: gRPC over TLS (`grpcs://`).
    tls: Option<Arc<kiln_tls::rustls::ServerConfig>>,
    /// The files behind `tls`: a farm replica presents the same certificate to its leader.
    tls_files: Option<kiln_tls::TlsFiles>,
    /// A farm replica's standing, published for `/readyz` (see [`Self::standing`]).
    standing: watch::Sender<FarmStanding>,
}

impl Coordinator {
    pub fn new(
        config: CoordinatorConfig,
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
    ) -> Self {
        Coordinator {
            config: Arc::new(config),
            blobs,
            metadata,
            registry: None,
            in_flight_inputs: Arc::default(),
            tls: None,
            tls_files: None,
            standing: watch::channel(FarmStanding::default()).0,
        }
    }

    /// A farm replica's role and whether it reaches the metadata store, after each
    /// election round. Only a farm replica (`coordinator.farm.enabled`) publishes it.
    pub fn standing(&self) -> watch::Receiver<FarmStanding> {
        self.standing.subscribe()
    }

    /// Lets the admin API list a registry that runs in the same process.
    /// The inputs of the operations this coordinator has yet to finish, for a bounded
    /// blob store to keep (`BoundedBlobStore::retain`).
    pub fn in_flight_inputs(&self) -> Arc<InFlightInputs> {
        self.in_flight_inputs.clone()
    }

    /// Serves gRPC over TLS with these files (certificates reload as they change).
    pub fn with_tls(mut self, files: &kiln_tls::TlsFiles) -> Result<Self, CoordinatorError> {
        let config = kiln_tls::server_config(files, &[b"h2"])
            .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
        self.tls = Some(config);
        self.tls_files = Some(files.clone());
        Ok(self)
    }

    pub fn with_registry_catalog(mut self, registry: Arc<dyn RegistryCatalog>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Serves every service on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), CoordinatorError> {
        let limit = self.message_limit();
        let config = self.config.clone();
        let tokens = TokenStore::new(self.metadata.clone(), &config.auth.tokens)
            .map_err(|e| CoordinatorError::InvalidArgument(format!("coordinator.auth: {e}")))?;
        let authenticator = Authenticator::new(
            tokens.clone(),
            config.auth.enabled,
            config.join_token.clone(),
            &config.auth.client_certificates,
            &config.auth.anonymous_scopes,
        )
        .map_err(|e| CoordinatorError::InvalidArgument(format!("coordinator.auth: {e}")))?
        .trusting_replicas_named(self.replica_name(&config));
        let counters = Arc::new(Counters::default());
        let capabilities = CapabilitiesServer::new(CapabilitiesService::new(&config));
        let registry_blobs = RegistryBlobGuard::new(self.registry.clone());
        let cas = ContentAddressableStorageServer::new(CasService::new(
            self.blobs.clone(),
            config.clone(),
            counters.clone(),
            registry_blobs.clone(),
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
        let action_cache_service = Arc::new(ActionCacheService::new(
            self.blobs.clone(),
            kiln_store::ActionCache::new(self.metadata.clone()).keeping_recent(
                Duration::from_millis(config.action_cache_recent_ms),
                ACTION_CACHE_RECENT_BYTES,
            ),
            config.clone(),
            counters.clone(),
        ));
        // Set when shutdown starts: the tasks below stop, and the engine closes.
        let (stopping, stopped) = watch::channel(false);
        let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let (executor, engine_task) = if config.farm.enabled {
            self.join_farm(
                &config,
                action_cache_service.clone(),
                counters.clone(),
                limit,
                &stopped,
            )?
        } else {
            let engine = ExecutionEngine::open(
                &config,
                self.blobs.clone(),
                self.metadata.clone(),
                action_cache_service.clone(),
                counters.clone(),
                None,
            )
            .await?;
            self.in_flight_inputs.attach(&engine);
            let dispatcher = engine.spawn_dispatcher();
            (Executor::Alone(engine), dispatcher)
        };
        let sweeper = crate::upload_sweeper::spawn(
            self.blobs.clone(),
            std::time::Duration::from_secs(config.upload_ttl_secs),
            until_stopped(stopped.clone()),
        );
        crate::action_cache::trimming::trim_once(
            &action_cache_service.results(),
            config.max_action_cache_entries,
        )
        .await;
        let trimmer = crate::action_cache::trimming::spawn(
            action_cache_service.results(),
            config.max_action_cache_entries,
            until_stopped(stopped),
        );
        let closing = executor.clone();
        // grpc.health.v1: the overall service ("") is SERVING from here on, as are the
        // named services; all turn NOT_SERVING as soon as shutdown starts, so that load
        // balancers stop sending work while streams wind down.
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in SERVICE_NAMES {
            health
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // Worker and operation streams never end on their own; end them on shutdown so
        // that the graceful shutdown below completes.
        let shutdown = async move {
            shutdown.await;
            for name in SERVICE_NAMES.iter().chain([&""]) {
                health
                    .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            stopping.send_replace(true);
            // A farm's engine is closed by its keeper, once the lease is given up.
            if let Executor::Alone(engine) = closing {
                engine.close();
            }
        };
        let admin = AdminServer::new(AdminService::new(
            executor.clone(),
            config.join_token.clone(),
            counters.clone(),
            self.blobs.clone(),
            self.registry,
            tokens,
        ));
        let action_cache = ActionCacheServer::from_arc(action_cache_service)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let execution = ExecutionServer::new(ExecutionService::new(executor.clone()));
        let operations = OperationsServer::new(OperationsService::new(executor.clone()));
        let workers = WorkersServer::new(WorkerService::new(executor))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let byte_stream = ByteStreamServer::new(ByteStreamService::new(
            self.blobs,
            config.clone(),
            counters,
            registry_blobs,
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

        let router = Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(Some(config.max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(config.keepalive_interval_secs)))
            .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout_secs)))
            .layer(kiln_telemetry::GrpcServerTraceLayer)
            .layer(authenticator)
            .add_service(capabilities)
            .add_service(cas)
            .add_service(action_cache)
            .add_service(byte_stream)
            .add_service(execution)
            .add_service(operations)
            .add_service(workers)
            .add_service(admin)
            .add_service(health_service);
        // kiln-tls's listeners set TCP_NODELAY (Nagle's algorithm would hold a small
        // unary response back until the client's delayed ACK) and cap connections per
        // client address.
        let limit = kiln_tls::ConnectionLimit::new(config.max_connections_per_address);
        let listening = |e: std::io::Error| CoordinatorError::Internal(format!("listener: {e}"));
        match self.tls {
            Some(tls) => {
                let listener =
                    kiln_tls::TlsListener::new(listener, tls, limit).map_err(listening)?;
                router
                    .serve_with_incoming_shutdown(listener.into_stream(), shutdown)
                    .await?
            }
            None => {
                let listener = kiln_tls::PlainListener::new(listener, limit).map_err(listening)?;
                router
                    .serve_with_incoming_shutdown(listener.into_stream(), shutdown)
                    .await?
            }
        }
        // The dispatcher (or the farm's keeper), the sweeper and the trimmer hold the
        // stores; they are released once all have stopped.
        let _ = engine_task.await;
        let _ = sweeper.await;
        let _ = trimmer.await;
        Ok(())
    }

    /// Joins the farm on the shared metadata store: an election task, and a keeper that
    /// runs an engine while this replica leads. The returned task ends once shutdown has
    /// given the lease up and closed the engine.
    fn join_farm(
        &self,
        config: &CoordinatorConfig,
        action_cache: Arc<ActionCacheService>,
        counters: Arc<Counters>,
        message_limit: usize,
        stopped: &watch::Receiver<bool>,
    ) -> Result<(Executor, tokio::task::JoinHandle<()>), CoordinatorError> {
        let farm = &config.farm;
        if farm.advertise_url.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "coordinator.farm.advertise_url is needed: the other replicas forward to it".into(),
            ));
        }
        let term = Duration::from_secs(farm.lease_term_secs.max(1));
        let (election, role) =
            Election::new(self.metadata.clone(), farm.advertise_url.clone(), term);
        let link = LeaderLink::new(LinkTls {
            ca_file: farm.ca_file.clone(),
            server_name: farm.server_name.clone(),
            identity: self
                .tls_files
                .as_ref()
                .map(|files| (files.cert.clone(), files.key.clone())),
        });
        let member = Member::new(role, link, message_limit, stopped.clone());
        let (tenures, tenure) = watch::channel(None);
        let mut election_stops = stopped.clone();
        let election = tokio::spawn(election.run(
            async move {
                let _ = election_stops.wait_for(|stop| *stop).await;
            },
            tenures,
            self.standing.clone(),
        ));
        let (config, blobs, metadata, inputs) = (
            config.clone(),
            self.blobs.clone(),
            self.metadata.clone(),
            self.in_flight_inputs.clone(),
        );
        let open = move |tenure| {
            let (config, blobs, metadata, action_cache, counters, inputs) = (
                config.clone(),
                blobs.clone(),
                metadata.clone(),
                action_cache.clone(),
                counters.clone(),
                inputs.clone(),
            );
            Box::pin(async move {
                let engine = ExecutionEngine::open(
                    &config,
                    blobs,
                    metadata,
                    action_cache,
                    counters,
                    Some(tenure),
                )
                .await?;
                inputs.attach(&engine);
                Ok(engine)
            }) as futures::future::BoxFuture<'static, _>
        };
        let keeper = tokio::spawn(member.clone().keep_engine(tenure, open, stopped.clone()));
        let task = tokio::spawn(async move {
            let _ = election.await;
            let _ = keeper.await;
        });
        Ok((Executor::Farm(member), task))
    }

    /// A farm replica's own certificate CN, which the other replicas present when they
    /// forward a call (see `Authenticator::trusting_replicas_named`).
    fn replica_name(&self, config: &CoordinatorConfig) -> Option<String> {
        let files = self.tls_files.as_ref().filter(|_| config.farm.enabled)?;
        let pem = std::fs::read(&files.cert).ok()?;
        crate::auth::common_name_in_pem(&pem)
    }

    /// The largest gRPC message accepted or sent: a full batch or a fully inlined
    /// action result, plus headroom.
    fn message_limit(&self) -> usize {
        let largest_payload = self
            .config
            .max_batch_total_size_bytes
            .max(self.config.max_inline_bytes);
        usize::try_from(largest_payload)
            .unwrap_or(usize::MAX)
            .max(MIN_MESSAGE_LIMIT)
            .saturating_add(MESSAGE_HEADROOM)
    }
}
