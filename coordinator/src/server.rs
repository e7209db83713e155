//! The coordinator's gRPC server: every service on one port.

use std::future::Future;
use std::sync::Arc;

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
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::action_cache::ActionCacheService;
use crate::byte_stream::ByteStreamService;
use crate::capabilities::CapabilitiesService;
use crate::cas::CasService;
use crate::execution::{ExecutionEngine, ExecutionService, OperationsService, WorkerService};
use crate::{CoordinatorConfig, CoordinatorError};

/// HTTP/2 flow-control windows. The defaults (64 KiB) cap a single stream at a few
/// hundred MB/s even on loopback; large windows let one ByteStream call run at disk and
/// hash speed. Memory stays bounded because tonic reads a stream only as fast as the
/// handler consumes it.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Larger HTTP/2 frames mean fewer frame headers and wake-ups per megabyte received.
const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Room in a gRPC message beyond the blobs it carries (digests, statuses, framing).
const MESSAGE_HEADROOM: usize = 4 << 20;
/// The smallest message limit, whatever the batch limit: FindMissingBlobs requests for
/// tens of thousands of digests are larger than a small batch.
const MIN_MESSAGE_LIMIT: usize = 16 << 20;

/// The coordinator: REAPI's Capabilities, ContentAddressableStorage, ActionCache and
/// ByteStream services over one blob store and one metadata store.
pub struct Coordinator {
    config: Arc<CoordinatorConfig>,
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
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
        }
    }

    /// Serves every service on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), CoordinatorError> {
        let limit = self.message_limit();
        let config = self.config;
        let capabilities = CapabilitiesServer::new(CapabilitiesService::new(&config));
        let cas = ContentAddressableStorageServer::new(CasService::new(
            self.blobs.clone(),
            config.clone(),
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
        let action_cache_service = Arc::new(ActionCacheService::new(
            self.blobs.clone(),
            kiln_store::ActionCache::new(self.metadata.clone()),
            config.clone(),
        ));
        let engine = ExecutionEngine::open(
            &config,
            self.blobs.clone(),
            self.metadata.clone(),
            action_cache_service.clone(),
        )?;
        let dispatcher = engine.spawn_dispatcher();
        let closing = engine.clone();
        // Worker and operation streams never end on their own; end them on shutdown so
        // that the graceful shutdown below completes.
        let shutdown = async move {
            shutdown.await;
            closing.close();
        };
        let action_cache = ActionCacheServer::from_arc(action_cache_service)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let execution = ExecutionServer::new(ExecutionService::new(engine.clone()));
        let operations = OperationsServer::new(OperationsService::new(engine.clone()));
        let workers = WorkersServer::new(WorkerService::new(engine))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let byte_stream = ByteStreamServer::new(ByteStreamService::new(self.blobs, config))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);

        // tonic applies `tcp_nodelay` only to listeners it binds itself; on a listener
        // handed in, TcpIncoming sets it. Without it, Nagle's algorithm can hold a small
        // unary response back until the client's delayed ACK.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .add_service(capabilities)
            .add_service(cas)
            .add_service(action_cache)
            .add_service(byte_stream)
            .add_service(execution)
            .add_service(operations)
            .add_service(workers)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        // The dispatcher holds the stores; they are released once it has stopped.
        let _ = dispatcher.await;
        Ok(())
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
