//! The ByteStream service: streamed reads and resumable writes of CAS blobs, optionally
//! zstd-compressed on the wire.
//!
//! Writes are resumable: each upload is kept in the blob store under an id derived from
//! its resource name, so a broken stream leaves its data behind and a new `Write` that
//! starts at QueryWriteStatus's `committed_size` continues it, even after a restart.
//! Compressed uploads resume too: REAPI measures the first `write_offset` of a stream in
//! uncompressed bytes, and each stream carries its own zstd frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use kiln_store::{BlobStore, BlobWriter, Digest, ExpectedDigest};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{authorize, caller_of, RegistryBlobGuard, Scope};
use crate::client_stream::next_within;
use crate::counters::Counters;
use crate::rpc_attributes;
use crate::zstd_codec::{self, StreamingDecoder};
use crate::{CoordinatorConfig, CoordinatorError};
use kiln_store::{Compression, ResourceName};

/// How often QueryWriteStatus looks for a Write that is opening the same upload.
const LIVE_UPLOAD_POLL: std::time::Duration = std::time::Duration::from_millis(10);

pub(crate) struct ByteStreamService {
    blobs: Arc<dyn BlobStore>,
    config: Arc<CoordinatorConfig>,
    counters: Arc<Counters>,
    /// Bytes accepted so far by the uploads being received right now, so that
    /// QueryWriteStatus answers without waiting for an active writer.
    live_uploads: Arc<DashMap<String, Arc<AtomicU64>>>,
    registry_blobs: RegistryBlobGuard,
}

/// The blob store's name for an upload: one per instance, client uuid and blob, in the
/// store's `[A-Za-z0-9_-]` alphabet whatever the client's uuid looks like.
fn upload_id(name: &ResourceName) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [
        name.instance_name.as_bytes(),
        name.upload_uuid.as_deref().unwrap_or_default().as_bytes(),
        name.digest.function.name().as_bytes(),
        &name.digest.hash,
        &name.digest.size.to_le_bytes(),
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().to_hex().to_string()
}

/// Registers an upload's progress for QueryWriteStatus while its stream is open.
struct LiveUpload {
    uploads: Arc<DashMap<String, Arc<AtomicU64>>>,
    id: String,
    committed: Arc<AtomicU64>,
}

impl LiveUpload {
    fn new(uploads: Arc<DashMap<String, Arc<AtomicU64>>>, id: String, committed: u64) -> Self {
        let committed = Arc::new(AtomicU64::new(committed));
        uploads.insert(id.clone(), committed.clone());
        LiveUpload {
            uploads,
            id,
            committed,
        }
    }

    fn set(&self, committed: u64) {
        self.committed.store(committed, Ordering::Relaxed);
    }
}

impl Drop for LiveUpload {
    fn drop(&mut self) {
        // A newer stream for the same upload may have registered itself meanwhile.
        self.uploads
            .remove_if(&self.id, |_, c| Arc::ptr_eq(c, &self.committed));
    }
}

/// How a write stream ended.
enum WriteEnd {
    /// The blob is stored; the value is the `committed_size` to report.
    Complete(i64),
    /// The client closed the stream without `finish_write`; the data so far is kept.
    Incomplete(u64),
}

impl ByteStreamService {
    pub(crate) fn new(
        blobs: Arc<dyn BlobStore>,
        config: Arc<CoordinatorConfig>,
        counters: Arc<Counters>,
        registry_blobs: RegistryBlobGuard,
    ) -> Self {
        ByteStreamService {
            blobs,
            config,
            counters,
            live_uploads: Arc::new(DashMap::new()),
            registry_blobs,
        }
    }

    fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.stream_idle_timeout_secs.max(1))
    }

    async fn is_stored(&self, digest: &Digest) -> Result<bool, CoordinatorError> {
        Ok(self.blobs.size_of(&digest.content_hash()).await? == Some(digest.size))
    }

    async fn start_read(
        &self,
        request: ReadRequest,
    ) -> Result<BoxStream<'static, Result<Bytes, CoordinatorError>>, CoordinatorError> {
        let name = ResourceName::parse_read(&request.resource_name)?;
        let digest = name.digest;
        if request.read_offset < 0 {
            return Err(CoordinatorError::OutOfRange(format!(
                "read_offset {} is negative",
                request.read_offset
            )));
        }
        if request.read_limit < 0 {
            return Err(CoordinatorError::bad_request(
                "read_limit",
                "must not be negative",
            ));
        }
        if name.compression != Compression::Identity && request.read_limit != 0 {
            return Err(CoordinatorError::bad_request(
                "read_limit",
                "must be 0 when reading compressed-blobs (REAPI)",
            ));
        }
        if !self.is_stored(&digest).await? {
            return Err(CoordinatorError::NotFound(format!(
                "{digest} is not in the CAS"
            )));
        }
        let offset = request.read_offset as u64;
        if offset > digest.size {
            return Err(CoordinatorError::OutOfRange(format!(
                "read_offset {offset} is past the end of {digest}"
            )));
        }
        let limit = (request.read_limit > 0).then_some(request.read_limit as u64);
        let counters = self.counters.clone();
        let chunks = self
            .blobs
            .read(&digest.content_hash(), offset, limit)
            .await?
            .inspect_ok(move |chunk| counters.cas_read(chunk.len() as u64))
            .boxed();
        Ok(match name.compression {
            Compression::Identity => chunks.map_err(CoordinatorError::from).boxed(),
            Compression::Zstd => {
                zstd_codec::compress_chunks(chunks, self.config.zstd_level).boxed()
            }
        })
    }

    async fn write(
        &self,
        first: WriteRequest,
        stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse, CoordinatorError> {
        let name = ResourceName::parse_write(&first.resource_name)?;
        let digest = name.digest;
        // REAPI: an upload of a blob that is already there ends at once, reporting the
        // full size (or -1 for a compressed upload, whose wire size is unknown).
        let already_stored = match name.compression {
            Compression::Identity => digest.size as i64,
            Compression::Zstd => -1,
        };
        if self.is_stored(&digest).await? {
            return Ok(WriteResponse {
                committed_size: already_stored,
            });
        }
        if first.write_offset < 0 {
            return Err(CoordinatorError::bad_request(
                "write_offset",
                "must not be negative",
            ));
        }

        let id = upload_id(&name);
        let mut writer = self.blobs.begin_write(digest.function, Some(&id)).await?;
        if self.is_stored(&digest).await? {
            // Another upload of the same blob finished while this one waited.
            writer.abort().await?;
            return Ok(WriteResponse {
                committed_size: already_stored,
            });
        }
        let resumable_from = writer.bytes_written();
        let start = first.write_offset as u64;
        if start != resumable_from {
            if start != 0 {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "write_offset {start} does not match the committed size {resumable_from}; \
                     resume at QueryWriteStatus's committed_size"
                )));
            }
            // Starting over is always allowed.
            writer.abort().await?;
            writer = self.blobs.begin_write(digest.function, Some(&id)).await?;
        }

        let live = LiveUpload::new(self.live_uploads.clone(), id, start);
        let received = self
            .receive(&name, first, stream, writer.as_mut(), &live)
            .await;
        match received {
            Ok(WriteEnd::Complete(committed_size)) => {
                writer.commit(ExpectedDigest::Exact(digest)).await?;
                self.counters.cas_written(digest.size);
                Ok(WriteResponse { committed_size })
            }
            Ok(WriteEnd::Incomplete(committed)) => Ok(WriteResponse {
                committed_size: committed as i64,
            }),
            // The other upload won; ours is redundant.
            Err(WriteError::AlreadyStored) => {
                writer.abort().await?;
                Ok(WriteResponse {
                    committed_size: already_stored,
                })
            }
            // Data that cannot be the blob is not worth resuming.
            Err(WriteError::BadData(e)) => {
                writer.abort().await?;
                Err(e)
            }
            // The writer keeps what it was given, for a resumed upload.
            Err(WriteError::Interrupted(e)) => Err(e),
        }
    }

    /// Appends the stream's data to `writer` until `finish_write` or the end of the stream.
    async fn receive(
        &self,
        name: &ResourceName,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
        writer: &mut dyn BlobWriter,
        live: &LiveUpload,
    ) -> Result<WriteEnd, WriteError> {
        let digest = name.digest;
        let mut decoder = match name.compression {
            Compression::Identity => None,
            Compression::Zstd => Some(StreamingDecoder::new().map_err(WriteError::BadData)?),
        };
        let resource_name = first.resource_name.clone();
        let mut wire_offset = first.write_offset as u64;
        let mut committed = writer.bytes_written();
        let mut message = first;
        loop {
            if !message.resource_name.is_empty() && message.resource_name != resource_name {
                return Err(WriteError::BadData(CoordinatorError::bad_request(
                    "resource_name",
                    "must not change within one Write stream",
                )));
            }
            if message.write_offset != wire_offset as i64 {
                return Err(WriteError::Interrupted(CoordinatorError::InvalidArgument(
                    format!(
                        "write_offset {} does not follow the data sent so far (expected {wire_offset})",
                        message.write_offset
                    ),
                )));
            }
            wire_offset += message.data.len() as u64;
            let finish = message.finish_write;
            let append = |piece: Bytes, committed: &mut u64| {
                *committed += piece.len() as u64;
                if *committed > digest.size {
                    return Err(WriteError::BadData(CoordinatorError::InvalidArgument(
                        format!("more data than the {} bytes of {digest}", digest.size),
                    )));
                }
                Ok(piece)
            };
            match decoder.as_mut() {
                None => {
                    let piece = append(message.data, &mut committed)?;
                    writer.write(piece).await.map_err(WriteError::from_store)?;
                }
                Some(decoder) => {
                    let mut consumed = 0;
                    while let Some(piece) = decoder
                        .decode_next(&message.data, &mut consumed)
                        .map_err(WriteError::BadData)?
                    {
                        let piece = append(piece, &mut committed)?;
                        writer.write(piece).await.map_err(WriteError::from_store)?;
                    }
                }
            }
            live.set(committed);
            if finish {
                return Ok(WriteEnd::Complete(wire_offset as i64));
            }
            if self
                .is_stored(&digest)
                .await
                .map_err(WriteError::Interrupted)?
            {
                return Err(WriteError::AlreadyStored);
            }
            match next_within(&mut stream, self.idle_timeout(), "ByteStream Write").await {
                Ok(Some(next)) => message = next,
                Ok(None) => return Ok(WriteEnd::Incomplete(committed)),
                // What arrived stays, for the client to resume from.
                Err(error) => return Err(WriteError::Interrupted(error)),
            }
        }
    }

    async fn query_write_status(
        &self,
        request: QueryWriteStatusRequest,
    ) -> Result<QueryWriteStatusResponse, CoordinatorError> {
        let name = ResourceName::parse_write(&request.resource_name)?;
        if self.is_stored(&name.digest).await? {
            return Ok(QueryWriteStatusResponse {
                committed_size: name.digest.size as i64,
                complete: true,
            });
        }
        let id = upload_id(&name);
        let live = self
            .live_uploads
            .get(&id)
            .map(|c| c.load(Ordering::Relaxed));
        let committed = match live {
            Some(committed) => committed,
            None => {
                // What an earlier stream left behind. Opening the upload waits until a
                // broken stream's writer has saved its last bytes. A Write that has just
                // opened the upload holds it too, before it registers as live; so while
                // waiting, keep looking for it among the live uploads.
                let open = self.blobs.begin_write(name.digest.function, Some(&id));
                tokio::pin!(open);
                loop {
                    tokio::select! {
                        writer = &mut open => {
                            let writer = writer?;
                            let committed = writer.bytes_written();
                            if committed == 0 {
                                writer.abort().await?;
                            }
                            break committed;
                        }
                        _ = tokio::time::sleep(LIVE_UPLOAD_POLL) => {
                            if let Some(live) = self.live_uploads.get(&id) {
                                break live.load(Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        };
        // An upload never seen is reported at offset 0 rather than NOT_FOUND: starting
        // there is always valid, and clients treat it as "start over" either way.
        Ok(QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete: false,
        })
    }
}

/// Why a write stream stopped early, which decides what happens to its partial data.
enum WriteError {
    AlreadyStored,
    BadData(CoordinatorError),
    Interrupted(CoordinatorError),
}

impl WriteError {
    fn from_store(e: kiln_store::StoreError) -> Self {
        WriteError::Interrupted(e.into())
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        rpc_attributes::resource(&request.get_ref().resource_name);
        let name = ResourceName::parse_read(&request.get_ref().resource_name)
            .map_err(CoordinatorError::from)?;
        authorize(&request, Scope::CasRead, &name.instance_name)?;
        self.registry_blobs
            .check(&caller_of(&request), &name.digest)
            .await?;
        let chunks = self.start_read(request.into_inner()).await?;
        Ok(Response::new(
            chunks
                // The chunk as it came from the store: no copy into the message.
                .map_ok(|data| ReadResponse { data })
                .map_err(Status::from)
                .boxed(),
        ))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = caller_of(&request);
        let mut stream = request.into_inner();
        let first = next_within(&mut stream, self.idle_timeout(), "ByteStream Write")
            .await?
            .ok_or_else(|| {
                CoordinatorError::InvalidArgument("the Write stream was empty".into())
            })?;
        rpc_attributes::resource(&first.resource_name);
        let name =
            ResourceName::parse_write(&first.resource_name).map_err(CoordinatorError::from)?;
        caller.require(Scope::CasWrite, &name.instance_name)?;
        Ok(Response::new(
            ByteStreamService::write(self, first, stream).await?,
        ))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        rpc_attributes::resource(&request.get_ref().resource_name);
        let name = ResourceName::parse_write(&request.get_ref().resource_name)
            .map_err(CoordinatorError::from)?;
        authorize(&request, Scope::CasWrite, &name.instance_name)?;
        Ok(Response::new(
            ByteStreamService::query_write_status(self, request.into_inner()).await?,
        ))
    }
}
