//! The CAS side of a REAPI server: capabilities, finding and uploading missing blobs,
//! reading blobs (verified against their digests), and the action cache.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use kiln_proto::reapi::{
    self, action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use kiln_store::{Digest, DigestFunction, ResourceName};
use kiln_telemetry::{traced, TracedChannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::blob_set::{BlobSet, BlobSource};
use crate::outcomes::UploadStats;
use crate::progress::Progress;
use crate::reapi_digest::from_reapi;
use crate::request_metadata::{request_with, Invocation};
use crate::{ClientError, Result};

/// The batch size used when the server sets no limit, and the most kiln puts in one
/// batch whatever the server allows: small batches keep several uploads in flight.
const DEFAULT_MAX_BATCH_BYTES: u64 = 4 << 20;
/// What one batch entry costs beyond its data (digest, framing), for the size budget.
const BATCH_ENTRY_OVERHEAD: u64 = 128;
/// Digests per FindMissingBlobs call; keeps each request far below message limits.
const FIND_MISSING_CHUNK: usize = 10_000;
/// ByteStream chunk size for uploads.
const WRITE_CHUNK: usize = 1 << 20;
/// Uploads and downloads in flight at once.
const TRANSFER_CONCURRENCY: usize = 8;
/// Accepts responses as large as the coordinator may send (full batches, inlined results).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A connection to a REAPI server's CAS, ActionCache and ByteStream services, bound to
/// one instance name and one digest function.
#[derive(Clone)]
pub struct RemoteCas {
    channel: Channel,
    instance_name: String,
    function: DigestFunction,
    invocation: Invocation,
    capabilities: reapi::ServerCapabilities,
    max_batch_bytes: u64,
}

/// Turns `grpc://host:port` (or `http://`) into a tonic endpoint. TLS is not supported yet.
pub fn endpoint(url: &str) -> Result<Endpoint> {
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            if url.starts_with("grpcs://") || url.starts_with("https://") {
                invalid("TLS (grpcs://) is not supported yet; use grpc://")
            } else {
                invalid("expected grpc://HOST:PORT")
            }
        })?;
    Endpoint::from_shared(format!("http://{rest}"))
        .map(|e| e.tcp_nodelay(true))
        .map_err(|e| invalid(&e.to_string()))
}

impl RemoteCas {
    /// Connects, asks for the server's capabilities and checks that it accepts
    /// `function`.
    pub async fn connect(
        url: &str,
        instance_name: &str,
        function: DigestFunction,
        invocation: Invocation,
    ) -> Result<Self> {
        let channel = endpoint(url)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        Self::with_channel(channel, instance_name, function, invocation).await
    }

    pub async fn with_channel(
        channel: Channel,
        instance_name: &str,
        function: DigestFunction,
        invocation: Invocation,
    ) -> Result<Self> {
        let metadata = invocation.metadata("", "");
        let capabilities = CapabilitiesClient::new(traced(channel.clone()))
            .get_capabilities(request_with(
                reapi::GetCapabilitiesRequest {
                    instance_name: instance_name.to_string(),
                },
                &metadata,
            ))
            .await
            .map_err(|s| ClientError::rpc("GetCapabilities", s))?
            .into_inner();
        let cache = capabilities.cache_capabilities.clone().unwrap_or_default();
        if !cache.digest_functions.is_empty()
            && !cache.digest_functions.contains(&function.reapi_value())
        {
            return Err(ClientError::Unsupported(format!(
                "the {function} digest function"
            )));
        }
        let server_limit = u64::try_from(cache.max_batch_total_size_bytes).unwrap_or(0);
        let max_batch_bytes = match server_limit {
            0 => DEFAULT_MAX_BATCH_BYTES,
            limit => limit.min(DEFAULT_MAX_BATCH_BYTES),
        };
        Ok(RemoteCas {
            channel,
            instance_name: instance_name.to_string(),
            function,
            invocation,
            capabilities,
            max_batch_bytes,
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn instance_name(&self) -> &str {
        &self.instance_name
    }

    pub fn digest_function(&self) -> DigestFunction {
        self.function
    }

    pub fn invocation(&self) -> &Invocation {
        &self.invocation
    }

    pub fn capabilities(&self) -> &reapi::ServerCapabilities {
        &self.capabilities
    }

    /// The largest blob sent through BatchUpdateBlobs / read through BatchReadBlobs.
    pub fn max_batch_bytes(&self) -> u64 {
        self.max_batch_bytes
    }

    fn cas(&self) -> ContentAddressableStorageClient<TracedChannel> {
        ContentAddressableStorageClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn byte_stream(&self) -> ByteStreamClient<TracedChannel> {
        ByteStreamClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn action_cache(&self) -> ActionCacheClient<TracedChannel> {
        ActionCacheClient::new(traced(self.channel.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        request_with(message, &self.invocation.metadata("", ""))
    }

    /// The digests among `digests` that the server does not hold. The empty blob is
    /// never reported missing: every REAPI server has it implicitly.
    pub async fn find_missing(
        &self,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<Vec<Digest>> {
        let mut wanted: Vec<Digest> = digests.into_iter().filter(|d| !d.is_empty_blob()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut missing = Vec::new();
        for chunk in wanted.chunks(FIND_MISSING_CHUNK) {
            let response = self
                .cas()
                .find_missing_blobs(self.request(reapi::FindMissingBlobsRequest {
                    instance_name: self.instance_name.clone(),
                    blob_digests: chunk.iter().map(Digest::to_reapi).collect(),
                    digest_function: self.function.reapi_value(),
                }))
                .await
                .map_err(|s| ClientError::rpc("FindMissingBlobs", s))?
                .into_inner();
            for digest in &response.missing_blob_digests {
                missing.push(from_reapi(self.function, Some(digest), "a missing blob")?);
            }
        }
        Ok(missing)
    }

    /// Uploads every blob of `blobs` that the server is missing.
    pub async fn upload_missing(
        &self,
        blobs: &BlobSet,
        progress: &dyn Progress,
    ) -> Result<UploadStats> {
        let missing = self.find_missing(blobs.digests().copied()).await?;
        let mut stats = self.upload(blobs, &missing, progress).await?;
        stats.checked = blobs.len() as u64;
        Ok(stats)
    }

    /// Uploads the blobs `digests` (taken from `blobs`) without asking first: small ones
    /// in batches within the server's limit, large ones through ByteStream.
    pub async fn upload(
        &self,
        blobs: &BlobSet,
        digests: &[Digest],
        progress: &dyn Progress,
    ) -> Result<UploadStats> {
        let mut stats = UploadStats::default();
        let mut small = Vec::new();
        let mut large = Vec::new();
        for digest in digests {
            let source = blobs.get(digest).ok_or_else(|| {
                ClientError::InvalidRequest(format!("no source for blob {digest}"))
            })?;
            stats.uploaded_blobs += 1;
            stats.uploaded_bytes += digest.size;
            if digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch_bytes {
                small.push((*digest, source));
            } else {
                large.push((*digest, source));
            }
        }
        stats.batched_blobs = small.len() as u64;
        progress.upload_started(stats.uploaded_blobs, stats.uploaded_bytes);

        // Plain loops and boxed futures rather than iterator closures: closures over
        // borrowed blobs make the future's Send-ness higher-ranked, which rustc cannot
        // prove where callers need it (tonic handlers, spawned tasks).
        let mut jobs: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
        for batch in self.batches(small) {
            jobs.push(Box::pin(self.upload_batch(batch, progress)));
        }
        for (digest, source) in large {
            jobs.push(Box::pin(self.upload_by_stream(
                digest,
                source.clone(),
                progress,
            )));
        }
        futures::stream::iter(jobs)
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        progress.upload_finished(&stats);
        Ok(stats)
    }

    fn batches<'a>(
        &self,
        mut blobs: Vec<(Digest, &'a BlobSource)>,
    ) -> Vec<Vec<(Digest, &'a BlobSource)>> {
        blobs.sort_by_key(|(digest, _)| std::cmp::Reverse(digest.size));
        let mut batches: Vec<Vec<(Digest, &BlobSource)>> = Vec::new();
        let mut current = Vec::new();
        let mut current_bytes = 0;
        for (digest, source) in blobs {
            let cost = digest.size + BATCH_ENTRY_OVERHEAD;
            if current_bytes + cost > self.max_batch_bytes && !current.is_empty() {
                batches.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current.push((digest, source));
            current_bytes += cost;
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }

    async fn upload_batch(
        &self,
        batch: Vec<(Digest, &BlobSource)>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let mut requests = Vec::with_capacity(batch.len());
        let mut bytes = 0;
        for (digest, source) in &batch {
            let data = match source {
                BlobSource::Bytes(bytes) => bytes.to_vec(),
                BlobSource::File(path) => tokio::fs::read(path)
                    .await
                    .map_err(|e| ClientError::io(path, e))?,
            };
            bytes += data.len() as u64;
            requests.push(reapi::batch_update_blobs_request::Request {
                digest: Some(digest.to_reapi()),
                data,
                compressor: reapi::compressor::Value::Identity as i32,
            });
        }
        let response = self
            .cas()
            .batch_update_blobs(self.request(reapi::BatchUpdateBlobsRequest {
                instance_name: self.instance_name.clone(),
                requests,
                digest_function: self.function.reapi_value(),
            }))
            .await
            .map_err(|s| ClientError::rpc("BatchUpdateBlobs", s))?
            .into_inner();
        for entry in response.responses {
            let status = entry.status.unwrap_or_default();
            if status.code == tonic::Code::Ok as i32 {
                continue;
            }
            let digest = from_reapi(self.function, entry.digest.as_ref(), "a batch response")?;
            let source = batch.iter().find(|(d, _)| *d == digest).map(|(_, s)| *s);
            return Err(upload_failure(
                "BatchUpdateBlobs",
                tonic::Status::new(tonic::Code::from(status.code), status.message),
                source,
            ));
        }
        progress.uploaded_bytes(bytes);
        Ok(())
    }

    async fn upload_by_stream(
        &self,
        digest: Digest,
        source: BlobSource,
        progress: &dyn Progress,
    ) -> Result<()> {
        let resource_name = ResourceName::write(&self.instance_name, digest).to_string();
        // A producer task feeds the call through a small channel, which bounds memory to
        // a few chunks whatever the blob's size.
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let producer = tokio::spawn(send_chunks(
            source.clone(),
            digest.size,
            resource_name,
            sender,
        ));
        let response = self
            .byte_stream()
            .write(self.request(ReceiverStream::new(receiver)))
            .await;
        let sent = producer.await.unwrap_or(0);
        let response = response
            .map_err(|s| upload_failure("ByteStream.Write", s, Some(&source)))?
            .into_inner();
        if response.committed_size != digest.size as i64 {
            return Err(ClientError::InvalidResponse(format!(
                "ByteStream.Write of {digest} committed {} bytes",
                response.committed_size
            )));
        }
        progress.uploaded_bytes(sent.max(digest.size));
        Ok(())
    }

    /// Reads a whole blob into memory, checking it against its digest.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Bytes> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        let data = if digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch_bytes {
            self.batch_read(digest).await?
        } else {
            let mut buffer = BytesMut::with_capacity(digest.size.min(64 << 20) as usize);
            let mut stream = self.read_stream(digest).await?;
            while let Some(chunk) = stream.next().await {
                buffer.extend_from_slice(&chunk?);
            }
            buffer.freeze()
        };
        check_digest(digest, &data)?;
        Ok(data)
    }

    /// Streams a blob into `path` (which is created or truncated), checking its digest
    /// before returning. The caller makes the write atomic.
    pub async fn read_blob_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| ClientError::io(path, e))?;
        if digest.size + BATCH_ENTRY_OVERHEAD <= self.max_batch_bytes {
            let data = self.read_blob(digest).await?;
            file.write_all(&data)
                .await
                .map_err(|e| ClientError::io(path, e))?;
        } else {
            let mut hasher = self.function.hasher();
            let mut size = 0u64;
            let mut stream = self.read_stream(digest).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| ClientError::io(path, e))?;
            }
            let actual = Digest::new(self.function, hasher.finalize(), size);
            if actual != *digest {
                return Err(ClientError::InvalidResponse(format!(
                    "blob {digest} read back as {actual}"
                )));
            }
        }
        file.sync_all()
            .await
            .map_err(|e| ClientError::io(path, e))?;
        Ok(())
    }

    async fn batch_read(&self, digest: &Digest) -> Result<Bytes> {
        let response = self
            .cas()
            .batch_read_blobs(self.request(reapi::BatchReadBlobsRequest {
                instance_name: self.instance_name.clone(),
                digests: vec![digest.to_reapi()],
                acceptable_compressors: vec![],
                digest_function: self.function.reapi_value(),
            }))
            .await
            .map_err(|s| ClientError::rpc("BatchReadBlobs", s))?
            .into_inner();
        let entry = response.responses.into_iter().next().ok_or_else(|| {
            ClientError::InvalidResponse(format!("BatchReadBlobs returned nothing for {digest}"))
        })?;
        let status = entry.status.unwrap_or_default();
        if status.code != tonic::Code::Ok as i32 {
            return Err(ClientError::rpc(
                "BatchReadBlobs",
                tonic::Status::new(
                    tonic::Code::from(status.code),
                    format!("{digest}: {}", status.message),
                ),
            ));
        }
        Ok(Bytes::from(entry.data))
    }

    async fn read_stream(
        &self,
        digest: &Digest,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + use<>> {
        let resource_name = ResourceName::read(&self.instance_name, *digest).to_string();
        let stream = self
            .byte_stream()
            .read(self.request(ReadRequest {
                resource_name,
                read_offset: 0,
                read_limit: 0,
            }))
            .await
            .map_err(|s| ClientError::rpc("ByteStream.Read", s))?
            .into_inner();
        Ok(stream
            .map_ok(|response| Bytes::from(response.data))
            .map_err(|s| ClientError::rpc("ByteStream.Read", s)))
    }

    /// Reads and decodes a proto stored as a blob (a Directory, a Tree, an Action…).
    pub async fn read_message<M: prost::Message + Default>(&self, digest: &Digest) -> Result<M> {
        let bytes = self.read_blob(digest).await?;
        M::decode(bytes).map_err(|e| {
            ClientError::InvalidResponse(format!(
                "blob {digest} is not a valid {}: {e}",
                std::any::type_name::<M>()
            ))
        })
    }

    /// The cached result of `action`, or `None` on a cache miss.
    pub async fn get_action_result(&self, action: &Digest) -> Result<Option<reapi::ActionResult>> {
        let result = self
            .action_cache()
            .get_action_result(self.request(reapi::GetActionResultRequest {
                instance_name: self.instance_name.clone(),
                action_digest: Some(action.to_reapi()),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: vec![],
                digest_function: self.function.reapi_value(),
            }))
            .await;
        match result {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(ClientError::rpc("GetActionResult", status)),
        }
    }

    /// Stores `result` as the result of `action`.
    pub async fn update_action_result(
        &self,
        action: &Digest,
        result: reapi::ActionResult,
    ) -> Result<reapi::ActionResult> {
        self.action_cache()
            .update_action_result(self.request(reapi::UpdateActionResultRequest {
                instance_name: self.instance_name.clone(),
                action_digest: Some(action.to_reapi()),
                action_result: Some(result),
                results_cache_policy: None,
                digest_function: self.function.reapi_value(),
            }))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ClientError::rpc("UpdateActionResult", s))
    }
}

fn check_digest(digest: &Digest, data: &[u8]) -> Result<()> {
    let actual = Digest::of_bytes(digest.function, data);
    if actual != *digest {
        return Err(ClientError::InvalidResponse(format!(
            "blob {digest} read back as {actual}"
        )));
    }
    Ok(())
}

/// A failed upload of a file whose content no longer matches its digest means the
/// file changed after it was hashed; say so rather than relay the server's complaint.
fn upload_failure(
    call: &'static str,
    status: tonic::Status,
    source: Option<&BlobSource>,
) -> ClientError {
    match source {
        Some(BlobSource::File(path)) if status.code() == tonic::Code::InvalidArgument => {
            tracing::debug!(%status, "upload refused");
            ClientError::InputChanged { path: path.clone() }
        }
        _ => ClientError::rpc(call, status),
    }
}

/// Sends the blob's bytes as WriteRequests of [`WRITE_CHUNK`] bytes, the last flagged
/// `finish_write`, and returns how many bytes were sent. A read error ends the stream
/// early; the server then sees a short write and refuses it.
async fn send_chunks(
    source: BlobSource,
    size: u64,
    resource_name: String,
    sender: tokio::sync::mpsc::Sender<WriteRequest>,
) -> u64 {
    let mut sent = 0u64;
    let request = |data: Vec<u8>, sent: u64, last: bool| WriteRequest {
        resource_name: if sent == 0 {
            resource_name.clone()
        } else {
            String::new()
        },
        write_offset: sent as i64,
        finish_write: last,
        data,
    };
    match source {
        BlobSource::Bytes(bytes) => {
            let mut pieces = bytes.chunks(WRITE_CHUNK).peekable();
            if pieces.peek().is_none() {
                let _ = sender.send(request(Vec::new(), 0, true)).await;
            }
            while let Some(piece) = pieces.next() {
                let last = pieces.peek().is_none();
                if sender
                    .send(request(piece.to_vec(), sent, last))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += piece.len() as u64;
            }
        }
        BlobSource::File(path) => {
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "cannot read a blob to upload");
                    return 0;
                }
            };
            loop {
                let want = (size - sent).min(WRITE_CHUNK as u64) as usize;
                let mut buffer = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    match file.read(&mut buffer[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(err) => {
                            tracing::warn!(path = %path.display(), %err, "cannot read a blob to upload");
                            return sent;
                        }
                    }
                }
                buffer.truncate(filled);
                // A file that shrank ends here; the server sees the short length.
                let last = sent + filled as u64 >= size || filled < want;
                if sender.send(request(buffer, sent, last)).await.is_err() {
                    break;
                }
                sent += filled as u64;
                if last {
                    break;
                }
            }
        }
    }
    sent
}
